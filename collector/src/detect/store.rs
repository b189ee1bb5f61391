//! What the detector needs from window storage, and nothing more: read the open automatic
//! windows (to take them up after a restart), one window by id, the windows of a scope
//! over a range (to leave them out of baselines and to chain ids), and write a version of
//! a window (the latest version of an id wins).

use std::future::Future;

use crate::{
    storage::{Storage, StorageError, TimeRange},
    windows::{Indicator, Window, WindowFilter, WindowSource},
};

/// One indicator that crossed, as stored on the window.
#[derive(Debug, Clone, PartialEq)]
pub struct IndicatorRecord {
    pub name: String,
    pub baseline: f64,
    pub observed: f64,
    pub score: f64,
}

/// A window as the detector reads and writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWindow {
    pub id: String,
    /// Found by a detector (as opposed to an alert or a person).
    pub automatic: bool,
    /// Empty: every host (a window of another source).
    pub host: String,
    /// Empty: every service.
    pub service: String,
    pub onset_unix_ns: i64,
    pub end_unix_ns: Option<i64>,
    pub indicators: Vec<IndicatorRecord>,
    pub note: String,
    pub top_cause: Option<String>,
    /// The version: the larger wins.
    pub updated_unix_ns: i64,
}

impl StoredWindow {
    /// Whether the window covers the scope (an empty host or service covers all).
    pub fn covers(&self, host: &str, service: &str) -> bool {
        (self.host.is_empty() || self.host == host)
            && (self.service.is_empty() || self.service == service)
    }
}

/// Window storage as the detector uses it.
pub trait WindowStore: Send + Sync + 'static {
    /// Every open automatic window.
    fn open_automatic_windows(
        &self,
    ) -> impl Future<Output = Result<Vec<StoredWindow>, StorageError>> + Send;

    /// The latest version of one window.
    fn window_by_id(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Option<StoredWindow>, StorageError>> + Send;

    /// Windows of every source overlapping `range` (open ones extend to now).
    fn windows_overlapping(
        &self,
        range: TimeRange,
    ) -> impl Future<Output = Result<Vec<StoredWindow>, StorageError>> + Send;

    /// Stores a version of a window; an older or equal version changes nothing.
    fn put_window(
        &self,
        window: StoredWindow,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
}

fn from_window(window: Window) -> StoredWindow {
    StoredWindow {
        automatic: window.source == WindowSource::Automatic,
        indicators: window
            .indicators
            .into_iter()
            .map(|i| IndicatorRecord {
                name: i.name,
                baseline: i.baseline,
                observed: i.observed,
                score: i.score,
            })
            .collect(),
        id: window.id,
        host: window.host,
        service: window.service,
        onset_unix_ns: window.onset_unix_ns,
        end_unix_ns: window.end_unix_ns,
        note: window.note,
        top_cause: window.top_cause,
        updated_unix_ns: window.updated_unix_ns,
    }
}

/// The detector writes automatic windows only.
fn to_window(window: StoredWindow) -> Window {
    Window {
        id: window.id,
        source: WindowSource::Automatic,
        host: window.host,
        service: window.service,
        onset_unix_ns: window.onset_unix_ns,
        end_unix_ns: window.end_unix_ns,
        indicators: window
            .indicators
            .into_iter()
            .map(|i| Indicator {
                name: i.name,
                baseline: i.baseline,
                observed: i.observed,
                score: i.score,
            })
            .collect(),
        alert: None,
        note: window.note,
        top_cause: window.top_cause,
        updated_unix_ns: window.updated_unix_ns,
    }
}

/// Window storage as the collector's backends provide it.
impl<S: Storage> WindowStore for S {
    async fn open_automatic_windows(&self) -> Result<Vec<StoredWindow>, StorageError> {
        Ok(self
            .open_windows(Some(WindowSource::Automatic))
            .await?
            .into_iter()
            .map(from_window)
            .collect())
    }

    async fn window_by_id(&self, id: String) -> Result<Option<StoredWindow>, StorageError> {
        Ok(self.window(id).await?.map(from_window))
    }

    async fn windows_overlapping(
        &self,
        range: TimeRange,
    ) -> Result<Vec<StoredWindow>, StorageError> {
        Ok(self
            .windows(range, WindowFilter::default())
            .await?
            .into_iter()
            .map(from_window)
            .collect())
    }

    async fn put_window(&self, window: StoredWindow) -> Result<(), StorageError> {
        self.upsert_window(to_window(window)).await.map(|_| ())
    }
}
