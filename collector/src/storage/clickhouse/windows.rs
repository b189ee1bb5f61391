//! Degradation windows in ClickHouse, shared by every collector replica: one
//! `ReplacingMergeTree` keyed by window id with the version (`updated_ns`) as its
//! version column, so two replicas writing the same id store one window (merges keep the
//! latest version). Reads never rely on merges having happened: they take the latest
//! version of each id (`LIMIT 1 BY id`), then filter.

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{ClickHouseStore, quote};
use crate::{
    storage::{StorageError, TimeRange},
    window::{UpsertOutcome, Window, WindowFilter, WindowSource, WindowState},
};

/// Version columns must be unsigned here (18.16), hence `UInt64`; `end_ns` is 0 while
/// open, `top_cause` empty until explained.
pub(super) const TABLE: &str = "CREATE TABLE IF NOT EXISTS degradation_windows (id String,
        source String, host String, service String, onset_ns Int64, end_ns Int64, state String,
        indicators String, alert String, note String, top_cause String, updated_ns UInt64)
     ENGINE = ReplacingMergeTree(updated_ns) ORDER BY id";

/// The placeholder table of earlier versions, which nothing wrote.
pub(super) const DROP_PLACEHOLDER: &str = "DROP TABLE IF EXISTS windows";

const COLUMNS: &str = "id, source, host, service, onset_ns, end_ns, state, indicators, alert, note, top_cause, updated_ns";

#[derive(Row, Serialize, Deserialize)]
struct WindowRow {
    id: String,
    source: String,
    host: String,
    service: String,
    onset_ns: i64,
    end_ns: i64,
    state: String,
    indicators: String,
    alert: String,
    note: String,
    top_cause: String,
    updated_ns: u64,
}

impl From<WindowRow> for Window {
    fn from(row: WindowRow) -> Self {
        let (indicators, alert) = Window::decode_json_columns(&row.indicators, &row.alert);
        Window {
            id: row.id,
            source: row.source.parse().unwrap_or(WindowSource::Manual),
            host: row.host,
            service: row.service,
            onset_unix_ns: row.onset_ns,
            end_unix_ns: (row.end_ns != 0).then_some(row.end_ns),
            indicators,
            alert,
            note: row.note,
            top_cause: (!row.top_cause.is_empty()).then_some(row.top_cause),
            updated_unix_ns: i64::try_from(row.updated_ns).unwrap_or(i64::MAX),
        }
    }
}

/// The latest version of each window `condition` selects among stored rows (a
/// condition on `id` only, so that no older version of a window is picked for lack of
/// its newer one), as a subquery. Ties (one version written twice with different
/// content, which writers avoid) go to the closed and later-ending row.
fn latest(condition: &str) -> String {
    format!(
        "(SELECT {COLUMNS} FROM degradation_windows WHERE {condition}
          ORDER BY updated_ns DESC, state ASC, end_ns DESC LIMIT 1 BY id)"
    )
}

impl ClickHouseStore {
    async fn window_rows(&self, sql: &str) -> Result<Vec<Window>, StorageError> {
        let rows: Vec<WindowRow> = self.client.query_raw(sql).fetch_all().await?;
        Ok(rows.into_iter().map(Window::from).collect())
    }

    pub(super) async fn get_window(&self, id: &str) -> Result<Option<Window>, StorageError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {}",
            latest(&format!("id = {}", quote(id)))
        );
        Ok(self.window_rows(&sql).await?.into_iter().next())
    }

    pub(super) async fn put_window(&self, window: &Window) -> Result<UpsertOutcome, StorageError> {
        window.validate().map_err(StorageError::Invalid)?;
        let outcome = match self.get_window(&window.id).await? {
            Some(stored)
                if stored.updated_unix_ns >= window.updated_unix_ns
                    || stored.same_content(window) =>
            {
                return Ok(UpsertOutcome::Unchanged);
            }
            Some(_) => UpsertOutcome::Updated,
            None => UpsertOutcome::Created,
        };
        let mut insert = self
            .client
            .insert::<WindowRow>("degradation_windows")
            .await?;
        insert
            .write(&WindowRow {
                id: window.id.clone(),
                source: window.source.as_str().to_owned(),
                host: window.host.clone(),
                service: window.service.clone(),
                onset_ns: window.onset_unix_ns,
                end_ns: window.end_unix_ns.unwrap_or(0),
                state: window.state().as_str().to_owned(),
                indicators: window.indicators_json(),
                alert: window.alert_json(),
                note: window.note.clone(),
                top_cause: window.top_cause.clone().unwrap_or_default(),
                updated_ns: u64::try_from(window.updated_unix_ns).unwrap_or(0),
            })
            .await?;
        insert.end().await?;
        Ok(outcome)
    }

    pub(super) async fn list_windows(
        &self,
        range: TimeRange,
        filter: &WindowFilter,
    ) -> Result<Vec<Window>, StorageError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE onset_ns < {} AND (end_ns = 0 OR end_ns > {})
             ORDER BY onset_ns, id",
            latest("1"),
            range.until_unix_ns,
            range.from_unix_ns
        );
        let mut windows = self.window_rows(&sql).await?;
        windows.retain(|w| filter.matches(w));
        Ok(windows)
    }

    pub(super) async fn list_open_windows(
        &self,
        source: Option<WindowSource>,
    ) -> Result<Vec<Window>, StorageError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE state = {} ORDER BY onset_ns, id",
            latest("1"),
            quote(WindowState::Open.as_str())
        );
        let mut windows = self.window_rows(&sql).await?;
        windows.retain(|w| source.is_none_or(|s| s == w.source));
        Ok(windows)
    }
}
