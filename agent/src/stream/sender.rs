//! Sending the spool to the collector: one gRPC bidirectional stream at a time, batches
//! sent oldest first with a bounded window in flight, each deleted from the spool only
//! when the collector acknowledges it (after storing it). On any failure the stream is
//! reopened after an exponential backoff with jitter, and everything unacknowledged is
//! sent again, in order; the collector's dedup makes that safe.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use stallscope_proto::v1::{IngestFrame, ingest_client::IngestClient};
use thiserror::Error;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::stream::{backoff::Backoff, spool::Spool};

/// Header naming the agent on plaintext connections (under mTLS the certificate does).
pub const AGENT_HEADER: &str = "x-stallscope-agent";

/// Largest frame the agent sends (the collector's default limit is 16 MiB).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Deadline of a connection (TCP, TLS and HTTP/2 handshakes).
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of the collector's answer to a new stream: it answers at once, before any
/// batch is stored, so a peer that accepts the connection and stays silent is no
/// collector (or a hung one).
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for the next acknowledgement while batches are in flight.
const ACK_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum StreamError {
    #[error(
        "invalid collector address `{0}`: use http://HOST:PORT (plaintext) or https://HOST:PORT (mTLS)"
    )]
    Address(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("starting the sender thread: {0}")]
    Thread(std::io::Error),
}

/// Client certificate, key and the CA that signed the collector's certificate (PEM).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Name to verify the collector's certificate against (default: the URL's host).
    pub server_name: Option<String>,
}

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub collector: String,
    pub agent_id: String,
    pub tls: Option<ClientTls>,
    /// Batches sent and not yet acknowledged, at most.
    pub window: usize,
    pub max_backoff: Duration,
}

struct Shared {
    spool: Arc<Mutex<Spool>>,
    /// A batch was spooled.
    wake: Notify,
    /// Stop was requested (wakes a backoff sleep, which ignores new batches).
    stop: Notify,
    stopping: AtomicBool,
    deadline: Mutex<Option<Instant>>,
    settings: StreamSettings,
    /// A thread panicked while it held the spool's lock.
    poisoned: AtomicBool,
    /// What last kept batches from being acknowledged (for the closing report).
    problem: Mutex<Option<String>>,
}

impl Shared {
    fn stop_now(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
            && self
                .deadline
                .lock()
                .map_or_else(|poisoned| *poisoned.into_inner(), |d| *d)
                .is_none_or(|deadline| Instant::now() >= deadline)
    }

    /// Time left before the flush deadline, if stopping.
    fn time_left(&self) -> Option<Duration> {
        let deadline = self
            .deadline
            .lock()
            .map_or_else(|poisoned| *poisoned.into_inner(), |d| *d)?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }

    /// Whether everything spooled was acknowledged (never, once the spool is poisoned).
    fn spool_empty(&self) -> bool {
        self.spool().is_some_and(|s| s.is_empty())
    }

    /// The spool, unless a thread panicked while holding its lock: its in-memory state
    /// may then be half-updated, so the sender stops (said once, in the log) and leaves
    /// the batches on disk, where the next start finds and sends them.
    fn spool(&self) -> Option<MutexGuard<'_, Spool>> {
        if let Ok(spool) = self.spool.lock() {
            Some(spool)
        } else {
            if !self.poisoned.swap(true, Ordering::SeqCst) {
                tracing::error!(
                    "a thread panicked while it held the spool: the sender stops; unacknowledged batches stay on disk and are sent at the next start"
                );
            }
            None
        }
    }

    fn set_problem(&self, problem: String) {
        if let Ok(mut slot) = self.problem.lock() {
            *slot = Some(problem);
        }
    }

    /// Resolves once stopping and past the flush deadline.
    async fn past_deadline(&self) {
        while !self.stop_now() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Why a bounded step did not complete.
enum Cut {
    /// Its own deadline passed.
    Deadline(Duration),
    /// Stopping, and the flush deadline passed.
    Stopped,
}

/// Runs `step` until it completes, `limit` passes, or (when stopping) the flush deadline
/// passes: no network step of the sender can hold the agent's exit.
async fn bounded<T>(
    shared: &Shared,
    limit: Duration,
    step: impl Future<Output = T>,
) -> Result<T, Cut> {
    tokio::select! {
        out = step => Ok(out),
        () = tokio::time::sleep(limit) => Err(Cut::Deadline(limit)),
        () = shared.past_deadline() => Err(Cut::Stopped),
    }
}

/// How a flush at the end of a run went.
#[derive(Debug, Clone)]
pub struct FlushOutcome {
    /// Every batch was acknowledged.
    pub emptied: bool,
    /// Batches left in the spool for the next start.
    pub left: usize,
    /// What kept them from being acknowledged, as far as the sender knows.
    pub problem: Option<String>,
}

/// The sender thread.
pub struct Sender {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sender {
    pub fn start(spool: Arc<Mutex<Spool>>, settings: StreamSettings) -> Result<Self, StreamError> {
        let endpoint = endpoint(&settings)?;
        let shared = Arc::new(Shared {
            spool,
            wake: Notify::new(),
            stop: Notify::new(),
            stopping: AtomicBool::new(false),
            deadline: Mutex::new(None),
            settings,
            poisoned: AtomicBool::new(false),
            problem: Mutex::new(None),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StreamError::Thread)?;
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sender".into())
            .spawn(move || runtime.block_on(send_loop(thread_shared, endpoint)))
            .map_err(StreamError::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// A batch was spooled.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Sends what is left, for at most `timeout`, then stops (every network step of the
    /// sender is bounded by the deadline, so this returns shortly after it).
    pub fn flush_and_stop(mut self, timeout: Duration) -> FlushOutcome {
        // The deadline is a plain value, whole even if a thread panicked holding it.
        *self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + timeout);
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        self.shared.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // A poisoned spool is never reported flushed; what it holds is only counted.
        let poisoned =
            self.shared.poisoned.load(Ordering::SeqCst) || self.shared.spool.is_poisoned();
        let left = self
            .shared
            .spool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending()
            .len();
        let problem = if poisoned {
            Some("a thread panicked while it held the spool".to_owned())
        } else {
            self.shared.problem.lock().ok().and_then(|p| p.clone())
        };
        FlushOutcome {
            emptied: left == 0 && !poisoned,
            left,
            problem,
        }
    }
}

fn endpoint(settings: &StreamSettings) -> Result<Endpoint, StreamError> {
    let address = || StreamError::Address(settings.collector.clone());
    let https = settings.collector.starts_with("https://");
    if !https && !settings.collector.starts_with("http://") {
        return Err(address());
    }
    let mut endpoint = Channel::from_shared(settings.collector.clone())
        .map_err(|_| address())?
        .connect_timeout(CONNECT_DEADLINE)
        .timeout(Duration::from_secs(120))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(60)));
    match (&settings.tls, https) {
        (Some(tls), true) => {
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|err| StreamError::Tls(err.to_string()))?;
        }
        (None, false) => {}
        (Some(_), false) => {
            return Err(StreamError::Tls(
                "client certificates are set but the collector address is http://; use https://"
                    .to_owned(),
            ));
        }
        (None, true) => {
            return Err(StreamError::Tls(
                "https:// needs --tls-cert, --tls-key and --tls-ca (the collector authenticates agents by certificate)".to_owned(),
            ));
        }
    }
    Ok(endpoint)
}

/// Why a session ended.
enum SessionEnd {
    /// Stop was requested and everything was sent, or the deadline passed.
    Done,
    /// The collector refused the oldest batch in flight as malformed or too large.
    Refused {
        sequence: u64,
        message: String,
    },
    Failed(String),
}

async fn send_loop(shared: Arc<Shared>, endpoint: Endpoint) {
    let mut backoff = Backoff::new(shared.settings.max_backoff);
    let mut failures = 0_u32;
    loop {
        // A poisoned spool ends the sender (`spool()` says so in the log).
        if shared.spool().is_none()
            || shared.stop_now()
            || (shared.stopping.load(Ordering::SeqCst) && shared.spool_empty())
        {
            return;
        }
        match session(&shared, &endpoint, &mut backoff).await {
            SessionEnd::Done => return,
            SessionEnd::Refused { sequence, message } => {
                tracing::error!("collector refused batch {sequence}: {message}; dropping it");
                if let Some(mut spool) = shared.spool()
                    && let Err(err) = spool.discard(sequence)
                {
                    tracing::error!("{err}");
                }
            }
            SessionEnd::Failed(reason) => {
                shared.set_problem(reason.clone());
                failures += 1;
                let wait = backoff.next();
                // The first failure and then every tenth, so an outage is visible but
                // does not flood the log.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(
                        "collector {}: {reason}; retrying in {wait:?}",
                        shared.settings.collector
                    );
                }
                if !shared.stopping.load(Ordering::SeqCst) {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shared.stop.notified() => {}
                    }
                } else if let Some(left) = shared.time_left() {
                    tokio::time::sleep(wait.min(left)).await;
                }
                continue;
            }
        }
        failures = 0;
    }
}

async fn session(shared: &Shared, endpoint: &Endpoint, backoff: &mut Backoff) -> SessionEnd {
    let channel = match bounded(shared, CONNECT_DEADLINE, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(err)) => {
            return SessionEnd::Failed(format!("cannot connect: {}", error_chain(&err)));
        }
        Err(Cut::Deadline(limit)) => {
            return SessionEnd::Failed(format!("no connection within {limit:?}"));
        }
        Err(Cut::Stopped) => {
            shared.set_problem("the flush deadline passed while connecting".to_owned());
            return SessionEnd::Done;
        }
    };
    let mut client = IngestClient::new(channel)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
        .max_decoding_message_size(1024 * 1024);
    let window = shared.settings.window.max(1);
    let (tx, rx) = mpsc::channel::<IngestFrame>(window);
    let mut request = Request::new(ReceiverStream::new(rx));
    if shared.settings.tls.is_none() {
        match MetadataValue::try_from(shared.settings.agent_id.as_str()) {
            Ok(value) => {
                request.metadata_mut().insert(AGENT_HEADER, value);
            }
            Err(_) => {
                return SessionEnd::Failed("the agent id is not a valid header value".to_owned());
            }
        }
    }
    // Sending starts before the response headers arrive: the first frames go out as
    // soon as the stream is open.
    if let Some(mut spool) = shared.spool() {
        spool.reset_in_flight();
    }
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut last_sent: Option<u64> = None;
    fill_window(shared, &tx, window, &mut in_flight, &mut last_sent);
    let mut acks = match bounded(shared, ANSWER_DEADLINE, client.stream(request)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return SessionEnd::Failed(format!("{:?}: {}", status.code(), status.message()));
        }
        Err(Cut::Deadline(limit)) => {
            return SessionEnd::Failed(format!(
                "it accepted the connection but did not answer within {limit:?} (is it a stallscope collector?)"
            ));
        }
        Err(Cut::Stopped) => {
            shared.set_problem(
                "the flush deadline passed while waiting for the collector to answer (it accepted the connection but did not answer)"
                    .to_owned(),
            );
            return SessionEnd::Done;
        }
    };
    tracing::info!("streaming to {}", shared.settings.collector);
    let mut last_ack = Instant::now();
    loop {
        let before = in_flight.len();
        fill_window(shared, &tx, window, &mut in_flight, &mut last_sent);
        if before == 0 && !in_flight.is_empty() {
            // The acknowledgement deadline counts from the first batch in flight.
            last_ack = Instant::now();
        }
        if shared.stopping.load(Ordering::SeqCst) && in_flight.is_empty() && shared.spool_empty() {
            return SessionEnd::Done;
        }
        if shared.stop_now() || shared.poisoned.load(Ordering::SeqCst) {
            if shared.stop_now()
                && let Some(first) = in_flight.front()
            {
                shared.set_problem(format!(
                    "the flush deadline passed with {} batches sent and not acknowledged (oldest {first})",
                    in_flight.len()
                ));
            }
            return SessionEnd::Done;
        }
        if let Some(&oldest) = in_flight.front()
            && last_ack.elapsed() >= ACK_DEADLINE
        {
            return SessionEnd::Failed(format!(
                "batch {oldest} was not acknowledged within {ACK_DEADLINE:?}"
            ));
        }
        tokio::select! {
            message = acks.message() => match message {
                Ok(Some(ack)) => {
                    last_ack = Instant::now();
                    backoff.reset();
                    in_flight.retain(|&s| s != ack.sequence);
                    if let Some(mut spool) = shared.spool()
                        && let Err(err) = spool.acknowledge(ack.sequence)
                    {
                        tracing::error!("{err}");
                    }
                }
                Ok(None) => return SessionEnd::Failed("the collector closed the stream".to_owned()),
                Err(status) => {
                    let refused = matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted);
                    return match in_flight.front() {
                        Some(&sequence) if refused => SessionEnd::Refused { sequence, message: status.message().to_owned() },
                        _ => SessionEnd::Failed(format!("{:?}: {}", status.code(), status.message())),
                    };
                }
            },
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Sends spooled batches after `last_sent`, oldest first, until `window` are in flight.
fn fill_window(
    shared: &Shared,
    tx: &mpsc::Sender<IngestFrame>,
    window: usize,
    in_flight: &mut VecDeque<u64>,
    last_sent: &mut Option<u64>,
) {
    let Some(mut spool) = shared.spool() else {
        return;
    };
    while in_flight.len() < window {
        let Some(sequence) = spool
            .pending()
            .into_iter()
            .find(|&s| last_sent.is_none_or(|last| s > last))
        else {
            return;
        };
        // The channel holds `window` frames and fewer than that are in flight, so it has
        // room unless the stream is gone (then the session ends and all is resent).
        if tx.capacity() == 0 {
            return;
        }
        *last_sent = Some(sequence);
        if let Some(frame) = spool.take_for_sending(sequence) {
            if tx.try_send(frame).is_err() {
                return;
            }
            in_flight.push_back(sequence);
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::spool::SpoolLimits;

    #[test]
    fn a_poisoned_spool_stops_the_sender_and_is_not_reported_flushed() {
        let dir = std::env::temp_dir().join(format!("stallscope-poisoned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Arc::new(Mutex::new(
            Spool::open(&dir, SpoolLimits::default()).expect("spool opens"),
        ));
        let holder = Arc::clone(&spool);
        let _ = std::thread::spawn(move || {
            let _guard = holder.lock();
            panic!("a thread panics while it holds the spool (expected by this test)");
        })
        .join();
        assert!(spool.is_poisoned());
        let sender = Sender::start(
            Arc::clone(&spool),
            StreamSettings {
                // Nothing listens on port 1: without the poison check the sender would
                // retry until the flush deadline.
                collector: "http://127.0.0.1:1".to_owned(),
                agent_id: "poisoned".to_owned(),
                tls: None,
                window: 4,
                max_backoff: Duration::from_secs(1),
            },
        )
        .expect("sender starts");
        // The sender notices by itself, without being told to stop.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sender
            .thread
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished)
        {
            assert!(
                Instant::now() < deadline,
                "the sender kept going on a poisoned spool"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(sender.shared.poisoned.load(Ordering::SeqCst));
        let flush = sender.flush_and_stop(Duration::from_secs(1));
        assert!(!flush.emptied, "a poisoned spool was reported as flushed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
