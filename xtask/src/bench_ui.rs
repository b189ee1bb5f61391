//! `cargo xtask bench ui`: the web UI's pages on a day of stored data. Four agents stream
//! a day of 10 s batches (the ingest benchmark's shape: five services each, 16-frame
//! stacks) whose off-CPU time is split by cause and varies over the day (a daily cycle,
//! noise, one service's lock waits six times higher for half an hour), three windows are
//! marked; then the services page over 24 h, a service's 24 h timeline and a window's
//! report are fetched over HTTP, signed in with a token, and timed (median of several
//! renders, against the 1 s target). Also the bytes of the embedded assets and of the
//! UI's code in the release binary (target: under 2 MB added).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use stallscope_collector::synthetic;
use stallscope_proto::v1::{self, IngestFrame, query_client::QueryClient};
use stallscope_tests::{
    collector::{CollectorProcess, free_port},
    http::{Framing, request},
};
use tonic::{Request, metadata::MetadataValue};

use crate::bench_collector::{
    AGENTS, BATCH_SECONDS, SHAPE, TOKEN, batches_per_agent, ingest_frame, stream_agent,
};

const RENDERS: usize = 7;
/// Every page must render within this (issue 18).
const TARGET: Duration = Duration::from_secs(1);
/// The embedded assets and the UI's code must add less than this to the binary.
const SIZE_TARGET: u64 = 2 * 1024 * 1024;
const CAUSES: [&str; 5] = ["lock", "disk", "network", "other", "cpu-contention"];
/// Seconds into the day when `svc-0`'s lock waits rise, and for how long.
const DEGRADED_AT_S: i64 = 20 * 3600;
const DEGRADED_FOR_S: i64 = 1800;

/// Deterministic noise in [0, 1).
fn unit_noise(a: u64, b: u64) -> f64 {
    let mut z = a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 29;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 32;
    (z % 10_000) as f64 / 10_000.0
}

/// One agent's day: the synthetic template with a `cause` on every off-CPU sample and
/// values that follow the day.
fn frames(agent: u64, start_s: i64) -> Vec<IngestFrame> {
    let host = format!("bench-host-{agent}");
    let mut batch = synthetic::batch(&host, &host, 0, 0, BATCH_SECONDS * 1_000_000_000, SHAPE);
    let intern = |strings: &mut Vec<String>, text: &str| -> u32 {
        if let Some(index) = strings.iter().position(|s| s == text) {
            return index as u32;
        }
        strings.push(text.to_owned());
        (strings.len() - 1) as u32
    };
    let cause_key = intern(&mut batch.strings, "cause");
    let causes: Vec<u32> = CAUSES
        .iter()
        .map(|c| intern(&mut batch.strings, c))
        .collect();
    let svc0 = intern(&mut batch.strings, "svc-0");
    let process_key = intern(&mut batch.strings, "process");
    for (i, sample) in batch.samples.iter_mut().enumerate() {
        if sample.signal == 0 {
            sample
                .labels
                .extend([cause_key, causes[(i / 2) % causes.len()]]);
        }
    }
    let template: Vec<i64> = batch.samples.iter().map(|s| s.value).collect();
    (0..batches_per_agent())
        .map(|sequence| {
            let offset_s = sequence as i64 * BATCH_SECONDS;
            let day = (offset_s as f64 / 86_400.0) * std::f64::consts::TAU;
            let degraded = (DEGRADED_AT_S..DEGRADED_AT_S + DEGRADED_FOR_S).contains(&offset_s);
            for (i, (sample, base)) in batch.samples.iter_mut().zip(&template).enumerate() {
                let mut factor =
                    (1.0 + 0.5 * day.sin()) * (0.7 + 0.6 * unit_noise(sequence, i as u64));
                let is_svc0 = sample
                    .labels
                    .chunks(2)
                    .any(|pair| pair == [process_key, svc0]);
                let is_lock = sample.labels.chunks(2).any(|p| p == [cause_key, causes[0]]);
                if degraded && is_svc0 && is_lock {
                    factor *= 6.0;
                }
                sample.value = (*base as f64 * factor) as i64;
            }
            batch.sequence = sequence;
            batch.start_unix_ns = (start_s + offset_s) * 1_000_000_000;
            ingest_frame(&batch)
        })
        .collect()
}

/// Marks three windows through the query API (the degradation, an older one of another
/// service, and one still open) and returns the degradation's id.
async fn mark_windows(port: u16, start_s: i64, now_s: i64) -> anyhow::Result<String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut client = QueryClient::new(channel);
    let mut first = String::new();
    for (service, from_s, until_s, note) in [
        (
            "svc-0",
            start_s + DEGRADED_AT_S,
            start_s + DEGRADED_AT_S + DEGRADED_FOR_S,
            "checkout slow",
        ),
        (
            "svc-1",
            start_s + 6 * 3600,
            start_s + 6 * 3600 + 600,
            "batch job late",
        ),
        ("svc-2", now_s - 900, 0, "still investigating"),
    ] {
        let mut add = Request::new(v1::AddWindowRequest {
            host: String::new(),
            service: service.to_owned(),
            from_unix_ns: from_s * 1_000_000_000,
            until_unix_ns: until_s * 1_000_000_000,
            note: note.to_owned(),
        });
        add.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {TOKEN}"))?,
        );
        let window = client.add_window(add).await?.into_inner().window;
        if first.is_empty() {
            first = window.map(|w| w.id).unwrap_or_default();
        }
    }
    Ok(first)
}

/// Renders `path` `RENDERS` times; the first (cold) time, the median, and the page's size.
fn time_page(ui: SocketAddr, path: &str) -> anyhow::Result<(Duration, Duration, usize)> {
    let auth = format!("Bearer {TOKEN}");
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..RENDERS {
        let started = Instant::now();
        let reply = request(
            ui,
            None,
            "GET",
            path,
            &[("Authorization", &auth)],
            b"",
            Framing::ContentLength,
        )?;
        times.push(started.elapsed());
        if reply.status != 200 {
            bail!("{path}: {} {}", reply.status, reply.body);
        }
        bytes = reply.body.len();
    }
    let cold = times[0];
    times.sort();
    Ok((cold, times[times.len() / 2], bytes))
}

/// Bytes of the UI's functions and constants in the binary's symbol table (`nm`).
fn ui_code_bytes(binary: &Path) -> anyhow::Result<u64> {
    let output = Command::new("nm")
        .args(["--print-size", "--demangle"])
        .arg(binary)
        .output()
        .context("running nm (binutils)")?;
    if !output.status.success() {
        bail!(
            "nm {}: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("server::ui::"))
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|size| u64::from_str_radix(size, 16).ok())
        .sum())
}

pub fn run(release: &Path) -> anyhow::Result<()> {
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let start_s = now_s - 24 * 3600;
    let dir = std::env::temp_dir().join(format!("stallscope-bench-ui-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "bench ui: {AGENTS} agents x {} batches, SQLite in {}",
        batches_per_agent(),
        dir.display()
    );
    let all: Vec<Vec<IngestFrame>> = (0..AGENTS).map(|agent| frames(agent, start_s)).collect();
    let ui_port = free_port()?;
    let ui_listen = format!("127.0.0.1:{ui_port}");
    let data = dir.to_string_lossy().into_owned();
    // No detector: the pages are timed alone, not next to a detector reading the day.
    let collector = CollectorProcess::start(
        release,
        free_port()?,
        &[
            "--plaintext",
            "--query-tokens",
            TOKEN,
            "--data-dir",
            &data,
            "--ui-listen",
            &ui_listen,
            "--no-detect",
        ],
        &[],
    )?;
    let port = collector.port;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let window = runtime.block_on(async {
        let tasks: Vec<_> = all
            .into_iter()
            .enumerate()
            .map(|(agent, frames)| tokio::spawn(stream_agent(port, agent as u64, frames)))
            .collect();
        for task in tasks {
            task.await.context("agent task")??;
        }
        mark_windows(port, start_s, now_s).await
    })?;
    let ui: SocketAddr = ui_listen.parse()?;
    let day = "from=now-24h&until=now";
    let pages = [
        ("services page, 24 h", format!("/services?{day}")),
        (
            "a service's timeline, 24 h",
            format!("/service?service=svc-0&host=bench-host-0&{day}"),
        ),
        (
            "a service's timeline, 24 h, every host",
            format!("/service?service=svc-0&{day}"),
        ),
        ("a window's report (why)", format!("/windows/{window}")),
    ];
    let mut section = format!(
        "## Web UI\n\n`sudo cargo xtask bench ui` (started {}): the collector's pages on the ingest \
         benchmark's day of data (SQLite, release build), {RENDERS} renders each, medians.\n\n\
         | page | median | first render | HTML | target |\n|---|---|---|---|---|\n",
        crate::bench_common::command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    );
    for (name, path) in &pages {
        let (cold, median, bytes) = time_page(ui, path)?;
        let _ = writeln!(
            section,
            "| {name} | {:.0} ms | {:.0} ms | {} KB | <= 1 s |",
            median.as_secs_f64() * 1000.0,
            cold.as_secs_f64() * 1000.0,
            bytes / 1024
        );
        println!(
            "ui: {name}: median {:.0} ms over {RENDERS} renders (first {:.0} ms), {:.2} of the 1 s target, {} KB of HTML",
            median.as_secs_f64() * 1000.0,
            cold.as_secs_f64() * 1000.0,
            median.as_secs_f64() / TARGET.as_secs_f64(),
            bytes / 1024
        );
    }
    let mut assets = 0;
    for asset in ["ui.css", "ui.js", "icon.svg"] {
        let (_, _, bytes) = time_page(ui, &format!("/assets/{asset}"))?;
        assets += bytes as u64;
    }
    drop(collector);
    let _ = std::fs::remove_dir_all(&dir);
    let code = ui_code_bytes(&release.join("stallscope-collector"))?;
    println!(
        "ui: embedded assets {assets} bytes, the UI's code {code} bytes in the release binary: {:.3} MB of the 2 MB allowed",
        (assets + code) as f64 / 1024.0 / 1024.0
    );
    let _ = writeln!(
        section,
        "\nThe UI's assets and code in the collector's binary: {:.3} MB (target < 2 MB).",
        (assets + code) as f64 / 1024.0 / 1024.0
    );
    crate::bench_common::write_section("ui", &section)?;
    if assets + code >= SIZE_TARGET {
        eprintln!("bench ui: the UI adds more than 2 MB to the collector");
    }
    Ok(())
}
