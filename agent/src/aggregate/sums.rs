//! A totals entry as the accumulator keeps it over a period. The probes' `TotalValue`
//! carries a 40-bucket histogram (320 bytes); kept for every (thread, signal, class) of a
//! busy host's period (about 50,000) the histograms were a quarter of the agent's heap at
//! its peak (24 MB). `run`'s batches do not carry histograms, so there the histogram is
//! not kept: only how many events were timed, which scaling sampled syscalls needs.

use std::collections::HashMap;

use agent_common::{HIST_BUCKETS, Signal, TotalKey, TotalValue};

use super::calibrate::apportion;

/// Sums of one totals key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sums {
    pub count: u64,
    pub ns: u64,
    /// Off-CPU: the part of `ns` the thread spent runnable, after its wakeup.
    pub tail_ns: u64,
    pub max_ns: u64,
    /// Events whose duration was measured: the histogram's sum (fewer than `count` when
    /// syscalls are sampled).
    pub timed: u64,
    /// The latency histogram, when the profile keeps histograms.
    pub buckets: Option<Box<[u64; HIST_BUCKETS]>>,
}

impl Sums {
    /// Empty sums, with a histogram if `keep_histogram`.
    pub fn new(keep_histogram: bool) -> Self {
        Self {
            buckets: keep_histogram.then(|| Box::new([0; HIST_BUCKETS])),
            ..Self::default()
        }
    }

    /// Adds a drained value.
    pub fn add(&mut self, value: &TotalValue) {
        self.count += value.count;
        self.ns += value.ns;
        self.tail_ns += value.tail_ns;
        self.max_ns = self.max_ns.max(value.max_ns);
        self.timed += value.buckets.iter().sum::<u64>();
        if let Some(buckets) = &mut self.buckets {
            for (total, add) in buckets.iter_mut().zip(value.buckets.iter()) {
                *total += add;
            }
        }
    }

    /// The histogram's buckets (empty when not kept).
    pub fn histogram(&self) -> Vec<u64> {
        self.buckets
            .as_deref()
            .map_or_else(Vec::new, |b| b.to_vec())
    }

    /// Syscall totals of the sampled mode: every syscall counted, one in N timed. Time and
    /// histogram are scaled up to the count (the timed syscalls of a process and syscall
    /// stand for its untimed ones: a ratio estimate, exact in count). Without sampling
    /// every event was timed and nothing changes; with none timed the time stays zero
    /// (too few calls to say).
    pub fn scale_to_count(&mut self) {
        let timed = self.timed;
        if timed == 0 || timed >= self.count {
            return;
        }
        self.ns = (u128::from(self.ns) * u128::from(self.count) / u128::from(timed)) as u64;
        if let Some(buckets) = &mut self.buckets {
            let scaled = apportion(self.count, &buckets[..]);
            for (bucket, count) in buckets.iter_mut().zip(scaled) {
                *bucket = count;
            }
        }
        self.timed = self.count;
    }
}

/// Scales every syscall total to its count ([`Sums::scale_to_count`]).
pub fn scale_sampled_syscalls<S: std::hash::BuildHasher>(totals: &mut HashMap<TotalKey, Sums, S>) {
    for (key, total) in totals.iter_mut() {
        if key.signal == Signal::Syscall as u8 {
            total.scale_to_count();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(count: u64, ns: u64, buckets: &[(usize, u64)]) -> TotalValue {
        let mut value = TotalValue {
            count,
            ns,
            max_ns: 9_000,
            ..TotalValue::default()
        };
        for &(index, n) in buckets {
            value.buckets[index] = n;
        }
        value
    }

    #[test]
    fn sampled_syscall_totals_scale_to_the_count() {
        // 1600 syscalls counted, 100 timed: 60 in bucket 10, 40 in bucket 20.
        for keep in [true, false] {
            let mut total = Sums::new(keep);
            total.add(&drained(1000, 60 * 5_000, &[(10, 60)]));
            total.add(&drained(600, 40 * 5_000, &[(20, 40)]));
            assert_eq!(total.timed, 100);
            total.scale_to_count();
            assert_eq!(total.ns, 1600 * 5_000);
            assert_eq!(
                (total.count, total.max_ns, total.timed),
                (1600, 9_000, 1600)
            );
            let histogram = total.histogram();
            if keep {
                assert_eq!((histogram[10], histogram[20]), (960, 640));
                assert_eq!(histogram.iter().sum::<u64>(), 1600);
            } else {
                assert!(histogram.is_empty());
            }
        }
    }

    #[test]
    fn unsampled_and_untimed_totals_stay_as_measured() {
        let mut every = Sums::new(true);
        every.add(&drained(3, 300, &[(6, 3)]));
        let before = every.clone();
        every.scale_to_count();
        assert_eq!(every, before);
        let mut none_timed = Sums::new(false);
        none_timed.add(&drained(5, 0, &[]));
        none_timed.scale_to_count();
        assert_eq!((none_timed.count, none_timed.ns), (5, 0));
    }
}
