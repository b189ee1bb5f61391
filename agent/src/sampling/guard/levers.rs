//! What the overhead guard turns: the syscall signal's sampling and duty cycle, and the
//! off-CPU and lock stacks' thresholds.

use std::time::Duration;

use agent_common::Tuning;

use crate::probes::ProbeCost;

/// The levers, in the order the guard tries them when their programs cost the same
/// (and the metrics number them, `metrics::GUARD_LEVERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lever {
    /// Time one syscall in N (`Tuning::syscall_sample_every`).
    SyscallSampling = 0,
    /// Attach the syscall programs for 1/N of each drain interval.
    SyscallDutyCycle,
    /// Off-CPU waits shorter than this get a stack only by threshold sampling.
    OffCpuStackThreshold,
    /// The same for lock waits.
    LockStackThreshold,
}

/// What the levers set: the probes' tuning, and the syscall programs' duty cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub tuning: Tuning,
    /// The syscall programs are attached for 1/`duty` of each drain interval.
    pub duty: u64,
}

impl Lever {
    pub(super) const ALL: [Self; 4] = [
        Self::SyscallSampling,
        Self::SyscallDutyCycle,
        Self::OffCpuStackThreshold,
        Self::LockStackThreshold,
    ];

    /// The lever's setting, as a number (N, or nanoseconds).
    pub(super) fn get(self, settings: &Settings) -> u64 {
        let tuning = &settings.tuning;
        match self {
            Self::SyscallSampling => u64::from(tuning.syscall_sample_every.max(1)),
            Self::SyscallDutyCycle => settings.duty.max(1),
            Self::OffCpuStackThreshold => tuning.offcpu_stack_threshold_ns,
            Self::LockStackThreshold => tuning.lock_stack_threshold_ns,
        }
    }

    pub(super) fn set(self, settings: &mut Settings, value: u64) {
        let tuning = &mut settings.tuning;
        match self {
            Self::SyscallSampling => {
                tuning.syscall_sample_every = u32::try_from(value).unwrap_or(u32::MAX);
            }
            Self::SyscallDutyCycle => settings.duty = value,
            Self::OffCpuStackThreshold => tuning.offcpu_stack_threshold_ns = value,
            Self::LockStackThreshold => tuning.lock_stack_threshold_ns = value,
        }
    }

    /// The furthest the guard turns it: one syscall in 1024 timed, the syscall programs
    /// attached a sixteenth of the time, stacks only for waits of a second (shorter ones
    /// still sampled in proportion).
    pub(super) fn limit(self) -> u64 {
        match self {
            Self::SyscallSampling => 1024,
            Self::SyscallDutyCycle => 16,
            Self::OffCpuStackThreshold | Self::LockStackThreshold => 1_000_000_000,
        }
    }

    /// How a setting reads in the log and the profile.
    pub(super) fn describe(self, value: u64) -> String {
        let what = match self {
            Self::SyscallSampling => "syscalls timed",
            Self::SyscallDutyCycle => "syscall programs attached",
            Self::OffCpuStackThreshold => "off-CPU stacks for every wait >=",
            Self::LockStackThreshold => "lock stacks for every wait >=",
        };
        format!("{what} {}", self.value_text(value))
    }

    /// A setting alone: `1 in 16`, `4ms`.
    pub(super) fn value_text(self, value: u64) -> String {
        match self {
            Self::SyscallSampling => format!("1 in {value}"),
            Self::SyscallDutyCycle if value <= 1 => "all the time".to_owned(),
            Self::SyscallDutyCycle => {
                format!("1/{value} of each drain interval (totals scaled)")
            }
            Self::OffCpuStackThreshold | Self::LockStackThreshold => {
                format!("{:?}", Duration::from_nanos(value))
            }
        }
    }

    /// The part of the probes' run time this lever scales down.
    pub(super) fn cost(self, cost: &ProbeCost) -> Duration {
        match self {
            Self::SyscallSampling | Self::SyscallDutyCycle => cost.syscall,
            Self::OffCpuStackThreshold => cost.scheduler,
            Self::LockStackThreshold => cost.lock,
        }
    }
}
