//! End to end, as root, on the real kernel: the syscall signal's sampled mode (one syscall
//! in N timed, every one counted) against what the workload did and timed itself.

use stallscope_profile::{Histogram, Profile};
use stallscope_tests::{
    histogram_with, label, record_profile, reported, require_root, value_index,
};

/// The workload's process name as the kernel truncates it (15 bytes).
const WORKLOAD: &str = "stallscope-work";
const EVERY: u64 = 16;
const FAST: u64 = 200_000;
const SLOW: u64 = 3_000;

fn histogram<'a>(profile: &'a Profile, syscall: &str) -> &'a Histogram {
    histogram_with(
        profile,
        "syscall",
        &[("syscall", syscall), ("process", WORKLOAD)],
    )
}

/// 200,000 `getppid`s and 3,000 sleeps of 200 us, with one syscall in 16 timed: the counts
/// are exact, the sleeps' time is within 5% of the workload's own timing, and the slow
/// sleeps' stacks stand for all of them.
#[test]
fn sampled_syscalls_count_exactly_and_estimate_time() {
    if !require_root("syscall_sampling") {
        return;
    }
    let every = EVERY.to_string();
    let (profile, exit) = record_profile(
        "syscall-sampling",
        &[
            "syscall-sampling",
            &FAST.to_string(),
            &SLOW.to_string(),
            "200",
        ],
        "syscall-sampling.pb.gz",
        &[
            "--signals",
            "syscall",
            "--syscall-sample-every",
            &every,
            "--syscall-threshold",
            "100us",
        ],
    );
    assert!(
        profile
            .meta
            .notes
            .iter()
            .any(|n| n.contains(&format!("one in {EVERY} timed"))),
        "no note on the sampling: {:?}",
        profile.meta.notes
    );

    // Counts: exact, whatever was timed.
    let getppid = histogram(&profile, "getppid");
    assert_eq!(getppid.count, FAST, "getppid calls counted");
    assert_eq!(getppid.buckets.iter().sum::<u64>(), getppid.count);
    let sleeps = histogram(&profile, "clock_nanosleep");
    assert_eq!(sleeps.count, SLOW, "clock_nanosleep calls counted");
    assert_eq!(sleeps.buckets.iter().sum::<u64>(), sleeps.count);

    // Time: the timed sleeps stand for all of them. The workload times each sleep around
    // the syscall, so its total is the larger by the call overhead.
    let truth = reported(&exit.workload, "nanosleep_ns");
    let measured = sleeps.sum_ns as f64;
    assert!(
        measured <= truth * 1.02 && measured >= truth * 0.95,
        "clock_nanosleep: {measured:.0} ns estimated, the workload slept {truth:.0} ns"
    );
    // Every estimated sleep is at least the requested 200 us: no bucket below 2^17 ns.
    let below: u64 = sleeps.buckets.iter().take(17).sum();
    assert_eq!(below, 0, "sleeps under 131 us: {:?}", sleeps.buckets);

    // Stacks: the timed slow sleeps, each standing for 16, add up to about all of them
    // (about 190 timed: the binomial spread is about 7%).
    let count = value_index(&profile, "syscalls", "count");
    let time = value_index(&profile, "syscall", "nanoseconds");
    let marked: Vec<_> = profile
        .samples
        .iter()
        .filter(|s| label(s, "syscall") == "clock_nanosleep" && label(s, "process") == WORKLOAD)
        // The marker's caller: libc's `syscall()` is a leaf without a frame of its own,
        // so a frame-pointer walk from inside it skips the marker itself.
        .filter(|s| profile.stack_contains(s, "waits::syscall_sampling"))
        .collect();
    let marked_count: i64 = marked.iter().map(|s| s.values[count]).sum();
    let seen: Vec<String> = profile
        .samples
        .iter()
        .filter(|s| label(s, "syscall") == "clock_nanosleep")
        .take(3)
        .map(|s| {
            let frames: Vec<&str> = profile
                .stack_frames(s)
                .map(|f| f.function.as_str())
                .collect();
            format!("{:?} {frames:?} {:?}", s.values, s.labels)
        })
        .collect();
    assert!(
        (SLOW as f64 * 0.7..=SLOW as f64 * 1.3).contains(&(marked_count as f64)),
        "slow sleeps with the marker stack stand for {marked_count}, expected about {SLOW}; samples: {seen:#?}"
    );
    assert!(
        marked.iter().all(|s| s.values[count] % EVERY as i64 == 0),
        "a timed slow sleep stands for {EVERY}"
    );
    // The samples of the syscall add up to its histogram's time, or a little more where
    // the slow stacks' estimates overshoot it (every sleep here is slow).
    let sampled_ns: i64 = profile
        .samples
        .iter()
        .filter(|s| label(s, "syscall") == "clock_nanosleep" && label(s, "process") == WORKLOAD)
        .map(|s| s.values[time])
        .sum();
    let sampled_ns = sampled_ns as f64;
    assert!(
        sampled_ns >= measured * 0.999 && sampled_ns <= measured * 1.35,
        "samples of clock_nanosleep add up to {sampled_ns:.0} ns, its histogram {measured:.0} ns"
    );
}
