//! Command-line arguments of `stallscope` and where the collector address, credentials
//! and deadlines come from: a flag, else an environment variable, else the config file
//! (`--config`, `STALLSCOPE_CONFIG`, or `~/.config/stallscope/cli.toml`). Values are
//! checked as they are parsed (durations with a unit, known signals and causes).

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::{
    names,
    timespec::{duration_arg, now_ns, parse_duration, parse_time},
};

/// Default deadline of the TCP (and TLS) connection to the collector.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default deadline of one query.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(
    name = "stallscope",
    version,
    about = "Query a stallscope collector: targets, flame graphs, top waits, diffs and totals over time"
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// Collector address: https://HOST:PORT or http://HOST:PORT.
    #[arg(long, global = true, env = "STALLSCOPE_COLLECTOR")]
    pub collector: Option<String>,
    /// Bearer token for queries.
    #[arg(long, global = true, env = "STALLSCOPE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the collector's certificate (https only).
    #[arg(long, global = true, env = "STALLSCOPE_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// Name in the collector's certificate, if not the address's host.
    #[arg(long, global = true, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Config file with `collector`, `token` (or `token_file`), `ca`, `server_name`,
    /// `connect_timeout`, `timeout` [default: ~/.config/stallscope/cli.toml].
    #[arg(long, global = true, env = "STALLSCOPE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Give up connecting to the collector after this long [default: 5s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = duration_arg, allow_hyphen_values = true)]
    pub connect_timeout: Option<Duration>,
    /// Give up on a query the collector has not answered after this long [default: 60s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = duration_arg, allow_hyphen_values = true)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Services with data, by wait (off-CPU) time: hosts, processes, signals, time ranges.
    Targets {
        #[command(flatten)]
        range: RangeArgs,
        /// One row per process (pid) instead of one per service.
        #[arg(long)]
        pids: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a flame graph or profile: .svg, .pb.gz (pprof), .folded, .json (speedscope).
    Flame {
        /// Output file; the format follows the extension.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// The stacks and functions with the most wait time, and their share.
    Top {
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Rows per table.
        #[arg(short = 'n', long, default_value_t = 15)]
        limit: usize,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Compare two time ranges: a differential flame graph and the biggest changes.
    Diff {
        /// The baseline range, FROM..UNTIL (e.g. 2h..1h, or RFC 3339 times).
        #[arg(long, value_name = "FROM..UNTIL")]
        before: String,
        /// The range to compare, FROM..UNTIL (e.g. 30m..now).
        #[arg(long, value_name = "FROM..UNTIL")]
        after: String,
        /// Differential flame graph (.svg) or differential folded stacks (.folded).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Rows in the table of changes.
        #[arg(short = 'n', long, default_value_t = 15)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Totals over time per signal or cause, with a sparkline.
    Series {
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Group by signal or cause.
        #[arg(long, value_enum, default_value_t = GroupArg::Signal)]
        by: GroupArg,
        /// Width of one mark (default: about 60 marks); rounded up to whole storage
        /// buckets (10s, or 1m for data older than a day).
        #[arg(long, value_name = "DURATION", value_parser = duration_arg, allow_hyphen_values = true)]
        step: Option<Duration>,
        /// Print JSON instead of sparklines.
        #[arg(long)]
        json: bool,
    },
    /// Agents that sent data: batches stored, sequences, spool drops.
    Agents {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Why a window was slow: what was different from normal, ranked by cause, with
    /// evidence (locks, peers, devices, other processes, code paths, deploys).
    Why {
        /// A stored window's id (see `stallscope windows`); or give --service and a range.
        window: Option<String>,
        /// Start of the slow period: a duration ago (10m), Unix seconds or RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// End of the slow period (default now).
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Compare with this range instead of the automatic baseline, FROM..UNTIL.
        #[arg(long, value_name = "FROM..UNTIL")]
        baseline: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = WhyFormat::Text)]
        format: WhyFormat,
        /// Write a differential flame graph per ranked cause into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// Ranking method: why (what each cause explains, tested against the baseline's
        /// variation) or nsigma (robust z-score alone; the evaluation's baseline).
        #[arg(long, value_enum, default_value_t = RankerArg::Why)]
        ranker: RankerArg,
    },
    /// Change events (deploys with both build-ids, restarts) of a service or host.
    Events {
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Also list the binaries seen (build-ids, frame pointers, truncated stacks).
        #[arg(long)]
        binaries: bool,
        #[arg(long)]
        json: bool,
    },
    /// Degradation windows: list them (the default), add, close or show one.
    #[command(args_conflicts_with_subcommands = true)]
    Windows {
        #[command(subcommand)]
        action: Option<WindowsAction>,
        #[command(flatten)]
        list: WindowsList,
    },
}

/// How `why` ranks causes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RankerArg {
    Why,
    Nsigma,
}

impl RankerArg {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Why => "why",
            Self::Nsigma => "nsigma",
        }
    }
}

/// How `why` prints its report.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WhyFormat {
    /// A terminal report that fits a screen.
    Text,
    Json,
    Markdown,
}

/// Host and service a query is about.
#[derive(Debug, Args, Clone, Default)]
pub struct ScopeArgs {
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub service: Option<String>,
}

/// `stallscope windows` (listing).
#[derive(Debug, Args, Clone, Default)]
pub struct WindowsList {
    #[command(flatten)]
    pub range: RangeArgs,
    /// Windows of this service (and those of every service).
    #[arg(long)]
    pub service: Option<String>,
    /// Windows of this host (and those of every host).
    #[arg(long)]
    pub host: Option<String>,
    /// automatic, alertmanager or manual.
    #[arg(long)]
    pub source: Option<String>,
    /// open or closed.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum WindowsAction {
    /// Mark a degradation window by hand.
    Add {
        /// The service that was degraded.
        #[arg(long)]
        service: Option<String>,
        /// Only on this host.
        #[arg(long)]
        host: Option<String>,
        /// Start: a duration ago (15m), Unix seconds or RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// End; without it the window stays open until `windows close`.
        #[arg(long)]
        until: Option<String>,
        /// What happened.
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long)]
        json: bool,
    },
    /// Close an open window.
    Close {
        id: String,
        /// When it ended (default now).
        #[arg(long)]
        at: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one window.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GroupArg {
    Signal,
    Cause,
}

#[derive(Debug, Args, Clone, Default)]
pub struct RangeArgs {
    /// The last DURATION until now, with a unit (15m, 2h, 1d) [default: 15m].
    #[arg(long, value_name = "DURATION", conflicts_with_all = ["from", "until"], value_parser = duration_arg, allow_hyphen_values = true)]
    pub since: Option<Duration>,
    /// Start: now, a duration ago (2h), Unix seconds or RFC 3339.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// End: like --from [default: now].
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

impl RangeArgs {
    /// The range in Unix nanoseconds.
    pub fn resolve(&self) -> anyhow::Result<(i64, i64)> {
        let now = now_ns();
        let (from, until) = match (&self.since, &self.from) {
            (Some(span), _) => (
                now - i64::try_from(span.as_nanos()).unwrap_or(i64::MAX),
                now,
            ),
            (None, Some(from)) => (
                parse_time(from, now)?,
                self.until
                    .as_deref()
                    .map_or(Ok(now), |u| parse_time(u, now))?,
            ),
            (None, None) => (
                now - 15 * 60 * 1_000_000_000,
                self.until
                    .as_deref()
                    .map_or(Ok(now), |u| parse_time(u, now))?,
            ),
        };
        anyhow::ensure!(
            from < until,
            "the range is empty: --from must be before --until"
        );
        Ok((from, until))
    }
}

/// Parses `FROM..UNTIL`.
pub fn parse_span(text: &str) -> anyhow::Result<(i64, i64)> {
    let (from, until) = text.split_once("..").with_context(|| {
        format!("`{text}` is not a range: use FROM..UNTIL, e.g. 2h..1h or 30m..now")
    })?;
    let now = now_ns();
    let range = (parse_time(from, now)?, parse_time(until, now)?);
    anyhow::ensure!(
        range.0 < range.1,
        "the range `{text}` is empty: FROM must be before UNTIL"
    );
    Ok(range)
}

#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Host name, as the agent reports it (`stallscope targets` lists them).
    #[arg(long)]
    pub host: Option<String>,
    /// Service label: a `[[identity.service]]` rule's name, else the systemd unit, else
    /// the executable's file name (python3.11, not the python3 symlink);
    /// `stallscope targets` lists them. The process name is `--label process=NAME`.
    #[arg(long)]
    pub service: Option<String>,
    /// Process id (as seen from the host).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Signal: off-cpu, on-cpu, runqueue, lock, syscall, disk, tcp-connect, socket-wait,
    /// tcp.
    #[arg(long, value_parser = names::signal)]
    pub signal: Option<String>,
    /// Cause of off-CPU time: cpu-work, cpu-contention, lock, disk, network, other.
    #[arg(long, value_parser = names::cause)]
    pub cause: Option<String>,
    /// Further label matches, KEY=VALUE (repeatable), e.g. thread=worker-1 or
    /// peer=10.0.0.7:5432.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

/// The CLI's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub collector: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    /// e.g. "5s".
    pub connect_timeout: Option<String>,
    /// e.g. "60s".
    pub timeout: Option<String>,
}

/// Where to connect and with what, after flags, environment and file are merged.
#[derive(Debug, Clone)]
pub struct Connection {
    pub collector: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

/// A TOML parse error as one line, with the line it is on.
fn toml_error(path: &std::path::Path, text: &str, err: &toml::de::Error) -> anyhow::Error {
    let line = err
        .span()
        .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
    let at = line.map(|l| format!(", line {l}")).unwrap_or_default();
    anyhow::anyhow!(
        "config file {}{at}: {}",
        path.display(),
        err.message().trim().replace('\n', " ")
    )
}

impl ConnectionArgs {
    pub fn resolve(&self) -> anyhow::Result<Connection> {
        let explicit = self.config.is_some();
        let path = self.config.clone().or_else(|| {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".config/stallscope/cli.toml"))
        });
        let file_name = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let file = match path {
            Some(path) if explicit || path.exists() => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).map_err(|err| toml_error(&path, &text, &err))?
            }
            _ => FileConfig::default(),
        };
        let token = match (&self.token, &file.token, &file.token_file) {
            (Some(token), ..) | (None, Some(token), _) => Some(token.clone()),
            (None, None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None, None) => None,
        };
        let file_duration =
            |key: &str, value: Option<&String>| -> anyhow::Result<Option<Duration>> {
                value
                    .map(|text| {
                        parse_duration(text)
                            .with_context(|| format!("config file {file_name}: `{key}`"))
                    })
                    .transpose()
            };
        let connect_timeout = match self.connect_timeout {
            Some(timeout) => timeout,
            None => file_duration("connect_timeout", file.connect_timeout.as_ref())?
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        };
        let timeout = match self.timeout {
            Some(timeout) => timeout,
            None => file_duration("timeout", file.timeout.as_ref())?.unwrap_or(DEFAULT_TIMEOUT),
        };
        Ok(Connection {
            connect_timeout,
            timeout,
            collector: self
                .collector
                .clone()
                .or(file.collector)
                .unwrap_or_else(|| "http://127.0.0.1:7070".to_owned()),
            token,
            ca: self.ca.clone().or(file.ca),
            server_name: self.server_name.clone().or(file.server_name),
        })
    }
}
