//! The fleet backend: ClickHouse, written by any number of stateless collector replicas.
//!
//! ClickHouse 18.16 (Debian's) has no transactions, so exactly-once is by idempotency:
//! every sample row carries its batch's deterministic id (a hash of agent and sequence)
//! in a `ReplacingMergeTree` sorting key, so a batch inserted twice — by a replay after a
//! crash between storing and acknowledging, or by two replicas — has identical rows that
//! `FINAL` collapses at query time and merges collapse on disk. The batch marker is
//! written last; it only lets a replica skip re-inserting a batch it knows is stored.
//!
//! `FINAL` is expensive (on 18.16 a single-threaded merge of every part the query reads:
//! three to four times the plain query), and duplicates are rare: they need a crash or
//! two replicas racing. So every attempt to write a batch's rows is first recorded in
//! `row_writes`, and a query over raw rows uses `FINAL` only when it cannot rule
//! duplicates out: some batch in its span was written more than once, or a stored batch
//! (it has a marker) has no recorded write (written by a version before `row_writes`, for
//! example an old replica during a rolling upgrade), or the span reaches rows that were
//! already stored when `row_writes` was created (`legacy_rows`).
//!
//! Downsampling writes each coarser tier into its own table and records, per tier, up to
//! where it was downsampled; queries read each tier only for its own time span, so no
//! row is ever counted in two tiers and no mutation (`ALTER DELETE`) is needed. Old days
//! are dropped by partition. The schema avoids what 18.16 lacks (Map, DateTime64, CODEC,
//! TTL, LowCardinality) and stays valid on current releases.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::Arc,
};

use clickhouse::Client;
use stallscope_profile::{Labels, Profile};

use super::{
    AgentSummary, CPU_SIGNAL, Filter, GroupBy, LineSums, Losses, MaintenanceReport, ProfileBuilder,
    Retention, SeriesColumns, SeriesLine, SeriesTotals, Storage, StorageError, StoreOutcome,
    Target, TargetKey, TargetsBuilder, TimeRange, WAIT_SIGNAL, bucket_of, sqlite::series_key,
};
use crate::{
    batch::{NormalizedBatch, SignalDef, StoredStack},
    events::{BinaryRecord, ChangeRecord},
    window::{UpsertOutcome, Window, WindowFilter, WindowSource},
};

/// A batch waiting for the next group insert, with where its outcome goes.
type Pending = (
    NormalizedBatch,
    tokio::sync::oneshot::Sender<Result<StoreOutcome, StorageError>>,
);

/// Ids per `IN (...)` list, to stay well below ClickHouse's default query size limit.
const IN_CHUNK: usize = 2000;

mod events;
mod rows;
mod windows;

use self::rows::{
    BatchRow, RowWrite, SampleRow, SeriesRow, SignalRow, StackRow, TierRow, day_number,
};

/// One agent's summary as the `agents` query returns it.
type AgentRow = (String, String, u64, u64, u64, u64, i64, u64);

/// The ClickHouse backend.
#[derive(Clone)]
pub struct ClickHouseStore {
    client: Client,
    /// Batches waiting for the next group insert.
    pending: Arc<std::sync::Mutex<Vec<Pending>>>,
    /// Held by the replica task that is inserting a group.
    writer: Arc<tokio::sync::Mutex<()>>,
    database: String,
    retention: Retention,
}

fn ts_u32(unix_s: i64) -> u32 {
    u32::try_from(unix_s.max(0)).unwrap_or(u32::MAX)
}

/// A series a filter accepted: its indexed columns and labels.
struct MatchedSeries {
    host: String,
    service: String,
    signal: String,
    cause: String,
    labels: Labels,
}

fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            other => out.push(other),
        }
    }
    out.push('\'');
    out
}

impl ClickHouseStore {
    /// Connects to `url` (e.g. `http://127.0.0.1:8123`) and creates the database and
    /// tables if needed.
    pub async fn connect(
        url: &str,
        database: &str,
        retention: Retention,
    ) -> Result<Self, StorageError> {
        if database.is_empty()
            || !database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(StorageError::Invalid(format!(
                "ClickHouse database name `{database}`: use letters, digits and underscores"
            )));
        }
        // Plain RowBinary without schema validation and without compression: the only
        // combination ClickHouse 18.16 accepts from this client.
        let root = Client::default().with_url(url).with_validation(false);
        root.query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .execute()
            .await?;
        let store = Self {
            client: root.with_database(database),
            pending: Arc::new(std::sync::Mutex::new(Vec::new())),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            database: database.to_owned(),
            retention,
        };
        store.create_tables().await?;
        Ok(store)
    }

    fn samples_table(tier: usize) -> String {
        if tier == 0 {
            "samples".to_owned()
        } else {
            format!("samples_t{tier}")
        }
    }

    async fn create_tables(&self) -> Result<(), StorageError> {
        let mut statements = vec![
            "CREATE TABLE IF NOT EXISTS batches (agent String, sequence UInt64, host String,
                start_ns Int64, duration_ns Int64, rows UInt64, spool_dropped_total UInt64,
                losses String, received_ns Int64)
             ENGINE = ReplacingMergeTree ORDER BY (agent, sequence)"
                .to_owned(),
            "CREATE TABLE IF NOT EXISTS signals (name String, value_kind String, value_unit String,
                count_kind String, count_unit String)
             ENGINE = ReplacingMergeTree ORDER BY name"
                .to_owned(),
            "CREATE TABLE IF NOT EXISTS stacks (id Int64, frames Array(UInt8))
             ENGINE = ReplacingMergeTree ORDER BY id"
                .to_owned(),
            "CREATE TABLE IF NOT EXISTS series (id Int64, ts DateTime, agent String, host String,
                signal String, service String, process String, pid String, cause String, labels String)
             ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(ts) ORDER BY (service, host, id, ts)"
                .to_owned(),
            windows::TABLE.to_owned(),
            windows::DROP_PLACEHOLDER.to_owned(),
            "CREATE TABLE IF NOT EXISTS downsampled (tier UInt8, until DateTime)
             ENGINE = ReplacingMergeTree ORDER BY (tier, until)"
                .to_owned(),
            // Attempts to write sample rows, and since when they are recorded.
            "CREATE TABLE IF NOT EXISTS row_writes (ts DateTime, agent String, sequence UInt64)
             ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (ts, agent, sequence)"
                .to_owned(),
            "CREATE TABLE IF NOT EXISTS legacy_rows (until DateTime)
             ENGINE = MergeTree ORDER BY until"
                .to_owned(),
        ];
        statements.extend(events::TABLES.map(str::to_owned));
        for tier in 0..self.retention.tiers.len() {
            statements.push(format!(
                "CREATE TABLE IF NOT EXISTS {} (series Int64, ts DateTime, stack Int64, batch Int64,
                    value Int64, count Int64)
                 ENGINE = ReplacingMergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (series, ts, stack, batch)",
                Self::samples_table(tier)
            ));
        }
        let tracked: u8 = self
            .client
            .query("EXISTS TABLE row_writes")
            .fetch_one()
            .await?;
        for statement in statements {
            self.client.query(&statement).execute().await?;
        }
        if tracked == 0 {
            // Raw rows stored by a version without `row_writes` may hold duplicates
            // nobody recorded: spans up to the newest of them always use `FINAL`.
            self.client
                .query("INSERT INTO legacy_rows SELECT max(ts) FROM samples")
                .execute()
                .await?;
        }
        Ok(())
    }

    /// Drops the whole-day partitions of `table` before day `day_limit` (`YYYYMMDD`);
    /// returns the rows they held.
    async fn drop_days_before(&self, table: &str, day_limit: i64) -> Result<u64, StorageError> {
        let parts: Vec<(String, u64)> = self
            .client
            .query_raw(&format!(
                "SELECT partition, sum(rows) FROM system.parts WHERE database = {} AND table = {} AND active GROUP BY partition",
                quote(&self.database),
                quote(table)
            ))
            .fetch_all()
            .await?;
        let mut dropped = 0;
        for (partition, rows) in parts {
            if partition
                .trim_matches('\'')
                .parse::<i64>()
                .is_ok_and(|day| day < day_limit)
            {
                self.client
                    .query_raw(&format!("ALTER TABLE {table} DROP PARTITION {partition}"))
                    .execute()
                    .await?;
                dropped += rows;
            }
        }
        Ok(dropped)
    }

    /// Whether reading raw rows (tier 0) of `[lo, hi)` needs `FINAL` (see the module
    /// notes). The batches checked are those whose rows can fall in the span, with a
    /// margin of one bucket on each side.
    async fn needs_final(&self, lo: i64, hi: i64) -> Result<bool, StorageError> {
        let base = self.retention.base_resolution_s();
        let (from, until) = (lo - base, hi + base);
        let (legacy, rewritten, unrecorded): (u32, u64, u64) = self
            .client
            .query_raw(&format!(
                "SELECT
                   (SELECT toUInt32(max(until)) FROM legacy_rows),
                   (SELECT count() FROM (SELECT agent, sequence FROM row_writes
                      WHERE ts >= toDateTime({wf}) AND ts < toDateTime({wu})
                      GROUP BY agent, sequence HAVING count() > 1)),
                   (SELECT count() FROM (SELECT DISTINCT agent, sequence FROM batches
                      WHERE start_ns >= {bf} AND start_ns < {bu})
                    WHERE (agent, sequence) NOT IN (SELECT agent, sequence FROM row_writes
                      WHERE ts >= toDateTime({wf}) AND ts < toDateTime({wu})))",
                wf = ts_u32(from - base),
                wu = ts_u32(until),
                bf = from.saturating_mul(1_000_000_000),
                bu = until.saturating_mul(1_000_000_000),
            ))
            .fetch_one()
            .await?;
        Ok(lo <= i64::from(legacy) || rewritten > 0 || unrecorded > 0)
    }

    /// Writes a batch's dictionary entries, series and sample rows, but not its marker:
    /// what a crash before the marker leaves behind. Public for the crash tests.
    pub async fn store_rows_without_marker(
        &self,
        batch: &NormalizedBatch,
    ) -> Result<(), StorageError> {
        self.write_rows(&[batch]).await
    }

    /// The rows of several batches, one insert per table (ClickHouse wants few, large
    /// inserts: each creates a part on disk).
    async fn write_rows(&self, batches: &[&NormalizedBatch]) -> Result<(), StorageError> {
        let base = self.retention.base_resolution_s();
        let ts_of = |batch: &NormalizedBatch| {
            ts_u32(bucket_of(
                batch.start_unix_ns.div_euclid(1_000_000_000),
                base,
            ))
        };
        // The attempt first, dictionary and series next, then samples, markers last (the
        // caller): whatever a crash interrupts, a replay writes identical rows and queries
        // know to collapse them.
        let mut insert = self.client.insert::<RowWrite>("row_writes").await?;
        for batch in batches {
            insert
                .write(&RowWrite {
                    ts: ts_of(batch),
                    agent: batch.agent.clone(),
                    sequence: batch.sequence,
                })
                .await?;
        }
        insert.end().await?;
        let mut insert = self.client.insert::<SignalRow>("signals").await?;
        for batch in batches {
            for s in &batch.signals {
                let row = SignalRow {
                    name: s.name.clone(),
                    value_kind: s.value_kind.clone(),
                    value_unit: s.value_unit.clone(),
                    count_kind: s.count_kind.clone(),
                    count_unit: s.count_unit.clone(),
                };
                insert.write(&row).await?;
            }
        }
        insert.end().await?;
        let mut insert = self.client.insert::<StackRow>("stacks").await?;
        for batch in batches {
            for stack in &batch.stacks {
                let row = StackRow {
                    id: stack.id,
                    frames: batch.encode_stack(stack),
                };
                insert.write(&row).await?;
            }
        }
        insert.end().await?;
        let mut insert = self.client.insert::<SeriesRow>("series").await?;
        for batch in batches {
            let ts = ts_of(batch);
            for s in &batch.series {
                let row = SeriesRow {
                    id: s.id,
                    ts,
                    agent: s.agent.clone(),
                    host: s.host.clone(),
                    signal: s.signal.clone(),
                    service: s.service.clone(),
                    process: s.process.clone(),
                    pid: s.pid.clone(),
                    cause: s.cause.clone(),
                    labels: s.labels_json(),
                };
                insert.write(&row).await?;
            }
        }
        insert.end().await?;
        let mut insert = self.client.insert::<SampleRow>("samples").await?;
        for batch in batches {
            let (ts, batch_id) = (ts_of(batch), batch.batch_id());
            for row in &batch.rows {
                let row = SampleRow {
                    series: row.series,
                    ts,
                    stack: row.stack,
                    batch: batch_id,
                    value: row.value,
                    count: row.count,
                };
                insert.write(&row).await?;
            }
        }
        insert.end().await?;
        self.write_changes(batches).await
    }

    async fn write_markers(&self, batches: &[&NormalizedBatch]) -> Result<(), StorageError> {
        let mut insert = self.client.insert::<BatchRow>("batches").await?;
        for batch in batches {
            insert
                .write(&BatchRow {
                    agent: batch.agent.clone(),
                    sequence: batch.sequence,
                    host: batch.host.clone(),
                    start_ns: batch.start_unix_ns,
                    duration_ns: batch.duration_ns,
                    rows: batch.rows.len() as u64,
                    spool_dropped_total: batch.spool_dropped_total,
                    losses: batch.losses_json(),
                    received_ns: crate::unix_now_ns(),
                })
                .await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Inserts every pending batch: one insert per table for the whole group, markers
    /// last. Batches already stored are answered as duplicates without writing.
    async fn commit_pending(&self) {
        let _writing = self.writer.lock().await;
        let group: Vec<Pending> = match self.pending.lock() {
            Ok(mut pending) => pending.drain(..).collect(),
            Err(_) => return,
        };
        if group.is_empty() {
            return;
        }
        let mut outcomes = Vec::with_capacity(group.len());
        for (batch, _) in &group {
            outcomes.push(match self.is_stored(&batch.agent, batch.sequence).await {
                Ok(true) => Ok(StoreOutcome::Duplicate),
                Ok(false) => Ok(StoreOutcome::Stored),
                Err(err) => Err(err.to_string()),
            });
        }
        let new: Vec<&NormalizedBatch> = group
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| matches!(outcome, Ok(StoreOutcome::Stored)))
            .map(|((batch, _), _)| batch)
            .collect();
        let written = if new.is_empty() {
            Ok(())
        } else {
            match self.write_rows(&new).await {
                Ok(()) => {
                    crate::faults::after_rows_before_marker();
                    self.write_markers(&new).await
                }
                Err(err) => Err(err),
            }
        };
        let failure = written.err().map(|err| err.to_string());
        for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
            let result = match (failure.clone(), outcome) {
                (_, Ok(StoreOutcome::Duplicate)) => Ok(StoreOutcome::Duplicate),
                (Some(message), _) | (None, Err(message)) => Err(StorageError::Worker(format!(
                    "ClickHouse insert failed: {message}"
                ))),
                (None, Ok(outcome)) => Ok(outcome),
            };
            let _ = reply.send(result);
        }
    }

    /// Drops every table of this store's database (tests and benchmarks only).
    pub async fn drop_database(&self) -> Result<(), StorageError> {
        self.client
            .query(&format!("DROP DATABASE IF EXISTS {}", self.database))
            .execute()
            .await?;
        Ok(())
    }

    /// Up to where each tier has been downsampled into the next (Unix seconds).
    async fn downsampled_until(&self) -> Result<Vec<i64>, StorageError> {
        let rows: Vec<(u8, u32)> = self
            .client
            .query("SELECT tier, toUInt32(max(until)) FROM downsampled GROUP BY tier")
            .fetch_all()
            .await?;
        let mut until = vec![0_i64; self.retention.tiers.len()];
        for (tier, at) in rows {
            if let Some(slot) = until.get_mut(usize::from(tier)) {
                *slot = i64::from(at);
            }
        }
        Ok(until)
    }

    /// The time span each tier's table answers for, intersected with `[from, until)`.
    async fn tier_spans(
        &self,
        from_s: i64,
        until_s: i64,
    ) -> Result<Vec<(usize, String, i64, i64)>, StorageError> {
        let done = self.downsampled_until().await?;
        let mut spans = Vec::new();
        let mut upper = i64::MAX;
        for (tier, &lower) in done.iter().enumerate() {
            let lo = from_s.max(lower);
            let hi = until_s.min(upper);
            if lo < hi {
                spans.push((tier, Self::samples_table(tier), lo, hi));
            }
            upper = lower;
            if lower == 0 {
                break;
            }
        }
        Ok(spans)
    }

    async fn signals(&self) -> Result<Vec<SignalDef>, StorageError> {
        let rows: Vec<SignalRow> = self
            .client
            .query("SELECT ?fields FROM signals FINAL")
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| SignalDef {
                name: r.name,
                value_kind: r.value_kind,
                value_unit: r.value_unit,
                count_kind: r.count_kind,
                count_unit: r.count_unit,
            })
            .collect())
    }

    async fn matching_series(
        &self,
        range: TimeRange,
        filter: &Filter,
    ) -> Result<HashMap<i64, MatchedSeries>, StorageError> {
        let (from_s, until_s) = range.seconds();
        let base = self.retention.base_resolution_s();
        let mut sql = format!(
            "SELECT id, any(host), any(service), any(pid), any(signal), any(cause), any(labels) FROM series
             WHERE ts >= toDateTime({}) AND ts < toDateTime({})",
            ts_u32(bucket_of(from_s, base) - self.coarsest_resolution_s()),
            ts_u32(until_s)
        );
        for (column, value) in [
            ("host", &filter.host),
            ("service", &filter.service),
            ("pid", &filter.pid),
            ("cause", &filter.cause),
        ] {
            if let Some(value) = value {
                let _ = write!(sql, " AND {column} = {}", quote(value));
            }
        }
        sql.push_str(" GROUP BY id");
        let rows: Vec<(i64, String, String, String, String, String, String)> =
            self.client.query_raw(&sql).fetch_all().await?;
        let mut out = HashMap::new();
        for (id, host, service, pid, signal, cause, labels_json) in rows {
            let columns = SeriesColumns {
                host: &host,
                service: &service,
                pid: &pid,
                signal: &signal,
                cause: &cause,
            };
            if let Some(labels) = filter.matching_labels(&columns, &labels_json) {
                out.insert(
                    id,
                    MatchedSeries {
                        host,
                        service,
                        signal,
                        cause,
                        labels,
                    },
                );
            }
        }
        Ok(out)
    }

    fn coarsest_resolution_s(&self) -> i64 {
        self.retention
            .tiers
            .last()
            .map_or(1, |t| t.resolution.as_secs() as i64)
    }

    /// Runs `sql_for(ids, source, lo, hi)` over chunks of `ids` and every tier span,
    /// collecting the rows; `source` is the tier's table, with `FINAL` where duplicates
    /// may need collapsing (downsampled tiers always: a repeated downsampling writes
    /// identical rows).
    async fn over_tiers<T>(
        &self,
        ids: &[i64],
        from_s: i64,
        until_s: i64,
        sql_for: impl Fn(&str, &str, i64, i64) -> String,
    ) -> Result<Vec<T>, StorageError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let mut out = Vec::new();
        for (tier, table, lo, hi) in self.tier_spans(from_s, until_s).await? {
            let source = if tier > 0 || self.needs_final(lo, hi).await? {
                format!("{table} FINAL")
            } else {
                table
            };
            let table = &source;
            for chunk in ids.chunks(IN_CHUNK) {
                let list = chunk
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                let sql = sql_for(&list, table, lo, hi);
                out.extend(self.client.query_raw(&sql).fetch_all::<T>().await?);
            }
        }
        Ok(out)
    }

    async fn losses_in(
        &self,
        range: TimeRange,
        host: Option<&str>,
    ) -> Result<Losses, StorageError> {
        let mut sql = format!(
            "SELECT losses FROM batches FINAL WHERE start_ns >= {} AND start_ns < {}",
            range.from_unix_ns, range.until_unix_ns
        );
        if let Some(host) = host {
            let _ = write!(sql, " AND host = {}", quote(host));
        }
        let rows: Vec<String> = self.client.query_raw(&sql).fetch_all().await?;
        let mut total = Losses::new();
        for json in rows {
            let losses: BTreeMap<String, u64> = serde_json::from_str(&json).unwrap_or_default();
            for (reason, count) in losses {
                *total.entry(reason).or_default() += count;
            }
        }
        Ok(total)
    }
}

/// A row of the targets query: (series id, host, service, process, pid, signal, first,
/// last).
type TargetRow = (i64, String, String, String, String, String, i64, i64);

impl Storage for ClickHouseStore {
    async fn is_stored(&self, agent: &str, sequence: u64) -> Result<bool, StorageError> {
        let count: u64 = self
            .client
            .query("SELECT count() FROM batches WHERE agent = ? AND sequence = ?")
            .bind(agent)
            .bind(sequence)
            .fetch_one()
            .await?;
        Ok(count > 0)
    }

    async fn store(&self, batch: NormalizedBatch) -> Result<StoreOutcome, StorageError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| StorageError::Worker("a storage task panicked".to_owned()))?
            .push((batch, reply));
        // Whoever gets the writer inserts everything pending, this batch included (or a
        // group inserted while this call waited already answered it).
        self.commit_pending().await;
        outcome
            .await
            .map_err(|_| StorageError::Worker("the batch was not inserted".to_owned()))?
    }

    async fn profile(&self, range: TimeRange, filter: Filter) -> Result<Profile, StorageError> {
        let (from_s, until_s) = range.seconds();
        let signals = self.signals().await?;
        let series = self.matching_series(range, &filter).await?;
        let ids: Vec<i64> = series.keys().copied().collect();
        let rows: Vec<(i64, i64, i64, i64)> = self
            .over_tiers(&ids, from_s, until_s, |list, table, lo, hi| {
                format!(
                    "SELECT series, stack, sum(value), sum(count) FROM {table}
                     WHERE series IN ({list}) AND ts >= toDateTime({lo}) AND ts < toDateTime({hi})
                     GROUP BY series, stack"
                )
            })
            .await?;
        let mut builder = ProfileBuilder::new(&signals);
        let mut stack_ids: Vec<i64> = rows.iter().map(|r| r.1).collect();
        stack_ids.sort_unstable();
        stack_ids.dedup();
        for chunk in stack_ids.chunks(IN_CHUNK) {
            let list = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let stacks: Vec<StackRow> = self
                .client
                .query_raw(&format!(
                    "SELECT id, any(frames) FROM stacks WHERE id IN ({list}) GROUP BY id"
                ))
                .fetch_all()
                .await?;
            for stack in stacks {
                if let Some(frames) = StoredStack::decode_frames(&stack.frames) {
                    builder.add_stack(stack.id, frames);
                }
            }
        }
        for (series_id, stack, value, count) in rows {
            if let Some(MatchedSeries { signal, labels, .. }) = series.get(&series_id) {
                builder.add(signal, labels, stack, value, count);
            }
        }
        let losses = self.losses_in(range, filter.host.as_deref()).await?;
        Ok(builder.finish(range, format!("{} series matched", series.len()), losses))
    }

    async fn series(
        &self,
        range: TimeRange,
        filter: Filter,
        group_by: GroupBy,
        step_s: i64,
    ) -> Result<Vec<SeriesLine>, StorageError> {
        let (from_s, until_s) = range.seconds();
        let step_s = step_s.max(1);
        let units: HashMap<String, String> = self
            .signals()
            .await?
            .into_iter()
            .map(|s| (s.name, s.value_unit))
            .collect();
        let series = self.matching_series(range, &filter).await?;
        let ids: Vec<i64> = series.keys().copied().collect();
        let rows: Vec<(i64, i64, i64, i64)> = self
            .over_tiers(&ids, from_s, until_s, |list, table, lo, hi| {
                format!(
                    "SELECT series, toInt64(toUInt32(ts)) - ((toInt64(toUInt32(ts)) - {from_s}) % {step_s}) AS bucket,
                            sum(value), sum(count) FROM {table}
                     WHERE series IN ({list}) AND ts >= toDateTime({lo}) AND ts < toDateTime({hi})
                     GROUP BY series, bucket"
                )
            })
            .await?;
        let mut lines: LineSums = BTreeMap::new();
        for (series_id, bucket, value, count) in rows {
            if let Some(MatchedSeries { signal, cause, .. }) = series.get(&series_id) {
                let unit = units.get(signal).cloned().unwrap_or_default();
                let line = lines
                    .entry(series_key(group_by, signal, cause))
                    .or_insert_with(|| (unit, BTreeMap::new()));
                let point = line.1.entry(bucket).or_default();
                point.0 += value;
                point.1 += count;
            }
        }
        Ok(lines
            .into_iter()
            .map(|(key, (value_unit, points))| SeriesLine {
                key,
                value_unit,
                points: points.into_iter().map(|(t, (v, c))| (t, v, c)).collect(),
            })
            .collect())
    }

    async fn series_totals(
        &self,
        range: TimeRange,
        filter: Filter,
        step_s: i64,
    ) -> Result<Vec<SeriesTotals>, StorageError> {
        let (from_s, until_s) = range.seconds();
        let step_s = step_s.max(1);
        let mut series = self.matching_series(range, &filter).await?;
        let ids: Vec<i64> = series.keys().copied().collect();
        let rows: Vec<(i64, i64, i64, i64)> = self
            .over_tiers(&ids, from_s, until_s, |list, table, lo, hi| {
                format!(
                    "SELECT series, toInt64(toUInt32(ts)) - ((toInt64(toUInt32(ts)) - {from_s}) % {step_s}) AS bucket,
                            sum(value), sum(count) FROM {table}
                     WHERE series IN ({list}) AND ts >= toDateTime({lo}) AND ts < toDateTime({hi})
                     GROUP BY series, bucket"
                )
            })
            .await?;
        let mut points: HashMap<i64, BTreeMap<i64, (i64, i64)>> = HashMap::new();
        for (series_id, bucket, value, count) in rows {
            let point = points
                .entry(series_id)
                .or_default()
                .entry(bucket)
                .or_default();
            point.0 = point.0.saturating_add(value);
            point.1 = point.1.saturating_add(count);
        }
        let mut out: Vec<SeriesTotals> = points
            .into_iter()
            .filter_map(|(id, buckets)| {
                let s = series.remove(&id)?;
                Some(SeriesTotals {
                    host: s.host,
                    service: s.service,
                    signal: s.signal,
                    cause: s.cause,
                    labels: s.labels,
                    points: buckets.into_iter().map(|(t, (v, c))| (t, v, c)).collect(),
                })
            })
            .collect();
        // A stable order, like SQLite's (series in id order there).
        out.sort_by(|a, b| {
            (&a.host, &a.service, &a.signal, &a.labels)
                .cmp(&(&b.host, &b.service, &b.signal, &b.labels))
        });
        Ok(out)
    }

    async fn targets(&self, range: TimeRange) -> Result<Vec<Target>, StorageError> {
        let (from_s, until_s) = range.seconds();
        let sql = format!(
            "SELECT id, host, service, process, pid, signal, toInt64(toUInt32(min(ts))), toInt64(toUInt32(max(ts))) FROM series
             WHERE ts >= toDateTime({}) AND ts < toDateTime({})
             GROUP BY id, host, service, process, pid, signal",
            ts_u32(bucket_of(from_s, self.retention.base_resolution_s()) - self.coarsest_resolution_s()),
            ts_u32(until_s)
        );
        let rows: Vec<TargetRow> = self.client.query_raw(&sql).fetch_all().await?;
        let mut targets = TargetsBuilder::default();
        // Series holding wait or CPU time: their totals are summed below.
        let mut timed: HashMap<i64, (TargetKey, String)> = HashMap::new();
        for (id, host, service, process, pid, signal, first, last) in rows {
            let key: TargetKey = (host, service, process, pid);
            if signal == WAIT_SIGNAL || signal == CPU_SIGNAL {
                timed.insert(id, (key.clone(), signal.clone()));
            }
            targets.add(key, signal, first, last);
        }
        let ids: Vec<i64> = timed.keys().copied().collect();
        let totals: Vec<(i64, i64)> = self
            .over_tiers(&ids, from_s, until_s, |list, table, lo, hi| {
                format!(
                    "SELECT series, sum(value) FROM {table}
                     WHERE series IN ({list}) AND ts >= toDateTime({lo}) AND ts < toDateTime({hi})
                     GROUP BY series"
                )
            })
            .await?;
        for (id, total) in totals {
            if let Some((key, signal)) = timed.get(&id) {
                targets.add_time(key, signal, total);
            }
        }
        Ok(targets.finish())
    }

    async fn agents(&self) -> Result<Vec<AgentSummary>, StorageError> {
        let rows: Vec<AgentRow> = self
            .client
            .query_raw(
                "SELECT agent, max(host), count(), min(sequence), max(sequence), max(spool_dropped_total),
                        max(start_ns), sum(rows) FROM batches FINAL GROUP BY agent ORDER BY agent",
            )
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(agent, host, batches, first, last, dropped, last_ns, samples)| AgentSummary {
                    agent,
                    host,
                    batches,
                    first_sequence: first,
                    last_sequence: last,
                    spool_dropped_total: dropped,
                    last_batch_unix_ns: last_ns,
                    samples,
                },
            )
            .collect())
    }

    async fn events(
        &self,
        range: TimeRange,
        filter: Filter,
    ) -> Result<Vec<ChangeRecord>, StorageError> {
        self.query_events(range, &filter).await
    }

    async fn binaries(
        &self,
        range: TimeRange,
        filter: Filter,
    ) -> Result<Vec<BinaryRecord>, StorageError> {
        self.query_binaries(range, &filter).await
    }

    async fn upsert_window(&self, window: Window) -> Result<UpsertOutcome, StorageError> {
        let outcome = self.put_window(&window).await?;
        if outcome == UpsertOutcome::Created {
            crate::metrics::METRICS.window_opened(window.source);
        }
        Ok(outcome)
    }

    fn backend(&self) -> &'static str {
        "clickhouse"
    }

    async fn window(&self, id: String) -> Result<Option<Window>, StorageError> {
        self.get_window(&id).await
    }

    async fn windows(
        &self,
        range: TimeRange,
        filter: WindowFilter,
    ) -> Result<Vec<Window>, StorageError> {
        self.list_windows(range, &filter).await
    }

    async fn open_windows(
        &self,
        source: Option<WindowSource>,
    ) -> Result<Vec<Window>, StorageError> {
        self.list_open_windows(source).await
    }

    async fn maintain(&self, now_unix_s: i64) -> Result<MaintenanceReport, StorageError> {
        let mut report = MaintenanceReport::default();
        let done = self.downsampled_until().await?;
        let tiers = self.retention.tiers.clone();
        for (index, tier) in tiers.iter().enumerate() {
            let keep = tier.keep.as_secs() as i64;
            let Some(next) = tiers.get(index + 1) else {
                continue;
            };
            let resolution = next.resolution.as_secs().max(1) as i64;
            let cutoff = bucket_of(now_unix_s - keep, resolution);
            let lower = done.get(index).copied().unwrap_or(0);
            if cutoff <= lower {
                continue;
            }
            let source = Self::samples_table(index);
            let target = Self::samples_table(index + 1);
            let lower_bound = lower;
            let moved: u64 = self
                .client
                .query_raw(&format!(
                    "SELECT count() FROM {source} FINAL WHERE ts >= toDateTime({lower_bound}) AND ts < toDateTime({cutoff})"
                ))
                .fetch_one()
                .await?;
            self.client
                .query_raw(&format!(
                    "INSERT INTO {target} (series, ts, stack, batch, value, count)
                     SELECT series, toDateTime(intDiv(toUInt32(ts), {resolution}) * {resolution}) AS bucket, stack, toInt64(0),
                            sum(value), sum(count)
                     FROM {source} FINAL WHERE ts >= toDateTime({lower_bound}) AND ts < toDateTime({cutoff})
                     GROUP BY series, bucket, stack"
                ))
                .execute()
                .await?;
            let mut insert = self.client.insert::<TierRow>("downsampled").await?;
            insert
                .write(&TierRow {
                    tier: index as u8,
                    until: ts_u32(cutoff),
                })
                .await?;
            insert.end().await?;
            report.rows_downsampled += moved;
        }
        // Whole days that no query reads any more are dropped.
        let done = self.downsampled_until().await?;
        let last_keep = tiers.last().map_or(0, |t| t.keep.as_secs() as i64);
        for (index, _) in tiers.iter().enumerate() {
            let table = Self::samples_table(index);
            let below = if index + 1 == tiers.len() {
                now_unix_s - last_keep
            } else {
                done.get(index).copied().unwrap_or(0)
            };
            let day_limit = day_number(below);
            let dropped = self.drop_days_before(&table, day_limit).await?;
            if index + 1 == tiers.len() {
                report.rows_deleted += dropped;
                for table in ["change_events", "binaries"] {
                    self.drop_days_before(table, day_limit).await?;
                }
            }
            if index == 0 {
                // The record of row writes is needed as long as raw rows are read.
                self.drop_days_before("row_writes", day_limit).await?;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
    }
}
