//! Calibration of threshold-sampled stacks against exact totals.
//!
//! For one (thread, state) group the probes report the exact total of every wait, plus
//! stack samples: waits at or above the threshold exactly, shorter waits as
//! Horvitz-Thompson estimates (each kept with probability `wait / threshold`, counted as
//! `threshold`). The estimate is unbiased; calibration rescales it so that the group's
//! short waits add up exactly to the measured remainder (total minus exact waits). The
//! flame graph then sums to the exact total, long waits keep their exact stacks, and
//! short waits keep the sampled stack distribution. A group with short waits but no
//! sampled stack gets an explicit `[short waits, no stack sampled]` frame.
//!
//! Syscall totals of the sampled mode (one syscall in N timed, all counted) are scaled
//! to their count first (`Sums::scale_to_count` in `sums.rs`).

use std::{collections::HashMap, time::Duration};

use agent_common::{EST_COUNT_FP_SHIFT, SampleKey, SampleValue, Signal, TotalKey, TotalValue};

pub const UNSAMPLED_FRAME: &str = "[short waits, no stack sampled]";

/// One stack sample of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Part {
    pub exact_ns: u64,
    pub exact_count: u64,
    pub est_ns: u64,
    /// Fixed point, [`EST_COUNT_FP_SHIFT`] fractional bits.
    pub est_count_fp: u64,
}

impl Part {
    pub fn from_value(value: &SampleValue) -> Self {
        Self {
            exact_ns: value.ns,
            exact_count: value.count,
            est_ns: value.est_ns,
            est_count_fp: value.est_count_fp,
        }
    }

    /// The sample's own estimate, when no exact total is there to calibrate against.
    pub fn uncalibrated(self) -> (u64, u64) {
        (
            self.exact_ns + self.est_ns,
            self.exact_count + (self.est_count_fp >> EST_COUNT_FP_SHIFT),
        )
    }
}

/// The calibrated (ns, count) of each part, and what no part accounts for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Calibrated {
    pub parts: Vec<(u64, u64)>,
    pub unattributed_ns: u64,
    pub unattributed_count: u64,
}

/// Splits `amount` in proportion to `weights` with whole units, exactly (largest
/// remainder first).
pub fn apportion(amount: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let mut shares: Vec<u64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (index, &weight) in weights.iter().enumerate() {
        let product = u128::from(amount) * u128::from(weight);
        shares.push((product / sum) as u64);
        remainders.push((product % sum, index));
    }
    let given: u64 = shares.iter().sum();
    let mut left = amount - given;
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, index) in remainders {
        if left == 0 {
            break;
        }
        shares[index] += 1;
        left -= 1;
    }
    shares
}

/// Calibrates one group: `total_ns`/`total_count` are exact, `parts` its stack samples.
pub fn calibrate(total_ns: u64, total_count: u64, parts: &[Part]) -> Calibrated {
    let exact_ns: u64 = parts.iter().map(|p| p.exact_ns).sum();
    let exact_count: u64 = parts.iter().map(|p| p.exact_count).sum();
    let short_ns = total_ns.saturating_sub(exact_ns);
    let short_count = total_count.saturating_sub(exact_count);
    let est_ns: Vec<u64> = parts.iter().map(|p| p.est_ns).collect();
    let est_count: Vec<u64> = parts.iter().map(|p| p.est_count_fp).collect();
    let sampled = est_ns.iter().any(|&w| w > 0);
    let (ns_shares, count_shares) = if sampled {
        (
            apportion(short_ns, &est_ns),
            apportion(short_count, &est_count),
        )
    } else {
        (vec![0; parts.len()], vec![0; parts.len()])
    };
    Calibrated {
        parts: parts
            .iter()
            .zip(ns_shares.iter().zip(&count_shares))
            .map(|(part, (ns, count))| (part.exact_ns + ns, part.exact_count + count))
            .collect(),
        unattributed_ns: if sampled { 0 } else { short_ns },
        unattributed_count: if sampled { 0 } else { short_count },
    }
}

/// The most of a thread's time its observation is taken to cost it (beyond it the
/// thread could not have run at all: a measurement gone wrong).
const MAX_OBSERVED_SHARE: f64 = 0.5;

/// What a signal's drained totals stand for under the overhead guard's duty cycle: its
/// programs were attached for `attached` of the `period` drained, and cost each event
/// they saw `cost_per_event` (their measured run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DutyScale {
    pub period: Duration,
    pub attached: Duration,
    pub cost_per_event: Duration,
}

impl DutyScale {
    /// Attached throughout: nothing to scale.
    pub const WHOLE: Self = Self {
        period: Duration::ZERO,
        attached: Duration::ZERO,
        cost_per_event: Duration::ZERO,
    };

    /// The factor for a thread that had `events` seen while the programs were attached.
    /// The programs run in the thread's own context, so while they are detached it runs
    /// faster by what they cost it: its events in the detached part of the period are
    /// estimated at its attached rate over one minus its time's share spent in the
    /// programs. That assumes a thread paces itself; one paced from outside (a timer, a
    /// peer) would not speed up, but it spends only a small share of its time in the
    /// programs, so its correction is small too.
    pub fn factor(&self, events: u64) -> f64 {
        if self.attached.is_zero() || self.attached >= self.period {
            return 1.0;
        }
        let attached = self.attached.as_secs_f64();
        let detached = self.period.as_secs_f64() - attached;
        let observed =
            (events as f64 * self.cost_per_event.as_secs_f64() / attached).min(MAX_OBSERVED_SHARE);
        1.0 + detached / attached / (1.0 - observed)
    }
}

/// Scales the drained totals and samples of `signal` by `scale`'s factor for each thread:
/// its programs were attached for part of the period drained (the overhead guard's duty
/// cycle), so what they saw stands for the whole period (an estimate; counts no longer
/// exact).
pub fn scale_drained(
    totals: &mut [(TotalKey, TotalValue)],
    samples: &mut [(SampleKey, SampleValue)],
    signal: Signal,
    scale: &DutyScale,
) {
    if scale.factor(0) <= 1.0 {
        return;
    }
    let mut events: HashMap<(u32, u32), u64> = HashMap::new();
    for (key, total) in totals.iter().filter(|(k, _)| k.signal == signal as u8) {
        *events.entry((key.tgid, key.tid)).or_default() += total.count;
    }
    let factor_of =
        |tgid: u32, tid: u32| scale.factor(events.get(&(tgid, tid)).copied().unwrap_or(0));
    for (key, total) in totals.iter_mut().filter(|(k, _)| k.signal == signal as u8) {
        let factor = factor_of(key.tgid, key.tid);
        let scale = |value: u64| (value as f64 * factor).round() as u64;
        total.count = scale(total.count);
        total.ns = scale(total.ns);
        total.tail_ns = scale(total.tail_ns);
        let buckets = total.buckets;
        let timed: u64 = buckets.iter().sum();
        total.buckets = apportion(scale(timed), &buckets)
            .try_into()
            .unwrap_or(buckets);
    }
    for (key, sample) in samples.iter_mut().filter(|(k, _)| k.signal == signal as u8) {
        let factor = factor_of(key.tgid, key.tid);
        let scale = |value: u64| (value as f64 * factor).round() as u64;
        sample.ns = scale(sample.ns);
        sample.count = scale(sample.count);
        sample.est_ns = scale(sample.est_ns);
        sample.est_count_fp = scale(sample.est_count_fp);
        sample.tail_ns = scale(sample.tail_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: u64 = 1 << EST_COUNT_FP_SHIFT;

    fn sum(c: &Calibrated) -> (u64, u64) {
        let (ns, count) = c
            .parts
            .iter()
            .fold((0, 0), |(a, b), (ns, count)| (a + ns, b + count));
        (ns + c.unattributed_ns, count + c.unattributed_count)
    }

    #[test]
    fn exact_waits_pass_through() {
        let parts = [Part {
            exact_ns: 1_000,
            exact_count: 2,
            ..Part::default()
        }];
        let c = calibrate(1_000, 2, &parts);
        assert_eq!(c.parts, vec![(1_000, 2)]);
        assert_eq!((c.unattributed_ns, c.unattributed_count), (0, 0));
    }

    #[test]
    fn sampled_short_waits_add_up_to_the_exact_remainder() {
        // 3 long waits (exact) + short waits measured 1_234_567 ns over 1000 waits, of
        // which two stacks were sampled with estimates 2:1.
        let parts = [
            Part {
                exact_ns: 3_000_000,
                exact_count: 3,
                ..Part::default()
            },
            Part {
                est_ns: 2_000_000,
                est_count_fp: 600 * ONE,
                ..Part::default()
            },
            Part {
                est_ns: 1_000_000,
                est_count_fp: 300 * ONE,
                ..Part::default()
            },
        ];
        let c = calibrate(3_000_000 + 1_234_567, 3 + 1000, &parts);
        assert_eq!(sum(&c), (4_234_567, 1003));
        assert_eq!(c.parts[0], (3_000_000, 3));
        // 2:1 split of the short remainder, within one unit.
        assert!((c.parts[1].0 as i64 - 823_045).abs() <= 1, "{c:?}");
        assert!((c.parts[2].0 as i64 - 411_522).abs() <= 1, "{c:?}");
    }

    #[test]
    fn unsampled_short_waits_are_explicit() {
        let parts = [Part {
            exact_ns: 5_000,
            exact_count: 1,
            ..Part::default()
        }];
        let c = calibrate(5_900, 10, &parts);
        assert_eq!(c.parts, vec![(5_000, 1)]);
        assert_eq!((c.unattributed_ns, c.unattributed_count), (900, 9));
        let c = calibrate(700, 3, &[]);
        assert_eq!((c.unattributed_ns, c.unattributed_count), (700, 3));
    }

    #[test]
    fn a_duty_cycle_scales_only_its_signal() {
        let key = |signal: Signal| TotalKey {
            signal: signal as u8,
            ..TotalKey::default()
        };
        let mut value = TotalValue {
            count: 10,
            ns: 1000,
            ..TotalValue::default()
        };
        value.buckets[3] = 7;
        value.buckets[5] = 3;
        let mut totals = vec![(key(Signal::Syscall), value), (key(Signal::OffCpu), value)];
        let sample = SampleValue {
            ns: 500,
            count: 2,
            ..SampleValue::default()
        };
        let mut samples = vec![(
            SampleKey {
                signal: Signal::Syscall as u8,
                ..SampleKey::default()
            },
            sample,
        )];
        let quarter = DutyScale {
            period: Duration::from_secs(4),
            attached: Duration::from_secs(1),
            cost_per_event: Duration::ZERO,
        };
        scale_drained(&mut totals, &mut samples, Signal::Syscall, &quarter);
        assert_eq!((totals[0].1.count, totals[0].1.ns), (40, 4000));
        assert_eq!((totals[0].1.buckets[3], totals[0].1.buckets[5]), (28, 12));
        assert_eq!(totals[1].1, value, "another signal is untouched");
        assert_eq!((samples[0].1.ns, samples[0].1.count), (2000, 8));
        // Attached the whole period: nothing changes.
        scale_drained(
            &mut totals,
            &mut samples,
            Signal::Syscall,
            &DutyScale::WHOLE,
        );
        assert_eq!(totals[0].1.count, 40);
    }

    #[test]
    fn a_thread_its_observation_slowed_is_scaled_for_running_faster_unobserved() {
        let total = |tid: u32, count: u64| {
            (
                TotalKey {
                    tgid: 1,
                    tid,
                    signal: Signal::Syscall as u8,
                    ..TotalKey::default()
                },
                TotalValue {
                    count,
                    ..TotalValue::default()
                },
            )
        };
        // Attached 1 s of 4; each syscall cost its thread 1 us in the programs: thread 2's
        // 200,000 syscalls cost it a fifth of its time, thread 3's 10 almost nothing.
        let scale = DutyScale {
            period: Duration::from_secs(4),
            attached: Duration::from_secs(1),
            cost_per_event: Duration::from_micros(1),
        };
        let mut totals = vec![total(2, 100_000), total(2, 100_000), total(3, 10)];
        scale_drained(&mut totals, &mut [], Signal::Syscall, &scale);
        // 1 + 3 / (1 - 0.2) = 4.75 for thread 2, over both its syscalls.
        assert_eq!(totals[0].1.count, 475_000);
        assert_eq!(totals[1].1.count, 475_000);
        assert_eq!(totals[2].1.count, 40);
        // A measurement that makes a thread spend everything in the programs is capped.
        assert!((scale.factor(10_000_000) - 7.0).abs() < 1e-9);
    }

    #[test]
    fn apportion_is_exact() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(0, &[5, 5]), vec![0, 0]);
        assert_eq!(apportion(7, &[0, 0]), vec![0, 0]);
        let shares = apportion(u64::MAX / 2, &[u64::MAX, 1, 3]);
        assert_eq!(
            shares.iter().map(|&s| u128::from(s)).sum::<u128>(),
            u128::from(u64::MAX / 2)
        );
    }
}
