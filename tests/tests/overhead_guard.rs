//! End to end, as root, on the real kernel: the overhead guard against a flood of
//! syscalls and context switches (the workload's `flood`). First the guard only measures
//! (a budget nothing reaches); then the budget is set under what it measured: the guard
//! must engage, bring the agent back under the budget while the flood goes on, relax
//! once it is over, and keep the syscall totals close to what the workload counted and
//! timed itself (exact with the guard measuring only; within 10% under its duty cycle).

use stallscope_profile::{Histogram, Profile};
use stallscope_tests::{AgentExit, histogram_with, record_profile, reported, require_root};

/// The workload's process name as the kernel truncates it (15 bytes).
const WORKLOAD: &str = "stallscope-work";

fn histogram<'a>(profile: &'a Profile, syscall: &str) -> &'a Histogram {
    histogram_with(
        profile,
        "syscall",
        &[("syscall", syscall), ("process", WORKLOAD)],
    )
}

/// The number before `%` that follows `after` in `line`.
fn percent_after(line: &str, after: &str) -> Option<f64> {
    let rest = &line[line.find(after)? + after.len()..];
    rest[..rest.find('%')?].trim().parse().ok()
}

/// The guard's measurements (total and probes' share, in percent of the host's CPU), in
/// the order logged, each with whether the guard turned a lever down right after it.
fn measurements(stderr: &str) -> Vec<(f64, f64, bool)> {
    stderr
        .lines()
        .filter(|l| l.contains("overhead guard: agent at "))
        .filter_map(|l| {
            let total = percent_after(l, "agent at ")?;
            let probes = percent_after(l, "own, ")?;
            Some((total, probes, l.contains("over budget:")))
        })
        .collect()
}

/// Records the flood (`busy` then `quiet` seconds) with the syscall and off-CPU signals,
/// drained every second, under `budget` percent.
fn flood(name: &str, busy: u32, quiet: u32, budget: f64) -> (Profile, AgentExit) {
    let (busy, quiet, budget) = (busy.to_string(), quiet.to_string(), budget.to_string());
    record_profile(
        name,
        &["flood", &busy, &quiet],
        &format!("{name}.pb.gz"),
        &[
            "--signals",
            "syscall,offcpu",
            "--drain-interval",
            "1s",
            "--overhead-budget",
            &budget,
        ],
    )
}

/// The syscall totals against the workload's own count and timing: getppid calls and
/// the time of its 100 us sleeps within `tolerance`.
fn check_totals(what: &str, profile: &Profile, exit: &AgentExit, tolerance: f64) {
    let calls = histogram(profile, "getppid").count as f64;
    let sleeps = histogram(profile, "clock_nanosleep");
    eprintln!(
        "{what}: {calls} getppid calls counted, the workload made {:?}; {} sleeps counted for \
         {} ns, the workload slept {:?} for {:?} ns",
        exit.workload.get("getppid_count"),
        sleeps.count,
        sleeps.sum_ns,
        exit.workload.get("nanosleep_count"),
        exit.workload.get("nanosleep_ns")
    );
    let truth = reported(&exit.workload, "getppid_count");
    assert!(
        (calls - truth).abs() <= truth * tolerance,
        "{what}: {calls:.0} getppid calls counted, the workload made {truth:.0}"
    );
    let slept = sleeps.sum_ns as f64;
    let truth = reported(&exit.workload, "nanosleep_ns");
    assert!(
        (slept - truth).abs() <= truth * tolerance,
        "{what}: {slept:.0} ns in clock_nanosleep, the workload slept {truth:.0} ns"
    );
}

#[test]
fn the_guard_holds_a_flood_under_its_budget_and_keeps_the_totals() {
    if !require_root("the_guard_holds_a_flood_under_its_budget_and_keeps_the_totals") {
        return;
    }
    // What the agent costs under the flood, with the guard measuring only: the median
    // of its measurements (most of them cover the flood).
    let (free, free_exit) = flood("guard-measures", 8, 1, 100.0);
    assert!(
        !free_exit.stderr.contains("over budget"),
        "{}",
        free_exit.stderr
    );
    let steady = free_exit
        .stderr
        .lines()
        .find_map(|l| {
            percent_after(l, "overhead guard: highest cost ").and(percent_after(l, "median "))
        })
        .unwrap_or_else(|| panic!("no summary from the guard: {}", free_exit.stderr));
    assert!(
        steady > 1.0,
        "the flood costs the agent {steady:.2}% of the host's CPU: too little to guard; {}",
        free_exit.stderr
    );
    // Every syscall timed: the counts exact, the sleeps' time a little under the
    // workload's (which times the call around the syscall).
    check_totals("guard off", &free, &free_exit, 0.05);

    // A budget the flood exceeds: the guard engages, gets back under while the flood goes
    // on (its probes still busy), and turns back once the flood is over.
    let budget = (steady * 0.6 * 100.0).round() / 100.0;
    let (guarded, exit) = flood("guard-holds", 12, 9, budget);
    for l in exit
        .stderr
        .lines()
        .filter(|l| l.contains("DEBUG") || l.contains("overhead guard"))
    {
        eprintln!("AGENT {l}");
    }
    let seen = measurements(&exit.stderr);
    let first_step = seen
        .iter()
        .position(|&(_, _, stepped)| stepped)
        .unwrap_or_else(|| panic!("the guard never engaged at {budget}%: {}", exit.stderr));
    let held = seen[first_step + 1..]
        .iter()
        .any(|&(total, probes, _)| total <= budget && probes >= budget * 0.25);
    assert!(
        held,
        "never back under {budget}% while the flood went on: {seen:?}; {}",
        exit.stderr
    );
    assert!(
        exit.stderr.contains("well under budget:"),
        "the guard did not turn back after the flood: {}",
        exit.stderr
    );
    assert!(
        guarded
            .meta
            .notes
            .iter()
            .any(|n| n.starts_with("overhead guard:") && n.contains("over budget")),
        "no note of the guard's steps: {:?}",
        guarded.meta.notes
    );
    // Under a duty cycle the totals are estimates from the windows the programs were
    // attached, corrected for the workload running faster while they are not (by the
    // programs' measured cost per syscall): 1-2% short in counts and 3-6% in sleep time
    // here (the sleeps' time is 2% short with the guard off too). Without the correction
    // the counts came out 5-6% short and the sleep time 8-10%.
    check_totals("guard on", &guarded, &exit, 0.10);
}
