//! The ingest stream: one task per agent connection reads frames in order, skips batches
//! already stored, decodes the rest with bounded memory, stores them and acknowledges
//! each only after storage returned. Up to [`PIPELINE_DEPTH`] frames of a stream are
//! decoded and stored concurrently (so they can share a group commit), and their acks go
//! out in frame order. A malformed frame ends that agent's stream with a clear status;
//! other agents are unaffected. When the collector shuts down, every stream stops taking
//! frames, acknowledges those already being stored, and ends with `UNAVAILABLE`, which
//! agents treat as "reconnect later" (they resend whatever was not acknowledged).

use std::{pin::Pin, sync::Arc};

use stallscope_proto::v1::{Ack, IngestFrame, ingest_server::Ingest};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    batch::{self, BatchLimits, InvalidBatch},
    faults,
    identity::{self, IdentitySource},
    metrics::{IngestError, METRICS},
    storage::{Storage, StoreOutcome},
};

/// The ingest service over a storage backend (cheap to clone: shared parts only).
pub struct IngestService<S> {
    pub storage: Arc<S>,
    pub identity: IdentitySource,
    pub limits: BatchLimits,
    /// Bounds concurrent agent streams.
    pub streams: Arc<Semaphore>,
    /// Bounds concurrent decompressions, so memory stays within
    /// `permits x max_uncompressed_bytes` whatever agents send.
    pub decoders: Arc<Semaphore>,
    /// Becomes true when the collector shuts down.
    pub stopping: watch::Receiver<bool>,
}

/// The status a stream ends with when the collector shuts down. Agents' senders treat
/// `UNAVAILABLE` as a transient failure: they back off, reconnect and resend.
pub fn shutting_down() -> Status {
    Status::unavailable("the collector is shutting down; reconnect later")
}

fn invalid_status(err: &InvalidBatch) -> Status {
    if err.is_size() {
        Status::resource_exhausted(err.to_string())
    } else {
        Status::invalid_argument(err.to_string())
    }
}

impl<S> Clone for IngestService<S> {
    fn clone(&self) -> Self {
        Self {
            storage: Arc::clone(&self.storage),
            identity: self.identity,
            limits: self.limits,
            streams: Arc::clone(&self.streams),
            decoders: Arc::clone(&self.decoders),
            stopping: self.stopping.clone(),
        }
    }
}

impl<S: Storage> IngestService<S> {
    async fn handle(&self, agent: &str, frame: IngestFrame) -> Result<Ack, Status> {
        let sequence = frame.sequence;
        let internal = |err: crate::storage::StorageError| {
            METRICS.ingest_error(IngestError::Storage);
            tracing::error!("storing batch {sequence} of {agent}: {err}");
            Status::unavailable(format!("storage is unavailable, retry later: {err}"))
        };
        if self
            .storage
            .is_stored(agent, sequence)
            .await
            .map_err(internal)?
        {
            METRICS.batch_duplicate();
            return Ok(Ack {
                sequence,
                duplicate: true,
            });
        }
        let permit = Arc::clone(&self.decoders)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("collector is shutting down"))?;
        let limits = self.limits;
        let agent_owned = agent.to_owned();
        let normalized = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let decoded = batch::decode_frame(&frame, &limits)?;
            batch::normalize(&agent_owned, sequence, decoded, &limits)
        })
        .await
        .map_err(|err| Status::internal(format!("decoding batch {sequence} failed: {err}")))?
        .map_err(|err| {
            METRICS.ingest_error(IngestError::Invalid);
            tracing::warn!("refused batch {sequence} from {agent}: {err}");
            invalid_status(&err)
        })?;
        let rows = normalized.rows.len() as u64;
        let events = normalized
            .rows
            .iter()
            .map(|row| u64::try_from(row.count).unwrap_or(0))
            .sum();
        let outcome = self.storage.store(normalized).await.map_err(internal)?;
        if outcome == StoreOutcome::Duplicate {
            METRICS.batch_duplicate();
        } else {
            METRICS.batch_stored(rows, events);
        }
        faults::after_store_before_ack();
        Ok(Ack {
            sequence,
            duplicate: outcome == StoreOutcome::Duplicate,
        })
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

/// Frames of one stream being decoded and stored at once. One at a time, a stream's
/// batches each waited for a commit (an fsync) of their own; with several in flight they
/// share commits. Bounds what one stream holds: this many decoded batches.
pub const PIPELINE_DEPTH: usize = 16;

#[tonic::async_trait]
impl<S: Storage> Ingest for IngestService<S> {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<IngestFrame>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        if *self.stopping.borrow() {
            return Err(shutting_down());
        }
        let agent = identity::agent_identity(&request, self.identity)?;
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(
                "the collector serves its maximum number of agent streams; retry later",
            )
        })?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        // Handlers in frame order; the channel's bound is the pipeline's depth.
        let (handlers, mut in_order) =
            mpsc::channel::<JoinHandle<Result<Ack, Status>>>(PIPELINE_DEPTH);
        let service = self.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tracing::info!("agent {agent} connected");
            METRICS.agent_streams(1);
            let agent: Arc<str> = Arc::from(agent);
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    () = async { drop(stopping.wait_for(|stopping| *stopping).await) } => {
                        // Frames already taken are stored and acknowledged first (the
                        // acks go out in order), then the stream ends.
                        let _ = handlers.send(tokio::spawn(async { Err(shutting_down()) })).await;
                        break;
                    }
                };
                let frame = match message {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(status) => {
                        METRICS.ingest_error(IngestError::Stream);
                        tracing::info!("agent {agent} stream ended: {}", status.message());
                        // An undecodable or oversized message: say why (the agent may
                        // already be gone, then nobody listens).
                        let status = if status.code() == tonic::Code::OutOfRange {
                            Status::resource_exhausted(format!(
                                "ingest frame refused as too large ({}); raise --max-message-bytes or send smaller batches",
                                status.message()
                            ))
                        } else {
                            status
                        };
                        let _ = handlers.send(tokio::spawn(async { Err(status) })).await;
                        break;
                    }
                };
                let service = service.clone();
                let agent = Arc::clone(&agent);
                let handler = tokio::spawn(async move { service.handle(&agent, frame).await });
                // Fails once the acks stopped (an error, or the agent went away).
                if handlers.send(handler).await.is_err() {
                    break;
                }
            }
            METRICS.agent_streams(-1);
            tracing::info!("agent {agent} disconnected");
        });
        tokio::spawn(async move {
            while let Some(handler) = in_order.recv().await {
                let reply = handler.await.unwrap_or_else(|err| {
                    Err(Status::internal(format!("ingest task failed: {err}")))
                });
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    // Dropping `in_order` stops the reader; batches still in flight finish
                    // storing and are acknowledged as duplicates when the agent resends.
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
