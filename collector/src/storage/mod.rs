//! Storage behind one trait, with two implementations: SQLite (embedded, the default) and
//! ClickHouse (a fleet: many stateless collector replicas, one database). Both store a
//! batch exactly once per (agent, sequence) with its change events and binaries, keep
//! stacks in a deduplicated dictionary, downsample old rows into coarser time buckets,
//! and keep degradation windows by id, latest version first.

pub mod clickhouse;
mod rows;
pub mod sqlite;

use std::{collections::BTreeMap, fmt, future::Future, str::FromStr, time::Duration};

use stallscope_profile::{Labels, Profile};
use thiserror::Error;

pub use self::rows::{ProfileBuilder, bucket_of};
use crate::{
    batch::NormalizedBatch,
    events::{BinaryRecord, ChangeRecord},
    window::{UpsertOutcome, Window, WindowFilter, WindowSource},
};

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] ::clickhouse::error::Error),
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the storage worker stopped: {0}")]
    Worker(String),
    #[error("{0}")]
    Invalid(String),
    #[error("SQLite: {0}; the data file is damaged")]
    Corrupt(#[from] sqlite::MalformedStacks),
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    /// The (agent, sequence) was stored before; nothing was added.
    Duplicate,
}

/// A half-open range of wall-clock time, `[from, until)`, in Unix nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub from_unix_ns: i64,
    pub until_unix_ns: i64,
}

impl TimeRange {
    /// The range in whole seconds `[from, until)`, rounded outwards.
    pub fn seconds(&self) -> (i64, i64) {
        (
            self.from_unix_ns.div_euclid(1_000_000_000),
            (self.until_unix_ns + 999_999_999).div_euclid(1_000_000_000),
        )
    }
}

/// A label filter: every set field must match (see the proto's `Filter`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub host: Option<String>,
    pub service: Option<String>,
    pub pid: Option<String>,
    pub signal: Option<String>,
    pub cause: Option<String>,
    pub labels: Vec<(String, String)>,
}

/// A signal's name in one spelling, for comparing. Agents name a batch's signals after
/// their pprof sample types (`lock-wait`, `disk-io`, `tcp-srtt`), which is what storage
/// keeps, while the samples' `signal` label, the CLI and `why` use the short names
/// (`lock`, `disk`, `tcp`); separators never matter (`off-cpu`, `off_cpu`, `offcpu`).
pub fn canonical_signal(name: &str) -> String {
    let norm = name.to_ascii_lowercase().replace(['-', '_'], "");
    match norm.as_str() {
        "lockwait" => "lock".to_owned(),
        "diskio" => "disk".to_owned(),
        "tcpsrtt" => "tcp".to_owned(),
        "connect" => "tcpconnect".to_owned(),
        _ => norm,
    }
}

/// Whether two signal names are one signal ([`canonical_signal`]).
pub fn signal_matches(wanted: &str, signal: &str) -> bool {
    canonical_signal(wanted) == canonical_signal(signal)
}

impl Filter {
    /// Whether a series with these columns and labels passes.
    pub fn matches(&self, columns: &SeriesColumns<'_>, labels: &Labels) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.host, columns.host)
            && eq(&self.service, columns.service)
            && eq(&self.pid, columns.pid)
            && eq(&self.cause, columns.cause)
            && self
                .signal
                .as_deref()
                .is_none_or(|w| signal_matches(w, columns.signal))
            && self
                .labels
                .iter()
                .all(|(key, value)| labels.get(key).is_some_and(|v| v == value))
    }

    /// A stored series row's labels (JSON as both backends store them), if it passes.
    pub fn matching_labels(
        &self,
        columns: &SeriesColumns<'_>,
        labels_json: &str,
    ) -> Option<Labels> {
        let labels: Labels = serde_json::from_str(labels_json).unwrap_or_default();
        self.matches(columns, &labels).then_some(labels)
    }
}

/// The indexed columns of a series.
#[derive(Debug, Clone, Copy)]
pub struct SeriesColumns<'a> {
    pub host: &'a str,
    pub service: &'a str,
    pub pid: &'a str,
    pub signal: &'a str,
    pub cause: &'a str,
}

/// How totals over time are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Signal,
    Cause,
}

/// One line of totals over time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesLine {
    pub key: String,
    pub value_unit: String,
    /// (bucket start in Unix seconds, value, count), sorted by time.
    pub points: Vec<(i64, i64, i64)>,
}

/// One series' totals per time bucket, summed over its stacks, with what identifies it:
/// the raw material of `why` and of the windows detector, which group series by their
/// labels (peer, lock, device, process...) themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesTotals {
    pub host: String,
    pub service: String,
    pub signal: String,
    pub cause: String,
    pub labels: Labels,
    /// (bucket start in Unix seconds, value, count), sorted by time; buckets without
    /// rows are absent.
    pub points: Vec<(i64, i64, i64)>,
}

/// A host/service/process seen in a range.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub host: String,
    pub service: String,
    pub process: String,
    pub pid: String,
    pub signals: Vec<String>,
    pub first_unix_s: i64,
    pub last_unix_s: i64,
    /// Off-CPU time in the range (the [`WAIT_SIGNAL`]), nanoseconds.
    pub wait_ns: i64,
    /// On-CPU time in the range (the [`CPU_SIGNAL`]), nanoseconds.
    pub cpu_ns: i64,
}

/// The signal whose time `targets` reports as wait time, and the one it reports as CPU.
pub const WAIT_SIGNAL: &str = "off-cpu";
pub const CPU_SIGNAL: &str = "on-cpu";

/// A target's key: (host, service, process, pid).
pub(crate) type TargetKey = (String, String, String, String);

/// Builds [`Target`]s from rows of (host, service, process, pid, signal, first, last), one
/// row per signal, and the time totals of their wait and CPU series: both backends'
/// `targets` query returns that shape.
#[derive(Default)]
pub(crate) struct TargetsBuilder(BTreeMap<TargetKey, Target>);

impl TargetsBuilder {
    pub(crate) fn add(
        &mut self,
        key: TargetKey,
        signal: String,
        first_unix_s: i64,
        last_unix_s: i64,
    ) {
        let target = self.0.entry(key.clone()).or_insert_with(|| Target {
            host: key.0,
            service: key.1,
            process: key.2,
            pid: key.3,
            signals: Vec::new(),
            first_unix_s,
            last_unix_s,
            wait_ns: 0,
            cpu_ns: 0,
        });
        if !target.signals.contains(&signal) {
            target.signals.push(signal);
            target.signals.sort();
        }
        target.first_unix_s = target.first_unix_s.min(first_unix_s);
        target.last_unix_s = target.last_unix_s.max(last_unix_s);
    }

    /// Adds `value_ns` of `signal` to the target's wait or CPU time (other signals'
    /// time overlaps the off-CPU time, so it is not added).
    pub(crate) fn add_time(&mut self, key: &TargetKey, signal: &str, value_ns: i64) {
        if let Some(target) = self.0.get_mut(key) {
            if signal == WAIT_SIGNAL {
                target.wait_ns = target.wait_ns.saturating_add(value_ns);
            } else if signal == CPU_SIGNAL {
                target.cpu_ns = target.cpu_ns.saturating_add(value_ns);
            }
        }
    }

    pub(crate) fn finish(self) -> Vec<Target> {
        self.0.into_values().collect()
    }
}

/// What the collector knows about one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSummary {
    pub agent: String,
    pub host: String,
    pub batches: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub spool_dropped_total: u64,
    pub last_batch_unix_ns: i64,
    /// Sum of the rows each stored batch contributed.
    pub samples: u64,
}

/// One resolution tier: rows are kept in buckets of `resolution` while younger than
/// `keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub resolution: Duration,
    pub keep: Duration,
}

/// Retention: tiers from finest to coarsest. New rows go into the first tier; rows older
/// than a tier's `keep` are merged into the next tier's buckets, or deleted after the
/// last tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub tiers: Vec<Tier>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            tiers: vec![
                Tier {
                    resolution: Duration::from_secs(10),
                    keep: Duration::from_secs(24 * 3600),
                },
                Tier {
                    resolution: Duration::from_secs(60),
                    keep: Duration::from_secs(14 * 24 * 3600),
                },
            ],
        }
    }
}

impl Retention {
    /// Resolution (seconds) of the first tier: the bucket size rows are stored in.
    pub fn base_resolution_s(&self) -> i64 {
        self.tiers
            .first()
            .map_or(1, |tier| tier.resolution.as_secs().max(1) as i64)
    }
}

impl FromStr for Retention {
    type Err = String;

    /// Parses `10s:24h,1m:14d` (resolution:keep, finest first).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut tiers: Vec<Tier> = Vec::new();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (resolution, keep) = part.split_once(':').ok_or_else(|| {
                format!("retention tier `{part}` must be RESOLUTION:KEEP, e.g. 10s:24h")
            })?;
            let resolution = parse_span(resolution)?;
            let keep = parse_span(keep)?;
            if resolution.as_secs() == 0 || keep < resolution {
                return Err(format!(
                    "retention tier `{part}`: the resolution must be at least 1s and no longer than the time kept"
                ));
            }
            if let Some(previous) = tiers.last().copied()
                && (resolution.as_secs() % previous.resolution.as_secs() != 0
                    || keep <= previous.keep)
            {
                return Err(format!(
                    "retention tier `{part}`: each tier's resolution must be a multiple of the previous one's and it must keep data longer"
                ));
            }
            tiers.push(Tier { resolution, keep });
        }
        if tiers.is_empty() {
            return Err("retention needs at least one tier, e.g. 10s:24h,1m:14d".to_owned());
        }
        Ok(Self { tiers })
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .tiers
            .iter()
            .map(|t| format!("{}s:{}s", t.resolution.as_secs(), t.keep.as_secs()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses `30s`, `5m`, `24h`, `14d` (whole units).
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10s, 5m, 24h or 14d"))?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    pub rows_downsampled: u64,
    pub rows_deleted: u64,
}

/// The storage every backend implements. Methods are async; the SQLite backend runs its
/// work on blocking threads.
pub trait Storage: Send + Sync + 'static {
    /// The backend's name (`sqlite`, `clickhouse`), for the self-metrics.
    fn backend(&self) -> &'static str;

    /// Whether (agent, sequence) is already stored (a cheap check before decoding).
    fn is_stored(
        &self,
        agent: &str,
        sequence: u64,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Stores a batch exactly once: a batch whose (agent, sequence) is already stored
    /// adds nothing, even if the first attempt was interrupted anywhere.
    fn store(
        &self,
        batch: NormalizedBatch,
    ) -> impl Future<Output = Result<StoreOutcome, StorageError>> + Send;

    /// The merged profile of `range` for the series `filter` accepts.
    fn profile(
        &self,
        range: TimeRange,
        filter: Filter,
    ) -> impl Future<Output = Result<Profile, StorageError>> + Send;

    /// Value and count totals per signal or cause, in buckets of `step_s` seconds.
    fn series(
        &self,
        range: TimeRange,
        filter: Filter,
        group_by: GroupBy,
        step_s: i64,
    ) -> impl Future<Output = Result<Vec<SeriesLine>, StorageError>> + Send;

    /// Every matching series with its value and count totals in buckets of `step_s`
    /// seconds (aligned to `range`'s start).
    fn series_totals(
        &self,
        range: TimeRange,
        filter: Filter,
        step_s: i64,
    ) -> impl Future<Output = Result<Vec<SeriesTotals>, StorageError>> + Send;

    fn targets(
        &self,
        range: TimeRange,
    ) -> impl Future<Output = Result<Vec<Target>, StorageError>> + Send;

    fn agents(&self) -> impl Future<Output = Result<Vec<AgentSummary>, StorageError>> + Send;

    /// Change events in `range` (by event time) of the host and service `filter` names
    /// (its other fields are ignored), oldest first.
    fn events(
        &self,
        range: TimeRange,
        filter: Filter,
    ) -> impl Future<Output = Result<Vec<ChangeRecord>, StorageError>> + Send;

    /// The binaries seen in `range` per (host, service, path, build-id), summed.
    fn binaries(
        &self,
        range: TimeRange,
        filter: Filter,
    ) -> impl Future<Output = Result<Vec<BinaryRecord>, StorageError>> + Send;

    /// Stores `window` under its id unless the stored version is as new or newer
    /// (`updated_unix_ns`) or says the same: the latest version wins, and a repeat
    /// changes nothing. On ClickHouse two replicas writing one id store one window.
    fn upsert_window(
        &self,
        window: Window,
    ) -> impl Future<Output = Result<UpsertOutcome, StorageError>> + Send;

    /// The latest version of one window.
    fn window(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Option<Window>, StorageError>> + Send;

    /// Windows overlapping `range` (open ones extend to now) that `filter` selects,
    /// by onset.
    fn windows(
        &self,
        range: TimeRange,
        filter: WindowFilter,
    ) -> impl Future<Output = Result<Vec<Window>, StorageError>> + Send;

    /// Every open window, of one source or all, by onset.
    fn open_windows(
        &self,
        source: Option<WindowSource>,
    ) -> impl Future<Output = Result<Vec<Window>, StorageError>> + Send;

    /// Downsamples and deletes by the retention policy, as of `now_unix_s`.
    fn maintain(
        &self,
        now_unix_s: i64,
    ) -> impl Future<Output = Result<MaintenanceReport, StorageError>> + Send;
}

/// Losses summed over batches, by reason.
pub type Losses = BTreeMap<String, u64>;

/// Series lines being summed: key -> (value unit, bucket -> (value, count)).
pub(crate) type LineSums = BTreeMap<String, (String, BTreeMap<i64, (i64, i64)>)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_one_whatever_its_spelling() {
        for (stored, asked) in [
            ("lock-wait", "lock"),
            ("disk-io", "disk"),
            ("tcp-srtt", "tcp"),
            ("tcp-connect", "connect"),
            ("off-cpu", "off_cpu"),
        ] {
            assert!(signal_matches(asked, stored), "{asked} vs {stored}");
        }
        assert!(!signal_matches("lock", "disk-io"));
        assert!(!signal_matches("tcp", "tcp-connect"));
    }
}
