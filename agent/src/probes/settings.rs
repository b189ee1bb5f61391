//! What to load: the signals, their thresholds, the scheduler hook and the map sizes.

use std::{path::PathBuf, time::Duration};

use agent_common::Signal;

/// How off-CPU time is hooked on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedHook {
    /// BTF tracepoints `sched_switch` and `rseq_update` (5.18+): stacks only for sampled
    /// waits.
    BtfTracepoint,
    /// Classic `sched:sched_switch`: stacks walked at every switch-out.
    Tracepoint,
}

impl SchedHook {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::BtfTracepoint => {
                "tp_btf sched_switch + rseq_update (stacks for threshold-sampled waits)"
            }
            Self::Tracepoint => "tracepoint sched:sched_switch (stacks at every switch-out)",
        }
    }
}

/// Which scheduler hook to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedHookChoice {
    /// The BTF tracepoint where the kernel has it, the classic one otherwise.
    #[default]
    Auto,
    /// Force the classic tracepoint (for kernels whose BTF tracepoints misbehave).
    Tracepoint,
}

/// Sizes of the probes' maps, in entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Threads tracked at once.
    pub threads: u32,
    /// Distinct (thread, signal, class) per drain interval and generation.
    pub totals: u32,
    /// Distinct (thread, signal, class, stacks) per drain interval and generation.
    pub samples: u32,
    /// Distinct stacks per drain interval and generation.
    pub stacks: u32,
    /// Sampled waits waiting for their user stack.
    pub pending: u32,
    /// Rows of unwind tables (16 bytes each; 0: no tables, frame-pointer walks only).
    pub unwind_rows: u32,
    /// Processes whose stacks are unwound by table at once.
    pub unwind_processes: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            threads: 32768,
            totals: 16384,
            samples: 16384,
            stacks: 4096,
            pending: 4096,
            // 4 MiB: the C library, a large Rust service and a dozen more binaries.
            unwind_rows: 262_144,
            unwind_processes: 1024,
        }
    }
}

/// What to load.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    pub signals: Vec<Signal>,
    pub offcpu_stack_threshold: Duration,
    pub lock_stack_threshold: Duration,
    pub syscall_slow_threshold: Duration,
    /// Time one syscall in this many (1: all); every one is counted.
    pub syscall_sample_every: u32,
    pub socket_wait_min: Duration,
    pub socket_stack_threshold: Duration,
    pub tcp_rtt_interval: Duration,
    pub oncpu_frequency_hz: u64,
    pub target_tgid: Option<u32>,
    /// A process left out when every process is measured (the agent's own).
    pub exclude_tgid: Option<u32>,
    pub sched_hook: SchedHookChoice,
    pub btf_path: Option<PathBuf>,
    pub map_sizes: MapSizes,
    /// This agent's directory in bpffs for maps and links that survive a restart
    /// (`probes::pins`); `None`: nothing pinned (`record`, or turned off).
    pub pin_dir: Option<PathBuf>,
}
