//! The README's `go tool pprof` commands, run as printed on real recordings (root: the
//! agent records the bundled workload): each must print a non-empty table whose function
//! names are whole (pprof's default name simplification must not cut Rust names like
//! `<std::...::Thread>::new::thread_start` down to `::new::thread_start`), and whose total
//! is the time of the samples the command selects. The only substitutions: the file names
//! become the recordings' paths, and the example peer the peer the workload talked to.

use std::{collections::HashMap, path::PathBuf, process::Command};

use stallscope_profile::Profile;
use stallscope_tests::{binary_dir, in_ci, label, record_workload, require_root, scratch_dir};

/// The `go tool pprof ...` commands in the README's code blocks.
fn readme_pprof_commands() -> Vec<String> {
    let readme = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let mut in_code = false;
    let mut commands = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        if let Some(start) = line.find("go tool pprof") {
            let command = line[start..]
                .split(['#', ')'])
                .next()
                .unwrap_or_default()
                .trim();
            commands.push(command.to_owned());
        }
    }
    commands
}

/// Whether `go` runs; in CI a missing Go is a failure (`cargo xtask test` installs it).
fn require_go(test: &str) -> bool {
    let works = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return true;
    }
    assert!(
        !in_ci(),
        "{test} needs `go tool pprof` (Debian's golang-go)"
    );
    eprintln!("skipping {test}: no `go` (cargo xtask test installs golang-go)");
    false
}

/// `1.23s`, `456.78ms`, `12us`, `3mins` as pprof prints nanosecond values.
fn pprof_ns(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "mins" => 60e9,
        "hrs" => 3600e9,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

/// A pprof `-top` table: (time of the rows shown, total of the sample type, function
/// names of the rows), from `Showing nodes accounting for X, P% of Y total`.
fn parse_top(output: &str) -> (f64, f64, Vec<String>) {
    let (shown, total) = output
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("Showing nodes accounting for ")?;
            let (shown, rest) = rest.split_once(", ")?;
            let total = rest.split(" of ").nth(1)?.split_whitespace().next()?;
            Some((
                if shown == "0" {
                    Some(0.0)
                } else {
                    pprof_ns(shown)
                }?,
                pprof_ns(total)?,
            ))
        })
        .unwrap_or((0.0, 0.0));
    let names = output
        .lines()
        .skip_while(|line| !line.contains("flat%"))
        .skip(1)
        .filter_map(|line| {
            // flat flat% sum% cum cum% NAME (the name may hold spaces).
            let mut rest = line.trim_start();
            for _ in 0..5 {
                let end = rest.find(char::is_whitespace)?;
                rest = rest[end..].trim_start();
            }
            (!rest.is_empty()).then(|| rest.to_owned())
        })
        .collect();
    (shown, total, names)
}

fn record(test: &str, scenario: &[&str], file: &str, args: &[&str]) -> (PathBuf, Profile) {
    let path = scratch_dir(test).join(file);
    let path_arg = path.to_string_lossy().into_owned();
    let mut agent_args = args.to_vec();
    agent_args.extend(["-o", path_arg.as_str()]);
    let exit = record_workload(&binary_dir(), scenario, &agent_args)
        .unwrap_or_else(|err| panic!("recording {scenario:?}: {err:#}"));
    assert!(exit.status.success(), "{}", exit.stderr);
    let profile = stallscope_profile::pprof::decode_pprof(&std::fs::read(&path).expect("written"))
        .expect("pprof");
    (path, profile)
}

/// The client-side peer (address and port, as in the README's example) with the most
/// socket-wait time, and the socket-wait time of the samples `-tagfocus peer=` with it
/// selects (pprof matches the value as an unanchored regular expression).
fn busiest_peer(profile: &Profile) -> (String, i64) {
    let column = stallscope_tests::value_index(profile, "socket_wait", "nanoseconds");
    let mut by_peer: HashMap<String, i64> = HashMap::new();
    for sample in &profile.samples {
        let peer = label(sample, "peer");
        if peer.contains(':') {
            *by_peer.entry(peer.to_owned()).or_default() += sample.values[column];
        }
    }
    let (peer, _) = by_peer
        .into_iter()
        .max_by_key(|(_, ns)| *ns)
        .expect("the recording has socket waits with a peer");
    let selected = profile
        .samples
        .iter()
        .filter(|sample| label(sample, "peer").contains(&peer))
        .map(|sample| sample.values[column])
        .sum();
    (peer, selected)
}

#[test]
fn readme_pprof_commands_print_whole_names_and_the_selected_time() {
    let test = "readme_pprof_commands_print_whole_names_and_the_selected_time";
    if !require_root(test) || !require_go(test) {
        return;
    }
    let commands = readme_pprof_commands();
    assert!(
        commands.iter().any(|c| c.contains("app.pb.gz"))
            && commands.iter().any(|c| c.contains("net.pb.gz")),
        "the README's pprof examples changed: {commands:?}"
    );
    let (app_path, app) = record("readme-app", &["markers"], "app.pb.gz", &[]);
    let (net_path, net) = record(
        "readme-net",
        &["net-rr", "20000"],
        "net.pb.gz",
        &["--signals", "network,offcpu"],
    );
    let (peer, peer_ns) = busiest_peer(&net);
    for command in &commands {
        let mut words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        // (profile, its total of the sample type shown, the part the command selects)
        let (profile, total_ns, selected_ns) = if command.contains("net.pb.gz") {
            let column = stallscope_tests::value_index(&net, "socket_wait", "nanoseconds");
            assert!(
                command.contains("-sample_index=socket_wait"),
                "peer labels are on socket-wait samples: `{command}` must select them"
            );
            (&net, net.total(column) as f64, peer_ns as f64)
        } else {
            assert!(command.contains("app.pb.gz"), "unknown file in `{command}`");
            let default = app.meta.default_sample_type;
            let total = app.total(default) as f64;
            (&app, total, total)
        };
        assert!(
            selected_ns > 0.0,
            "`{command}` selects nothing in the recording"
        );
        for word in &mut words {
            if word == "app.pb.gz" {
                *word = app_path.to_string_lossy().into_owned();
            } else if word == "net.pb.gz" {
                *word = net_path.to_string_lossy().into_owned();
            } else if let Some(example) = word.strip_prefix("peer=") {
                assert!(!example.is_empty());
                *word = format!("peer={peer}");
            }
        }
        let output = Command::new(&words[0])
            .args(&words[1..])
            .env("PPROF_TMPDIR", scratch_dir("readme-pprof-tmp"))
            .output()
            .expect("go runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "`{command}` failed: {stderr}");
        let (shown, total, names) = parse_top(&stdout);
        assert!(
            !names.is_empty(),
            "`{command}` printed no rows:\n{stdout}{stderr}"
        );
        assert!(
            (total - total_ns).abs() <= total_ns * 0.01,
            "`{command}`: pprof's total {total} ns, the profile's {total_ns} ns:\n{stdout}"
        );
        // The rows shown hold the selected time, less the small nodes pprof drops.
        assert!(
            shown <= selected_ns * 1.01 && shown >= selected_ns * 0.8,
            "`{command}`: rows for {shown} ns, the samples it selects hold {selected_ns} ns:\n{stdout}"
        );
        let known: std::collections::HashSet<&str> =
            profile.frames.iter().map(|f| f.function.as_str()).collect();
        for name in &names {
            assert!(
                known.contains(name.as_str()),
                "`{command}` shows `{name}`, which is no whole function name of the profile:\n{stdout}"
            );
        }
        if !command.contains("net.pb.gz") {
            assert!(
                names.iter().any(|n| n.ends_with("offcpu_marker_sleep")),
                "{stdout}"
            );
            assert!(
                names.iter().any(|n| n.starts_with('<')),
                "no Rust name with a `<...>` group among the rows, so the test proves nothing:\n{stdout}"
            );
        }
    }
}
