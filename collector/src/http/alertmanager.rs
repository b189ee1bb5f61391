//! `POST /webhook/alertmanager`: Alertmanager's webhook, answered by its retry rules.
//! 2xx: stored (or already stored: deliveries are idempotent). 4xx for what will never
//! be valid (Alertmanager does not retry those): 401 without a valid bearer token, 413
//! for a body over the limit, 400 for anything else wrong with the payload, each with a
//! one-line reason and nothing stored. 503 only for what a retry may fix: storage
//! failed, or the body did not arrive within 30 s.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use super::{BODY_TIMEOUT, HttpState, text};
use crate::{
    storage::{Storage, StorageError},
    windows::alertmanager,
};

pub async fn receive<S: Storage>(
    State(state): State<Arc<HttpState<S>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(refusal) = state.tokens.check_bearer(authorization) {
        tracing::warn!("alertmanager webhook refused: {refusal}");
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            &format!(
                "{refusal}: configure the webhook's http_config.authorization with one of the collector's query tokens"
            ),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let limit = state.max_body_bytes;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "the body is larger than {limit} bytes: lower max_alerts in the webhook configuration or raise the collector's --http-max-body-bytes"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return too_large();
    }
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await;
    let bytes = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(err)) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("reading the body failed: {err}"),
            );
        }
        // Slow, not invalid: a 4xx would make Alertmanager drop the delivery.
        Err(_) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "the body did not arrive within {} s; retry",
                    BODY_TIMEOUT.as_secs()
                ),
            );
        }
    };
    let now = crate::unix_now_ns();
    let planned = match alertmanager::parse(&bytes).and_then(|payload| {
        alertmanager::plan(&payload, &state.label_rule, now).map(|w| (payload, w))
    }) {
        Ok(planned) => planned,
        Err(reason) => {
            tracing::warn!("alertmanager webhook refused: {reason}");
            return text(StatusCode::BAD_REQUEST, &reason);
        }
    };
    let (payload, windows) = planned;
    let alerts = windows.len();
    match alertmanager::apply(&*state.storage, windows).await {
        Ok(delivery) => {
            tracing::info!(
                "alertmanager delivery: group {} {}, {alerts} alerts: {} opened, {} closed, {} updated, {} unchanged",
                payload.group_key.escape_debug(),
                payload.status,
                delivery.opened,
                delivery.closed,
                delivery.updated,
                delivery.unchanged
            );
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                format!(
                    "{{\"alerts\":{alerts},\"opened\":{},\"closed\":{},\"updated\":{},\"unchanged\":{}}}\n",
                    delivery.opened, delivery.closed, delivery.updated, delivery.unchanged
                ),
            )
                .into_response()
        }
        Err(StorageError::Invalid(reason)) => {
            tracing::warn!("alertmanager webhook refused: {reason}");
            text(StatusCode::BAD_REQUEST, &reason)
        }
        Err(err) => {
            tracing::error!("alertmanager delivery not stored, Alertmanager will retry: {err}");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("storage is unavailable, retry later: {err}"),
            )
        }
    }
}
