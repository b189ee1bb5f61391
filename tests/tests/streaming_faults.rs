//! Faults between agent and collector, as root with real probes (profiling a steady
//! workload, 1 s batches): a 60 s collector outage, an agent killed with SIGKILL and restarted, a
//! collector killed between storing and acknowledging (SQLite and ClickHouse), a
//! collector stopped with SIGTERM while the agent streams, and a full spool. Totals must
//! match exactly and nothing may be stored twice. And an agent killed (SIGKILL) in the middle of
//! a burst of waits and started again: the burst arrives whole.

use std::{
    collections::BTreeMap,
    path::Path,
    thread::sleep,
    time::{Duration, Instant},
};

use stallscope_profile::pprof::decode_pprof;
use stallscope_tests::{
    Workload, binary, binary_dir,
    collector::{
        CollectorProcess, TEST_TOKEN, cli, cli_json, clickhouse_url, free_port, require_clickhouse,
        scratch,
    },
    reported, require_root,
    streaming::{spool_contents, spool_waits_in, start_run, stop_run, wait_for_spool},
};

/// Every `kind/unit` total the collector holds (all agents, the last hour).
fn collector_totals(url: &str, dir: &Path) -> BTreeMap<String, i64> {
    let path = dir.join("totals.pb.gz");
    let output = cli(
        &binary_dir(),
        url,
        &["flame", "--since", "1h", "-o", &path.to_string_lossy()],
    )
    .expect("flame");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let profile = decode_pprof(&std::fs::read(&path).expect("written")).expect("pprof");
    profile
        .sample_types
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("{}/{}", t.kind, t.unit), profile.total(i)))
        .filter(|(_, total)| *total != 0)
        .collect()
}

fn nonzero(totals: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    totals
        .iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn agent_info(url: &str) -> serde_json::Value {
    let agents = cli_json(&binary_dir(), url, &["agents"]).expect("agents");
    let agents = agents.as_array().expect("array").clone();
    assert_eq!(agents.len(), 1, "{agents:?}");
    agents[0].clone()
}

/// The workload the agents profile (`--pid`): steady sleeps and spins, so every batch
/// has data, and the agent symbolizes one small process instead of the whole host.
fn pulse() -> (Workload, String) {
    let mut workload = Workload::start(
        &binary(&binary_dir(), "stallscope-workload").expect("workload built"),
        &["pulse"],
    )
    .expect("workload");
    workload.go().expect("go");
    let pid = workload.pid.to_string();
    (workload, pid)
}

fn sqlite_args(dir: &Path) -> Vec<String> {
    vec![
        "--plaintext".into(),
        "--query-tokens".into(),
        TEST_TOKEN.into(),
        "--data-dir".into(),
        dir.join("data").to_string_lossy().into_owned(),
    ]
}

fn start(port: u16, args: &[String], env: &[(&str, &str)]) -> CollectorProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    CollectorProcess::start(&binary_dir(), port, &args, env).expect("collector starts")
}

#[test]
fn collector_outage_of_60s_loses_and_duplicates_nothing() {
    if !require_root("collector_outage_of_60s_loses_and_duplicates_nothing") {
        return;
    }
    let dir = scratch("fault-outage");
    let args = sqlite_args(&dir);
    let mut collector = start(free_port().expect("port"), &args, &[]);
    let url = collector.plaintext_url();
    let (_workload, pid) = pulse();
    let agent = start_run(
        &binary_dir(),
        &url,
        &dir.join("spool"),
        "outage-agent",
        &["--pid", &pid],
    )
    .expect("agent runs");
    sleep(Duration::from_secs(4));
    collector.kill();
    sleep(Duration::from_secs(60));
    collector.restart(&[]).expect("collector comes back");
    sleep(Duration::from_secs(6));
    let (summary, exit) = stop_run(agent).expect("agent stops");
    assert!(summary.all_acknowledged, "{}", exit.stderr);
    assert!(summary.batches >= 60, "{summary:?}");
    let info = agent_info(&url);
    assert_eq!(info["batches"].as_u64(), Some(summary.batches), "{info}");
    assert_eq!(info["first_sequence"].as_u64(), Some(0));
    assert_eq!(info["last_sequence"].as_u64(), summary.last_sequence);
    assert_eq!(collector_totals(&url, &dir), nonzero(&summary.totals));
}

/// Waits until the collector has stored at least `batches` batches of its one agent.
fn wait_for_batches(url: &str, batches: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let stored = cli_json(&binary_dir(), url, &["agents"])
            .ok()
            .and_then(|agents| agents.get(0).and_then(|a| a["batches"].as_u64()))
            .unwrap_or(0);
        if stored >= batches {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the collector stored {stored} batches, waiting for {batches}"
        );
        sleep(Duration::from_millis(200));
    }
}

#[test]
fn collector_stopped_with_sigterm_while_an_agent_streams_exits_in_time_and_loses_nothing() {
    if !require_root(
        "collector_stopped_with_sigterm_while_an_agent_streams_exits_in_time_and_loses_nothing",
    ) {
        return;
    }
    let dir = scratch("fault-sigterm");
    // The default shutdown deadline (10 s).
    let mut collector = start(free_port().expect("port"), &sqlite_args(&dir), &[]);
    let url = collector.plaintext_url();
    let (_workload, pid) = pulse();
    let agent = start_run(
        &binary_dir(),
        &url,
        &dir.join("spool"),
        "sigterm-agent",
        &["--pid", &pid],
    )
    .expect("agent runs");
    wait_for_batches(&url, 3);
    let signalled = Instant::now();
    collector.terminate();
    let status = collector
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|err| panic!("{err:#}; log: {}", collector.log()));
    let took = signalled.elapsed();
    eprintln!("the collector stopped {took:?} after SIGTERM");
    assert!(status.success(), "{status}: {}", collector.log());
    assert!(
        took < Duration::from_secs(10 + 3),
        "the collector took {took:?} to stop (deadline 10s): {}",
        collector.log()
    );
    assert!(
        !collector.log().contains('\u{1b}'),
        "colour codes in the collector's piped log"
    );
    // The agent keeps profiling into its spool; a new collector gets the rest.
    sleep(Duration::from_secs(3));
    collector.restart(&[]).expect("collector comes back");
    sleep(Duration::from_secs(5));
    let (summary, exit) = stop_run(agent).expect("agent stops");
    assert!(summary.all_acknowledged, "{}", exit.stderr);
    assert!(
        !exit.stderr.contains('\u{1b}'),
        "colour codes in the agent's piped log: {}",
        exit.stderr
    );
    let info = agent_info(&url);
    assert_eq!(info["batches"].as_u64(), Some(summary.batches), "{info}");
    assert_eq!(info["first_sequence"].as_u64(), Some(0));
    assert_eq!(info["last_sequence"].as_u64(), summary.last_sequence);
    assert_eq!(collector_totals(&url, &dir), nonzero(&summary.totals));
}

#[test]
fn agent_killed_and_restarted_resends_unacknowledged_batches_once() {
    if !require_root("agent_killed_and_restarted_resends_unacknowledged_batches_once") {
        return;
    }
    let dir = scratch("fault-agent-kill");
    let spool = dir.join("spool");
    let port = free_port().expect("port");
    let url = format!("http://127.0.0.1:{port}");
    // The collector is not up yet: every batch stays in the spool.
    let (_workload, pid) = pulse();
    let first = start_run(
        &binary_dir(),
        &url,
        &spool,
        "killed-agent",
        &["--pid", &pid],
    )
    .expect("agent runs");
    wait_for_spool(&spool, Duration::from_secs(90), |files, _| files >= 3)
        .expect("batches spooled");
    let pins = first.kill();
    let (spooled, spooled_totals) = spool_contents(&spool).expect("spool readable");
    assert!(spooled.len() >= 3, "{spooled:?}");
    assert_eq!(spooled[0], 0, "{spooled:?}");
    let args = sqlite_args(&dir);
    let _collector = start(port, &args, &[]);
    let second = start_run(
        &binary_dir(),
        &url,
        &spool,
        "killed-agent",
        &["--pid", &pid],
    )
    .expect("agent restarts");
    sleep(Duration::from_secs(4));
    let (summary, exit) = stop_run(second).expect("agent stops");
    assert!(summary.all_acknowledged, "{}", exit.stderr);
    assert_eq!(
        summary.first_sequence,
        spooled.last().expect("spooled") + 1,
        "sequences continue after a restart"
    );
    let last = summary.last_sequence.expect("batches sent");
    let info = agent_info(&url);
    assert_eq!(
        info["batches"].as_u64(),
        Some(spooled.len() as u64 + summary.batches),
        "{info}"
    );
    assert_eq!(info["last_sequence"].as_u64(), Some(last));
    let mut expected = spooled_totals;
    for (kind, total) in &summary.totals {
        *expected.entry(kind.clone()).or_default() += total;
    }
    assert_eq!(collector_totals(&url, &dir), nonzero(&expected));
    assert_pins_removed(pins);
}

/// The killed agent's probes were adopted and, with the second agent's clean stop,
/// detached and unpinned: nothing is left running.
fn assert_pins_removed(pins: Option<std::path::PathBuf>) {
    let pins = pins.expect("the killed agent logged where it pinned its probes");
    assert!(
        !pins.exists(),
        "{} is still there after the adopting agent stopped cleanly",
        pins.display()
    );
}

/// A kill test's spool directory, a collector URL nothing listens on (every batch stays
/// in the spool) and the bundled workload running `scenario`, waiting for its line.
fn kill_test_setup(name: &str, scenario: &[&str]) -> (std::path::PathBuf, String, Workload) {
    let spool = scratch(name).join("spool");
    let url = format!("http://127.0.0.1:{}", free_port().expect("port"));
    let workload = Workload::start(
        &binary(&binary_dir(), "stallscope-workload").expect("workload built"),
        scenario,
    )
    .expect("workload");
    (spool, url, workload)
}

/// An agent killed (SIGKILL) in the middle of a one-second burst of waits (20 x 50 ms), with
/// 10 s batches: part of the burst drained into its journal, part still in the maps, the
/// rest still to come. A new agent with the same spool adopts the pinned maps (the old
/// programs count until the hand-over) and spools the journal: the burst arrives whole.
/// No collector runs, so every batch stays in the spool, where it is counted.
#[test]
fn agent_killed_mid_burst_and_restarted_loses_no_wait() {
    if !require_root("agent_killed_mid_burst_and_restarted_loses_no_wait") {
        return;
    }
    let (spool, url, mut workload) = kill_test_setup("fault-agent-kill-burst", &["markers"]);
    let pid = workload.pid.to_string();
    let args = [
        "--pid",
        &pid,
        "--signals",
        "offcpu",
        "--batch-interval",
        "10s",
        "--drain-interval",
        "300ms",
    ];
    let first = start_run(&binary_dir(), &url, &spool, "burst-agent", &args).expect("agent runs");
    workload.go().expect("go");
    // Two drains into the journal, then the kill, 600 ms into the burst.
    sleep(Duration::from_millis(600));
    let pins = first.kill();
    let second = start_run(&binary_dir(), &url, &spool, "burst-agent", &args).expect("restarts");
    let adopted = second.log_text();
    workload
        .wait_done(Duration::from_secs(30))
        .expect("burst done");
    sleep(Duration::from_secs(1));
    let (_summary, exit) = stop_run(second).expect("agent stops");
    let slept_ns = reported(&workload.results(), "slept_ns");
    let found = spool_waits_in(&spool, "off-cpu", "offcpu_marker_sleep").expect("spool readable");
    let (ns, notes) = (found.ns, &found.notes);
    // The sleeps themselves; a busy CPU adds preemptions on the way (state `runnable`),
    // whose time the sleeper's clock counts too.
    let sleeps = found
        .count_by_state
        .get("interruptible")
        .copied()
        .unwrap_or_default();
    eprintln!(
        "burst: {sleeps} sleeps ({:?} waits by state), {:.3} s counted against {:.3} s slept\nnotes: {notes:#?}",
        found.count_by_state,
        ns as f64 / 1e9,
        slept_ns / 1e9
    );
    assert_pins_removed(pins);
    assert!(
        adopted.contains("adopted from an earlier agent"),
        "the second agent did not adopt the pinned probes: {adopted}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("recovered from the drain journal")),
        "no batch was recovered from the journal: {notes:?}\n{}",
        exit.stderr
    );
    assert_eq!(
        sleeps, 20,
        "sleeps of the burst counted; samples through the marker (ns, waits, stack): {:#?}\nother off-CPU samples of 10 ms or more: {:#?}\nlosses: {:?}\n{}",
        found.through, found.others, found.losses, exit.stderr
    );
    let error = (ns as f64 - slept_ns).abs() / slept_ns;
    assert!(
        error <= 0.02,
        "the burst's wait time is off by {:.1}%: {ns} ns counted, {slept_ns} ns slept\n{}",
        error * 100.0,
        exit.stderr
    );
}

/// Losses the killed agent's programs count after its last drain reach the spool: an
/// agent with tiny aggregation maps is killed (after a few drains into its journal), a
/// churn of 2000 short-lived threads then overflows the maps its programs still count
/// into, and the adopting agent reads the dead agent's pinned loss counters. Before,
/// those losses went with the dead agent and nothing said the profile was short.
#[test]
fn losses_counted_after_an_agent_was_killed_are_reported() {
    if !require_root("losses_counted_after_an_agent_was_killed_are_reported") {
        return;
    }
    let (spool, url, mut workload) = kill_test_setup("fault-agent-kill-losses", &["churn", "2000"]);
    let pid = workload.pid.to_string();
    let args = [
        "--pid",
        &pid,
        "--signals",
        "offcpu",
        "--batch-interval",
        "60s",
        "--drain-interval",
        "300ms",
        "--max-totals",
        "16",
        "--max-samples",
        "16",
    ];
    let first = start_run(&binary_dir(), &url, &spool, "loss-agent", &args).expect("agent runs");
    // A few drains into the journal; the workload waits for its line meanwhile.
    sleep(Duration::from_secs(1));
    let pins = first.kill();
    workload.go().expect("go");
    workload
        .wait_done(Duration::from_secs(60))
        .expect("churn done");
    let second = start_run(&binary_dir(), &url, &spool, "loss-agent", &args).expect("restarts");
    sleep(Duration::from_secs(2));
    let (_summary, exit) = stop_run(second).expect("agent stops");
    let found = spool_waits_in(&spool, "off-cpu", "churn").expect("spool readable");
    let full: u64 = found
        .losses
        .iter()
        .filter(|(reason, _)| reason.ends_with("aggregation_map_full"))
        .map(|(_, count)| count)
        .sum();
    eprintln!("losses in the spool: {:?}", found.losses);
    assert_pins_removed(pins);
    assert!(
        full > 0,
        "the killed agent's programs overflowed its maps, but no batch reports it: {:?}\n{}",
        found.losses,
        exit.stderr
    );
}

/// The collector dies at a fault point of the third batch, comes back, the agent
/// resends: totals equal the agent's, batch count equals the agent's.
fn killed_collector(dir: &Path, args: &[String], fault: (&str, &str)) {
    let mut collector = start(free_port().expect("port"), args, &[fault]);
    let url = collector.plaintext_url();
    let (_workload, pid) = pulse();
    let agent = start_run(
        &binary_dir(),
        &url,
        &dir.join("spool"),
        "fault-agent",
        &["--pid", &pid],
    )
    .expect("agent runs");
    let status = collector
        .wait_exit(Duration::from_secs(60))
        .expect("fault injection fires");
    assert_eq!(status.code(), Some(86), "{}", collector.log());
    collector.restart(&[]).expect("collector comes back");
    sleep(Duration::from_secs(4));
    let (summary, exit) = stop_run(agent).expect("agent stops");
    assert!(summary.all_acknowledged, "{}", exit.stderr);
    let info = agent_info(&url);
    assert_eq!(info["batches"].as_u64(), Some(summary.batches), "{info}");
    assert_eq!(collector_totals(&url, dir), nonzero(&summary.totals));
}

#[test]
fn collector_killed_between_store_and_ack_stores_once_sqlite() {
    if !require_root("collector_killed_between_store_and_ack_stores_once_sqlite") {
        return;
    }
    let dir = scratch("fault-ack-sqlite");
    killed_collector(
        &dir,
        &sqlite_args(&dir),
        ("STALLSCOPE_FAULT_EXIT_AFTER_STORE", "3"),
    );
}

#[test]
fn collector_killed_between_store_and_ack_stores_once_clickhouse() {
    if !require_root("collector_killed_between_store_and_ack_stores_once_clickhouse")
        || !require_clickhouse("collector_killed_between_store_and_ack_stores_once_clickhouse")
    {
        return;
    }
    for (name, fault) in [
        ("ack", "STALLSCOPE_FAULT_EXIT_AFTER_STORE"),
        ("marker", "STALLSCOPE_FAULT_EXIT_BEFORE_MARKER"),
    ] {
        let dir = scratch(&format!("fault-{name}-clickhouse"));
        let database = format!("stallscope_fault_{name}_{}", std::process::id());
        let args: Vec<String> = vec![
            "--plaintext".into(),
            "--query-tokens".into(),
            TEST_TOKEN.into(),
            "--storage".into(),
            "clickhouse".into(),
            "--clickhouse-url".into(),
            clickhouse_url(),
            "--clickhouse-database".into(),
            database.clone(),
        ];
        killed_collector(&dir, &args, (fault, "3"));
        let _ = std::process::Command::new("curl")
            .args([
                "-s",
                &clickhouse_url(),
                "--data-binary",
                &format!("DROP DATABASE IF EXISTS {database}"),
            ])
            .output();
    }
}

#[test]
fn full_spool_drops_the_oldest_batches_and_counts_them_exactly() {
    if !require_root("full_spool_drops_the_oldest_batches_and_counts_them_exactly") {
        return;
    }
    let dir = scratch("fault-spool-full");
    let port = free_port().expect("port");
    let url = format!("http://127.0.0.1:{port}");
    let (_workload, pid) = pulse();
    let agent = start_run(
        &binary_dir(),
        &url,
        &dir.join("spool"),
        "full-agent",
        &[
            "--pid",
            &pid,
            "--spool-max-batches",
            "3",
            "--batch-interval",
            "500ms",
            "--drain-interval",
            "250ms",
            "--max-backoff",
            "1s",
        ],
    )
    .expect("agent runs");
    wait_for_spool(&dir.join("spool"), Duration::from_secs(90), |_, dropped| {
        dropped >= 3
    })
    .expect("the spool fills up and drops");
    let args = sqlite_args(&dir);
    let _collector = start(port, &args, &[]);
    sleep(Duration::from_secs(4));
    let (summary, exit) = stop_run(agent).expect("agent stops");
    assert!(summary.all_acknowledged, "{}", exit.stderr);
    let produced = summary.last_sequence.expect("batches") + 1;
    assert_eq!(produced, summary.batches);
    assert!(summary.dropped_total >= 3, "{summary:?}");
    let info = agent_info(&url);
    let stored = info["batches"].as_u64().expect("batches");
    assert_eq!(
        stored + summary.dropped_total,
        produced,
        "{info} {summary:?}"
    );
    assert_eq!(
        info["first_sequence"].as_u64(),
        Some(summary.dropped_total),
        "the oldest were dropped: {info}"
    );
    assert_eq!(
        info["spool_dropped_total"].as_u64(),
        Some(summary.dropped_total),
        "{info}"
    );
}
