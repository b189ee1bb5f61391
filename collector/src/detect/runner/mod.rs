//! The detection task of a collector: every tick it reads the buckets that became
//! complete for each host, feeds every (host, service) with data to its
//! [`ScopeDetector`], turns what they report into stored windows, and runs `why` on them.
//!
//! - **Complete buckets only.** An agent's batch goes into the bucket its start falls in
//!   and reaches the collector a moment after it ends, so the data of bucket `b` of a host
//!   whose batches start `phase` seconds into a bucket is complete at
//!   `b + step + phase + grace`. The phase is read from the agents' last batch starts at
//!   each history refresh (unknown: a whole bucket).
//! - **Bounded reading.** Each tick reads only the new buckets, one query per host; the
//!   earlier days' same-time stretches are read piecewise at each history refresh (only
//!   the part not read yet); after a start the recent history is read once, in chunks.
//! - **One window per degradation, whatever the number of replicas.** Before a window is
//!   stored, the open automatic windows are read: if the scope has one, this replica takes
//!   it up instead. Otherwise the window's id is derived from the scope and the id of the
//!   scope's previous automatic window (a chain), so replicas that open at the same moment
//!   derive the same id and write the same window; a replica that opens later finds the
//!   open one. Every write reads the stored version first and keeps what others changed
//!   (a window closed by hand or by another replica stays closed).
//! - **Restarts.** Open automatic windows are read back and taken up where they are;
//!   the recent history is replayed, which rebuilds the baselines and the tests.

mod explaining;
mod writes;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::Arc,
};

use tokio::task::JoinSet;

pub use self::explaining::top_cause_of;
use super::{
    indicators::{IndicatorKey, Observations, observe},
    scope::{Crossed, Event, OpenWindow, ScopeDetector},
    settings::DetectSettings,
    store::{StoredWindow, WindowStore},
};
use crate::{
    long_waits::spread_long_waits,
    storage::{Filter, SeriesTotals, Storage, StorageError, TimeRange},
};

const NS: i64 = 1_000_000_000;
const DAY_S: i64 = 86_400;
/// Most buckets read in one query (a history replay is read in chunks).
const CHUNK_BUCKETS: i64 = 180;

/// One host: where its reading stands, its batch phase, its scopes.
#[derive(Debug, Default)]
struct HostState {
    next_bucket: i64,
    phase_s: Option<f64>,
    /// Earlier-day buckets already read, per day back: up to this bucket.
    earlier_read_until: BTreeMap<i64, i64>,
    first_data_s: i64,
    /// The latest bucket known to hold the host's data (read, or its agent's last batch):
    /// every earlier bucket is complete, since agents send their batches in order.
    frontier: i64,
    /// When (wall clock, ns) `frontier` last moved: a host whose frontier has not moved
    /// for `max_delay` is silent, and only then are its empty buckets given up.
    frontier_moved_ns: i64,
    scopes: BTreeMap<String, ScopeDetector>,
}

impl HostState {
    /// `bucket` holds the host's data (seen at `now_ns`).
    fn saw_data(&mut self, bucket: i64, now_ns: i64) {
        if bucket > self.frontier {
            self.frontier = bucket;
            self.frontier_moved_ns = now_ns;
        }
    }
}

/// A window this replica looks after.
#[derive(Debug, Clone)]
struct Managed {
    host: String,
    service: String,
    /// Last time (wall clock, Unix seconds) `why` ran on it.
    explained_s: i64,
    open: bool,
    /// Whether the run on the closed window (its last) has started: a run that started
    /// while the window was still open saw only part of it, so closing during that run
    /// must still be followed by one.
    last_run_started: bool,
}

/// What a tick did (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    pub buckets_read: usize,
    pub opened: Vec<String>,
    pub adopted: Vec<String>,
    pub closed: Vec<String>,
    pub explained: Vec<String>,
}

/// The collector's window detector.
pub struct Detector<S> {
    storage: Arc<S>,
    settings: DetectSettings,
    step_s: i64,
    hosts: BTreeMap<String, HostState>,
    started: bool,
    next_refresh_s: i64,
    /// Windows of every source near the recent history (refreshed with it).
    known: Vec<StoredWindow>,
    managed: BTreeMap<String, Managed>,
    /// Events whose storage write failed, retried first at the next tick.
    pending: Vec<(String, String, Event)>,
    explains: JoinSet<(String, Result<Option<String>, StorageError>)>,
    explaining: BTreeSet<String>,
}

fn floor_to(value: i64, step: i64) -> i64 {
    value.div_euclid(step) * step
}

impl<S: Storage + WindowStore> Detector<S> {
    /// A detector over `storage`, whose finest buckets are `step_s` seconds.
    pub fn new(storage: Arc<S>, settings: DetectSettings, step_s: i64) -> Self {
        Self {
            storage,
            settings,
            step_s: step_s.max(1),
            hosts: BTreeMap::new(),
            started: false,
            next_refresh_s: i64::MIN,
            known: Vec::new(),
            managed: BTreeMap::new(),
            pending: Vec::new(),
            explains: JoinSet::new(),
            explaining: BTreeSet::new(),
        }
    }

    /// Runs until `shutdown` completes, a tick every `tick`.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        let mut ticker = tokio::time::interval(self.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {
                    match self.tick(crate::unix_now_ns()).await {
                        Ok(report) => {
                            for id in &report.opened {
                                tracing::info!("degradation window {id} opened");
                            }
                            for id in &report.closed {
                                tracing::info!("degradation window {id} closed");
                            }
                        }
                        Err(err) => tracing::warn!("window detection: {err} (retrying at the next tick)"),
                    }
                }
            }
        }
    }

    /// The scopes (host, service) being watched, and whether each has a window open.
    pub fn scopes(&self) -> Vec<(String, String, Option<String>)> {
        self.hosts
            .iter()
            .flat_map(|(host, state)| {
                state.scopes.iter().map(|(service, scope)| {
                    (
                        host.clone(),
                        service.clone(),
                        scope.open_window().map(|w| w.id.clone()),
                    )
                })
            })
            .collect()
    }

    /// One round at wall-clock time `now_unix_ns`.
    pub async fn tick(&mut self, now_unix_ns: i64) -> Result<TickReport, StorageError> {
        let mut report = TickReport::default();
        let now_s = now_unix_ns.div_euclid(NS);
        if !self.started {
            self.refresh(now_s).await?;
            self.take_up_open_windows().await?;
            self.started = true;
        } else if now_s >= self.next_refresh_s {
            self.refresh(now_s).await?;
        }
        for (host, service, event) in std::mem::take(&mut self.pending) {
            self.apply(&host, &service, event, now_s, &mut report)
                .await?;
        }
        let hosts: Vec<String> = self.hosts.keys().cloned().collect();
        for host in hosts {
            self.advance_host(&host, now_unix_ns, now_s, &mut report)
                .await?;
        }
        self.collect_explains(now_unix_ns, &mut report).await?;
        self.start_explains(now_unix_ns);
        Ok(report)
    }

    /// Re-reads the hosts and services with data, the agents' batch phases, the windows
    /// to leave out, and the newest part of the earlier days.
    async fn refresh(&mut self, now_s: i64) -> Result<(), StorageError> {
        let settings = &self.settings;
        let refresh_s = (settings.history_refresh.as_secs() as i64).max(1);
        let epoch = floor_to(now_s, refresh_s);
        self.next_refresh_s = epoch + refresh_s;
        let recent_s = settings.recent_history.as_secs() as i64;
        let targets = self
            .storage
            .targets(TimeRange {
                from_unix_ns: (now_s - recent_s) * NS,
                until_unix_ns: (now_s + self.step_s) * NS,
            })
            .await?;
        let start = floor_to(now_s - recent_s, self.step_s);
        for target in &targets {
            let state = self
                .hosts
                .entry(target.host.clone())
                .or_insert_with(|| HostState {
                    next_bucket: start,
                    first_data_s: target.first_unix_s,
                    frontier: i64::MIN,
                    frontier_moved_ns: now_s * NS,
                    ..HostState::default()
                });
            state.first_data_s = state.first_data_s.min(target.first_unix_s);
        }
        let step_ns = self.step_s * NS;
        for agent in self.storage.agents().await? {
            if let Some(state) = self.hosts.get_mut(&agent.host) {
                let phase = agent.last_batch_unix_ns.rem_euclid(step_ns) as f64 / NS as f64;
                state.phase_s = Some(state.phase_s.map_or(phase, |p: f64| p.max(phase)));
                state.saw_data(
                    floor_to(agent.last_batch_unix_ns.div_euclid(NS), self.step_s),
                    now_s * NS,
                );
            }
        }
        let days = i64::from(settings.earlier_days);
        self.known = self
            .storage
            .windows_overlapping(TimeRange {
                from_unix_ns: (now_s - recent_s - days * DAY_S - DAY_S) * NS,
                until_unix_ns: i64::MAX / 4,
            })
            .await?;
        let spans = self.known.clone();
        for (host, state) in &mut self.hosts {
            for (service, scope) in &mut state.scopes {
                if let Some(phase) = state.phase_s {
                    scope.set_phase(phase);
                }
                scope.set_known(&known_for(&spans, host, service, self.step_s));
            }
            // Scopes without data for the whole recent history and no window are dropped.
            let oldest = now_s - recent_s;
            state.scopes.retain(|_, scope| {
                scope.open_window().is_some()
                    || scope.last_data_bucket().is_none_or(|b| b >= oldest)
            });
        }
        let listed: BTreeSet<&str> = targets.iter().map(|t| t.host.as_str()).collect();
        self.hosts
            .retain(|host, state| listed.contains(host.as_str()) || !state.scopes.is_empty());
        self.read_earlier_days(epoch).await
    }

    /// For each host and earlier day, reads the part of the same-time stretch not read yet
    /// and forgets what slid out of it.
    async fn read_earlier_days(&mut self, epoch: i64) -> Result<(), StorageError> {
        let days = i64::from(self.settings.earlier_days);
        if days == 0 {
            return Ok(());
        }
        let half = (self.settings.earlier_day_span.as_secs() as i64 / 2).max(self.step_s);
        let step = self.step_s;
        let hosts: Vec<String> = self.hosts.keys().cloned().collect();
        for host in hosts {
            for day in 1..=days {
                let (lo, hi) = (
                    floor_to(epoch - day * DAY_S - half, step),
                    floor_to(epoch - day * DAY_S + half, step),
                );
                let Some(state) = self.hosts.get(&host) else {
                    continue;
                };
                if state.first_data_s >= hi {
                    continue;
                }
                let from = state
                    .earlier_read_until
                    .get(&day)
                    .copied()
                    .unwrap_or(lo)
                    .max(lo);
                if from >= hi {
                    continue;
                }
                let series = self
                    .storage
                    .series_totals(
                        TimeRange {
                            from_unix_ns: from * NS,
                            until_unix_ns: hi * NS,
                        },
                        Filter {
                            host: Some(host.clone()),
                            ..Filter::default()
                        },
                        step,
                    )
                    .await?;
                let observed = observe_by_service(series, from, step, &self.settings);
                if let Some(state) = self.hosts.get_mut(&host) {
                    state.earlier_read_until.insert(day, hi);
                    for (service, buckets) in observed {
                        if let Some(scope) = state.scopes.get_mut(&service) {
                            for (bucket, observations) in &buckets {
                                scope.history_mut().add_earlier(*bucket, observations);
                            }
                        }
                    }
                }
            }
            if let Some(state) = self.hosts.get_mut(&host) {
                let keep = |bucket: i64| {
                    (1..=days).any(|day| {
                        let centre = epoch - day * DAY_S;
                        bucket >= centre - half && bucket < centre + half
                    })
                };
                for scope in state.scopes.values_mut() {
                    scope.history_mut().retain_earlier(keep);
                }
            }
        }
        Ok(())
    }

    /// After a start: every open automatic window is taken up by its scope.
    async fn take_up_open_windows(&mut self) -> Result<(), StorageError> {
        for window in self.storage.open_automatic_windows().await? {
            let scope = self.scope_mut(&window.host, &window.service);
            let crossed = window
                .indicators
                .iter()
                .filter_map(|i| {
                    let key: IndicatorKey = i.name.parse().ok()?;
                    Some(Crossed::restored(key, i.baseline, i.observed, i.score))
                })
                .collect();
            let bucket = scope.bucket_of_data(window.onset_unix_ns);
            scope.resume(OpenWindow::resumed(
                window.id.clone(),
                window.onset_unix_ns,
                bucket,
                crossed,
            ));
            self.managed.insert(
                window.id.clone(),
                Managed {
                    host: window.host.clone(),
                    service: window.service.clone(),
                    explained_s: 0,
                    open: true,
                    last_run_started: false,
                },
            );
        }
        Ok(())
    }

    fn scope_mut(&mut self, host: &str, service: &str) -> &mut ScopeDetector {
        let step = self.step_s;
        let known = known_for(&self.known, host, service, step);
        let state = self.hosts.entry(host.to_owned()).or_default();
        let phase = state.phase_s;
        state.scopes.entry(service.to_owned()).or_insert_with(|| {
            let mut scope = ScopeDetector::new(host, service, step);
            if let Some(phase) = phase {
                scope.set_phase(phase);
            }
            scope.set_known(&known);
            scope
        })
    }

    /// Reads a host's new buckets and feeds the complete ones to its scopes. A bucket is
    /// complete once the host has data in a later bucket (agents send in order), or once
    /// it holds data and its batch should have arrived (`grace` after its end). An empty
    /// bucket with no later data is given up only when the host has been silent (no newer
    /// data) for `max_delay` and the bucket ended `max_delay` ago: an agent that lags
    /// (a busy host, a slow symbolization) delays detection but loses none of its buckets.
    async fn advance_host(
        &mut self,
        host: &str,
        now_unix_ns: i64,
        now_s: i64,
        report: &mut TickReport,
    ) -> Result<(), StorageError> {
        let step = self.step_s;
        let now = now_unix_ns as f64 / NS as f64;
        loop {
            let Some(state) = self.hosts.get(host) else {
                return Ok(());
            };
            let from = state.next_bucket;
            // The earliest the bucket's batch can have ended.
            if now < (from + step) as f64 + state.phase_s.unwrap_or(0.0) {
                return Ok(());
            }
            let phase = state.phase_s.unwrap_or(step as f64);
            let until = (floor_to(now_s, step) + step).min(from + CHUNK_BUCKETS * step);
            let series = self
                .storage
                .series_totals(
                    TimeRange {
                        from_unix_ns: from * NS,
                        until_unix_ns: until * NS,
                    },
                    Filter {
                        host: Some(host.to_owned()),
                        ..Filter::default()
                    },
                    step,
                )
                .await?;
            let with_data: BTreeSet<i64> = series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.0))
                .collect();
            let Some(state) = self.hosts.get_mut(host) else {
                return Ok(());
            };
            if let Some(&last) = with_data.last() {
                state.saw_data(last, now_unix_ns);
            }
            let grace = self.settings.grace.as_secs_f64();
            let mut complete = state.frontier.clamp(from, until);
            for &bucket in with_data.iter().rev() {
                if (bucket + step) as f64 + phase + grace <= now {
                    complete = complete.max(bucket + step);
                    break;
                }
            }
            let max_delay_ns =
                i64::try_from(self.settings.max_delay.as_nanos()).unwrap_or(i64::MAX);
            if now_unix_ns.saturating_sub(state.frontier_moved_ns) >= max_delay_ns {
                let max_delay = self.settings.max_delay.as_secs_f64();
                let given_up = (now - phase - max_delay).floor() as i64 - step;
                complete = complete.max(floor_to(given_up, step) + step);
            }
            let complete = complete.min(until);
            if complete <= from {
                return Ok(());
            }
            let observed = observe_by_service(series, from, step, &self.settings);
            self.feed(host, from, complete, observed, now_s, report)
                .await?;
            if let Some(state) = self.hosts.get_mut(host) {
                state.next_bucket = complete;
            }
            if complete < until {
                return Ok(());
            }
        }
    }

    /// Feeds buckets `[from, until)` of one host, in order, to its scopes.
    async fn feed(
        &mut self,
        host: &str,
        from: i64,
        until: i64,
        mut observed: BTreeMap<String, BTreeMap<i64, Observations>>,
        now_s: i64,
        report: &mut TickReport,
    ) -> Result<(), StorageError> {
        for service in observed.keys() {
            if observed[service].keys().any(|&b| b >= from && b < until) {
                self.scope_mut(host, service);
            }
        }
        let mut bucket = from;
        while bucket < until {
            report.buckets_read += 1;
            let mut events = Vec::new();
            if let Some(state) = self.hosts.get_mut(host) {
                for (service, scope) in &mut state.scopes {
                    let observations = observed
                        .get_mut(service)
                        .and_then(|buckets| buckets.remove(&bucket));
                    for event in scope.process(bucket, observations, &self.settings) {
                        events.push((service.clone(), event));
                    }
                }
            }
            for (service, event) in events {
                self.apply(host, &service, event, now_s, report).await?;
            }
            bucket += self.step_s;
        }
        Ok(())
    }
}

/// The windows of `host`/`service` among `windows`, as spans in seconds, and whether
/// each is automatic.
fn known_for(
    windows: &[StoredWindow],
    host: &str,
    service: &str,
    step_s: i64,
) -> Vec<((i64, i64), bool)> {
    windows
        .iter()
        .filter(|w| w.covers(host, service))
        .map(|w| {
            let from = w.onset_unix_ns.div_euclid(NS);
            let until = w.end_unix_ns.map_or(i64::MAX, |end| {
                (end + NS - 1).div_euclid(NS).max(from + step_s.min(1))
            });
            (
                (from, until),
                w.automatic && w.host == host && w.service == service,
            )
        })
        .collect()
}

/// Observations per service and bucket, from one host's series read from `from_s` on
/// (long waits spread back over the buckets they spanned first). Kernel threads (series
/// without an executable) are not services and are not watched.
fn observe_by_service(
    mut series: Vec<SeriesTotals>,
    from_s: i64,
    step_s: i64,
    settings: &DetectSettings,
) -> BTreeMap<String, BTreeMap<i64, Observations>> {
    spread_long_waits(&mut series, step_s, from_s);
    let mut by_service: BTreeMap<String, Vec<SeriesTotals>> = BTreeMap::new();
    for s in series {
        by_service.entry(s.service.clone()).or_default().push(s);
    }
    by_service
        .into_iter()
        .filter(|(_, series)| series.iter().any(|s| s.labels.contains_key("exe")))
        .map(|(service, series)| {
            let observed = observe(&series, step_s, settings);
            (service, observed)
        })
        .collect()
}
