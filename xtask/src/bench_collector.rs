//! `cargo xtask bench ingest|query`: the collector's absolute figures, on the release
//! build over loopback gRPC: ingest throughput (samples stored and acknowledged per
//! second, several agents streaming at once) and the latency of a 24 h merged profile of
//! one service, for SQLite and, when ClickHouse is available, for ClickHouse.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use prost::Message as _;
use stallscope_collector::synthetic::{self, Shape};
use stallscope_proto::v1::{
    self, IngestFrame, ingest_client::IngestClient, query_client::QueryClient,
};
use stallscope_tests::collector::{CollectorProcess, free_port};
use tonic::{Request, metadata::MetadataValue};

use crate::{clickhouse, util};

/// The data set: `AGENTS` hosts, one batch per 10 s for 24 h each (`BENCH_HOURS`
/// shortens it for quick runs; the query then still asks for 24 h).
pub(crate) const AGENTS: u64 = 4;
pub(crate) const BATCH_SECONDS: i64 = 10;

pub(crate) fn batches_per_agent() -> u64 {
    let hours: u64 = std::env::var("BENCH_HOURS")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(24);
    hours.clamp(1, 24) * 3600 / BATCH_SECONDS as u64
}
pub(crate) const SHAPE: Shape = Shape {
    services: 5,
    threads_per_service: 2,
    stacks_per_thread: 10,
    frames_per_stack: 16,
};
pub(crate) const TOKEN: &str = "bench-token";
const QUERY_RUNS: usize = 7;

/// Encoded ingest frames of one agent: a template batch re-sequenced and re-timed.
fn frames(agent: u64, start_s: i64) -> Vec<IngestFrame> {
    let host = format!("bench-host-{agent}");
    let mut batch = synthetic::batch(&host, &host, 0, 0, BATCH_SECONDS * 1_000_000_000, SHAPE);
    (0..batches_per_agent())
        .map(|sequence| {
            batch.sequence = sequence;
            batch.start_unix_ns = (start_s + sequence as i64 * BATCH_SECONDS) * 1_000_000_000;
            let encoded = batch.encode_to_vec();
            IngestFrame {
                sequence,
                uncompressed_size: encoded.len() as u64,
                batch_zstd: zstd::bulk::compress(&encoded, 3).unwrap_or_default(),
            }
        })
        .collect()
}

pub(crate) async fn stream_agent(
    port: u16,
    agent: u64,
    frames: Vec<IngestFrame>,
) -> anyhow::Result<u64> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut client = IngestClient::new(channel).max_encoding_message_size(64 * 1024 * 1024);
    let expected = frames.len();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "x-stallscope-agent",
        MetadataValue::try_from(format!("bench-host-{agent}"))?,
    );
    let sender = tokio::spawn(async move {
        for frame in frames {
            if tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    let mut acks = client.stream(request).await?.into_inner();
    let mut acknowledged = 0_u64;
    while acknowledged < expected as u64 {
        match acks.message().await? {
            Some(_) => acknowledged += 1,
            None => {
                bail!("agent {agent}: the collector closed the stream after {acknowledged} acks")
            }
        }
    }
    sender.abort();
    Ok(acknowledged)
}

struct Figures {
    samples: u64,
    ingest: Duration,
    query_median: Duration,
    query_samples: u64,
    /// `why` on a one-hour window of one service, with its automatic baseline.
    explain_median: Duration,
    explain_verdict: String,
}

fn bench_backend(release: &Path, storage_args: &[&str]) -> anyhow::Result<Figures> {
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let start_s = now_s - 24 * 3600;
    eprintln!(
        "  preparing {AGENTS} agents x {} batches of {} samples",
        batches_per_agent(),
        SHAPE.samples_per_signal() * 2
    );
    let all: Vec<Vec<IngestFrame>> = (0..AGENTS).map(|agent| frames(agent, start_s)).collect();
    let mut args = vec!["--plaintext", "--query-tokens", TOKEN];
    args.extend_from_slice(storage_args);
    let collector = CollectorProcess::start(release, free_port()?, &args, &[])?;
    let port = collector.port;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let samples = AGENTS * batches_per_agent() * SHAPE.samples_per_signal() * 2;
    eprintln!("  ingesting {samples} samples");
    let started = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = all
            .into_iter()
            .enumerate()
            .map(|(agent, frames)| tokio::spawn(stream_agent(port, agent as u64, frames)))
            .collect();
        for task in tasks {
            task.await.context("agent task")??;
        }
        anyhow::Ok(())
    })?;
    let ingest = started.elapsed();

    let mut latencies = Vec::new();
    let mut query_samples = 0;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect()
            .await?;
        let mut client = QueryClient::new(channel).max_decoding_message_size(512 * 1024 * 1024);
        for _ in 0..QUERY_RUNS {
            let mut request = Request::new(v1::ProfileRequest {
                range: Some(v1::TimeRange {
                    from_unix_ns: (now_s - 24 * 3600) * 1_000_000_000,
                    until_unix_ns: (now_s + 60) * 1_000_000_000,
                }),
                filter: Some(v1::Filter {
                    service: "svc-0".to_owned(),
                    ..v1::Filter::default()
                }),
            });
            request.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {TOKEN}"))?,
            );
            let started = Instant::now();
            let response = client.profile(request).await?.into_inner();
            latencies.push(started.elapsed());
            query_samples = response.samples;
            let profile = stallscope_profile::decode_pprof(&response.pprof)?;
            anyhow::ensure!(profile.total(0) > 0, "the 24 h profile is empty");
        }
        anyhow::Ok(())
    })?;
    // `why` on the hour before the last one: the window and its baseline (the 12 hours
    // before it) are read bucket by bucket, and profiles for the evidence if anything
    // ranks.
    let mut explain_latencies = Vec::new();
    let mut explain_verdict = String::new();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect()
            .await?;
        let mut client = QueryClient::new(channel).max_decoding_message_size(512 * 1024 * 1024);
        for _ in 0..QUERY_RUNS {
            let mut request = Request::new(v1::ExplainRequest {
                range: Some(v1::TimeRange {
                    from_unix_ns: (now_s - 2 * 3600) * 1_000_000_000,
                    until_unix_ns: (now_s - 3600) * 1_000_000_000,
                }),
                filter: Some(v1::Filter {
                    service: "svc-0".to_owned(),
                    ..v1::Filter::default()
                }),
                ..v1::ExplainRequest::default()
            });
            request.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {TOKEN}"))?,
            );
            let started = Instant::now();
            let response = client.explain(request).await?.into_inner();
            explain_latencies.push(started.elapsed());
            explain_verdict = response.verdict;
        }
        anyhow::Ok(())
    })?;
    drop(collector);
    latencies.sort();
    explain_latencies.sort();
    Ok(Figures {
        samples,
        ingest,
        query_median: latencies[latencies.len() / 2],
        query_samples,
        explain_median: explain_latencies[explain_latencies.len() / 2],
        explain_verdict,
    })
}

fn report(backend: &str, figures: &Figures) {
    println!(
        "{backend}: ingest {:.0} samples/s ({} samples from {AGENTS} agents in {:.1}s, target >= 200000 for SQLite); \
         24 h flame graph of one service: median {:.0} ms over {QUERY_RUNS} runs ({} distinct stacks x labels, target <= 500 ms)",
        figures.samples as f64 / figures.ingest.as_secs_f64(),
        figures.samples,
        figures.ingest.as_secs_f64(),
        figures.query_median.as_secs_f64() * 1000.0,
        figures.query_samples
    );
    println!(
        "{backend}: why on a 1 h window of one service with its automatic baseline: median {:.0} ms over {QUERY_RUNS} runs (verdict {}; target < 2000 ms for SQLite)",
        figures.explain_median.as_secs_f64() * 1000.0,
        figures.explain_verdict
    );
}

/// Set in the release xtask that a debug xtask hands the collector benchmark to.
const RELEASE_LOAD: &str = "STALLSCOPE_BENCH_RELEASE_LOAD";

/// Builds the release binaries; from a debug xtask, runs `xtask bench ARGS` of the
/// release build instead and returns `None` (the load generator, four gRPC clients,
/// shares the two cores with the collector: as a debug build it takes CPU the collector
/// would have had). Otherwise returns the release directory.
pub(crate) fn in_release(args: &[&str]) -> anyhow::Result<Option<std::path::PathBuf>> {
    util::cargo(&["build", "--release", "--bins"])?;
    let release = util::root().join("target/release");
    if cfg!(debug_assertions) && std::env::var_os(RELEASE_LOAD).is_none() {
        let status = std::process::Command::new(release.join("xtask"))
            .arg("bench")
            .args(args)
            .env(RELEASE_LOAD, "1")
            .status()
            .context("running the release xtask")?;
        if !status.success() {
            bail!("the collector benchmark failed ({status})");
        }
        return Ok(None);
    }
    Ok(Some(release))
}

pub fn run(backends: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["ingest"];
    args.extend_from_slice(backends);
    let Some(release) = in_release(&args)? else {
        return Ok(());
    };
    if backends.is_empty() || backends.contains(&"sqlite") {
        let dir =
            std::env::temp_dir().join(format!("stallscope-bench-sqlite-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("bench collector, SQLite in {}", dir.display());
        let data = dir.to_string_lossy().into_owned();
        let figures = bench_backend(&release, &["--data-dir", &data])?;
        report("SQLite", &figures);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if backends.is_empty() || backends.contains(&"clickhouse") {
        if util::is_root() || clickhouse::answering() {
            let _server = clickhouse::ensure_running()?;
            let database = format!("stallscope_bench_{}", std::process::id());
            eprintln!("bench collector, ClickHouse database {database}");
            let url = clickhouse::url();
            let figures = bench_backend(
                &release,
                &[
                    "--storage",
                    "clickhouse",
                    "--clickhouse-url",
                    &url,
                    "--clickhouse-database",
                    &database,
                ],
            );
            if std::env::var_os("BENCH_KEEP_DATA").is_some() {
                eprintln!("bench: kept ClickHouse database {database} (BENCH_KEEP_DATA)");
            } else {
                let _ = std::process::Command::new("curl")
                    .args([
                        "-s",
                        &url,
                        "--data-binary",
                        &format!("DROP DATABASE IF EXISTS {database}"),
                    ])
                    .output();
            }
            report("ClickHouse", &figures?);
        } else {
            eprintln!(
                "bench: skipping ClickHouse (not root, so it cannot be installed; `cargo xtask clickhouse start` as root first)"
            );
        }
    }
    Ok(())
}
