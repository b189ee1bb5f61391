//! What the benchmark families share: parsing `perf bench` output, a process's CPU time
//! and peak memory, medians, and the report each family writes its section of
//! (`target/bench/report.md`).

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::Context as _;

use crate::util;

/// The report's sections, in order: each family's latest run.
const SECTIONS: &[&str] = &["agent-overhead", "soak", "unwind", "collector", "ui"];

pub fn usecs_per_op(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|l| l.contains("usecs/op"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU time (user + system) of a process, from /proc.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit(')').next()?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); after the comm they are at 11 and 12.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// The process's peak resident memory (KiB).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// The process's resident memory now (KiB).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A KiB field of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A command's first line of output, or `?`.
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

/// Saves one family's section (`target/bench/sections/NAME.md`) and rebuilds the report
/// (`target/bench/report.md`) from every section saved so far. Returns the report's path.
pub fn write_section(name: &str, text: &str) -> anyhow::Result<PathBuf> {
    use std::fmt::Write as _;
    let dir = util::root().join("target/bench");
    let sections = dir.join("sections");
    std::fs::create_dir_all(&sections)
        .with_context(|| format!("creating {}", sections.display()))?;
    let path = sections.join(format!("{name}.md"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let mut report = String::new();
    let _ = writeln!(report, "# stallscope benchmark report\n");
    let _ = writeln!(
        report,
        "Written by `cargo xtask bench` (each section by its family: `cargo xtask bench \
         offcpu`, `soak`, `ingest`, `ui`...; a section shows when it ran). Machine: {}. \
         Every overhead figure is a ratio against a baseline measured in the same run: \
         these machines are shared and noisy.\n",
        machine()
    );
    for section in SECTIONS {
        if let Ok(body) = std::fs::read_to_string(sections.join(format!("{section}.md"))) {
            let _ = writeln!(report, "{}", body.trim_end());
            let _ = writeln!(report);
        }
    }
    let report_path = dir.join("report.md");
    std::fs::write(&report_path, report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    Ok(report_path)
}

/// The machine: CPUs, memory and kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "{cpus} CPUs ({cpu}), {memory_gib:.0} GiB, kernel {}",
        command_line("uname", &["-r"])
    )
}
