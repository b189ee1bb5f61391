//! End to end, as root: the bundled workload profiled by `stallscope-agent record` and,
//! at the same time, by `stallscope-agent run` streaming to a collector. What
//! `stallscope flame` and `stallscope top` show must match what `record` measured
//! (+-5%), and every output format must be readable. Both agents sample on-CPU at 499 Hz
//! over 2.5 s of spinning: at the default 49 Hz a busy 2-core machine leaves so few
//! samples that two independent samplers differ by more than 5% by chance.

use std::{path::PathBuf, time::Duration};

use stallscope_profile::{Profile, folded::parse_folded, pprof::decode_pprof};
use stallscope_tests::{
    AgentRun, Workload, binary, binary_dir,
    collector::{CollectorProcess, cli, cli_json, scratch},
    require_root,
    streaming::{start_run, stop_run},
};

fn within(measured: f64, reference: f64, tolerance: f64) -> bool {
    (measured - reference).abs() <= reference.abs() * tolerance
}

fn column(profile: &Profile, kind: &str) -> usize {
    profile
        .sample_types
        .iter()
        .position(|t| t.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} in {:?}", profile.sample_types))
}

#[test]
fn streamed_profiles_match_a_local_recording() {
    if !require_root("streamed_profiles_match_a_local_recording") {
        return;
    }
    let bin = binary_dir();
    let dir: PathBuf = scratch("stream-e2e");
    let collector =
        CollectorProcess::start_plaintext(&bin, &dir.join("data")).expect("collector starts");
    let url = collector.plaintext_url();

    let mut workload = Workload::start(
        &binary(&bin, "stallscope-workload").expect("workload built"),
        &["markers", "1500"],
    )
    .expect("workload");
    let pid = workload.pid.to_string();
    let recorded = dir.join("recorded.pb.gz");
    let recorded_arg = recorded.to_string_lossy().into_owned();
    let mut record = AgentRun::start(
        &binary(&bin, "stallscope-agent").expect("agent built"),
        &[
            "record",
            "--pid",
            &pid,
            "--duration",
            "10m",
            "-o",
            &recorded_arg,
            "--signals",
            "offcpu,oncpu",
            "--frequency",
            "499",
        ],
    )
    .expect("record starts");
    record
        .wait_ready(Duration::from_secs(60))
        .expect("record ready");
    let run = start_run(
        &bin,
        &url,
        &dir.join("spool"),
        "e2e-agent",
        &[
            "--pid",
            &pid,
            "--signals",
            "offcpu,oncpu",
            "--frequency",
            "499",
        ],
    )
    .expect("run starts");
    workload.go().expect("go");
    workload
        .wait_done(Duration::from_secs(120))
        .expect("scenario done");
    record.interrupt();
    let (summary, _) = stop_run(run).expect("run stops");
    let record_exit = record.wait(Duration::from_secs(60)).expect("record stops");
    assert!(record_exit.status.success(), "{}", record_exit.stderr);
    assert!(summary.all_acknowledged, "{summary:?}");
    workload
        .finish(Duration::from_secs(10))
        .expect("workload exits");

    let reference = decode_pprof(&std::fs::read(&recorded).expect("recorded")).expect("pprof");
    let marker_ref = reference.total_where(column(&reference, "off_cpu"), |s| {
        reference.stack_contains(s, "offcpu_marker_sleep")
    }) as f64;
    let oncpu_ref = reference.total(column(&reference, "on_cpu")) as f64;
    assert!(
        marker_ref > 0.9e9,
        "record saw {marker_ref} ns in the marker"
    );

    // `top`: the marker's total time and the process's on-CPU time.
    let top = cli_json(
        &bin,
        &url,
        &["top", "--since", "15m", "--pid", &pid, "-n", "200"],
    )
    .expect("top");
    let marker = top["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .find(|row| {
            row["function"]
                .as_str()
                .is_some_and(|f| f.ends_with("offcpu_marker_sleep"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no offcpu_marker_sleep among the functions of top: {}",
                top["functions"]
            )
        })["total_ns"]
        .as_f64()
        .expect("number");
    assert!(
        within(marker, marker_ref, 0.05),
        "top: marker {marker} ns vs record {marker_ref} ns"
    );
    let oncpu = top["by_kind"]["on_cpu"].as_f64().expect("on_cpu total");
    assert!(
        within(oncpu, oncpu_ref, 0.05),
        "top: on-CPU {oncpu} ns vs record {oncpu_ref} ns"
    );

    // `flame` in every format.
    for file in ["flame.svg", "flame.pb.gz", "flame.folded", "flame.json"] {
        let path = dir.join(file);
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
                &path.to_string_lossy(),
            ],
        )
        .expect("flame");
        assert!(
            output.status.success(),
            "flame {file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let bytes = std::fs::read(&path).expect("written");
        match file {
            "flame.pb.gz" => {
                let profile = decode_pprof(&bytes).expect("pprof decodes");
                let streamed = profile.total_where(column(&profile, "off_cpu"), |s| {
                    profile.stack_contains(s, "offcpu_marker_sleep")
                }) as f64;
                assert!(
                    within(streamed, marker_ref, 0.05),
                    "pprof: marker {streamed} vs {marker_ref}"
                );
                assert!(within(
                    profile.total(column(&profile, "on_cpu")) as f64,
                    oncpu_ref,
                    0.05
                ));
            }
            "flame.folded" => {
                let lines = parse_folded(bytes.as_slice()).expect("folded parses");
                let streamed: u64 = lines
                    .iter()
                    .filter(|(f, _)| f.iter().any(|n| n.ends_with("offcpu_marker_sleep")))
                    .map(|(_, v)| v)
                    .sum();
                assert!(
                    within(streamed as f64, marker_ref, 0.05),
                    "folded: {streamed} vs {marker_ref}"
                );
            }
            "flame.svg" => {
                let svg = String::from_utf8_lossy(&bytes);
                assert!(svg.contains("offcpu_marker_sleep") && svg.contains("oncpu_marker_spin"));
            }
            _ => {
                let json: serde_json::Value =
                    serde_json::from_slice(&bytes).expect("speedscope JSON");
                assert_eq!(
                    json["$schema"],
                    "https://www.speedscope.app/file-format-schema.json"
                );
            }
        }
    }

    // `series` adds up to the same totals, `targets` lists the workload under its
    // service (the executable's file name: no systemd unit, no rule).
    let series = cli_json(
        &bin,
        &url,
        &["series", "--since", "15m", "--pid", &pid, "--step", "1s"],
    )
    .expect("series");
    let off_total: i64 = series["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter(|l| l["key"] == "off-cpu")
        .flat_map(|l| l["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["value"].as_i64())
        .sum();
    assert_eq!(
        off_total,
        top["by_kind"]["off_cpu"].as_i64().expect("off_cpu"),
        "series and top disagree"
    );
    let targets = cli_json(&bin, &url, &["targets", "--since", "15m", "--pids"]).expect("targets");
    assert!(
        targets
            .as_array()
            .expect("array")
            .iter()
            .any(|t| t["pid"] == pid.as_str() && t["service"] == "stallscope-workload"),
        "{targets}"
    );
    // The text forms print too (a person reads them).
    let text = cli(
        &bin,
        &url,
        &["top", "--since", "15m", "--pid", &pid, "-n", "100"],
    )
    .expect("top");
    assert!(String::from_utf8_lossy(&text.stdout).contains("offcpu_marker_sleep"));
    let diff = cli(
        &bin,
        &url,
        &[
            "diff",
            "--before",
            "2h..1h",
            "--after",
            "15m..now",
            "--pid",
            &pid,
            "-n",
            "100",
            "-o",
            &dir.join("diff.svg").to_string_lossy(),
        ],
    )
    .expect("diff");
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    assert!(String::from_utf8_lossy(&diff.stdout).contains("offcpu_marker_sleep"));
}
