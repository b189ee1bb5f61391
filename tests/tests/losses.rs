//! A flood of short-lived threads against tiny maps: the agent keeps running, writes its
//! profile, and the profile says how many events it dropped.

use std::path::PathBuf;

use stallscope_profile::pprof::decode_pprof;
use stallscope_tests::{binary_dir, record_workload, require_root};

fn flood(test: &str, hook: &str) -> (u64, String) {
    let dir = std::env::temp_dir().join(format!("stallscope-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let out: PathBuf = dir.join("flood.pb.gz");
    let out_arg = out.to_string_lossy().into_owned();
    let exit = record_workload(
        &binary_dir(),
        &["churn", "3000"],
        &[
            "-o",
            &out_arg,
            "--signals",
            "offcpu,oncpu",
            "--sched-hook",
            hook,
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
    .expect("recording runs");
    assert!(exit.status.success(), "agent failed: {}", exit.stderr);
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    let profile =
        decode_pprof(&std::fs::read(&out).expect("profile written")).expect("valid pprof");
    let dropped: u64 = profile.meta.losses.values().sum();
    (dropped, format!("{:?}", profile.meta.losses))
}

#[test]
fn tiny_maps_report_drops_btf_path() {
    if !require_root("tiny_maps_report_drops_btf_path") {
        return;
    }
    let (dropped, losses) = flood("flood-btf", "auto");
    assert!(dropped > 0, "no drops reported with tiny maps: {losses}");
}

#[test]
fn tiny_maps_report_drops_tracepoint_path() {
    if !require_root("tiny_maps_report_drops_tracepoint_path") {
        return;
    }
    let (dropped, losses) = flood("flood-tp", "tracepoint");
    assert!(dropped > 0, "no drops reported with tiny maps: {losses}");
}
