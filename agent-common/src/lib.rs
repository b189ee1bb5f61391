//! The ABI shared by the eBPF probes and the agent: map keys and values, enums encoded as
//! fixed-width integers, loss counters and the read-only probe configuration.
//!
//! Everything here is `#[repr(C)]`, fixed-width and free of implicit padding, so the kernel
//! side and the user side agree byte for byte.
#![no_std]

/// Deepest stack the probes record, in frames (the kernel's `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// A stack hash of zero means "no stack captured".
pub const NO_STACK: u64 = 0;

/// Fractional bits of [`SampleValue::est_count_fp`]: estimated event counts are fixed point.
pub const EST_COUNT_FP_SHIFT: u32 = 10;

/// The signals the probes produce. Stored as `u8` in [`TotalKey::signal`] and [`SampleKey::signal`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// Time a thread spent switched out, from switch-out to switch-in.
    OffCpu = 0,
    /// Sampled on-CPU time (`perf_event`).
    OnCpu = 1,
}

impl Signal {
    pub const ALL: [Self; 2] = [Self::OffCpu, Self::OnCpu];

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::OffCpu),
            1 => Some(Self::OnCpu),
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

/// [`SampleKey::flags`]: the user stack holds only the leaf instruction pointer, because the
/// thread did not return to user space through the wait's own syscall.
pub const FLAG_USER_LEAF_ONLY: u8 = 1 << 0;
/// [`SampleKey::flags`]: capturing the kernel stack failed.
pub const FLAG_KSTACK_FAILED: u8 = 1 << 1;
/// [`SampleKey::flags`]: capturing the user stack failed.
pub const FLAG_USTACK_FAILED: u8 = 1 << 2;
/// [`SampleKey::flags`]: a kernel thread (no user stack exists).
pub const FLAG_KERNEL_THREAD: u8 = 1 << 3;

/// Key of the exact totals: one entry per (thread, signal, class), updated by every event.
/// Small on purpose: it is hashed on every context switch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TotalKey {
    pub tgid: u32,
    pub tid: u32,
    /// A [`Signal`].
    pub signal: u8,
    /// Signal-specific class: the [`OffCpuState`] for off-CPU.
    pub class: u8,
    pub pad: u16,
    /// Signal-specific small attribute (reserved for syscall numbers, lock kinds, devices).
    pub aux: u32,
}

/// Value of the exact totals. Updated with atomic adds only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TotalValue {
    pub ns: u64,
    pub count: u64,
}

/// Key of the stack samples: one entry per (thread, signal, class, stacks, object).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SampleKey {
    pub tgid: u32,
    pub tid: u32,
    /// Hash of the kernel stack in the stack table, [`NO_STACK`] if none.
    pub kstack: u64,
    /// Hash of the user stack in the stack table, [`NO_STACK`] if none.
    pub ustack: u64,
    /// A [`Signal`].
    pub signal: u8,
    /// Signal-specific class: the [`OffCpuState`] for off-CPU.
    pub class: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub pad: u8,
    /// Signal-specific small attribute (reserved for syscall numbers, lock kinds, devices).
    pub aux: u32,
    /// Signal-specific object (reserved for lock addresses and peer addresses).
    pub object: [u64; 3],
}

/// Value of the stack samples. Updated with atomic adds only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SampleValue {
    /// Exactly measured nanoseconds.
    pub ns: u64,
    /// Exactly counted events.
    pub count: u64,
    /// Estimated nanoseconds of threshold-sampled events (sum of the threshold per sample).
    pub est_ns: u64,
    /// Estimated number of threshold-sampled events, fixed point ([`EST_COUNT_FP_SHIFT`]).
    pub est_count_fp: u64,
}

/// A stack as the probes store it: instruction pointers, innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackTrace {
    /// Number of valid entries in `ips`.
    pub len: u32,
    /// `STACK_*` bits.
    pub flags: u32,
    pub ips: [u64; MAX_STACK_DEPTH],
}

/// [`StackTrace::flags`]: a user stack (instruction pointers in the thread's address space).
pub const STACK_USER: u32 = 1 << 0;
/// [`StackTrace::flags`]: the walk filled every slot, so the stack is probably truncated.
pub const STACK_FULL: u32 = 1 << 1;

/// Indexes of the per-CPU loss counters. Counters are cumulative and never reset; user space
/// reports the difference between two reads.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The per-thread table was full: a thread's waits were not measured.
    ThreadTableFull = 0,
    /// A totals or samples map was full: an event was counted nowhere else.
    AggFull = 1,
    /// The stack table was full: an event lost its stacks (still counted in totals).
    StackTableFull = 2,
    /// The pending-capture table was full: a sampled wait lost its stacks.
    PendingFull = 3,
    /// The kernel refused a kernel stack walk.
    KernelStackFailed = 4,
    /// The kernel refused a user stack walk.
    UserStackFailed = 5,
    /// A map update lost against a concurrent update of the same bucket (NMI context).
    MapBusy = 6,
    /// A wait whose user stack could only be taken as the leaf frame.
    UserLeafOnly = 7,
}

impl Loss {
    pub const COUNT: u32 = 8;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::ThreadTableFull,
        Self::AggFull,
        Self::StackTableFull,
        Self::PendingFull,
        Self::KernelStackFailed,
        Self::UserStackFailed,
        Self::MapBusy,
        Self::UserLeafOnly,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::ThreadTableFull => "thread_table_full",
            Self::AggFull => "aggregation_map_full",
            Self::StackTableFull => "stack_table_full",
            Self::PendingFull => "pending_table_full",
            Self::KernelStackFailed => "kernel_stack_failed",
            Self::UserStackFailed => "user_stack_failed",
            Self::MapBusy => "map_busy",
            Self::UserLeafOnly => "user_stack_leaf_only",
        }
    }
}

/// Per-thread scheduling state (BTF path: task-local storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadState {
    /// `bpf_ktime_get_ns` at switch-out; zero while the thread is on a CPU.
    pub off_since_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    /// The [`OffCpuState`] at switch-out.
    pub state: u8,
    /// `THREAD_*` bits.
    pub flags: u8,
    pub pad: [u8; 6],
}

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
/// context (at syscall exit, or at its next switch-out).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingWait {
    pub wait_ns: u64,
    /// Contribution to [`SampleValue::est_ns`] (zero for exact waits).
    pub est_ns: u64,
    /// Contribution to [`SampleValue::est_count_fp`] (zero for exact waits).
    pub est_count_fp: u64,
    /// User-mode instruction and stack pointers when the wait ended; the user stack is
    /// walked only if the thread is still at this point.
    pub user_ip: u64,
    pub user_sp: u64,
    pub tgid: u32,
    pub state: u8,
    pub flags: u8,
    pub pad: u16,
    /// The kernel stack of the thread where it blocked, taken at switch-in.
    pub kstack: StackTrace,
}

/// Read-only configuration the agent writes into the probes before loading them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Waits at or above this many nanoseconds always get stacks; shorter waits are
    /// threshold-sampled with probability `wait / threshold`.
    pub offcpu_stack_threshold_ns: u64,
    /// Only this process (tgid) is measured; zero measures every process.
    pub target_tgid: u32,
    /// Offset of `pid` in the kernel's `struct task_struct` (from BTF).
    pub task_pid_offset: u32,
    /// Offset of `flags` in the kernel's `struct task_struct` (from BTF).
    pub task_flags_offset: u32,
    /// Offset of the `rseq` pointer in `struct task_struct` (from BTF); zero if unknown,
    /// which makes every thread take the eager user-stack path.
    pub task_rseq_offset: u32,
    /// Offset of `prev_state` in the classic `sched_switch` tracepoint record.
    pub tp_prev_state_offset: u32,
    /// Offset of `next_pid` in the classic `sched_switch` tracepoint record.
    pub tp_next_pid_offset: u32,
}

impl ProbeConfig {
    pub const DEFAULT: Self = Self {
        offcpu_stack_threshold_ns: 1_000_000,
        target_tgid: 0,
        task_pid_offset: 0,
        task_flags_offset: 0,
        task_rseq_offset: 0,
        tp_prev_state_offset: 32,
        tp_next_pid_offset: 56,
    };
}

/// Index into the `GENERATION` array holding the active generation (0 or 1).
pub const GENERATION_INDEX: u32 = 0;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is `#[repr(C)]`, made of fixed-width integers with no
    // implicit padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::TotalKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TotalValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackTrace {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TpThreadState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingWait {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeConfig {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<TotalKey>(), 16);
        assert_eq!(size_of::<TotalValue>(), 16);
        assert_eq!(size_of::<SampleKey>(), 4 + 4 + 8 + 8 + 4 + 4 + 24);
        assert_eq!(size_of::<SampleValue>(), 32);
        assert_eq!(size_of::<StackTrace>(), 8 + 8 * MAX_STACK_DEPTH);
        assert_eq!(size_of::<ThreadState>(), 24);
        assert_eq!(size_of::<TpThreadState>(), 32);
        assert_eq!(
            size_of::<PendingWait>(),
            5 * 8 + 8 + size_of::<StackTrace>()
        );
        assert_eq!(size_of::<ProbeConfig>(), 8 + 6 * 4);
    }

    #[test]
    fn task_state_classification() {
        assert_eq!(OffCpuState::from_task_state(true, 1), OffCpuState::Runnable);
        assert_eq!(
            OffCpuState::from_task_state(false, 0),
            OffCpuState::Runnable
        );
        assert_eq!(
            OffCpuState::from_task_state(false, 1),
            OffCpuState::Interruptible
        );
        // TASK_KILLABLE = TASK_WAKEKILL | TASK_UNINTERRUPTIBLE
        assert_eq!(
            OffCpuState::from_task_state(false, 0x102),
            OffCpuState::Uninterruptible
        );
        // TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
        assert_eq!(
            OffCpuState::from_task_state(false, 0x402),
            OffCpuState::Idle
        );
        // __TASK_STOPPED
        assert_eq!(OffCpuState::from_task_state(false, 0x4), OffCpuState::Other);
    }

    #[test]
    fn reported_state_classification() {
        assert_eq!(OffCpuState::from_reported_state(0), OffCpuState::Runnable);
        assert_eq!(
            OffCpuState::from_reported_state(1),
            OffCpuState::Interruptible
        );
        assert_eq!(
            OffCpuState::from_reported_state(2),
            OffCpuState::Uninterruptible
        );
        assert_eq!(OffCpuState::from_reported_state(0x80), OffCpuState::Idle);
        assert_eq!(
            OffCpuState::from_reported_state(0x100),
            OffCpuState::Runnable
        );
        assert_eq!(OffCpuState::from_reported_state(0x4), OffCpuState::Other);
    }
}
