//! The collector's validated configuration: command-line flags (or environment
//! variables) merged over an optional TOML file, checked once at start-up.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use thiserror::Error;

mod print;

use self::print::effective_toml;
pub use crate::tls::TlsFiles;
use crate::{
    batch::BatchLimits,
    detect::{DetectArgs, DetectFile, DetectSettings},
    http::HttpSettings,
    identity::QueryTokens,
    storage::{Retention, parse_span},
    windows::alertmanager::LabelRule,
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded SQLite under `--data-dir` (one machine).
    Sqlite,
    /// ClickHouse at `--clickhouse-url` (a fleet; any number of collector replicas).
    Clickhouse,
}

#[derive(Debug, Parser)]
#[expect(clippy::struct_excessive_bools, reason = "command-line switches")]
#[command(
    name = "stallscope-collector",
    version,
    about = "stallscope's collector: receives agent streams (mTLS), stores them exactly once (SQLite or ClickHouse), answers queries (bearer tokens)"
)]
pub struct Cli {
    /// Address to listen on for ingest and queries.
    #[arg(long, env = "STALLSCOPE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Storage backend.
    #[arg(long, value_enum)]
    pub storage: Option<Backend>,
    /// SQLite: directory of the database.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// ClickHouse HTTP URL, e.g. `http://127.0.0.1:8123`.
    #[arg(long, value_name = "URL")]
    pub clickhouse_url: Option<String>,
    /// ClickHouse database.
    #[arg(long, value_name = "NAME")]
    pub clickhouse_database: Option<String>,
    /// Resolution tiers, finest first: RESOLUTION:KEEP,... (default 10s:24h,1m:14d).
    #[arg(long)]
    pub retention: Option<String>,
    /// How often retention and downsampling run.
    #[arg(long, value_name = "DURATION")]
    pub maintenance_interval: Option<String>,
    /// Server certificate (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs agents' client certificates; agents are identified by them.
    #[arg(long, value_name = "PATH")]
    pub client_ca: Option<PathBuf>,
    /// Serve without TLS (agents then name themselves with a header). Loopback only,
    /// unless --allow-plaintext-non-loopback.
    #[arg(long)]
    pub plaintext: bool,
    /// Allow --plaintext on an address other than loopback.
    #[arg(long)]
    pub allow_plaintext_non_loopback: bool,
    /// File of query bearer tokens, one per line.
    #[arg(long, value_name = "PATH")]
    pub query_token_file: Option<PathBuf>,
    /// Query bearer tokens, comma-separated.
    #[arg(long, env = "STALLSCOPE_QUERY_TOKENS", hide_env_values = true)]
    pub query_tokens: Option<String>,
    /// Answer queries without a token.
    #[arg(long)]
    pub insecure_no_query_auth: bool,
    /// Largest gRPC message accepted, in bytes (compressed batch frames).
    #[arg(long, value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest decompressed batch, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_batch_bytes: Option<u64>,
    /// Most concurrent agent streams.
    #[arg(long, value_name = "N")]
    pub max_streams: Option<usize>,
    /// After SIGTERM or SIGINT, how long open calls may take to finish before the
    /// collector exits anyway (agents' streams end at once and reconnect later).
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// TOML configuration file; flags override it.
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (the file and the flags merged, defaults filled
    /// in) as a TOML file that `--config` accepts, and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Address of the HTTP listener (Alertmanager's webhook at /webhook/alertmanager);
    /// off unless set. TLS and bearer tokens as for queries.
    #[arg(long, value_name = "ADDR", env = "STALLSCOPE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Largest HTTP request body, in bytes (default 4 MiB).
    #[arg(long, value_name = "BYTES")]
    pub http_max_body_bytes: Option<usize>,
    /// With TLS: the HTTP listener refuses clients without a certificate signed by
    /// --client-ca (by default a certificate is verified when one is presented).
    #[arg(long)]
    pub http_require_client_cert: bool,
    /// Alert labels naming a window's service, the first present wins
    /// (default service,app,job,container,pod).
    #[arg(long, value_name = "LABEL,...", value_delimiter = ',')]
    pub alertmanager_service_labels: Option<Vec<String>>,
    /// Alert labels naming a window's host, the first present wins, a `:port` stripped
    /// (default instance,host,node,nodename).
    #[arg(long, value_name = "LABEL,...", value_delimiter = ',')]
    pub alertmanager_host_labels: Option<Vec<String>>,
    #[command(flatten)]
    pub detect: DetectArgs,
    /// Address of the web UI (services, timelines, windows, flame graphs); off unless
    /// set. TLS as for queries; signed in with a query token.
    #[arg(long, value_name = "ADDR", env = "STALLSCOPE_UI_LISTEN")]
    pub ui_listen: Option<SocketAddr>,
}

/// The TOML file: the same settings as the flags, all optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub storage: Option<Backend>,
    pub data_dir: Option<PathBuf>,
    pub clickhouse_url: Option<String>,
    pub clickhouse_database: Option<String>,
    pub retention: Option<String>,
    pub maintenance_interval: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub plaintext: Option<bool>,
    pub allow_plaintext_non_loopback: Option<bool>,
    pub query_token_file: Option<PathBuf>,
    pub insecure_no_query_auth: Option<bool>,
    pub max_message_bytes: Option<usize>,
    pub max_batch_bytes: Option<u64>,
    pub max_streams: Option<usize>,
    pub http_listen: Option<SocketAddr>,
    pub http_max_body_bytes: Option<usize>,
    pub http_require_client_cert: Option<bool>,
    pub alertmanager_service_labels: Option<Vec<String>>,
    pub alertmanager_host_labels: Option<Vec<String>>,
    pub shutdown_timeout: Option<String>,
    /// Automatic degradation windows (`[detect]`).
    pub detect: Option<DetectFile>,
    pub ui_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub enum StorageConfig {
    Sqlite { data_dir: PathBuf },
    ClickHouse { url: String, database: String },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub storage: StorageConfig,
    pub retention: Retention,
    pub maintenance_interval: Duration,
    /// `None`: plaintext (explicitly allowed).
    pub tls: Option<TlsFiles>,
    pub tokens: QueryTokens,
    pub max_message_bytes: usize,
    pub limits: BatchLimits,
    pub max_streams: usize,
    /// The HTTP listener, when `--http-listen` is set.
    pub http: Option<HttpSettings>,
    pub shutdown_timeout: Duration,
    /// Automatic degradation windows.
    pub detect: DetectSettings,
    /// The web UI, when `--ui-listen` is set.
    pub ui: Option<UiSettings>,
}

/// How long open calls may run on after the shutdown signal, by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(source.kind(), format!("{what}: {source}")),
    })
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        Self::load(cli).map(|(config, _)| config)
    }

    /// The validated configuration and its effective TOML file (`--print-config`).
    pub fn load(cli: &Cli) -> Result<(Self, toml::Table), ConfigError> {
        let (file, detect) = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let parse_error = |err: toml::de::Error| {
                    let message = err.message().trim_end().replace('\n', " ");
                    let message = match err
                        .span()
                        .and_then(|span| stallscope_proto::toml_key::key_at(&text, span.start))
                    {
                        Some(key) => format!("{key}: {message}"),
                        None => message,
                    };
                    ConfigError::Parse {
                        path: path.clone(),
                        message,
                    }
                };
                let file: FileConfig = toml::from_str(&text).map_err(parse_error)?;
                let mut table: toml::Table = toml::from_str(&text).map_err(parse_error)?;
                let detect = match table.remove("detect") {
                    Some(toml::Value::Table(detect)) => Some(detect),
                    _ => None,
                };
                (file, detect)
            }
            None => (FileConfig::default(), None),
        };
        let config = Self::build(cli, file.clone())?;
        let effective = effective_toml(cli, &file, detect.as_ref(), &config);
        Ok((config, effective))
    }

    pub fn build(cli: &Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let http_keys = HttpKeys::of(&file);
        let invalid = |m: String| ConfigError::Invalid(m);
        let listen = cli.listen.or(file.listen).unwrap_or_else(|| {
            DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7070)))
        });
        let storage = match cli.storage.or(file.storage).unwrap_or(Backend::Sqlite) {
            Backend::Sqlite => StorageConfig::Sqlite {
                data_dir: cli
                    .data_dir
                    .clone()
                    .or(file.data_dir)
                    .unwrap_or_else(|| PathBuf::from("/var/lib/stallscope")),
            },
            Backend::Clickhouse => StorageConfig::ClickHouse {
                url: cli
                    .clickhouse_url
                    .clone()
                    .or(file.clickhouse_url)
                    .ok_or_else(|| invalid("--storage clickhouse needs --clickhouse-url, e.g. http://127.0.0.1:8123".to_owned()))?,
                database: cli
                    .clickhouse_database
                    .clone()
                    .or(file.clickhouse_database)
                    .unwrap_or_else(|| "stallscope".to_owned()),
            },
        };
        let retention: Retention = match cli.retention.clone().or(file.retention) {
            Some(text) => text.parse().map_err(invalid)?,
            None => Retention::default(),
        };
        let maintenance_interval = match cli
            .maintenance_interval
            .clone()
            .or(file.maintenance_interval)
        {
            Some(text) => parse_span(&text).map_err(invalid)?,
            None => Duration::from_secs(300),
        };
        let plaintext = cli.plaintext || file.plaintext.unwrap_or(false);
        let cert = cli.tls_cert.clone().or(file.tls_cert);
        let key = cli.tls_key.clone().or(file.tls_key);
        let ca = cli.client_ca.clone().or(file.client_ca);
        let tls = match (plaintext, cert, key, ca) {
            (true, None, None, None) => {
                let allow_remote = cli.allow_plaintext_non_loopback
                    || file.allow_plaintext_non_loopback.unwrap_or(false);
                if !listen.ip().is_loopback() && !allow_remote {
                    return Err(invalid(format!(
                        "refusing plaintext on {listen}, which is not a loopback address: configure TLS (--tls-cert, --tls-key, --client-ca) or pass --allow-plaintext-non-loopback"
                    )));
                }
                None
            }
            (true, ..) => {
                return Err(invalid(
                    "--plaintext and TLS files exclude each other: choose one".to_owned(),
                ));
            }
            (false, Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert_pem: read(&cert, "server certificate")?,
                key_pem: read(&key, "server key")?,
                client_ca_pem: read(&ca, "client CA")?,
            }),
            (false, ..) => {
                return Err(invalid(
                    "TLS needs --tls-cert, --tls-key and --client-ca (agents authenticate with client certificates); for a local test pass --plaintext instead".to_owned(),
                ));
            }
        };
        let mut tokens: Vec<String> = Vec::new();
        if let Some(path) = cli.query_token_file.clone().or(file.query_token_file) {
            let text = String::from_utf8(read(&path, "query token file")?)
                .map_err(|_| invalid(format!("{}: tokens must be UTF-8", path.display())))?;
            tokens.extend(text.lines().map(str::to_owned));
        }
        if let Some(list) = &cli.query_tokens {
            tokens.extend(list.split(',').map(str::to_owned));
        }
        let no_auth = cli.insecure_no_query_auth || file.insecure_no_query_auth.unwrap_or(false);
        let tokens = if no_auth {
            QueryTokens::disabled()
        } else {
            let tokens = QueryTokens::new(tokens);
            if tokens.is_empty() {
                return Err(invalid(
                    "queries need bearer tokens: pass --query-token-file or STALLSCOPE_QUERY_TOKENS (or --insecure-no-query-auth for a local test)".to_owned(),
                ));
            }
            tokens
        };
        let max_message_bytes = cli
            .max_message_bytes
            .or(file.max_message_bytes)
            .unwrap_or(16 * 1024 * 1024);
        let defaults = BatchLimits::default();
        let limits = BatchLimits {
            max_uncompressed_bytes: cli
                .max_batch_bytes
                .or(file.max_batch_bytes)
                .unwrap_or(defaults.max_uncompressed_bytes),
            ..defaults
        };
        for (key, value) in [
            (
                "max_message_bytes (--max-message-bytes)",
                u64::try_from(max_message_bytes).unwrap_or(u64::MAX),
            ),
            (
                "max_batch_bytes (--max-batch-bytes)",
                limits.max_uncompressed_bytes,
            ),
        ] {
            if value < 1024 {
                return Err(invalid(format!(
                    "{key} must be at least 1024 bytes, got {value}"
                )));
            }
        }
        let max_streams = cli.max_streams.or(file.max_streams).unwrap_or(1024);
        if max_streams == 0 {
            return Err(invalid(
                "max_streams (--max-streams) must be at least 1, got 0".to_owned(),
            ));
        }
        let http = http_settings(cli, &http_keys, tls.is_some())?;
        let shutdown_timeout = match cli.shutdown_timeout.clone().or(file.shutdown_timeout) {
            Some(text) => parse_span(&text).map_err(invalid)?,
            None => DEFAULT_SHUTDOWN_TIMEOUT,
        };
        let detect = DetectSettings::build(&cli.detect, file.detect.as_ref()).map_err(invalid)?;
        let ui = ui_settings(
            cli.ui_listen.or(file.ui_listen),
            tls.is_some(),
            cli.allow_plaintext_non_loopback || file.allow_plaintext_non_loopback.unwrap_or(false),
        )
        .map_err(invalid)?;
        Ok(Self {
            listen,
            storage,
            retention,
            maintenance_interval,
            tls,
            tokens,
            max_message_bytes,
            limits,
            max_streams,
            http,
            shutdown_timeout,
            detect,
            ui,
        })
    }
}

/// The file's keys the HTTP listener reads.
struct HttpKeys {
    http_listen: Option<SocketAddr>,
    http_max_body_bytes: Option<usize>,
    http_require_client_cert: Option<bool>,
    alertmanager_service_labels: Option<Vec<String>>,
    alertmanager_host_labels: Option<Vec<String>>,
    allow_plaintext_non_loopback: Option<bool>,
}

impl HttpKeys {
    fn of(file: &FileConfig) -> Self {
        Self {
            http_listen: file.http_listen,
            http_max_body_bytes: file.http_max_body_bytes,
            http_require_client_cert: file.http_require_client_cert,
            alertmanager_service_labels: file.alertmanager_service_labels.clone(),
            alertmanager_host_labels: file.alertmanager_host_labels.clone(),
            allow_plaintext_non_loopback: file.allow_plaintext_non_loopback,
        }
    }
}

/// The HTTP listener's settings from flags and file; `None` when it is off.
fn http_settings(
    cli: &Cli,
    file: &HttpKeys,
    tls: bool,
) -> Result<Option<HttpSettings>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    let Some(listen) = cli.http_listen.or(file.http_listen) else {
        return Ok(None);
    };
    let allow_remote =
        cli.allow_plaintext_non_loopback || file.allow_plaintext_non_loopback.unwrap_or(false);
    if !tls && !listen.ip().is_loopback() && !allow_remote {
        return Err(invalid(format!(
            "refusing a plaintext HTTP listener on {listen}, which is not a loopback address: configure TLS (--tls-cert, --tls-key, --client-ca) or pass --allow-plaintext-non-loopback"
        )));
    }
    let require_client_cert =
        cli.http_require_client_cert || file.http_require_client_cert.unwrap_or(false);
    if require_client_cert && !tls {
        return Err(invalid(
            "--http-require-client-cert needs TLS (--tls-cert, --tls-key, --client-ca)".to_owned(),
        ));
    }
    let max_body_bytes = cli
        .http_max_body_bytes
        .or(file.http_max_body_bytes)
        .unwrap_or(crate::http::DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes < 1024 {
        return Err(invalid(format!(
            "http_max_body_bytes (--http-max-body-bytes) must be at least 1024 bytes, got {max_body_bytes}"
        )));
    }
    let labels = |flag: &Option<Vec<String>>,
                  key: &Option<Vec<String>>,
                  name: &str,
                  default: Vec<String>| {
        let list: Vec<String> = flag
            .clone()
            .or_else(|| key.clone())
            .unwrap_or(default)
            .into_iter()
            .map(|label| label.trim().to_owned())
            .filter(|label| !label.is_empty())
            .collect();
        if list.is_empty() {
            return Err(invalid(format!(
                "--{name} lists no label: give at least one, e.g. service"
            )));
        }
        Ok(list)
    };
    let defaults = LabelRule::default();
    let label_rule = LabelRule {
        service_labels: labels(
            &cli.alertmanager_service_labels,
            &file.alertmanager_service_labels,
            "alertmanager-service-labels",
            defaults.service_labels,
        )?,
        host_labels: labels(
            &cli.alertmanager_host_labels,
            &file.alertmanager_host_labels,
            "alertmanager-host-labels",
            defaults.host_labels,
        )?,
    };
    Ok(Some(HttpSettings {
        listen,
        max_body_bytes,
        require_client_cert,
        label_rule,
    }))
}

/// The web UI's validated settings.
#[derive(Debug, Clone)]
pub struct UiSettings {
    pub listen: SocketAddr,
}

/// The UI's settings from `--ui-listen` / `ui_listen`; `None` when it is off. Plaintext
/// only on loopback unless non-loopback plaintext is explicitly allowed.
fn ui_settings(
    listen: Option<SocketAddr>,
    tls: bool,
    allow_plaintext_non_loopback: bool,
) -> Result<Option<UiSettings>, String> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    if !tls && !listen.ip().is_loopback() && !allow_plaintext_non_loopback {
        return Err(format!(
            "refusing a plaintext web UI on {listen}, which is not a loopback address: configure TLS (--tls-cert, --tls-key, --client-ca) or pass --allow-plaintext-non-loopback"
        ));
    }
    Ok(Some(UiSettings { listen }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_file_carries_a_detect_section() {
        // The README's settings for 2 s buckets.
        let text = "listen = \"127.0.0.1:7070\"\n[detect]\ngrace = \"1s\"\nmax_delay = \"6s\"\nbaseline_refresh = \"12s\"\nhistory_refresh = \"10s\"\n";
        let file: FileConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        let settings = DetectSettings::build(&DetectArgs::default(), file.detect.as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.max_delay, Duration::from_secs(6));
        assert_eq!(settings.history_refresh, Duration::from_secs(10));
        assert_eq!(
            settings.open_buckets,
            DetectSettings::default().open_buckets
        );
    }
}
