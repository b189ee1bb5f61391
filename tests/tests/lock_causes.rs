//! End to end, as root: the cause of a wait comes from what the kernel saw. Rust's std
//! `Mutex` under contention is lock contention even when no user frame says so (a
//! binary without DWARF, the contended path hidden under libc's frameless `syscall`);
//! threads waiting for a file lock (`flock`, `fcntl`) another process holds are lock
//! waits, per file, with the holder. And several recordings at once each measure their
//! own workload: no thread waits longer than it was measured, totals match the truth.

use std::{path::PathBuf, process::Command, thread, time::Duration};

use stallscope_profile::{Profile, Sample};
use stallscope_tests::{
    AgentRun, Workload, binary, binary_dir, label, record_started, reported, require_root,
    scratch_dir, serial, value_index,
};

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

/// The bundled workload without its DWARF (as a release build of a service ships): only
/// the symbol table names functions, so no inlined `Mutex::lock` frame tells a lock.
fn workload_without_dwarf(test: &str) -> PathBuf {
    let copy = scratch_dir(test).join("stallscope-workload");
    std::fs::copy(
        binary(&binary_dir(), "stallscope-workload").expect("workload built"),
        &copy,
    )
    .expect("copy the workload");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&copy)
        .status()
        .expect("objcopy runs (cargo xtask test installs binutils)");
    assert!(status.success(), "objcopy --strip-debug failed");
    copy
}

fn contended(s: &Sample) -> bool {
    label(s, "thread").starts_with("contender")
}

#[test]
fn rust_mutex_contention_is_lock_without_any_user_frame_saying_so() {
    if !require_root("rust_mutex_contention_is_lock_without_any_user_frame_saying_so") {
        return;
    }
    let _serial = serial();
    let exe = workload_without_dwarf("mutex-no-dwarf");
    // The default signals (off-CPU and on-CPU): the cause label alone must say lock.
    let workload = Workload::start(&exe, &["mutex", "4", "5", "10"]).expect("workload");
    let (profile, exit) = record_started("mutex-default", workload, "mutex.pb.gz", &[]);
    let expected = reported(&exit.workload, "mutex_wait_ns");
    let off = value_index(&profile, "off_cpu", "nanoseconds");
    let as_lock = profile.total_where(off, |s| contended(s) && label(s, "cause") == "lock") as f64;
    eprintln!(
        "std Mutex, no DWARF, default signals: cause=lock {:.3} s, workload {:.3} s",
        as_lock / 1e9,
        expected / 1e9
    );
    assert!(
        within(as_lock, expected, 0.15),
        "contenders' off-CPU time with cause=lock: {:.3} s, the workload waited {:.3} s for the lock",
        as_lock / 1e9,
        expected / 1e9
    );

    // With the lock signal: its contention time is the workload's.
    let workload = Workload::start(&exe, &["mutex", "4", "5", "10"]).expect("workload");
    let (profile, exit) = record_started(
        "mutex-lock",
        workload,
        "mutex-lock.pb.gz",
        &["--signals", "lock,offcpu"],
    );
    let expected = reported(&exit.workload, "mutex_wait_ns");
    let lock = value_index(&profile, "lock_wait", "nanoseconds");
    let contention = profile.total_where(lock, |s| {
        contended(s) && label(s, "signal") == "lock" && label(s, "lock_wait") == "contention"
    }) as f64;
    eprintln!(
        "std Mutex, no DWARF, lock signal: contention {:.3} s, workload {:.3} s",
        contention / 1e9,
        expected / 1e9
    );
    assert!(
        within(contention, expected, 0.10),
        "lock contention {:.3} s, the workload waited {:.3} s",
        contention / 1e9,
        expected / 1e9
    );
    // The condition-variable waiter's wait, the whole run long (200 ms), is no lock. (Its
    // thread can wait microseconds on a real futex lock besides: 11 us once in a full
    // suite run, where the threads start and exit together.)
    let idle = profile.total_where(off, |s| label(s, "thread") == "idle-waiter");
    let idle_as_lock = profile.total_where(off, |s| {
        label(s, "thread") == "idle-waiter" && label(s, "cause") == "lock"
    });
    assert!(
        idle > 100_000_000 && idle_as_lock < 1_000_000,
        "the idle condvar waiter counted as lock: {idle_as_lock} ns of its {idle} ns off CPU; \
         off-CPU by thread and cause: {:?}; agent: {}",
        off_cpu_by_thread(&profile, off),
        exit.stderr
    );
}

/// Off-CPU nanoseconds per (thread, cause): where time went when a check fails.
fn off_cpu_by_thread(profile: &Profile, off: usize) -> Vec<(String, String, i64)> {
    let mut by = std::collections::BTreeMap::<(String, String), i64>::new();
    for s in &profile.samples {
        *by.entry((label(s, "thread").into(), label(s, "cause").into()))
            .or_default() += s.values[off];
    }
    by.into_iter().map(|((t, c), ns)| (t, c, ns)).collect()
}

/// Records `file-lock MODE 4 40 10` and checks the lock signal and the off-CPU cause.
fn file_lock_waits(mode: &str, kind: &str) {
    let _serial = serial();
    let dir = scratch_dir(&format!("file-lock-{mode}"));
    let workload = Workload::start(
        &binary(&binary_dir(), "stallscope-workload").expect("workload built"),
        &["file-lock", mode, "4", "40", "10", &dir.to_string_lossy()],
    )
    .expect("workload");
    let (profile, exit) = record_started(
        &format!("file-lock-{mode}"),
        workload,
        "file-lock.pb.gz",
        &["--signals", "lock,offcpu"],
    );
    let expected = reported(&exit.workload, "file_lock_wait_ns");
    let holder = reported(&exit.workload, "holder_pid") as u32;
    let inode = reported(&exit.workload, "inode") as u64;
    let waiter = |s: &Sample| label(s, "thread").starts_with("file-waiter");
    let lock = value_index(&profile, "lock_wait", "nanoseconds");
    let file_waits: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|s| waiter(s) && label(s, "signal") == "lock" && label(s, "lock_kind") == kind)
        .collect();
    let measured: f64 = file_waits.iter().map(|s| s.values[lock] as f64).sum();
    eprintln!(
        "{mode}: lock signal {:.3} s of {kind}, workload {:.3} s, holder {holder}, inode {inode}",
        measured / 1e9,
        expected / 1e9
    );
    assert!(
        within(measured, expected, 0.10),
        "{mode}: lock signal {:.3} s of {kind} waits, the workload waited {:.3} s",
        measured / 1e9,
        expected / 1e9
    );
    let with_stacks: Vec<&&Sample> = file_waits.iter().filter(|s| !s.stack.is_empty()).collect();
    assert!(!with_stacks.is_empty(), "no {kind} wait with a stack");
    for sample in &with_stacks {
        if profile.stack_contains(sample, "[short waits") {
            continue;
        }
        let object = label(sample, "lock");
        assert!(
            object.starts_with("file ") && object.ends_with(&format!(" inode {inode}")),
            "{mode}: lock object `{object}`, the file's inode is {inode}"
        );
        assert_eq!(
            label(sample, "lock_holder_pid"),
            holder.to_string(),
            "{mode}: the holder is the other process"
        );
    }
    let off = value_index(&profile, "off_cpu", "nanoseconds");
    let as_lock = profile.total_where(off, |s| waiter(s) && label(s, "cause") == "lock") as f64;
    eprintln!("{mode}: off-CPU cause=lock {:.3} s", as_lock / 1e9);
    assert!(
        within(as_lock, expected, 0.15),
        "{mode}: off-CPU cause=lock {:.3} s, the workload waited {:.3} s",
        as_lock / 1e9,
        expected / 1e9
    );
}

#[test]
fn flock_waits_are_lock_waits_per_file_with_their_holder() {
    if !require_root("flock_waits_are_lock_waits_per_file_with_their_holder") {
        return;
    }
    file_lock_waits("flock", "file-flock");
}

#[test]
fn fcntl_record_lock_waits_are_lock_waits_per_file_with_their_holder() {
    if !require_root("fcntl_record_lock_waits_are_lock_waits_per_file_with_their_holder") {
        return;
    }
    file_lock_waits("fcntl", "file-posix");
}

/// Lock wait per thread of a profile.
fn lock_per_thread(profile: &Profile) -> std::collections::BTreeMap<String, i64> {
    let lock = value_index(profile, "lock_wait", "nanoseconds");
    let mut per_thread = std::collections::BTreeMap::new();
    for sample in profile
        .samples
        .iter()
        .filter(|s| label(s, "signal") == "lock")
    {
        let tid = label(sample, "tid");
        assert!(!tid.is_empty(), "--thread-ids: every lock sample has a tid");
        *per_thread.entry(tid.to_owned()).or_insert(0) += sample.values[lock];
    }
    per_thread
}

/// Agents recording at once in the concurrency test.
const CONCURRENT_AGENTS: usize = 4;

#[test]
fn concurrent_recordings_hold_the_wait_invariant_and_the_truth() {
    if !require_root("concurrent_recordings_hold_the_wait_invariant_and_the_truth") {
        return;
    }
    let _serial = serial();
    let runs: Vec<_> = (0..CONCURRENT_AGENTS)
        .map(|index| {
            thread::spawn(move || {
                let mut workload = Workload::start(
                    &binary(&binary_dir(), "stallscope-workload").expect("workload built"),
                    &["mutex", "4", "8", "10"],
                )
                .expect("workload");
                let out = scratch_dir(&format!("concurrent-{index}")).join("lock.pb.gz");
                let pid = workload.pid.to_string();
                let out_arg = out.to_string_lossy().into_owned();
                let mut agent = AgentRun::start(
                    &binary(&binary_dir(), "stallscope-agent").expect("agent built"),
                    &[
                        "record",
                        "--pid",
                        &pid,
                        "--duration",
                        "10m",
                        "--signals",
                        "lock",
                        // The invariant is per thread: each thread's own series.
                        "--thread-ids",
                        "-o",
                        &out_arg,
                    ],
                )
                .expect("agent starts");
                agent
                    .wait_ready(Duration::from_secs(120))
                    .expect("agent ready");
                workload.go().expect("go");
                workload
                    .wait_done(Duration::from_secs(120))
                    .expect("scenario done");
                agent.interrupt();
                let exit = agent.wait(Duration::from_secs(120)).expect("agent stops");
                assert!(exit.status.success(), "agent failed: {}", exit.stderr);
                let expected = reported(&workload.results(), "mutex_wait_ns");
                let profile = stallscope_profile::pprof::decode_pprof(
                    &std::fs::read(&out).expect("profile written"),
                )
                .expect("pprof");
                (profile, expected, exit.stderr)
            })
        })
        .collect();
    for (index, run) in runs.into_iter().enumerate() {
        let (profile, expected, stderr) = run.join().expect("recording thread");
        let broken = profile
            .meta
            .losses
            .get("lock.thread_wait_exceeds_window")
            .copied()
            .unwrap_or_else(|| panic!("agent {index}: no invariant count in the losses"));
        assert_eq!(broken, 0, "agent {index}: {stderr}");
        let duration = profile.meta.duration_ns;
        for (tid, ns) in lock_per_thread(&profile) {
            assert!(
                ns <= duration,
                "agent {index}: thread {tid} waited {:.3} s in a {:.3} s profile",
                ns as f64 / 1e9,
                duration as f64 / 1e9
            );
        }
        let lock = value_index(&profile, "lock_wait", "nanoseconds");
        let contention = profile.total_where(lock, |s| {
            contended(s) && label(s, "signal") == "lock" && label(s, "lock_wait") == "contention"
        }) as f64;
        eprintln!(
            "agent {index}: contention {:.3} s, workload {:.3} s, {} threads, profile {:.3} s",
            contention / 1e9,
            expected / 1e9,
            lock_per_thread(&profile).len(),
            duration as f64 / 1e9
        );
        assert!(
            within(contention, expected, 0.10),
            "agent {index}: lock contention {:.3} s, its workload waited {:.3} s",
            contention / 1e9,
            expected / 1e9
        );
    }
}
