//! What the demo's roles (`stallscope-demo serve|peer|load|hog`) and the lab say to each
//! other: the `ready` line each role prints when it is up, the one-line commands it reads
//! on stdin and its one-line replies on stdout, the service's own measurements (`stats`),
//! and the load generator's per-second report with the latency histogram it carries.
//!
//! Every command is answered by exactly one line: `ok VERB unix_ns=T` (T: the wall-clock
//! time at which the change took effect, the ground truth of an injection's start or end),
//! `stats {json}`, or `error REASON`. A person can drive a role the same way by typing.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch, now (the clock the agent stamps batches with).
pub fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The two mutexes on the service's request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoMutex {
    /// Taken by checkout requests (`reserve_inventory`).
    Inventory,
    /// Taken by browse requests (`load_session`).
    Sessions,
}

impl DemoMutex {
    pub const ALL: [Self; 2] = [Self::Inventory, Self::Sessions];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Sessions => "sessions",
        }
    }

    /// The request-path function that takes this mutex (the waiters' frame).
    pub const fn waiter_function(self) -> &'static str {
        match self {
            Self::Inventory => "reserve_inventory",
            Self::Sessions => "load_session",
        }
    }

    /// The background function that holds it during a lock-contention injection.
    pub const fn holder_function(self) -> &'static str {
        match self {
            Self::Inventory => "audit_inventory",
            Self::Sessions => "expire_sessions",
        }
    }
}

impl FromStr for DemoMutex {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == text)
            .ok_or_else(|| format!("unknown mutex `{text}`: use inventory or sessions"))
    }
}

/// A command on a role's stdin.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Any role: print `stats {json}` (the service's own measurements; others `{}`).
    Stats,
    /// Any role: exit.
    Quit,
    /// serve: a background thread holds `mutex` for `hold` out of every `period`.
    LockHold {
        mutex: DemoMutex,
        hold: Duration,
        period: Duration,
    },
    /// serve: the background holders stop.
    LockRelease,
    /// peer: answer each request after `delay`.
    Delay(Duration),
    /// load: send this many requests per second from now on.
    Rate(f64),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stats => write!(f, "stats"),
            Self::Quit => write!(f, "quit"),
            Self::LockHold {
                mutex,
                hold,
                period,
            } => write!(
                f,
                "lock-hold {} {} {}",
                mutex.name(),
                hold.as_micros(),
                period.as_micros()
            ),
            Self::LockRelease => write!(f, "lock-release"),
            Self::Delay(delay) => write!(f, "delay {}", delay.as_micros()),
            Self::Rate(rate) => write!(f, "rate {rate}"),
        }
    }
}

fn micros(word: Option<&str>, what: &str) -> Result<Duration, String> {
    word.and_then(|w| w.parse::<u64>().ok())
        .map(Duration::from_micros)
        .ok_or_else(|| format!("{what}: expected microseconds"))
}

impl FromStr for Command {
    type Err = String;

    /// Parses one command line: `stats`, `quit`, `lock-hold MUTEX HOLD_US PERIOD_US`,
    /// `lock-release`, `delay US`, `rate PER_SECOND`.
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap_or_default();
        let command = match verb {
            "stats" => Self::Stats,
            "quit" => Self::Quit,
            "lock-hold" => {
                let mutex = words.next().unwrap_or_default().parse()?;
                let hold = micros(words.next(), "lock-hold HOLD_US")?;
                let period = micros(words.next(), "lock-hold PERIOD_US")?;
                if hold.is_zero() || period <= hold {
                    return Err("lock-hold: HOLD_US must be above 0 and below PERIOD_US".into());
                }
                Self::LockHold {
                    mutex,
                    hold,
                    period,
                }
            }
            "lock-release" => Self::LockRelease,
            "delay" => Self::Delay(micros(words.next(), "delay US")?),
            "rate" => {
                let rate: f64 = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .filter(|r: &f64| r.is_finite() && *r > 0.0 && *r <= 100_000.0)
                    .ok_or("rate: expected requests per second, above 0 and at most 100000")?;
                Self::Rate(rate)
            }
            "" => return Err("empty command".into()),
            other => {
                return Err(format!(
                    "unknown command `{other}`: use stats, quit, lock-hold, lock-release, delay or rate"
                ));
            }
        };
        if let Some(extra) = words.next() {
            return Err(format!("`{verb}`: unexpected `{extra}`"));
        }
        Ok(command)
    }
}

/// The key=value pairs of a `ready ...` or `ok ...` line (words without `=` are skipped).
pub fn pairs(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Where a static lives in the service's address space, as its `ready` line reports it
/// (`inventory=0xADDR+SIZE`): the futex word of a `std::sync::Mutex` lies inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRange {
    pub start: u64,
    pub size: u64,
}

impl AddressRange {
    pub fn contains(&self, address: u64) -> bool {
        address >= self.start && address - self.start < self.size
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{}", self.start, self.size)
    }
}

impl FromStr for AddressRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (start, size) = text
            .split_once('+')
            .ok_or_else(|| format!("address range `{text}`: expected 0xADDR+SIZE"))?;
        let start = u64::from_str_radix(start.trim_start_matches("0x"), 16)
            .map_err(|e| format!("address range `{text}`: {e}"))?;
        let size = size
            .parse()
            .map_err(|e| format!("address range `{text}`: {e}"))?;
        Ok(Self { start, size })
    }
}

/// What the service measured itself, cumulative since it started (`stats`). Times are
/// wall-clock nanoseconds spent in each step, summed over requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStats {
    pub unix_ns: i64,
    pub requests: u64,
    pub browse: u64,
    pub checkout: u64,
    /// Time spent acquiring each mutex (from before `lock()` to holding it).
    pub lock_wait_ns: BTreeMap<String, u64>,
    /// Time the background holder held each mutex.
    pub lock_held_ns: BTreeMap<String, u64>,
    /// Round trips to each peer (`pricing`, `shipping`): calls and time.
    pub peer_calls: BTreeMap<String, u64>,
    pub peer_ns: BTreeMap<String, u64>,
    pub render_ns: u64,
    /// CPU time of the rendering threads during `render_page` (its wall time minus this
    /// is time the thread was not running: run queue and page faults).
    pub render_cpu_ns: u64,
    pub line_items_ns: u64,
    pub journal_appends: u64,
    pub journal_syncs: u64,
    pub journal_sync_ns: u64,
    pub errors: u64,
}

impl ServiceStats {
    /// `self - earlier`, field by field (what happened between two snapshots).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        fn map_delta(
            a: &BTreeMap<String, u64>,
            b: &BTreeMap<String, u64>,
        ) -> BTreeMap<String, u64> {
            a.iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(b.get(k).copied().unwrap_or(0))))
                .collect()
        }
        Self {
            unix_ns: self.unix_ns,
            requests: self.requests.saturating_sub(earlier.requests),
            browse: self.browse.saturating_sub(earlier.browse),
            checkout: self.checkout.saturating_sub(earlier.checkout),
            lock_wait_ns: map_delta(&self.lock_wait_ns, &earlier.lock_wait_ns),
            lock_held_ns: map_delta(&self.lock_held_ns, &earlier.lock_held_ns),
            peer_calls: map_delta(&self.peer_calls, &earlier.peer_calls),
            peer_ns: map_delta(&self.peer_ns, &earlier.peer_ns),
            render_ns: self.render_ns.saturating_sub(earlier.render_ns),
            render_cpu_ns: self.render_cpu_ns.saturating_sub(earlier.render_cpu_ns),
            line_items_ns: self.line_items_ns.saturating_sub(earlier.line_items_ns),
            journal_appends: self.journal_appends.saturating_sub(earlier.journal_appends),
            journal_syncs: self.journal_syncs.saturating_sub(earlier.journal_syncs),
            journal_sync_ns: self.journal_sync_ns.saturating_sub(earlier.journal_sync_ns),
            errors: self.errors.saturating_sub(earlier.errors),
        }
    }
}

/// Sub-buckets per power of two in [`LatencyHistogram`] (relative error under 1/16).
const SUB_BUCKETS: u32 = 16;

/// A log-linear histogram of latencies in microseconds: exact below 32 us, then 16
/// buckets per power of two. Mergeable, so per-second reports add up to any period's
/// quantiles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Bucket index -> count.
    pub buckets: BTreeMap<u32, u64>,
}

impl LatencyHistogram {
    pub fn bucket(us: u64) -> u32 {
        if us < u64::from(2 * SUB_BUCKETS) {
            return us as u32;
        }
        let exponent = us.ilog2();
        let shift = exponent - SUB_BUCKETS.ilog2();
        (exponent - SUB_BUCKETS.ilog2()) * SUB_BUCKETS
            + ((us >> shift) as u32 & (SUB_BUCKETS - 1))
            + SUB_BUCKETS
    }

    /// The lowest latency of bucket `index`, and the lowest of the next one.
    pub fn bounds(index: u32) -> (u64, u64) {
        if index < 2 * SUB_BUCKETS {
            return (u64::from(index), u64::from(index) + 1);
        }
        let octave = (index - SUB_BUCKETS) / SUB_BUCKETS;
        let sub = u64::from((index - SUB_BUCKETS) % SUB_BUCKETS);
        let step = 1u64 << octave;
        (
            (u64::from(SUB_BUCKETS) + sub) * step,
            (u64::from(SUB_BUCKETS) + sub + 1) * step,
        )
    }

    pub fn record(&mut self, us: u64) {
        *self.buckets.entry(Self::bucket(us)).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Self) {
        for (index, count) in &other.buckets {
            *self.buckets.entry(*index).or_default() += count;
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    /// The mean in microseconds (each bucket counted at its middle); 0 when empty.
    pub fn mean_us(&self) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let sum: f64 = self
            .buckets
            .iter()
            .map(|(index, count)| {
                let (low, high) = Self::bounds(*index);
                (low + high - 1) as f64 / 2.0 * *count as f64
            })
            .sum();
        sum / total as f64
    }

    /// The `q` quantile (0..=1) in microseconds: the middle of its bucket; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                let (low, high) = Self::bounds(*index);
                return (low + high - 1) / 2;
            }
        }
        0
    }
}

/// One line of the load generator's report: the requests that completed (or failed)
/// during one wall-clock second. Latency counts from the request's scheduled send time
/// (open loop: a late send is part of the latency, as a user would see it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSecond {
    /// The second (Unix time) this line covers.
    pub unix_s: i64,
    /// The target rate (requests per second) at the end of the second.
    pub rate: f64,
    pub sent: u64,
    pub completed: u64,
    /// Requests that got no reply: refused, reset, or lost when a connection closed.
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub latency: LatencyHistogram,
}

/// Merged numbers of the report lines of a period.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadSummary {
    pub seconds: usize,
    pub sent: u64,
    pub completed: u64,
    pub errors: u64,
    pub latency: LatencyHistogram,
}

impl LoadSummary {
    /// The lines of the whole seconds inside `[from_unix_ns, until_unix_ns)`.
    pub fn of(lines: &[LoadSecond], from_unix_ns: i64, until_unix_ns: i64) -> Self {
        let mut summary = Self::default();
        for line in lines.iter().filter(|l| {
            let start = l.unix_s * 1_000_000_000;
            start >= from_unix_ns && start + 1_000_000_000 <= until_unix_ns
        }) {
            summary.seconds += 1;
            summary.sent += line.sent;
            summary.completed += line.completed;
            summary.errors += line.errors;
            summary.latency.merge(&line.latency);
        }
        summary
    }

    pub fn p50_us(&self) -> u64 {
        self.latency.quantile_us(0.5)
    }

    pub fn p99_us(&self) -> u64 {
        self.latency.quantile_us(0.99)
    }

    pub fn mean_us(&self) -> f64 {
        self.latency.mean_us()
    }

    /// Requests sent per second.
    pub fn send_rate(&self) -> f64 {
        if self.seconds == 0 {
            0.0
        } else {
            self.sent as f64 / self.seconds as f64
        }
    }

    /// Completed requests per second.
    pub fn throughput(&self) -> f64 {
        if self.seconds == 0 {
            0.0
        } else {
            self.completed as f64 / self.seconds as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_bad_ones_say_why() {
        for command in [
            Command::Stats,
            Command::Quit,
            Command::LockHold {
                mutex: DemoMutex::Sessions,
                hold: Duration::from_millis(20),
                period: Duration::from_millis(70),
            },
            Command::LockRelease,
            Command::Delay(Duration::from_micros(1500)),
            Command::Rate(250.0),
        ] {
            assert_eq!(command.to_string().parse::<Command>(), Ok(command));
        }
        assert!(
            "lock-hold pantry 1 2"
                .parse::<Command>()
                .is_err_and(|e| e.contains("inventory or sessions"))
        );
        assert!("lock-hold inventory 90 20".parse::<Command>().is_err());
        assert!("rate -3".parse::<Command>().is_err());
        assert!("delay 5 6".parse::<Command>().is_err());
        assert!("reboot".parse::<Command>().is_err());
    }

    #[test]
    fn histogram_buckets_are_contiguous_and_quantiles_close() {
        let mut previous_high = 0;
        for index in 0..400 {
            let (low, high) = LatencyHistogram::bounds(index);
            assert_eq!(low, previous_high, "bucket {index}");
            assert!(high > low);
            assert_eq!(LatencyHistogram::bucket(low), index);
            assert_eq!(LatencyHistogram::bucket(high - 1), index);
            previous_high = high;
        }
        let mut histogram = LatencyHistogram::default();
        for us in 1..=10_000 {
            histogram.record(us);
        }
        let p99 = histogram.quantile_us(0.99) as f64;
        assert!((p99 - 9_900.0).abs() < 9_900.0 / 16.0, "p99 {p99}");
        let p50 = histogram.quantile_us(0.5) as f64;
        assert!((p50 - 5_000.0).abs() < 5_000.0 / 16.0, "p50 {p50}");
        let mean = histogram.mean_us();
        assert!((mean - 5_000.5).abs() < 5_000.0 / 32.0, "mean {mean}");
    }

    #[test]
    fn address_ranges_parse() {
        let range: AddressRange = "0x5555aa00+16".parse().expect("parses");
        assert!(range.contains(0x5555_aa08) && !range.contains(0x5555_aa10));
        assert_eq!(range.to_string(), "0x5555aa00+16");
    }
}
