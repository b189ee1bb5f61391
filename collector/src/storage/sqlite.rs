//! The embedded backend: one SQLite file in WAL mode. A batch, its dedup marker, new
//! stacks and series go in one transaction, so a batch is either wholly stored with its
//! marker or not at all; rows of the same (series, bucket, stack) are summed on insert.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rusqlite::{Connection, OptionalExtension as _, params};
use stallscope_profile::{Labels, Profile};

use super::{
    AgentSummary, Filter, GroupBy, LineSums, Losses, MaintenanceReport, ProfileBuilder, Retention,
    SeriesColumns, SeriesLine, Storage, StorageError, StoreOutcome, Target, TimeRange, Window,
    bucket_of,
};
use crate::batch::{NormalizedBatch, SignalDef, StoredStack};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    agent TEXT NOT NULL, sequence INTEGER NOT NULL, host TEXT NOT NULL,
    start_ns INTEGER NOT NULL, duration_ns INTEGER NOT NULL, rows INTEGER NOT NULL,
    spool_dropped_total INTEGER NOT NULL, losses TEXT NOT NULL, received_ns INTEGER NOT NULL,
    PRIMARY KEY (agent, sequence)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS signals (
    name TEXT PRIMARY KEY, value_kind TEXT NOT NULL, value_unit TEXT NOT NULL,
    count_kind TEXT NOT NULL, count_unit TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stacks (id INTEGER PRIMARY KEY, frames BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, agent TEXT NOT NULL, host TEXT NOT NULL, signal TEXT NOT NULL,
    service TEXT NOT NULL, process TEXT NOT NULL, pid TEXT NOT NULL, cause TEXT NOT NULL,
    labels TEXT NOT NULL, first_s INTEGER NOT NULL, last_s INTEGER NOT NULL, svc INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS series_service ON series (service, last_s);
-- Rows are clustered by service, then time: a batch appends at a few places (one per
-- service) instead of all over the table, and a service's time range is one contiguous
-- scan.
CREATE TABLE IF NOT EXISTS samples (
    svc INTEGER NOT NULL, ts INTEGER NOT NULL, series INTEGER NOT NULL, stack INTEGER NOT NULL,
    value INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (svc, ts, series, stack)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS windows (
    from_ns INTEGER NOT NULL, until_ns INTEGER NOT NULL, host TEXT NOT NULL,
    service TEXT NOT NULL, source TEXT NOT NULL, note TEXT NOT NULL);
";

/// The SQLite backend. Cloning shares the connections.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Writer>,
    /// Batches waiting for the next group commit.
    pending: Mutex<Vec<Pending>>,
    reader: Mutex<Connection>,
    retention: Retention,
    path: PathBuf,
}

struct Writer {
    conn: Connection,
    /// Stacks and series known to be stored, so each batch only writes new ones.
    known_stacks: HashSet<i64>,
    known_series: HashMap<i64, (i64, i64)>,
    known_signals: HashSet<String>,
}

/// Most ids remembered in the writer's caches before they are cleared.
const CACHE_LIMIT: usize = 1 << 20;

fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, StorageError> {
    mutex
        .lock()
        .map_err(|_| StorageError::Worker("a storage thread panicked".to_owned()))
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/stallscope.db`.
    pub fn open(data_dir: &Path, retention: Retention) -> Result<Self, StorageError> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("stallscope.db");
        let conn = Connection::open(&path)?;
        // WAL: readers never block the writer. synchronous=FULL: a commit is on disk
        // before the collector acknowledges the batch.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute_batch(SCHEMA)?;
        let reader = Connection::open(&path)?;
        reader.busy_timeout(std::time::Duration::from_secs(30))?;
        reader.pragma_update(None, "cache_size", -65_536)?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(Writer {
                    conn,
                    known_stacks: HashSet::new(),
                    known_series: HashMap::new(),
                    known_signals: HashSet::new(),
                }),
                pending: Mutex::new(Vec::new()),
                reader: Mutex::new(reader),
                retention,
                path,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|err| StorageError::Worker(err.to_string()))?
    }
}

/// A batch waiting for the next group commit, with where its outcome goes.
type Pending = (
    NormalizedBatch,
    tokio::sync::oneshot::Sender<Result<StoreOutcome, StorageError>>,
);

/// Most rows committed in one transaction (a group of batches).
const GROUP_ROWS: usize = 200_000;

/// Group commit: whoever holds the writer takes every batch waiting and stores them in
/// one transaction (each with its own marker, so each is still all-or-nothing and
/// deduplicated), then answers each. Under load this turns many small commits into few.
fn commit_pending(inner: &Inner) {
    let Ok(mut writer) = inner.writer.lock() else {
        return;
    };
    loop {
        let group: Vec<Pending> = {
            let Ok(mut pending) = inner.pending.lock() else {
                return;
            };
            let mut rows = 0;
            let mut take = 0;
            while take < pending.len()
                && (take == 0 || rows + pending[take].0.rows.len() <= GROUP_ROWS)
            {
                rows += pending[take].0.rows.len();
                take += 1;
            }
            pending.drain(..take).collect()
        };
        if group.is_empty() {
            return;
        }
        let base = inner.retention.base_resolution_s();
        let batches: Vec<&NormalizedBatch> = group.iter().map(|(batch, _)| batch).collect();
        match store_group(&mut writer, &batches, base) {
            Ok(outcomes) => {
                for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for (_, reply) in group {
                    let _ = reply.send(Err(StorageError::Worker(format!(
                        "group commit failed: {message}"
                    ))));
                }
            }
        }
    }
}

/// What a committed batch added to the writer's caches.
#[derive(Default)]
struct Added {
    stacks: Vec<i64>,
    series: Vec<(i64, i64)>,
    signals: Vec<String>,
}

fn store_group(
    writer: &mut Writer,
    batches: &[&NormalizedBatch],
    base_res: i64,
) -> Result<Vec<StoreOutcome>, StorageError> {
    let Writer {
        conn,
        known_stacks,
        known_series,
        known_signals,
    } = writer;
    let tx = conn.transaction()?;
    let mut outcomes = Vec::with_capacity(batches.len());
    let mut added = Added::default();
    for batch in batches {
        outcomes.push(write_batch(
            &tx,
            batch,
            base_res,
            known_stacks,
            known_series,
            known_signals,
            &mut added,
        )?);
    }
    tx.commit()?;
    // Only after the commit: a rolled-back transaction must not leave ids marked stored.
    if known_stacks.len() > CACHE_LIMIT {
        known_stacks.clear();
    }
    known_stacks.extend(added.stacks);
    if known_series.len() > CACHE_LIMIT {
        known_series.clear();
    }
    for (id, ts) in added.series {
        let entry = known_series.entry(id).or_insert((ts, ts));
        entry.0 = entry.0.min(ts);
        entry.1 = entry.1.max(ts);
    }
    known_signals.extend(added.signals);
    Ok(outcomes)
}

fn write_batch(
    tx: &rusqlite::Transaction<'_>,
    batch: &NormalizedBatch,
    base_res: i64,
    known_stacks: &HashSet<i64>,
    known_series: &HashMap<i64, (i64, i64)>,
    known_signals: &HashSet<String>,
    added: &mut Added,
) -> Result<StoreOutcome, StorageError> {
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO batches VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
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
        return Ok(StoreOutcome::Duplicate);
    }
    let ts = bucket_of(batch.start_unix_ns.div_euclid(1_000_000_000), base_res);
    let mut signal_stmt =
        tx.prepare_cached("INSERT OR REPLACE INTO signals VALUES (?1, ?2, ?3, ?4, ?5)")?;
    for signal in &batch.signals {
        if !known_signals.contains(&signal.name) {
            signal_stmt.execute(params![
                signal.name,
                signal.value_kind,
                signal.value_unit,
                signal.count_kind,
                signal.count_unit
            ])?;
            added.signals.push(signal.name.clone());
        }
    }
    let mut stack_stmt = tx.prepare_cached("INSERT OR IGNORE INTO stacks VALUES (?1, ?2)")?;
    for stack in &batch.stacks {
        if !known_stacks.contains(&stack.id) {
            stack_stmt.execute(params![stack.id, batch.encode_stack(stack)])?;
            added.stacks.push(stack.id);
        }
    }
    let mut series_stmt = tx.prepare_cached(
        "INSERT INTO series VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11)
         ON CONFLICT (id) DO UPDATE SET first_s = min(first_s, excluded.first_s),
                                        last_s = max(last_s, excluded.last_s)",
    )?;
    for series in &batch.series {
        let covered = known_series
            .get(&series.id)
            .is_some_and(|&(first, last)| first <= ts && ts <= last);
        if !covered {
            series_stmt.execute(params![
                series.id,
                series.agent,
                series.host,
                series.signal,
                series.service,
                series.process,
                series.pid,
                series.cause,
                series.labels_json(),
                ts,
                service_key(&series.service)
            ])?;
            added.series.push((series.id, ts));
        }
    }
    let mut row_stmt = tx.prepare_cached(
        "INSERT INTO samples VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (svc, ts, series, stack) DO UPDATE SET value = value + excluded.value,
                                                            count = count + excluded.count",
    )?;
    let svc_of: HashMap<i64, i64> = batch
        .series
        .iter()
        .map(|s| (s.id, service_key(&s.service)))
        .collect();
    for row in &batch.rows {
        let svc = svc_of.get(&row.series).copied().unwrap_or(0);
        row_stmt.execute(params![
            svc, ts, row.series, row.stack, row.value, row.count
        ])?;
    }
    Ok(StoreOutcome::Stored)
}

/// The clustering key of a service's rows.
fn service_key(service: &str) -> i64 {
    crate::hash::StableHasher::new().str(service).finish()
}

/// A series row as queries see it.
struct SeriesRow {
    id: i64,
    svc: i64,
    signal: String,
    cause: String,
    labels: Labels,
}

fn matching_series(
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
        let labels: Labels = serde_json::from_str(&labels_json).unwrap_or_default();
        let columns = SeriesColumns {
            host: &host,
            service: &service,
            pid: &pid,
            signal: &signal,
            cause: &cause,
        };
        if filter.matches(&columns, &labels) {
            out.push(SeriesRow {
                id: row.get(0)?,
                svc: row.get(7)?,
                signal,
                cause,
                labels,
            });
        }
    }
    Ok(out)
}

fn load_signals(conn: &Connection) -> Result<Vec<SignalDef>, StorageError> {
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

fn losses_in(
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

fn query_profile(
    conn: &Connection,
    range: TimeRange,
    filter: &Filter,
) -> Result<Profile, StorageError> {
    let (from_s, until_s) = range.seconds();
    let signals = load_signals(conn)?;
    let mut builder = ProfileBuilder::new(&signals);
    let series = matching_series(conn, range, filter)?;
    // Aggregated inside SQLite, one clustered scan per service: crossing into Rust once
    // per distinct (series, stack) instead of once per stored row.
    let mut by_service: HashMap<i64, HashSet<i64>> = HashMap::new();
    for s in &series {
        by_service.entry(s.svc).or_default().insert(s.id);
    }
    let mut sums: Vec<((i64, i64), (i64, i64))> = Vec::new();
    let mut stmt = conn.prepare_cached(
        "SELECT series, stack, sum(value), sum(count) FROM samples
         WHERE svc = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY series, stack",
    )?;
    for (svc, wanted) in &by_service {
        let mut rows = stmt.query(params![svc, from_s, until_s])?;
        while let Some(r) = rows.next()? {
            let series: i64 = r.get(0)?;
            if wanted.contains(&series) {
                sums.push(((series, r.get(1)?), (r.get(2)?, r.get(3)?)));
            }
        }
    }
    let by_id: HashMap<i64, &SeriesRow> = series.iter().map(|s| (s.id, s)).collect();
    let mut stack_stmt = conn.prepare_cached("SELECT frames FROM stacks WHERE id = ?1")?;
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
    let losses = losses_in(conn, range, filter.host.as_deref())?;
    Ok(builder.finish(range, format!("{} series matched", series.len()), losses))
}

/// Calls `row(series, ts, stack, value, count)` for every row of `series` in
/// `[from_s, until_s)`: one clustered scan per service.
fn for_rows(
    conn: &Connection,
    series: &[SeriesRow],
    from_s: i64,
    until_s: i64,
    mut row: impl FnMut(i64, i64, i64, i64, i64),
) -> Result<(), StorageError> {
    let mut by_service: HashMap<i64, HashSet<i64>> = HashMap::new();
    for s in series {
        by_service.entry(s.svc).or_default().insert(s.id);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT series, ts, stack, value, count FROM samples WHERE svc = ?1 AND ts >= ?2 AND ts < ?3",
    )?;
    for (svc, wanted) in by_service {
        let mut rows = stmt.query(params![svc, from_s, until_s])?;
        while let Some(r) = rows.next()? {
            let series: i64 = r.get(0)?;
            if wanted.contains(&series) {
                row(series, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
            }
        }
    }
    Ok(())
}

fn query_series(
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
        |series, ts, _, value, count| {
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

/// The line a series adds to: its signal, or its cause (the signal stands in for samples
/// that carry no cause label yet).
pub fn series_key(group_by: GroupBy, signal: &str, cause: &str) -> String {
    match group_by {
        GroupBy::Signal => signal.to_owned(),
        GroupBy::Cause if cause.is_empty() => signal.to_owned(),
        GroupBy::Cause => cause.to_owned(),
    }
}

fn maintain(inner: &Inner, now_s: i64) -> Result<MaintenanceReport, StorageError> {
    let mut writer = lock(&inner.writer)?;
    let tiers = &inner.retention.tiers;
    let mut report = MaintenanceReport::default();
    let tx = writer.conn.transaction()?;
    let services: Vec<i64> = tx
        .prepare("SELECT DISTINCT svc FROM series")?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for (index, tier) in tiers.iter().enumerate() {
        let keep = tier.keep.as_secs() as i64;
        if let Some(next) = tiers.get(index + 1) {
            {
                let resolution = next.resolution.as_secs().max(1) as i64;
                let cutoff = bucket_of(now_s - keep, resolution);
                let mut merge = tx.prepare_cached(
                    "INSERT INTO samples SELECT svc, ts - (ts % ?3), series, stack, value, count FROM samples
                     WHERE svc = ?1 AND ts < ?2 AND ts % ?3 != 0
                     ON CONFLICT (svc, ts, series, stack) DO UPDATE SET value = value + excluded.value,
                                                                        count = count + excluded.count",
                )?;
                let mut delete = tx.prepare_cached(
                    "DELETE FROM samples WHERE svc = ?1 AND ts < ?2 AND ts % ?3 != 0",
                )?;
                for &svc in &services {
                    merge.execute(params![svc, cutoff, resolution])?;
                    report.rows_downsampled +=
                        delete.execute(params![svc, cutoff, resolution])? as u64;
                }
            }
        } else {
            {
                let cutoff = now_s - keep;
                let mut delete =
                    tx.prepare_cached("DELETE FROM samples WHERE svc = ?1 AND ts < ?2")?;
                for &svc in &services {
                    report.rows_deleted += delete.execute(params![svc, cutoff])? as u64;
                }
                tx.execute("DELETE FROM series WHERE last_s < ?1", [cutoff])?;
                tx.execute(
                    "DELETE FROM batches WHERE start_ns < ?1",
                    [cutoff.saturating_mul(1_000_000_000)],
                )?;
            }
        }
    }
    tx.commit()?;
    writer.known_series.clear();
    Ok(report)
}

impl Storage for SqliteStore {
    async fn is_stored(&self, agent: &str, sequence: u64) -> Result<bool, StorageError> {
        let agent = agent.to_owned();
        self.blocking(move |inner| {
            let conn = lock(&inner.reader)?;
            let found = conn
                .prepare_cached("SELECT 1 FROM batches WHERE agent = ?1 AND sequence = ?2")?
                .exists(params![agent, sequence as i64])?;
            Ok(found)
        })
        .await
    }

    async fn store(&self, batch: NormalizedBatch) -> Result<StoreOutcome, StorageError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        lock(&self.inner.pending)?.push((batch, reply));
        self.blocking(|inner| {
            commit_pending(inner);
            Ok(())
        })
        .await?;
        outcome
            .await
            .map_err(|_| StorageError::Worker("the batch was not committed".to_owned()))?
    }

    async fn profile(&self, range: TimeRange, filter: Filter) -> Result<Profile, StorageError> {
        self.blocking(move |inner| query_profile(&*lock(&inner.reader)?, range, &filter))
            .await
    }

    async fn series(
        &self,
        range: TimeRange,
        filter: Filter,
        group_by: GroupBy,
        step_s: i64,
    ) -> Result<Vec<SeriesLine>, StorageError> {
        self.blocking(move |inner| {
            query_series(&*lock(&inner.reader)?, range, &filter, group_by, step_s)
        })
        .await
    }

    async fn targets(&self, range: TimeRange) -> Result<Vec<Target>, StorageError> {
        self.blocking(move |inner| {
            let conn = lock(&inner.reader)?;
            let (from_s, until_s) = range.seconds();
            let mut stmt = conn.prepare_cached(
                "SELECT host, service, process, pid, signal, min(first_s), max(last_s) FROM series
                 WHERE last_s >= ?1 AND first_s < ?2 GROUP BY host, service, process, pid, signal",
            )?;
            let mut targets: BTreeMap<(String, String, String, String), Target> = BTreeMap::new();
            let mut rows = stmt.query(params![from_s, until_s])?;
            while let Some(row) = rows.next()? {
                let key: (String, String, String, String) =
                    (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
                let signal: String = row.get(4)?;
                let (first, last): (i64, i64) = (row.get(5)?, row.get(6)?);
                let target = targets.entry(key.clone()).or_insert_with(|| Target {
                    host: key.0,
                    service: key.1,
                    process: key.2,
                    pid: key.3,
                    signals: Vec::new(),
                    first_unix_s: first,
                    last_unix_s: last,
                });
                target.signals.push(signal);
                target.first_unix_s = target.first_unix_s.min(first);
                target.last_unix_s = target.last_unix_s.max(last);
            }
            Ok(targets.into_values().collect())
        })
        .await
    }

    async fn agents(&self) -> Result<Vec<AgentSummary>, StorageError> {
        self.blocking(move |inner| {
            let conn = lock(&inner.reader)?;
            let mut stmt = conn.prepare_cached(
                "SELECT agent, max(host), count(*), min(sequence), max(sequence), max(spool_dropped_total),
                        max(start_ns), sum(rows) FROM batches GROUP BY agent ORDER BY agent",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(AgentSummary {
                    agent: row.get(0)?,
                    host: row.get(1)?,
                    batches: row.get::<_, i64>(2)? as u64,
                    first_sequence: row.get::<_, i64>(3)? as u64,
                    last_sequence: row.get::<_, i64>(4)? as u64,
                    spool_dropped_total: row.get::<_, i64>(5)? as u64,
                    last_batch_unix_ns: row.get(6)?,
                    samples: row.get::<_, i64>(7)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn add_window(&self, window: Window) -> Result<(), StorageError> {
        self.blocking(move |inner| {
            let writer = lock(&inner.writer)?;
            writer.conn.execute(
                "INSERT INTO windows VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    window.from_unix_ns,
                    window.until_unix_ns,
                    window.host,
                    window.service,
                    window.source,
                    window.note
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn windows(&self, range: TimeRange, filter: Filter) -> Result<Vec<Window>, StorageError> {
        self.blocking(move |inner| {
            let conn = lock(&inner.reader)?;
            let mut stmt = conn.prepare_cached(
                "SELECT from_ns, until_ns, host, service, source, note FROM windows
                 WHERE until_ns > ?1 AND from_ns < ?2 AND (?3 IS NULL OR host = ?3) AND (?4 IS NULL OR service = ?4)
                 ORDER BY from_ns",
            )?;
            let rows = stmt.query_map(params![range.from_unix_ns, range.until_unix_ns, filter.host, filter.service], |row| {
                Ok(Window {
                    from_unix_ns: row.get(0)?,
                    until_unix_ns: row.get(1)?,
                    host: row.get(2)?,
                    service: row.get(3)?,
                    source: row.get(4)?,
                    note: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn maintain(&self, now_unix_s: i64) -> Result<MaintenanceReport, StorageError> {
        self.blocking(move |inner| maintain(inner, now_unix_s))
            .await
    }
}

/// Row-level facts for tests and benchmarks: (rows in `samples`, distinct batches).
pub fn raw_counts(path: &Path) -> Result<(u64, u64), StorageError> {
    let conn = Connection::open(path)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?;
    let batches: i64 = conn.query_row("SELECT count(*) FROM batches", [], |r| r.get(0))?;
    Ok((rows as u64, batches as u64))
}
