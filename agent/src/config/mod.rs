//! The agent's validated configuration: a TOML file (optional) merged with command-line
//! flags, checked once, so the rest of the agent never sees an invalid value.

pub mod cli;
mod duration;
mod file;
mod print;
#[cfg(test)]
mod reference;
mod run;
mod signals;

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

use self::duration::deserialize_duration;
pub use self::{
    duration::{flag_duration, parse_duration},
    file::{
        FileConfig, IdentityFile, LockFile, NetworkFile, OffCpuFile, OnCpuFile, ProbesFile,
        RunFile, SymbolsFile, SyscallFile,
    },
    print::duration_text,
    run::{RunConfig, RunOverrides, TlsFiles},
    signals::{SignalName, parse_signals},
};
use crate::{
    probes::{MapSizes, ProbeSettings, SchedHookChoice},
    process::{identity::ServiceRule, kubernetes},
    symbols::{resolver::ResolverSettings, symbolize},
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("unknown signal `{0}`: choose from {names}", names = SignalName::NAMES.join(", "))]
    UnknownSignal(String),
    #[error("no signal selected: pass --signals with at least one of {names}", names = SignalName::NAMES.join(", "))]
    NoSignals,
    #[error("invalid duration `{0}`: use a number with a unit, e.g. 500ms, 10s, 2m, 1h")]
    Duration(String),
    #[error(
        "invalid duration `{value}` for {flag}: use a number with a unit, e.g. 500ms, 10s, 2m, 1h"
    )]
    FlagDuration { flag: &'static str, value: String },
    #[error(
        "{what} `{value}` is not a collector address: use http://HOST:PORT (plaintext) or https://HOST:PORT (mTLS)"
    )]
    Collector { what: &'static str, value: String },
    #[error(
        "TLS needs the client certificate, its key and the collector's CA together (tls_cert, tls_key, tls_ca in [run], or --tls-cert, --tls-key, --tls-ca); only {given} given"
    )]
    TlsIncomplete { given: String },
    #[error("duration `{0}` has no unit: write {0}s for seconds (or ms, m, h)")]
    DurationUnit(String),
    #[error("duration `{0}` is not positive: give one above zero, e.g. 10s")]
    DurationNotPositive(String),
    #[error("{what}: {source}")]
    Setting {
        what: &'static str,
        source: Box<ConfigError>,
    },
    #[error("{what} must be {rule}, got {value}")]
    OutOfRange {
        what: &'static str,
        rule: &'static str,
        value: String,
    },
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} line {line}: {message} (the format: docs/config.md)")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("no process with pid {0}: check the pid (for example with `ps -p {0}`)")]
    NoSuchProcess(u32),
    #[error(
        "service rule {index} (`{service}`) matches nothing: give at least one of unit, process, executable, container_id, pod_uid, cgroup_prefix"
    )]
    EmptyServiceRule { index: usize, service: String },
}

/// Flags that can override the file, as the command line gives them (all optional).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub signals: Option<String>,
    pub pid: Option<u32>,
    pub offcpu_threshold: Option<String>,
    pub lock_threshold: Option<String>,
    pub syscall_threshold: Option<String>,
    pub syscall_sample_every: Option<u32>,
    pub overhead_budget: Option<f64>,
    pub frequency_hz: Option<u64>,
    pub sched_hook: Option<SchedHookChoice>,
    pub btf: Option<PathBuf>,
    pub max_threads: Option<u32>,
    pub max_totals: Option<u32>,
    pub max_samples: Option<u32>,
    pub max_stacks: Option<u32>,
    pub max_pending: Option<u32>,
    pub drain_interval: Option<String>,
    pub cmdline: bool,
    pub thread_ids: bool,
    pub include_agent: bool,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub signals: BTreeSet<SignalName>,
    pub target_pid: Option<u32>,
    pub offcpu_stack_threshold: Duration,
    pub lock_stack_threshold: Duration,
    pub syscall_slow_threshold: Duration,
    /// The syscall signal times one syscall in this many (1: all).
    pub syscall_sample_every: u32,
    /// The overhead guard's budget, percent of the host's CPU (0: no guard).
    pub overhead_budget_percent: f64,
    pub socket_wait_min: Duration,
    pub socket_stack_threshold: Duration,
    pub tcp_rtt_interval: Duration,
    pub oncpu_frequency_hz: u64,
    pub sched_hook: SchedHookChoice,
    pub btf: Option<PathBuf>,
    pub map_sizes: MapSizes,
    pub drain_interval: Duration,
    /// Collect (redacted) command lines.
    pub collect_cmdline: bool,
    /// Label samples with thread ids, not only thread names.
    pub thread_ids: bool,
    pub service_rules: Vec<ServiceRule>,
    pub read_deadline: Duration,
    /// Binaries with more DWARF (bytes) are symbolized from their symbol tables.
    pub dwarf_max: u64,
    /// Profile the agent's own process too.
    pub include_agent: bool,
    /// Where the kubelet keeps pod logs (names of pods and containers).
    pub pod_logs_dir: PathBuf,
    /// This agent's bpffs directory for pinned probes (`run` sets it once its spool is
    /// open; `None`: nothing pinned).
    pub pin_dir: Option<PathBuf>,
}

pub const DEFAULT_STACK_THRESHOLD: Duration = Duration::from_millis(1);
pub const DEFAULT_LOCK_THRESHOLD: Duration = Duration::from_micros(100);
pub const DEFAULT_SYSCALL_THRESHOLD: Duration = Duration::from_millis(1);
/// A socket syscall blocked for less than this did not wait for its peer (a loopback round trip
/// with a context switch takes longer).
pub const DEFAULT_SOCKET_WAIT_MIN: Duration = Duration::from_micros(10);
pub const DEFAULT_SOCKET_STACK_THRESHOLD: Duration = Duration::from_millis(1);
pub const DEFAULT_TCP_RTT_INTERVAL: Duration = Duration::from_millis(10);
pub const DEFAULT_FREQUENCY_HZ: u64 = 49;
pub const DEFAULT_DRAIN_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_READ_DEADLINE: Duration = Duration::from_secs(1);

fn check_range(
    what: &'static str,
    rule: &'static str,
    ok: bool,
    value: impl fmt::Display,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            what,
            rule,
            value: value.to_string(),
        })
    }
}

/// A threshold from the flag, else the file, else the default; between 1 us and 10 s.
fn threshold(
    what: &'static str,
    (flag_name, flag): (&'static str, Option<&String>),
    file: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let value = match flag {
        Some(text) => flag_duration(flag_name, text)?,
        None => file.unwrap_or(default),
    };
    check_range(
        what,
        "between 1us and 10s",
        (Duration::from_micros(1)..=Duration::from_secs(10)).contains(&value),
        format!("{value:?}"),
    )?;
    Ok(value)
}

impl Config {
    /// Merges `file` and `flags` (flags win) and validates the result.
    pub fn build(file: FileConfig, flags: Overrides) -> Result<Self, ConfigError> {
        let signals = match (&flags.signals, &file.signals) {
            (Some(list), _) => parse_signals(list)?,
            (None, Some(list)) => parse_signals(&list.join(","))?,
            (None, None) => SignalName::DEFAULT.into_iter().collect(),
        };
        let offcpu_stack_threshold = threshold(
            "offcpu.stack_threshold (--offcpu-threshold)",
            ("--offcpu-threshold", flags.offcpu_threshold.as_ref()),
            file.offcpu.stack_threshold,
            DEFAULT_STACK_THRESHOLD,
        )?;
        let lock_stack_threshold = threshold(
            "lock.stack_threshold (--lock-threshold)",
            ("--lock-threshold", flags.lock_threshold.as_ref()),
            file.lock.stack_threshold,
            DEFAULT_LOCK_THRESHOLD,
        )?;
        let syscall_slow_threshold = threshold(
            "syscall.slow_threshold (--syscall-threshold)",
            ("--syscall-threshold", flags.syscall_threshold.as_ref()),
            file.syscall.slow_threshold,
            DEFAULT_SYSCALL_THRESHOLD,
        )?;
        let socket_wait_min = threshold(
            "network.min_wait",
            ("", None),
            file.network.min_wait,
            DEFAULT_SOCKET_WAIT_MIN,
        )?;
        let socket_stack_threshold = threshold(
            "network.stack_threshold",
            ("", None),
            file.network.stack_threshold,
            DEFAULT_SOCKET_STACK_THRESHOLD,
        )?;
        let tcp_rtt_interval = threshold(
            "network.rtt_interval",
            ("", None),
            file.network.rtt_interval,
            DEFAULT_TCP_RTT_INTERVAL,
        )?;
        let syscall_sample_every = flags
            .syscall_sample_every
            .or(file.syscall.sample_every)
            .unwrap_or(1);
        check_range(
            "syscall.sample_every (--syscall-sample-every)",
            "between 1 (time every syscall) and 1024",
            (1..=1024).contains(&syscall_sample_every),
            syscall_sample_every,
        )?;
        let overhead_budget_percent = flags
            .overhead_budget
            .or(file.guard.budget_percent)
            .unwrap_or(0.0);
        check_range(
            "guard.budget_percent (--overhead-budget)",
            "between 0 (no guard) and 100 percent of the host's CPU",
            (0.0..=100.0).contains(&overhead_budget_percent),
            overhead_budget_percent,
        )?;
        let oncpu_frequency_hz = flags
            .frequency_hz
            .or(file.oncpu.frequency_hz)
            .unwrap_or(DEFAULT_FREQUENCY_HZ);
        check_range(
            "oncpu.frequency_hz (--frequency)",
            "between 1 and 10000 Hz",
            (1..=10_000).contains(&oncpu_frequency_hz),
            oncpu_frequency_hz,
        )?;
        let drain_interval = match &flags.drain_interval {
            Some(text) => flag_duration("--drain-interval", text)?,
            None => file.drain_interval.unwrap_or(DEFAULT_DRAIN_INTERVAL),
        };
        check_range(
            "drain_interval (--drain-interval)",
            "between 100ms and 10m",
            (Duration::from_millis(100)..=Duration::from_secs(600)).contains(&drain_interval),
            format!("{drain_interval:?}"),
        )?;
        let defaults = MapSizes::default();
        let size = |what: &'static str, flag: Option<u32>, file: Option<u32>, default: u32| {
            let value = flag.or(file).unwrap_or(default);
            check_range(
                what,
                "between 16 and 4194304 entries",
                (16..=4_194_304).contains(&value),
                value,
            )
            .map(|()| value)
        };
        let map_sizes = MapSizes {
            threads: size(
                "probes.max_threads (--max-threads)",
                flags.max_threads,
                file.probes.max_threads,
                defaults.threads,
            )?,
            totals: size(
                "probes.max_totals (--max-totals)",
                flags.max_totals,
                file.probes.max_totals,
                defaults.totals,
            )?,
            samples: size(
                "probes.max_samples (--max-samples)",
                flags.max_samples,
                file.probes.max_samples,
                defaults.samples,
            )?,
            stacks: size(
                "probes.max_stacks (--max-stacks)",
                flags.max_stacks,
                file.probes.max_stacks,
                defaults.stacks,
            )?,
            pending: size(
                "probes.max_pending (--max-pending)",
                flags.max_pending,
                file.probes.max_pending,
                defaults.pending,
            )?,
            unwind_rows: {
                let rows = file
                    .probes
                    .unwind_table_rows
                    .unwrap_or(defaults.unwind_rows);
                check_range(
                    "probes.unwind_table_rows",
                    "0 (no unwind tables) or between 1024 and 16777216 rows",
                    rows == 0 || (1024..=16_777_216).contains(&rows),
                    rows,
                )?;
                rows
            },
            unwind_processes: size(
                "probes.unwind_processes",
                None,
                file.probes.unwind_processes,
                defaults.unwind_processes,
            )?,
        };
        if let Some(pid) = flags.pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            return Err(ConfigError::NoSuchProcess(pid));
        }
        if let Some((index, rule)) = file
            .identity
            .service
            .iter()
            .enumerate()
            .find(|(_, rule)| !rule.has_matcher())
        {
            return Err(ConfigError::EmptyServiceRule {
                index: index + 1,
                service: rule.service.clone(),
            });
        }
        let read_deadline = file.identity.read_deadline.unwrap_or(DEFAULT_READ_DEADLINE);
        check_range(
            "identity.read_deadline",
            "between 10ms and 60s",
            (Duration::from_millis(10)..=Duration::from_secs(60)).contains(&read_deadline),
            format!("{read_deadline:?}"),
        )?;
        let dwarf_max_mb = file
            .symbols
            .dwarf_max_mb
            .unwrap_or(symbolize::DWARF_MAX_BYTES >> 20);
        check_range(
            "symbols.dwarf_max_mb",
            "at most 65536 (64 GB)",
            dwarf_max_mb <= 1 << 16,
            dwarf_max_mb,
        )?;
        Ok(Self {
            signals,
            target_pid: flags.pid,
            offcpu_stack_threshold,
            lock_stack_threshold,
            syscall_slow_threshold,
            syscall_sample_every,
            overhead_budget_percent,
            socket_wait_min,
            socket_stack_threshold,
            tcp_rtt_interval,
            oncpu_frequency_hz,
            sched_hook: flags
                .sched_hook
                .or(file.probes.sched_hook)
                .unwrap_or_default(),
            btf: flags.btf.or(file.probes.btf),
            map_sizes,
            drain_interval,
            collect_cmdline: flags.cmdline || file.identity.cmdline.unwrap_or(false),
            thread_ids: flags.thread_ids || file.identity.thread_ids.unwrap_or(false),
            service_rules: file.identity.service,
            pod_logs_dir: file
                .identity
                .pod_logs_dir
                .unwrap_or_else(|| PathBuf::from(kubernetes::DEFAULT_POD_LOGS_DIR)),
            read_deadline,
            dwarf_max: dwarf_max_mb << 20,
            include_agent: flags.include_agent || file.include_agent.unwrap_or(false),
            pin_dir: None,
        })
    }

    /// How the agent reads and names processes.
    pub fn resolver_settings(&self) -> ResolverSettings {
        ResolverSettings {
            collect_cmdline: self.collect_cmdline,
            thread_ids: self.thread_ids,
            service_rules: self.service_rules.clone(),
            read_deadline: self.read_deadline,
            target_pid: self.target_pid,
            dwarf_max: self.dwarf_max,
            pod_logs_dir: self.pod_logs_dir.clone(),
            ..ResolverSettings::default()
        }
    }

    pub fn wants(&self, signal: SignalName) -> bool {
        self.signals.contains(&signal)
    }

    pub fn probe_settings(&self) -> ProbeSettings {
        ProbeSettings {
            signals: self.signals.iter().map(|s| s.signal()).collect(),
            offcpu_stack_threshold: self.offcpu_stack_threshold,
            lock_stack_threshold: self.lock_stack_threshold,
            syscall_slow_threshold: self.syscall_slow_threshold,
            syscall_sample_every: self.syscall_sample_every,
            socket_wait_min: self.socket_wait_min,
            socket_stack_threshold: self.socket_stack_threshold,
            tcp_rtt_interval: self.tcp_rtt_interval,
            oncpu_frequency_hz: self.oncpu_frequency_hz,
            target_tgid: self.target_pid,
            exclude_tgid: (!self.include_agent).then(std::process::id),
            sched_hook: self.sched_hook,
            btf_path: self.btf.clone(),
            map_sizes: self.map_sizes,
            pin_dir: self.pin_dir.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_ranges_are_checked() {
        let file: FileConfig = toml::from_str(
            r#"
            signals = ["oncpu"]
            drain_interval = "2s"
            [offcpu]
            stack_threshold = "5ms"
            [oncpu]
            frequency_hz = 99
            [probes]
            max_threads = 1024
            "#,
        )
        .expect("valid toml");
        let config = Config::build(
            file,
            Overrides {
                signals: Some("offcpu".into()),
                ..Overrides::default()
            },
        )
        .expect("valid config");
        assert!(config.wants(SignalName::OffCpu) && !config.wants(SignalName::OnCpu));
        assert_eq!(config.offcpu_stack_threshold, Duration::from_millis(5));
        assert_eq!(config.oncpu_frequency_hz, 99);
        assert_eq!(config.map_sizes.threads, 1024);
        assert_eq!(config.drain_interval, Duration::from_secs(2));

        let bad = Config::build(
            FileConfig::default(),
            Overrides {
                frequency_hz: Some(0),
                ..Overrides::default()
            },
        );
        assert!(bad.is_err());
    }

    #[test]
    fn identity_section() {
        let file: FileConfig = toml::from_str(
            r#"
            [identity]
            cmdline = true
            read_deadline = "250ms"
            [[identity.service]]
            service = "shop"
            unit = "shop.service"
            "#,
        )
        .expect("valid toml");
        let config = Config::build(file, Overrides::default()).expect("valid config");
        assert!(config.collect_cmdline);
        assert_eq!(config.read_deadline, Duration::from_millis(250));
        assert_eq!(config.service_rules[0].service, "shop");

        let empty: FileConfig =
            toml::from_str("[[identity.service]]\nservice = \"x\"\n").expect("valid toml");
        let err = Config::build(empty, Overrides::default()).expect_err("no matcher");
        assert!(err.to_string().contains("matches nothing"), "{err}");
    }

    #[test]
    fn symbols_section() {
        let config = Config::build(FileConfig::default(), Overrides::default()).expect("defaults");
        assert_eq!(config.dwarf_max, symbolize::DWARF_MAX_BYTES);
        let file: FileConfig =
            toml::from_str("[symbols]\ndwarf_max_mb = 256\n").expect("valid toml");
        let config = Config::build(file, Overrides::default()).expect("valid config");
        assert_eq!(config.resolver_settings().dwarf_max, 256 << 20);
        let huge: FileConfig =
            toml::from_str("[symbols]\ndwarf_max_mb = 100000\n").expect("valid toml");
        let err = Config::build(huge, Overrides::default()).expect_err("out of range");
        assert!(err.to_string().contains("symbols.dwarf_max_mb"), "{err}");
    }

    #[test]
    fn missing_pid_is_reported() {
        let err = Config::build(
            FileConfig::default(),
            Overrides {
                pid: Some(u32::MAX - 1),
                ..Overrides::default()
            },
        )
        .expect_err("no such pid");
        assert!(err.to_string().contains("no process with pid"), "{err}");
    }
}
