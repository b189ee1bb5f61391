//! `stallscope-agent run`: the daemon. Samples continuously, closes a batch every
//! `--batch-interval` (the accumulator's profile since the previous batch), spools it
//! durably and streams it to the collector; on SIGTERM it closes the last batch and
//! flushes for at most `--flush-timeout`, leaving anything unsent in the spool for the
//! next start.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use stallscope_profile::Meta;

use crate::{
    aggregate::accumulate::Accumulator,
    config::{cli::CommonArgs, parse_duration_of},
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
        spool::{Appended, Spool, SpoolLimits},
    },
    system,
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Collector address: https://HOST:PORT (mTLS) or http://HOST:PORT (plaintext, when the
    /// collector allows it).
    #[arg(
        long,
        env = "STALLSCOPE_COLLECTOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub collector: String,
    /// Agent identity on plaintext connections (under mTLS the certificate's name is used).
    /// Default: the host name.
    #[arg(long)]
    pub agent_id: Option<String>,
    /// Client certificate (PEM) for mTLS.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signed the collector's certificate.
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// Name in the collector's certificate, if not the address's host.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Length of one batch.
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        default_value = "10s"
    )]
    pub batch_interval: String,
    /// Directory of the on-disk spool of unacknowledged batches.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/stallscope-agent/spool"
    )]
    pub spool_dir: PathBuf,
    /// Most batches kept in the spool; the oldest are dropped (and counted) beyond it.
    #[arg(long, value_name = "N", default_value_t = 8640)]
    pub spool_max_batches: usize,
    /// Most bytes kept in the spool.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024 * 1024)]
    pub spool_max_bytes: u64,
    /// How long to keep sending after SIGTERM/SIGINT before exiting.
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        default_value = "5s"
    )]
    pub flush_timeout: String,
    /// Longest wait between reconnection attempts.
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        default_value = "30s"
    )]
    pub max_backoff: String,
    /// Stop after this long (default: run until SIGTERM/SIGINT).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub duration: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

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

fn read_file(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

pub fn run(args: &RunArgs) -> anyhow::Result<RunSummary> {
    let config = args.common.config()?;
    let batch_interval = parse_duration_of("--batch-interval", &args.batch_interval)?;
    anyhow::ensure!(
        batch_interval >= config.drain_interval && batch_interval <= Duration::from_secs(3600),
        "--batch-interval must be between the drain interval ({:?}) and 1h",
        config.drain_interval
    );
    let flush_timeout = parse_duration_of("--flush-timeout", &args.flush_timeout)?;
    let max_backoff =
        parse_duration_of("--max-backoff", &args.max_backoff)?.max(Duration::from_millis(250));
    let duration = args
        .duration
        .as_deref()
        .map(|text| parse_duration_of("--duration", text))
        .transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(ClientTls {
            cert_pem: read_file(cert, "client certificate")?,
            key_pem: read_file(key, "client key")?,
            ca_pem: read_file(ca, "collector CA")?,
            server_name: args.tls_server_name.clone(),
        }),
        _ => None,
    };
    let agent_id = args.agent_id.clone().unwrap_or_else(system::hostname);
    let spool = Spool::open(
        &args.spool_dir,
        SpoolLimits {
            max_batches: args.spool_max_batches,
            max_bytes: args.spool_max_bytes,
        },
    )?;
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
            collector: args.collector.clone(),
            agent_id: agent_id.clone(),
            tls,
            window: 32,
            max_backoff,
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
        args.collector
    );
    for (signal, hook) in &probes.hooks {
        tracing::info!("{}: {hook}", naming::signal_label(*signal));
    }
    let notes = notes(&config, &probes.hooks);
    let mut accumulator = Accumulator::new(&signals_of(&config), config.resolver_settings());
    // As in `record`: processes are read as they start, so stacks of short-lived ones
    // still symbolize.
    let _watcher = events::watch(accumulator.resolver.shared(), config.target_pid);
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
        let appended = spool
            .lock()
            .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?
            .append(batch)?;
        summary.batches += 1;
        if let Appended::Stored(sequence) = appended {
            summary.last_sequence = Some(sequence);
            sender.wake();
            tracing::debug!(
                "batch {sequence} spooled{}",
                if last { " (last)" } else { "" }
            );
        }
        batch_start_ns = now_ns;
        batch_started = Instant::now();
        Ok(())
    };
    loop {
        if shutdown::requested() || duration.is_some_and(|d| started.elapsed() >= d) {
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
    let flush = sender.flush_and_stop(flush_timeout);
    summary.flushed = flush.emptied;
    if !flush.emptied {
        tracing::warn!(
            "stopped after the {flush_timeout:?} flush timeout with {} batches left in the spool for the next start: collector {}: {}",
            flush.left,
            args.collector,
            flush
                .problem
                .as_deref()
                .unwrap_or("no answer before the deadline")
        );
    }
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
