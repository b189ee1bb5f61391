//! One indicator's persistence test: a one-sided CUSUM of clipped robust z-scores, with a
//! minimum effect size, and a gate on the last buckets.
//!
//! Each evaluated bucket scores its z-score against the baseline, clipped to `z_clip`
//! (one wild bucket adds at most that much), but only when the rise is also large enough
//! in absolute and relative terms (`min_*_increase`, `min_*_relative`); a bucket whose rise
//! is too small scores at most 0, so a statistically clear but harmless drift cannot add
//! up; nor can a rise that costs the service less than `min_impact` of extra wait per
//! second of wall time (a rare lock or a thin stream of operations getting slower). The sum `S = max(0, S + score - cusum_k)` alarms when it reaches `cusum_h` *and*
//! the last `open_buckets` evaluated buckets all crossed the gate (z >= `z_open` with a
//! large enough effect): sustained, significant and large.
//!
//! The onset is the change point: the first crossing bucket of the last cluster of
//! crossing buckets since the sum left zero (clusters split at two non-crossing buckets in
//! a row), so an isolated noisy bucket before the change does not pull the onset early.

use std::collections::VecDeque;

use super::{
    baseline::{Baseline, min_effect},
    indicators::Class,
    settings::DetectSettings,
};

/// One evaluated bucket of one indicator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub bucket: i64,
    pub value: f64,
    pub z: f64,
    /// z >= `z_open` and a large enough rise.
    pub crossing: bool,
    /// The rise is at least the minimum effect.
    pub large: bool,
}

/// How one bucket compares with the baseline. `impact` is the extra wait per second of
/// wall time the rise means (`None`: not a time, no impact gate).
pub fn step(
    bucket: i64,
    value: f64,
    impact: Option<f64>,
    baseline: &Baseline,
    class: Class,
    settings: &DetectSettings,
) -> Step {
    let z = baseline.z(value);
    let large = value - baseline.median >= min_effect(class, baseline.median, settings)
        && impact.is_none_or(|ns_per_s| ns_per_s >= settings.min_impact_ns_per_s);
    Step {
        bucket,
        value,
        z,
        crossing: large && z >= settings.z_open,
        large,
    }
}

/// Whether a bucket is back to normal for an indicator that crossed: below `z_close`, or
/// its rise under half the minimum effect.
pub fn recovered(
    step: &Step,
    baseline: &Baseline,
    class: Class,
    settings: &DetectSettings,
) -> bool {
    step.z < settings.z_close
        || step.value - baseline.median < 0.5 * min_effect(class, baseline.median, settings)
}

/// Buckets of a run kept for the onset (a longer run keeps its latest part).
const MAX_RUN: usize = 720;

#[derive(Debug, Clone, Default)]
pub struct Cusum {
    pub sum: f64,
    /// The evaluated buckets since the sum left zero.
    run: VecDeque<Step>,
    /// Consecutive crossing buckets, up to the last evaluated one.
    streak: u32,
    /// Consecutive buckets without an evaluation.
    missed: u32,
}

impl Cusum {
    /// Adds an evaluated bucket; returns whether the indicator is in alarm.
    pub fn update(&mut self, step: Step, settings: &DetectSettings) -> bool {
        self.missed = 0;
        let score = if step.large {
            step.z.min(settings.z_clip)
        } else {
            step.z.min(0.0)
        }
        .max(-settings.z_clip);
        let was = self.sum;
        self.sum = (self.sum + score - settings.cusum_k).clamp(0.0, 2.0 * settings.cusum_h);
        if self.sum <= 0.0 {
            self.run.clear();
        } else {
            if was <= 0.0 {
                self.run.clear();
            }
            if self.run.len() == MAX_RUN {
                self.run.pop_front();
            }
            self.run.push_back(step);
        }
        self.streak = if step.crossing { self.streak + 1 } else { 0 };
        self.in_alarm(settings)
    }

    /// A bucket without an evaluation (no data, or too thin): too many in a row and the
    /// test starts over.
    pub fn miss(&mut self, settings: &DetectSettings) {
        self.missed += 1;
        if self.missed > settings.max_gap {
            self.reset();
        }
    }

    pub fn in_alarm(&self, settings: &DetectSettings) -> bool {
        self.sum >= settings.cusum_h && self.streak >= settings.open_buckets
    }

    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The change point: the first crossing bucket of the last cluster of crossing
    /// buckets in the run, not before `not_before` (a known window's end), with the
    /// cluster's buckets.
    pub fn onset(&self, not_before: i64) -> Option<(Step, Vec<Step>)> {
        let mut first: Option<usize> = None;
        let mut quiet = 0;
        for (index, step) in self.run.iter().enumerate().rev() {
            if step.bucket < not_before {
                break;
            }
            if step.crossing {
                first = Some(index);
                quiet = 0;
            } else {
                quiet += 1;
                if quiet >= 2 {
                    break;
                }
            }
        }
        let first = first?;
        let cluster: Vec<Step> = self.run.iter().skip(first).copied().collect();
        Some((self.run[first], cluster))
    }

    /// Consecutive crossing buckets up to now (for the gate).
    pub fn streak(&self) -> u32 {
        self.streak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> Baseline {
        Baseline {
            median: 1e6,
            spread: 0.1e6,
            buckets: 100,
        }
    }

    fn feed(cusum: &mut Cusum, bucket: i64, value: f64, settings: &DetectSettings) -> bool {
        let s = step(bucket, value, None, &baseline(), Class::Latency, settings);
        cusum.update(s, settings)
    }

    #[test]
    fn a_step_alarms_after_the_gate_and_the_onset_is_the_change_point() {
        let settings = DetectSettings::default();
        let mut cusum = Cusum::default();
        // Noise, one wild bucket (not sustained), noise, then a step at bucket 10.
        let values = [1.0, 1.1, 0.9, 5.0, 1.0, 0.95, 1.05, 1.0, 1.0, 1.0];
        for (i, v) in values.iter().enumerate() {
            assert!(
                !feed(&mut cusum, i as i64, v * 1e6, &settings),
                "bucket {i}"
            );
        }
        assert!(!feed(&mut cusum, 10, 4e6, &settings));
        assert!(!feed(&mut cusum, 11, 4e6, &settings));
        assert!(feed(&mut cusum, 12, 4e6, &settings));
        let (onset, cluster) = cusum.onset(i64::MIN).unwrap_or_else(|| panic!("no onset"));
        assert_eq!(onset.bucket, 10);
        assert_eq!(cluster.len(), 3);
        // Not before a known window's end.
        assert_eq!(cusum.onset(11).map(|(s, _)| s.bucket), Some(11));
    }

    #[test]
    fn small_or_isolated_rises_never_alarm() {
        let settings = DetectSettings::default();
        let mut cusum = Cusum::default();
        // +30%: many sigmas, but under the 50% minimum effect.
        for i in 0..100 {
            assert!(!feed(&mut cusum, i, 1.3e6, &settings));
        }
        assert!(cusum.sum.abs() < 1e-9);
        // Spikes every other bucket: never three crossing in a row.
        for i in 100..200 {
            let v = if i % 2 == 0 { 9e6 } else { 1e6 };
            assert!(!feed(&mut cusum, i, v, &settings));
        }
    }

    #[test]
    fn a_rise_that_costs_little_time_does_not_count() {
        let settings = DetectSettings::default();
        // Nine times slower, but on 10 events a second: 80 ms/s... counts; on 5, 40 ms/s
        // does not (under the 50 ms/s minimum impact).
        let costly = step(
            0,
            9e6,
            Some(8e6 * 10.0),
            &baseline(),
            Class::Latency,
            &settings,
        );
        let cheap = step(
            0,
            9e6,
            Some(8e6 * 5.0),
            &baseline(),
            Class::Latency,
            &settings,
        );
        assert!(costly.crossing && costly.large);
        assert!(!cheap.crossing && !cheap.large);
    }

    #[test]
    fn a_long_gap_starts_over() {
        let settings = DetectSettings::default();
        let mut cusum = Cusum::default();
        feed(&mut cusum, 0, 9e6, &settings);
        feed(&mut cusum, 1, 9e6, &settings);
        for _ in 0..=settings.max_gap {
            cusum.miss(&settings);
        }
        assert!(cusum.sum.abs() < 1e-9 && cusum.streak() == 0);
    }
}
