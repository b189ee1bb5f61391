//! The degradation window: a period during which a scope (a host and/or a service; empty
//! means all) was degraded, where it came from, and, once explained, its top cause.
//! Windows are versioned (`updated_unix_ns`): storage keeps the latest version of each id.
//! How windows are added, closed and received is `crate::windows`'s.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use stallscope_profile::Labels;

use crate::hash::StableHasher;

/// Where a window came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowSource {
    /// Found by the collector's detector.
    Automatic,
    /// Opened and closed by Alertmanager's webhook.
    Alertmanager,
    /// Marked by hand (`stallscope windows add`).
    Manual,
}

impl WindowSource {
    pub const ALL: [Self; 3] = [Self::Automatic, Self::Alertmanager, Self::Manual];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Automatic => "automatic",
            Self::Alertmanager => "alertmanager",
            Self::Manual => "manual",
        }
    }
}

impl fmt::Display for WindowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WindowSource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|source| source.as_str() == text)
            .ok_or_else(|| {
                format!("unknown window source `{text}`: use automatic, alertmanager or manual")
            })
    }
}

/// Whether a window has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowState {
    Open,
    Closed,
}

impl WindowState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }
}

impl fmt::Display for WindowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WindowState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            _ => Err(format!("unknown window state `{text}`: use open or closed")),
        }
    }
}

/// One indicator of an automatic window: how far it moved from its baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Indicator {
    pub name: String,
    pub baseline: f64,
    pub observed: f64,
    /// The detector's significance score (for example a robust z-score).
    pub score: f64,
}

/// The alert behind an Alertmanager window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertInfo {
    pub labels: Labels,
    pub annotations: Labels,
    pub fingerprint: String,
    pub group_key: String,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub generator_url: String,
    #[serde(default)]
    pub external_url: String,
}

/// A degradation window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Stable, derived from what identifies the window at its source (see [`window_id`]).
    pub id: String,
    pub source: WindowSource,
    /// Empty: every host.
    pub host: String,
    /// Empty: every service.
    pub service: String,
    /// Start, Unix nanoseconds.
    pub onset_unix_ns: i64,
    /// End, Unix nanoseconds; `None` while open.
    pub end_unix_ns: Option<i64>,
    /// Automatic windows: the indicators that crossed.
    pub indicators: Vec<Indicator>,
    /// Alertmanager windows: the alert.
    pub alert: Option<AlertInfo>,
    pub note: String,
    /// Once explained: the cause that explains most of the window.
    pub top_cause: Option<String>,
    /// The version: of two writes of one id, the one with the larger value wins.
    pub updated_unix_ns: i64,
}

/// Longest id, host, service, top cause.
const MAX_NAME: usize = 253;
/// Longest note.
pub const MAX_NOTE: usize = 4096;

impl Window {
    pub fn state(&self) -> WindowState {
        if self.end_unix_ns.is_some() {
            WindowState::Closed
        } else {
            WindowState::Open
        }
    }

    pub fn is_explained(&self) -> bool {
        self.top_cause.is_some()
    }

    /// Equal in everything but the version.
    pub fn same_content(&self, other: &Self) -> bool {
        Self {
            updated_unix_ns: 0,
            ..self.clone()
        } == Self {
            updated_unix_ns: 0,
            ..other.clone()
        }
    }

    /// Whether the window and `[from, until)` overlap; an open window extends to now.
    pub fn overlaps(&self, from_unix_ns: i64, until_unix_ns: i64) -> bool {
        self.onset_unix_ns < until_unix_ns && self.end_unix_ns.is_none_or(|end| end > from_unix_ns)
    }

    /// What storage refuses to keep.
    pub fn validate(&self) -> Result<(), String> {
        valid_id(&self.id)?;
        for (what, text) in [("host", &self.host), ("service", &self.service)] {
            if text.len() > MAX_NAME || text.chars().any(char::is_control) {
                return Err(format!(
                    "window {}: the {what} must be at most {MAX_NAME} printable characters",
                    self.id
                ));
            }
        }
        if self.note.len() > MAX_NOTE {
            return Err(format!(
                "window {}: the note is {} bytes long (at most {MAX_NOTE})",
                self.id,
                self.note.len()
            ));
        }
        if self
            .top_cause
            .as_ref()
            .is_some_and(|c| c.is_empty() || c.len() > MAX_NAME)
        {
            return Err(format!(
                "window {}: a top cause must be 1 to {MAX_NAME} characters",
                self.id
            ));
        }
        if self.onset_unix_ns <= 0 {
            return Err(format!("window {}: the onset must be after 1970", self.id));
        }
        if let Some(end) = self.end_unix_ns
            && end < self.onset_unix_ns
        {
            return Err(format!(
                "window {}: it ends ({end}) before its onset ({})",
                self.id, self.onset_unix_ns
            ));
        }
        Ok(())
    }

    pub fn indicators_json(&self) -> String {
        serde_json::to_string(&self.indicators).unwrap_or_else(|_| "[]".to_owned())
    }

    pub fn alert_json(&self) -> String {
        self.alert
            .as_ref()
            .and_then(|alert| serde_json::to_string(alert).ok())
            .unwrap_or_default()
    }

    /// Parses the JSON columns both backends store.
    pub fn decode_json_columns(
        indicators: &str,
        alert: &str,
    ) -> (Vec<Indicator>, Option<AlertInfo>) {
        (
            serde_json::from_str(indicators).unwrap_or_default(),
            (!alert.is_empty())
                .then(|| serde_json::from_str(alert).ok())
                .flatten(),
        )
    }
}

/// Window ids: letters, digits and `.`, `_`, `:`, `-`, at most 128 characters.
pub fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(format!(
            "`{}` is not a window id (letters, digits, . _ : -; at most 128)",
            id.escape_debug()
        ));
    }
    Ok(())
}

/// A deterministic id: `prefix-` and 16 hex digits of a stable hash of `parts`, so every
/// collector replica that derives a window from the same facts names it alike.
pub fn window_id(prefix: &str, parts: &[&str]) -> String {
    let mut hasher = StableHasher::new().str(prefix);
    for part in parts {
        hasher = hasher.str(part);
    }
    format!("{prefix}-{:016x}", hasher.finish() as u64)
}

/// Which windows a listing returns. A scope filter also selects windows whose scope
/// leaves that field empty (they cover every host or service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowFilter {
    pub host: Option<String>,
    pub service: Option<String>,
    pub source: Option<WindowSource>,
    pub state: Option<WindowState>,
}

impl WindowFilter {
    pub fn matches(&self, window: &Window) -> bool {
        let scope = |want: &Option<String>, have: &str| {
            want.as_deref()
                .is_none_or(|want| have.is_empty() || have == want)
        };
        scope(&self.host, &window.host)
            && scope(&self.service, &window.service)
            && self.source.is_none_or(|s| s == window.source)
            && self.state.is_none_or(|s| s == window.state())
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertOutcome {
    /// The id was new.
    Created,
    /// A newer version replaced the stored one.
    Updated,
    /// The stored version is as new or newer (a repeat, or a late write): nothing changed.
    Unchanged,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn window(id: &str) -> Window {
        Window {
            id: id.to_owned(),
            source: WindowSource::Manual,
            host: String::new(),
            service: "svc".to_owned(),
            onset_unix_ns: 100,
            end_unix_ns: None,
            indicators: Vec::new(),
            alert: None,
            note: String::new(),
            top_cause: None,
            updated_unix_ns: 1,
        }
    }

    #[test]
    fn ids_are_stable_and_checked() {
        let id = window_id("m", &["svc", "100"]);
        assert_eq!(id, window_id("m", &["svc", "100"]));
        assert_ne!(id, window_id("m", &["svc1", "00"]));
        assert!(id.starts_with("m-") && id.len() == 18, "{id}");
        assert!(valid_id(&id).is_ok());
        assert!(valid_id("a b").is_err());
        assert!(valid_id("").is_err());
    }

    #[test]
    fn filters_select_scopes_sources_and_states() {
        let mut w = window("w");
        let by_service = |s: &str| WindowFilter {
            service: Some(s.to_owned()),
            ..WindowFilter::default()
        };
        assert!(by_service("svc").matches(&w));
        assert!(!by_service("other").matches(&w));
        w.service.clear();
        assert!(by_service("other").matches(&w), "an all-services window");
        let closed = WindowFilter {
            state: Some(WindowState::Closed),
            ..WindowFilter::default()
        };
        assert!(!closed.matches(&w));
        w.end_unix_ns = Some(200);
        assert!(closed.matches(&w));
        assert!(w.overlaps(150, 300) && !w.overlaps(200, 300) && !w.overlaps(0, 100));
        w.end_unix_ns = Some(50);
        assert!(w.validate().is_err(), "ends before its onset");
    }
}
