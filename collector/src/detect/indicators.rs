//! The indicators a (host, service) is watched by, per bucket, each normalised by the work
//! done so that a change of load alone moves none of them:
//!
//! - `share:<category>`: the category's part of the request-path thread time (on-CPU, run
//!   queue, lock, disk, and network waits of clients; `why`'s categories with the idle
//!   waits set apart). Time that is about the clock, not the work (sleeps, timers,
//!   `other`), is left out of the sum: a background thread sleeping a second per second
//!   would otherwise make every share move with the load.
//! - `runqueue-per-wakeup`: run-queue latency per wakeup or preemption (CPU contention).
//! - `lock-per-wait`: lock wait per contended wait (futex waits whose stacks show a lock
//!   being acquired, and kernel locks; condition variables and parked pools left out).
//! - `disk-per-io:<device>`: block I/O latency per request.
//! - `socket-wait-per-op:<peer>`: a client's wait per receive/send/poll on one peer.
//! - `connect-per-attempt:<peer>`: TCP connect latency per attempt.
//! - `retransmits-per-op:<peer>`: retransmits per client socket operation on the peer.
//! - `cpu-per-client-op`: on-CPU time per client socket operation (CPU per request for a
//!   service with downstream calls: a slower build) and `cpu-per-wait`: on-CPU time per
//!   off-CPU wait (the same for a service without them).
//!
//! A bucket evaluates an indicator only with enough support: request-path time for the
//! shares, events for the per-event ones (settings `min_busy`, `min_events_per_s`).

use std::{collections::BTreeMap, fmt, str::FromStr};

use super::settings::DetectSettings;
use crate::{
    explain::categories::{Category, CategoryBuckets, is_client},
    storage::SeriesTotals,
};

/// What an indicator measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Share(Category),
    RunQueuePerWakeup,
    LockPerWait,
    DiskPerIo,
    SocketWaitPerOp,
    ConnectPerAttempt,
    RetransmitsPerOp,
    CpuPerClientOp,
    CpuPerWait,
}

/// Which minimum effect applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Share,
    Latency,
    Cpu,
    Retransmits,
}

/// The categories whose shares are watched (`other` is about the clock, see above).
pub const SHARE_CATEGORIES: [Category; 5] = [
    Category::CpuWork,
    Category::CpuContention,
    Category::Lock,
    Category::Disk,
    Category::Network,
];

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Share(_) => "share",
            Self::RunQueuePerWakeup => "runqueue-per-wakeup",
            Self::LockPerWait => "lock-per-wait",
            Self::DiskPerIo => "disk-per-io",
            Self::SocketWaitPerOp => "socket-wait-per-op",
            Self::ConnectPerAttempt => "connect-per-attempt",
            Self::RetransmitsPerOp => "retransmits-per-op",
            Self::CpuPerClientOp => "cpu-per-client-op",
            Self::CpuPerWait => "cpu-per-wait",
        }
    }

    pub fn class(self) -> Class {
        match self {
            Self::Share(_) => Class::Share,
            Self::RunQueuePerWakeup
            | Self::LockPerWait
            | Self::DiskPerIo
            | Self::SocketWaitPerOp
            | Self::ConnectPerAttempt => Class::Latency,
            Self::CpuPerClientOp | Self::CpuPerWait => Class::Cpu,
            Self::RetransmitsPerOp => Class::Retransmits,
        }
    }

    /// The cause category a rise of this indicator points to.
    pub fn category(self) -> Category {
        match self {
            Self::Share(category) => category,
            Self::RunQueuePerWakeup => Category::CpuContention,
            Self::LockPerWait => Category::Lock,
            Self::DiskPerIo => Category::Disk,
            Self::SocketWaitPerOp | Self::ConnectPerAttempt | Self::RetransmitsPerOp => {
                Category::Network
            }
            Self::CpuPerClientOp | Self::CpuPerWait => Category::CpuWork,
        }
    }
}

/// One indicator of a scope: a kind and, for per-object kinds, the object (device, peer).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndicatorKey {
    pub kind: Kind,
    pub object: String,
}

impl IndicatorKey {
    pub fn of(kind: Kind) -> Self {
        Self {
            kind,
            object: String::new(),
        }
    }

    pub fn with(kind: Kind, object: &str) -> Self {
        Self {
            kind,
            object: object.to_owned(),
        }
    }
}

impl fmt::Display for IndicatorKey {
    /// `share:lock`, `runqueue-per-wakeup`, `disk-per-io:loop3`,
    /// `socket-wait-per-op:10.0.0.7:5432`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Share(category) => write!(f, "share:{}", category.label()),
            kind if self.object.is_empty() => f.write_str(kind.prefix()),
            kind => write!(f, "{}:{}", kind.prefix(), self.object),
        }
    }
}

impl FromStr for IndicatorKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (prefix, object) = text.split_once(':').unwrap_or((text, ""));
        let kind = match prefix {
            "share" => Kind::Share(
                Category::from_label(object).ok_or_else(|| format!("unknown share `{text}`"))?,
            ),
            "runqueue-per-wakeup" => Kind::RunQueuePerWakeup,
            "lock-per-wait" => Kind::LockPerWait,
            "disk-per-io" => Kind::DiskPerIo,
            "socket-wait-per-op" => Kind::SocketWaitPerOp,
            "connect-per-attempt" => Kind::ConnectPerAttempt,
            "retransmits-per-op" => Kind::RetransmitsPerOp,
            "cpu-per-client-op" => Kind::CpuPerClientOp,
            "cpu-per-wait" => Kind::CpuPerWait,
            _ => return Err(format!("unknown indicator `{text}`")),
        };
        Ok(match kind {
            Kind::Share(_) => Self::of(kind),
            _ => Self::with(kind, object),
        })
    }
}

/// The indicators one bucket of one scope evaluates (those with enough support).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// Request-path thread time in the bucket (ns).
    pub busy_ns: f64,
    pub values: BTreeMap<IndicatorKey, f64>,
    /// Per indicator, its denominator per second of wall time (events, operations, or
    /// request-path ns per second): a rise of the indicator times this is the extra
    /// wait per second it costs. Absent: not a time (retransmits).
    pub weights: BTreeMap<IndicatorKey, f64>,
}

impl Observations {
    /// The extra wait per second of wall time (ns) a rise of `key` by `rise` means in
    /// this bucket; `None` when the indicator is not a time.
    pub fn impact(&self, key: &IndicatorKey, rise: f64) -> Option<f64> {
        self.weights.get(key).map(|w| rise * w)
    }
}

/// A ratio being summed over a bucket's series.
#[derive(Debug, Clone, Copy, Default)]
struct Ratio {
    numerator: f64,
    denominator: f64,
}

/// The signals the indicators read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    OnCpu,
    OffCpu,
    RunQueue,
    Lock,
    Disk,
    SocketWait,
    Connect,
    Tcp,
    Other,
}

/// A stored series' signal. Agents name signals after their pprof sample types
/// (`lock-wait`, `disk-io`, `tcp-srtt`), earlier data and `why`'s tests by the short
/// names (`lock`, `disk`, `tcp`): both are read.
fn signal_of(name: &str) -> Signal {
    let normalized: String = name
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match normalized.as_str() {
        "oncpu" => Signal::OnCpu,
        "offcpu" => Signal::OffCpu,
        "runqueue" => Signal::RunQueue,
        "lock" | "lockwait" => Signal::Lock,
        "disk" | "diskio" => Signal::Disk,
        "socketwait" => Signal::SocketWait,
        "tcpconnect" | "connect" => Signal::Connect,
        "tcp" | "tcpsrtt" => Signal::Tcp,
        _ => Signal::Other,
    }
}

fn label<'a>(series: &'a SeriesTotals, key: &str) -> Option<&'a str> {
    series.labels.get(key).map(String::as_str)
}

/// Per bucket (start, Unix seconds) the observations of one scope's series (all of one
/// host and service), in buckets of `step_s`.
pub fn observe(
    series: &[SeriesTotals],
    step_s: i64,
    settings: &DetectSettings,
) -> BTreeMap<i64, Observations> {
    let categories = CategoryBuckets::from_series(series);
    let mut ratios: BTreeMap<(i64, IndicatorKey), Ratio> = BTreeMap::new();
    let mut add = |bucket: i64, key: IndicatorKey, numerator: f64, denominator: f64| {
        let ratio = ratios.entry((bucket, key)).or_default();
        ratio.numerator += numerator;
        ratio.denominator += denominator;
    };
    // Per bucket: on-CPU time, client socket operations, off-CPU waits (the units of work
    // of the CPU indicators).
    let mut work: BTreeMap<i64, (f64, f64, f64)> = BTreeMap::new();
    for s in series {
        for &(bucket, value, count) in &s.points {
            let (value, count) = (value as f64, count as f64);
            match signal_of(&s.signal) {
                Signal::RunQueue => add(
                    bucket,
                    IndicatorKey::of(Kind::RunQueuePerWakeup),
                    value,
                    count,
                ),
                // Futex waits count when their stacks show a lock being acquired (not
                // a condition variable or a parked pool, not an unrecognised stack);
                // kernel locks always.
                Signal::Lock
                    if !matches!(label(s, "lock_kind"), Some("futex" | "futex-pi"))
                        || label(s, "lock_wait") == Some("contention") =>
                {
                    add(bucket, IndicatorKey::of(Kind::LockPerWait), value, count);
                }
                Signal::Disk => {
                    if let Some(device) = label(s, "device") {
                        add(
                            bucket,
                            IndicatorKey::with(Kind::DiskPerIo, device),
                            value,
                            count,
                        );
                    }
                }
                Signal::SocketWait if is_client(s) => {
                    work.entry(bucket).or_default().1 += count;
                    if let Some(peer) = label(s, "peer") {
                        add(
                            bucket,
                            IndicatorKey::with(Kind::SocketWaitPerOp, peer),
                            value,
                            count,
                        );
                        // The operations are the retransmits' denominator.
                        add(
                            bucket,
                            IndicatorKey::with(Kind::RetransmitsPerOp, peer),
                            0.0,
                            count,
                        );
                    }
                }
                Signal::Connect => {
                    if let Some(peer) = label(s, "peer") {
                        add(
                            bucket,
                            IndicatorKey::with(Kind::ConnectPerAttempt, peer),
                            value,
                            count,
                        );
                    }
                }
                Signal::Tcp if label(s, "event") == Some("retransmit") && is_client(s) => {
                    if let Some(peer) = label(s, "peer") {
                        // Retransmit rows count events; their value is not a time.
                        add(
                            bucket,
                            IndicatorKey::with(Kind::RetransmitsPerOp, peer),
                            count,
                            0.0,
                        );
                    }
                }
                Signal::OnCpu => work.entry(bucket).or_default().0 += value,
                Signal::OffCpu => work.entry(bucket).or_default().2 += count,
                _ => {}
            }
        }
    }
    let min_events = settings.min_events(step_s);
    let min_busy = settings.min_busy_ns(step_s);
    let seconds = step_s.max(1) as f64;
    let mut out: BTreeMap<i64, Observations> = BTreeMap::new();
    for (&bucket, sums) in &categories.buckets {
        let busy: f64 = SHARE_CATEGORIES.iter().map(|&c| sums.ns(c)).sum();
        let observations = out.entry(bucket).or_default();
        observations.busy_ns = busy;
        if busy < min_busy || busy <= 0.0 {
            continue;
        }
        for category in SHARE_CATEGORIES {
            let key = IndicatorKey::of(Kind::Share(category));
            observations
                .values
                .insert(key.clone(), sums.ns(category) / busy);
            observations.weights.insert(key, busy / seconds);
        }
    }
    for (&bucket, &(cpu_ns, client_ops, waits)) in &work {
        let Some(observations) = out.get_mut(&bucket) else {
            continue;
        };
        if observations.busy_ns < min_busy {
            continue;
        }
        for (kind, operations) in [
            (Kind::CpuPerClientOp, client_ops),
            (Kind::CpuPerWait, waits),
        ] {
            if operations >= min_events {
                let key = IndicatorKey::of(kind);
                observations.values.insert(key.clone(), cpu_ns / operations);
                observations.weights.insert(key, operations / seconds);
            }
        }
    }
    for ((bucket, key), ratio) in ratios {
        let Some(observations) = out.get_mut(&bucket) else {
            continue;
        };
        if observations.busy_ns < min_busy || ratio.denominator < min_events {
            continue;
        }
        if key.kind != Kind::RetransmitsPerOp {
            observations
                .weights
                .insert(key.clone(), ratio.denominator / seconds);
        }
        observations
            .values
            .insert(key, ratio.numerator / ratio.denominator);
    }
    out
}

#[cfg(test)]
mod tests {
    use stallscope_profile::Labels;

    use super::*;

    fn series(
        signal: &str,
        cause: &str,
        labels: &[(&str, &str)],
        points: &[(i64, i64, i64)],
    ) -> SeriesTotals {
        SeriesTotals {
            host: "h".into(),
            service: "svc".into(),
            signal: signal.into(),
            cause: cause.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Labels>(),
            points: points.to_vec(),
        }
    }

    const MS: i64 = 1_000_000;

    /// One 10 s bucket of a service: `load` requests per second, each 1 ms of CPU and a
    /// 2 ms wait on a peer, plus a background thread sleeping all the time.
    fn bucket(load: i64, peer_wait_ms: i64) -> Vec<SeriesTotals> {
        let requests = load * 10;
        vec![
            series(
                "on-cpu",
                "cpu-work",
                &[],
                &[(0, requests * MS, requests / 20)],
            ),
            series(
                "off-cpu",
                "network",
                &[],
                &[(0, requests * peer_wait_ms * MS, requests)],
            ),
            series(
                "socket-wait",
                "network",
                &[("direction", "client"), ("peer", "10.0.0.2:80")],
                &[(0, requests * peer_wait_ms * MS, requests)],
            ),
            series("off-cpu", "other", &[], &[(0, 10_000 * MS, 10)]),
            series("runqueue", "", &[], &[(0, requests * 20_000, requests)]),
        ]
    }

    #[test]
    fn a_load_change_moves_no_indicator_and_a_slow_peer_does() {
        let settings = DetectSettings::default();
        let base = &observe(&bucket(100, 2), 10, &settings)[&0];
        let double = &observe(&bucket(200, 2), 10, &settings)[&0];
        assert!(!base.values.is_empty());
        for (key, value) in &base.values {
            let other = double.values[key];
            // CPU per wait moves a little: the sleeping thread's wakeups are not work.
            let tolerance = if key.kind == Kind::CpuPerWait {
                0.01
            } else {
                1e-9
            };
            assert!(
                (value - other).abs() <= tolerance * value.abs().max(1.0),
                "{key}: {value} vs {other}"
            );
        }
        let slow = &observe(&bucket(100, 12), 10, &settings)[&0];
        let key = IndicatorKey::with(Kind::SocketWaitPerOp, "10.0.0.2:80");
        assert!((slow.values[&key] - 12e6).abs() < 1.0);
        let share = IndicatorKey::of(Kind::Share(Category::Network));
        assert!(slow.values[&share] > base.values[&share] + 0.25);
        // The sleeping thread is not in the shares: CPU and network make them up.
        assert!((base.values[&share] - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn thin_buckets_are_not_evaluated() {
        let settings = DetectSettings::default();
        let thin = &observe(&bucket(1, 2), 10, &settings)[&0];
        // 10 requests of 3 ms: 30 ms in 10 s is under 20 ms/s of request-path time.
        assert!(thin.values.is_empty(), "{:?}", thin.values);
    }

    #[test]
    fn signals_are_read_by_the_names_agents_store_them_under() {
        let settings = DetectSettings::default();
        let mut data = bucket(100, 2);
        for (signal, labels) in [
            (
                "lock-wait",
                vec![("lock_kind", "futex"), ("lock_wait", "contention")],
            ),
            ("disk-io", vec![("device", "sda"), ("op", "write")]),
        ] {
            data.push(series(signal, "", &labels, &[(0, 4_000 * MS, 1000)]));
        }
        data.push(series(
            "tcp-srtt",
            "",
            &[
                ("event", "retransmit"),
                ("direction", "client"),
                ("peer", "10.0.0.2:80"),
            ],
            &[(0, 0, 20)],
        ));
        let observed = &observe(&data, 10, &settings)[&0];
        assert!((observed.values[&IndicatorKey::of(Kind::LockPerWait)] - 4e6).abs() < 1.0);
        assert!((observed.values[&IndicatorKey::with(Kind::DiskPerIo, "sda")] - 4e6).abs() < 1.0);
        let retransmits = IndicatorKey::with(Kind::RetransmitsPerOp, "10.0.0.2:80");
        assert!((observed.values[&retransmits] - 0.02).abs() < 1e-9);
    }

    #[test]
    fn names_round_trip() {
        for name in [
            "share:lock",
            "runqueue-per-wakeup",
            "disk-per-io:loop3",
            "socket-wait-per-op:[::ffff:10.0.0.2]:80",
            "cpu-per-client-op",
        ] {
            let key: IndicatorKey = name.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(key.to_string(), name);
        }
        assert!("share:nothing".parse::<IndicatorKey>().is_err());
        assert!("speed".parse::<IndicatorKey>().is_err());
    }
}
