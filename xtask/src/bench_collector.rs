//! `cargo xtask bench ingest|query`: the collector's absolute figures, on the release
//! build over loopback gRPC: ingest throughput (samples stored and acknowledged per
//! second, several agents streaming at once) and the latency of a 24 h merged profile of
//! one service, for SQLite and, when ClickHouse is available, for ClickHouse.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
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

/// What the agents send: template batches, re-sequenced, re-timed and re-hosted per
/// agent, cycled over `batches` batches each, the last ending now.
struct DataSet {
    name: &'static str,
    templates: Vec<v1::Batch>,
    batches: u64,
    /// The service whose flame graph and `why` are asked for.
    service: String,
}

impl DataSet {
    /// 40 stacks x labels per batch, the same every batch ([`SHAPE`]), a day of them.
    fn synthetic() -> Self {
        Self {
            name: "synthetic",
            templates: vec![synthetic::batch(
                "",
                "",
                0,
                0,
                BATCH_SECONDS * 1_000_000_000,
                SHAPE,
            )],
            batches: batches_per_agent(),
            service: "svc-0".to_owned(),
        }
    }

    /// The soak's whole-host recording (`cargo xtask bench soak`), five minutes of it
    /// for each agent (`BENCH_RECORDED_MINUTES`), its batches cycled; the busiest
    /// service is queried.
    fn recorded() -> anyhow::Result<Option<Self>> {
        let dir = crate::bench_soak::recording_dir();
        if !dir.is_dir() {
            return Ok(None);
        }
        let recording = crate::bench_soak::read_recording(&dir)?;
        if recording.batches.is_empty() {
            return Ok(None);
        }
        let mut by_service: std::collections::HashMap<&str, i64> =
            std::collections::HashMap::default();
        for batch in &recording.batches {
            for sample in &batch.samples {
                for pair in sample.labels.chunks(2) {
                    let key = batch.strings.get(pair[0] as usize).map(String::as_str);
                    if key == Some("service")
                        && pair.len() == 2
                        && let Some(value) = batch.strings.get(pair[1] as usize)
                    {
                        *by_service.entry(value.as_str()).or_default() += sample.value;
                    }
                }
            }
        }
        let service = by_service
            .iter()
            .max_by_key(|(_, v)| **v)
            .map(|(s, _)| (*s).to_owned())
            .unwrap_or_default();
        let minutes: u64 = std::env::var("BENCH_RECORDED_MINUTES")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(5);
        eprintln!(
            "  recording: {} batches, {} samples, {} distinct stacks, {} distinct label sets; busiest service {service}",
            recording.batches.len(),
            recording.samples,
            recording.stacks,
            recording.label_sets
        );
        Ok(Some(Self {
            name: "recorded",
            templates: recording.batches,
            batches: minutes.clamp(1, 24 * 60) * 60 / BATCH_SECONDS as u64,
            service,
        }))
    }

    /// The span of the data, in seconds.
    fn span(&self) -> i64 {
        self.batches as i64 * BATCH_SECONDS
    }

    /// Samples in one agent's first `batches` batches.
    fn samples_of_first(&self, batches: u64) -> u64 {
        (0..batches.min(self.batches))
            .map(|i| {
                self.templates[i as usize % self.templates.len()]
                    .samples
                    .len() as u64
            })
            .sum()
    }

    fn samples(&self) -> u64 {
        self.samples_of_first(self.batches) * AGENTS
    }

    /// Encoded ingest frames of one agent.
    fn frames(&self, agent: u64, start_s: i64) -> Vec<IngestFrame> {
        let host = format!("bench-host-{agent}");
        (0..self.batches)
            .map(|sequence| {
                let mut batch = self.templates[sequence as usize % self.templates.len()].clone();
                batch.agent_id.clone_from(&host);
                batch.host.clone_from(&host);
                batch.sequence = sequence;
                batch.start_unix_ns = (start_s + sequence as i64 * BATCH_SECONDS) * 1_000_000_000;
                batch.duration_ns = BATCH_SECONDS * 1_000_000_000;
                batch.spool_dropped_total = 0;
                ingest_frame(&batch)
            })
            .collect()
    }
}

/// A batch as an agent sends it: encoded, compressed, with its sequence.
pub(crate) fn ingest_frame(batch: &v1::Batch) -> IngestFrame {
    let encoded = batch.encode_to_vec();
    IngestFrame {
        sequence: batch.sequence,
        uncompressed_size: encoded.len() as u64,
        batch_zstd: zstd::bulk::compress(&encoded, 3).unwrap_or_default(),
    }
}

pub(crate) async fn stream_agent(
    port: u16,
    agent: u64,
    frames: Vec<IngestFrame>,
) -> anyhow::Result<u64> {
    stream_agent_counting(port, agent, frames, Arc::default()).await
}

/// Streams `frames` as agent `agent`, counting the acknowledgements in `acked` as they
/// come (in sequence order).
async fn stream_agent_counting(
    port: u16,
    agent: u64,
    frames: Vec<IngestFrame>,
    acked: Arc<AtomicU64>,
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
            Some(_) => {
                acknowledged += 1;
                acked.store(acknowledged, Ordering::Relaxed);
            }
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
    /// Whether every batch was acknowledged before the ingest deadline.
    complete: bool,
    query_median: Duration,
    query_samples: u64,
    /// `why` on a one-hour window of one service, with its automatic baseline.
    explain_median: Duration,
    explain_verdict: String,
}

fn bench_backend(release: &Path, storage_args: &[&str], data: &DataSet) -> anyhow::Result<Figures> {
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let start_s = now_s - data.batches as i64 * BATCH_SECONDS;
    eprintln!(
        "  preparing {AGENTS} agents x {} batches ({} data)",
        data.batches, data.name
    );
    let all: Vec<Vec<IngestFrame>> = (0..AGENTS)
        .map(|agent| data.frames(agent, start_s))
        .collect();
    let mut args = vec!["--plaintext", "--query-tokens", TOKEN];
    args.extend_from_slice(storage_args);
    let collector = CollectorProcess::start(release, free_port()?, &args, &[])?;
    let port = collector.port;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut samples = data.samples();
    let deadline = Duration::from_secs(
        60 * std::env::var("BENCH_INGEST_MINUTES")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(5),
    );
    eprintln!("  ingesting {samples} samples (at most {deadline:?})");
    let acked: Vec<Arc<AtomicU64>> = (0..AGENTS).map(|_| Arc::default()).collect();
    let started = Instant::now();
    let complete = runtime.block_on(async {
        let mut tasks: Vec<_> = all
            .into_iter()
            .zip(&acked)
            .enumerate()
            .map(|(agent, (frames, acked))| {
                tokio::spawn(stream_agent_counting(
                    port,
                    agent as u64,
                    frames,
                    Arc::clone(acked),
                ))
            })
            .collect();
        let all_acked = async {
            for task in &mut tasks {
                task.await.context("agent task")??;
            }
            anyhow::Ok(())
        };
        if let Ok(result) = tokio::time::timeout(deadline, all_acked).await {
            result.map(|()| true)
        } else {
            for task in &tasks {
                task.abort();
            }
            Ok(false)
        }
    })?;
    let ingest = started.elapsed();
    if !complete {
        samples = acked
            .iter()
            .map(|a| data.samples_of_first(a.load(Ordering::Relaxed)))
            .sum();
        eprintln!("  not all acknowledged within {deadline:?}: {samples} samples were");
    }

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
                    from_unix_ns: (now_s - data.span()) * 1_000_000_000,
                    until_unix_ns: (now_s + 60) * 1_000_000_000,
                }),
                filter: Some(v1::Filter {
                    service: data.service.clone(),
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
            anyhow::ensure!(
                profile.total(0) > 0,
                "the profile of {} is empty",
                data.service
            );
        }
        anyhow::Ok(())
    })?;
    // `why` on the hour before the last one (the fifth sixth of shorter data sets):
    // the window and its baseline (the 12 hours before it, or what there is) are read
    // bucket by bucket, and profiles for the evidence if anything ranks.
    let (window_from, window_until) = if data.span() >= 2 * 3600 {
        (now_s - 2 * 3600, now_s - 3600)
    } else {
        (now_s - data.span() / 3, now_s - data.span() / 6)
    };
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
                    from_unix_ns: window_from * 1_000_000_000,
                    until_unix_ns: window_until * 1_000_000_000,
                }),
                filter: Some(v1::Filter {
                    service: data.service.clone(),
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
        complete,
        query_median: latencies[latencies.len() / 2],
        query_samples,
        explain_median: explain_latencies[explain_latencies.len() / 2],
        explain_verdict,
    })
}

/// One backend's figures on one data set, printed and kept for the report.
struct Row {
    backend: &'static str,
    data: &'static str,
    span_s: i64,
    service: String,
    figures: Figures,
}

fn report(row: &Row) {
    let figures = &row.figures;
    println!(
        "{} ({} data): ingest {:.0} samples/s ({} samples from {AGENTS} agents in {:.1}s, target >= 200000 for SQLite); \
         {} flame graph of {}: median {:.0} ms over {QUERY_RUNS} runs ({} distinct stacks x labels, target <= 500 ms); \
         why on one window with its automatic baseline: median {:.0} ms (verdict {})",
        row.backend,
        row.data,
        figures.samples as f64 / figures.ingest.as_secs_f64(),
        figures.samples,
        figures.ingest.as_secs_f64(),
        span_text(row.span_s),
        row.service,
        figures.query_median.as_secs_f64() * 1000.0,
        figures.query_samples,
        figures.explain_median.as_secs_f64() * 1000.0,
        figures.explain_verdict
    );
}

/// `24 h` or `15 min`.
fn span_text(seconds: i64) -> String {
    if seconds >= 3600 {
        format!("{} h", seconds / 3600)
    } else {
        format!("{} min", seconds / 60)
    }
}

/// The collector's section of the report.
fn write_section(rows: &[Row], started: &str) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut text = String::new();
    let _ = writeln!(text, "## Collector: ingest and queries\n");
    let _ = writeln!(
        text,
        "`sudo cargo xtask bench ingest` (started {started}): {AGENTS} agents stream 10 s \
         batches over loopback gRPC, each acknowledged after storage; then the flame graph \
         of one service over the whole range and `why` on one window are asked \
         {QUERY_RUNS} times each (medians). Synthetic data: the same 40 stacks x labels \
         every batch, a day of them. Recorded data: the batches of the soak's whole-host \
         recording (real stacks, label sets and their skew), five minutes of it per \
         agent, the busiest service queried. The ratio compares each data set's ingest rate with the \
         synthetic one of the same backend in the same run.\n"
    );
    let _ = writeln!(
        text,
        "| backend | data | samples | ingest | ratio to synthetic | flame graph (range, service) | distinct stacks x labels | why (one window) |"
    );
    let _ = writeln!(text, "|---|---|---|---|---|---|---|---|");
    for row in rows {
        let rate = row.figures.samples as f64 / row.figures.ingest.as_secs_f64();
        let synthetic = rows
            .iter()
            .find(|r| r.backend == row.backend && r.data == "synthetic")
            .map(|r| r.figures.samples as f64 / r.figures.ingest.as_secs_f64());
        let _ = writeln!(
            text,
            "| {} | {} | {}{} | {:.0} samples/s | {} | {:.0} ms ({}, `{}`) | {} | {:.0} ms ({}) |",
            row.backend,
            row.data,
            row.figures.samples,
            if row.figures.complete {
                String::new()
            } else {
                format!(
                    " (not all: the {:.0} s deadline, `BENCH_INGEST_MINUTES`, passed)",
                    row.figures.ingest.as_secs_f64()
                )
            },
            rate,
            synthetic.map_or_else(|| "-".to_owned(), |s| format!("{:.2}", rate / s)),
            row.figures.query_median.as_secs_f64() * 1000.0,
            span_text(row.span_s),
            row.service,
            row.figures.query_samples,
            row.figures.explain_median.as_secs_f64() * 1000.0,
            row.figures.explain_verdict
        );
    }
    if !rows.iter().any(|r| r.data == "recorded") {
        let _ = writeln!(
            text,
            "\nNo recorded data set: `sudo cargo xtask bench soak` makes the recording."
        );
    }
    let path = crate::bench_common::write_section("collector", &text)?;
    eprintln!("bench report: {}", path.display());
    Ok(())
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
    let started = crate::bench_common::command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    let mut data_sets = vec![DataSet::synthetic()];
    data_sets.extend(DataSet::recorded()?);
    let mut rows = Vec::new();
    if backends.is_empty() || backends.contains(&"sqlite") {
        for data in &data_sets {
            let dir = std::env::temp_dir()
                .join(format!("stallscope-bench-sqlite-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("bench collector, SQLite in {}", dir.display());
            let path = dir.to_string_lossy().into_owned();
            let figures = bench_backend(&release, &["--data-dir", &path], data)?;
            let _ = std::fs::remove_dir_all(&dir);
            rows.push(Row {
                backend: "SQLite",
                data: data.name,
                span_s: data.span(),
                service: data.service.clone(),
                figures,
            });
            report(rows.last().expect("a row"));
        }
    }
    if backends.is_empty() || backends.contains(&"clickhouse") {
        if util::is_root() || clickhouse::answering() {
            let _server = clickhouse::ensure_running()?;
            for data in &data_sets {
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
                    data,
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
                rows.push(Row {
                    backend: "ClickHouse",
                    data: data.name,
                    span_s: data.span(),
                    service: data.service.clone(),
                    figures: figures?,
                });
                report(rows.last().expect("a row"));
            }
        } else {
            eprintln!(
                "bench: skipping ClickHouse (not root, so it cannot be installed; `cargo xtask clickhouse start` as root first)"
            );
        }
    }
    write_section(&rows, &started)?;
    Ok(())
}
