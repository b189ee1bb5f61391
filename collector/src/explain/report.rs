//! The `why` report: what was different in a window, ranked by cause, with evidence and
//! what weakens it. Plain data, serialisable as JSON; the query API carries it and the
//! CLI renders it (terminal, markdown, JSON).

use serde::{Deserialize, Serialize};

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// At least one cause category changed significantly; `causes` ranks them.
    Explained,
    /// Nothing changed beyond the baseline's own variation.
    Inconclusive,
    /// The scope has no data in the window.
    NoData,
    /// Too little data outside windows to compare with.
    NotEnoughBaseline,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Explained => "explained",
            Self::Inconclusive => "inconclusive",
            Self::NoData => "no-data",
            Self::NotEnoughBaseline => "not-enough-baseline",
        }
    }
}

/// A span of time in Unix nanoseconds, `[from, until)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub from_unix_ns: i64,
    pub until_unix_ns: i64,
}

/// One baseline period and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselinePeriod {
    pub span: Span,
    /// `before` (earlier the same day), `day-N` (the same time N days earlier) or
    /// `given` (chosen by the caller).
    pub kind: String,
}

/// One piece of evidence under a cause: a lock, a peer, a device, a syscall, a process
/// that took the CPU, a function or stack that grew, a new build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// lock, peer, device, syscall, process, function, stack, build.
    pub kind: String,
    /// What it is: `futex 0x55d0c1a2b3c0`, `10.77.2.2:7002`, `loop3`, `fdatasync`,
    /// `cpu-hog (pid 4242)`, a function or a stack.
    pub name: String,
    /// Its wait (or CPU) time per second of wall time, in the window and the baseline.
    pub window_ns_per_s: f64,
    pub baseline_ns_per_s: f64,
    /// Per event (per wait, per I/O, per connect...), where it has events.
    pub window_ns_per_event: Option<f64>,
    pub baseline_ns_per_event: Option<f64>,
    /// Further facts, each a short line (`retransmits 4.1/s (baseline 0.0/s)`).
    pub details: Vec<String>,
    /// False-discovery-adjusted p-value where it was tested bucket by bucket.
    pub q_value: Option<f64>,
    /// Not seen at all in the baseline.
    pub new: bool,
}

impl Evidence {
    pub fn change_ns_per_s(&self) -> f64 {
        self.window_ns_per_s - self.baseline_ns_per_s
    }
}

/// One cause category's change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CauseChange {
    /// The category (`cpu-work`, `cpu-contention`, `lock`, `disk`, `network`, `other`).
    pub category: String,
    /// 1 for the cause that explains most; `None` when the change is noise or a fall.
    pub rank: Option<u32>,
    pub window_ns_per_s: f64,
    pub baseline_ns_per_s: f64,
    pub change_ns_per_s: f64,
    /// The change per wait of this category (mean wait in the window and the baseline).
    pub window_ns_per_event: Option<f64>,
    pub baseline_ns_per_event: Option<f64>,
    /// Share of the ranked causes' total change (0..1; 0 when not ranked).
    pub share: f64,
    /// One-sided bootstrap p-value of the rise against the baseline's own variation,
    /// and its Benjamini-Hochberg adjustment across the categories.
    pub p_value: f64,
    pub q_value: f64,
    pub significant: bool,
    pub evidence: Vec<Evidence>,
}

impl CauseChange {
    pub fn change(&self) -> f64 {
        self.change_ns_per_s
    }
}

/// A change event near the window (a deploy or restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventNote {
    pub time_unix_ns: i64,
    /// deploy or restart.
    pub kind: String,
    pub host: String,
    pub service: String,
    pub build_id: Option<String>,
    pub previous_build_id: Option<String>,
    /// What the event means for this window, one line.
    pub detail: String,
}

/// The whole answer for one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub window_id: Option<String>,
    /// Host (empty: every host) and service (empty: every service) explained.
    pub host: String,
    pub service: String,
    pub window: Span,
    pub verdict: Verdict,
    /// One line: the answer, or why there is none.
    pub summary: String,
    /// Width of the buckets compared, seconds.
    pub bucket_s: i64,
    pub window_buckets: usize,
    pub baseline_buckets: usize,
    pub baseline: Vec<BaselinePeriod>,
    /// Every category, ranked ones first (by change), then the rest by change.
    pub causes: Vec<CauseChange>,
    /// Idle time (servers waiting for requests, parked pools): shown, never ranked.
    pub idle_window_ns_per_s: f64,
    pub idle_baseline_ns_per_s: f64,
    pub events: Vec<EventNote>,
    /// What weakens the answer: losses, incomplete stacks, missing data.
    pub weaknesses: Vec<String>,
}

impl Report {
    /// The top cause's category, if any cause was ranked.
    pub fn top_cause(&self) -> Option<&str> {
        self.causes
            .iter()
            .find(|c| c.rank == Some(1))
            .map(|c| c.category.as_str())
    }
}
