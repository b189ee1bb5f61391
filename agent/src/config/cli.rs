//! Command-line interface of `stallscope-agent`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{Config, ConfigError, FileConfig, Overrides},
    probes::SchedHookChoice,
};

#[derive(Debug, Parser)]
#[command(
    name = "stallscope-agent",
    version,
    about = "Host agent of stallscope: eBPF wait-time profiling (off-CPU by cause, run queue, locks, syscalls, disk, network; on-CPU for contrast) with kernel and user stacks"
)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Profile for a while and write one file (like `perf record`). Format by extension:
    /// .folded, .pb.gz (pprof), .svg (flame graph), .json (speedscope).
    Record(RecordArgs),
    /// Print, per signal, what it needs and whether this kernel has it.
    Check(CommonArgs),
    /// Run as a daemon: sample continuously and stream batches to a collector, through
    /// an on-disk spool that survives restarts and outages.
    Run(Box<crate::sampling::run::RunArgs>),
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// How long to record, with a unit: 10s, 500ms, 2m.
    #[arg(short, long, default_value = "10s", allow_hyphen_values = true)]
    pub duration: String,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Signals to capture, comma-separated: offcpu, oncpu, runqueue, lock, syscall, disk,
    /// connect, socket-wait, tcp, or network for the last three (default: offcpu,oncpu).
    #[arg(long)]
    pub signals: Option<String>,
    /// Only profile this process.
    #[arg(short, long)]
    pub pid: Option<u32>,
    /// Off-CPU waits at least this long always get stacks; shorter ones are sampled.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub offcpu_threshold: Option<String>,
    /// Lock waits at least this long always get stacks; shorter ones are sampled.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub lock_threshold: Option<String>,
    /// Syscalls at least this long get a stack and their file descriptor's kind.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub syscall_threshold: Option<String>,
    /// On-CPU sampling frequency per CPU, in Hz.
    #[arg(long, value_name = "HZ")]
    pub frequency: Option<u64>,
    /// Scheduler hook: auto (BTF tracepoint where available) or tracepoint.
    #[arg(long, value_enum)]
    pub sched_hook: Option<SchedHookArg>,
    /// Kernel BTF file (default: /sys/kernel/btf/vmlinux).
    #[arg(long, value_name = "PATH")]
    pub btf: Option<PathBuf>,
    /// TOML configuration file; flags override it. Its format, every key with its
    /// default: docs/config.md.
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// How often the agent drains the probes' maps.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub drain_interval: Option<String>,
    /// Threads tracked at once (classic-tracepoint path).
    #[arg(long, value_name = "N")]
    pub max_threads: Option<u32>,
    /// Distinct (thread, signal, state) entries per drain interval.
    #[arg(long, value_name = "N")]
    pub max_totals: Option<u32>,
    /// Distinct stack samples per drain interval.
    #[arg(long, value_name = "N")]
    pub max_samples: Option<u32>,
    /// Distinct stacks per drain interval.
    #[arg(long, value_name = "N")]
    pub max_stacks: Option<u32>,
    /// Sampled waits waiting for their user stack at once.
    #[arg(long, value_name = "N")]
    pub max_pending: Option<u32>,
    /// Label samples with their process's command line (values of secret-looking
    /// arguments such as --password=... or --token ... are redacted). Off by default.
    #[arg(long)]
    pub cmdline: bool,
    /// Profile the agent's own threads too (left out by default: they are the
    /// observer, not the observed).
    #[arg(long)]
    pub include_agent: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SchedHookArg {
    Auto,
    Tracepoint,
}

impl CommonArgs {
    /// Merges the flags with the configuration file and validates the result.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Config::build(
            file,
            Overrides {
                signals: self.signals.clone(),
                pid: self.pid,
                offcpu_threshold: self.offcpu_threshold.clone(),
                lock_threshold: self.lock_threshold.clone(),
                syscall_threshold: self.syscall_threshold.clone(),
                frequency_hz: self.frequency,
                sched_hook: self.sched_hook.map(|hook| match hook {
                    SchedHookArg::Auto => SchedHookChoice::Auto,
                    SchedHookArg::Tracepoint => SchedHookChoice::Tracepoint,
                }),
                btf: self.btf.clone(),
                max_threads: self.max_threads,
                max_totals: self.max_totals,
                max_samples: self.max_samples,
                max_stacks: self.max_stacks,
                max_pending: self.max_pending,
                drain_interval: self.drain_interval.clone(),
                cmdline: self.cmdline,
                include_agent: self.include_agent,
            },
        )
    }
}
