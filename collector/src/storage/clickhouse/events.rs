//! Change events and binaries in ClickHouse. Like sample rows they are idempotent rather
//! than transactional: an event's row is keyed by its deterministic id, a binary's by
//! its batch, in `ReplacingMergeTree` sorting keys, so a batch written twice (a replay,
//! two replicas) leaves identical rows that `FINAL` collapses. Both are written before
//! the batch's marker and partitioned by day, dropped with retention's last tier.

use std::fmt::Write as _;

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{ClickHouseStore, quote, ts_u32};
use crate::{
    batch::NormalizedBatch,
    events::{BinaryRecord, ChangeRecord, frame_pointers_code, frame_pointers_from_code},
    storage::{Filter, StorageError, TimeRange},
};

const NS: i64 = 1_000_000_000;

pub(super) const TABLES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS change_events (id Int64, ts DateTime, time_ns Int64, kind String,
        host String, service String, agent String, pid UInt32, previous_pid UInt32,
        build_id String, previous_build_id String, executable String, labels String)
     ENGINE = ReplacingMergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (service, time_ns, id)",
    "CREATE TABLE IF NOT EXISTS binaries (ts DateTime, batch Int64, host String, service String,
        path String, build_id String, debug_file String, frame_pointers Int8, stacks UInt64,
        truncated_stacks UInt64, error String, first_ns Int64, last_ns Int64)
     ENGINE = ReplacingMergeTree PARTITION BY toYYYYMMDD(ts)
     ORDER BY (service, host, path, build_id, ts, batch)",
];

#[derive(Row, Serialize, Deserialize)]
struct EventRow {
    id: i64,
    ts: u32,
    time_ns: i64,
    kind: String,
    host: String,
    service: String,
    agent: String,
    pid: u32,
    previous_pid: u32,
    build_id: String,
    previous_build_id: String,
    executable: String,
    labels: String,
}

#[derive(Row, Serialize, Deserialize)]
struct BinaryRow {
    ts: u32,
    batch: i64,
    host: String,
    service: String,
    path: String,
    build_id: String,
    debug_file: String,
    frame_pointers: i8,
    stacks: u64,
    truncated_stacks: u64,
    error: String,
    first_ns: i64,
    last_ns: i64,
}

/// A binary summed over a range (the columns of `query_binaries`).
#[derive(Row, Deserialize)]
struct BinarySum {
    host: String,
    service: String,
    path: String,
    build_id: String,
    debug_file: String,
    frame_pointers: i8,
    stacks: u64,
    truncated_stacks: u64,
    error: String,
    first_ns: i64,
    last_ns: i64,
}

fn scope_conditions(sql: &mut String, filter: &Filter) {
    for (column, value) in [("host", &filter.host), ("service", &filter.service)] {
        if let Some(value) = value {
            let _ = write!(sql, " AND {column} = {}", quote(value));
        }
    }
}

impl ClickHouseStore {
    /// The events and binaries of `batches` (one insert per table, none when empty).
    pub(super) async fn write_changes(
        &self,
        batches: &[&NormalizedBatch],
    ) -> Result<(), StorageError> {
        if batches.iter().any(|b| !b.events.is_empty()) {
            let mut insert = self.client.insert::<EventRow>("change_events").await?;
            for event in batches.iter().flat_map(|b| &b.events) {
                insert
                    .write(&EventRow {
                        id: event.id,
                        ts: ts_u32(event.time_unix_ns.div_euclid(NS)),
                        time_ns: event.time_unix_ns,
                        kind: event.kind.clone(),
                        host: event.host.clone(),
                        service: event.service.clone(),
                        agent: event.agent.clone(),
                        pid: event.pid,
                        previous_pid: event.previous_pid.unwrap_or(0),
                        build_id: event.build_id.clone(),
                        previous_build_id: event.previous_build_id.clone(),
                        executable: event.executable.clone(),
                        labels: event.labels_json(),
                    })
                    .await?;
            }
            insert.end().await?;
        }
        if batches.iter().any(|b| !b.binaries.is_empty()) {
            let mut insert = self.client.insert::<BinaryRow>("binaries").await?;
            for batch in batches {
                let batch_id = batch.batch_id();
                for binary in &batch.binaries {
                    insert
                        .write(&BinaryRow {
                            ts: ts_u32(binary.first_unix_ns.div_euclid(NS)),
                            batch: batch_id,
                            host: binary.host.clone(),
                            service: binary.service.clone(),
                            path: binary.path.clone(),
                            build_id: binary.build_id.clone(),
                            debug_file: binary.debug_file.clone(),
                            frame_pointers: frame_pointers_code(binary.frame_pointers),
                            stacks: binary.stacks,
                            truncated_stacks: binary.truncated_stacks,
                            error: binary.error.clone(),
                            first_ns: binary.first_unix_ns,
                            last_ns: binary.last_unix_ns,
                        })
                        .await?;
                }
            }
            insert.end().await?;
        }
        Ok(())
    }

    pub(super) async fn query_events(
        &self,
        range: TimeRange,
        filter: &Filter,
    ) -> Result<Vec<ChangeRecord>, StorageError> {
        let mut sql = format!(
            "SELECT id, ts, time_ns, kind, host, service, agent, pid, previous_pid, build_id,
                    previous_build_id, executable, labels FROM change_events FINAL
             WHERE ts >= toDateTime({}) AND ts <= toDateTime({}) AND time_ns >= {} AND time_ns < {}",
            ts_u32(range.from_unix_ns.div_euclid(NS)),
            ts_u32(range.until_unix_ns.div_euclid(NS)),
            range.from_unix_ns,
            range.until_unix_ns,
        );
        scope_conditions(&mut sql, filter);
        sql.push_str(" ORDER BY time_ns, id");
        let rows: Vec<EventRow> = self.client.query_raw(&sql).fetch_all().await?;
        Ok(rows
            .into_iter()
            .map(|row| ChangeRecord {
                id: row.id,
                time_unix_ns: row.time_ns,
                kind: row.kind,
                host: row.host,
                service: row.service,
                agent: row.agent,
                pid: row.pid,
                previous_pid: (row.previous_pid != 0).then_some(row.previous_pid),
                build_id: row.build_id,
                previous_build_id: row.previous_build_id,
                executable: row.executable,
                labels: serde_json::from_str(&row.labels).unwrap_or_default(),
            })
            .collect())
    }

    pub(super) async fn query_binaries(
        &self,
        range: TimeRange,
        filter: &Filter,
    ) -> Result<Vec<BinaryRecord>, StorageError> {
        let mut sql = format!(
            "SELECT host, service, path, build_id, argMax(debug_file, last_ns),
                    argMax(frame_pointers, last_ns), sum(stacks), sum(truncated_stacks),
                    argMax(error, last_ns), min(first_ns), max(last_ns)
             FROM binaries FINAL
             WHERE ts >= toDateTime({}) AND ts < toDateTime({}) AND last_ns >= {} AND first_ns < {}",
            // A batch's row is dated by its start: one that began before the range may
            // reach into it.
            ts_u32(range.from_unix_ns.div_euclid(NS) - 3600),
            ts_u32(range.until_unix_ns.div_euclid(NS) + 1),
            range.from_unix_ns,
            range.until_unix_ns,
        );
        scope_conditions(&mut sql, filter);
        sql.push_str(
            " GROUP BY host, service, path, build_id ORDER BY host, service, path, build_id",
        );
        let rows: Vec<BinarySum> = self.client.query_raw(&sql).fetch_all().await?;
        Ok(rows
            .into_iter()
            .map(|row| BinaryRecord {
                host: row.host,
                service: row.service,
                path: row.path,
                build_id: row.build_id,
                debug_file: row.debug_file,
                frame_pointers: frame_pointers_from_code(i64::from(row.frame_pointers)),
                stacks: row.stacks,
                truncated_stacks: row.truncated_stacks,
                error: row.error,
                first_unix_ns: row.first_ns,
                last_unix_ns: row.last_ns,
            })
            .collect())
    }
}
