//! A minimal ingest client for the security and bad-input tests: it speaks the
//! collector's protocol directly, so tests can send what no agent would.

use std::time::Duration;

use prost::Message as _;
use stallscope_proto::v1::{Ack, Batch, IngestFrame, ingest_client::IngestClient};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::pki::CertFiles;

/// Frames of up to this size are sent (larger than any collector limit in the tests).
const MAX_SEND: usize = 256 * 1024 * 1024;

pub async fn connect_plain(port: u16) -> Result<IngestClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(IngestClient::new(channel).max_encoding_message_size(MAX_SEND))
}

/// Connects over TLS to `localhost:port`, verifying the server with `ca`, presenting
/// `client` if given.
pub async fn connect_tls(
    port: u16,
    ca: &std::path::Path,
    client: Option<&CertFiles>,
) -> anyhow::Result<IngestClient<Channel>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&client.cert)?,
            std::fs::read(&client.key)?,
        ));
    }
    let channel = Endpoint::from_shared(format!("https://localhost:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IngestClient::new(channel).max_encoding_message_size(MAX_SEND))
}

/// An ingest frame holding `batch` (zstd-compressed, as the agent sends it).
pub fn frame(batch: &Batch) -> IngestFrame {
    let encoded = batch.encode_to_vec();
    IngestFrame {
        sequence: batch.sequence,
        uncompressed_size: encoded.len() as u64,
        batch_zstd: zstd::bulk::compress(&encoded, 3).unwrap_or_default(),
    }
}

/// Opens one stream, sends `frames` (with the agent header if given), and collects the
/// acknowledgements until the collector ends the stream or fails it.
pub async fn send(
    client: &mut IngestClient<Channel>,
    agent: Option<&str>,
    frames: Vec<IngestFrame>,
) -> Result<Vec<Ack>, Status> {
    let expected = frames.len();
    let (tx, rx) = tokio::sync::mpsc::channel(frames.len().max(1));
    for frame in frames {
        let _ = tx.try_send(frame);
    }
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(agent) = agent {
        request.metadata_mut().insert(
            "x-stallscope-agent",
            MetadataValue::try_from(agent).map_err(|_| Status::internal("bad agent id"))?,
        );
    }
    let mut acks = Vec::new();
    let mut stream = client.stream(request).await?.into_inner();
    while acks.len() < expected {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(ack))) => acks.push(ack),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no acknowledgement within 60 s")),
        }
    }
    drop(tx);
    Ok(acks)
}
