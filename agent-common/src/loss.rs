//! Loss counters: per-CPU, per signal, cumulative and never reset; user space reports the
//! difference between two reads.

use crate::Signal;

/// Why an event (or part of it) was not recorded.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Per-thread state could not be allocated: a thread's events were not measured.
    ThreadTableFull = 0,
    /// A totals or samples map was full: an event was counted nowhere else.
    AggFull = 1,
    /// The stack table was full: an event lost its stacks (still counted in totals).
    StackTableFull = 2,
    /// A table of events in flight was full: an event was not measured or lost its stacks.
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

    /// Index of this loss of `signal` in the loss counter array.
    pub const fn index(self, signal: Signal) -> u32 {
        signal as u32 * Self::COUNT + self as u32
    }
}

/// Number of loss counters: one per (signal, loss).
pub const LOSS_COUNTERS: u32 = Signal::COUNT as u32 * Loss::COUNT;
