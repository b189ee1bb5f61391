//! Normal, per indicator: the values of the recent hours and of the same time on earlier
//! days, outside every known window, summarised robustly (median, and the MAD as the
//! spread). Memory is bounded: the recent values are trimmed to `recent_history`, the
//! earlier days are replaced at each history refresh, and a scope keeps at most
//! `max_indicators` indicators.
//!
//! A baseline is recomputed only at bucket times that are multiples of `baseline_refresh`
//! and uses only buckets at least `baseline_lag` buckets older than that: the baseline of
//! a bucket is then a function of the stored data alone, so every collector replica (and
//! a restarted collector) computes the same one.

use std::collections::{BTreeMap, VecDeque};

use super::{
    indicators::{Class, IndicatorKey, Observations},
    settings::DetectSettings,
};
use crate::explain::stats;

/// A span to leave out of baselines, `[from_s, until_s)`; `i64::MAX` while open.
pub type Excluded = (i64, i64);

/// What normal looks like for one indicator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub median: f64,
    /// The robust spread a z-score divides by (MAD x 1.4826, floored).
    pub spread: f64,
    pub buckets: usize,
}

impl Baseline {
    /// The robust z-score of `value`.
    pub fn z(&self, value: f64) -> f64 {
        (value - self.median) / self.spread
    }
}

/// The smallest rise of an indicator that counts, for a baseline median.
pub fn min_effect(class: Class, median: f64, settings: &DetectSettings) -> f64 {
    let (absolute, relative) = match class {
        Class::Share => (settings.min_share_increase, settings.min_share_relative),
        Class::Latency => (
            settings.min_latency_increase_ns,
            settings.min_latency_relative,
        ),
        Class::Cpu => (settings.min_cpu_increase_ns, settings.min_cpu_relative),
        Class::Retransmits => (settings.min_retransmit_increase, 0.0),
    };
    absolute.max(relative * median.abs())
}

/// The smallest spread a z-score divides by: a share of the median, and a tenth of the
/// class's minimum absolute rise (so a flat baseline cannot make noise significant).
fn spread_floor(class: Class, median: f64, settings: &DetectSettings) -> f64 {
    let absolute = min_effect(class, 0.0, settings) / 10.0;
    (settings.spread_floor * median.abs())
        .max(absolute)
        .max(f64::MIN_POSITIVE)
}

/// A bucket start as held in histories: Unix seconds in 32 bits (until 2106), so a value
/// costs 8 bytes.
type Bucket = u32;

fn held(bucket: i64) -> Bucket {
    Bucket::try_from(bucket.max(0)).unwrap_or(Bucket::MAX)
}

/// One indicator's history.
#[derive(Debug, Clone, Default)]
struct Values {
    /// (bucket, value), in bucket order.
    recent: VecDeque<(Bucket, f32)>,
    /// The same time on earlier days, as of the last history refresh.
    earlier: Vec<(Bucket, f32)>,
}

/// The history of every indicator of one scope.
#[derive(Debug, Clone, Default)]
pub struct History {
    values: BTreeMap<IndicatorKey, Values>,
}

fn excluded(bucket: i64, step_s: i64, spans: &[Excluded]) -> bool {
    spans
        .iter()
        .any(|&(from, until)| from < bucket + step_s && until > bucket)
}

impl History {
    /// Adds one bucket's observations (buckets arrive in order; a repeated bucket is
    /// ignored). Indicators beyond `max_indicators` are not kept.
    pub fn add(&mut self, bucket: i64, observations: &Observations, settings: &DetectSettings) {
        for (key, &value) in &observations.values {
            if !self.values.contains_key(key) && self.values.len() >= settings.max_indicators {
                continue;
            }
            let entry = self.values.entry(key.clone()).or_default();
            if entry
                .recent
                .back()
                .is_some_and(|&(last, _)| last >= held(bucket))
            {
                continue;
            }
            entry.recent.push_back((held(bucket), value as f32));
        }
    }

    /// Forgets recent values older than `oldest_s` and indicators with nothing left.
    pub fn trim(&mut self, oldest_s: i64) {
        for values in self.values.values_mut() {
            while values
                .recent
                .front()
                .is_some_and(|&(b, _)| b < held(oldest_s))
            {
                values.recent.pop_front();
            }
        }
        self.values
            .retain(|_, v| !v.recent.is_empty() || !v.earlier.is_empty());
    }

    /// Forgets everything (a level shift became the new normal).
    pub fn clear(&mut self) {
        self.values.clear();
    }

    /// Adds one bucket of an earlier day (the same time of day) for the indicators the
    /// scope has recent values of.
    pub fn add_earlier(&mut self, bucket: i64, observations: &Observations) {
        for (key, &value) in &observations.values {
            if let Some(values) = self.values.get_mut(key)
                && !values.earlier.iter().any(|&(b, _)| b == held(bucket))
            {
                values.earlier.push((held(bucket), value as f32));
            }
        }
    }

    /// Keeps the earlier days' values whose bucket `keep` accepts.
    pub fn retain_earlier(&mut self, keep: impl Fn(i64) -> bool) {
        for values in self.values.values_mut() {
            values.earlier.retain(|&(b, _)| keep(i64::from(b)));
        }
    }

    /// Earlier-day values held.
    pub fn earlier_values(&self) -> usize {
        self.values.values().map(|v| v.earlier.len()).sum()
    }

    pub fn indicators(&self) -> usize {
        self.values.len()
    }

    /// Recent values held (for the memory bound's test).
    pub fn recent_values(&self) -> usize {
        self.values.values().map(|v| v.recent.len()).sum()
    }

    /// The baselines as of `epoch_s`: recent buckets older than the lag and earlier-day
    /// buckets, outside `spans`; indicators with fewer than `min_baseline_buckets` values
    /// get none.
    pub fn baselines(
        &self,
        epoch_s: i64,
        step_s: i64,
        spans: &[Excluded],
        settings: &DetectSettings,
    ) -> BTreeMap<IndicatorKey, Baseline> {
        let newest = epoch_s - i64::from(settings.baseline_lag) * step_s;
        let oldest = epoch_s - settings.recent_history.as_secs() as i64;
        let mut out = BTreeMap::new();
        let mut pool: Vec<f64> = Vec::new();
        for (key, values) in &self.values {
            pool.clear();
            pool.extend(
                values
                    .recent
                    .iter()
                    .filter(|&&(b, _)| i64::from(b) >= oldest && i64::from(b) < newest)
                    .chain(values.earlier.iter())
                    .filter(|&&(b, _)| !excluded(i64::from(b), step_s, spans))
                    .map(|&(_, v)| f64::from(v)),
            );
            if pool.len() < settings.min_baseline_buckets as usize {
                continue;
            }
            let median = stats::median(&pool);
            let class = key.kind.class();
            let spread = stats::mad(&pool).max(spread_floor(class, median, settings));
            out.insert(
                key.clone(),
                Baseline {
                    median,
                    spread,
                    buckets: pool.len(),
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::indicators::Kind;

    fn observed(key: &IndicatorKey, value: f64) -> Observations {
        Observations {
            busy_ns: 1e9,
            values: std::iter::once((key.clone(), value)).collect(),
            weights: BTreeMap::new(),
        }
    }

    #[test]
    fn the_baseline_leaves_out_windows_the_lag_and_old_buckets() {
        let settings = DetectSettings {
            min_baseline_buckets: 5,
            baseline_lag: 2,
            ..DetectSettings::default()
        };
        let key = IndicatorKey::of(Kind::LockPerWait);
        let mut history = History::default();
        for i in 0..100 {
            // 1 ms, except a degraded stretch (buckets 50..60) at 9 ms.
            let value = if (50..60).contains(&i) { 9e6 } else { 1e6 };
            history.add(i * 10, &observed(&key, value), &settings);
        }
        let spans = [(500, 600)];
        let baselines = history.baselines(1000, 10, &spans, &settings);
        let b = baselines[&key];
        assert!((b.median - 1e6).abs() < 1.0);
        // 100 buckets, minus 10 in the window, minus 2 in the lag (980 and 990).
        assert_eq!(b.buckets, 88);
        // Flat: the spread is the floor, 5% of the median.
        assert!((b.spread - 0.05e6).abs() < 1.0);
        // Without the window's exclusion the median is still 1 ms, the MAD not larger.
        assert!(history.baselines(1000, 10, &[], &settings)[&key].buckets == 98);
        // Too little history: no baseline.
        assert!(history.baselines(40, 10, &[], &settings).is_empty());
        history.trim(900);
        assert_eq!(history.recent_values(), 10);
    }

    #[test]
    fn indicators_beyond_the_cap_are_not_kept() {
        let settings = DetectSettings {
            max_indicators: 2,
            ..DetectSettings::default()
        };
        let mut history = History::default();
        for device in ["a", "b", "c"] {
            history.add(
                0,
                &observed(&IndicatorKey::with(Kind::DiskPerIo, device), 1.0),
                &settings,
            );
        }
        assert_eq!(history.indicators(), 2);
    }

    #[test]
    fn minimum_effects_are_absolute_and_relative() {
        let s = DetectSettings::default();
        assert!((min_effect(Class::Latency, 50e3, &s) - 100e3).abs() < 1e-6);
        assert!((min_effect(Class::Latency, 10e6, &s) - 5e6).abs() < 1e-6);
        assert!((min_effect(Class::Share, 0.5, &s) - 0.15).abs() < 1e-9);
        assert!((min_effect(Class::Share, 0.1, &s) - 0.10).abs() < 1e-9);
    }
}
