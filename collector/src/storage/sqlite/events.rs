//! Change events and binaries in SQLite. Both are written in the transaction that
//! stores their batch (so its marker makes them exactly-once too): events once per id,
//! binaries summed per (hour, host, service, path, build-id).

use rusqlite::{Connection, Transaction, params};

use crate::{
    batch::NormalizedBatch,
    events::{
        BinariesBuilder, BinaryRecord, ChangeRecord, frame_pointers_code, frame_pointers_from_code,
    },
    storage::{Filter, StorageError, TimeRange},
};

const HOUR_NS: i64 = 3600 * 1_000_000_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS change_events (
    id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL, host TEXT NOT NULL,
    service TEXT NOT NULL, agent TEXT NOT NULL, pid INTEGER NOT NULL, previous_pid INTEGER,
    build_id TEXT NOT NULL, previous_build_id TEXT NOT NULL, executable TEXT NOT NULL,
    labels TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS change_events_time ON change_events (time_ns);
CREATE TABLE IF NOT EXISTS binaries (
    hour_ns INTEGER NOT NULL, host TEXT NOT NULL, service TEXT NOT NULL, path TEXT NOT NULL,
    build_id TEXT NOT NULL, debug_file TEXT NOT NULL, frame_pointers INTEGER NOT NULL,
    stacks INTEGER NOT NULL, truncated_stacks INTEGER NOT NULL, error TEXT NOT NULL,
    first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL,
    PRIMARY KEY (hour_ns, host, service, path, build_id)) WITHOUT ROWID;
";

/// Creates the tables (new in an existing file too: they only add).
pub fn create(conn: &Connection) -> Result<(), StorageError> {
    conn.execute_batch(SCHEMA)?;
    Ok(())
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Adds a stored batch's events and binaries, inside its transaction.
pub fn write(tx: &Transaction<'_>, batch: &NormalizedBatch) -> Result<(), StorageError> {
    if !batch.events.is_empty() {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO change_events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        for event in &batch.events {
            insert.execute(params![
                event.id,
                event.time_unix_ns,
                event.kind,
                event.host,
                event.service,
                event.agent,
                event.pid,
                event.previous_pid,
                event.build_id,
                event.previous_build_id,
                event.executable,
                event.labels_json(),
            ])?;
        }
    }
    if !batch.binaries.is_empty() {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO binaries VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (hour_ns, host, service, path, build_id) DO UPDATE SET
                stacks = stacks + excluded.stacks,
                truncated_stacks = truncated_stacks + excluded.truncated_stacks,
                debug_file = iif(excluded.last_ns >= last_ns, excluded.debug_file, debug_file),
                frame_pointers = iif(excluded.last_ns >= last_ns AND excluded.frame_pointers >= 0,
                                     excluded.frame_pointers, frame_pointers),
                error = iif(excluded.last_ns >= last_ns, excluded.error, error),
                first_ns = min(first_ns, excluded.first_ns),
                last_ns = max(last_ns, excluded.last_ns)",
        )?;
        for binary in &batch.binaries {
            upsert.execute(params![
                binary.first_unix_ns - binary.first_unix_ns.rem_euclid(HOUR_NS),
                binary.host,
                binary.service,
                binary.path,
                binary.build_id,
                binary.debug_file,
                frame_pointers_code(binary.frame_pointers),
                saturating_i64(binary.stacks),
                saturating_i64(binary.truncated_stacks),
                binary.error,
                binary.first_unix_ns,
                binary.last_unix_ns,
            ])?;
        }
    }
    Ok(())
}

/// Drops events and binaries older than `cutoff_ns` (retention's last tier).
pub fn delete_before(tx: &Transaction<'_>, cutoff_ns: i64) -> Result<(), StorageError> {
    tx.execute("DELETE FROM change_events WHERE time_ns < ?1", [cutoff_ns])?;
    tx.execute("DELETE FROM binaries WHERE last_ns < ?1", [cutoff_ns])?;
    Ok(())
}

pub fn events(
    conn: &Connection,
    range: TimeRange,
    filter: &Filter,
) -> Result<Vec<ChangeRecord>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, time_ns, kind, host, service, agent, pid, previous_pid, build_id,
                previous_build_id, executable, labels FROM change_events
         WHERE time_ns >= ?1 AND time_ns < ?2 AND (?3 IS NULL OR host = ?3)
           AND (?4 IS NULL OR service = ?4)
         ORDER BY time_ns, id",
    )?;
    let rows = stmt.query_map(
        params![
            range.from_unix_ns,
            range.until_unix_ns,
            filter.host,
            filter.service
        ],
        |row| {
            let labels: String = row.get(11)?;
            Ok(ChangeRecord {
                id: row.get(0)?,
                time_unix_ns: row.get(1)?,
                kind: row.get(2)?,
                host: row.get(3)?,
                service: row.get(4)?,
                agent: row.get(5)?,
                pid: row.get(6)?,
                previous_pid: row.get(7)?,
                build_id: row.get(8)?,
                previous_build_id: row.get(9)?,
                executable: row.get(10)?,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn binaries(
    conn: &Connection,
    range: TimeRange,
    filter: &Filter,
) -> Result<Vec<BinaryRecord>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT host, service, path, build_id, debug_file, frame_pointers, stacks,
                truncated_stacks, error, first_ns, last_ns FROM binaries
         WHERE hour_ns >= ?1 AND hour_ns < ?2 AND last_ns >= ?3 AND first_ns < ?2
           AND (?4 IS NULL OR host = ?4) AND (?5 IS NULL OR service = ?5)",
    )?;
    let mut builder = BinariesBuilder::default();
    let mut rows = stmt.query(params![
        range.from_unix_ns - range.from_unix_ns.rem_euclid(HOUR_NS),
        range.until_unix_ns,
        range.from_unix_ns,
        filter.host,
        filter.service
    ])?;
    while let Some(row) = rows.next()? {
        builder.add(BinaryRecord {
            host: row.get(0)?,
            service: row.get(1)?,
            path: row.get(2)?,
            build_id: row.get(3)?,
            debug_file: row.get(4)?,
            frame_pointers: frame_pointers_from_code(row.get(5)?),
            stacks: row.get::<_, i64>(6)?.max(0) as u64,
            truncated_stacks: row.get::<_, i64>(7)?.max(0) as u64,
            error: row.get(8)?,
            first_unix_ns: row.get(9)?,
            last_unix_ns: row.get(10)?,
        });
    }
    Ok(builder.finish())
}
