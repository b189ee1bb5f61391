//! Degradation windows as they come and go: marked by hand (here: added, closed),
//! Alertmanager's alerts turned into windows (`alertmanager.rs`), and the conversions to
//! the query API (`wire.rs`). What a window is lives in `crate::window` (storage keeps
//! it and needs nothing from here); storage keeps the latest version of each window id
//! (`Storage::upsert_window`).

pub mod alertmanager;
pub mod rfc3339;
pub mod wire;

use thiserror::Error;

use crate::storage::{Storage, StorageError};
pub use crate::window::{
    AlertInfo, Indicator, MAX_NOTE, UpsertOutcome, Window, WindowFilter, WindowSource, WindowState,
    valid_id, window_id,
};

/// Why a window operation was refused or failed.
#[derive(Debug, Error)]
pub enum WindowError {
    /// The request can never succeed as it is.
    #[error("{0}")]
    Invalid(String),
    #[error("no window with id `{0}`")]
    NotFound(String),
    #[error("window {id} was already closed at {end}")]
    AlreadyClosed { id: String, end: String },
    /// Storage failed; retrying may succeed.
    #[error("storage error: {0}")]
    Storage(#[from] StorageError),
}

/// A window marked by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualWindow {
    pub host: String,
    pub service: String,
    pub from_unix_ns: i64,
    /// `None`: open until closed.
    pub until_unix_ns: Option<i64>,
    pub note: String,
}

/// How far in the future a manual window may start or end: clocks differ a little,
/// dates typed wrong differ a lot.
const FUTURE_SLACK_NS: i64 = 24 * 3600 * 1_000_000_000;

/// Records a manual window. Its id is derived from its content, so a repeated request
/// (a retry) returns the window stored the first time, with `false`.
pub async fn add_manual<S: Storage>(
    storage: &S,
    request: ManualWindow,
    now_unix_ns: i64,
) -> Result<(Window, bool), WindowError> {
    let invalid = |m: String| Err(WindowError::Invalid(m));
    if request.service.is_empty() && request.host.is_empty() {
        return invalid("a window needs a scope: a service, a host, or both".to_owned());
    }
    if request.from_unix_ns <= 0 {
        return invalid("the window's start must be after 1970".to_owned());
    }
    if request.from_unix_ns > now_unix_ns + FUTURE_SLACK_NS {
        return invalid(format!(
            "the window starts at {}, more than a day from now: check the date",
            rfc3339::format(request.from_unix_ns)
        ));
    }
    if let Some(until) = request.until_unix_ns
        && until <= request.from_unix_ns
    {
        return invalid(format!(
            "the window must end after it starts ({} is not after {})",
            rfc3339::format(until),
            rfc3339::format(request.from_unix_ns)
        ));
    }
    let from = request.from_unix_ns.to_string();
    let until = request
        .until_unix_ns
        .map(|u| u.to_string())
        .unwrap_or_default();
    let id = window_id(
        "m",
        &[
            &request.host,
            &request.service,
            &from,
            &until,
            &request.note,
        ],
    );
    if let Some(existing) = storage.window(id.clone()).await? {
        return Ok((existing, false));
    }
    let window = Window {
        id,
        source: WindowSource::Manual,
        host: request.host,
        service: request.service,
        onset_unix_ns: request.from_unix_ns,
        end_unix_ns: request.until_unix_ns,
        indicators: Vec::new(),
        alert: None,
        note: request.note,
        top_cause: None,
        updated_unix_ns: now_unix_ns,
    };
    window.validate().map_err(WindowError::Invalid)?;
    let outcome = storage.upsert_window(window.clone()).await?;
    Ok((window, outcome == UpsertOutcome::Created))
}

/// Closes the open window `id` at `at_unix_ns` (now when `None`).
pub async fn close<S: Storage>(
    storage: &S,
    id: &str,
    at_unix_ns: Option<i64>,
    now_unix_ns: i64,
) -> Result<Window, WindowError> {
    valid_id(id).map_err(WindowError::Invalid)?;
    let mut window = storage
        .window(id.to_owned())
        .await?
        .ok_or_else(|| WindowError::NotFound(id.to_owned()))?;
    if let Some(end) = window.end_unix_ns {
        return Err(WindowError::AlreadyClosed {
            id: id.to_owned(),
            end: rfc3339::format(end),
        });
    }
    let end = at_unix_ns.unwrap_or(now_unix_ns);
    if end < window.onset_unix_ns {
        return Err(WindowError::Invalid(format!(
            "window {id} started at {}: it cannot close before that ({})",
            rfc3339::format(window.onset_unix_ns),
            rfc3339::format(end)
        )));
    }
    if end > now_unix_ns + FUTURE_SLACK_NS {
        return Err(WindowError::Invalid(format!(
            "{} is more than a day from now: check the date",
            rfc3339::format(end)
        )));
    }
    window.end_unix_ns = Some(end);
    // Later than the stored version even if the clock stepped back.
    window.updated_unix_ns = now_unix_ns.max(window.updated_unix_ns + 1);
    storage.upsert_window(window.clone()).await?;
    Ok(window)
}
