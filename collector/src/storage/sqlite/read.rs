//! The SQLite read path: series chosen by their indexed columns, then their rows (one
//! per series and bucket, its stacks in a blob) read in one clustered scan per service and
//! summed per (series, stack), whole hours from the rollup and the rest from `samples`,
//! all in one read transaction so maintenance cannot commit between the parts.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
};

use rusqlite::{Connection, OptionalExtension as _, params};
use stallscope_profile::{Labels, Profile};

use super::{rollup::RollupSpan, stacks};
use crate::{
    batch::{SignalDef, StoredStack},
    storage::{
        Filter, GroupBy, LineSums, Losses, ProfileBuilder, SeriesColumns, SeriesLine, SeriesTotals,
        StorageError, TimeRange,
    },
};

/// A series row as queries see it.
pub struct SeriesRow {
    id: i64,
    svc: i64,
    host: String,
    service: String,
    signal: String,
    cause: String,
    labels: Labels,
}

pub fn matching_series(
    conn: &Connection,
    range: TimeRange,
    filter: &Filter,
) -> Result<Vec<SeriesRow>, StorageError> {
    let (from_s, until_s) = range.seconds();
    let mut sql = String::from(
        "SELECT id, host, service, pid, signal, cause, labels, svc FROM series WHERE last_s >= ?1 AND first_s < ?2",
    );
    let mut args: Vec<String> = Vec::new();
    for (column, value) in [
        ("host", &filter.host),
        ("service", &filter.service),
        ("pid", &filter.pid),
        ("cause", &filter.cause),
    ] {
        if let Some(value) = value {
            args.push(value.clone());
            let _ = write!(sql, " AND {column} = ?{}", args.len() + 2);
        }
    }
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut params: Vec<&dyn rusqlite::ToSql> = vec![&from_s, &until_s];
    params.extend(args.iter().map(|a| a as &dyn rusqlite::ToSql));
    let mut rows = stmt.query(params.as_slice())?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let host: String = row.get(1)?;
        let service: String = row.get(2)?;
        let pid: String = row.get(3)?;
        let signal: String = row.get(4)?;
        let cause: String = row.get(5)?;
        let labels_json: String = row.get(6)?;
        let columns = SeriesColumns {
            host: &host,
            service: &service,
            pid: &pid,
            signal: &signal,
            cause: &cause,
        };
        if let Some(labels) = filter.matching_labels(&columns, &labels_json) {
            out.push(SeriesRow {
                id: row.get(0)?,
                svc: row.get(7)?,
                host,
                service,
                signal,
                cause,
                labels,
            });
        }
    }
    Ok(out)
}

pub fn load_signals(conn: &Connection) -> Result<Vec<SignalDef>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, value_kind, value_unit, count_kind, count_unit FROM signals",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(SignalDef {
            name: row.get(0)?,
            value_kind: row.get(1)?,
            value_unit: row.get(2)?,
            count_kind: row.get(3)?,
            count_unit: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn losses_in(
    conn: &Connection,
    range: TimeRange,
    host: Option<&str>,
) -> Result<Losses, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT losses FROM batches WHERE start_ns >= ?1 AND start_ns < ?2 AND (?3 IS NULL OR host = ?3)",
    )?;
    let mut total = Losses::new();
    let rows = stmt.query_map(
        params![range.from_unix_ns, range.until_unix_ns, host],
        |row| row.get::<_, String>(0),
    )?;
    for json in rows {
        let losses: BTreeMap<String, u64> = serde_json::from_str(&json?).unwrap_or_default();
        for (reason, count) in losses {
            *total.entry(reason).or_default() += count;
        }
    }
    Ok(total)
}

pub fn query_profile(
    conn: &Connection,
    range: TimeRange,
    filter: &Filter,
) -> Result<Profile, StorageError> {
    // One snapshot for the span, the rollup and the samples: a maintenance pass that
    // commits in between could otherwise move rows between the parts.
    let snapshot = conn.unchecked_transaction()?;
    let (from_s, until_s) = range.seconds();
    let signals = load_signals(&snapshot)?;
    let mut builder = ProfileBuilder::new(&signals);
    let series = matching_series(&snapshot, range, filter)?;
    let mut by_service: HashMap<i64, HashSet<i64>> = HashMap::new();
    for s in &series {
        by_service.entry(s.svc).or_default().insert(s.id);
    }
    let mut sums: HashMap<(i64, i64), (i64, i64)> = HashMap::new();
    for_stored_rows(&snapshot, &by_service, from_s, until_s, |series, packed| {
        for entry in stacks::decode(packed) {
            let entry = entry?;
            let sum = sums.entry((series, entry.stack)).or_default();
            sum.0 = sum.0.saturating_add(entry.value);
            sum.1 = sum.1.saturating_add(entry.count);
        }
        Ok(())
    })?;
    let mut sums: Vec<((i64, i64), (i64, i64))> = sums.into_iter().collect();
    // A stable order, so equal queries build equal profiles.
    sums.sort_unstable_by_key(|entry| entry.0);
    let by_id: HashMap<i64, &SeriesRow> = series.iter().map(|s| (s.id, s)).collect();
    let mut stack_stmt = snapshot.prepare_cached("SELECT frames FROM stacks WHERE id = ?1")?;
    for ((series_id, stack), (value, count)) in sums {
        let Some(series) = by_id.get(&series_id) else {
            continue;
        };
        if !builder.has_stack(stack) {
            let blob: Option<Vec<u8>> = stack_stmt.query_row([stack], |r| r.get(0)).optional()?;
            if let Some(frames) = blob.as_deref().and_then(StoredStack::decode_frames) {
                builder.add_stack(stack, frames);
            }
        }
        builder.add(&series.signal, &series.labels, stack, value, count);
    }
    drop(stack_stmt);
    let losses = losses_in(&snapshot, range, filter.host.as_deref())?;
    snapshot.commit()?;
    Ok(builder.finish(range, format!("{} series matched", series.len()), losses))
}

/// Calls `row(series, packed stacks)` for every stored row of the wanted series
/// (`service id -> series ids`) in `[from_s, until_s)`: whole hours the rollup holds come
/// from it, the edges from the 10 s rows. Each part is one clustered scan per service,
/// crossing into Rust once per (series, bucket): the stacks of a row come packed in its
/// blob. Call inside one read transaction, so maintenance cannot move rows between the
/// parts.
fn for_stored_rows(
    conn: &Connection,
    by_service: &HashMap<i64, HashSet<i64>>,
    from_s: i64,
    until_s: i64,
    mut row: impl FnMut(i64, &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let span = RollupSpan::load(conn)?;
    let (lo, hi) = span.usable(from_s, until_s);
    let mut parts: Vec<(&str, i64, i64)> = Vec::with_capacity(3);
    if lo < hi {
        parts.push((SAMPLES_SUMS, from_s, lo));
        parts.push((ROLLUP_SUMS, lo, hi));
        parts.push((SAMPLES_SUMS, hi, until_s));
    } else {
        parts.push((SAMPLES_SUMS, from_s, until_s));
    }
    for (sql, part_from, part_until) in parts {
        if part_from >= part_until {
            continue;
        }
        let mut stmt = conn.prepare_cached(sql)?;
        for (svc, wanted) in by_service {
            let mut rows = stmt.query(params![svc, part_from, part_until])?;
            while let Some(r) = rows.next()? {
                let series: i64 = r.get(0)?;
                if wanted.contains(&series) {
                    row(series, blob(r, 1)?)?;
                }
            }
        }
    }
    Ok(())
}

/// The value totals of the given series (`service id -> series ids`) over `range`.
pub fn value_totals(
    conn: &Connection,
    range: TimeRange,
    by_service: &HashMap<i64, HashSet<i64>>,
) -> Result<HashMap<i64, i64>, StorageError> {
    let snapshot = conn.unchecked_transaction()?;
    let (from_s, until_s) = range.seconds();
    let mut totals: HashMap<i64, i64> = HashMap::new();
    for_stored_rows(&snapshot, by_service, from_s, until_s, |series, packed| {
        let total = totals.entry(series).or_default();
        for entry in stacks::decode(packed) {
            *total = total.saturating_add(entry?.value);
        }
        Ok(())
    })?;
    snapshot.commit()?;
    Ok(totals)
}

const SAMPLES_SUMS: &str =
    "SELECT series, stacks FROM samples WHERE svc = ?1 AND ts >= ?2 AND ts < ?3";
const ROLLUP_SUMS: &str =
    "SELECT series, stacks FROM rollup WHERE svc = ?1 AND hour >= ?2 AND hour < ?3";

/// Column `index` of `row` as a blob.
fn blob<'a>(row: &'a rusqlite::Row<'_>, index: usize) -> Result<&'a [u8], StorageError> {
    Ok(row
        .get_ref(index)?
        .as_blob()
        .map_err(rusqlite::Error::from)?)
}

/// Calls `row(series, ts, value, count)` for every stored (series, bucket) of `series` in
/// `[from_s, until_s)`, summed over its stacks: one clustered scan per service.
fn for_rows(
    conn: &Connection,
    series: &[SeriesRow],
    from_s: i64,
    until_s: i64,
    mut row: impl FnMut(i64, i64, i64, i64),
) -> Result<(), StorageError> {
    let mut by_service: HashMap<i64, HashSet<i64>> = HashMap::new();
    for s in series {
        by_service.entry(s.svc).or_default().insert(s.id);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT series, ts, stacks FROM samples WHERE svc = ?1 AND ts >= ?2 AND ts < ?3",
    )?;
    for (svc, wanted) in by_service {
        let mut rows = stmt.query(params![svc, from_s, until_s])?;
        while let Some(r) = rows.next()? {
            let series: i64 = r.get(0)?;
            if !wanted.contains(&series) {
                continue;
            }
            let (mut value, mut count) = (0_i64, 0_i64);
            for entry in stacks::decode(blob(r, 2)?) {
                let entry = entry?;
                value = value.saturating_add(entry.value);
                count = count.saturating_add(entry.count);
            }
            row(series, r.get(1)?, value, count);
        }
    }
    Ok(())
}

pub fn query_series(
    conn: &Connection,
    range: TimeRange,
    filter: &Filter,
    group_by: GroupBy,
    step_s: i64,
) -> Result<Vec<SeriesLine>, StorageError> {
    let (from_s, until_s) = range.seconds();
    let step_s = step_s.max(1);
    let units: HashMap<String, String> = load_signals(conn)?
        .into_iter()
        .map(|s| (s.name, s.value_unit))
        .collect();
    let mut lines: LineSums = BTreeMap::new();
    let series = matching_series(conn, range, filter)?;
    let key_of: HashMap<i64, (String, String)> = series
        .iter()
        .map(|s| {
            let unit = units.get(&s.signal).cloned().unwrap_or_default();
            (s.id, (series_key(group_by, &s.signal, &s.cause), unit))
        })
        .collect();
    for_rows(
        conn,
        &series,
        from_s,
        until_s,
        |series, ts, value, count| {
            if let Some((key, unit)) = key_of.get(&series) {
                let line = lines
                    .entry(key.clone())
                    .or_insert_with(|| (unit.clone(), BTreeMap::new()));
                let point = line
                    .1
                    .entry(ts - (ts - from_s).rem_euclid(step_s))
                    .or_default();
                point.0 += value;
                point.1 += count;
            }
        },
    )?;
    Ok(lines
        .into_iter()
        .map(|(key, (value_unit, points))| SeriesLine {
            key,
            value_unit,
            points: points.into_iter().map(|(t, (v, c))| (t, v, c)).collect(),
        })
        .collect())
}

/// Each matching series with its totals per bucket of `step_s` (aligned to the range's
/// start).
pub fn query_series_totals(
    conn: &Connection,
    range: TimeRange,
    filter: &Filter,
    step_s: i64,
) -> Result<Vec<SeriesTotals>, StorageError> {
    let (from_s, until_s) = range.seconds();
    let step_s = step_s.max(1);
    let series = matching_series(conn, range, filter)?;
    let mut points: HashMap<i64, BTreeMap<i64, (i64, i64)>> = HashMap::new();
    for_rows(
        conn,
        &series,
        from_s,
        until_s,
        |series, ts, value, count| {
            let point = points
                .entry(series)
                .or_default()
                .entry(ts - (ts - from_s).rem_euclid(step_s))
                .or_default();
            point.0 = point.0.saturating_add(value);
            point.1 = point.1.saturating_add(count);
        },
    )?;
    Ok(series
        .into_iter()
        .filter_map(|s| {
            let buckets = points.remove(&s.id)?;
            Some(SeriesTotals {
                host: s.host,
                service: s.service,
                signal: s.signal,
                cause: s.cause,
                labels: s.labels,
                points: buckets.into_iter().map(|(t, (v, c))| (t, v, c)).collect(),
            })
        })
        .collect())
}

/// The line a series adds to: its signal, or its cause (the signal stands in for samples
/// that carry no cause label yet).
pub fn series_key(group_by: GroupBy, signal: &str, cause: &str) -> String {
    match group_by {
        GroupBy::Signal => signal.to_owned(),
        GroupBy::Cause if cause.is_empty() => signal.to_owned(),
        GroupBy::Cause => cause.to_owned(),
    }
}
