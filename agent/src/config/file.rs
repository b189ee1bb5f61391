//! The TOML configuration file (`--config`): every key optional, unknown keys refused,
//! durations written as `500ms`, `10s`, `2m`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, deserialize_duration};
use crate::{probes::SchedHookChoice, process::identity::ServiceRule};

/// The TOML configuration file. Every field is optional; flags override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Signals to capture, e.g. `["offcpu", "oncpu"]`.
    pub signals: Option<Vec<String>>,
    #[serde(default)]
    pub offcpu: OffCpuFile,
    #[serde(default)]
    pub oncpu: OnCpuFile,
    #[serde(default)]
    pub lock: LockFile,
    #[serde(default)]
    pub syscall: SyscallFile,
    #[serde(default)]
    pub network: NetworkFile,
    #[serde(default)]
    pub probes: ProbesFile,
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub drain_interval: Option<Duration>,
    #[serde(default)]
    pub identity: IdentityFile,
    #[serde(default)]
    pub symbols: SymbolsFile,
    /// Profile the agent's own threads too (default false: the agent leaves itself out).
    pub include_agent: Option<bool>,
    /// `[run]`: how `stallscope-agent run` streams (ignored by `record` and `check`).
    #[serde(default)]
    pub run: RunFile,
    #[serde(default)]
    pub guard: GuardFile,
}

/// `[guard]`: the overhead guard.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardFile {
    /// Share of the host's CPU (all its CPUs), in percent, the agent may use: its own CPU
    /// time and its probes' run time. Above it the agent samples its costliest signal
    /// more sparsely until it is back under. 0 (the default): no guard.
    pub budget_percent: Option<f64>,
}

/// `[symbols]`: how user stacks are symbolized.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymbolsFile {
    /// Binaries with more DWARF than this many megabytes are symbolized from their
    /// symbol tables (function names only); bounds the memory one symbolization takes.
    /// 0: never read DWARF.
    pub dwarf_max_mb: Option<u64>,
}

/// `[identity]`: how processes are named and what is read about them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// Collect command lines (secret-looking values redacted). Off by default.
    pub cmdline: Option<bool>,
    /// Label samples with thread ids (`tid`) as well as thread names. Off by default:
    /// every thread id is a series of its own.
    pub thread_ids: Option<bool>,
    /// `[[identity.service]]` rules naming the `service` label; the first match wins.
    #[serde(default)]
    pub service: Vec<ServiceRule>,
    /// Deadline of one read of another process's files (`/proc`, its binaries).
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub read_deadline: Option<Duration>,
    /// The kubelet's pod log directories (`<namespace>_<pod>_<uid>/<container>/`), which
    /// name the pods and containers of processes in a pod (default /var/log/pods).
    pub pod_logs_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffCpuFile {
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub stack_threshold: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub stack_threshold: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallFile {
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub slow_threshold: Option<Duration>,
    /// Time one syscall in this many (every one is counted); 1 times them all.
    pub sample_every: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    /// Socket syscalls blocked for less than this are not socket waits.
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub min_wait: Option<Duration>,
    /// Socket waits at least this long always get stacks; shorter ones are sampled.
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub stack_threshold: Option<Duration>,
    /// A TCP connection's smoothed RTT is sampled at most once per this interval.
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub rtt_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnCpuFile {
    pub frequency_hz: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesFile {
    pub sched_hook: Option<SchedHookChoice>,
    pub btf: Option<PathBuf>,
    pub max_threads: Option<u32>,
    pub max_totals: Option<u32>,
    pub max_samples: Option<u32>,
    pub max_stacks: Option<u32>,
    pub max_pending: Option<u32>,
    /// Rows of unwind tables for binaries without frame pointers (16 bytes each); 0
    /// turns tables off.
    pub unwind_table_rows: Option<u32>,
    /// Processes whose stacks are unwound by table at once.
    pub unwind_processes: Option<u32>,
}

/// `[run]` in the TOML file. Every key is optional; flags override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// `https://HOST:PORT` (mTLS) or `http://HOST:PORT` (plaintext).
    pub collector: Option<String>,
    /// Identity on plaintext connections (under mTLS the certificate names the agent).
    pub agent_id: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub batch_interval: Option<Duration>,
    pub spool_dir: Option<PathBuf>,
    /// bpffs directory for the pinned probes, or `none`.
    pub pin_dir: Option<String>,
    pub spool_max_batches: Option<usize>,
    pub spool_max_bytes: Option<u64>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub flush_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub max_backoff: Option<Duration>,
    /// `ADDR:PORT` of the `/metrics`, `/healthz` and `/readyz` listener (off unless set).
    pub metrics_listen: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, message)| ConfigError::Parse {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses the text of a configuration file; an error carries its line (1-based) and
    /// names the key it is about.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        toml::from_str(text).map_err(|err: toml::de::Error| {
            let at = err.span().map_or(0, |span| span.start.min(text.len()));
            let line = text[..at].matches('\n').count() + 1;
            let message = err.message().trim_end();
            let message = match err
                .span()
                .and_then(|span| stallscope_proto::toml_key::key_at(text, span.start))
            {
                Some(key) => format!("{key}: {message}"),
                None => message.to_owned(),
            };
            (line, message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_the_key() {
        let path =
            std::env::temp_dir().join(format!("stallscope-keys-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "drain_interval = \"2s\"\n[run]\nbatch_interval = \"soon\"\n",
        )
        .expect("write");
        let err = FileConfig::load(&path).expect_err("bad duration");
        assert!(
            err.to_string()
                .contains("run.batch_interval: invalid duration `soon`"),
            "{err}"
        );
        std::fs::write(&path, "[run]\nspool_max = 3\n").expect("write");
        let err = FileConfig::load(&path).expect_err("unknown key");
        assert!(
            err.to_string().contains("run.spool_max: unknown field"),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("sampling = 3").expect_err("unknown key");
        assert!(err.to_string().contains("sampling"), "{err}");
    }
}
