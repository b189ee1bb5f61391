//! End to end, as root: a deploy seen by a real agent reaches the collector and the CLI.
//! `stallscope-agent run` streams while a service restarts with a rebuilt binary (the
//! identity tests' fixture); `stallscope events` lists the deploy, with both build-ids,
//! for that service and time range, and the service's binaries, on SQLite and
//! ClickHouse.

use std::{path::Path, time::Duration};

use serde_json::Value;
use stallscope_tests::{
    Workload, binary_dir,
    collector::{
        CollectorProcess, TEST_TOKEN, cli, cli_json, clickhouse_url, free_port, require_clickhouse,
        scratch,
    },
    fixtures::{self, Build},
    require_root, serial,
    streaming::{start_run, stop_run},
};

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn build(version: &str, path: &Path) {
    fixtures::build_identapp(
        path,
        Build {
            version,
            build_id: true,
            split_debug: false,
        },
    )
    .expect("builds the C workload");
}

fn run_once(app: &Path) -> u32 {
    let mut workload = Workload::start(app, &["4"]).expect("workload starts");
    let pid = workload.pid;
    workload.go().expect("go");
    workload
        .wait_done(Duration::from_secs(60))
        .expect("workload done");
    // Alive a while longer: the agent reads a new process's binary (its build-id) on a
    // lane, and a process gone before that leaves its build-id unknown.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        workload
            .finish(Duration::from_secs(10))
            .expect("exits")
            .success()
    );
    pid
}

/// A service deployed under a streaming agent; the CLI lists the deploy.
fn deploy_is_listed(name: &str, collector_args: &[&str]) {
    let _serial = serial();
    let bin = binary_dir();
    let dir = scratch(name);
    let collector = CollectorProcess::start(&bin, free_port().expect("port"), collector_args, &[])
        .expect("collector starts");
    let url = collector.plaintext_url();
    // A service name of its own, so other tests' processes cannot look like it.
    let app = dir.join(format!("deployapp{}", std::process::id()));
    let service = app
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .expect("name");
    build("1", &app);
    let old_build = fixtures::build_id(&app).expect("build-id");
    let from = now_s() - 1;
    let agent = start_run(
        &bin,
        &url,
        &dir.join("spool"),
        name,
        &["--signals", "offcpu"],
    )
    .expect("agent runs");
    let first_pid = run_once(&app);
    let staged = dir.join("next");
    build("2", &staged);
    std::fs::rename(&staged, &app).expect("the deploy replaces the binary");
    let new_build = fixtures::build_id(&app).expect("build-id");
    assert_ne!(old_build, new_build);
    let second_pid = run_once(&app);
    let (summary, _) = stop_run(agent).expect("agent stops");
    assert!(summary.all_acknowledged, "{summary:?}");
    let until = now_s() + 1;

    let (from_arg, until_arg) = (from.to_string(), until.to_string());
    let events = cli_json(
        &bin,
        &url,
        &[
            "events",
            "--service",
            &service,
            "--from",
            &from_arg,
            "--until",
            &until_arg,
        ],
    )
    .expect("stallscope events");
    let events = events.as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "{events:#?}");
    let deploy = &events[0];
    assert_eq!(deploy["kind"], "deploy", "{events:#?}");
    assert_eq!(deploy["service"], Value::from(service.clone()));
    assert_eq!(deploy["pid"], second_pid);
    assert_eq!(deploy["previous_pid"], first_pid);
    assert_eq!(deploy["build_id"], Value::from(new_build.clone()));
    assert_eq!(deploy["previous_build_id"], Value::from(old_build.clone()));
    assert_eq!(deploy["agent"], name);
    let at = deploy["time_unix_ns"].as_i64().expect("time") / 1_000_000_000;
    assert!((from..until).contains(&at), "{at} outside {from}..{until}");

    // Outside its time range, or for another service, nothing.
    let before = (at - 600).to_string();
    let just_before = at.to_string();
    let earlier = cli_json(
        &bin,
        &url,
        &[
            "events",
            "--service",
            &service,
            "--from",
            &before,
            "--until",
            &just_before,
        ],
    )
    .expect("stallscope events");
    assert_eq!(earlier, Value::Array(Vec::new()));
    let other = cli_json(
        &bin,
        &url,
        &["events", "--service", "no-such-service", "--since", "1h"],
    )
    .expect("stallscope events");
    assert_eq!(other, Value::Array(Vec::new()));

    // The table, and the binaries the service's stacks ran through.
    let table = cli(
        &bin,
        &url,
        &[
            "events",
            "--service",
            &service,
            "--since",
            "1h",
            "--binaries",
        ],
    )
    .expect("stallscope events");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    assert!(
        text.contains("deploy") && text.contains(&new_build[..16]),
        "{text}"
    );
    let with_binaries = cli_json(
        &bin,
        &url,
        &[
            "events",
            "--service",
            &service,
            "--since",
            "1h",
            "--binaries",
        ],
    )
    .expect("stallscope events --binaries");
    let binaries = with_binaries["binaries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let app_path = app.to_string_lossy().into_owned();
    let builds: Vec<&str> = binaries
        .iter()
        .filter(|b| b["path"] == app_path.as_str())
        .filter_map(|b| b["build_id"].as_str())
        .collect();
    assert!(
        builds.contains(&new_build.as_str()),
        "the new build among {binaries:#?}"
    );
}

#[test]
fn a_deploy_seen_by_the_agent_is_listed_sqlite() {
    if !require_root("a_deploy_seen_by_the_agent_is_listed_sqlite") {
        return;
    }
    let dir = scratch("events-sqlite-data");
    let data = dir.to_string_lossy().into_owned();
    deploy_is_listed(
        "events-sqlite",
        &[
            "--plaintext",
            "--query-tokens",
            TEST_TOKEN,
            "--data-dir",
            &data,
        ],
    );
}

#[test]
fn a_deploy_seen_by_the_agent_is_listed_clickhouse() {
    let test = "a_deploy_seen_by_the_agent_is_listed_clickhouse";
    if !require_root(test) || !require_clickhouse(test) {
        return;
    }
    let database = format!("stallscope_events_{}", std::process::id());
    let url = clickhouse_url();
    deploy_is_listed(
        "events-clickhouse",
        &[
            "--plaintext",
            "--query-tokens",
            TEST_TOKEN,
            "--storage",
            "clickhouse",
            "--clickhouse-url",
            &url,
            "--clickhouse-database",
            &database,
        ],
    );
    let address = url.trim_start_matches("http://").trim_end_matches('/');
    let _ = stallscope_tests::http::request(
        address.parse().expect("ClickHouse address"),
        None,
        "POST",
        "/",
        &[],
        format!("DROP DATABASE IF EXISTS {database}").as_bytes(),
        stallscope_tests::http::Framing::ContentLength,
    );
}
