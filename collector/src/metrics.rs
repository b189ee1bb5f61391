//! The collector's self-metrics: process-wide atomic counters bumped by ingest, the
//! query service and storage (a relaxed atomic add each), rendered in the Prometheus text
//! format for `/metrics` on the HTTP listener, with the storage's state read at scrape
//! time (its open windows: one cheap query that also says whether storage answers).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use stallscope_profile::exposition::{Exposition, MetricKind};

use crate::window::WindowSource;

/// Why an ingested frame was not stored.
#[derive(Debug, Clone, Copy)]
pub enum IngestError {
    /// Malformed or too large: refused (the agent drops it).
    Invalid = 0,
    /// Storage failed: the agent sends it again later.
    Storage = 1,
    /// The stream broke (an undecodable or oversized message, a transport error).
    Stream = 2,
}

const INGEST_ERRORS: [&str; 3] = ["invalid", "storage", "stream"];

/// The query methods counted, as the gRPC service names them.
pub const QUERY_METHODS: [&str; 12] = [
    "Targets",
    "Profile",
    "Series",
    "Diff",
    "Windows",
    "Events",
    "AddWindow",
    "CloseWindow",
    "GetWindow",
    "Explain",
    "Agents",
    "Other",
];

/// Every number the collector exports about itself.
pub struct CollectorMetrics {
    batches: AtomicU64,
    duplicates: AtomicU64,
    rows: AtomicU64,
    samples: AtomicU64,
    ingest_errors: [AtomicU64; 3],
    agent_streams: AtomicI64,
    windows_opened: [AtomicU64; 3],
    queries: [AtomicU64; QUERY_METHODS.len()],
    queries_refused: AtomicU64,
    query_storage_errors: AtomicU64,
}

/// The collector's metrics (one collector per process).
pub static METRICS: CollectorMetrics = CollectorMetrics::new();

impl Default for CollectorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What storage said when asked at scrape time.
pub struct StorageState {
    /// `sqlite` or `clickhouse`.
    pub backend: &'static str,
    /// Open windows per source, or `None` when storage did not answer.
    pub open_windows: Option<[u64; 3]>,
}

impl CollectorMetrics {
    pub const fn new() -> Self {
        Self {
            batches: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            ingest_errors: [const { AtomicU64::new(0) }; 3],
            agent_streams: AtomicI64::new(0),
            windows_opened: [const { AtomicU64::new(0) }; 3],
            queries: [const { AtomicU64::new(0) }; QUERY_METHODS.len()],
            queries_refused: AtomicU64::new(0),
            query_storage_errors: AtomicU64::new(0),
        }
    }

    /// A new batch was stored: `rows` (series, stack) rows holding `samples` events.
    pub fn batch_stored(&self, rows: u64, samples: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.samples.fetch_add(samples, Ordering::Relaxed);
    }

    /// A batch was stored before (an agent's resend): acknowledged, not stored again.
    pub fn batch_duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ingest_error(&self, error: IngestError) {
        self.ingest_errors[error as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An agent stream opened (`1`) or closed (`-1`).
    pub fn agent_streams(&self, change: i64) {
        self.agent_streams.fetch_add(change, Ordering::Relaxed);
    }

    pub fn window_opened(&self, source: WindowSource) {
        let index = WindowSource::ALL
            .iter()
            .position(|&s| s == source)
            .unwrap_or(0);
        self.windows_opened[index].fetch_add(1, Ordering::Relaxed);
    }

    /// A query of `method` (one of [`QUERY_METHODS`]) arrived.
    pub fn query(&self, method: &str) {
        self.queries[method_index(method)].fetch_add(1, Ordering::Relaxed);
    }

    /// A query was refused: no valid token.
    pub fn query_refused(&self) {
        self.queries_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A query failed in storage.
    pub fn query_storage_error(&self) {
        self.query_storage_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition, with `storage` as read just now.
    pub fn render(&self, storage: &StorageState) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64;
        let mut out = Exposition::new();
        out.single(
            "stallscope_collector_batches_ingested_total",
            MetricKind::Counter,
            "Batches stored (each once, whatever agents resend).",
            load(&self.batches),
        );
        out.single(
            "stallscope_collector_duplicate_batches_total",
            MetricKind::Counter,
            "Batches received again after they were stored (acknowledged, not stored twice).",
            load(&self.duplicates),
        );
        out.single(
            "stallscope_collector_rows_ingested_total",
            MetricKind::Counter,
            "Rows stored: one per (series, stack) of a batch.",
            load(&self.rows),
        );
        out.single(
            "stallscope_collector_samples_ingested_total",
            MetricKind::Counter,
            "Events carried by the stored rows (waits, syscalls, on-CPU samples...).",
            load(&self.samples),
        );
        let name = "stallscope_collector_ingest_errors_total";
        out.family(
            name,
            MetricKind::Counter,
            "Ingested frames not stored: invalid (refused), storage (failed, resent later), stream (broken stream).",
        );
        for (index, reason) in INGEST_ERRORS.iter().enumerate() {
            out.sample(
                name,
                &[("reason", reason)],
                load(&self.ingest_errors[index]),
            );
        }
        out.single(
            "stallscope_collector_agent_streams",
            MetricKind::Gauge,
            "Agent streams open now.",
            self.agent_streams.load(Ordering::Relaxed) as f64,
        );
        let name = "stallscope_collector_windows_opened_total";
        out.family(
            name,
            MetricKind::Counter,
            "Degradation windows this collector created, per source.",
        );
        for (index, source) in WindowSource::ALL.iter().enumerate() {
            out.sample(
                name,
                &[("source", source.as_str())],
                load(&self.windows_opened[index]),
            );
        }
        let name = "stallscope_collector_queries_total";
        out.family(
            name,
            MetricKind::Counter,
            "Query API calls (CLI and web UI), per method.",
        );
        for (index, method) in QUERY_METHODS.iter().enumerate() {
            out.sample(name, &[("method", method)], load(&self.queries[index]));
        }
        out.single(
            "stallscope_collector_queries_refused_total",
            MetricKind::Counter,
            "Query API calls refused for a missing or wrong token.",
            load(&self.queries_refused),
        );
        out.single(
            "stallscope_collector_query_storage_errors_total",
            MetricKind::Counter,
            "Query API calls that failed in storage.",
            load(&self.query_storage_errors),
        );
        let name = "stallscope_collector_storage_up";
        out.family(
            name,
            MetricKind::Gauge,
            "1 when storage answered a query at scrape time, 0 when it failed or timed out.",
        );
        out.sample(
            name,
            &[("backend", storage.backend)],
            f64::from(u8::from(storage.open_windows.is_some())),
        );
        if let Some(open) = storage.open_windows {
            let name = "stallscope_collector_open_windows";
            out.family(
                name,
                MetricKind::Gauge,
                "Degradation windows open now, per source.",
            );
            for (index, source) in WindowSource::ALL.iter().enumerate() {
                out.sample(name, &[("source", source.as_str())], open[index] as f64);
            }
        }
        out.process_metrics();
        out.finish()
    }
}

fn method_index(method: &str) -> usize {
    QUERY_METHODS
        .iter()
        .position(|&m| m == method)
        .unwrap_or(QUERY_METHODS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_storage_state() {
        let metrics = CollectorMetrics::new();
        metrics.batch_stored(3, 40);
        metrics.ingest_error(IngestError::Invalid);
        metrics.window_opened(WindowSource::Manual);
        metrics.query("Profile");
        metrics.query("Nonsense");
        let text = metrics.render(&StorageState {
            backend: "sqlite",
            open_windows: Some([0, 2, 1]),
        });
        for line in [
            "stallscope_collector_batches_ingested_total 1",
            "stallscope_collector_samples_ingested_total 40",
            "stallscope_collector_ingest_errors_total{reason=\"invalid\"} 1",
            "stallscope_collector_windows_opened_total{source=\"manual\"} 1",
            "stallscope_collector_queries_total{method=\"Profile\"} 1",
            "stallscope_collector_queries_total{method=\"Other\"} 1",
            "stallscope_collector_storage_up{backend=\"sqlite\"} 1",
            "stallscope_collector_open_windows{source=\"alertmanager\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        let down = metrics.render(&StorageState {
            backend: "clickhouse",
            open_windows: None,
        });
        assert!(down.contains("stallscope_collector_storage_up{backend=\"clickhouse\"} 0"));
        assert!(!down.contains("stallscope_collector_open_windows"));
    }
}
