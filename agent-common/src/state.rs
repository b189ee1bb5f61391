//! Per-thread and per-request state the probes keep between two events of one wait.

use crate::StackTrace;

/// Per-thread state (BTF path: task-local storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadState {
    /// `bpf_ktime_get_ns` at switch-out; zero while the thread is on a CPU.
    pub off_since_ns: u64,
    /// When the off-CPU thread was woken (start of its run-queue wait); zero if not yet.
    pub woken_ns: u64,
    /// Start of a kernel lock contention; zero if none.
    pub lock_since_ns: u64,
    pub lock_addr: u64,
    /// Start of the syscall in progress (syscall signal); zero if none.
    pub syscall_since_ns: u64,
    /// The user-space lock the thread waited on when it was switched out (lock signal):
    /// the futex address, or the inode number of a file lock; zero if none.
    pub futex_uaddr: u64,
    /// The inode number of the file lock the kernel deferred this thread's request for
    /// (set by the file-lock tracepoints, cleared at the request's next attempt).
    pub file_lock_ino: u64,
    /// When the socket syscall in progress first blocked (network signal); zero if none.
    pub socket_since_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Number of the syscall in progress.
    pub syscall_nr: u32,
    /// `Tuning::syscall_epoch` when it was entered.
    pub syscall_epoch: u32,
    /// The descriptor of the socket syscall that blocked (for `poll`, its one descriptor).
    pub socket_fd: u32,
    /// The number of that syscall.
    pub socket_nr: u32,
    /// The device (kernel `dev_t`) of that file's filesystem.
    pub file_lock_dev: u32,
    /// The process holding (or queued ahead for) the conflicting lock; zero if unknown.
    pub file_lock_holder: u32,
    /// The [`crate::OffCpuState`] at switch-out.
    pub state: u8,
    /// `THREAD_*` bits.
    pub flags: u8,
    /// The [`crate::LockKind`] of the contention in progress.
    pub lock_kind: u8,
    /// `WAIT_HINT_*`: what the thread was known to wait for at switch-out.
    pub wait_hint: u8,
    /// The [`crate::LockKind`] of the user-space lock wait (`Futex`, `FutexPi`, `File*`).
    pub futex_kind: u8,
    /// The [`crate::LockKind`] of the deferred file lock request; zero if none.
    pub file_lock_kind: u8,
    pub pad: [u8; 2],
}

/// [`ThreadState::wait_hint`], and `detail` of off-CPU keys (and of lock samples of
/// user-space locks): nothing known.
pub const WAIT_HINT_NONE: u8 = 0;
/// The thread was switched out inside a kernel lock contention (seen by the lock signal's
/// `contention_begin`): the scheduler frames of such waits are not in task stacks.
pub const WAIT_HINT_KERNEL_LOCK: u8 = 1;
/// Switched out in a futex wait that acquires a lock, as the kernel saw the call:
/// `FUTEX_LOCK_PI`, or a wait for a futex word holding 2, the "locked, with waiters"
/// state of the three-state mutex that glibc's locks, Rust's `std::sync::Mutex`, Go's
/// runtime locks (and most futex mutexes) use. Condition variables, parkers, joins and
/// semaphores wait on other values (sequence counters, 0, -1, a thread id).
pub const WAIT_HINT_FUTEX_LOCK: u8 = 2;
/// Switched out in another futex wait: the call alone does not tell a lock from a
/// condition or a parker, the waiter's user stack decides.
pub const WAIT_HINT_FUTEX: u8 = 3;
/// Switched out waiting on a priority-inheritance condition variable
/// (`FUTEX_WAIT_REQUEUE_PI`): waiting for a signal, not for a lock.
pub const WAIT_HINT_FUTEX_CONDVAR: u8 = 4;
/// Switched out waiting for a file lock (`flock`, `fcntl` record locks, a lease break),
/// as the kernel's file-lock tracepoints saw it deferred.
pub const WAIT_HINT_FILE_LOCK: u8 = 5;

/// [`ThreadState::flags`]: a sampled wait of this thread waits in the pending table for
/// its user stack.
pub const THREAD_PENDING: u8 = 1 << 0;
/// [`ThreadState::flags`]: the thread registered rseq, so its return to user space is seen
/// (tracepoint `rseq_update`) and its user stack is taken then, only for sampled waits.
pub const THREAD_HAS_RSEQ: u8 = 1 << 1;
/// [`ThreadState::flags`]: a kernel thread (no user stack).
pub const THREAD_KERNEL: u8 = 1 << 2;
/// [`ThreadState::flags`]: the thread's user stack was walked at its last switch-out (no
/// rseq) and sits in the per-thread snapshot.
pub const THREAD_USER_SNAPSHOT: u8 = 1 << 3;
/// [`ThreadState::flags`]: a syscall timed by the syscall signal is in progress.
pub const THREAD_IN_SYSCALL: u8 = 1 << 4;
/// [`ThreadState::flags`]: the thread blocked inside a socket syscall (network signal);
/// the wait ends when it returns to user space (`rseq_update`), or at switch-in for a
/// thread without rseq.
pub const THREAD_SOCKET_WAIT: u8 = 1 << 5;

/// Per-thread state of the classic-tracepoint fallback (a hash map keyed by thread id):
/// stacks are walked at switch-out, so their hashes travel with the state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TpThreadState {
    pub off_since_ns: u64,
    pub tgid: u32,
    pub state: u8,
    pub pad: [u8; 3],
    pub kstack: u64,
    pub ustack: u64,
}

/// A wait selected for stacks whose user stack is still to be taken in the thread's own
/// context (on its return to user space, or at its next switch-out).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingWait {
    pub wait_ns: u64,
    /// The runnable tail of the wait (after the wakeup).
    pub tail_ns: u64,
    /// Contribution to [`crate::SampleValue::est_ns`] (zero for exact waits).
    pub est_ns: u64,
    /// Contribution to [`crate::SampleValue::est_count_fp`] (zero for exact waits).
    pub est_count_fp: u64,
    /// User-mode instruction and stack pointers when the wait ended; the user stack is
    /// walked only if the thread is still at this point.
    pub user_ip: u64,
    pub user_sp: u64,
    /// The futex of a futex wait (the wait is also a lock sample), zero if none.
    pub futex_uaddr: u64,
    /// The lock sample's exact nanoseconds (the blocked part of an exact wait).
    pub lock_ns: u64,
    /// The lock sample's estimated nanoseconds (threshold-sampled wait).
    pub lock_est_ns: u64,
    pub tgid: u32,
    pub pad32: u32,
    /// A file lock's device and holder (see [`ThreadState`]).
    pub lock_dev: u32,
    pub lock_holder: u32,
    pub state: u8,
    pub flags: u8,
    /// `WAIT_HINT_*` at switch-out.
    pub wait_hint: u8,
    /// The [`crate::LockKind`] of the user-space lock wait.
    pub futex_kind: u8,
    pub pad: [u8; 4],
    /// The kernel stack of the thread where it blocked, taken at switch-in.
    pub kstack: StackTrace,
}

/// Key of a block request in flight: device and start sector, as the block tracepoints
/// report them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DiskRequestKey {
    /// The kernel's `dev_t` (major << 20 | minor).
    pub dev: u32,
    pub pad: u32,
    pub sector: u64,
}

/// A block request in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskRequest {
    /// When the submitting thread started the request (`block_io_start`).
    pub start_ns: u64,
    /// When the driver was handed the request (`block_rq_issue`); the latency counts from
    /// here.
    pub issue_ns: u64,
    pub kstack: u64,
    pub ustack: u64,
    /// The submitting thread (zero when submitted outside process context).
    pub tgid: u32,
    pub tid: u32,
    /// A [`crate::DiskOp`].
    pub op: u8,
    /// `FLAG_*` bits of [`crate::SampleKey::flags`].
    pub flags: u8,
    pub pad: [u8; 6],
}
