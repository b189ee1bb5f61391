//! Windows marked by hand, through the real CLI against a real collector, on SQLite and
//! ClickHouse: `stallscope windows add`, the listing with its filters, `close`, `show`,
//! and one-line errors for bad input that store nothing. No probes: no root needed.

use std::process::Output;

use serde_json::Value;
use stallscope_tests::{
    binary_dir,
    collector::{
        CollectorProcess, TEST_TOKEN, cli, cli_json, clickhouse_url, free_port, require_clickhouse,
        scratch,
    },
};

fn ok_json(url: &str, args: &[&str]) -> Value {
    cli_json(&binary_dir(), url, args).unwrap_or_else(|err| panic!("{args:?}: {err}"))
}

fn run(url: &str, args: &[&str]) -> Output {
    cli(&binary_dir(), url, args).expect("stallscope runs")
}

/// A failed command: non-zero exit, one line on stderr saying `reason`.
fn refused(url: &str, args: &[&str], reason: &str) {
    let output = run(url, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("stallscope: "), "{args:?}: {stderr}");
    assert!(stderr.contains(reason), "{args:?}: {stderr}");
}

fn ids(listed: &Value) -> Vec<String> {
    listed
        .as_array()
        .map(|windows| {
            windows
                .iter()
                .map(|w| w["id"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn scenario(url: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (from, until) = ((now - 1800).to_string(), (now - 1200).to_string());
    let add_past = [
        "windows",
        "add",
        "--service",
        "checkout",
        "--from",
        &from,
        "--until",
        &until,
        "--note",
        "checkout slow after the 14:02 deploy",
    ];
    let past = ok_json(url, &add_past);
    let past_id = past["id"].as_str().expect("id").to_owned();
    assert!(past_id.starts_with("m-"), "{past}");
    assert_eq!(
        (&past["source"], &past["state"], &past["service"]),
        (
            &Value::from("manual"),
            &Value::from("closed"),
            &Value::from("checkout")
        )
    );
    assert_eq!(
        past["end_unix_ns"].as_i64().expect("end") - past["onset_unix_ns"].as_i64().expect("onset"),
        600_000_000_000
    );
    // Adding it again (a retry) records nothing new.
    let text = run(url, &add_past);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    assert!(
        stdout.contains(&format!("already recorded: window {past_id}")),
        "{stdout}"
    );

    let open = ok_json(
        url,
        &[
            "windows",
            "add",
            "--service",
            "billing",
            "--host",
            "web-2",
            "--from",
            "10m",
        ],
    );
    let open_id = open["id"].as_str().expect("id").to_owned();
    assert_eq!(open["state"], "open");
    assert_eq!(open["end"], Value::Null);

    let all = ok_json(url, &["windows", "--since", "1h"]);
    assert_eq!(ids(&all), [past_id.as_str(), open_id.as_str()]);
    assert_eq!(
        ids(&ok_json(
            url,
            &["windows", "--since", "1h", "--service", "checkout"]
        )),
        [past_id.as_str()]
    );
    assert_eq!(
        ids(&ok_json(
            url,
            &["windows", "--since", "1h", "--state", "open"]
        )),
        [open_id.as_str()]
    );
    assert_eq!(
        ids(&ok_json(url, &["windows", "--since", "15m"])),
        [open_id.as_str()],
        "the closed one ended 20 minutes ago"
    );
    assert!(
        ids(&ok_json(
            url,
            &["windows", "--since", "1h", "--source", "alertmanager"]
        ))
        .is_empty()
    );
    let table = run(url, &["windows", "--since", "1h"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains(&past_id) && table.contains("service=checkout"),
        "{table}"
    );
    assert!(table.contains("service=billing host=web-2"), "{table}");
    assert!(
        table.contains("checkout slow after the 14:02 deploy"),
        "{table}"
    );

    // Close the open one five minutes ago; closing it again is refused.
    let closed = ok_json(url, &["windows", "close", &open_id, "--at", "5m"]);
    assert_eq!(closed["state"], "closed");
    let closed_at = closed["end_unix_ns"].as_i64().expect("end");
    refused(url, &["windows", "close", &open_id], "already closed");
    let shown = ok_json(url, &["windows", "show", &open_id]);
    assert_eq!(shown["end_unix_ns"], closed_at);
    let text = run(url, &["windows", "show", &open_id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("state       closed"), "{text}");
    assert!(text.contains("top cause   not explained yet"), "{text}");

    // Bad input: one line each, nothing stored.
    refused(url, &["windows", "add", "--from", "10m"], "needs --service");
    refused(url, &["windows", "add", "--service", "x"], "needs --from");
    refused(
        url,
        &["windows", "add", "--service", "x", "--from", "yesterday"],
        "is not a time",
    );
    refused(
        url,
        &[
            "windows",
            "add",
            "--service",
            "x",
            "--from",
            "10m",
            "--until",
            "20m",
        ],
        "must be after --from",
    );
    refused(
        url,
        &[
            "windows",
            "add",
            "--service",
            "x",
            "--from",
            "2099-01-01T00:00:00Z",
        ],
        "more than a day from now",
    );
    refused(
        url,
        &["windows", "show", "m-0000000000000000"],
        "no window with id",
    );
    refused(
        url,
        &["windows", "close", "not an id"],
        "is not a window id",
    );
    refused(
        url,
        &["windows", "close", &past_id, "--at", "soon"],
        "is not a time",
    );
    refused(
        url,
        &["windows", "--source", "pager"],
        "use automatic, alertmanager or manual",
    );
    assert_eq!(ids(&ok_json(url, &["windows", "--since", "1h"])).len(), 2);
}

#[test]
fn windows_by_hand_through_the_cli_sqlite() {
    let dir = scratch("windows-cli");
    let data = dir.join("data").to_string_lossy().into_owned();
    let collector = CollectorProcess::start(
        &binary_dir(),
        free_port().expect("port"),
        &[
            "--plaintext",
            "--query-tokens",
            TEST_TOKEN,
            "--data-dir",
            &data,
        ],
        &[],
    )
    .expect("collector starts");
    scenario(&collector.plaintext_url());
}

#[test]
fn windows_by_hand_through_the_cli_clickhouse() {
    if !require_clickhouse("windows_by_hand_through_the_cli_clickhouse") {
        return;
    }
    let database = format!("stallscope_wcli_{}", std::process::id());
    let url = clickhouse_url();
    let collector = CollectorProcess::start(
        &binary_dir(),
        free_port().expect("port"),
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
        &[],
    )
    .expect("collector starts");
    scenario(&collector.plaintext_url());
    drop(collector);
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
