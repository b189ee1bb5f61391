//! One (host, service): its history, baselines and CUSUMs, and the window it has open.
//! Buckets go in, in order; what happened comes out as [`Event`]s, which the runner turns
//! into stored windows. Nothing here reads the clock or storage, so the same buckets give
//! the same events on every collector replica and after a restart.
//!
//! Times: the data of bucket `b` spans `[b + phase, b + step + phase)` (an agent's batch
//! goes wholly into the bucket its start falls in), so onsets and ends are placed on the
//! data's own time. A bucket that is only partly degraded is interpolated: if the first
//! crossing bucket's rise is a fraction f of the rise that followed, the onset is placed
//! (1 - f) into it; the same for the last elevated bucket and the end.

use std::collections::{BTreeMap, VecDeque};

use super::{
    baseline::{Baseline, Excluded, History},
    cusum::{self, Cusum, Step},
    indicators::{IndicatorKey, Observations},
    settings::DetectSettings,
};

const NS: i64 = 1_000_000_000;

/// One indicator that crossed, with what it crossed by.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossed {
    pub key: IndicatorKey,
    /// The baseline median when it crossed.
    pub baseline: f64,
    /// Mean of the indicator over the window's buckets so far.
    pub observed: f64,
    /// Largest robust z-score in the window.
    pub score: f64,
    sum: f64,
    buckets: u32,
}

impl Crossed {
    fn new(key: IndicatorKey, baseline: f64) -> Self {
        Self {
            key,
            baseline,
            observed: 0.0,
            score: 0.0,
            sum: 0.0,
            buckets: 0,
        }
    }

    fn add(&mut self, value: f64, z: f64) {
        self.sum += value;
        self.buckets += 1;
        self.observed = self.sum / f64::from(self.buckets);
        self.score = self.score.max(z);
    }

    /// A crossed indicator as stored (after a restart): its mean and score so far.
    pub fn restored(key: IndicatorKey, baseline: f64, observed: f64, score: f64) -> Self {
        Self {
            key,
            baseline,
            observed,
            score,
            sum: observed,
            buckets: 1,
        }
    }
}

/// The window a scope has open.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenWindow {
    pub id: String,
    pub onset_unix_ns: i64,
    /// The bucket holding the onset.
    pub onset_bucket: i64,
    pub crossed: Vec<Crossed>,
    /// Consecutive recovered buckets.
    recovered: Vec<i64>,
    /// The last bucket in which a crossed indicator was still elevated.
    last_elevated: Option<i64>,
    /// The last bucket in which a crossed indicator was evaluated at all.
    last_observed: Option<i64>,
}

impl OpenWindow {
    /// A window read back from storage: it continues from `onset_bucket`.
    pub fn resumed(
        id: String,
        onset_unix_ns: i64,
        onset_bucket: i64,
        crossed: Vec<Crossed>,
    ) -> Self {
        Self {
            id,
            onset_unix_ns,
            onset_bucket,
            crossed,
            recovered: Vec::new(),
            last_elevated: None,
            last_observed: None,
        }
    }

    /// The indicator that moved most: the one whose buckets place the onset and end.
    fn primary(&self) -> Option<&Crossed> {
        self.crossed
            .iter()
            .max_by(|a, b| a.score.total_cmp(&b.score))
    }
}

/// Why a window closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its indicators were back to normal for `close_buckets` buckets.
    Recovered,
    /// No data or support for longer than `max_gap` buckets.
    NoData,
    /// Open for `max_window`: the new level becomes normal.
    TooLong,
}

/// What a bucket did to a scope.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Opened(OpenWindow),
    /// Another indicator crossed while open, or the crossed ones moved on.
    Updated(OpenWindow),
    Closed {
        window: OpenWindow,
        end_unix_ns: i64,
        reason: CloseReason,
    },
}

/// Recent observations kept for the onset and end interpolation.
const RECENT_BUCKETS: usize = 64;

/// The detector of one (host, service).
#[derive(Debug, Clone)]
pub struct ScopeDetector {
    pub host: String,
    pub service: String,
    step_s: i64,
    /// Seconds from a bucket's start to the start of its data.
    phase_s: f64,
    history: History,
    baselines: BTreeMap<IndicatorKey, Baseline>,
    baseline_epoch: Option<i64>,
    cusums: BTreeMap<IndicatorKey, Cusum>,
    recent: VecDeque<(i64, Observations)>,
    /// Other windows of the scope (any source), left out of baselines; automatic ones
    /// also bound onsets (a new window starts after a known one ends).
    known: Vec<Excluded>,
    open: Option<OpenWindow>,
    /// A stored open window, taken up at its onset bucket (or the first alarm before).
    resume: Option<OpenWindow>,
    /// Onsets are not placed before this bucket (the end of the last known window).
    not_before: i64,
    first_bucket: Option<i64>,
    last_bucket: Option<i64>,
    /// The last bucket in which the scope had any data.
    last_data_bucket: Option<i64>,
}

fn window_id(host: &str, service: &str, onset_bucket: i64) -> String {
    let hash = crate::hash::StableHasher::new()
        .str("a")
        .str(host)
        .str(service)
        .u64(onset_bucket as u64)
        .finish();
    format!("a-{:016x}", hash as u64)
}

impl ScopeDetector {
    pub fn new(host: &str, service: &str, step_s: i64) -> Self {
        Self {
            host: host.to_owned(),
            service: service.to_owned(),
            step_s: step_s.max(1),
            phase_s: 0.0,
            history: History::default(),
            baselines: BTreeMap::new(),
            baseline_epoch: None,
            cusums: BTreeMap::new(),
            recent: VecDeque::new(),
            known: Vec::new(),
            open: None,
            resume: None,
            not_before: i64::MIN,
            first_bucket: None,
            last_bucket: None,
            last_data_bucket: None,
        }
    }

    /// Where the data of a bucket starts within it (the agent's batch phase).
    pub fn set_phase(&mut self, phase_s: f64) {
        self.phase_s = phase_s.clamp(0.0, self.step_s as f64);
    }

    /// The scope's other windows (stored, any source): `(from_s, until_s)`, and whether
    /// each one is automatic (which bounds onsets).
    pub fn set_known(&mut self, windows: &[(Excluded, bool)]) {
        self.known = windows.iter().map(|&(span, _)| span).collect();
        for &((_, until), automatic) in windows {
            if automatic && until != i64::MAX {
                self.not_before = self
                    .not_before
                    .max(until.div_euclid(self.step_s) * self.step_s);
            }
        }
    }

    /// Takes up a stored open window: from its onset bucket on, buckets count for it
    /// instead of opening another.
    pub fn resume(&mut self, window: OpenWindow) {
        if self.open.as_ref().is_some_and(|w| w.id == window.id) {
            return;
        }
        self.open = None;
        self.resume = Some(window);
    }

    /// Forgets the open window (closed elsewhere: by hand, or by another replica) and
    /// starts the tests over; no onset before `end_s`.
    pub fn closed_elsewhere(&mut self, end_s: i64) {
        self.open = None;
        self.resume = None;
        self.not_before = self
            .not_before
            .max(end_s.div_euclid(self.step_s) * self.step_s);
        for cusum in self.cusums.values_mut() {
            cusum.reset();
        }
    }

    /// Gives the open window the id it is stored under.
    pub fn rename_open(&mut self, id: &str) {
        if let Some(window) = self.open.as_mut() {
            id.clone_into(&mut window.id);
        }
    }

    /// Continues a window another replica stored first, under its id and onset, instead
    /// of the one this scope opened.
    pub fn adopt(&mut self, id: &str, onset_unix_ns: i64) {
        let bucket = self.bucket_of_data(onset_unix_ns);
        if let Some(window) = self.open.as_mut() {
            id.clone_into(&mut window.id);
            window.onset_unix_ns = onset_unix_ns;
            window.onset_bucket = bucket;
        }
    }

    /// The bucket whose data holds the instant `unix_ns`.
    pub fn bucket_of_data(&self, unix_ns: i64) -> i64 {
        let seconds = unix_ns as f64 / NS as f64 - self.phase_s;
        (seconds.floor() as i64).div_euclid(self.step_s) * self.step_s
    }

    pub fn step_s(&self) -> i64 {
        self.step_s
    }

    pub fn open_window(&self) -> Option<&OpenWindow> {
        self.open.as_ref().or(self.resume.as_ref())
    }

    /// The baselines in use (as of the last bucket's grid point).
    pub fn baselines(&self) -> &BTreeMap<IndicatorKey, Baseline> {
        &self.baselines
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn history_mut(&mut self) -> &mut History {
        &mut self.history
    }

    pub fn last_bucket(&self) -> Option<i64> {
        self.last_bucket
    }

    /// The last bucket in which the scope had data.
    pub fn last_data_bucket(&self) -> Option<i64> {
        self.last_data_bucket
    }

    fn data_start_ns(&self, bucket: i64) -> f64 {
        (bucket as f64 + self.phase_s) * NS as f64
    }

    fn value_at(&self, bucket: i64, key: &IndicatorKey) -> Option<f64> {
        self.recent
            .iter()
            .rev()
            .find(|(b, _)| *b == bucket)
            .and_then(|(_, o)| o.values.get(key).copied())
    }

    /// The spans baselines leave out now.
    fn excluded(&self) -> Vec<Excluded> {
        let mut spans = self.known.clone();
        if let Some(open) = self.open_window() {
            spans.push((open.onset_bucket, i64::MAX));
        }
        spans
    }

    /// One bucket: `observations` is `None` when the scope had no data in it.
    pub fn process(
        &mut self,
        bucket: i64,
        observations: Option<Observations>,
        settings: &DetectSettings,
    ) -> Vec<Event> {
        if self.last_bucket.is_some_and(|last| last >= bucket) {
            return Vec::new();
        }
        self.last_bucket = Some(bucket);
        self.first_bucket.get_or_insert(bucket);
        let step_s = self.step_s;
        let refresh = (settings.baseline_refresh.as_secs() as i64).max(step_s);
        let epoch = bucket.div_euclid(refresh) * refresh;
        if self.baseline_epoch != Some(epoch) {
            self.baseline_epoch = Some(epoch);
            self.baselines = self
                .history
                .baselines(epoch, step_s, &self.excluded(), settings);
            self.cusums
                .retain(|key, _| self.baselines.contains_key(key));
        }
        if observations.is_some() {
            self.last_data_bucket = Some(bucket);
        }
        let observations = observations.unwrap_or_default();
        let mut steps: BTreeMap<IndicatorKey, Step> = BTreeMap::new();
        let mut alarms: Vec<IndicatorKey> = Vec::new();
        for (key, baseline) in &self.baselines {
            let cusum = self.cusums.entry(key.clone()).or_default();
            match observations.values.get(key) {
                Some(&value) => {
                    let impact = observations.impact(key, value - baseline.median);
                    let step =
                        cusum::step(bucket, value, impact, baseline, key.kind.class(), settings);
                    if cusum.update(step, settings) {
                        alarms.push(key.clone());
                    }
                    steps.insert(key.clone(), step);
                }
                None => cusum.miss(settings),
            }
        }
        self.history.add(bucket, &observations, settings);
        self.history
            .trim(bucket - settings.recent_history.as_secs() as i64);
        if self.recent.len() == RECENT_BUCKETS {
            self.recent.pop_front();
        }
        self.recent.push_back((bucket, observations));

        if let Some(resume) = &self.resume
            && (resume.onset_bucket <= bucket || !alarms.is_empty())
        {
            let mut window = self.resume.take();
            // The history replay covers the whole window: its indicators' means are
            // rebuilt from the buckets instead of the stored summary.
            if let Some(window) = window.as_mut()
                && self
                    .first_bucket
                    .is_some_and(|first| first <= window.onset_bucket)
            {
                for crossed in &mut window.crossed {
                    crossed.sum = 0.0;
                    crossed.buckets = 0;
                    crossed.score = 0.0;
                }
            }
            self.open = window;
        }
        let mut events = Vec::new();
        if self.open.is_none() {
            if let Some(window) = self.try_open(bucket, &alarms) {
                events.push(Event::Opened(window));
            }
            return events;
        }
        events.extend(self.continue_open(bucket, &steps, &alarms, settings));
        events
    }

    /// Opens a window if an indicator is in alarm and its onset lies after every known
    /// window.
    fn try_open(&mut self, bucket: i64, alarms: &[IndicatorKey]) -> Option<OpenWindow> {
        let mut onsets: Vec<(i64, IndicatorKey, Step, Vec<Step>)> = Vec::new();
        for key in alarms {
            let Some(cusum) = self.cusums.get(key) else {
                continue;
            };
            if let Some((first, cluster)) = cusum.onset(self.not_before) {
                onsets.push((first.bucket, key.clone(), first, cluster));
            }
        }
        // The earliest onset; its indicator places it.
        onsets.sort_by_key(|(b, key, _, _)| (*b, key.clone()));
        let (onset_bucket, key, first, cluster) = onsets.first().cloned()?;
        let baseline = self.baselines.get(&key).copied()?;
        let plateau = plateau(&cluster);
        let fraction_first = fraction(first.value, baseline.median, plateau);
        let previous_bucket = onset_bucket - self.step_s;
        let previous = (previous_bucket >= self.not_before)
            .then(|| self.value_at(previous_bucket, &key))
            .flatten()
            .map(|v| fraction(v, baseline.median, plateau))
            .filter(|f| *f >= 0.25);
        let step_ns = (self.step_s * NS) as f64;
        let onset_ns = match previous {
            Some(f) => self.data_start_ns(onset_bucket - self.step_s) + (1.0 - f) * step_ns,
            None => self.data_start_ns(onset_bucket) + (1.0 - fraction_first) * step_ns,
        };
        let mut crossed = Vec::new();
        for (_, key, _, cluster) in &onsets {
            let Some(b) = self.baselines.get(key) else {
                continue;
            };
            let mut c = Crossed::new(key.clone(), b.median);
            for s in cluster.iter().filter(|s| s.bucket >= onset_bucket) {
                c.add(s.value, s.z);
            }
            crossed.push(c);
        }
        let window = OpenWindow {
            id: window_id(&self.host, &self.service, onset_bucket),
            onset_unix_ns: onset_ns.round() as i64,
            onset_bucket,
            crossed,
            recovered: Vec::new(),
            last_elevated: Some(bucket),
            last_observed: Some(bucket),
        };
        self.open = Some(window.clone());
        Some(window)
    }

    fn continue_open(
        &mut self,
        bucket: i64,
        steps: &BTreeMap<IndicatorKey, Step>,
        alarms: &[IndicatorKey],
        settings: &DetectSettings,
    ) -> Vec<Event> {
        let step_s = self.step_s;
        let Some(mut window) = self.open.take() else {
            return Vec::new();
        };
        let mut events = Vec::new();
        let mut changed = false;
        for key in alarms {
            if !window.crossed.iter().any(|c| &c.key == key)
                && let Some(b) = self.baselines.get(key)
            {
                window.crossed.push(Crossed::new(key.clone(), b.median));
                changed = true;
            }
        }
        let mut observed_any = false;
        let mut all_recovered = true;
        for crossed in &mut window.crossed {
            let (Some(step), Some(baseline)) =
                (steps.get(&crossed.key), self.baselines.get(&crossed.key))
            else {
                continue;
            };
            observed_any = true;
            let ok = cusum::recovered(step, baseline, crossed.key.kind.class(), settings);
            if !ok {
                all_recovered = false;
                crossed.add(step.value, step.z);
            }
        }
        if observed_any {
            window.last_observed = Some(bucket);
            if all_recovered && alarms.is_empty() {
                window.recovered.push(bucket);
            } else {
                window.recovered.clear();
                window.last_elevated = Some(bucket);
            }
        }
        let observed_last = window
            .last_observed
            .or(window.last_elevated)
            .unwrap_or(window.onset_bucket);
        let (close, reason) = if window.recovered.len() >= settings.close_buckets as usize {
            (true, CloseReason::Recovered)
        } else if bucket - observed_last > i64::from(settings.max_gap) * step_s {
            (true, CloseReason::NoData)
        } else if (bucket + step_s - window.onset_bucket) as u64 >= settings.max_window.as_secs() {
            (true, CloseReason::TooLong)
        } else {
            (false, CloseReason::Recovered)
        };
        if close {
            let end_ns = self.end_of(&window, bucket, reason);
            for cusum in self.cusums.values_mut() {
                cusum.reset();
            }
            let end_bucket = end_ns.div_euclid(NS).div_euclid(step_s) * step_s;
            self.known.push((window.onset_bucket, end_bucket + step_s));
            self.not_before = self.not_before.max(end_bucket);
            if reason == CloseReason::TooLong {
                // The level it reached is the new normal: baselines start over from the
                // buckets that follow.
                self.history.clear();
                self.baselines.clear();
                self.baseline_epoch = None;
            }
            events.push(Event::Closed {
                window,
                end_unix_ns: end_ns,
                reason,
            });
            return events;
        }
        if changed {
            events.push(Event::Updated(window.clone()));
        }
        self.open = Some(window);
        events
    }

    /// Where the window ends: the start of the recovered run, moved into the bucket
    /// before it (or into its first bucket) when that was only partly degraded.
    fn end_of(&self, window: &OpenWindow, bucket: i64, reason: CloseReason) -> i64 {
        let step_s = self.step_s;
        let step_ns = (step_s * NS) as f64;
        let floor = window.onset_unix_ns;
        let last = window.last_elevated.unwrap_or(window.onset_bucket);
        let end = match reason {
            CloseReason::NoData => self.data_start_ns(last) + step_ns,
            CloseReason::TooLong => self.data_start_ns(bucket) + step_ns,
            CloseReason::Recovered => {
                let first_recovered = window.recovered.first().copied().unwrap_or(bucket);
                let mut end = self.data_start_ns(first_recovered);
                if let Some(primary) = window.primary()
                    && let Some(baseline) = self.baselines.get(&primary.key)
                {
                    let plateau = primary.observed;
                    let before = first_recovered - step_s;
                    let f_before = self
                        .value_at(before, &primary.key)
                        .map(|v| fraction(v, baseline.median, plateau));
                    let f_first = self
                        .value_at(first_recovered, &primary.key)
                        .map(|v| fraction(v, baseline.median, plateau));
                    if before == last
                        && let Some(f) = f_before
                        && f < 0.75
                    {
                        end = self.data_start_ns(before) + f * step_ns;
                    } else if let Some(f) = f_first
                        && f >= 0.25
                    {
                        end += f * step_ns;
                    }
                }
                end
            }
        };
        (end.round() as i64).max(floor)
    }
}

/// The typical value of a degraded run: the median of its crossing buckets.
fn plateau(cluster: &[Step]) -> f64 {
    let values: Vec<f64> = cluster
        .iter()
        .filter(|s| s.crossing)
        .map(|s| s.value)
        .collect();
    crate::explain::stats::median(&values)
}

/// How far `value` went from `baseline` towards `plateau`, in 0..=1.
fn fraction(value: f64, baseline: f64, plateau: f64) -> f64 {
    if plateau - baseline <= 0.0 {
        return 1.0;
    }
    ((value - baseline) / (plateau - baseline)).clamp(0.0, 1.0)
}

/// The id of the automatic window of a scope with its onset in `onset_bucket`.
pub fn automatic_id(host: &str, service: &str, onset_bucket: i64) -> String {
    window_id(host, service, onset_bucket)
}
