//! The SQLite write path: a group of batches in one transaction. Each batch gets its own
//! dedup marker (so each is still all-or-nothing and stored once); what the stored
//! batches add is then merged across the group and written with few statements: rows
//! sorted by key in multi-row upserts, one extent update per series, new stacks and
//! signals only, and, for batches whose hour is already rolled up, their sums added to
//! the rollup.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
};

use rusqlite::{CachedStatement, Connection, Transaction, params};

use super::{
    rollup::{self, RollupSpan},
    stacks,
};
use crate::{
    batch::{NormalizedBatch, SeriesDef},
    storage::{StorageError, StoreOutcome, bucket_of},
};

/// The writer connection and what it knows is stored, so each group only writes what is
/// new.
pub struct Writer {
    pub conn: Connection,
    pub known_stacks: HashSet<i64>,
    /// Series id -> the time extent known to be stored for it.
    pub known_series: HashMap<i64, (i64, i64)>,
    pub known_signals: HashSet<String>,
    pub rollup: RollupSpan,
    /// When the last group was committed (the writer waits for fuller groups under load).
    pub last_commit: Option<std::time::Instant>,
}

/// Most ids remembered in the writer's caches before they are cleared.
const CACHE_LIMIT: usize = 1 << 20;

/// One row to add: (svc, bucket, series, stack) and (value, count).
type KeyedRow = ((i64, i64, i64, i64), (i64, i64));

/// The clustering key of a service's rows.
pub fn service_key(service: &str) -> i64 {
    crate::hash::StableHasher::new().str(service).finish()
}

/// What the stored batches of a group add, merged.
#[derive(Default)]
struct GroupAdds<'a> {
    signals: Vec<&'a crate::batch::SignalDef>,
    stacks: Vec<(i64, Vec<u8>)>,
    /// Series whose stored extent must grow: (definition, first, last).
    series: HashMap<i64, (&'a SeriesDef, i64, i64)>,
    rows: Vec<KeyedRow>,
    rollup_rows: Vec<KeyedRow>,
}

pub fn store_group(
    writer: &mut Writer,
    batches: &[&NormalizedBatch],
    base_res: i64,
) -> Result<Vec<StoreOutcome>, StorageError> {
    let Writer {
        conn,
        known_stacks,
        known_series,
        known_signals,
        rollup,
        last_commit: _,
    } = writer;
    let tx = conn.transaction()?;
    let mut outcomes = Vec::with_capacity(batches.len());
    let mut adds = GroupAdds::default();
    let mut seen_stacks = HashSet::new();
    let mut seen_signals = HashSet::new();
    {
        let mut marker = tx.prepare_cached(
            "INSERT OR IGNORE INTO batches VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for batch in batches {
            let inserted = marker.execute(params![
                batch.agent,
                batch.sequence as i64,
                batch.host,
                batch.start_unix_ns,
                batch.duration_ns,
                batch.rows.len() as i64,
                batch.spool_dropped_total as i64,
                batch.losses_json(),
                crate::unix_now_ns(),
            ])?;
            if inserted == 0 {
                outcomes.push(StoreOutcome::Duplicate);
                continue;
            }
            outcomes.push(StoreOutcome::Stored);
            super::events::write(&tx, batch)?;
            let ts = bucket_of(batch.start_unix_ns.div_euclid(1_000_000_000), base_res);
            for signal in &batch.signals {
                if !known_signals.contains(&signal.name) && seen_signals.insert(&signal.name) {
                    adds.signals.push(signal);
                }
            }
            for stack in &batch.stacks {
                if !known_stacks.contains(&stack.id) && seen_stacks.insert(stack.id) {
                    adds.stacks.push((stack.id, batch.encode_stack(stack)));
                }
            }
            let mut svc_of: HashMap<i64, i64> = HashMap::with_capacity(batch.series.len());
            for series in &batch.series {
                svc_of.insert(series.id, service_key(&series.service));
                let covered = known_series
                    .get(&series.id)
                    .is_some_and(|&(first, last)| first <= ts && ts <= last);
                if !covered {
                    let extent = adds.series.entry(series.id).or_insert((series, ts, ts));
                    extent.1 = extent.1.min(ts);
                    extent.2 = extent.2.max(ts);
                }
            }
            let late = rollup.covers(rollup::floor_hour(ts));
            let hour = rollup::floor_hour(ts);
            for row in &batch.rows {
                let svc = svc_of.get(&row.series).copied().unwrap_or(0);
                adds.rows
                    .push(((svc, ts, row.series, row.stack), (row.value, row.count)));
                if late {
                    adds.rollup_rows
                        .push(((svc, hour, row.series, row.stack), (row.value, row.count)));
                }
            }
        }
    }
    write_adds(&tx, &mut adds)?;
    tx.commit()?;
    // Only after the commit: a rolled-back transaction must not leave ids marked stored.
    if known_stacks.len() > CACHE_LIMIT {
        known_stacks.clear();
    }
    known_stacks.extend(adds.stacks.iter().map(|(id, _)| *id));
    if known_series.len() > CACHE_LIMIT {
        known_series.clear();
    }
    for (id, (_, first, last)) in adds.series {
        let entry = known_series.entry(id).or_insert((first, last));
        entry.0 = entry.0.min(first);
        entry.1 = entry.1.max(last);
    }
    known_signals.extend(adds.signals.iter().map(|s| s.name.clone()));
    Ok(outcomes)
}

fn write_adds(tx: &Transaction<'_>, adds: &mut GroupAdds<'_>) -> Result<(), StorageError> {
    let mut signal_stmt =
        tx.prepare_cached("INSERT OR REPLACE INTO signals VALUES (?1, ?2, ?3, ?4, ?5)")?;
    for signal in &adds.signals {
        signal_stmt.execute(params![
            signal.name,
            signal.value_kind,
            signal.value_unit,
            signal.count_kind,
            signal.count_unit
        ])?;
    }
    let mut stack_stmt = tx.prepare_cached("INSERT OR IGNORE INTO stacks VALUES (?1, ?2)")?;
    for (id, frames) in &adds.stacks {
        stack_stmt.execute(params![id, frames])?;
    }
    // A known series only needs its extent widened (no labels to serialize); one the
    // update does not find (new, or deleted by retention since) is inserted whole.
    let mut extend_stmt = tx.prepare_cached(
        "UPDATE series SET first_s = min(first_s, ?2), last_s = max(last_s, ?3) WHERE id = ?1",
    )?;
    let mut series_stmt = tx.prepare_cached(
        "INSERT INTO series VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (id) DO UPDATE SET first_s = min(first_s, excluded.first_s),
                                        last_s = max(last_s, excluded.last_s)",
    )?;
    for (&id, &(series, first, last)) in &adds.series {
        if extend_stmt.execute(params![id, first, last])? == 0 {
            series_stmt.execute(params![
                id,
                series.agent,
                series.host,
                series.signal,
                series.service,
                series.process,
                series.pid,
                series.cause,
                series.labels_json(),
                first,
                last,
                service_key(&series.service)
            ])?;
        }
    }
    upsert_rows(tx, "samples", "ts", &mut adds.rows)?;
    upsert_rows(tx, "rollup", "hour", &mut adds.rollup_rows)?;
    Ok(())
}

/// Sums rows with equal keys, packs the stacks of each (svc, time, series) into one
/// blob (`stacks.rs`) and upserts those rows in key order (appending at few places of the
/// clustered table) with multi-row statements: SQLite's cost per statement execution is a
/// large part of a one-row upsert, and its cost per row a large part of the rest, so a
/// row per series instead of one per stack cuts both by the stacks per series.
fn upsert_rows(
    tx: &Transaction<'_>,
    table: &str,
    time_column: &str,
    rows: &mut Vec<KeyedRow>,
) -> Result<(), StorageError> {
    rows.sort_unstable_by_key(|row| row.0);
    rows.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            earlier.1.0 = earlier.1.0.saturating_add(later.1.0);
            earlier.1.1 = earlier.1.1.saturating_add(later.1.1);
            true
        } else {
            false
        }
    });
    // All blobs in one buffer: no allocation per packed row.
    let mut blobs = Vec::with_capacity(rows.len() * 12);
    let mut packed: Vec<((i64, i64, i64), std::ops::Range<usize>)> = Vec::new();
    for group in rows.chunk_by(|a, b| (a.0.0, a.0.1, a.0.2) == (b.0.0, b.0.1, b.0.2)) {
        let start = blobs.len();
        stacks::encode(
            group
                .iter()
                .map(|&((_, _, _, stack), (value, count))| stacks::Entry {
                    stack,
                    value,
                    count,
                }),
            &mut blobs,
        );
        let (svc, time, series, _) = group[0].0;
        packed.push(((svc, time, series), start..blobs.len()));
    }
    let mut rest = packed.as_slice();
    // Chunks of 128, 64, ... 1 rows: at most eight distinct statements per table, each
    // prepared once and cached.
    let mut size = MAX_ROWS_PER_STATEMENT;
    while !rest.is_empty() {
        while size > rest.len() {
            size /= 2;
        }
        let mut stmt = upsert_statement(tx, table, time_column, size)?;
        while rest.len() >= size {
            let (chunk, tail) = rest.split_at(size);
            let mut index = 1;
            for ((svc, time, series), blob) in chunk {
                for field in [svc, time, series] {
                    stmt.raw_bind_parameter(index, field)?;
                    index += 1;
                }
                stmt.raw_bind_parameter(index, &blobs[blob.clone()])?;
                index += 1;
            }
            stmt.raw_execute()?;
            rest = tail;
        }
    }
    Ok(())
}

const MAX_ROWS_PER_STATEMENT: usize = 128;

fn upsert_statement<'a>(
    tx: &'a Transaction<'_>,
    table: &str,
    time_column: &str,
    rows: usize,
) -> rusqlite::Result<CachedStatement<'a>> {
    let mut sql = format!("INSERT INTO {table} VALUES ");
    for index in 0..rows {
        if index > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?)");
    }
    let _ = write!(
        sql,
        " ON CONFLICT (svc, {time_column}, series) DO UPDATE SET stacks = stacks_merge(stacks, excluded.stacks)"
    );
    tx.prepare_cached(&sql)
}
