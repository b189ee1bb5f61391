//! The statistics `why` rests on: robust location and spread, a moving-block bootstrap of
//! the baseline (how large a window-length mean the baseline's own variation produces),
//! and Benjamini-Hochberg control of false discoveries across the categories and objects
//! one report tests. Deterministic: the bootstrap's generator is seeded by the caller, so
//! one window explained twice gives one answer.

/// Arithmetic mean; 0 for no values.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Median (the mean of the middle two for an even count); 0 for no values.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    } else {
        sorted[mid]
    }
}

/// Median absolute deviation, scaled to estimate a normal distribution's standard
/// deviation (x 1.4826).
pub fn mad(values: &[f64]) -> f64 {
    let center = median(values);
    let deviations: Vec<f64> = values.iter().map(|v| (v - center).abs()).collect();
    1.4826 * median(&deviations)
}

/// A small, fast, seedable generator (splitmix64): the bootstrap needs reproducible
/// draws, not cryptographic ones.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift; the tiny bias at these sizes does not matter here.
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Draws of the bootstrap (p-values resolve down to 1/(DRAWS+1)).
pub const DRAWS: usize = 2000;

/// How surprising a window mean of `window_len` buckets at `observed` is, given the
/// baseline's buckets: the one-sided p-value that the baseline's own variation gives a
/// window-length mean at least `observed - mean(baseline)` above the baseline's mean.
///
/// `runs` are the baseline's buckets in time order, one run per contiguous baseline
/// period; blocks are drawn within runs (moving-block bootstrap, block length up to 3
/// buckets), which keeps the short-range correlation of real load in the null
/// distribution. Returns 1.0 when there is nothing to compare (no baseline buckets).
pub fn bootstrap_p_value(
    runs: &[Vec<f64>],
    window_len: usize,
    observed: f64,
    rng: &mut SplitMix64,
) -> f64 {
    let all: Vec<f64> = runs.iter().flatten().copied().collect();
    if all.is_empty() || window_len == 0 {
        return 1.0;
    }
    let center = mean(&all);
    let excess = observed - center;
    let block = window_len.clamp(1, 3);
    // Every block start that fits in its run; a run shorter than a block is one block.
    let mut starts: Vec<(usize, usize, usize)> = Vec::new();
    for (index, run) in runs.iter().enumerate() {
        if run.is_empty() {
            continue;
        }
        let len = block.min(run.len());
        for start in 0..=run.len() - len {
            starts.push((index, start, len));
        }
    }
    let mut at_least = 0usize;
    for _ in 0..DRAWS {
        let mut sum = 0.0;
        let mut taken = 0usize;
        while taken < window_len {
            let (run, start, len) = starts[rng.below(starts.len())];
            for value in runs[run][start..start + len]
                .iter()
                .take(window_len - taken)
            {
                sum += value;
                taken += 1;
            }
        }
        // The small tolerance counts draws equal to the observation (a window that did
        // not change at all has a p-value near 1, not near 0).
        if sum / window_len as f64 - center >= excess - 1e-9 * excess.abs().max(1.0) {
            at_least += 1;
        }
    }
    (1 + at_least) as f64 / (1 + DRAWS) as f64
}

/// Benjamini-Hochberg adjusted p-values (q-values), in the input's order: rejecting every
/// hypothesis with q <= alpha keeps the expected share of false discoveries at alpha.
pub fn benjamini_hochberg(p_values: &[f64]) -> Vec<f64> {
    let n = p_values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut adjusted = vec![1.0; n];
    let mut running = 1.0_f64;
    for (rank, &index) in order.iter().enumerate().rev() {
        let q = (p_values[index] * n as f64 / (rank + 1) as f64).min(1.0);
        running = running.min(q);
        adjusted[index] = running;
    }
    adjusted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robust_location_and_spread() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-12);
        // One wild value moves neither the median nor the MAD much.
        let values = [10.0, 11.0, 9.0, 10.0, 1000.0];
        assert!((median(&values) - 10.0).abs() < 1e-12);
        assert!((mad(&values) - 1.4826).abs() < 1e-9);
        assert!(mean(&[]).abs() < f64::EPSILON && median(&[]).abs() < f64::EPSILON);
    }

    #[test]
    fn the_generator_is_deterministic_and_covers_its_range() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let x = a.below(5);
            assert_eq!(x, b.below(5));
            seen[x] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    fn noisy_baseline(rng: &mut SplitMix64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| 100.0 + (rng.below(21) as f64 - 10.0))
            .collect()
    }

    #[test]
    fn a_clear_rise_is_significant_and_noise_is_not() {
        let mut rng = SplitMix64::new(1);
        let baseline = vec![noisy_baseline(&mut rng, 30), noisy_baseline(&mut rng, 30)];
        let p_rise = bootstrap_p_value(&baseline, 6, 160.0, &mut rng);
        assert!(p_rise < 0.001, "p = {p_rise}");
        let p_same = bootstrap_p_value(&baseline, 6, 100.0, &mut rng);
        assert!(p_same > 0.2, "p = {p_same}");
        // A fall is not a rise.
        let p_fall = bootstrap_p_value(&baseline, 6, 50.0, &mut rng);
        assert!(p_fall > 0.9, "p = {p_fall}");
        // A flat baseline and a flat window: nothing happened.
        let flat = vec![vec![5.0; 20]];
        assert!(bootstrap_p_value(&flat, 4, 5.0, &mut rng) > 0.9);
        assert!(bootstrap_p_value(&[], 4, 5.0, &mut rng) >= 1.0);
    }

    #[test]
    fn the_null_distribution_is_calibrated() {
        // Windows drawn from the baseline's own distribution are "significant" at 5%
        // about 5% of the time, not more.
        let mut rng = SplitMix64::new(42);
        let baseline = vec![noisy_baseline(&mut rng, 60)];
        let mut false_alarms = 0;
        for _ in 0..200 {
            let window = noisy_baseline(&mut rng, 6);
            if bootstrap_p_value(&baseline, 6, mean(&window), &mut rng) <= 0.05 {
                false_alarms += 1;
            }
        }
        assert!(false_alarms <= 20, "{false_alarms} of 200");
    }

    #[test]
    fn benjamini_hochberg_matches_the_textbook_example() {
        let p = [0.01, 0.04, 0.03, 0.005, 0.5];
        let q = benjamini_hochberg(&p);
        // Sorted: 0.005 (x5/1 = 0.025), 0.01 (x5/2 = 0.025), 0.03 (x5/3 = 0.05),
        // 0.04 (x5/4 = 0.05), 0.5 (x5/5 = 0.5).
        let expected = [0.025, 0.05, 0.05, 0.025, 0.5];
        for (got, want) in q.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{q:?}");
        }
        assert!(benjamini_hochberg(&[]).is_empty());
    }
}
