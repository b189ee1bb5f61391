//! The gRPC server: ingest and query services, standard health and reflection, TLS with
//! optional client certificates (required by ingest, which takes the agent identity from
//! them; queries use bearer tokens instead), keepalive, message size limits, and the
//! periodic retention pass.

mod explain;
mod ingest;
mod query;
pub mod series;

use std::{future::Future, sync::Arc, time::Duration};

use stallscope_proto::{
    FILE_DESCRIPTOR_SET,
    v1::{ingest_server::IngestServer, query_server::QueryServer},
};
use tokio::sync::Semaphore;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

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
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Ui(#[from] crate::ui::UiError),
}

/// Serves `storage` until `shutdown` completes.
pub async fn serve<S: Storage>(
    storage: S,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let storage = Arc::new(storage);
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
    };
    let query = QueryService {
        storage: Arc::clone(&storage),
        tokens: config.tokens.clone(),
        base_resolution_s: config.retention.base_resolution_s(),
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
        .tcp_keepalive(Some(Duration::from_secs(60)))
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

    // The web UI, on its own listener, answering through the same query service.
    let ui = match &config.ui {
        Some(settings) => Some(
            crate::ui::start(
                Arc::clone(&storage),
                settings,
                config.tls.as_ref(),
                config.tokens.clone(),
                config.retention.base_resolution_s(),
            )
            .await?,
        ),
        None => None,
    };

    let max = config.max_message_bytes;
    let result = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(IngestServer::new(ingest).max_decoding_message_size(max))
        .add_service(
            QueryServer::new(query)
                .max_decoding_message_size(64 * 1024)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_shutdown(config.listen, shutdown)
        .await
        .map_err(|source| ServeError::Serve {
            addr: config.listen,
            source,
        });
    maintenance.abort();
    if let Some(http) = http {
        http.abort();
    }
    if let Some(ui) = ui {
        ui.abort();
    }
    result
}
