//! Fault injection for the crash tests, off unless an environment variable asks for it:
//! the collector exits abruptly at a chosen point of the N-th stored batch, exactly as a
//! crash there would (no destructors, no flush), so the tests can prove that a replay
//! stores nothing twice.
//!
//! - `STALLSCOPE_FAULT_EXIT_AFTER_STORE=N`: after the N-th batch is durably stored, before
//!   it is acknowledged.
//! - `STALLSCOPE_FAULT_EXIT_BEFORE_MARKER=N` (ClickHouse): after the N-th batch's rows are
//!   inserted, before its marker is.

use std::sync::atomic::{AtomicU64, Ordering};

static STORED: AtomicU64 = AtomicU64::new(0);
static ROWS_WRITTEN: AtomicU64 = AtomicU64::new(0);

fn armed(variable: &str) -> Option<u64> {
    std::env::var(variable).ok()?.parse().ok()
}

fn exit_if_reached(counter: &AtomicU64, variable: &str) {
    if let Some(limit) = armed(variable) {
        let count = counter.fetch_add(1, Ordering::SeqCst) + 1;
        if count == limit {
            eprintln!("stallscope-collector: fault injection {variable}={limit}: exiting now");
            // SAFETY: `_exit` ends the process at once; that is the point.
            unsafe { libc::_exit(86) };
        }
    }
}

/// Called after a batch is durably stored and before its acknowledgement is sent.
pub fn after_store_before_ack() {
    exit_if_reached(&STORED, "STALLSCOPE_FAULT_EXIT_AFTER_STORE");
}

/// Called (ClickHouse) after a batch's rows are inserted and before its marker is.
pub fn after_rows_before_marker() {
    exit_if_reached(&ROWS_WRITTEN, "STALLSCOPE_FAULT_EXIT_BEFORE_MARKER");
}
