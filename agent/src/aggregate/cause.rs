//! Why a thread was off CPU, in the product's cause categories, decided from evidence the
//! probes captured, the kernel's first: the runnable tail of a wait is CPU contention;
//! otherwise what the kernel saw at switch-out (the wait hint: a kernel lock contention,
//! a file lock request it deferred, the futex call's operation and value), then the
//! kernel stack (innermost recognised frame wins); user frames, which may be missing
//! (a frameless libc `syscall`, a binary without frame pointers), only break ties.
//!
//! The futex rule: the kernel sees a lock acquire in `FUTEX_LOCK_PI` and in a wait for a
//! futex word holding 2, the "locked, with waiters" state of the three-state mutex that
//! glibc's locks, Rust's `std` `Mutex` and most futex mutexes use (condition variables,
//! parkers, joins and semaphores wait on other values); `FUTEX_WAIT_REQUEUE_PI` is a
//! condition variable. For other futex waits the user stack decides: lock contention when
//! it shows a lock-acquire path (`pthread_mutex_lock`/`__lll_lock_wait`,
//! `pthread_rwlock_*lock`, Rust `std` `Mutex::lock_contended` / `RwLock::*_contended`,
//! `parking_lot`'s `lock_slow`, the JVM's monitor enter); idle waiting when it shows a
//! condition variable or parking path (`pthread_cond_*wait`, `Condvar::wait`,
//! `thread::park`, `Unsafe_Park`) and no lock-acquire frame. A futex wait with neither is
//! not claimed as contention: it counts as `other`, with the note `futex: no lock
//! evidence`.

use agent_common::{
    OffCpuState, WAIT_HINT_FILE_LOCK, WAIT_HINT_FUTEX, WAIT_HINT_FUTEX_CONDVAR,
    WAIT_HINT_FUTEX_LOCK, WAIT_HINT_KERNEL_LOCK,
};

/// The product's cause categories (mutually exclusive, together exhaustive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// Running on a CPU.
    CpuWork,
    /// Runnable, waiting for a CPU (run queue).
    CpuContention,
    /// Waiting for a kernel or user-space lock.
    Lock,
    /// Waiting for disk or file I/O.
    Disk,
    /// Waiting on the network or a remote peer.
    Network,
    /// Anything else: sleeps, timers, pipes, child processes, idle waits.
    Other,
}

impl Cause {
    pub const ALL: [Self; 6] = [
        Self::CpuWork,
        Self::CpuContention,
        Self::Lock,
        Self::Disk,
        Self::Network,
        Self::Other,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::CpuWork => "cpu-work",
            Self::CpuContention => "cpu-contention",
            Self::Lock => "lock",
            Self::Disk => "disk",
            Self::Network => "network",
            Self::Other => "other",
        }
    }
}

/// What a futex waiter was doing, from its user stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutexWait {
    /// Acquiring a lock someone else holds.
    Contention,
    /// Parked on a condition variable or a parker: waiting for work, not for a lock.
    Idle,
    /// No evidence either way.
    Unknown,
}

impl FutexWait {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Contention => "contention",
            Self::Idle => "idle",
            Self::Unknown => "unknown",
        }
    }
}

const LOCK_ACQUIRE: &[&str] = &[
    // Rust std's futex locks reach a futex wait only when contended; the contended slow
    // path itself is often invisible (it calls the frameless libc `syscall`).
    "futex::Mutex::lock",
    "mutex::Mutex::lock",
    "sync::Mutex::lock",
    "futex::RwLock::read",
    "futex::RwLock::write",
    "sync::RwLock::read",
    "sync::RwLock::write",
    "pthread_mutex_lock",
    "pthread_mutex_timedlock",
    "pthread_mutex_clocklock",
    "lll_lock_wait",
    "pthread_rwlock_rdlock",
    "pthread_rwlock_wrlock",
    "pthread_rwlock_timedrdlock",
    "pthread_rwlock_timedwrlock",
    "Mutex::lock_contended",
    "RwLock::read_contended",
    "RwLock::write_contended",
    "RawMutex::lock_slow",
    "RawRwLock::lock_shared_slow",
    "RawRwLock::lock_exclusive_slow",
    "RawRwLock::lock_upgradable_slow",
    "ObjectMonitor::enter",
    "ObjectMonitor::EnterI",
];

const IDLE_PARK: &[&str] = &[
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "pthread_cond_clockwait",
    "Condvar::wait",
    "thread::park",
    "Parker::park",
    "parking_lot::park",
    "Unsafe_Park",
    "ObjectMonitor::wait",
    "pthread_join",
    "pthread_clockjoin",
    "JoinHandle::join",
];

/// A function name without generic arguments and qualified-path brackets, so patterns
/// match every instantiation: `<std::sys::sync::mutex::futex::Mutex>::lock` and
/// `std::sync::poison::mutex::Mutex<T>::lock` become `std::sys::sync::mutex::futex::Mutex::lock`
/// and `std::sync::poison::mutex::Mutex::lock`; `<A as B>::f` becomes `A::f`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    // For each open `<`: whether it opened generic arguments (dropped entirely) or a
    // qualified path (kept, but its ` as Trait` part dropped).
    let mut opens: Vec<bool> = Vec::new();
    let mut skipping = 0usize;
    let mut rest = name;
    while let Some(c) = rest.chars().next() {
        if skipping == 0 && opens.last() == Some(&false) && rest.starts_with(" as ") {
            // Drop ` as Trait` up to the qualified path's closing bracket.
            skipping = 1;
            opens.push(true);
            rest = &rest[4..];
            continue;
        }
        match c {
            '<' => {
                let generic = skipping > 0
                    || out
                        .chars()
                        .last()
                        .is_some_and(|p| p.is_alphanumeric() || p == '_');
                if generic {
                    skipping += 1;
                }
                opens.push(generic);
            }
            '>' if opens.pop() == Some(true) => {
                skipping = skipping.saturating_sub(1);
            }
            '>' => {}
            _ if skipping == 0 => out.push(c),
            _ => {}
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Classifies a futex wait: from the kernel's view of the call (`hint`, a `WAIT_HINT_*`)
/// where it decides, else from the waiter's user frames.
pub fn classify_futex_wait<'a>(hint: u8, user: impl IntoIterator<Item = &'a str>) -> FutexWait {
    match hint {
        WAIT_HINT_FUTEX_LOCK => FutexWait::Contention,
        WAIT_HINT_FUTEX_CONDVAR => FutexWait::Idle,
        _ => classify_futex(user),
    }
}

/// Classifies a futex wait from its user frames (function names, any order).
pub fn classify_futex<'a>(user: impl IntoIterator<Item = &'a str>) -> FutexWait {
    let names: Vec<String> = user.into_iter().map(normalize).collect();
    let any = |patterns: &[&str]| {
        names
            .iter()
            .any(|frame| patterns.iter().any(|p| frame.contains(p)))
    };
    if any(LOCK_ACQUIRE) {
        FutexWait::Contention
    } else if any(IDLE_PARK) {
        FutexWait::Idle
    } else {
        FutexWait::Unknown
    }
}

/// Kernel frames that say what a blocked thread waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelWait {
    Lock,
    Futex,
    Disk,
    Network,
    Other,
}

const KERNEL_PATTERNS: &[(&str, KernelWait)] = &[
    ("futex_wait", KernelWait::Futex),
    ("futex_do_wait", KernelWait::Futex),
    ("futex_lock_pi", KernelWait::Futex),
    // File locks: flock, fcntl record locks, lease breaks.
    ("locks_lock_inode_wait", KernelWait::Lock),
    ("flock_lock_inode_wait", KernelWait::Lock),
    ("posix_lock_inode_wait", KernelWait::Lock),
    ("do_lock_file_wait", KernelWait::Lock),
    ("fcntl_setlk", KernelWait::Lock),
    ("__break_lease", KernelWait::Lock),
    ("mutex_lock", KernelWait::Lock),
    ("rwsem_down_", KernelWait::Lock),
    ("rt_mutex_slowlock", KernelWait::Lock),
    ("rtlock_slowlock", KernelWait::Lock),
    ("percpu_rwsem_wait", KernelWait::Lock),
    ("__down_common", KernelWait::Lock),
    ("io_schedule", KernelWait::Disk),
    ("folio_wait_bit", KernelWait::Disk),
    ("wait_on_page_bit", KernelWait::Disk),
    ("submit_bio_wait", KernelWait::Disk),
    ("blk_mq_", KernelWait::Disk),
    ("filemap_fdatawait", KernelWait::Disk),
    ("file_write_and_wait", KernelWait::Disk),
    ("jbd2_", KernelWait::Disk),
    ("wait_on_buffer", KernelWait::Disk),
    ("bit_wait_io", KernelWait::Disk),
    ("iomap_dio_", KernelWait::Disk),
    ("blkdev_direct_IO", KernelWait::Disk),
    ("sk_wait_data", KernelWait::Network),
    ("sk_stream_wait", KernelWait::Network),
    ("inet_csk_accept", KernelWait::Network),
    ("inet_wait_for_connect", KernelWait::Network),
    ("tcp_", KernelWait::Network),
    ("udp_recvmsg", KernelWait::Network),
    ("udpv6_recvmsg", KernelWait::Network),
    ("pipe_read", KernelWait::Other),
    ("pipe_write", KernelWait::Other),
    ("nanosleep", KernelWait::Other),
    ("ep_poll", KernelWait::Other),
    ("do_sys_poll", KernelWait::Other),
    ("do_select", KernelWait::Other),
    ("do_wait", KernelWait::Other),
    ("unix_stream_", KernelWait::Other),
];

/// The cause the kernel's evidence at switch-out (`hint`, a `WAIT_HINT_*`) decides, if
/// it decides one.
fn by_hint(hint: u8) -> Option<(Cause, &'static str)> {
    match hint {
        WAIT_HINT_KERNEL_LOCK => Some((Cause::Lock, "kernel lock (contention tracepoint)")),
        WAIT_HINT_FILE_LOCK => Some((Cause::Lock, "file lock (request deferred by the kernel)")),
        WAIT_HINT_FUTEX_LOCK => Some((
            Cause::Lock,
            "futex: lock acquire (kernel: FUTEX_LOCK_PI, or a wait on a locked mutex word)",
        )),
        WAIT_HINT_FUTEX_CONDVAR => Some((
            Cause::Other,
            "futex: condition variable (kernel: FUTEX_WAIT_REQUEUE_PI)",
        )),
        _ => None,
    }
}

/// The cause of the blocked (not runnable) part of an off-CPU wait, with a short note on
/// the evidence. `hint` is what the probes knew at switch-out (`WAIT_HINT_*`); frames are
/// innermost first. Task stacks leave out the kernel's `__sched` functions (`mutex_lock`,
/// `down_write`, `io_schedule`...), so kernel lock waits are recognised from the lock
/// signal's hint rather than from frames.
pub fn classify_blocked<'a>(
    state: OffCpuState,
    hint: u8,
    kernel: &[&'a str],
    user: &[&'a str],
) -> (Cause, &'static str) {
    if state == OffCpuState::Runnable {
        return (Cause::CpuContention, "preempted");
    }
    if let Some(decided) = by_hint(hint) {
        return decided;
    }
    if hint == WAIT_HINT_FUTEX {
        return futex_by_user_stack(user);
    }
    let found = kernel.iter().find_map(|frame| {
        KERNEL_PATTERNS
            .iter()
            .find(|(pattern, _)| frame.contains(pattern))
            .map(|&(_, wait)| wait)
    });
    match found {
        Some(KernelWait::Lock) => (Cause::Lock, "kernel lock"),
        Some(KernelWait::Futex) => futex_by_user_stack(user),
        Some(KernelWait::Disk) => (Cause::Disk, "block I/O"),
        Some(KernelWait::Network) => (Cause::Network, "socket"),
        Some(KernelWait::Other) => (Cause::Other, "sleep, poll, pipe or child"),
        None if kernel.is_empty() => by_state(state, hint),
        None => (Cause::Other, "unrecognised kernel stack"),
    }
}

/// A futex wait the kernel's view leaves open, by the waiter's user stack.
fn futex_by_user_stack(user: &[&str]) -> (Cause, &'static str) {
    match classify_futex(user.iter().copied()) {
        FutexWait::Contention => (Cause::Lock, "futex: lock contention (user stack)"),
        FutexWait::Idle => (Cause::Other, "futex: idle wait"),
        FutexWait::Unknown => (Cause::Other, "futex: no lock evidence"),
    }
}

/// The cause when no stack is known, from the state and the probes' hint.
pub fn by_state(state: OffCpuState, hint: u8) -> (Cause, &'static str) {
    if state != OffCpuState::Runnable
        && let Some(decided) = by_hint(hint)
    {
        return decided;
    }
    if state != OffCpuState::Runnable && hint == WAIT_HINT_FUTEX {
        return (Cause::Other, "futex: no lock evidence");
    }
    match state {
        OffCpuState::Runnable => (Cause::CpuContention, "preempted"),
        OffCpuState::Uninterruptible => (Cause::Disk, "uninterruptible, no stack"),
        _ => (Cause::Other, "no stack"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn futex_waits_need_evidence_to_count_as_contention() {
        let mutex = [
            "syscall",
            "std::sys::sync::mutex::futex::Mutex::lock_contended",
            "main",
        ];
        // The contended slow path hidden by the frameless `syscall` wrapper.
        let hidden = [
            "syscall",
            "std::sys::sync::mutex::futex::Mutex::lock",
            "app::work",
        ];
        assert_eq!(classify_futex(hidden), FutexWait::Contention);
        let condvar = [
            "syscall",
            "std::sys::sync::condvar::futex::Condvar::wait_optional_timeout",
            "worker",
        ];
        let reacquire = [
            "syscall",
            "std::sys::sync::mutex::futex::Mutex::lock_contended",
            "std::sync::Condvar::wait",
        ];
        assert_eq!(classify_futex(mutex), FutexWait::Contention);
        assert_eq!(classify_futex(condvar), FutexWait::Idle);
        assert_eq!(classify_futex(reacquire), FutexWait::Contention);
        assert_eq!(classify_futex(["syscall", "main"]), FutexWait::Unknown);
        assert_eq!(
            classify_futex(["__lll_lock_wait", "___pthread_mutex_lock"]),
            FutexWait::Contention
        );
        assert_eq!(
            classify_futex(["__futex_abstimed_wait_common", "___pthread_cond_wait"]),
            FutexWait::Idle
        );
    }

    #[test]
    fn names_lose_generics_and_qualified_brackets() {
        assert_eq!(
            normalize("<std::sys::sync::mutex::futex::Mutex>::lock"),
            "std::sys::sync::mutex::futex::Mutex::lock"
        );
        assert_eq!(
            normalize("std::sync::poison::mutex::Mutex<T>::lock"),
            "std::sync::poison::mutex::Mutex::lock"
        );
        assert_eq!(
            normalize(
                "<alloc::boxed::Box<dyn FnOnce<(), Output = ()>> as core::ops::FnOnce<()>>::call_once"
            ),
            "alloc::boxed::Box::call_once"
        );
        assert_eq!(normalize("plain_function"), "plain_function");
        let contended = [
            "syscall",
            "std::sync::poison::mutex::Mutex<T>::lock",
            "work",
        ];
        assert_eq!(classify_futex(contended), FutexWait::Contention);
    }

    #[test]
    fn the_kernel_view_of_a_futex_call_decides_before_user_frames() {
        use OffCpuState::Interruptible as S;
        let futex = ["futex_do_wait", "__futex_wait", "futex_wait"];
        // Rust's std Mutex under contention, the contended frame lost under the
        // frameless `syscall`: the kernel saw a wait on a locked mutex word.
        let no_frames = ["syscall", "app::worker"];
        assert_eq!(
            classify_blocked(S, WAIT_HINT_FUTEX_LOCK, &futex, &no_frames).0,
            Cause::Lock
        );
        // Unsampled waits (no stack) keep the evidence too.
        assert_eq!(by_state(S, WAIT_HINT_FUTEX_LOCK).0, Cause::Lock);
        assert_eq!(by_state(S, WAIT_HINT_FILE_LOCK).0, Cause::Lock);
        // A condition variable re-acquiring its mutex shows as the mutex wait it is.
        let condvar = ["syscall", "std::sys::sync::condvar::futex::Condvar::wait"];
        assert_eq!(
            classify_blocked(S, WAIT_HINT_FUTEX_LOCK, &futex, &condvar).0,
            Cause::Lock
        );
        // Other futex values: the user stack breaks the tie.
        assert_eq!(
            classify_blocked(S, WAIT_HINT_FUTEX, &futex, &condvar).0,
            Cause::Other
        );
        let rwlock = [
            "syscall",
            "std::sys::sync::rwlock::futex::RwLock::read_contended",
        ];
        assert_eq!(
            classify_blocked(S, WAIT_HINT_FUTEX, &futex, &rwlock).0,
            Cause::Lock
        );
        assert_eq!(
            classify_futex_wait(WAIT_HINT_FUTEX_CONDVAR, ["pthread_mutex_lock"]),
            FutexWait::Idle
        );
        // A file lock: the kernel stack alone says so too.
        let flock = ["locks_lock_inode_wait", "__do_sys_flock", "do_syscall_64"];
        assert_eq!(
            classify_blocked(S, WAIT_HINT_FILE_LOCK, &flock, &[]).0,
            Cause::Lock
        );
        assert_eq!(classify_blocked(S, 0, &flock, &[]).0, Cause::Lock);
    }

    #[test]
    fn the_kernel_lock_hint_wins() {
        let unrecognised = ["do_truncate", "do_sys_ftruncate"];
        assert_eq!(
            classify_blocked(
                OffCpuState::Uninterruptible,
                WAIT_HINT_KERNEL_LOCK,
                &unrecognised,
                &[]
            )
            .0,
            Cause::Lock
        );
    }

    #[test]
    fn kernel_stacks_decide_the_blocked_cause() {
        use OffCpuState::{Interruptible as S, Uninterruptible as D};
        let fsync = [
            "io_schedule",
            "folio_wait_bit_common",
            "file_write_and_wait_range",
            "ext4_sync_file",
        ];
        assert_eq!(classify_blocked(D, 0, &fsync, &[]).0, Cause::Disk);
        let mutex = ["__mutex_lock.constprop.0", "do_mmap"];
        assert_eq!(classify_blocked(D, 0, &mutex, &[]).0, Cause::Lock);
        let tcp = [
            "wait_woken",
            "sk_wait_data",
            "tcp_recvmsg_locked",
            "tcp_recvmsg",
        ];
        assert_eq!(classify_blocked(S, 0, &tcp, &[]).0, Cause::Network);
        let pipe = ["pipe_read", "vfs_read"];
        assert_eq!(classify_blocked(S, 0, &pipe, &[]).0, Cause::Other);
        let futex = ["futex_do_wait", "__futex_wait", "futex_wait"];
        let rust_mutex = ["std::sys::sync::mutex::futex::Mutex::lock_contended"];
        assert_eq!(classify_blocked(S, 0, &futex, &rust_mutex).0, Cause::Lock);
        assert_eq!(
            classify_blocked(S, 0, &futex, &["worker_loop"]).0,
            Cause::Other
        );
        assert_eq!(
            classify_blocked(OffCpuState::Runnable, 0, &tcp, &[]).0,
            Cause::CpuContention
        );
        assert_eq!(classify_blocked(D, 0, &[], &[]).0, Cause::Disk);
        assert_eq!(classify_blocked(S, 0, &[], &[]).0, Cause::Other);
    }
}
