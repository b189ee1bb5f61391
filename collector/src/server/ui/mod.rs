//! The web UI (`--ui-listen`, off unless set): server-rendered HTML and SVG pages
//! (services, a service's timeline, a window's `why` report, flame graphs) with a little
//! plain JavaScript. Every number comes from the query API's own handlers
//! ([`QueryService`], called in-process with the caller's token), so a page shows what
//! the CLI gets. Its own listener (TLS with the collector's certificate when it has one),
//! bearer-token auth with a login page that keeps the token in an `HttpOnly`,
//! `SameSite=Strict` cookie, every asset embedded in the binary, and a
//! Content-Security-Policy that allows scripts and styles from the UI itself only.

mod assets;
mod auth;
mod chart;
mod flame;
mod html;
mod pages;
mod params;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use thiserror::Error;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::{
    config::UiSettings, identity::QueryTokens, server::QueryService, storage::Storage,
    tls::TlsFiles,
};

#[derive(Debug, Error)]
pub enum UiError {
    #[error("web UI on {addr} (--ui-listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("web UI TLS: {0}")]
    Tls(String),
}

/// What the handlers share.
pub struct UiState<S> {
    /// The query API's handlers: the pages ask them, as the CLI does over gRPC.
    pub query: QueryService<S>,
    pub tokens: QueryTokens,
    /// Mark the cookie `Secure` (the UI is served over TLS).
    pub secure_cookie: bool,
}

/// The Content-Security-Policy of every page: scripts, styles and forms from the UI
/// only; no inline script, no inline style, nothing remote, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Security headers on every answer (a handler may set its own CSP: the login page).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
    }
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The routes: `/login` is open, everything else needs a valid token.
pub fn router<S: Storage>(state: Arc<UiState<S>>) -> Router {
    let protected = Router::new()
        .route("/", get(|| async { Redirect::to("/services") }))
        .route("/services", get(pages::services::page::<S>))
        .route("/service", get(pages::service::page::<S>))
        .route("/windows/{id}", get(pages::window::page::<S>))
        .route("/flame", get(pages::flame::page::<S>))
        .route("/flame/download", get(pages::flame::download::<S>))
        .route("/assets/{name}", get(assets::serve))
        .route("/logout", post(auth::logout::<S>))
        .fallback(|| async {
            pages::error_page(
                StatusCode::NOT_FOUND,
                "No such page: start from the services page.",
            )
        })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require::<S>,
        ))
        .with_state(Arc::clone(&state));
    Router::new()
        .route("/login", get(auth::login_page::<S>).post(auth::login::<S>))
        .with_state(state)
        .merge(protected)
        .layer(middleware::map_response(security_headers))
}

/// Binds the UI's listener and serves it in a task (aborted at shutdown).
pub async fn start<S: Storage>(
    storage: Arc<S>,
    settings: &UiSettings,
    tls: Option<&TlsFiles>,
    tokens: QueryTokens,
    retention: crate::storage::Retention,
) -> Result<JoinHandle<()>, UiError> {
    // Browsers present no client certificate: one is verified if presented, never needed.
    let acceptor = tls
        .map(|tls| {
            crate::http::tls_config(tls, false)
                .map(TlsAcceptor::from)
                .map_err(|err| UiError::Tls(err.to_string()))
        })
        .transpose()?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| UiError::Bind {
            addr: settings.listen,
            source,
        })?;
    let state = Arc::new(UiState {
        query: QueryService {
            storage,
            tokens: tokens.clone(),
            retention,
        },
        tokens,
        secure_cookie: acceptor.is_some(),
    });
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    tracing::info!("web UI at {scheme}://{}/", settings.listen);
    Ok(tokio::spawn(crate::http::accept_loop(
        listener,
        acceptor,
        router(state),
    )))
}

/// A plain redirect that does not cache.
pub(crate) fn see_other(location: &str) -> Response {
    let mut response = (StatusCode::SEE_OTHER, "").into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}
