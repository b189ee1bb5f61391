//! A flood of short-lived threads against tiny maps: the agent keeps running, writes its
//! profile, and the profile accounts for every injected wait: counted exactly, or
//! reported lost under the loss that explains it (a full totals map, a full thread
//! table). Nothing vanishes silently.

use std::{collections::BTreeMap, path::PathBuf};

use stallscope_profile::pprof::decode_pprof;
use stallscope_tests::{binary_dir, record_workload, require_root};

/// Threads the churn scenario starts; each sleeps three times for 200 us, so each waits
/// off CPU at least three times.
const THREADS: u64 = 3000;
const WAITS_PER_THREAD: u64 = 3;

/// The off-CPU signal's counts: waits counted exactly, and its loss counters by name.
struct Accounted {
    counted: u64,
    losses: BTreeMap<String, u64>,
}

impl Accounted {
    fn lost(&self, loss: &str) -> u64 {
        self.losses
            .get(&format!("off-cpu.{loss}"))
            .copied()
            .unwrap_or(0)
    }

    /// Losses that cost a whole wait (the others cost a stack).
    fn lost_waits(&self) -> u64 {
        ["aggregation_map_full", "thread_table_full", "map_busy"]
            .iter()
            .map(|loss| self.lost(loss))
            .sum()
    }
}

fn flood(test: &str, hook: &str) -> Accounted {
    let dir = std::env::temp_dir().join(format!("stallscope-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let out: PathBuf = dir.join("flood.pb.gz");
    let out_arg = out.to_string_lossy().into_owned();
    let threads = THREADS.to_string();
    let exit = record_workload(
        &binary_dir(),
        &["churn", &threads],
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
    let counted = profile
        .meta
        .notes
        .iter()
        .find_map(|n| n.strip_prefix("off-cpu exact total: "))
        .and_then(|rest| rest.split(" over ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no exact off-CPU count in {:?}", profile.meta.notes));
    let accounted = Accounted {
        counted,
        losses: profile.meta.losses.clone(),
    };
    eprintln!(
        "{test}: {THREADS} threads x {WAITS_PER_THREAD} waits injected; {} counted, {} lost ({:?})",
        accounted.counted,
        accounted.lost_waits(),
        accounted.losses
    );
    // Every injected wait is counted or reported lost.
    assert!(
        accounted.counted + accounted.lost_waits() >= THREADS * WAITS_PER_THREAD,
        "{} waits counted and {} reported lost, but {} were injected: some vanished silently ({:?})",
        accounted.counted,
        accounted.lost_waits(),
        THREADS * WAITS_PER_THREAD,
        accounted.losses
    );
    accounted
}

#[test]
fn tiny_maps_report_drops_btf_path() {
    if !require_root("tiny_maps_report_drops_btf_path") {
        return;
    }
    let accounted = flood("flood-btf", "auto");
    // Thread state lives in task storage (not bounded by --max-threads); the 16-entry
    // totals map is what overflows, a wait at a time.
    assert!(
        accounted.lost("aggregation_map_full") > 0,
        "a 16-entry totals map did not overflow with {THREADS} threads: {:?}",
        accounted.losses
    );
    assert_eq!(
        accounted.lost("thread_table_full"),
        0,
        "the BTF path keeps thread state in task storage, not the thread table"
    );
}

#[test]
fn tiny_maps_report_drops_tracepoint_path() {
    if !require_root("tiny_maps_report_drops_tracepoint_path") {
        return;
    }
    let accounted = flood("flood-tp", "tracepoint");
    // The classic path tracks at most 16 threads at once.
    assert!(
        accounted.lost("thread_table_full") > 0,
        "a 16-thread table did not overflow with {THREADS} threads: {:?}",
        accounted.losses
    );
}
