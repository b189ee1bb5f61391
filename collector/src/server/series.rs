//! The `Series` query's lines: by signal or by cause label (storage sums those), or by
//! `why`'s cause categories, which add up (request-path waits only, idle set apart: the
//! same [`CategoryBuckets`] `why` ranks), optionally one set of lines per (host, service).

use std::collections::BTreeMap;

use stallscope_proto::v1;
use tonic::Status;

use super::storage_status;
use crate::{
    explain::categories::{Category, CategoryBuckets},
    storage::{Filter, GroupBy, SeriesTotals, Storage, TimeRange},
};

const NS: i64 = 1_000_000_000;

/// (bucket start in Unix seconds, value, count), as storage gives them.
type Points = Vec<(i64, i64, i64)>;

/// The line key of idle time in category series: never a cause, shown apart.
pub const IDLE_KEY: &str = "idle";

/// How a `Series` request groups its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// By signal or by the samples' cause label, summed by storage.
    Stored(GroupBy),
    /// By `why`'s cause categories, plus idle.
    Category,
}

impl Grouping {
    pub fn parse(text: &str) -> Result<Self, Status> {
        match text {
            "" | "signal" => Ok(Self::Stored(GroupBy::Signal)),
            "cause" => Ok(Self::Stored(GroupBy::Cause)),
            "category" => Ok(Self::Category),
            other => Err(Status::invalid_argument(format!(
                "group_by `{other}`: use signal, cause or category"
            ))),
        }
    }
}

fn points(points: impl IntoIterator<Item = (i64, i64, i64)>) -> Vec<v1::SeriesPoint> {
    points
        .into_iter()
        .map(|(t, value, count)| v1::SeriesPoint {
            unix_ns: t.saturating_mul(1_000_000_000),
            value,
            count,
        })
        .collect()
}

/// Sums (time, value, count) points into marks: steps of `step_s` that start at
/// multiples of the step.
fn into_marks(points: Points, step_s: i64) -> Points {
    let mut sums: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (t, value, count) in points {
        let sum = sums.entry(t - t.rem_euclid(step_s)).or_default();
        sum.0 = sum.0.saturating_add(value);
        sum.1 = sum.1.saturating_add(count);
    }
    sums.into_iter()
        .map(|(t, (value, count))| (t, value, count))
        .collect()
}

/// A range as storage reads it for marks of `step_s`: storage aligns its steps to the
/// start of the range it is asked for, marks start at multiples of the step. So the part
/// before the first mark boundary (if any) is read bucket by bucket (`(range, 1)`), and
/// the rest, which starts on a boundary, at the mark step, where both alignments agree.
fn mark_aligned_reads(range: TimeRange, step_s: i64) -> Vec<(TimeRange, i64)> {
    let step_ns = step_s.saturating_mul(NS);
    let boundary = range
        .from_unix_ns
        .div_euclid(step_ns)
        .saturating_add(i64::from(range.from_unix_ns.rem_euclid(step_ns) != 0))
        .saturating_mul(step_ns);
    let mut reads = Vec::new();
    if boundary > range.from_unix_ns {
        reads.push((
            TimeRange {
                from_unix_ns: range.from_unix_ns,
                until_unix_ns: boundary.min(range.until_unix_ns),
            },
            1,
        ));
    }
    if boundary < range.until_unix_ns {
        reads.push((
            TimeRange {
                from_unix_ns: boundary.max(range.from_unix_ns),
                until_unix_ns: range.until_unix_ns,
            },
            step_s,
        ));
    }
    reads
}

/// The lines of one request (its range, filter and step already validated), one point
/// per mark (a multiple of `step_s`).
pub async fn lines<S: Storage>(
    storage: &S,
    range: TimeRange,
    filter: Filter,
    grouping: Grouping,
    step_s: i64,
    per_scope: bool,
) -> Result<Vec<v1::SeriesLine>, Status> {
    let step_s = step_s.max(1);
    match grouping {
        Grouping::Stored(_) if per_scope => Err(Status::invalid_argument(
            "series: per_scope needs group_by category (signals and cause labels overlap, so they are not split per scope)",
        )),
        Grouping::Stored(group_by) => {
            // Lines by key, in the order storage first gives them.
            let mut order: Vec<String> = Vec::new();
            let mut merged: BTreeMap<String, (String, Points)> = BTreeMap::new();
            for (part, part_step) in mark_aligned_reads(range, step_s) {
                let lines = storage
                    .series(part, filter.clone(), group_by, part_step)
                    .await
                    .map_err(|e| storage_status(&e))?;
                for line in lines {
                    let entry = merged.entry(line.key.clone()).or_insert_with(|| {
                        order.push(line.key.clone());
                        (line.value_unit.clone(), Vec::new())
                    });
                    entry.1.extend(line.points);
                }
            }
            Ok(order
                .into_iter()
                .filter_map(|key| {
                    let (value_unit, points_of) = merged.remove(&key)?;
                    Some(v1::SeriesLine {
                        key,
                        value_unit,
                        points: points(into_marks(points_of, step_s)),
                        ..v1::SeriesLine::default()
                    })
                })
                .collect())
        }
        Grouping::Category => {
            let mut totals = Vec::new();
            for (part, part_step) in mark_aligned_reads(range, step_s) {
                totals.extend(
                    storage
                        .series_totals(part, filter.clone(), part_step)
                        .await
                        .map_err(|e| storage_status(&e))?,
                );
            }
            for series in &mut totals {
                series.points = into_marks(std::mem::take(&mut series.points), step_s);
            }
            Ok(category_lines(totals, per_scope))
        }
    }
}

/// Category lines from stored series: one set for everything, or one per (host,
/// service). A category's line has a point for every bucket in which its scope has data
/// (zero where the category had none); categories without any time are left out.
pub fn category_lines(totals: Vec<SeriesTotals>, per_scope: bool) -> Vec<v1::SeriesLine> {
    let mut scopes: BTreeMap<(String, String), Vec<SeriesTotals>> = BTreeMap::new();
    for series in totals {
        let key = if per_scope {
            (series.host.clone(), series.service.clone())
        } else {
            (String::new(), String::new())
        };
        scopes.entry(key).or_default().push(series);
    }
    let mut out = Vec::new();
    for ((host, service), series) in scopes {
        let buckets = CategoryBuckets::from_series(&series);
        let mut line = |key: &str, values: Vec<(i64, i64, i64)>| {
            if values.iter().any(|&(_, value, _)| value != 0) {
                out.push(v1::SeriesLine {
                    key: key.to_owned(),
                    value_unit: "nanoseconds".to_owned(),
                    points: points(values),
                    host: host.clone(),
                    service: service.clone(),
                });
            }
        };
        for category in Category::ALL {
            line(
                category.label(),
                buckets
                    .buckets
                    .iter()
                    .map(|(&t, sums)| {
                        (
                            t,
                            sums.ns(category).round() as i64,
                            sums.events(category).round() as i64,
                        )
                    })
                    .collect(),
            );
        }
        line(
            IDLE_KEY,
            buckets
                .buckets
                .iter()
                .map(|(&t, sums)| (t, sums.idle_ns.round() as i64, 0))
                .collect(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use stallscope_profile::Labels;

    use super::*;

    #[test]
    fn reads_split_at_the_first_mark_boundary() {
        let range = |from_s: i64, until_s: i64| TimeRange {
            from_unix_ns: from_s * NS,
            until_unix_ns: until_s * NS,
        };
        // Aligned: one read at the mark step.
        assert_eq!(
            mark_aligned_reads(range(600, 1200), 60),
            vec![(range(600, 1200), 60)]
        );
        // Unaligned: the head bucket by bucket, the rest from the boundary.
        assert_eq!(
            mark_aligned_reads(range(610, 1200), 60),
            vec![(range(610, 660), 1), (range(660, 1200), 60)]
        );
        // Shorter than a step, inside one mark: one read, bucket by bucket.
        assert_eq!(
            mark_aligned_reads(range(610, 640), 60),
            vec![(range(610, 640), 1)]
        );
    }

    fn series(host: &str, service: &str, signal: &str, cause: &str, ns: i64) -> SeriesTotals {
        SeriesTotals {
            host: host.into(),
            service: service.into(),
            signal: signal.into(),
            cause: cause.into(),
            labels: Labels::new(),
            points: vec![(100, ns, 1), (110, ns * 2, 2)],
        }
    }

    #[test]
    fn categories_add_up_per_scope_and_idle_stays_apart() {
        let totals = vec![
            series("a", "web", "on-cpu", "cpu-work", 10),
            series("a", "web", "off-cpu", "lock", 30),
            series("b", "web", "off-cpu", "disk", 7),
            // Network time without socket waits counts whole, as in `why`.
            series("b", "web", "off-cpu", "network", 5),
        ];
        let lines = category_lines(totals.clone(), true);
        let keys: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.host.as_str(), l.key.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("a", "cpu-work"),
                ("a", "lock"),
                ("b", "disk"),
                ("b", "network")
            ]
        );
        assert_eq!(lines[1].points[1].value, 60);
        assert_eq!(lines[1].points[1].unix_ns, 110_000_000_000);
        let merged = category_lines(totals, false);
        assert!(merged.iter().all(|l| l.host.is_empty()));
        assert_eq!(merged.len(), 4);
    }

    #[test]
    fn per_scope_needs_categories() {
        assert!(matches!(
            Grouping::parse("category"),
            Ok(Grouping::Category)
        ));
        assert!(Grouping::parse("peer").is_err());
    }
}
