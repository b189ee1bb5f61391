//! End to end, as root: `record` and `run` are one sampling loop with two sinks, so on
//! the same workload, at the same time, they measure the same totals. `record` writes a
//! file; `run` streams to a real collector, and what the collector serves back must match
//! the file within 5% for every signal, events and time alike.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use stallscope_profile::{Profile, pprof::decode_pprof};
use stallscope_tests::{
    AgentRun, Workload, binary, binary_dir,
    collector::{CollectorProcess, cli, scratch},
    require_root,
    streaming::{start_run, stop_run},
};

/// Signals both agents capture: exact totals (off-CPU, syscalls) and a sampled one
/// (on-CPU at 499 Hz, frequent enough that two samplers agree within 5%).
const SIGNALS: &str = "offcpu,oncpu,syscall";

/// The total of every sample type (`kind/unit`) of a profile that has any.
fn totals(profile: &Profile) -> BTreeMap<String, i64> {
    profile
        .sample_types
        .iter()
        .enumerate()
        .map(|(index, t)| (format!("{}/{}", t.kind, t.unit), profile.total(index)))
        .filter(|(_, total)| *total > 0)
        .collect()
}

#[test]
fn record_and_run_measure_the_same_totals() {
    if !require_root("record_and_run_measure_the_same_totals") {
        return;
    }
    let bin = binary_dir();
    let dir: PathBuf = scratch("sampling-loop");
    let collector =
        CollectorProcess::start_plaintext(&bin, &dir.join("data")).expect("collector starts");
    let url = collector.plaintext_url();
    let mut workload = Workload::start(
        &binary(&bin, "stallscope-workload").expect("workload built"),
        &["markers", "1500"],
    )
    .expect("workload");
    let pid = workload.pid.to_string();
    let agent_args = ["--pid", &pid, "--signals", SIGNALS, "--frequency", "499"];

    let recorded = dir.join("recorded.pb.gz");
    let recorded_arg = recorded.to_string_lossy().into_owned();
    let mut record_args = vec!["record", "--duration", "10m", "-o", &recorded_arg];
    record_args.extend(agent_args);
    let mut record = AgentRun::start(
        &binary(&bin, "stallscope-agent").expect("agent built"),
        &record_args,
    )
    .expect("record starts");
    record
        .wait_ready(Duration::from_secs(60))
        .expect("record ready");
    let run =
        start_run(&bin, &url, &dir.join("spool"), "loop-agent", &agent_args).expect("run starts");
    // Both are attached before the scenario starts, and both stop after it is done (the
    // workload then waits for its stdin): they see the same events.
    workload.go().expect("go");
    workload
        .wait_done(Duration::from_secs(120))
        .expect("scenario done");
    record.interrupt();
    let record_exit = record.wait(Duration::from_secs(60)).expect("record stops");
    assert!(record_exit.status.success(), "{}", record_exit.stderr);
    let (summary, run_exit) = stop_run(run).expect("run stops");
    assert!(summary.all_acknowledged, "{}", run_exit.stderr);
    workload
        .finish(Duration::from_secs(10))
        .expect("workload exits");

    let from_record =
        totals(&decode_pprof(&std::fs::read(&recorded).expect("recorded")).expect("pprof"));
    let served = dir.join("served.pb.gz");
    let output = cli(
        &bin,
        &url,
        &[
            "flame",
            "--since",
            "15m",
            "--pid",
            &pid,
            "-o",
            &served.to_string_lossy(),
        ],
    )
    .expect("flame runs");
    assert!(
        output.status.success(),
        "flame: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let from_collector =
        totals(&decode_pprof(&std::fs::read(&served).expect("served")).expect("pprof"));
    eprintln!(
        "record: {from_record:?}\ncollector: {from_collector:?}\nrun summary: {:?}",
        summary.totals
    );

    // Every signal asked for has data, in both.
    for kind in [
        "off_cpu/nanoseconds",
        "on_cpu/nanoseconds",
        "syscall/nanoseconds",
    ] {
        assert!(
            from_record.contains_key(kind),
            "record has no {kind}: {from_record:?}"
        );
    }
    assert_eq!(
        from_record.keys().collect::<Vec<_>>(),
        from_collector.keys().collect::<Vec<_>>(),
        "record and run measured different sample types"
    );
    for (kind, &recorded) in &from_record {
        let streamed = from_collector[kind];
        let difference = (streamed - recorded).abs() as f64 / recorded as f64;
        assert!(
            difference <= 0.05,
            "{kind}: record {recorded}, run (through the collector) {streamed}: {:.1}% apart",
            difference * 100.0
        );
    }
    // The collector stored exactly what run spooled.
    for (kind, &streamed) in &from_collector {
        assert_eq!(
            summary.totals.get(kind).copied(),
            Some(streamed),
            "{kind}: run spooled {:?}, the collector serves {streamed}",
            summary.totals.get(kind)
        );
    }
}
