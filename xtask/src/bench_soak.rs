//! `cargo xtask bench soak`: the daemon on a busy host for ten minutes (`SOAK_SECONDS`),
//! every signal on at default settings. A baseline minute of the same load without the
//! agent comes first, so the load's own slowdown is a ratio within the run. The agent
//! streams to a collector that starts only at the end: the spool then holds the whole
//! soak, which is kept as a real whole-host recording (`target/bench/recording/`, the
//! corpus of the collector's realistic ingest benchmark) and read for losses, and the
//! agent's catch-up once the collector answers is timed.
//!
//! Reported: the agent's RSS every ten seconds (peak, and the last five minutes' range
//! and slope: "flat" is a slope under 0.5 MB a minute), its CPU, the loss counts of every
//! batch, the recording's cardinality (distinct stacks, label sets) and the catch-up.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use prost::Message as _;
use stallscope_proto::v1;
use stallscope_tests::{
    AgentRun,
    collector::{CollectorProcess, free_port},
};

use crate::{bench_common, util};

/// Every signal, at its default settings.
const SIGNALS: &str = "offcpu,oncpu,runqueue,lock,syscall,disk,network";
const RSS_TARGET_MB: f64 = 64.0;
/// Growth over the last five minutes under which RSS counts as flat.
const FLAT_MB_PER_MIN: f64 = 0.5;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Loss reasons (after the signal's name) that mean an event's time went uncounted; the
/// others say a stack came out incomplete.
const EVENT_LOSSES: &[&str] = &[
    "thread_table_full",
    "aggregation_map_full",
    "map_busy",
    "thread_wait_exceeds_window",
];

/// Where the soak's spooled batches are kept for the ingest benchmark.
pub(crate) fn recording_dir() -> PathBuf {
    util::root().join("target/bench/recording")
}

/// The load: a pipe ping-pong pinned to CPU 1 (timed: the load's own rate), a hundred
/// short-lived processes a second, bursts of short-lived threads, loopback
/// request/response and futex contention in bursts, and direct disk writes.
struct Load {
    children: Vec<Child>,
    stop: Arc<AtomicBool>,
    pipe_us: Arc<Mutex<Vec<f64>>>,
    timer: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(scratch: &Path) -> anyhow::Result<Self> {
        let workload = util::root().join("target/release/stallscope-workload");
        let file = scratch.join("disk-load");
        let scripts = [
            "while :; do for i in $(seq 20); do /bin/true; ls /proc >/dev/null; done; sleep 0.2; done"
                .to_owned(),
            format!(
                "while :; do echo go | {} churn 200 >/dev/null 2>&1 || sleep 1; sleep 1; done",
                workload.display()
            ),
            format!(
                "while :; do {} net-rr 5000 >/dev/null 2>&1; perf bench futex hash -r 1 >/dev/null 2>&1; sleep 2; done",
                workload.display()
            ),
            format!(
                "while :; do dd if=/dev/zero of={} bs=64k count=64 oflag=direct status=none; sleep 1; done",
                file.display()
            ),
        ];
        let mut children = Vec::new();
        for script in &scripts {
            children.push(
                Command::new("bash")
                    .args(["-c", script])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .process_group(0)
                    .spawn()
                    .context("starting the soak's load")?,
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pipe_us = Arc::new(Mutex::new(Vec::new()));
        let timer = {
            let (stop, pipe_us) = (Arc::clone(&stop), Arc::clone(&pipe_us));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let output = Command::new("taskset")
                        .args(["-c", "1", "perf", "bench", "sched", "pipe", "-l", "100000"])
                        .output();
                    if let Some(us) = output.ok().and_then(|o| {
                        bench_common::usecs_per_op(&String::from_utf8_lossy(&o.stdout))
                    }) {
                        pipe_us.lock().expect("pipe timings").push(us);
                    }
                }
            })
        };
        Ok(Self {
            children,
            stop,
            pipe_us,
            timer: Some(timer),
        })
    }

    /// Median pipe round trip (us) of the runs since the last call.
    fn take_pipe_median(&self) -> f64 {
        let mut runs = std::mem::take(&mut *self.pipe_us.lock().expect("pipe timings"));
        bench_common::median(&mut runs)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for child in &mut self.children {
            // SAFETY: kill(2) on the process group the child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
        if let Some(timer) = self.timer.take() {
            let _ = timer.join();
        }
    }
}

/// Least-squares slope of (minutes, MB) points, in MB a minute.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0 / n, y + p.1 / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), p| {
        (num + (p.0 - mx) * (p.1 - my), den + (p.0 - mx) * (p.0 - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// What the spooled batches of a recording hold.
#[derive(Default)]
pub(crate) struct Recording {
    pub batches: Vec<v1::Batch>,
    pub samples: u64,
    pub stacks: usize,
    pub label_sets: usize,
    pub losses: BTreeMap<String, u64>,
}

/// Reads the spooled frames of `dir` (in sequence order).
pub(crate) fn read_recording(dir: &Path) -> anyhow::Result<Recording> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "frame"))
        .collect();
    paths.sort();
    let mut recording = Recording::default();
    let mut stacks = HashSet::new();
    let mut label_sets = HashSet::new();
    for path in paths {
        let bytes = std::fs::read(&path)?;
        let frame = v1::IngestFrame::decode(bytes.as_slice())
            .with_context(|| format!("decoding {}", path.display()))?;
        let raw = zstd::bulk::decompress(&frame.batch_zstd, frame.uncompressed_size as usize)?;
        let batch = v1::Batch::decode(raw.as_slice())?;
        for sample in &batch.samples {
            let names: Vec<&str> = batch
                .stacks
                .get(sample.stack as usize)
                .map(|s| {
                    s.frames
                        .iter()
                        .filter_map(|&f| batch.frames.get(f as usize))
                        .map(|f| f.function.as_str())
                        .collect()
                })
                .unwrap_or_default();
            stacks.insert(names.join(";"));
            let mut labels: Vec<&str> = sample
                .labels
                .iter()
                .filter_map(|&i| batch.strings.get(i as usize).map(String::as_str))
                .collect();
            labels.sort_unstable();
            label_sets.insert(labels.join(","));
        }
        recording.samples += batch.samples.len() as u64;
        for loss in &batch.losses {
            *recording.losses.entry(loss.reason.clone()).or_default() += loss.count;
        }
        recording.batches.push(batch);
    }
    recording.stacks = stacks.len();
    recording.label_sets = label_sets.len();
    Ok(recording)
}

pub fn run() -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("the soak loads eBPF probes: run it as root, e.g. `sudo -E cargo xtask bench soak`");
    }
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let baseline_seconds = (seconds / 10).clamp(20, 60);
    let release = util::root().join("target/release");
    let scratch = std::env::temp_dir().join(format!("stallscope-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let spool = scratch.join("spool");
    let started_at = bench_common::command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);

    eprintln!(
        "soak: {baseline_seconds} s of the load alone, then {seconds} s with the agent ({SIGNALS})"
    );
    let load = Load::start(&scratch)?;
    std::thread::sleep(Duration::from_secs(baseline_seconds));
    let pipe_base = load.take_pipe_median();

    let port = free_port()?;
    let spool_arg = spool.to_string_lossy().into_owned();
    let collector_url = format!("http://127.0.0.1:{port}");
    let duration = format!("{}s", seconds + 600);
    // Another build (or a wrapper that runs it under a heap profiler) may stand in.
    let binary = std::env::var_os("STALLSCOPE_BENCH_AGENT")
        .map_or_else(|| release.join("stallscope-agent"), PathBuf::from);
    let mut agent = AgentRun::start(
        &binary,
        &[
            "run",
            "--signals",
            SIGNALS,
            "--agent-id",
            "soak",
            "--collector",
            &collector_url,
            "--spool-dir",
            &spool_arg,
            "--duration",
            &duration,
        ],
    )?;
    agent.wait_ready(Duration::from_secs(120))?;
    let pid = agent.pid();
    let cpu_before = bench_common::cpu_time(pid).unwrap_or_default();
    let start = Instant::now();
    let mut rss: Vec<(f64, f64)> = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(SAMPLE_EVERY);
        let Some(kib) = bench_common::rss_kib(pid) else {
            bail!("the agent exited during the soak: {}", agent.log_text());
        };
        let point = (start.elapsed().as_secs_f64() / 60.0, kib as f64 / 1024.0);
        eprintln!("  {:5.1} min: agent RSS {:.1} MB", point.0, point.1);
        rss.push(point);
    }
    let cpu = bench_common::cpu_time(pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    let wall = start.elapsed();
    let pipe_with = load.take_pipe_median();
    let peak_mb = bench_common::peak_rss_kib(pid).unwrap_or(0) as f64 / 1024.0;
    drop(load);

    // The whole soak is in the spool: keep it, then let the agent deliver it.
    let recording = recording_dir();
    let _ = std::fs::remove_dir_all(&recording);
    std::fs::create_dir_all(&recording)?;
    for entry in std::fs::read_dir(&spool)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "frame") {
            std::fs::copy(
                &path,
                recording.join(path.file_name().expect("a file name")),
            )?;
        }
    }
    let data = scratch.join("collector");
    let data_arg = data.to_string_lossy().into_owned();
    let collector = CollectorProcess::start(
        &release,
        port,
        &[
            "--plaintext",
            "--query-tokens",
            "soak-token",
            "--data-dir",
            &data_arg,
        ],
        &[],
    )?;
    let catch_up_started = Instant::now();
    let spooled = |dir: &Path| {
        std::fs::read_dir(dir).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "frame"))
                .count()
        })
    };
    while spooled(&spool) > 0 && catch_up_started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let catch_up = catch_up_started.elapsed();
    let left = spooled(&spool);
    agent.terminate();
    let exit = agent.wait(Duration::from_secs(60))?;
    drop(collector);
    let recorded = read_recording(&recording)?;

    let last: Vec<(f64, f64)> = rss
        .iter()
        .copied()
        .filter(|p| p.0 >= wall.as_secs_f64() / 60.0 - 5.0)
        .collect();
    let (low, high) = last.iter().fold((f64::MAX, 0.0_f64), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let growth = slope(&last);
    let flat = growth.abs() < FLAT_MB_PER_MIN;
    // Events whose time went uncounted, against stacks that came out incomplete (the
    // wait still counted).
    let is_event_loss = |reason: &str| {
        EVENT_LOSSES
            .iter()
            .any(|loss| reason.rsplit('.').next() == Some(*loss))
    };
    let lost: u64 = recorded
        .losses
        .iter()
        .filter(|(reason, _)| is_event_loss(reason))
        .map(|(_, n)| n)
        .sum();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "## Soak: {} minutes on a busy host, every signal on\n",
        seconds / 60
    );
    let _ = writeln!(
        text,
        "`sudo cargo xtask bench soak` (`SOAK_SECONDS={seconds}`), started {started_at}. Load: a \
         pipe ping-pong on CPU 1, a hundred short-lived processes a second, 200 short-lived \
         threads a second, loopback request/response and futex bursts, direct disk writes. \
         Agent: `run --signals {SIGNALS}`, defaults otherwise; its collector answers only \
         after the soak, so the spool holds all of it.\n"
    );
    let _ = writeln!(text, "| figure | value | target |\n|---|---|---|");
    let _ = writeln!(
        text,
        "| agent peak RSS | {peak_mb:.1} MB | <= {RSS_TARGET_MB} MB: {} |",
        verdict(peak_mb <= RSS_TARGET_MB)
    );
    let _ = writeln!(
        text,
        "| agent RSS, last 5 minutes | {low:.1}-{high:.1} MB, slope {growth:+.2} MB/min | flat (under {FLAT_MB_PER_MIN} MB/min): {} |",
        verdict(flat)
    );
    let _ = writeln!(
        text,
        "| agent CPU | {:.1}% of a core | reported |",
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
    );
    let _ = writeln!(
        text,
        "| load's pipe round trip, with agent / without (ratio) | {pipe_with:.2} / {pipe_base:.2} us ({:.2}) | reported |",
        pipe_with / pipe_base
    );
    let _ = writeln!(
        text,
        "| events lost (tables full, map busy, double counts), all batches | {lost} | 0: {} |",
        verdict(lost == 0)
    );
    let _ = writeln!(
        text,
        "| recording | {} batches, {} samples, {} distinct stacks, {} distinct label sets | reported |",
        recorded.batches.len(),
        recorded.samples,
        recorded.stacks,
        recorded.label_sets
    );
    let _ = writeln!(
        text,
        "| catch-up: the spool delivered once the collector answers | {:.1} s ({left} batches left) | reported |",
        catch_up.as_secs_f64()
    );
    let reasons: Vec<String> = recorded
        .losses
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("`{reason}` {n}"))
        .collect();
    if !reasons.is_empty() {
        let _ = writeln!(
            text,
            "\nEvery loss and stack-quality count by reason: {}.",
            reasons.join(", ")
        );
    }
    let _ = writeln!(
        text,
        "\nAgent RSS every {} s (MB): {}.",
        SAMPLE_EVERY.as_secs(),
        rss.iter()
            .map(|p| format!("{:.0}", p.1))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !exit.status.success() {
        let _ = writeln!(
            text,
            "\nThe agent exited with {}: {}",
            exit.status, exit.stderr
        );
    }
    print!("{text}");
    bench_common::write_section("soak", &text)?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}
