//! Enumerations encoded as `u8` in map keys: signals, and each signal's classes.

/// The signals the probes produce. Stored in [`crate::TotalKey::signal`] and
/// [`crate::SampleKey::signal`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// Time a thread spent switched out, from switch-out to switch-in.
    OffCpu = 0,
    /// Sampled on-CPU time (`perf_event`).
    OnCpu = 1,
    /// Time a runnable thread waited for a CPU: from wakeup or preemption to switch-in.
    RunQueue = 2,
    /// Time spent waiting for a lock: kernel locks (lock contention tracepoints) and
    /// user-space futexes.
    Lock = 3,
    /// Time spent in system calls.
    Syscall = 4,
    /// Block request latency, from issue to completion.
    Disk = 5,
    /// TCP connect latency, from SYN sent to established (or failed), per remote peer.
    Connect = 6,
    /// Time a thread spent in a receive, send, poll or connect syscall on a socket that
    /// waited, per remote peer.
    SocketWait = 7,
    /// TCP path events per peer: smoothed RTT samples, retransmits, listen overflows.
    Tcp = 8,
}

impl Signal {
    pub const COUNT: usize = 9;
    pub const ALL: [Self; Self::COUNT] = [
        Self::OffCpu,
        Self::OnCpu,
        Self::RunQueue,
        Self::Lock,
        Self::Syscall,
        Self::Disk,
        Self::Connect,
        Self::SocketWait,
        Self::Tcp,
    ];

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::OffCpu),
            1 => Some(Self::OnCpu),
            2 => Some(Self::RunQueue),
            3 => Some(Self::Lock),
            4 => Some(Self::Syscall),
            5 => Some(Self::Disk),
            6 => Some(Self::Connect),
            7 => Some(Self::SocketWait),
            8 => Some(Self::Tcp),
            _ => None,
        }
    }
}

/// Why a thread was switched out (the state it left the CPU in). Stored as `u8` in
/// [`TotalKey::class`] and [`SampleKey::class`] for the off-CPU signal.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OffCpuState {
    /// Preempted or yielded while runnable: waiting for a CPU.
    Runnable = 0,
    /// `TASK_INTERRUPTIBLE`: sleeping until an event or a signal.
    Interruptible = 1,
    /// `TASK_UNINTERRUPTIBLE`: blocked, typically on I/O.
    Uninterruptible = 2,
    /// `TASK_IDLE`: an uninterruptible wait that does not count as load (idle kernel workers).
    Idle = 3,
    /// Stopped, traced, parked or anything else.
    Other = 4,
}

impl OffCpuState {
    pub const ALL: [Self; 5] = [
        Self::Runnable,
        Self::Interruptible,
        Self::Uninterruptible,
        Self::Idle,
        Self::Other,
    ];

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Runnable),
            1 => Some(Self::Interruptible),
            2 => Some(Self::Uninterruptible),
            3 => Some(Self::Idle),
            4 => Some(Self::Other),
            _ => None,
        }
    }

    /// Classifies the raw `prev_state` argument of the BTF `sched_switch` tracepoint (the
    /// kernel's `task->__state` bits, already `TASK_RUNNING` when the switch was a
    /// preemption or the block was cancelled by a signal).
    pub const fn from_task_state(preempt: bool, raw: u32) -> Self {
        const TASK_INTERRUPTIBLE: u32 = 0x1;
        const TASK_UNINTERRUPTIBLE: u32 = 0x2;
        const TASK_NOLOAD: u32 = 0x400;
        if preempt || raw == 0 {
            Self::Runnable
        } else if raw & TASK_INTERRUPTIBLE != 0 {
            Self::Interruptible
        } else if raw & TASK_UNINTERRUPTIBLE != 0 {
            if raw & TASK_NOLOAD != 0 {
                Self::Idle
            } else {
                Self::Uninterruptible
            }
        } else {
            Self::Other
        }
    }

    /// Classifies the `prev_state` field of the classic `sched:sched_switch` tracepoint, which
    /// reports one bit per state letter (`TASK_REPORT`), and `TASK_REPORT_MAX` for preemption.
    pub const fn from_reported_state(reported: u64) -> Self {
        match reported {
            0 => Self::Runnable,
            0x1 => Self::Interruptible,
            0x2 => Self::Uninterruptible,
            0x80 => Self::Idle,
            // TASK_REPORT_MAX has moved between kernel versions (0x80, 0x100, 0x200); every
            // value at or above the idle bit other than idle itself means "preempted".
            r if r > 0x80 => Self::Runnable,
            _ => Self::Other,
        }
    }
}

/// How a run-queue wait began. Stored in `class` for [`Signal::RunQueue`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunQueueKind {
    /// Preempted (or yielded) while runnable.
    Preempted = 0,
    /// Woken from a sleep (or newly created).
    Woken = 1,
}

impl RunQueueKind {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Preempted),
            1 => Some(Self::Woken),
            _ => None,
        }
    }
}

/// The kind of lock a thread waited for. Stored in `class` for [`Signal::Lock`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockKind {
    /// Spinning: spinlocks and spinning rwlocks.
    Spin = 0,
    /// Kernel mutex (sleeping).
    Mutex = 1,
    /// Kernel rw-semaphore taken for reading.
    RwsemRead = 2,
    /// Kernel rw-semaphore taken for writing.
    RwsemWrite = 3,
    /// Kernel rt-mutex.
    RtMutex = 4,
    /// Kernel per-CPU rw-semaphore.
    PercpuRwsem = 5,
    /// User-space futex wait (`FUTEX_WAIT`, `FUTEX_WAIT_BITSET`, `futex_wait`, `futex_waitv`).
    Futex = 6,
    /// User-space priority-inheritance futex lock (`FUTEX_LOCK_PI`, `FUTEX_LOCK_PI2`).
    FutexPi = 7,
    Other = 8,
    /// A whole-file lock (`flock`) held by another open file.
    FileFlock = 9,
    /// A POSIX record lock (`fcntl` `F_SETLKW`, `F_OFD_SETLKW`, `lockf`).
    FilePosix = 10,
    /// A file lease being broken (an `open` or `truncate` waiting for the lease holder).
    FileLease = 11,
}

impl LockKind {
    pub const ALL: [Self; 12] = [
        Self::Spin,
        Self::Mutex,
        Self::RwsemRead,
        Self::RwsemWrite,
        Self::RtMutex,
        Self::PercpuRwsem,
        Self::Futex,
        Self::FutexPi,
        Self::Other,
        Self::FileFlock,
        Self::FilePosix,
        Self::FileLease,
    ];

    /// A lock on a file (the lock object is an inode).
    pub const fn is_file(self) -> bool {
        matches!(self, Self::FileFlock | Self::FilePosix | Self::FileLease)
    }

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Spin),
            1 => Some(Self::Mutex),
            2 => Some(Self::RwsemRead),
            3 => Some(Self::RwsemWrite),
            4 => Some(Self::RtMutex),
            5 => Some(Self::PercpuRwsem),
            6 => Some(Self::Futex),
            7 => Some(Self::FutexPi),
            8 => Some(Self::Other),
            9 => Some(Self::FileFlock),
            10 => Some(Self::FilePosix),
            11 => Some(Self::FileLease),
            _ => None,
        }
    }

    /// Classifies the `flags` of the `lock:contention_begin` tracepoint
    /// (`LCB_F_SPIN`, `LCB_F_READ`, `LCB_F_WRITE`, `LCB_F_RT`, `LCB_F_PERCPU`, `LCB_F_MUTEX`).
    pub const fn from_contention_flags(flags: u32) -> Self {
        const SPIN: u32 = 1 << 0;
        const READ: u32 = 1 << 1;
        const WRITE: u32 = 1 << 2;
        const RT: u32 = 1 << 3;
        const PERCPU: u32 = 1 << 4;
        const MUTEX: u32 = 1 << 5;
        if flags & SPIN != 0 {
            Self::Spin
        } else if flags & PERCPU != 0 {
            Self::PercpuRwsem
        } else if flags & RT != 0 {
            Self::RtMutex
        } else if flags & MUTEX != 0 {
            Self::Mutex
        } else if flags & READ != 0 {
            Self::RwsemRead
        } else if flags & WRITE != 0 {
            Self::RwsemWrite
        } else {
            Self::Other
        }
    }
}

/// A block request's operation. Stored in `class` for [`Signal::Disk`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskOp {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    Other = 4,
}

impl DiskOp {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Read),
            1 => Some(Self::Write),
            2 => Some(Self::Flush),
            3 => Some(Self::Discard),
            4 => Some(Self::Other),
            _ => None,
        }
    }

    /// Classifies the `rwbs` string of the block tracepoints (e.g. `R`, `WS`, `FWS`, `D`).
    pub fn from_rwbs(rwbs: &[u8]) -> Self {
        let has = |c: u8| rwbs.iter().take_while(|&&b| b != 0).any(|&b| b == c);
        if has(b'D') {
            Self::Discard
        } else if has(b'W') {
            Self::Write
        } else if has(b'R') {
            Self::Read
        } else if has(b'F') {
            Self::Flush
        } else {
            Self::Other
        }
    }
}

/// What a file descriptor refers to. Stored in `detail` of syscall samples.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FdKind {
    /// Not an fd-taking syscall, or not known.
    Unknown = 0,
    /// A regular file.
    File = 1,
    Socket = 2,
    Pipe = 3,
    /// Anything else: devices, directories, event fds, epoll, timers.
    Other = 4,
}

impl FdKind {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Unknown),
            1 => Some(Self::File),
            2 => Some(Self::Socket),
            3 => Some(Self::Pipe),
            4 => Some(Self::Other),
            _ => None,
        }
    }

    /// Classifies an inode's `i_mode`.
    pub const fn from_mode(mode: u32) -> Self {
        const S_IFMT: u32 = 0o170_000;
        match mode & S_IFMT {
            0o100_000 => Self::File,
            0o140_000 => Self::Socket,
            0o010_000 => Self::Pipe,
            _ => Self::Other,
        }
    }
}

/// How a TCP connect ended. Stored in `class` for [`Signal::Connect`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectOutcome {
    Established = 0,
    /// The peer answered with a reset (`ECONNREFUSED`).
    Refused = 1,
    /// No answer within the SYN retries (`ETIMEDOUT`).
    TimedOut = 2,
    /// Another error (`EHOSTUNREACH`, `ENETUNREACH`, ...).
    Failed = 3,
    /// Closed by the application before it completed.
    Aborted = 4,
}

impl ConnectOutcome {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Established),
            1 => Some(Self::Refused),
            2 => Some(Self::TimedOut),
            3 => Some(Self::Failed),
            4 => Some(Self::Aborted),
            _ => None,
        }
    }

    /// Classifies the socket error (`sk->sk_err`) when a connecting socket closes.
    pub const fn from_socket_error(err: u32) -> Self {
        const ETIMEDOUT: u32 = 110;
        const ECONNREFUSED: u32 = 111;
        match err {
            0 => Self::Aborted,
            ECONNREFUSED => Self::Refused,
            ETIMEDOUT => Self::TimedOut,
            _ => Self::Failed,
        }
    }
}

/// What a socket wait was doing. Stored in `class` for [`Signal::SocketWait`], and set
/// per syscall number by the agent in the probes' `SOCKET_SYSCALLS` table.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SocketOp {
    /// Not a socket operation (table value only).
    None = 0,
    /// `read`, `readv`, `recvfrom`, `recvmsg`, `recvmmsg`.
    Receive = 1,
    /// `write`, `writev`, `sendto`, `sendmsg`, `sendmmsg`, `sendfile`.
    Send = 2,
    /// `poll`/`ppoll` on exactly one descriptor.
    Poll = 3,
    /// A blocking `connect`.
    Connect = 4,
}

impl SocketOp {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::None),
            1 => Some(Self::Receive),
            2 => Some(Self::Send),
            3 => Some(Self::Poll),
            4 => Some(Self::Connect),
            _ => None,
        }
    }
}

/// A TCP path event. Stored in `class` for [`Signal::Tcp`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpEvent {
    /// A smoothed-RTT sample (its nanoseconds are the smoothed RTT).
    Rtt = 0,
    /// A retransmitted segment; `detail` holds the TCP state.
    Retransmit = 1,
    /// A connection dropped by a listener whose accept queue was full.
    ListenOverflow = 2,
}

impl TcpEvent {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Rtt),
            1 => Some(Self::Retransmit),
            2 => Some(Self::ListenOverflow),
            _ => None,
        }
    }
}

/// Which end of a connection this host is. Part of a [`crate::Peer`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Not seen connecting or accepting: inferred from the ports by the agent.
    Unknown = 0,
    /// This host connected (active open).
    Client = 1,
    /// This host accepted (passive open), or a listener.
    Server = 2,
}

impl Direction {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Unknown),
            1 => Some(Self::Client),
            2 => Some(Self::Server),
            _ => None,
        }
    }
}
