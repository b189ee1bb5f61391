//! `[run]`: how `stallscope-agent run` streams: the collector and the agent's identity,
//! TLS files, batch length, the spool and its bounds, flush and reconnection timing.
//! Merged like the rest of the configuration (flags over the file over the defaults)
//! and validated once, so the daemon never sees a value it must reject later.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{Config, ConfigError, check_range, file::RunFile, flag_duration};
use crate::{stream::spool::SpoolLimits, system};

/// Where batches go unless `--collector`, `STALLSCOPE_COLLECTOR` or `run.collector` say.
pub const DEFAULT_COLLECTOR: &str = "http://127.0.0.1:7070";
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/stallscope-agent/spool";
/// Where the probes are pinned by default (one directory per spool under it).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/stallscope";
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// `run`'s flags, as the command line gives them (all optional).
#[derive(Debug, Default, Clone)]
pub struct RunOverrides {
    pub collector: Option<String>,
    pub agent_id: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub batch_interval: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub pin_dir: Option<String>,
    pub spool_max_batches: Option<usize>,
    pub spool_max_bytes: Option<u64>,
    pub flush_timeout: Option<String>,
    pub max_backoff: Option<String>,
    pub duration: Option<String>,
    pub metrics_listen: Option<String>,
}

/// The client certificate, its key and the CA of the collector's certificate (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Name in the collector's certificate, if not the address's host.
    pub server_name: Option<String>,
}

/// The validated configuration of `run`: what it samples and where it streams.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub sampling: Config,
    pub collector: String,
    pub agent_id: String,
    pub tls: Option<TlsFiles>,
    pub batch_interval: Duration,
    pub spool_dir: PathBuf,
    /// The bpffs directory under which the probes are pinned (`None`: not pinned).
    pub pin_root: Option<PathBuf>,
    pub spool_limits: SpoolLimits,
    /// How long to keep sending after SIGTERM/SIGINT.
    pub flush_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Stop after this long (`None`: run until SIGTERM/SIGINT).
    pub duration: Option<Duration>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
}

/// A duration from the flag, else the file, else the default.
fn duration(
    flag: (&'static str, Option<&String>),
    file: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match flag {
        (name, Some(text)) => flag_duration(name, text),
        (_, None) => Ok(file.unwrap_or(default)),
    }
}

impl RunConfig {
    /// Merges `file` and `flags` (flags win) over the defaults and validates the result;
    /// `sampling` is the validated sampling configuration it runs with.
    pub fn build(
        sampling: Config,
        file: RunFile,
        flags: RunOverrides,
    ) -> Result<Self, ConfigError> {
        let collector = flags
            .collector
            .or(file.collector)
            .unwrap_or_else(|| DEFAULT_COLLECTOR.to_owned());
        let scheme_ok = ["http://", "https://"].iter().any(|scheme| {
            collector
                .strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
        if !scheme_ok {
            return Err(ConfigError::Collector {
                what: "run.collector (--collector)",
                value: collector,
            });
        }
        let tls = match (
            flags.tls_cert.or(file.tls_cert),
            flags.tls_key.or(file.tls_key),
            flags.tls_ca.or(file.tls_ca),
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert,
                key,
                ca,
                server_name: flags.tls_server_name.or(file.tls_server_name),
            }),
            (None, None, None) => None,
            (cert, key, ca) => {
                let given: Vec<&str> = [
                    (cert.is_some(), "tls_cert"),
                    (key.is_some(), "tls_key"),
                    (ca.is_some(), "tls_ca"),
                ]
                .into_iter()
                .filter_map(|(given, name)| given.then_some(name))
                .collect();
                return Err(ConfigError::TlsIncomplete {
                    given: given.join(" and "),
                });
            }
        };
        let batch_interval = duration(
            ("--batch-interval", flags.batch_interval.as_ref()),
            file.batch_interval,
            DEFAULT_BATCH_INTERVAL,
        )?;
        check_range(
            "run.batch_interval (--batch-interval)",
            "at least the drain interval and at most 1h",
            batch_interval >= sampling.drain_interval
                && batch_interval <= Duration::from_secs(3600),
            format!(
                "{batch_interval:?} (the drain interval is {:?})",
                sampling.drain_interval
            ),
        )?;
        let flush_timeout = duration(
            ("--flush-timeout", flags.flush_timeout.as_ref()),
            file.flush_timeout,
            DEFAULT_FLUSH_TIMEOUT,
        )?;
        check_range(
            "run.flush_timeout (--flush-timeout)",
            "at most 10m",
            flush_timeout <= Duration::from_secs(600),
            format!("{flush_timeout:?}"),
        )?;
        let max_backoff = duration(
            ("--max-backoff", flags.max_backoff.as_ref()),
            file.max_backoff,
            DEFAULT_MAX_BACKOFF,
        )?;
        check_range(
            "run.max_backoff (--max-backoff)",
            "between 250ms and 1h",
            (Duration::from_millis(250)..=Duration::from_secs(3600)).contains(&max_backoff),
            format!("{max_backoff:?}"),
        )?;
        let defaults = SpoolLimits::default();
        let max_batches = flags
            .spool_max_batches
            .or(file.spool_max_batches)
            .unwrap_or(defaults.max_batches);
        check_range(
            "run.spool_max_batches (--spool-max-batches)",
            "at least 1",
            max_batches >= 1,
            max_batches,
        )?;
        let max_bytes = flags
            .spool_max_bytes
            .or(file.spool_max_bytes)
            .unwrap_or(defaults.max_bytes);
        check_range(
            "run.spool_max_bytes (--spool-max-bytes)",
            "at least 1",
            max_bytes >= 1,
            max_bytes,
        )?;
        let metrics_listen = flags
            .metrics_listen
            .or(file.metrics_listen)
            .map(|text| {
                text.parse::<SocketAddr>()
                    .map_err(|_| ConfigError::OutOfRange {
                        what: "run.metrics_listen (--metrics-listen)",
                        rule: "an IP address and port, e.g. 0.0.0.0:7072 or 127.0.0.1:7072",
                        value: format!("`{text}`"),
                    })
            })
            .transpose()?;
        let pin_root = match flags.pin_dir.or(file.pin_dir) {
            None => Some(PathBuf::from(DEFAULT_PIN_ROOT)),
            Some(text) if text == "none" => None,
            Some(text) if text.starts_with('/') => Some(PathBuf::from(text)),
            Some(text) => {
                return Err(ConfigError::OutOfRange {
                    what: "run.pin_dir (--pin-dir)",
                    rule: "an absolute path on a bpffs, or `none`",
                    value: format!("`{text}`"),
                });
            }
        };
        let duration = flags
            .duration
            .as_deref()
            .map(|text| flag_duration("--duration", text))
            .transpose()?;
        Ok(Self {
            collector,
            agent_id: flags
                .agent_id
                .or(file.agent_id)
                .unwrap_or_else(system::hostname),
            tls,
            batch_interval,
            spool_dir: flags
                .spool_dir
                .or(file.spool_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR)),
            pin_root,
            spool_limits: SpoolLimits {
                max_batches,
                max_bytes,
            },
            flush_timeout,
            max_backoff,
            duration,
            metrics_listen,
            sampling,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};

    fn build(file: &str, flags: RunOverrides) -> Result<RunConfig, ConfigError> {
        let mut file = FileConfig::parse(file).map_err(|(line, message)| ConfigError::Parse {
            path: PathBuf::from("test.toml"),
            line,
            message,
        })?;
        let run = std::mem::take(&mut file.run);
        RunConfig::build(Config::build(file, Overrides::default())?, run, flags)
    }

    #[test]
    fn defaults() {
        let config = build("", RunOverrides::default()).expect("defaults are valid");
        assert_eq!(config.collector, DEFAULT_COLLECTOR);
        assert_eq!(config.batch_interval, DEFAULT_BATCH_INTERVAL);
        assert_eq!(config.spool_dir, PathBuf::from(DEFAULT_SPOOL_DIR));
        assert_eq!(
            (
                config.spool_limits.max_batches,
                config.spool_limits.max_bytes
            ),
            (
                SpoolLimits::default().max_batches,
                SpoolLimits::default().max_bytes
            )
        );
        assert_eq!(config.flush_timeout, DEFAULT_FLUSH_TIMEOUT);
        assert_eq!(config.max_backoff, DEFAULT_MAX_BACKOFF);
        assert_eq!(config.agent_id, system::hostname());
        assert!(config.tls.is_none() && config.duration.is_none());
    }

    #[test]
    fn the_file_sets_run_and_flags_override_it() {
        let file = r#"
            drain_interval = "500ms"
            [run]
            collector = "https://collector.example:7070"
            agent_id = "from-file"
            tls_cert = "/etc/agent.pem"
            tls_key = "/etc/agent.key"
            tls_ca = "/etc/ca.pem"
            batch_interval = "5s"
            spool_dir = "/tmp/spool"
            spool_max_batches = 100
            spool_max_bytes = 1048576
            flush_timeout = "2s"
            max_backoff = "10s"
            metrics_listen = "127.0.0.1:7072"
        "#;
        let config = build(file, RunOverrides::default()).expect("valid");
        assert_eq!(config.collector, "https://collector.example:7070");
        assert_eq!(config.agent_id, "from-file");
        assert_eq!(
            config.tls.as_ref().map(|tls| tls.ca.clone()),
            Some(PathBuf::from("/etc/ca.pem"))
        );
        assert_eq!(config.batch_interval, Duration::from_secs(5));
        assert_eq!(config.spool_limits.max_batches, 100);
        assert_eq!(config.spool_limits.max_bytes, 1 << 20);
        assert_eq!(config.flush_timeout, Duration::from_secs(2));
        assert_eq!(config.max_backoff, Duration::from_secs(10));
        assert_eq!(
            config.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7072)))
        );
        let flags = RunOverrides {
            agent_id: Some("from-flag".into()),
            batch_interval: Some("1s".into()),
            max_backoff: Some("2s".into()),
            duration: Some("1m".into()),
            ..RunOverrides::default()
        };
        let config = build(file, flags).expect("valid");
        assert_eq!(config.agent_id, "from-flag");
        assert_eq!(config.batch_interval, Duration::from_secs(1));
        assert_eq!(config.max_backoff, Duration::from_secs(2));
        assert_eq!(config.duration, Some(Duration::from_secs(60)));
        assert_eq!(config.spool_dir, PathBuf::from("/tmp/spool"));
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let err = build(
            "[run]\nbatch_interval = \"100ms\"\n",
            RunOverrides::default(),
        )
        .expect_err("shorter than the drain interval");
        let text = err.to_string();
        assert!(
            text.contains("run.batch_interval") && text.contains("100ms"),
            "{text}"
        );
        let err = build(
            "",
            RunOverrides {
                flush_timeout: Some("later".into()),
                ..RunOverrides::default()
            },
        )
        .expect_err("not a duration");
        assert!(
            err.to_string()
                .contains("invalid duration `later` for --flush-timeout"),
            "{err}"
        );
        let err = build(
            "[run]\ncollector = \"collector:7070\"\n",
            RunOverrides::default(),
        )
        .expect_err("no scheme");
        assert!(err.to_string().contains("`collector:7070`"), "{err}");
        let err = build("[run]\ntls_cert = \"/a.pem\"\n", RunOverrides::default())
            .expect_err("incomplete TLS");
        assert!(err.to_string().contains("only tls_cert given"), "{err}");
        let err = build("[run]\nmax_backoff = \"10ms\"\n", RunOverrides::default())
            .expect_err("too short");
        assert!(err.to_string().contains("run.max_backoff"), "{err}");
        let err = build(
            "[run]\nmetrics_listen = \"localhost\"\n",
            RunOverrides::default(),
        )
        .expect_err("no port");
        assert!(
            err.to_string()
                .contains("run.metrics_listen (--metrics-listen) must be an IP address and port"),
            "{err}"
        );
        let err = build("[run]\nspool = 3\n", RunOverrides::default()).expect_err("unknown key");
        assert!(err.to_string().contains("spool"), "{err}");
    }
}
