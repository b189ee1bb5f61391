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

use crate::{bootstrap, debian, util};

/// One benchmark: a command whose output yields a metric, run with and without the agent.
struct Bench {
    name: &'static str,
    command: &'static [&'static str],
    /// Parses the metric out of the command's combined output.
    metric: fn(&str) -> Option<f64>,
    unit: &'static str,
    agent_args: &'static [&'static str],
    target: &'static str,
}

const BENCHES: &[Bench] = &[Bench {
    name: "offcpu",
    command: &[
        "taskset", "-c", "0", "perf", "bench", "sched", "pipe", "-l", "500000",
    ],
    metric: usecs_per_op,
    unit: "us/op",
    agent_args: &["--signals", "offcpu,oncpu"],
    target: "ratio <= 1.3, agent RSS <= 64 MB",
}];

fn usecs_per_op(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|l| l.contains("usecs/op"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn run_metric(bench: &Bench) -> anyhow::Result<f64> {
    let output = Command::new(bench.command[0])
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

/// CPU time (user + system) of a process, from /proc.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit(')').next()?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); after the comm they are at 11 and 12.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
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

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    // The collector's figures: `ingest` and `query` measure both together, optionally
    // restricted to `sqlite` or `clickhouse`.
    let collector_args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| matches!(*a, "ingest" | "query" | "sqlite" | "clickhouse"))
        .collect();
    let agent_args: Vec<String> = args
        .iter()
        .filter(|a| !collector_args.contains(&a.as_str()))
        .cloned()
        .collect();
    if !collector_args.is_empty() || args.is_empty() {
        let backends: Vec<&str> = collector_args
            .iter()
            .copied()
            .filter(|a| matches!(*a, "sqlite" | "clickhouse"))
            .collect();
        crate::bench_collector::run(&backends)?;
        if agent_args.is_empty() && !args.is_empty() {
            return Ok(());
        }
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
        bail!("unknown benchmark; choose from {}", names.join(", "));
    }
    bootstrap::ensure()?;
    debian::ensure(&["linux-perf"])?;
    util::cargo(&["build", "--release", "--bins"])?;
    let agent: PathBuf = util::root().join("target/release/stallscope-agent");
    let out = std::env::temp_dir().join(format!("stallscope-bench-{}.pb.gz", std::process::id()));
    for bench in selected {
        eprintln!(
            "bench {}: {} rounds of `{}`, interleaved with and without the agent",
            bench.name,
            rounds,
            bench.command.join(" ")
        );
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
        let base_median = median(&mut base);
        let with_median = median(&mut with);
        let ratio = with_median / base_median;
        println!(
            "{}: baseline {:.3} {unit}, with agent {:.3} {unit}, ratio {:.3} (target {}); agent CPU {:.1}% of a core, peak RSS {:.1} MB",
            bench.name,
            base_median,
            with_median,
            ratio,
            bench.target,
            median(&mut cpu),
            rss as f64 / 1024.0,
            unit = bench.unit
        );
    }
    let _ = std::fs::remove_file(&out);
    Ok(())
}
