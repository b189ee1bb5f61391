//! Configuration files of both daemons, through their binaries: `--print-config` shows
//! the effective configuration (file and flags merged) as TOML that, fed back as the
//! file, gives the same configuration; an unknown key, a wrong type and an
//! out-of-range value each give a one-line error naming the key (and the value), a
//! non-zero exit, no panic.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use stallscope_tests::{binary, binary_dir, collector::scratch};

fn agent() -> PathBuf {
    binary(&binary_dir(), "stallscope-agent").expect("agent built")
}

fn collector() -> PathBuf {
    binary(&binary_dir(), "stallscope-collector").expect("collector built")
}

/// Runs `binary args... --config FILE --print-config`; its stdout.
fn print_config(binary: &Path, args: &[&str], file: &Path) -> String {
    let output = Command::new(binary)
        .args(args)
        .arg("--config")
        .arg(file)
        .arg("--print-config")
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The configuration printed from `text` and `flags`, fed back without the flags,
/// prints the same; the printed text contains each of `expected`.
fn round_trip(
    test: &str,
    binary: &Path,
    args: &[&str],
    text: &str,
    flags: &[&str],
    expected: &[&str],
) {
    let dir = scratch(test);
    let first_file = dir.join("first.toml");
    std::fs::write(&first_file, text).expect("write config");
    let mut with_flags = args.to_vec();
    with_flags.extend_from_slice(flags);
    let printed = print_config(binary, &with_flags, &first_file);
    for needle in expected {
        assert!(printed.contains(needle), "`{needle}` not in\n{printed}");
    }
    let second_file = dir.join("printed.toml");
    std::fs::write(&second_file, &printed).expect("write printed");
    let again = print_config(binary, args, &second_file);
    assert_eq!(
        printed, again,
        "printed, then printed from the printed file"
    );
}

#[test]
fn print_config_round_trips_on_both_daemons() {
    let agent_file = "signals = [\"offcpu\", \"lock\"]\n[lock]\nstack_threshold = \"250us\"\n[probes]\nmax_threads = 2048\n[[identity.service]]\nservice = \"shop\"\nunit = \"shop.service\"\n[run]\nagent_id = \"edge-1\"\nspool_max_batches = 100\n";
    round_trip(
        "print-run",
        &agent(),
        &["run"],
        agent_file,
        &[
            "--frequency",
            "77",
            "--batch-interval",
            "20s",
            "--max-backoff",
            "1m",
        ],
        &[
            "frequency_hz = 77",
            "batch_interval = \"20s\"",
            "max_backoff = \"1m\"",
            "agent_id = \"edge-1\"",
            "stack_threshold = \"250us\"",
            "max_threads = 2048",
            "service = \"shop\"",
            "signals = [\"offcpu\", \"lock\"]",
        ],
    );
    round_trip(
        "print-record",
        &agent(),
        &["record"],
        "[oncpu]\nfrequency_hz = 99\n",
        &["--signals", "oncpu", "--drain-interval", "500ms"],
        &[
            "frequency_hz = 99",
            "drain_interval = \"500ms\"",
            "signals = [\"oncpu\"]",
        ],
    );
    round_trip(
        "print-collector",
        &collector(),
        &[],
        "plaintext = true\ninsecure_no_query_auth = true\nmax_streams = 7\n[detect]\nz_open = 4.5\n",
        &[
            "--max-streams",
            "9",
            "--listen",
            "127.0.0.1:7999",
            "--detect-grace",
            "2s",
        ],
        &[
            "max_streams = 9",
            "listen = \"127.0.0.1:7999\"",
            "plaintext = true",
            "z_open = 4.5",
            "grace = \"2s\"",
            "retention = ",
        ],
    );
}

/// Runs `binary args --config FILE(text)` and checks the failure contract: non-zero,
/// no panic, one line, naming `expected`.
fn refuses(binary: &Path, args: &[&str], text: &str, expected: &str) {
    let dir = scratch("bad-config");
    let file = dir.join("bad.toml");
    std::fs::write(&file, text).expect("write config");
    let output = Command::new(binary)
        .args(args)
        .arg("--config")
        .arg(&file)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted {text:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line for {text:?}, got:\n{stderr}");
    assert!(
        lines[0].contains(expected),
        "`{expected}` not in `{}`",
        lines[0]
    );
}

#[test]
fn bad_keys_types_and_values_name_the_key_on_both_daemons() {
    let out = scratch("bad-config-out").join("x.folded");
    let out = out.to_string_lossy();
    for args in [&["run"][..], &["record", "-o", &out][..]] {
        refuses(
            &agent(),
            args,
            "[oncpu]\nfrequncy_hz = 9\n",
            "oncpu.frequncy_hz: unknown field `frequncy_hz`",
        );
        refuses(
            &agent(),
            args,
            "[probes]\nmax_threads = \"many\"\n",
            "probes.max_threads: invalid type: string \"many\"",
        );
        refuses(
            &agent(),
            args,
            "[probes]\nmax_threads = 3\n",
            "probes.max_threads (--max-threads) must be between 16 and 4194304 entries, got 3",
        );
        refuses(
            &agent(),
            args,
            "[network]\nrtt_interval = \"20s\"\n",
            "network.rtt_interval must be between 1us and 10s, got 20s",
        );
    }
    refuses(
        &agent(),
        &["run"],
        "[run]\nspool_max_batches = 0\n",
        "run.spool_max_batches (--spool-max-batches) must be at least 1, got 0",
    );
    refuses(
        &collector(),
        &[],
        "plaintext = true\nmax_streams = 10\nlisten_on = \"127.0.0.1:1\"\n",
        "listen_on: unknown field `listen_on`",
    );
    refuses(
        &collector(),
        &[],
        "max_message_bytes = \"16MB\"\n",
        "max_message_bytes: invalid type: string \"16MB\"",
    );
    refuses(
        &collector(),
        &[],
        "plaintext = true\ninsecure_no_query_auth = true\nmax_message_bytes = 100\n",
        "max_message_bytes (--max-message-bytes) must be at least 1024 bytes, got 100",
    );
    refuses(
        &collector(),
        &[],
        "plaintext = true\ninsecure_no_query_auth = true\nhttp_listen = \"127.0.0.1:0\"\nhttp_max_body_bytes = 10\n",
        "http_max_body_bytes (--http-max-body-bytes) must be at least 1024 bytes, got 10",
    );
}
