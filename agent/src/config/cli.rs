//! Command-line interface of `stallscope-agent`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{Config, ConfigError, FileConfig, Overrides, RunConfig, RunOverrides, SignalName},
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
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// How long to record, with a unit: 10s, 500ms, 2m.
    #[arg(short, long, default_value = "10s", allow_hyphen_values = true)]
    pub duration: String,
    /// Output file.
    #[arg(short, long, required_unless_present = "print_config")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each is a command-line switch of its own (clap flags)"
)]
pub struct CommonArgs {
    /// Signals to capture, comma-separated: offcpu, oncpu, runqueue, lock, syscall, disk,
    /// connect, socket-wait, tcp, or network for the last three (default: offcpu,oncpu for
    /// record; offcpu,oncpu,runqueue,lock,disk,network for run).
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
    /// Time one syscall in N, at random (every one is still counted; durations are
    /// scaled to the count): cuts the syscall signal's cost on syscall-heavy hosts.
    #[arg(long, value_name = "N")]
    pub syscall_sample_every: Option<u32>,
    /// Overhead guard: the share of the host's CPU (all its CPUs), in percent, the agent
    /// may use (its own CPU time and its probes' run time); above it the costliest signal
    /// is sampled more sparsely until the agent is back under. 0: no guard.
    #[arg(long, value_name = "PERCENT")]
    pub overhead_budget: Option<f64>,
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
    /// Print the effective configuration (the file and the flags merged, defaults filled
    /// in) as a TOML file that `--config` accepts, and exit.
    #[arg(long)]
    pub print_config: bool,
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
    /// Label samples with their thread's id (`tid`) as well as its name. Off by default:
    /// threads of one process with the same name are merged, since on a host that starts
    /// threads all day every thread id is a series of its own.
    #[arg(long)]
    pub thread_ids: bool,
    /// Profile the agent's own threads too (left out by default: they are the
    /// observer, not the observed).
    #[arg(long)]
    pub include_agent: bool,
}

#[derive(Debug, Args)]
#[command(after_help = RUN_DEFAULTS)]
pub struct RunArgs {
    /// Collector address: `https://HOST:PORT` (mTLS) or `http://HOST:PORT` (plaintext, when
    /// the collector allows it). Default: `run.collector` in --config, else
    /// `http://127.0.0.1:7070`.
    #[arg(long, env = "STALLSCOPE_COLLECTOR")]
    pub collector: Option<String>,
    /// Agent identity on plaintext connections (under mTLS the certificate's name is used).
    /// Default: the host name.
    #[arg(long)]
    pub agent_id: Option<String>,
    /// Client certificate (PEM) for mTLS; needs --tls-key and --tls-ca (or the `[run]`
    /// section's `tls_key` and `tls_ca`).
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signed the collector's certificate.
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// Name in the collector's certificate, if not the address's host.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Length of one batch (default 10s).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub batch_interval: Option<String>,
    /// Directory of the on-disk spool of unacknowledged batches (default
    /// /var/lib/stallscope-agent/spool).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// bpffs directory where the probes' maps and links are pinned so that a killed or
    /// crashed agent's successor adopts them and loses nothing; `none` pins nothing
    /// (default /sys/fs/bpf/stallscope).
    #[arg(long, value_name = "DIR|none")]
    pub pin_dir: Option<String>,
    /// Most batches kept in the spool; the oldest are dropped (and counted) beyond it
    /// (default 8640).
    #[arg(long, value_name = "N")]
    pub spool_max_batches: Option<usize>,
    /// Most bytes kept in the spool (default 268435456).
    #[arg(long, value_name = "BYTES")]
    pub spool_max_bytes: Option<u64>,
    /// How long to keep sending after SIGTERM/SIGINT before exiting (default 5s).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub flush_timeout: Option<String>,
    /// Longest wait between reconnection attempts (default 30s).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub max_backoff: Option<String>,
    /// Stop after this long (default: run until SIGTERM/SIGINT).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub duration: Option<String>,
    /// Serve Prometheus metrics (/metrics) and health (/healthz, /readyz) over HTTP on
    /// this address, e.g. 0.0.0.0:7072 (default: off).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Where `run`'s settings come from, printed after its `--help`.
const RUN_DEFAULTS: &str = "Every run option can also be set in the [run] section of the --config file \
(collector, agent_id, tls_cert, tls_key, tls_ca, tls_server_name, batch_interval, spool_dir, \
pin_dir, spool_max_batches, spool_max_bytes, flush_timeout, max_backoff, metrics_listen); flags override the file.";

impl RunArgs {
    /// Merges the flags with the configuration file (its sampling settings and its
    /// `[run]` section) and validates the result.
    pub fn config(&self) -> Result<RunConfig, ConfigError> {
        let mut file = self.common.file()?;
        let run_file = std::mem::take(&mut file.run);
        if self.common.signals.is_none() && file.signals.is_none() {
            file.signals = Some(
                SignalName::RUN_DEFAULT
                    .iter()
                    .map(|signal| signal.as_str().to_owned())
                    .collect(),
            );
        }
        let sampling = self.common.build(file)?;
        RunConfig::build(
            sampling,
            run_file,
            RunOverrides {
                collector: self.collector.clone(),
                agent_id: self.agent_id.clone(),
                tls_cert: self.tls_cert.clone(),
                tls_key: self.tls_key.clone(),
                tls_ca: self.tls_ca.clone(),
                tls_server_name: self.tls_server_name.clone(),
                batch_interval: self.batch_interval.clone(),
                spool_dir: self.spool_dir.clone(),
                pin_dir: self.pin_dir.clone(),
                spool_max_batches: self.spool_max_batches,
                spool_max_bytes: self.spool_max_bytes,
                flush_timeout: self.flush_timeout.clone(),
                max_backoff: self.max_backoff.clone(),
                duration: self.duration.clone(),
                metrics_listen: self.metrics_listen.clone(),
            },
        )
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SchedHookArg {
    Auto,
    Tracepoint,
}

impl CommonArgs {
    /// Merges the flags with the configuration file and validates the result.
    pub fn config(&self) -> Result<Config, ConfigError> {
        self.build(self.file()?)
    }

    /// The configuration file, if one was given.
    fn file(&self) -> Result<FileConfig, ConfigError> {
        match &self.config {
            Some(path) => FileConfig::load(path),
            None => Ok(FileConfig::default()),
        }
    }

    /// Merges the flags with `file` and validates the result.
    fn build(&self, file: FileConfig) -> Result<Config, ConfigError> {
        Config::build(
            file,
            Overrides {
                signals: self.signals.clone(),
                pid: self.pid,
                offcpu_threshold: self.offcpu_threshold.clone(),
                lock_threshold: self.lock_threshold.clone(),
                syscall_threshold: self.syscall_threshold.clone(),
                syscall_sample_every: self.syscall_sample_every,
                overhead_budget: self.overhead_budget,
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
                thread_ids: self.thread_ids,
                include_agent: self.include_agent,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Command {
        let cli =
            Cli::try_parse_from(std::iter::once("stallscope-agent").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{e}"));
        cli.command
    }

    #[test]
    fn run_captures_what_why_needs_by_default_and_record_stays_light() {
        let Command::Run(run) = parse(&["run"]) else {
            panic!("not run");
        };
        let signals = run.config().expect("valid").sampling.signals;
        assert_eq!(
            signals.into_iter().collect::<Vec<_>>(),
            SignalName::RUN_DEFAULT.to_vec()
        );
        let Command::Run(run) = parse(&["run", "--signals", "offcpu"]) else {
            panic!("not run");
        };
        assert_eq!(run.config().expect("valid").sampling.signals.len(), 1);
        let Command::Record(record) = parse(&["record", "--duration", "1s", "-o", "x.folded"])
        else {
            panic!("not record");
        };
        assert_eq!(
            record
                .common
                .config()
                .expect("valid")
                .signals
                .into_iter()
                .collect::<Vec<_>>(),
            SignalName::DEFAULT.to_vec()
        );
    }
}
