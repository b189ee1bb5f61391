//! End to end, as root, on the real kernel: every kind of waiting, injected by the bundled
//! workload and measured by it, compared with what the agent reports.

use std::{path::Path, process::Command, time::Duration};

use stallscope_profile::{FrameKind, Histogram, Profile, Sample};
use stallscope_tests::{
    fuse::FrozenFs, histogram_with, label, record_profile, require_root, scratch_dir, value_index,
};

/// Buckets of the agent's histograms (log2 of nanoseconds, 1 ns to about 9 minutes).
const HISTOGRAM_BUCKETS: usize = 40;

/// The workload's process name as the kernel truncates it (15 bytes).
const WORKLOAD: &str = "stallscope-work";

fn total(profile: &Profile, index: usize, keep: impl Fn(&Sample) -> bool) -> f64 {
    profile.total_where(index, keep) as f64
}

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

/// `floor(log2(ns))`, the agent's histogram bucket.
fn bucket(ns: u64) -> usize {
    ns.max(1).ilog2() as usize
}

fn durations(results: &std::collections::HashMap<String, String>, key: &str) -> Vec<u64> {
    results
        .get(key)
        .unwrap_or_else(|| panic!("workload did not report {key}: {results:?}"))
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Events of `histogram` in buckets `lo..=hi`.
fn events_in(histogram: &Histogram, lo: usize, hi: usize) -> u64 {
    histogram
        .buckets
        .iter()
        .enumerate()
        .filter(|(b, _)| (lo..=hi).contains(b))
        .map(|(_, c)| c)
        .sum()
}

#[test]
fn mutex_contention_is_one_lock_and_an_idle_waiter_is_not_contention() {
    if !require_root("mutex_contention") {
        return;
    }
    let (profile, exit) = record_profile(
        "mutex",
        &["mutex", "4", "5", "10"],
        "mutex.pb.gz",
        &["--signals", "lock,offcpu"],
    );
    let expected: f64 = exit.workload["mutex_wait_ns"].parse().expect("number");
    let lock = value_index(&profile, "lock_wait", "nanoseconds");
    let contended = |s: &Sample| {
        label(s, "signal") == "lock"
            && label(s, "thread").starts_with("contender")
            && label(s, "lock_wait") == "contention"
    };
    let measured = total(&profile, lock, contended);
    assert!(
        within(measured, expected, 0.10),
        "lock contention {measured:.0} ns, the workload measured {expected:.0} ns"
    );
    let addresses: std::collections::BTreeSet<&str> = profile
        .samples
        .iter()
        .filter(|s| contended(s))
        .map(|s| label(s, "lock"))
        .collect();
    assert_eq!(
        addresses.len(),
        1,
        "contention on more than one lock: {addresses:?}"
    );
    assert!(
        profile
            .samples
            .iter()
            .filter(|s| contended(s))
            .all(|s| profile.stack_contains(s, "lock_marker_contend"))
    );

    // The idle condition-variable waiter waited long on its futex, but never for a lock
    // (its start-up may contend kernel locks like the mmap lock: those are real).
    let idle: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|s| {
            label(s, "thread") == "idle-waiter"
                && label(s, "signal") == "lock"
                && label(s, "lock_kind") == "futex"
        })
        .collect();
    assert!(
        !idle.is_empty(),
        "the idle waiter's futex wait was not seen"
    );
    assert!(
        idle.iter().all(|s| label(s, "lock_wait") == "idle"),
        "idle waiter reported as contention: {:?}",
        idle.iter().map(|s| &s.labels).collect::<Vec<_>>()
    );
    let off = value_index(&profile, "off_cpu", "nanoseconds");
    let idle_futex_as_lock = total(&profile, off, |s| {
        label(s, "thread") == "idle-waiter"
            && label(s, "cause") == "lock"
            && label(s, "evidence").starts_with("futex")
    });
    assert!(
        idle_futex_as_lock == 0.0,
        "idle waiter's futex wait counted as lock contention: {idle_futex_as_lock}"
    );
    let contenders_lock = total(&profile, off, |s| {
        label(s, "thread").starts_with("contender") && label(s, "cause") == "lock"
    });
    assert!(
        contenders_lock > 0.5 * expected,
        "off-CPU lock cause {contenders_lock} vs {expected}"
    );

    // Off-CPU causes partition the off-CPU total.
    let exact: f64 = profile
        .meta
        .notes
        .iter()
        .find_map(|n| n.strip_prefix("off-cpu exact total: "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ns| ns.parse().ok())
        .expect("exact off-CPU total in the notes");
    let by_cause: f64 = ["cpu-contention", "lock", "disk", "network", "other"]
        .iter()
        .map(|cause| total(&profile, off, |s| label(s, "cause") == *cause))
        .sum();
    assert!(
        within(by_cause, exact, 0.01),
        "causes add up to {by_cause}, off-CPU total is {exact}"
    );
}

#[test]
fn kernel_lock_contention_has_kernel_stacks_and_a_kind() {
    if !require_root("kernel_lock") {
        return;
    }
    let (profile, _) = record_profile(
        "kernel-lock",
        &["kernel-lock", "8", "1500"],
        "klock.pb.gz",
        &["--signals", "lock"],
    );
    let kernel_locks: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|s| {
            label(s, "process") == WORKLOAD
                && label(s, "signal") == "lock"
                && !label(s, "lock_kind").is_empty()
                && !label(s, "lock_kind").starts_with("futex")
        })
        .collect();
    assert!(!kernel_locks.is_empty(), "no kernel lock contention seen");
    let with_kernel_stack = kernel_locks
        .iter()
        .any(|s| profile.stack_frames(s).any(|f| f.kind == FrameKind::Kernel));
    assert!(with_kernel_stack, "kernel lock waits without kernel stacks");
    let kinds: std::collections::BTreeSet<&str> =
        kernel_locks.iter().map(|s| label(s, "lock_kind")).collect();
    eprintln!("kernel lock kinds seen: {kinds:?}");
    // mmap and munmap take the mmap lock (an rw-semaphore) for writing: eight threads
    // doing nothing else contend on it.
    let lock = value_index(&profile, "lock_wait", "nanoseconds");
    let rwsem_write = total(&profile, lock, |s| {
        label(s, "process") == WORKLOAD && label(s, "lock_kind") == "rwsem-write"
    });
    assert!(
        rwsem_write > 0.0,
        "no rwsem-write waits from mmap/munmap; kinds seen: {kinds:?}"
    );
    // Each kind is what the waiter's kernel stack says it waited in.
    for sample in &kernel_locks {
        let kind = label(sample, "lock_kind");
        let slow_paths: &[&str] = match kind {
            "rwsem-write" => &["down_write"],
            "rwsem-read" => &["down_read"],
            "spin" => &["spin_lock", "read_lock", "write_lock"],
            "mutex" => &["mutex_lock"],
            "rt-mutex" => &["rt_mutex"],
            "percpu-rwsem" => &["percpu_down"],
            other => panic!("unexpected kernel lock kind `{other}`"),
        };
        let kernel: Vec<&str> = profile
            .stack_frames(sample)
            .filter(|f| f.kind == FrameKind::Kernel)
            .map(|f| f.function.as_str())
            .collect();
        if kernel.is_empty() {
            continue;
        }
        assert!(
            kernel
                .iter()
                .any(|f| slow_paths.iter().any(|path| f.contains(path))),
            "a `{kind}` wait whose kernel stack has no {slow_paths:?} frame: {kernel:?}"
        );
    }
}

#[test]
fn syscalls_land_in_the_right_buckets_with_stacks_and_fd_kinds() {
    if !require_root("syscalls") {
        return;
    }
    syscalls_with_signals("syscalls", "syscall");
}

/// The same with the scheduler programs on: the syscall and off-CPU signals share the
/// thread state that a blocked syscall keeps its start in.
#[test]
fn syscalls_with_offcpu_on_land_in_the_right_buckets() {
    if !require_root("syscalls-offcpu") {
        return;
    }
    syscalls_with_signals("syscalls-offcpu", "syscall,offcpu");
}

/// 50 fsyncs and 50 pipe reads that wait 20 ms each: every one in its bucket, the slow
/// ones with the marker stack and the right kind of file.
fn syscalls_with_signals(tag: &str, signals: &str) {
    let dir = scratch_dir(&format!("{tag}-files"));
    let dir_arg = dir.to_string_lossy().into_owned();
    let (profile, exit) = record_profile(
        tag,
        &["syscalls", &dir_arg, "50", "20"],
        &format!("{tag}.pb.gz"),
        &["--signals", signals],
    );
    for (syscall, key, marker) in [
        ("read", "pipe_read_ns", "syscall_marker_pipe_read"),
        ("fsync", "fsync_ns", "syscall_marker_fsync"),
    ] {
        let measured = durations(&exit.workload, key);
        assert_eq!(measured.len(), 50);
        let lo = measured.iter().map(|&d| bucket(d)).min().unwrap_or(0);
        let hi = measured.iter().map(|&d| bucket(d)).max().unwrap_or(0);
        let hist = histogram_with(
            &profile,
            "syscall",
            &[("syscall", syscall), ("process", WORKLOAD)],
        );
        // The agent times the syscall inside the workload's timing: one bucket lower at most.
        let seen = events_in(hist, lo.saturating_sub(1), hi);
        assert_eq!(
            seen,
            50,
            "{syscall}: {seen} events in buckets {}..={hi}, histogram {:?}",
            lo.saturating_sub(1),
            hist.buckets
        );
        let slow: Vec<&Sample> = profile
            .samples
            .iter()
            .filter(|s| label(s, "syscall") == syscall && label(s, "process") == WORKLOAD)
            .filter(|s| !s.stack.is_empty() && profile.stack_contains(s, marker))
            .collect();
        if syscall == "read" {
            let events = value_index(&profile, "syscalls", "count");
            let count: i64 = slow.iter().map(|s| s.values[events]).sum();
            assert_eq!(count, 50, "slow pipe reads with the marker stack");
            assert!(
                slow.iter().all(|s| label(s, "fd") == "pipe"),
                "pipe reads classified as {:?}",
                slow.iter().map(|s| label(s, "fd")).collect::<Vec<_>>()
            );
        } else {
            assert!(slow.iter().all(|s| label(s, "fd") == "file"));
        }
    }
}

#[test]
fn runqueue_wait_of_pinned_threads() {
    if !require_root("runqueue") {
        return;
    }
    let (profile, exit) = record_profile(
        "runqueue",
        &["runqueue", "4", "2000"],
        "runqueue.pb.gz",
        &["--signals", "runqueue"],
    );
    let rq = value_index(&profile, "runqueue", "nanoseconds");
    let pinned = total(&profile, rq, |s| label(s, "thread").starts_with("pinned"));
    let control = total(&profile, rq, |s| label(s, "thread") == "control");
    let kernel = |key: &str| -> f64 {
        exit.workload
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("workload did not report {key}"))
    };
    // The injection: 4 threads on one CPU for 2 s wait 3 x 2 s in all. Other work on the
    // machine can only add to it; the kernel's own accounting (schedstat) is the truth.
    let (kernel_pinned, kernel_control) = (
        kernel("pinned_run_delay_ns"),
        kernel("control_run_delay_ns"),
    );
    assert!(
        kernel_pinned >= 6e9 * 0.85,
        "the injection failed: the kernel saw {:.3} s of run-queue wait, expected >= 6 s",
        kernel_pinned / 1e9
    );
    assert!(
        within(pinned, kernel_pinned, 0.10),
        "4 threads sharing one CPU for 2 s waited {:.3} s; the kernel's schedstat says {:.3} s",
        pinned / 1e9,
        kernel_pinned / 1e9
    );
    if kernel_pinned <= 6e9 * 1.15 {
        // A quiet machine: the injected amount itself.
        assert!(
            within(pinned, 6e9, 0.15),
            "expected 6 s +-15%, measured {:.3} s",
            pinned / 1e9
        );
    }
    assert!(
        control < 0.1e9 + kernel_control * 1.1,
        "the control thread on an idle CPU waited {:.3} s (schedstat: {:.3} s)",
        control / 1e9,
        kernel_control / 1e9
    );
}

/// A loop device over `backing`, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(backing: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// What every write to the slow disk waits (the FUSE file under the loop device answers
/// each write after this long).
const DISK_DELAY: Duration = Duration::from_millis(20);
const DISK_WRITES: u64 = 50;

#[test]
fn disk_latency_is_attributed_to_the_writer() {
    if !require_root("disk") {
        return;
    }
    // A slow disk: a loop device on a file whose filesystem takes DISK_DELAY per write.
    let mount = scratch_dir("disk-fuse");
    let fs = FrozenFs::mount_slow_writes(&mount, "disk.img", 16 << 20, DISK_DELAY)
        .expect("mount the slow filesystem");
    let device = LoopDevice::attach(&mount.join("disk.img"));
    let name = device.0.trim_start_matches("/dev/").to_owned();
    let writes = DISK_WRITES.to_string();
    let (profile, exit) = record_profile(
        "disk",
        &["disk", &device.0, &writes],
        "disk.pb.gz",
        &["--signals", "disk"],
    );
    drop(device);
    drop(fs);
    let ios = value_index(&profile, "disk_ios", "count");
    let ours = |s: &Sample| label(s, "device") == name && label(s, "process") == WORKLOAD;
    let count = profile.total_where(ios, ours);
    assert!(
        count >= DISK_WRITES as i64,
        "only {count} I/Os on {name} attributed to the workload"
    );
    assert!(
        profile
            .samples
            .iter()
            .filter(|s| ours(s))
            .any(|s| profile.stack_contains(s, "disk_marker_write")),
        "no disk sample with the writer's stack"
    );
    // The latency: each write request waited at least the injected delay, and no longer
    // than the write calls that contained them took (the workload timed those).
    let hist = histogram_with(
        &profile,
        "disk",
        &[("device", &name), ("op", "write"), ("process", WORKLOAD)],
    );
    let injected = DISK_WRITES * DISK_DELAY.as_nanos() as u64;
    let calls: u64 = exit.workload["disk_write_ns"].parse().expect("number");
    let slow = events_in(
        hist,
        bucket(DISK_DELAY.as_nanos() as u64),
        HISTOGRAM_BUCKETS - 1,
    );
    assert!(
        slow >= DISK_WRITES,
        "{slow} of {} write requests at or above the injected {DISK_DELAY:?}: {:?}",
        hist.count,
        hist.buckets
    );
    eprintln!(
        "disk: {} write requests, {} ns in all ({} ns injected, write calls {calls} ns); buckets {:?}",
        hist.count, hist.sum_ns, injected, hist.buckets
    );
    assert!(
        hist.sum_ns >= injected && hist.sum_ns <= calls,
        "disk write latency {} ns in all: the injected delay makes it at least {injected} ns, \
         the workload's write calls took {calls} ns",
        hist.sum_ns
    );
}
