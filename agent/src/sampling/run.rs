//! `stallscope-agent run`: the daemon. The sampling loop closes a batch every batch
//! interval (the accumulator's profile since the previous batch), which this sink spools
//! durably and the sender streams to the collector; on SIGTERM the loop closes the last
//! batch and the sender flushes for at most the flush timeout, leaving anything unsent in
//! the spool for the next start.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;

use super::sampler::{Sink, sample};
use crate::{
    aggregate::period::PeriodProfile,
    config::RunConfig,
    metrics,
    probes::{self, ProbeError},
    stream::{
        batch::encode_period,
        sender::{ClientTls, Sender, StreamSettings},
        spool::{Appended, Spool},
    },
};

/// What a run did, for its closing line.
pub struct RunSummary {
    pub batches: u64,
    pub first_sequence: u64,
    pub last_sequence: Option<u64>,
    pub dropped_total: u64,
    pub flushed: bool,
    /// Per sample type (`kind/unit`), the sum over every batch of this run.
    pub totals: BTreeMap<String, i64>,
}

fn read_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

pub fn run(config: &RunConfig) -> anyhow::Result<RunSummary> {
    let tls = match &config.tls {
        Some(files) => Some(ClientTls {
            cert_pem: read_file(&files.cert, "client certificate")?,
            key_pem: read_file(&files.key, "client key")?,
            ca_pem: read_file(&files.ca, "collector CA")?,
            server_name: files.server_name.clone(),
        }),
        None => None,
    };
    let spool = Spool::open(&config.spool_dir, config.spool_limits)?;
    // The state directory also holds the (unnamed) plain copies of compressed debug files.
    crate::symbols::plain_dwarf::use_dir(&config.spool_dir);
    let first_sequence = spool.next_sequence();
    let leftover = spool.pending().len();
    let spool = Arc::new(Mutex::new(spool));
    if !probes::privileged() {
        return Err(ProbeError::NotPrivileged.into());
    }
    if let Some(addr) = config.metrics_listen {
        let bound = metrics::server::start(addr)
            .with_context(|| format!("metrics listener on {addr} (--metrics-listen)"))?;
        // Tests wait for this line to learn the port (`:0` picks one).
        tracing::info!("metrics at http://{bound}/metrics (health: /healthz, /readyz)");
    }
    let sender = Sender::start(
        Arc::clone(&spool),
        StreamSettings {
            collector: config.collector.clone(),
            agent_id: config.agent_id.clone(),
            tls,
            window: 32,
            max_backoff: config.max_backoff,
        },
    )?;
    if leftover > 0 {
        tracing::info!(
            "spool holds {leftover} unacknowledged batches from an earlier run; sending them first"
        );
        sender.wake();
    }
    let mut sink = StreamSink {
        spool,
        sender,
        config,
        summary: RunSummary {
            batches: 0,
            first_sequence,
            last_sequence: None,
            dropped_total: 0,
            flushed: false,
            totals: BTreeMap::new(),
        },
    };
    let mut sampling = config.sampling.clone();
    // After the spool is open: the directory is named after the spool's real path.
    sampling.pin_dir = config
        .pin_root
        .as_deref()
        .map(|root| probes::pins::agent_dir(root, &config.spool_dir));
    sample(&sampling, config.duration, &mut sink)?;
    let StreamSink {
        spool,
        sender,
        mut summary,
        ..
    } = sink;
    let flush = sender.flush_and_stop(config.flush_timeout);
    summary.flushed = flush.emptied;
    if !flush.emptied {
        tracing::warn!(
            "stopped after the {:?} flush timeout with {} batches left in the spool for the next start: collector {}: {}",
            config.flush_timeout,
            flush.left,
            config.collector,
            flush
                .problem
                .as_deref()
                .unwrap_or("no answer before the deadline")
        );
    }
    summary.dropped_total = spool
        .lock()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked while it held the spool"))?
        .dropped_total();
    Ok(summary)
}

/// `run`'s sink: every batch interval a batch, spooled, then streamed by the sender.
struct StreamSink<'a> {
    spool: Arc<Mutex<Spool>>,
    sender: Sender,
    config: &'a RunConfig,
    summary: RunSummary,
}

impl Sink for StreamSink<'_> {
    fn interval(&self) -> Option<Duration> {
        Some(self.config.batch_interval)
    }

    fn describe(&self) -> String {
        format!(
            "streaming to {} as {}",
            self.config.collector, self.config.agent_id
        )
    }

    fn keeps_histograms(&self) -> bool {
        false
    }

    fn accept(&mut self, profile: PeriodProfile, last: bool) -> anyhow::Result<()> {
        let (frames, samples) = (profile.frames().len(), profile.samples().len());
        let batch = encode_period(profile, &self.config.agent_id);
        tracing::debug!(
            "period of {samples} samples over {frames} frames encoded in {} bytes",
            batch.bytes.len()
        );
        for (kind, total) in &batch.totals {
            *self.summary.totals.entry(kind.clone()).or_default() += total;
        }
        let appended = self
            .spool
            .lock()
            .map_err(|_| anyhow::anyhow!("the sender thread panicked while it held the spool"))?
            .append(batch.bytes, batch.start_unix_ns)?;
        self.summary.batches += 1;
        if let Appended::Stored(sequence) = appended {
            self.summary.last_sequence = Some(sequence);
            self.sender.wake();
            tracing::debug!(
                "batch {sequence} spooled{}",
                if last { " (last)" } else { "" }
            );
        }
        Ok(())
    }

    fn journal_dir(&self) -> Option<&Path> {
        Some(&self.config.spool_dir)
    }

    fn holds_period(&mut self, start_unix_ns: i64) -> bool {
        self.spool
            .lock()
            .is_ok_and(|spool| spool.holds_period(start_unix_ns))
    }
}

/// The closing line of a run: batches, drops, and the totals the collector must match.
pub fn summary_line(summary: &RunSummary) -> String {
    let range = summary.last_sequence.map_or_else(
        || "none".to_owned(),
        |last| format!("{}..={last}", summary.first_sequence),
    );
    let totals: Vec<String> = summary
        .totals
        .iter()
        .map(|(kind, total)| format!("{kind}={total}"))
        .collect();
    format!(
        "run: {} batches (sequences {range}), spool dropped {} in total, {}; totals {}",
        summary.batches,
        summary.dropped_total,
        if summary.flushed {
            "all acknowledged"
        } else {
            "some left in the spool for the next start"
        },
        totals.join(" ")
    )
}
