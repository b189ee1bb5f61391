//! Self-observability end to end: a collector with its HTTP listener and `stallscope-agent
//! run --metrics-listen` streaming to it. Both `/metrics` outputs pass `promtool check
//! metrics` (Prometheus's own linter); the health endpoints answer; and when a flood of
//! short-lived threads overflows deliberately tiny probe maps, the agent's loss counters
//! on `/metrics` move from zero, while its event, batch and send-latency counters and the
//! collector's ingest and query counters show the traffic that really happened.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use stallscope_tests::{
    AgentRun, Workload, binary, binary_dir,
    collector::{CollectorProcess, TEST_TOKEN, cli, free_port, scratch},
    http::{Framing, request},
    require_root, serial, wait_for,
};

/// Threads the churn scenario starts (each waits off CPU three times): far more than
/// the 16-entry thread table and totals map the agent gets.
const CHURN_THREADS: &str = "3000";

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let reply = request(addr, None, "GET", path, &[], b"", Framing::ContentLength)
        .unwrap_or_else(|err| panic!("GET {path} from {addr}: {err:#}"));
    (reply.status, reply.body)
}

/// `promtool check metrics` on `text`: Prometheus's parser and linter must accept it.
fn promtool_accepts(what: &str, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package `prometheus`; `cargo xtask test` installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics refused the {what}'s /metrics: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The samples of an exposition, `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples whose `name{labels}` starts with `prefix` and contains every
/// one of `parts`.
fn sum(samples: &BTreeMap<String, f64>, prefix: &str, parts: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(key, _)| key.starts_with(prefix) && parts.iter().all(|p| key.contains(p)))
        .map(|(_, value)| value)
        .sum()
}

#[test]
fn metrics_pass_promtool_and_loss_counters_move_when_losses_happen() {
    if !require_root("metrics_pass_promtool_and_loss_counters_move_when_losses_happen") {
        return;
    }
    let _serial = serial();
    let bin = binary_dir();
    let dir = scratch("self-metrics");
    let http_port = free_port().expect("port");
    let http_listen = format!("127.0.0.1:{http_port}");
    let data = dir.join("data").to_string_lossy().into_owned();
    let mut collector = CollectorProcess::start(
        &bin,
        free_port().expect("port"),
        &[
            "--plaintext",
            "--query-tokens",
            TEST_TOKEN,
            "--data-dir",
            &data,
            "--http-listen",
            &http_listen,
        ],
        &[],
    )
    .expect("collector starts");
    let collector_http: SocketAddr = http_listen.parse().expect("address");
    assert_eq!(get(collector_http, "/healthz").0, 200);
    assert_eq!(get(collector_http, "/readyz").0, 200);

    let mut workload = Workload::start(
        &binary(&bin, "stallscope-workload").expect("workload built"),
        &["churn", CHURN_THREADS],
    )
    .expect("workload starts");
    let pid = workload.pid.to_string();
    let spool = dir.join("spool").to_string_lossy().into_owned();
    let url = collector.plaintext_url();
    let mut agent = AgentRun::start(
        &binary(&bin, "stallscope-agent").expect("agent built"),
        &[
            "run",
            "--collector",
            &url,
            "--agent-id",
            "metrics-test",
            "--spool-dir",
            &spool,
            "--batch-interval",
            "1s",
            "--metrics-listen",
            "127.0.0.1:0",
            "--pid",
            &pid,
            "--signals",
            "offcpu,oncpu",
            "--max-threads",
            "16",
            "--max-totals",
            "16",
            "--max-samples",
            "16",
            "--max-stacks",
            "16",
            "--max-pending",
            "16",
        ],
    )
    .expect("agent starts");
    let log = agent
        .wait_log("metrics at http://", Duration::from_secs(60))
        .expect("agent serves metrics");
    let agent_http: SocketAddr = log
        .split("metrics at http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {log}"));
    agent
        .wait_ready(Duration::from_secs(60))
        .expect("probes attached");
    wait_for("the agent is ready", Duration::from_secs(10), || {
        get(agent_http, "/readyz").0 == 200
    });
    assert_eq!(get(agent_http, "/healthz").0, 200);
    // A drain with the workload idle: nothing of it can have been lost yet.
    wait_for("a drain", Duration::from_secs(10), || {
        sum(
            &samples(&get(agent_http, "/metrics").1),
            "stallscope_agent_drains_total",
            &[],
        ) >= 1.0
    });
    let before = samples(&get(agent_http, "/metrics").1);
    let losses_before = sum(
        &before,
        "stallscope_agent_losses_total",
        &["signal=\"offcpu\""],
    );
    assert!(losses_before < 0.5, "losses before the flood: {before:?}");

    workload.go().expect("flood starts");
    workload
        .wait_done(Duration::from_secs(120))
        .expect("flood done");
    let mut after = BTreeMap::new();
    wait_for("loss counters to move", Duration::from_secs(20), || {
        after = samples(&get(agent_http, "/metrics").1);
        sum(
            &after,
            "stallscope_agent_losses_total",
            &["signal=\"offcpu\""],
        ) > 0.0
    });
    wait_for("a batch acknowledged", Duration::from_secs(30), || {
        after = samples(&get(agent_http, "/metrics").1);
        sum(&after, "stallscope_agent_batches_acknowledged_total", &[]) >= 1.0
    });
    let lost_waits = sum(
        &after,
        "stallscope_agent_losses_total",
        &["signal=\"offcpu\""],
    );
    let table_full = sum(
        &after,
        "stallscope_agent_losses_total",
        &["signal=\"offcpu\"", "thread_table_full"],
    ) + sum(
        &after,
        "stallscope_agent_losses_total",
        &["signal=\"offcpu\"", "aggregation_map_full"],
    );
    eprintln!(
        "off-CPU losses after the flood: {lost_waits} (full thread table or totals map: {table_full}); events {}",
        sum(
            &after,
            "stallscope_agent_events_total",
            &["signal=\"offcpu\""]
        )
    );
    assert!(table_full > 0.0, "no map-full loss counted: {after:?}");
    assert!(
        sum(
            &after,
            "stallscope_agent_events_total",
            &["signal=\"offcpu\""]
        ) > 0.0
    );
    assert!(sum(&after, "stallscope_agent_send_latency_seconds_count", &[]) >= 1.0);
    assert!(
        sum(
            &after,
            "stallscope_agent_map_fill_ratio",
            &["map=\"totals\""]
        ) > 0.0
    );
    assert!(sum(&after, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(sum(&after, "process_cpu_seconds_total", &[]) > 0.0);
    promtool_accepts("agent", &get(agent_http, "/metrics").1);

    // The collector counted what it stored and the query it answered.
    let targets = cli(&bin, &url, &["targets", "--since", "1h"]).expect("cli runs");
    assert!(
        targets.status.success(),
        "{}",
        String::from_utf8_lossy(&targets.stderr)
    );
    // The flood's batches reach the collector within a few batch intervals.
    let mut text = String::new();
    wait_for(
        "the collector to store samples",
        Duration::from_secs(30),
        || {
            let (status, body) = get(collector_http, "/metrics");
            assert_eq!(status, 200);
            text = body;
            sum(
                &samples(&text),
                "stallscope_collector_samples_ingested_total",
                &[],
            ) > 0.0
        },
    );
    let collected = samples(&text);
    assert!(
        sum(
            &collected,
            "stallscope_collector_batches_ingested_total",
            &[]
        ) >= 1.0
    );
    assert!(
        sum(
            &collected,
            "stallscope_collector_queries_total",
            &["method=\"Targets\""]
        ) >= 1.0
    );
    assert!(
        sum(
            &collected,
            "stallscope_collector_storage_up",
            &["backend=\"sqlite\""]
        ) > 0.5,
        "{text}"
    );
    assert!(sum(&collected, "stallscope_collector_agent_streams", &[]) >= 1.0);
    promtool_accepts("collector", &text);

    agent.terminate();
    let exit = agent.wait(Duration::from_secs(60)).expect("agent stops");
    assert!(exit.status.success(), "{}", exit.stderr);
    let _ = workload.finish(Duration::from_secs(10));
    collector.terminate();
    let _ = collector.wait_exit(Duration::from_secs(30));
}
