//! Bad input to `stallscope-agent record`: a one-line error that says what to do, a
//! non-zero exit, no panic, and no output file (not even half a one).

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use stallscope_tests::{binary, binary_dir, is_root, require_root};

fn agent() -> PathBuf {
    binary(&binary_dir(), "stallscope-agent").expect("agent built")
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stallscope-bad-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs the agent, checks the failure contract, returns its stderr.
fn fails(command: &mut Command, dir: &Path, expected: &str) -> String {
    let output = command.output().expect("agent runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "agent succeeded on bad input: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "agent panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{stderr}");
    assert!(
        lines[0].contains(expected),
        "error `{}` does not mention `{expected}`",
        lines[0]
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
    stderr
}

#[test]
fn unknown_signal() {
    let dir = scratch_dir("signal");
    let out = dir.join("x.svg");
    fails(
        Command::new(agent())
            .args(["record", "--signals", "offcpu,bogus", "-o"])
            .arg(&out),
        &dir,
        "unknown signal `bogus`",
    );
}

#[test]
fn unsupported_output_extension() {
    let dir = scratch_dir("ext");
    fails(
        Command::new(agent())
            .args(["record", "-d", "1s", "-o"])
            .arg(dir.join("x.png")),
        &dir,
        "unsupported output file",
    );
}

#[test]
fn unwritable_output_path() {
    let dir = scratch_dir("unwritable");
    fails(
        Command::new(agent())
            .args(["record", "-d", "1s", "-o"])
            .arg(dir.join("missing-dir").join("x.svg")),
        &dir,
        "cannot write",
    );
}

#[test]
fn pid_that_does_not_exist() {
    let dir = scratch_dir("pid");
    // pid_max is at most 4194304, so this pid never exists.
    fails(
        Command::new(agent())
            .args(["record", "-d", "1s", "--pid", "4194305", "-o"])
            .arg(dir.join("x.svg")),
        &dir,
        "no process with pid 4194305",
    );
}

#[test]
fn bad_duration() {
    let dir = scratch_dir("duration");
    fails(
        Command::new(agent())
            .args(["record", "-d", "soon", "-o"])
            .arg(dir.join("x.svg")),
        &dir,
        "invalid duration `soon`",
    );
}

#[test]
fn not_root() {
    if !is_root() {
        // Already unprivileged: the agent itself must refuse.
        let dir = scratch_dir("notroot");
        fails(
            Command::new(agent())
                .args(["record", "-d", "1s", "-o"])
                .arg(dir.join("x.svg")),
            &dir,
            "needs root",
        );
        return;
    }
    // As root, run the agent as `nobody` in a directory it can write to.
    let dir = scratch_dir("notroot");
    let _ = Command::new("chmod").arg("0777").arg(&dir).status();
    fails(
        Command::new(agent())
            .args(["record", "-d", "1s", "-o"])
            .arg(dir.join("x.svg"))
            .uid(65534)
            .gid(65534),
        &dir,
        "needs root",
    );
}

#[test]
fn missing_btf() {
    if !require_root("missing_btf") {
        return;
    }
    let dir = scratch_dir("btf");
    fails(
        Command::new(agent())
            .args(["record", "-d", "1s", "--btf", "/nonexistent/vmlinux", "-o"])
            .arg(dir.join("x.svg")),
        &dir,
        "BTF file /nonexistent/vmlinux is unreadable",
    );
}

/// A configuration file with `text`, in a directory of its own (so `fails` finds no
/// leftovers in the run's directory).
fn config_file(test: &str, text: &str) -> PathBuf {
    let path = scratch_dir(&format!("{test}-config")).join("agent.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn run_config_errors_name_the_key_and_the_value() {
    let dir = scratch_dir("run-config");
    let spool = dir.join("spool");
    let bad_duration = config_file("run-duration", "[run]\nbatch_interval = \"soon\"\n");
    fails(
        Command::new(agent())
            .arg("run")
            .arg("--config")
            .arg(&bad_duration)
            .arg("--spool-dir")
            .arg(&spool),
        &dir,
        "run.batch_interval: invalid duration `soon`",
    );
    let unknown = config_file("run-unknown", "[run]\nspool_max = 3\n");
    fails(
        Command::new(agent())
            .arg("run")
            .arg("--config")
            .arg(&unknown)
            .arg("--spool-dir")
            .arg(&spool),
        &dir,
        "run.spool_max: unknown field `spool_max`",
    );
    fails(
        Command::new(agent())
            .args(["run", "--batch-interval", "100ms", "--spool-dir"])
            .arg(&spool),
        &dir,
        "run.batch_interval (--batch-interval) must be at least the drain interval and at most 1h, got 100ms",
    );
    fails(
        Command::new(agent())
            .args(["run", "--flush-timeout", "later", "--spool-dir"])
            .arg(&spool),
        &dir,
        "invalid duration `later` for --flush-timeout",
    );
}

#[test]
fn durations_need_a_unit_and_must_be_positive() {
    let dir = scratch_dir("duration-units");
    let out = dir.join("x.svg");
    for (flag, value, expected) in [
        (
            "-d",
            "10",
            "--duration: duration `10` has no unit: write 10s",
        ),
        ("-d", "0s", "--duration: duration `0s` is not positive"),
        ("-d", "-5s", "--duration: duration `-5s` is not positive"),
        (
            "--offcpu-threshold",
            "5",
            "--offcpu-threshold: duration `5` has no unit",
        ),
    ] {
        fails(
            Command::new(agent())
                .args(["record", flag, value, "-o"])
                .arg(&out),
            &dir,
            expected,
        );
    }
}

#[test]
fn config_file_errors_name_the_line() {
    let dir = scratch_dir("config-line");
    let config =
        std::env::temp_dir().join(format!("stallscope-bad-config-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "signals = [\"offcpu\"]\n\n[offcpu]\nstack_threshold = 5\n",
    )
    .expect("write config");
    fails(
        Command::new(agent())
            .args(["record", "-d", "1s", "--config"])
            .arg(&config)
            .arg("-o")
            .arg(dir.join("x.svg")),
        &dir,
        "line 4",
    );
    let _ = std::fs::remove_file(&config);
}
