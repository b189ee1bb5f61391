//! `stallscope-agent run`: the daemon. Samples continuously, closes a batch every
//! `--batch-interval` (the accumulator's profile since the previous batch), spools it
//! durably and streams it to the collector; on SIGTERM it closes the last batch and
//! flushes for at most `--flush-timeout`, leaving anything unsent in the spool for the
//! next start.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use stallscope_profile::Meta;

use crate::{
    aggregate::accumulate::Accumulator,
    config::RunConfig,
    naming,
    probes::{ProbeError, Probes},
    process::events,
    sampling::{
        record::{notes, signals_of},
        shutdown,
    },
    stream::{
        batch::{batch_from_profile, batch_totals},
        sender::{ClientTls, Sender, StreamSettings},
        spool::Spool,
    },
    system,
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

pub fn run(run: &RunConfig) -> anyhow::Result<RunSummary> {
    let config = &run.sampling;
    let batch_interval = run.batch_interval;
    let tls = match &run.tls {
        Some(files) => Some(ClientTls {
            cert_pem: read_file(&files.cert, "client certificate")?,
            key_pem: read_file(&files.key, "client key")?,
            ca_pem: read_file(&files.ca, "collector CA")?,
            server_name: files.server_name.clone(),
        }),
        None => None,
    };
    let agent_id = run.agent_id.clone();
    let spool = Spool::open(&run.spool_dir, run.spool_limits)?;
    let first_sequence = spool.next_sequence();
    let leftover = spool.pending().len();
    let spool = Arc::new(Mutex::new(spool));
    if !crate::probes::privileged() {
        return Err(ProbeError::NotPrivileged.into());
    }
    shutdown::install();
    let sender = Sender::start(
        Arc::clone(&spool),
        StreamSettings {
            collector: run.collector.clone(),
            agent_id: agent_id.clone(),
            tls,
            window: 32,
            max_backoff: run.max_backoff,
        },
    )?;
    if leftover > 0 {
        tracing::info!(
            "spool holds {leftover} unacknowledged batches from an earlier run; sending them first"
        );
        sender.wake();
    }
    let mut probes = Probes::load(&config.probe_settings())?;
    system::release_free_memory();
    // Tests and scripts wait for this line (at info level) before starting a workload.
    tracing::info!(
        "probes attached; streaming to {} as {agent_id}",
        run.collector
    );
    for (signal, hook) in &probes.hooks {
        tracing::info!("{}: {hook}", naming::signal_label(*signal));
    }
    let notes = notes(config, &probes.hooks);
    let mut accumulator = Accumulator::new(&signals_of(config), config.resolver_settings());
    // As in `record`: processes are read as they start, so stacks of short-lived ones
    // still symbolize.
    let _watcher = events::watch(accumulator.resolver.event_feed(), config.target_pid);
    accumulator.discover_processes();
    let started = Instant::now();
    let host = system::hostname();
    let mut batch_start_ns = system::unix_now_ns();
    let mut batch_started = Instant::now();
    let mut next_drain = started + config.drain_interval;
    let mut next_batch = started + batch_interval;
    let mut summary = RunSummary {
        batches: 0,
        first_sequence,
        last_sequence: None,
        dropped_total: 0,
        flushed: false,
        totals: BTreeMap::new(),
    };
    let mut close_batch = |accumulator: &mut Accumulator, last: bool| -> anyhow::Result<()> {
        let now_ns = system::unix_now_ns();
        let meta = Meta {
            start_unix_ns: batch_start_ns,
            duration_ns: i64::try_from(batch_started.elapsed().as_nanos()).unwrap_or(i64::MAX),
            host: host.clone(),
            notes: notes.clone(),
            ..Meta::default()
        };
        let profile = accumulator.finish(meta);
        let batch = batch_from_profile(&profile, &agent_id);
        batch_totals(&batch, &mut summary.totals);
        let sequence = spool
            .lock()
            .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?
            .append(batch)?;
        summary.batches += 1;
        summary.last_sequence = Some(sequence);
        sender.wake();
        tracing::debug!(
            "batch {sequence} spooled{}",
            if last { " (last)" } else { "" }
        );
        batch_start_ns = now_ns;
        batch_started = Instant::now();
        Ok(())
    };
    loop {
        if shutdown::requested() || run.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let now = Instant::now();
        std::thread::sleep(
            next_drain
                .min(next_batch)
                .saturating_duration_since(now)
                .min(Duration::from_millis(100)),
        );
        let now = Instant::now();
        if now >= next_drain {
            accumulator.ingest(probes.drain()?);
            next_drain += config.drain_interval;
        }
        if now >= next_batch {
            close_batch(&mut accumulator, false)?;
            next_batch += batch_interval;
        }
    }
    accumulator.ingest(probes.drain()?);
    close_batch(&mut accumulator, true)?;
    drop(probes);
    summary.flushed = sender.flush_and_stop(run.flush_timeout);
    summary.dropped_total = spool.lock().map_or(0, |s| s.dropped_total());
    Ok(summary)
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
