//! stallscope-collector: receives agents' batch streams, stores every batch exactly once
//! (SQLite embedded, or ClickHouse for fleets), downsamples old data, keeps degradation
//! windows (by hand, from Alertmanager's webhook), answers the CLI's queries over gRPC and
//! serves a web UI on the same queries.

pub mod batch;
pub mod config;
pub mod data_dir;
pub mod detect;
pub mod events;
pub mod explain;
pub mod faults;
pub mod hash;
pub mod http;
pub mod identity;
pub mod long_waits;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod synthetic;
pub mod tls;
pub mod window;
pub mod windows;

/// Nanoseconds since the Unix epoch.
pub fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX)
        })
}
