//! Which periods count as "normal" for a window: the time just before it on the same day
//! and the same time on earlier days, minus every known window (of any source) of the
//! same scope, and minus a guard before the onset (an onset estimate can be a bucket
//! late). The comparison is bucket by bucket, so the baseline is kept as runs of
//! contiguous buckets.

use super::report::{BaselinePeriod, Span};

const NS: i64 = 1_000_000_000;
const DAY_S: i64 = 86_400;

/// How far back to look for a baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaselinePolicy {
    /// The time just before the window: this many window lengths...
    pub lengths_before: i64,
    /// ...but at least this long and at most this long (seconds).
    pub min_lookback_s: i64,
    pub max_lookback_s: i64,
    /// The same time on up to this many earlier days.
    pub earlier_days: i64,
    /// Buckets right before the onset left out.
    pub guard_buckets: i64,
}

impl Default for BaselinePolicy {
    fn default() -> Self {
        Self {
            lengths_before: 12,
            min_lookback_s: 30 * 60,
            max_lookback_s: 24 * 3600,
            earlier_days: 7,
            guard_buckets: 1,
        }
    }
}

/// A candidate period to read, before buckets are dropped for windows and missing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// `[from_s, until_s)`, whole buckets.
    pub from_s: i64,
    pub until_s: i64,
    /// 0 for the time before the window, N for the same time N days earlier.
    pub days_back: i64,
}

impl BaselinePolicy {
    /// The periods to read for a window `[from_s, until_s)` in buckets of `step_s`,
    /// none of them reaching into the window or before `earliest_s`.
    pub fn candidates(
        &self,
        from_s: i64,
        until_s: i64,
        step_s: i64,
        earliest_s: i64,
    ) -> Vec<Candidate> {
        let length = (until_s - from_s).max(step_s);
        let lookback =
            (length * self.lengths_before).clamp(self.min_lookback_s, self.max_lookback_s);
        let before_until = from_s - self.guard_buckets * step_s;
        let before_from = (before_until - lookback).max(earliest_s);
        let mut out = Vec::new();
        if before_from < before_until {
            out.push(Candidate {
                from_s: before_from,
                until_s: before_until,
                days_back: 0,
            });
        }
        for days in 1..=self.earlier_days {
            let from = from_s - days * DAY_S;
            let until = until_s - days * DAY_S;
            // Skip days that overlap the stretch just before the window (short lookbacks
            // never do; a day-long one would count those buckets twice).
            if until <= earliest_s || (until > before_from && from < before_until) {
                continue;
            }
            out.push(Candidate {
                from_s: from.max(earliest_s),
                until_s: until,
                days_back: days,
            });
        }
        out
    }
}

/// The buckets of one candidate that are usable: inside no window and with data.
pub fn usable_buckets(
    candidate: &Candidate,
    step_s: i64,
    with_data: impl Fn(i64) -> bool,
    windows: &[Span],
) -> Vec<Vec<i64>> {
    let mut runs: Vec<Vec<i64>> = Vec::new();
    let mut run: Vec<i64> = Vec::new();
    let mut bucket = candidate.from_s;
    while bucket < candidate.until_s {
        let inside_window = windows.iter().any(|w| {
            let (from_ns, until_ns) = (bucket * NS, (bucket + step_s) * NS);
            w.from_unix_ns < until_ns && w.until_unix_ns > from_ns
        });
        if !inside_window && with_data(bucket) {
            run.push(bucket);
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
        bucket += step_s;
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// The report's description of the baseline: each run as a period, labelled by where it
/// came from.
pub fn describe(
    runs: &[(Candidate, Vec<Vec<i64>>)],
    step_s: i64,
    given: bool,
) -> Vec<BaselinePeriod> {
    let mut out = Vec::new();
    for (candidate, candidate_runs) in runs {
        for run in candidate_runs {
            let (Some(first), Some(last)) = (run.first(), run.last()) else {
                continue;
            };
            let kind = if given {
                "given".to_owned()
            } else if candidate.days_back == 0 {
                "before".to_owned()
            } else {
                format!("day-{}", candidate.days_back)
            };
            out.push(BaselinePeriod {
                span: Span {
                    from_unix_ns: first * NS,
                    until_unix_ns: (last + step_s) * NS,
                },
                kind,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_the_time_before_and_the_same_time_on_earlier_days() {
        let policy = BaselinePolicy::default();
        let day = DAY_S;
        // A 5-minute window at 10:00 on day 10, data since day 8.
        let from = 10 * day + 36_000;
        let candidates = policy.candidates(from, from + 300, 10, 8 * day);
        // 12 x 5 min = 60 min before, less the one-bucket guard.
        assert_eq!(
            candidates[0],
            Candidate {
                from_s: from - 10 - 3600,
                until_s: from - 10,
                days_back: 0
            }
        );
        // Days 9 and 8 (the others are before the data).
        assert_eq!(candidates.len(), 3);
        assert_eq!(candidates[1].from_s, from - day);
        assert_eq!(candidates[2].days_back, 2);
        // A long window: the lookback is capped at a day and the earlier days that
        // overlap it are skipped.
        let long = policy.candidates(from, from + 3 * 3600, 60, 0);
        assert_eq!(long[0].until_s - long[0].from_s, 24 * 3600);
        assert!(long.iter().skip(1).all(|c| c.days_back >= 2));
    }

    #[test]
    fn windows_and_missing_buckets_break_the_baseline_into_runs() {
        let candidate = Candidate {
            from_s: 0,
            until_s: 100,
            days_back: 0,
        };
        let windows = [Span {
            from_unix_ns: 30 * NS,
            until_unix_ns: 45 * NS,
        }];
        let runs = usable_buckets(&candidate, 10, |b| b != 80, &windows);
        assert_eq!(runs, vec![vec![0, 10, 20], vec![50, 60, 70], vec![90]]);
        let described = describe(&[(candidate, runs)], 10, false);
        assert_eq!(described.len(), 3);
        assert_eq!(described[1].span.from_unix_ns, 50 * NS);
        assert_eq!(described[1].span.until_unix_ns, 80 * NS);
        assert_eq!(described[1].kind, "before");
    }
}
