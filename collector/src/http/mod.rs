//! The collector's HTTP listener (`--http-listen`, off unless set): Alertmanager's
//! webhook (`alertmanager.rs`), the Prometheus self-metrics (`/metrics`) and health
//! (`/healthz`: serving; `/readyz`: storage answers), the last three without a token
//! (`probes.rs`). HTTP/1.1 (hyper) with an axum router; TLS with the collector's
//! certificate when the collector runs with TLS, client certificates verified against
//! its client CA (optional, or required with `--http-require-client-cert`); bearer
//! tokens like the query API; a body size limit; deadlines for the TLS handshake, the
//! request head and the body; a bound on open connections.

pub mod alertmanager;
pub mod probes;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use thiserror::Error;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::{
    identity::QueryTokens, storage::Storage, tls::TlsFiles, windows::alertmanager::LabelRule,
};

/// Where Alertmanager posts its webhook.
pub const ALERTMANAGER_PATH: &str = "/webhook/alertmanager";

/// Default largest request body: a delivery of a few thousand alerts.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Open connections at most; further clients wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// Deadlines: a client that is this slow is gone or hostile.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP listener's validated settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Refuse TLS clients without a certificate from the client CA.
    pub require_client_cert: bool,
    /// Which alert labels name a window's scope.
    pub label_rule: LabelRule,
}

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("HTTP listener on {addr} (--http-listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP listener TLS: {0}")]
    Tls(String),
}

/// What the handlers share.
pub struct HttpState<S> {
    pub storage: Arc<S>,
    pub tokens: QueryTokens,
    pub max_body_bytes: usize,
    pub label_rule: LabelRule,
}

/// A one-line plain-text answer (what went wrong and what to do), as every refusal is.
pub(crate) fn text(status: StatusCode, message: &str) -> Response {
    let mut response = (status, format!("{}\n", message.replace('\n', " "))).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The routes.
pub fn router<S: Storage>(state: Arc<HttpState<S>>) -> Router {
    Router::new()
        .route(
            ALERTMANAGER_PATH,
            axum::routing::post(alertmanager::receive::<S>).fallback(|| async {
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use POST: this is Alertmanager's webhook endpoint",
                )
            }),
        )
        .route("/metrics", axum::routing::get(probes::metrics::<S>))
        .route("/healthz", axum::routing::get(probes::healthz))
        .route("/readyz", axum::routing::get(probes::readyz::<S>))
        .fallback(|| async {
            text(
                StatusCode::NOT_FOUND,
                &format!(
                    "no such endpoint; Alertmanager's webhook is at {ALERTMANAGER_PATH}, metrics at /metrics, health at /healthz and /readyz"
                ),
            )
        })
        .with_state(state)
}

/// TLS for the listener from the collector's own material: its certificate and key,
/// and its client CA to verify client certificates.
pub fn tls_config(
    tls: &TlsFiles,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, HttpError> {
    let bad = |what: &str, err: &dyn std::fmt::Display| HttpError::Tls(format!("{what}: {err}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|err| bad("server certificate", &err))?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|err| bad("server key", &err))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.client_ca_pem) {
        roots
            .add(ca.map_err(|err| bad("client CA", &err))?)
            .map_err(|err| bad("client CA", &err))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
    let verifier = if require_client_cert {
        verifier
    } else {
        verifier.allow_unauthenticated()
    }
    .build()
    .map_err(|err| bad("client CA", &err))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| bad("protocol versions", &err))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|err| bad("server certificate and key", &err))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Binds the listener and serves it in a task (aborted at shutdown).
pub async fn start<S: Storage>(
    storage: Arc<S>,
    settings: &HttpSettings,
    tls: Option<&TlsFiles>,
    tokens: QueryTokens,
) -> Result<JoinHandle<()>, HttpError> {
    let acceptor = tls
        .map(|tls| tls_config(tls, settings.require_client_cert).map(TlsAcceptor::from))
        .transpose()?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| HttpError::Bind {
            addr: settings.listen,
            source,
        })?;
    let router = router(Arc::new(HttpState {
        storage,
        tokens,
        max_body_bytes: settings.max_body_bytes,
        label_rule: settings.label_rule.clone(),
    }));
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    tracing::info!(
        "HTTP endpoint at {scheme}://{}: Alertmanager webhook {ALERTMANAGER_PATH}, /metrics, /healthz, /readyz",
        settings.listen
    );
    Ok(tokio::spawn(accept_loop(listener, acceptor, router)))
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    router: Router,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&connections).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("HTTP accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, router, peer).await,
                        Ok(Err(err)) => {
                            tracing::info!("HTTP client {peer}: TLS handshake failed: {err}");
                        }
                        Err(_) => tracing::info!("HTTP client {peer}: TLS handshake timed out"),
                    }
                }
                None => serve_connection(stream, router, peer).await,
            }
        });
    }
}

async fn serve_connection<IO>(stream: IO, router: Router, peer: SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = served {
        tracing::debug!("HTTP client {peer}: {err}");
    }
}
