//! Long waits back where they happened. An agent reports a wait when it ends, so a thread
//! blocked for a minute puts the whole minute into the one batch (and bucket) it woke up
//! in: a spike of tens of seconds per second that never happened, and nothing in the
//! buckets it actually spanned. Before the detector and `why` read per-bucket rates, the
//! waits of a (series, bucket) that lasted longer than a bucket on average are spread
//! back over the time they lasted (each began, on average, its mean duration before the
//! bucket's end); the part before the range read is dropped (it belongs to earlier time).
//! The events stay in the bucket they ended in. On-CPU samples and the smoothed RTT are
//! not waits and are left alone.
//!
//! The mean is per series and bucket, so one long wait among many short ones of the same
//! series is spread less than it lasted; exact accounting needs the agent to report the
//! waits still in progress at each batch end (see ARCHITECTURE.md, invariants).

use std::collections::BTreeMap;

use crate::storage::SeriesTotals;

const NS: i64 = 1_000_000_000;

/// Signals whose values are not wait time.
const NOT_WAITS: &[&str] = &["on-cpu", "tcp"];

/// Spreads every long wait of `series` (buckets of `step_s` seconds, read from `from_s`
/// on) back over the buckets it spanned.
pub fn spread_long_waits(series: &mut [SeriesTotals], step_s: i64, from_s: i64) {
    let step_ns = step_s.max(1) * NS;
    for s in series {
        if NOT_WAITS.contains(&s.signal.as_str())
            || !s
                .points
                .iter()
                .any(|&(_, ns, count)| count > 0 && ns / count > step_ns)
        {
            continue;
        }
        let mut spread: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for &(bucket, ns, count) in &s.points {
            let mean = if count > 0 { ns / count } else { 0 };
            if mean <= step_ns {
                let entry = spread.entry(bucket).or_default();
                entry.0 += ns;
                entry.1 += count;
                continue;
            }
            // `count` waits, each `mean` long, ending with the bucket; the last bucket
            // reached (where they began) takes what rounding left.
            let end_ns = (bucket + step_s) * NS;
            let began_ns = end_ns - mean;
            let reach_ns = began_ns.max(from_s * NS);
            let mut left = ns;
            let mut k = bucket;
            let mut events_placed = false;
            while k * NS + step_ns > reach_ns && left > 0 && k * NS >= from_s * NS {
                let overlap = (k + step_s) * NS - (k * NS).max(began_ns);
                let part = if k * NS <= began_ns {
                    left
                } else {
                    count.saturating_mul(overlap).min(left)
                };
                let entry = spread.entry(k).or_default();
                entry.0 += part;
                if k == bucket {
                    entry.1 += count;
                    events_placed = true;
                }
                left -= part;
                k -= step_s;
            }
            if !events_placed {
                spread.entry(bucket).or_default().1 += count;
            }
        }
        s.points = spread
            .into_iter()
            .map(|(bucket, (ns, count))| (bucket, ns, count))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(signal: &str, points: &[(i64, i64, i64)]) -> SeriesTotals {
        SeriesTotals {
            host: "h".into(),
            service: "s".into(),
            signal: signal.into(),
            cause: "other".into(),
            labels: stallscope_profile::Labels::new(),
            points: points.to_vec(),
        }
    }

    #[test]
    fn a_minute_long_wait_is_one_thread_waiting_for_a_minute() {
        // One wait of 60 s reported in the bucket [100, 110): six buckets of 10 s each.
        let mut data = [series("off-cpu", &[(100, 60 * NS, 1)])];
        spread_long_waits(&mut data, 10, 0);
        assert_eq!(
            data[0].points,
            [
                (50, 10 * NS, 0),
                (60, 10 * NS, 0),
                (70, 10 * NS, 0),
                (80, 10 * NS, 0),
                (90, 10 * NS, 0),
                (100, 10 * NS, 1)
            ]
        );
    }

    #[test]
    fn the_part_before_the_range_is_dropped_and_short_waits_stay() {
        let mut data = [series("lock", &[(80, 3 * NS, 30), (100, 25 * NS, 1)])];
        spread_long_waits(&mut data, 10, 90);
        assert_eq!(
            data[0].points,
            [(80, 3 * NS, 30), (90, 10 * NS, 0), (100, 10 * NS, 1)]
        );
    }

    #[test]
    fn partial_buckets_get_their_share_and_totals_add_up() {
        // Two waits of 15 s each ending in [20, 30): back to 15 s, half of [10, 20).
        let mut data = [series("socket-wait", &[(20, 30 * NS, 2)])];
        spread_long_waits(&mut data, 10, 0);
        assert_eq!(data[0].points, [(10, 10 * NS, 0), (20, 20 * NS, 2)]);
        let total: i64 = data[0].points.iter().map(|p| p.1).sum();
        assert_eq!(total, 30 * NS);
    }

    #[test]
    fn cpu_samples_and_short_waits_are_left_alone() {
        let points = [(0, 50 * NS, 1)];
        let mut data = [
            series("on-cpu", &points),
            series("off-cpu", &[(0, 5 * NS, 1)]),
        ];
        spread_long_waits(&mut data, 10, 0);
        assert_eq!(data[0].points, points);
        assert_eq!(data[1].points, [(0, 5 * NS, 1)]);
    }
}
