//! The gRPC server: ingest and query services, standard health and reflection, TLS with
//! optional client certificates (required by ingest, which takes the agent identity from
//! them; queries use bearer tokens instead), keepalive, message size limits, the periodic
//! retention pass, the window detector (`detect`), and a bounded shutdown: on the signal,
//! agents' streams end with `UNAVAILABLE` (their senders reconnect later and resend what
//! was not acknowledged), and whatever is still open after the grace period is abandoned.

mod explain;
mod ingest;
mod query;
pub mod series;
pub mod sniff;
pub mod ui;

use std::{future::Future, sync::Arc, time::Duration};

use stallscope_proto::{
    FILE_DESCRIPTOR_SET,
    v1::{ingest_server::IngestServer, query_server::QueryServer},
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

pub use self::{ingest::IngestService, query::QueryService};
use crate::{config::Config, identity::IdentitySource, storage::Storage};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS configuration: {0}")]
    Tls(tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("serving on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Ui(#[from] ui::UiError),
}

/// Binds the listening socket (before anything says it listens).
pub async fn bind(config: &Config) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.listen).await.map_err(|err| {
        let hint = match err.kind() {
            std::io::ErrorKind::AddrInUse => {
                ": another process (another collector?) listens there; stop it or choose --listen"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                ": no interface of this machine has that address; choose --listen"
            }
            std::io::ErrorKind::PermissionDenied => {
                ": ports below 1024 need privileges; choose --listen"
            }
            _ => "",
        };
        std::io::Error::new(
            err.kind(),
            format!("cannot listen on {}: {err}{hint}", config.listen),
        )
    })
}

/// Serves `storage` on `listener` until `shutdown` completes, then stops within
/// `config.shutdown_timeout`. Logs `listening on` once every port (the HTTP one too) is
/// bound, naming the storage with `storage_description`.
pub async fn serve<S: Storage>(
    storage: S,
    config: &Config,
    listener: TcpListener,
    storage_description: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let storage = Arc::new(storage);
    let (stopping_tx, stopping) = watch::channel(false);
    let identity = if config.tls.is_some() {
        IdentitySource::Certificate
    } else {
        IdentitySource::Header
    };
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let ingest = IngestService {
        storage: Arc::clone(&storage),
        identity,
        limits: config.limits,
        streams: Arc::new(Semaphore::new(config.max_streams)),
        decoders: Arc::new(Semaphore::new(cores)),
        stopping: stopping.clone(),
    };
    let query = QueryService {
        storage: Arc::clone(&storage),
        tokens: config.tokens.clone(),
        retention: config.retention.clone(),
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(
            stallscope_proto::INGEST_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    health_reporter
        .set_service_status(
            stallscope_proto::QUERY_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|err| ServeError::Reflection(err.to_string()))?;

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .concurrency_limit_per_connection(64);
    if let Some(tls) = &config.tls {
        let tls_config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .client_ca_root(Certificate::from_pem(&tls.client_ca_pem))
            // Query clients authenticate with tokens and present no certificate; ingest
            // refuses streams without one. A certificate that is presented must verify.
            .client_auth_optional(true);
        builder = builder.tls_config(tls_config).map_err(ServeError::Tls)?;
    }

    let maintenance = {
        let storage = Arc::clone(&storage);
        let interval = config.maintenance_interval;
        tokio::spawn(async move {
            // The first tick is immediate: a pass at startup catches up on retention and
            // the hourly rollup after downtime, instead of one interval later.
            let mut ticker = tokio::time::interval(interval.max(Duration::from_secs(1)));
            loop {
                ticker.tick().await;
                match storage.maintain(crate::unix_now_ns() / 1_000_000_000).await {
                    Ok(report) => tracing::info!(
                        "retention: {} rows downsampled, {} rows deleted",
                        report.rows_downsampled,
                        report.rows_deleted
                    ),
                    Err(err) => tracing::warn!("retention pass failed: {err}"),
                }
            }
        })
    };

    // Automatic degradation windows: a task reading complete buckets every tick.
    let detection = config.detect.enabled.then(|| {
        let detector = crate::detect::Detector::new(
            Arc::clone(&storage),
            config.detect.clone(),
            config.retention.base_resolution_s(),
        );
        tokio::spawn(detector.run(std::future::pending()))
    });

    // The HTTP listener (Alertmanager's webhook), bound before anything is served so a
    // taken port fails the start.
    let http = match &config.http {
        Some(settings) => Some(
            crate::http::start(
                Arc::clone(&storage),
                settings,
                config.tls.as_ref(),
                config.tokens.clone(),
            )
            .await?,
        ),
        None => None,
    };

    // Every port is bound now: say so (the tests wait for this line).
    tracing::info!(
        "listening on {} ({}), {storage_description}",
        config.listen,
        if config.tls.is_some() {
            "mTLS"
        } else {
            "plaintext"
        }
    );

    // Accepted sockets: keepalive and no Nagle (as tonic's own listener sets them), and a
    // look at the first bytes for a hint when a client speaks another protocol.
    let expect_tls = config.tls.is_some();
    let listen = config.listen;
    let last_warnings = sniff::last_warnings();
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
        .map(move |accepted| {
            accepted.map(|stream| {
                sniff::SniffedStream::new(stream, expect_tls, listen, Arc::clone(&last_warnings))
            })
        });

    let grace = config.shutdown_timeout;
    let signalled = async move {
        shutdown.await;
        tracing::info!(
            "shutting down: agents' streams end now (they reconnect later), waiting at most {grace:?} for open calls"
        );
        let _ = stopping_tx.send(true);
    };
    // The web UI, on its own listener, answering through the same query service.
    let ui = match &config.ui {
        Some(settings) => Some(
            ui::start(
                Arc::clone(&storage),
                settings,
                config.tls.as_ref(),
                config.tokens.clone(),
                config.retention.clone(),
            )
            .await?,
        ),
        None => None,
    };

    let max = config.max_message_bytes;
    let serving = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(IngestServer::new(ingest).max_decoding_message_size(max))
        .add_service(
            QueryServer::new(query)
                .max_decoding_message_size(64 * 1024)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(incoming, signalled);
    let mut stopped = stopping;
    let deadline = async move {
        if stopped.wait_for(|stopping| *stopping).await.is_err() {
            // The sender is gone only once serving ended; nothing to time.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        served = serving => served.map_err(|source| ServeError::Serve {
            addr: listen,
            source,
        }),
        () = deadline => {
            tracing::warn!("connections still open {grace:?} after the shutdown signal: closing them");
            Ok(())
        }
    };
    maintenance.abort();
    if let Some(detection) = detection {
        detection.abort();
    }
    if let Some(http) = http {
        http.abort();
    }
    tracing::info!("stopped");
    if let Some(ui) = ui {
        ui.abort();
    }
    result
}

/// A storage failure as the status a query answers with (logged here, once).
pub(crate) fn storage_status(err: &crate::storage::StorageError) -> tonic::Status {
    crate::metrics::METRICS.query_storage_error();
    tracing::error!("query failed: {err}");
    tonic::Status::unavailable(format!("storage error: {err}"))
}
