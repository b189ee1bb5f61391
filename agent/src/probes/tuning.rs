//! What the probes cost, and what the overhead guard changes while they run: the kernel's
//! run-time accounting of BPF programs (`BPF_ENABLE_STATS`, on while the agent holds its
//! descriptor; it covers the programs' own instructions, not the kernel's entry into
//! them), summed by the guard's levers; the tuning map the programs read; and the syscall
//! signal's programs, which the guard may detach for part of each drain interval.

use std::time::Duration;

use agent_common::{Signal, Tuning};
use aya::programs::BtfTracePoint;

use super::{ProbeError, Probes};

/// Run time of the probes so far (while counted), by what the guard can scale down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCost {
    /// `sys_enter`/`sys_exit` serving the syscall signal (its sampling).
    pub syscall: Duration,
    /// How many times those two ran (each syscall seen runs both).
    pub syscall_runs: u64,
    /// The scheduler programs (off-CPU stacks' threshold).
    pub scheduler: Duration,
    /// The kernel lock programs (lock stacks' threshold).
    pub lock: Duration,
    /// Everything else.
    pub other: Duration,
}

impl ProbeCost {
    pub fn total(&self) -> Duration {
        self.syscall + self.scheduler + self.lock + self.other
    }

    /// The run time since `earlier`.
    #[must_use]
    pub fn minus(&self, earlier: &Self) -> Self {
        Self {
            syscall: self.syscall.saturating_sub(earlier.syscall),
            syscall_runs: self.syscall_runs.saturating_sub(earlier.syscall_runs),
            scheduler: self.scheduler.saturating_sub(earlier.scheduler),
            lock: self.lock.saturating_sub(earlier.lock),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}

impl Probes {
    /// Turns the kernel's run-time accounting of BPF programs on for as long as the probes
    /// are loaded. It needs `CAP_SYS_ADMIN` (or `kernel.bpf_stats_enabled=1`, which this
    /// then finds on) and costs every BPF program on the host two clock reads a run.
    pub fn count_run_time(&mut self) -> Result<(), String> {
        if self.run_time_stats.is_some() {
            return Ok(());
        }
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => {
                self.run_time_stats = Some(fd);
                Ok(())
            }
            Err(err) => {
                let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                    .is_ok_and(|v| v.trim() == "1");
                if enabled {
                    Ok(())
                } else {
                    Err(format!(
                        "BPF_ENABLE_STATS: {err}; grant CAP_SYS_ADMIN or set kernel.bpf_stats_enabled=1"
                    ))
                }
            }
        }
    }

    /// Run time of the probes' programs so far, by lever.
    pub fn run_time(&self) -> ProbeCost {
        let syscall_signal = self.hooks.iter().any(|(s, _)| *s == Signal::Syscall);
        let mut cost = ProbeCost::default();
        for (name, program) in self.ebpf.programs() {
            let Ok(info) = program.info() else {
                continue;
            };
            let slot = match name {
                "sys_enter_btf" | "sys_exit_btf" if syscall_signal => {
                    cost.syscall_runs += info.run_count();
                    &mut cost.syscall
                }
                "sched_switch_out_btf"
                | "sched_switch_in_btf"
                | "rseq_update_btf"
                | "sched_switch_tp" => &mut cost.scheduler,
                "contention_begin_btf" | "contention_end_btf" => &mut cost.lock,
                _ => &mut cost.other,
            };
            *slot += info.run_time();
        }
        cost
    }

    /// The tuning the programs read now.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// Replaces the tuning the programs read (each event uses the value current then).
    /// The syscall epoch is the probes' own: a caller's copy of it may be stale.
    pub fn tune(&mut self, mut tuning: Tuning) -> Result<(), ProbeError> {
        tuning.syscall_epoch = self.tuning.syscall_epoch;
        self.write_tuning(tuning)
    }

    fn write_tuning(&mut self, tuning: Tuning) -> Result<(), ProbeError> {
        self.tuning_map
            .set(0, tuning, 0)
            .map_err(|source| ProbeError::MapApi {
                map: "TUNING",
                source,
            })?;
        self.tuning = tuning;
        Ok(())
    }

    /// Whether the guard may detach the syscall signal's programs (whether they are
    /// loaded).
    pub fn syscall_detachable(&self) -> bool {
        self.syscall_links.is_some()
    }

    /// Whether the syscall signal's programs are attached now.
    pub fn syscall_attached(&self) -> bool {
        self.syscall_links
            .as_ref()
            .is_none_or(|links| links.iter().all(|(_, link)| link.is_some()))
    }

    /// Detaches the syscall signal's programs (they stay loaded), or attaches them again
    /// in a new epoch (a syscall entered before is not timed at its exit).
    pub fn attach_syscall_programs(&mut self, attached: bool) -> Result<(), ProbeError> {
        let Some(mut links) = self.syscall_links.take() else {
            return Ok(());
        };
        if attached && links.iter().any(|(_, link)| link.is_none()) {
            let mut tuning = self.tuning;
            tuning.syscall_epoch = tuning.syscall_epoch.wrapping_add(1);
            self.write_tuning(tuning)?;
        }
        let mut result = Ok(());
        for (name, link) in &mut links {
            let Some(program) = self.ebpf.program_mut(name) else {
                continue;
            };
            let Ok(program): Result<&mut BtfTracePoint, _> = program.try_into() else {
                continue;
            };
            let outcome = match (attached, link.take()) {
                (true, None) => program.attach().map(|id| *link = Some(id)),
                (false, Some(id)) => program.detach(id),
                (_, kept) => {
                    *link = kept;
                    Ok(())
                }
            };
            if let Err(source) = outcome {
                result = Err(ProbeError::Program {
                    program: name,
                    source,
                });
            }
        }
        self.syscall_links = Some(links);
        result
    }
}
