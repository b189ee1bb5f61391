//! `cargo xtask bench`: the agent's overhead, measured as ratios against a baseline taken
//! in the same run, interleaved (these machines are shared and noisy), with the agent's
//! own CPU and peak memory.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use stallscope_tests::AgentRun;

use crate::{
    bench_common::{
        command_line, cpu_time, machine, median, peak_rss_kib, usecs_per_op, write_section,
    },
    bootstrap, debian, util,
};

/// One benchmark: a command whose output yields a metric, run with and without the agent.
struct Bench {
    name: &'static str,
    command: &'static [&'static str],
    /// Parses the metric out of the command's combined output.
    metric: fn(&str) -> Option<f64>,
    unit: &'static str,
    /// Throughput (higher is better) rather than time per operation.
    higher_is_better: bool,
    agent_args: &'static [&'static str],
    target: &'static str,
    /// A server the command talks to, running for the whole benchmark (both sides).
    server: Option<&'static [&'static str]>,
}

/// Stands for the bundled workload (`target/release/stallscope-workload`) in commands.
const WORKLOAD: &str = "stallscope-workload";
/// The loopback port of the iperf3 benchmark.
const IPERF_PORT: &str = "5399";

const ALL_SIGNALS: &str = "offcpu,oncpu,runqueue,lock,syscall,disk,network";
/// The daemon's (`run`) default signal set.
const DAEMON_SIGNALS: &str = "offcpu,oncpu,runqueue,lock,disk,network";

const BENCHES: &[Bench] = &[
    Bench {
        name: "offcpu",
        command: &[
            "taskset", "-c", "0", "perf", "bench", "sched", "pipe", "-l", "500000",
        ],
        metric: usecs_per_op,
        unit: "us/op",
        higher_is_better: false,
        agent_args: &["--signals", "offcpu,oncpu"],
        target: "slowdown <= 1.3, agent RSS <= 64 MB",
        server: None,
    },
    Bench {
        name: "syscall",
        command: &[
            "taskset", "-c", "0", "perf", "bench", "syscall", "basic", "-l", "10000000",
        ],
        metric: usecs_per_op,
        unit: "us/op",
        higher_is_better: false,
        agent_args: &["--signals", "syscall"],
        target: "slowdown <= 2.0",
        server: None,
    },
    Bench {
        name: "syscall-sampled",
        command: &[
            "taskset", "-c", "0", "perf", "bench", "syscall", "basic", "-l", "10000000",
        ],
        metric: usecs_per_op,
        unit: "us/op",
        higher_is_better: false,
        agent_args: &["--signals", "syscall", "--syscall-sample-every", "16"],
        target: "slowdown <= 1.4",
        server: None,
    },
    Bench {
        name: "futex",
        command: &["perf", "bench", "futex", "hash", "-r", "2"],
        metric: operations_per_sec,
        unit: "ops/s",
        higher_is_better: true,
        agent_args: &["--signals", "lock"],
        target: "slowdown <= 1.3",
        server: None,
    },
    Bench {
        name: "messaging",
        command: &["perf", "bench", "sched", "messaging", "-l", "200"],
        metric: total_seconds,
        unit: "s",
        higher_is_better: false,
        agent_args: &["--signals", ALL_SIGNALS, "--syscall-sample-every", "16"],
        target: "slowdown <= 1.15, agent RSS <= 64 MB",
        server: None,
    },
    Bench {
        name: "messaging-default",
        command: &["perf", "bench", "sched", "messaging", "-l", "200"],
        metric: total_seconds,
        unit: "s",
        higher_is_better: false,
        agent_args: &["--signals", DAEMON_SIGNALS],
        target: "slowdown <= 1.15, agent RSS <= 64 MB",
        server: None,
    },
    Bench {
        name: "iperf3",
        command: &["iperf3", "-c", "127.0.0.1", "-p", IPERF_PORT, "-t", "4"],
        metric: receiver_gbits,
        unit: "Gbit/s",
        higher_is_better: true,
        agent_args: &["--signals", "network"],
        target: "throughput ratio >= 0.95 (slowdown <= 1.053)",
        server: Some(&["iperf3", "-s", "-p", IPERF_PORT]),
    },
    Bench {
        name: "reqresp",
        command: &[WORKLOAD, "net-rr", "50000"],
        metric: round_trips_per_sec,
        unit: "round trips/s",
        higher_is_better: true,
        agent_args: &["--signals", "network"],
        target: "throughput ratio >= 0.9 (slowdown <= 1.11)",
        server: None,
    },
];

/// iperf3's receiver line: `[  5]   0.00-4.00   sec  8.19 GBytes  17.6 Gbits/sec   receiver`.
fn receiver_gbits(output: &str) -> Option<f64> {
    let line = output
        .lines()
        .find(|l| l.trim_end().ends_with("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let unit = words.iter().position(|w| w.ends_with("bits/sec"))?;
    let value: f64 = words.get(unit.checked_sub(1)?)?.parse().ok()?;
    let scale = match words[unit] {
        "Gbits/sec" => 1.0,
        "Mbits/sec" => 1e-3,
        "Kbits/sec" => 1e-6,
        _ => return None,
    };
    Some(value * scale)
}

/// The workload's `result rr_per_sec=N` line.
fn round_trips_per_sec(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("result rr_per_sec="))
        .and_then(|v| v.trim().parse().ok())
}

/// `Averaged 1643776 operations/sec (+- 8.64%), total secs = 2`
fn operations_per_sec(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Averaged "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `Total time: 1.322 [sec]`
fn total_seconds(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Total time:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The program of a command: the bundled workload's release build, or a tool on PATH.
fn program(name: &str) -> PathBuf {
    if name == WORKLOAD {
        util::root().join("target/release").join(WORKLOAD)
    } else {
        PathBuf::from(name)
    }
}

fn run_metric(bench: &Bench) -> anyhow::Result<f64> {
    let output = Command::new(program(bench.command[0]))
        .args(&bench.command[1..])
        .output()
        .with_context(|| format!("running {}", bench.command.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{} failed: {text}", bench.command.join(" "));
    }
    (bench.metric)(&text)
        .with_context(|| format!("no metric in output of {}: {text}", bench.command.join(" ")))
}

struct WithAgent {
    metric: f64,
    cpu_percent: f64,
    peak_rss_kib: u64,
}

fn run_with_agent(bench: &Bench, agent: &Path, out: &Path) -> anyhow::Result<WithAgent> {
    let out_arg = out.to_string_lossy().into_owned();
    let mut args = vec!["record", "--duration", "10m", "-o", out_arg.as_str()];
    args.extend_from_slice(bench.agent_args);
    let mut run = AgentRun::start(agent, &args)?;
    run.wait_ready(Duration::from_secs(60))?;
    let pid = run.pid();
    let cpu_before = cpu_time(pid).unwrap_or_default();
    let started = Instant::now();
    let metric = run_metric(bench)?;
    let wall = started.elapsed();
    let cpu_after = cpu_time(pid).unwrap_or_default();
    let mut peak = peak_rss_kib(pid).unwrap_or(0);
    run.interrupt();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match peak_rss_kib(pid) {
            Some(kib) => peak = peak.max(kib),
            None => break,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let exit = run.wait(Duration::from_secs(60))?;
    if !exit.status.success() {
        bail!("agent failed: {}", exit.stderr);
    }
    Ok(WithAgent {
        metric,
        cpu_percent: cpu_after.saturating_sub(cpu_before).as_secs_f64() / wall.as_secs_f64()
            * 100.0,
        peak_rss_kib: peak,
    })
}

/// A benchmark's server, stopped when dropped.
struct Server(std::process::Child);

impl Server {
    fn start(command: &[&str]) -> anyhow::Result<Self> {
        let child = Command::new(program(command[0]))
            .args(&command[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", command.join(" ")))?;
        // Give it time to listen.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The criterion benchmarks of symbolization: cached throughput (frames/s) and the cold
/// first symbolization of the agent's own release binary. No root needed.
const SYMBOLIZE: &str = "symbolize";

fn run_symbolize() -> anyhow::Result<()> {
    eprintln!(
        "bench {SYMBOLIZE}: criterion, cached symbolization and cold symbolization of the agent binary"
    );
    // The cold benchmark symbolizes the release agent binary: build it first.
    util::cargo(&["build", "--release", "-p", "stallscope-agent"])?;
    util::cargo(&["bench", "-p", "stallscope-agent", "--bench", "symbolize"])
}

/// Unwind table builds against readelf on the same binaries. No root needed.
const UNWIND: &str = "unwind";

fn run_unwind() -> anyhow::Result<()> {
    eprintln!("bench {UNWIND}: unwind table builds against readelf reading the same binaries");
    util::cargo(&["build", "--release", "-p", "stallscope-agent"])?;
    let section = util::root().join("target/bench/unwind-section.md");
    if let Some(dir) = section.parent() {
        std::fs::create_dir_all(dir)?;
    }
    util::cargo_with_env(
        &["bench", "-p", "stallscope-agent", "--bench", "unwind_table"],
        &[("STALLSCOPE_BENCH_SECTION", &section)],
    )?;
    let text = std::fs::read_to_string(&section)?;
    let report = write_section(UNWIND, &text)?;
    eprintln!("bench {UNWIND}: report {}", report.display());
    Ok(())
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    // Five families: the agent's overhead (named benches, root), the criterion
    // symbolization benchmarks, the daemon's soak (`soak`, root), the collector's figures
    // (`ingest` and `query` measure both backends, optionally restricted to `sqlite` or
    // `clickhouse`) and the web UI's pages (`ui`). No argument runs them all. Each family
    // writes its section of `target/bench/report.md`.
    let is_collector = |a: &str| matches!(a, "ingest" | "query" | "sqlite" | "clickhouse");
    let is_ui = |a: &str| a == "ui";
    let is_soak = |a: &str| a == "soak";
    let everything = args.is_empty();
    if everything || args.iter().any(|a| a == SYMBOLIZE) {
        run_symbolize()?;
    }
    if everything || args.iter().any(|a| a == UNWIND) {
        run_unwind()?;
    }
    if everything || args.iter().any(|a| is_soak(a)) {
        // Runs before the collector's families when everything is asked: its recording
        // is the corpus of the realistic ingest benchmark.
        bootstrap::ensure()?;
        debian::ensure(&["linux-perf"])?;
        util::cargo(&["build", "--release", "--bins"])?;
        crate::bench_soak::run()?;
    }
    if everything || args.iter().any(|a| is_collector(a)) {
        let backends: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|a| matches!(*a, "sqlite" | "clickhouse"))
            .collect();
        crate::bench_collector::run(&backends)?;
    }
    if (everything || args.iter().any(|a| is_ui(a)))
        && let Some(release) = crate::bench_collector::in_release(&["ui"])?
    {
        crate::bench_ui::run(&release)?;
    }
    let agent_args: Vec<String> = args
        .iter()
        .filter(|a| *a != SYMBOLIZE && *a != UNWIND && !is_collector(a) && !is_ui(a) && !is_soak(a))
        .cloned()
        .collect();
    if !everything && agent_args.is_empty() {
        return Ok(());
    }
    let args = agent_args.as_slice();
    if !util::is_root() {
        bail!("benchmarks load eBPF probes: run them as root, e.g. `sudo -E cargo xtask bench`");
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    let selected: Vec<&Bench> = BENCHES
        .iter()
        .filter(|b| args.is_empty() || args.iter().any(|a| a == b.name))
        .collect();
    if selected.is_empty() {
        let names: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
        bail!(
            "unknown benchmark; choose from {}, {SYMBOLIZE}, {UNWIND}, soak, ingest, query (sqlite, clickhouse), ui",
            names.join(", ")
        );
    }
    bootstrap::ensure()?;
    debian::ensure(&["linux-perf", "iperf3"])?;
    util::cargo(&["build", "--release", "--bins"])?;
    // Another build of the agent (an earlier commit's, to compare before and after a
    // change) may stand in for this tree's: the workloads and the harness stay the same.
    let agent: PathBuf = match std::env::var_os("STALLSCOPE_BENCH_AGENT") {
        Some(path) => PathBuf::from(path),
        None => util::root().join("target/release/stallscope-agent"),
    };
    if !agent.is_file() {
        bail!(
            "no agent binary at {} (STALLSCOPE_BENCH_AGENT names another build)",
            agent.display()
        );
    }
    eprintln!("agent under test: {}", agent.display());
    let mut report = Report::new(&agent, rounds);
    let out = std::env::temp_dir().join(format!("stallscope-bench-{}.pb.gz", std::process::id()));
    for bench in selected {
        eprintln!(
            "bench {}: {} rounds of `{}`, interleaved with and without the agent",
            bench.name,
            rounds,
            bench.command.join(" ")
        );
        let _server = bench.server.map(Server::start).transpose()?;
        let mut base = Vec::new();
        let mut with = Vec::new();
        let mut cpu = Vec::new();
        let mut rss = 0u64;
        for round in 0..rounds {
            // Alternate the order so slow drift hits both sides alike.
            let agent_first = round % 2 == 1;
            if agent_first {
                let w = run_with_agent(bench, &agent, &out)?;
                base.push(run_metric(bench)?);
                with.push(w.metric);
                cpu.push(w.cpu_percent);
                rss = rss.max(w.peak_rss_kib);
            } else {
                base.push(run_metric(bench)?);
                let w = run_with_agent(bench, &agent, &out)?;
                with.push(w.metric);
                cpu.push(w.cpu_percent);
                rss = rss.max(w.peak_rss_kib);
            }
            eprintln!(
                "  round {}: base {:.3} {unit}, with agent {:.3} {unit}",
                round + 1,
                base[round],
                with[round],
                unit = bench.unit
            );
        }
        let mut round_ratios: Vec<f64> = base
            .iter()
            .zip(&with)
            .map(|(b, w)| if bench.higher_is_better { b / w } else { w / b })
            .collect();
        round_ratios.sort_by(f64::total_cmp);
        let base_median = median(&mut base);
        let with_median = median(&mut with);
        // The slowdown the agent causes: time ratio, or inverse throughput ratio.
        let ratio = if bench.higher_is_better {
            base_median / with_median
        } else {
            with_median / base_median
        };
        println!(
            "{}: baseline {:.3} {unit}, with agent {:.3} {unit}, slowdown {:.3} (target {}); agent CPU {:.1}% of a core, peak RSS {:.1} MB",
            bench.name,
            base_median,
            with_median,
            ratio,
            bench.target,
            median(&mut cpu),
            rss as f64 / 1024.0,
            unit = bench.unit
        );
        report.rows.push(Row {
            bench,
            baseline: base_median,
            with_agent: with_median,
            ratio,
            lowest: round_ratios.first().copied().unwrap_or(f64::NAN),
            highest: round_ratios.last().copied().unwrap_or(f64::NAN),
            cpu_percent: median(&mut cpu),
            rss_mb: rss as f64 / 1024.0,
        });
    }
    let _ = std::fs::remove_file(&out);
    let path = report.write()?;
    eprintln!("bench report: {}", path.display());
    Ok(())
}

/// One benchmark's line of the report.
struct Row {
    bench: &'static Bench,
    baseline: f64,
    with_agent: f64,
    ratio: f64,
    lowest: f64,
    highest: f64,
    cpu_percent: f64,
    rss_mb: f64,
}

/// The agent-overhead section of the report: every benchmark run, as a ratio against the
/// same run's baseline, with the machine's load around it.
struct Report {
    agent: PathBuf,
    rounds: usize,
    started: String,
    load_before: String,
    rows: Vec<Row>,
}

impl Report {
    fn new(agent: &Path, rounds: usize) -> Self {
        Self {
            agent: agent.to_path_buf(),
            rounds,
            started: command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            load_before: load_average(),
            rows: Vec::new(),
        }
    }

    fn write(&self) -> anyhow::Result<PathBuf> {
        use std::fmt::Write as _;
        let mut text = String::new();
        let _ = writeln!(text, "## Agent overhead\n");
        let _ = writeln!(
            text,
            "`cargo xtask bench` ({} interleaved rounds with and without the agent, medians), \
             started {}; agent `{}`.\n",
            self.rounds,
            self.started,
            self.agent.display()
        );
        let _ = writeln!(
            text,
            "Machine: {}; load average before {}, after {}.\n",
            machine(),
            self.load_before,
            load_average()
        );
        let _ = writeln!(
            text,
            "| benchmark (name) | agent flags | baseline | with agent | ratio (rounds) | target | agent CPU | agent peak RSS |"
        );
        let _ = writeln!(text, "|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let _ = writeln!(
                text,
                "| `{}` (`{}`) | `{}` | {:.3} {unit} | {:.3} {unit} | {:.2} ({:.2}-{:.2}) | {} | {:.1}% | {:.1} MB |",
                row.bench.command.join(" "),
                row.bench.name,
                row.bench.agent_args.join(" "),
                row.baseline,
                row.with_agent,
                row.ratio,
                row.lowest,
                row.highest,
                row.bench.target,
                row.cpu_percent,
                row.rss_mb,
                unit = row.bench.unit
            );
        }
        write_section("agent-overhead", &text)
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".into(),
        |t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}
