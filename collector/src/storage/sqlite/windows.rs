//! Degradation windows in SQLite: one row per id holding its latest version. An upsert
//! reads the stored version and writes only a newer one, in one transaction on the
//! writer connection (so a concurrent upsert cannot interleave).

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use crate::{
    storage::{StorageError, TimeRange},
    window::{UpsertOutcome, Window, WindowFilter, WindowSource, WindowState},
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS degradation_windows (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, host TEXT NOT NULL, service TEXT NOT NULL,
    onset_ns INTEGER NOT NULL, end_ns INTEGER, state TEXT NOT NULL, indicators TEXT NOT NULL,
    alert TEXT NOT NULL, note TEXT NOT NULL, top_cause TEXT, updated_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS degradation_windows_onset ON degradation_windows (onset_ns);
CREATE INDEX IF NOT EXISTS degradation_windows_open ON degradation_windows (state, onset_ns);
";

const COLUMNS: &str =
    "id, source, host, service, onset_ns, end_ns, indicators, alert, note, top_cause, updated_ns";

/// Creates the table. Earlier versions had a placeholder `windows` table that nothing
/// wrote; it is dropped.
pub fn create(conn: &Connection) -> Result<(), StorageError> {
    let placeholder: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('windows') WHERE name = 'from_ns'")?
        .exists([])?;
    if placeholder {
        conn.execute_batch("DROP TABLE windows")?;
    }
    conn.execute_batch(SCHEMA)?;
    Ok(())
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<Window> {
    let source: String = row.get(1)?;
    let indicators: String = row.get(6)?;
    let alert: String = row.get(7)?;
    let (indicators, alert) = Window::decode_json_columns(&indicators, &alert);
    Ok(Window {
        id: row.get(0)?,
        source: source.parse().unwrap_or(WindowSource::Manual),
        host: row.get(2)?,
        service: row.get(3)?,
        onset_unix_ns: row.get(4)?,
        end_unix_ns: row.get(5)?,
        indicators,
        alert,
        note: row.get(8)?,
        top_cause: row.get(9)?,
        updated_unix_ns: row.get(10)?,
    })
}

pub fn upsert(conn: &mut Connection, window: &Window) -> Result<UpsertOutcome, StorageError> {
    window.validate().map_err(StorageError::Invalid)?;
    let tx = conn.transaction()?;
    let stored = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM degradation_windows WHERE id = ?1"
        ))?
        .query_row([&window.id], from_row)
        .optional()?;
    let outcome = match stored {
        Some(stored)
            if stored.updated_unix_ns >= window.updated_unix_ns || stored.same_content(window) =>
        {
            return Ok(UpsertOutcome::Unchanged);
        }
        Some(_) => UpsertOutcome::Updated,
        None => UpsertOutcome::Created,
    };
    tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO degradation_windows ({COLUMNS}, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))?
    .execute(params![
        window.id,
        window.source.as_str(),
        window.host,
        window.service,
        window.onset_unix_ns,
        window.end_unix_ns,
        window.indicators_json(),
        window.alert_json(),
        window.note,
        window.top_cause,
        window.updated_unix_ns,
        window.state().as_str(),
    ])?;
    tx.commit()?;
    Ok(outcome)
}

pub fn get(conn: &Connection, id: &str) -> Result<Option<Window>, StorageError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM degradation_windows WHERE id = ?1"
        ))?
        .query_row([id], from_row)
        .optional()?)
}

pub fn list(
    conn: &Connection,
    range: TimeRange,
    filter: &WindowFilter,
) -> Result<Vec<Window>, StorageError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM degradation_windows
         WHERE onset_ns < ?2 AND (end_ns IS NULL OR end_ns > ?1)
         ORDER BY onset_ns, id"
    ))?;
    let rows = stmt.query_map(params![range.from_unix_ns, range.until_unix_ns], from_row)?;
    let mut windows = Vec::new();
    for window in rows {
        let window = window?;
        if filter.matches(&window) {
            windows.push(window);
        }
    }
    Ok(windows)
}

pub fn open(conn: &Connection, source: Option<WindowSource>) -> Result<Vec<Window>, StorageError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM degradation_windows WHERE state = ?1 ORDER BY onset_ns, id"
    ))?;
    let rows = stmt.query_map([WindowState::Open.as_str()], from_row)?;
    let mut windows = Vec::new();
    for window in rows {
        let window = window?;
        if source.is_none_or(|s| s == window.source) {
            windows.push(window);
        }
    }
    Ok(windows)
}
