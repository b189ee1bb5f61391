//! The embedded backend: one SQLite file in WAL mode. A batch, its dedup marker, new
//! stacks and series go in one transaction, so a batch is either wholly stored with its
//! marker or not at all. A row is one series' stacks in one time bucket, packed in a
//! blob (`stacks.rs`); rows of the same (series, bucket) are merged on insert.
//! An hourly rollup tier (`rollup.rs`) answers long ranges; writes are in `write.rs`,
//! queries in `read.rs`.

mod events;
mod read;
mod rollup;
mod stacks;
mod windows;
mod write;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use rusqlite::{Connection, params};
use stallscope_profile::Profile;

pub use self::{read::series_key, stacks::MalformedStacks};
use self::{
    rollup::RollupSpan,
    write::{Writer, store_group},
};
use super::{
    AgentSummary, CPU_SIGNAL, Filter, GroupBy, MaintenanceReport, Retention, SeriesLine,
    SeriesTotals, Storage, StorageError, StoreOutcome, Target, TargetKey, TargetsBuilder,
    TimeRange, WAIT_SIGNAL, bucket_of,
};
use crate::{
    batch::NormalizedBatch,
    events::{BinaryRecord, ChangeRecord},
    window::{UpsertOutcome, Window, WindowFilter, WindowSource},
};

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
-- One row per (series, bucket): `stacks` holds each stack's summed value and count
-- (stacks.rs), so a batch writes a row per series, not per sample.
CREATE TABLE IF NOT EXISTS samples (
    svc INTEGER NOT NULL, ts INTEGER NOT NULL, series INTEGER NOT NULL, stacks BLOB NOT NULL,
    PRIMARY KEY (svc, ts, series)) WITHOUT ROWID;
-- The hourly rollup tier: sums of `samples` per hour, valid for the hours between the
-- `rollup_from` and `rollup_until` entries of `meta` (see rollup.rs).
CREATE TABLE IF NOT EXISTS rollup (
    svc INTEGER NOT NULL, hour INTEGER NOT NULL, series INTEGER NOT NULL, stacks BLOB NOT NULL,
    PRIMARY KEY (svc, hour, series)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
";

/// The layout version in the file's `user_version`. Version 0 with tables is the layout
/// before it was versioned (one row per sample).
const SCHEMA_VERSION: i64 = 1;

/// Creates the tables in a new file; refuses a file of another layout with one line
/// saying what to do, since rows of the old layout cannot be read as the new one.
fn create_schema(conn: &Connection, path: &Path) -> Result<(), StorageError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
        [],
        |row| row.get(0),
    )?;
    if tables > 0 && version != SCHEMA_VERSION {
        return Err(StorageError::Invalid(format!(
            "{} holds stallscope's storage layout version {version}, this collector reads version {SCHEMA_VERSION} \
             (one row per series and bucket); move the data directory aside or delete it to start afresh",
            path.display()
        )));
    }
    conn.execute_batch(&format!(
        "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
    ))?;
    Ok(())
}

/// The SQLite backend. Cloning shares the connections.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Writer>,
    /// Batches waiting for the next group commit.
    pending: Mutex<Vec<Pending>>,
    /// Signalled when a batch joins `pending`.
    arrived: Condvar,
    reader: Mutex<Connection>,
    retention: Retention,
    path: PathBuf,
}

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
        conn.busy_timeout(Duration::from_secs(30))?;
        create_schema(&conn, &path)?;
        events::create(&conn)?;
        windows::create(&conn)?;
        stacks::register(&conn)?;
        // Multi-row statements of several sizes per table, plus the rest.
        conn.set_prepared_statement_cache_capacity(64);
        let rollup = RollupSpan::load(&conn)?;
        let reader = Connection::open(&path)?;
        reader.busy_timeout(Duration::from_secs(30))?;
        reader.pragma_update(None, "cache_size", -65_536)?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(Writer {
                    conn,
                    known_stacks: HashSet::new(),
                    known_series: HashMap::new(),
                    known_signals: HashSet::new(),
                    rollup,
                    last_commit: None,
                }),
                pending: Mutex::new(Vec::new()),
                arrived: Condvar::new(),
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

/// Under load, how long the writer waits for a group to fill before committing it.
const LINGER: Duration = Duration::from_millis(10);
/// Rows that make a group worth committing without waiting longer.
const GROUP_TARGET_ROWS: usize = 8_000;
/// A commit this recent means batches are streaming in: worth waiting for more.
const BUSY_WITHIN: Duration = Duration::from_millis(50);

/// Group commit: whoever holds the writer takes every batch waiting and stores them in
/// one transaction (each with its own marker, so each is still all-or-nothing and
/// deduplicated), then answers each. Under load this turns many small commits into few.
/// Every commit costs an fsync and rewrites the pages it touched into the WAL, so while
/// batches stream in (the previous commit was recent) the writer waits up to [`LINGER`]
/// for a group of [`GROUP_TARGET_ROWS`]; a lone batch is committed at once.
fn commit_pending(inner: &Inner) {
    let Ok(mut writer) = inner.writer.lock() else {
        return;
    };
    loop {
        let busy = writer
            .last_commit
            .is_some_and(|at| at.elapsed() < BUSY_WITHIN);
        let group: Vec<Pending> = {
            let Ok(mut pending) = inner.pending.lock() else {
                return;
            };
            if busy && !pending.is_empty() {
                let deadline = Instant::now() + LINGER;
                while pending.iter().map(|p| p.0.rows.len()).sum::<usize>() < GROUP_TARGET_ROWS {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    let Ok((more, _)) = inner.arrived.wait_timeout(pending, deadline - now) else {
                        return;
                    };
                    pending = more;
                }
            }
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
        let stored = store_group(&mut writer, &batches, base);
        writer.last_commit = Some(Instant::now());
        match stored {
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

fn maintain(inner: &Inner, now_s: i64) -> Result<MaintenanceReport, StorageError> {
    let mut writer = lock(&inner.writer)?;
    let tiers = &inner.retention.tiers;
    let mut report = MaintenanceReport::default();
    let mut span = writer.rollup;
    let tx = writer.conn.transaction()?;
    let services: Vec<i64> = tx
        .prepare("SELECT DISTINCT svc FROM series")?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for (index, tier) in tiers.iter().enumerate() {
        let keep = tier.keep.as_secs() as i64;
        if let Some(next) = tiers.get(index + 1) {
            let resolution = next.resolution.as_secs().max(1) as i64;
            let cutoff = bucket_of(now_s - keep, resolution);
            let mut merge = tx.prepare_cached(
                "INSERT INTO samples SELECT svc, ts - (ts % ?3), series, stacks_sum(stacks) FROM samples
                 WHERE svc = ?1 AND ts < ?2 AND ts % ?3 != 0 GROUP BY 2, 3
                 ON CONFLICT (svc, ts, series) DO UPDATE SET stacks = stacks_merge(stacks, excluded.stacks)",
            )?;
            let mut delete = tx.prepare_cached(
                "DELETE FROM samples WHERE svc = ?1 AND ts < ?2 AND ts % ?3 != 0",
            )?;
            for &svc in &services {
                merge.execute(params![svc, cutoff, resolution])?;
                report.rows_downsampled += delete.execute(params![svc, cutoff, resolution])? as u64;
            }
            // Buckets of a resolution that divides an hour stay in their hour; others
            // move rows across hours, so the rollup no longer holds for them.
            if rollup::HOUR_S % resolution != 0 {
                rollup::invalidate_below(&tx, &mut span, &services, cutoff)?;
            }
        } else {
            let cutoff = now_s - keep;
            let mut delete = tx.prepare_cached("DELETE FROM samples WHERE svc = ?1 AND ts < ?2")?;
            for &svc in &services {
                report.rows_deleted += delete.execute(params![svc, cutoff])? as u64;
            }
            rollup::invalidate_below(&tx, &mut span, &services, cutoff)?;
            tx.execute("DELETE FROM series WHERE last_s < ?1", [cutoff])?;
            tx.execute(
                "DELETE FROM batches WHERE start_ns < ?1",
                [cutoff.saturating_mul(1_000_000_000)],
            )?;
            events::delete_before(&tx, cutoff.saturating_mul(1_000_000_000))?;
        }
    }
    rollup::extend(&tx, &mut span, &services, now_s)?;
    tx.commit()?;
    // Only after the commit: late batches are added to the rollup by this span.
    writer.rollup = span;
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
        self.inner.arrived.notify_all();
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
        self.blocking(move |inner| read::query_profile(&*lock(&inner.reader)?, range, &filter))
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
            read::query_series(&*lock(&inner.reader)?, range, &filter, group_by, step_s)
        })
        .await
    }

    async fn series_totals(
        &self,
        range: TimeRange,
        filter: Filter,
        step_s: i64,
    ) -> Result<Vec<SeriesTotals>, StorageError> {
        self.blocking(move |inner| {
            read::query_series_totals(&*lock(&inner.reader)?, range, &filter, step_s)
        })
        .await
    }

    async fn targets(&self, range: TimeRange) -> Result<Vec<Target>, StorageError> {
        self.blocking(move |inner| {
            let conn = lock(&inner.reader)?;
            let (from_s, until_s) = range.seconds();
            let mut stmt = conn.prepare_cached(
                "SELECT host, service, process, pid, signal, first_s, last_s, id, svc FROM series
                 WHERE last_s >= ?1 AND first_s < ?2",
            )?;
            let mut targets = TargetsBuilder::default();
            // Series holding wait or CPU time: their totals are summed below.
            let mut timed: HashMap<i64, (TargetKey, String)> = HashMap::new();
            let mut by_service: HashMap<i64, HashSet<i64>> = HashMap::new();
            let mut rows = stmt.query(params![from_s, until_s])?;
            while let Some(row) = rows.next()? {
                let key: TargetKey = (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
                let signal: String = row.get(4)?;
                if signal == WAIT_SIGNAL || signal == CPU_SIGNAL {
                    let id: i64 = row.get(7)?;
                    by_service.entry(row.get(8)?).or_default().insert(id);
                    timed.insert(id, (key.clone(), signal.clone()));
                }
                targets.add(key, signal, row.get(5)?, row.get(6)?);
            }
            drop(rows);
            drop(stmt);
            for (id, total) in read::value_totals(&conn, range, &by_service)? {
                if let Some((key, signal)) = timed.get(&id) {
                    targets.add_time(key, signal, total);
                }
            }
            Ok(targets.finish())
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

    async fn events(
        &self,
        range: TimeRange,
        filter: Filter,
    ) -> Result<Vec<ChangeRecord>, StorageError> {
        self.blocking(move |inner| events::events(&*lock(&inner.reader)?, range, &filter))
            .await
    }

    async fn binaries(
        &self,
        range: TimeRange,
        filter: Filter,
    ) -> Result<Vec<BinaryRecord>, StorageError> {
        self.blocking(move |inner| events::binaries(&*lock(&inner.reader)?, range, &filter))
            .await
    }

    async fn upsert_window(&self, window: Window) -> Result<UpsertOutcome, StorageError> {
        let source = window.source;
        let outcome = self
            .blocking(move |inner| windows::upsert(&mut lock(&inner.writer)?.conn, &window))
            .await?;
        if outcome == UpsertOutcome::Created {
            crate::metrics::METRICS.window_opened(source);
        }
        Ok(outcome)
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn window(&self, id: String) -> Result<Option<Window>, StorageError> {
        self.blocking(move |inner| windows::get(&*lock(&inner.reader)?, &id))
            .await
    }

    async fn windows(
        &self,
        range: TimeRange,
        filter: WindowFilter,
    ) -> Result<Vec<Window>, StorageError> {
        self.blocking(move |inner| windows::list(&*lock(&inner.reader)?, range, &filter))
            .await
    }

    async fn open_windows(
        &self,
        source: Option<WindowSource>,
    ) -> Result<Vec<Window>, StorageError> {
        self.blocking(move |inner| windows::open(&*lock(&inner.reader)?, source))
            .await
    }

    async fn maintain(&self, now_unix_s: i64) -> Result<MaintenanceReport, StorageError> {
        self.blocking(move |inner| maintain(inner, now_unix_s))
            .await
    }
}

/// Row-level facts for tests and benchmarks: (rows in `samples`, one per series and
/// bucket; distinct batches).
pub fn raw_counts(path: &Path) -> Result<(u64, u64), StorageError> {
    let conn = Connection::open(path)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?;
    let batches: i64 = conn.query_row("SELECT count(*) FROM batches", [], |r| r.get(0))?;
    Ok((rows as u64, batches as u64))
}
