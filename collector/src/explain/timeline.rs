//! The buckets a report compares, and rates over them: the window's buckets (those with
//! data for the scope) against the usable baseline buckets, kept as contiguous runs for
//! the bootstrap.

use std::collections::BTreeMap;

use super::stats::{self, SplitMix64};

/// Wait (or CPU) time and events per bucket of one thing (a category, a lock, a peer).
pub type BucketAmounts = BTreeMap<i64, (f64, f64)>;

#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub step_s: i64,
    /// Window buckets with data for the scope, in time order.
    pub window: Vec<i64>,
    /// Usable baseline buckets, one run per contiguous stretch.
    pub baseline_runs: Vec<Vec<i64>>,
}

/// Means over a timeline: time per second of wall time and time per event.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub window_ns_per_s: f64,
    pub baseline_ns_per_s: f64,
    pub window_ns_per_event: Option<f64>,
    pub baseline_ns_per_event: Option<f64>,
}

impl Rates {
    pub fn change(&self) -> f64 {
        self.window_ns_per_s - self.baseline_ns_per_s
    }
}

impl Timeline {
    pub fn baseline_buckets(&self) -> usize {
        self.baseline_runs.iter().map(Vec::len).sum()
    }

    /// Seconds of wall time the window's buckets cover.
    pub fn window_seconds(&self) -> f64 {
        (self.window.len() as i64 * self.step_s) as f64
    }

    /// Seconds of wall time the baseline's buckets cover.
    pub fn baseline_seconds(&self) -> f64 {
        (self.baseline_buckets() as i64 * self.step_s) as f64
    }

    /// Per-second rates of one bucket series on each side (a bucket of the timeline
    /// without an entry counts as zero: the scope had data there, this thing did not).
    pub fn rates(&self, amounts: &BucketAmounts) -> Rates {
        let sum = |buckets: &mut dyn Iterator<Item = &i64>| {
            buckets.fold((0.0, 0.0), |(ns, events), bucket| {
                let (n, e) = amounts.get(bucket).copied().unwrap_or_default();
                (ns + n, events + e)
            })
        };
        let (window_ns, window_events) = sum(&mut self.window.iter());
        let (base_ns, base_events) = sum(&mut self.baseline_runs.iter().flatten());
        let per_event = |ns: f64, events: f64| (events > 0.0).then(|| ns / events);
        Rates {
            window_ns_per_s: ratio(window_ns, self.window_seconds()),
            baseline_ns_per_s: ratio(base_ns, self.baseline_seconds()),
            window_ns_per_event: per_event(window_ns, window_events),
            baseline_ns_per_event: per_event(base_ns, base_events),
        }
    }

    /// One-sided p-value of the window's rise in per-second rate against the baseline's
    /// own variation (see [`stats::bootstrap_p_value`]).
    pub fn p_value(&self, amounts: &BucketAmounts, rng: &mut SplitMix64) -> f64 {
        let step = self.step_s as f64;
        let rate = |bucket: &i64| amounts.get(bucket).map_or(0.0, |(ns, _)| ns / step);
        let runs: Vec<Vec<f64>> = self
            .baseline_runs
            .iter()
            .map(|run| run.iter().map(rate).collect())
            .collect();
        let window: Vec<f64> = self.window.iter().map(rate).collect();
        stats::bootstrap_p_value(&runs, window.len(), stats::mean(&window), rng)
    }
}

impl Timeline {
    /// The window's mean per-second rate as a robust z-score against the baseline's
    /// buckets: (mean - median) / (1.4826 MAD), falling back to the standard deviation
    /// and then to 1 ns/s when the baseline is flat. The "n-sigma" baseline ranker of the
    /// `RCAEval` benchmark, in its robust form.
    pub fn robust_z(&self, amounts: &BucketAmounts) -> f64 {
        let step = self.step_s as f64;
        let rate = |bucket: &i64| amounts.get(bucket).map_or(0.0, |(ns, _)| ns / step);
        let baseline: Vec<f64> = self.baseline_runs.iter().flatten().map(rate).collect();
        let window: Vec<f64> = self.window.iter().map(rate).collect();
        let center = stats::median(&baseline);
        let mut spread = stats::mad(&baseline);
        if spread <= 0.0 {
            let mean = stats::mean(&baseline);
            let variance = baseline.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
                / baseline.len().max(1) as f64;
            spread = variance.sqrt();
        }
        (stats::mean(&window) - center) / spread.max(1.0)
    }
}

fn ratio(ns: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { ns / seconds } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_count_missing_buckets_as_zero_and_events_apart() {
        let timeline = Timeline {
            step_s: 10,
            window: vec![100, 110],
            baseline_runs: vec![vec![0, 10], vec![50]],
        };
        let amounts: BucketAmounts = [(0, (10.0, 1.0)), (50, (20.0, 1.0)), (100, (100.0, 2.0))]
            .into_iter()
            .collect();
        let rates = timeline.rates(&amounts);
        assert!((rates.window_ns_per_s - 5.0).abs() < 1e-12);
        assert!((rates.baseline_ns_per_s - 1.0).abs() < 1e-12);
        assert_eq!(rates.window_ns_per_event, Some(50.0));
        assert_eq!(rates.baseline_ns_per_event, Some(15.0));
        assert!((rates.change() - 4.0).abs() < 1e-12);
    }
}
