//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` on the HTTP listener.
//! Served without a token, like any exporter: they carry counts, never profile data,
//! agent names or window contents. Storage is asked once per scrape (its open windows,
//! with a deadline) so `stallscope_collector_storage_up` and `/readyz` say whether it
//! answers now.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use stallscope_profile::exposition::CONTENT_TYPE;

use super::{HttpState, text};
use crate::{
    metrics::{METRICS, StorageState},
    storage::Storage,
    window::WindowSource,
};

/// How long a scrape waits for storage before reporting it down.
const STORAGE_DEADLINE: Duration = Duration::from_secs(5);

/// Open windows per source, or `None` when storage fails or is too slow.
async fn storage_state<S: Storage>(storage: &S) -> StorageState {
    let open = tokio::time::timeout(STORAGE_DEADLINE, storage.open_windows(None)).await;
    let open_windows = match open {
        Ok(Ok(windows)) => {
            let mut counts = [0u64; 3];
            for window in &windows {
                if let Some(index) = WindowSource::ALL.iter().position(|&s| s == window.source) {
                    counts[index] += 1;
                }
            }
            Some(counts)
        }
        Ok(Err(err)) => {
            tracing::warn!("metrics: storage did not answer: {err}");
            None
        }
        Err(_) => {
            tracing::warn!("metrics: storage did not answer within {STORAGE_DEADLINE:?}");
            None
        }
    };
    StorageState {
        backend: storage.backend(),
        open_windows,
    }
}

pub(crate) async fn metrics<S: Storage>(State(state): State<Arc<HttpState<S>>>) -> Response {
    let storage = storage_state(state.storage.as_ref()).await;
    let mut response = (StatusCode::OK, METRICS.render(&storage)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

pub(crate) async fn healthz() -> Response {
    text(StatusCode::OK, "ok")
}

pub(crate) async fn readyz<S: Storage>(State(state): State<Arc<HttpState<S>>>) -> Response {
    match storage_state(state.storage.as_ref()).await.open_windows {
        Some(_) => text(StatusCode::OK, "ready"),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage does not answer; see the collector's log",
        ),
    }
}
