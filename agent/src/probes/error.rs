//! Why loading, attaching or draining the probes failed, each error saying what to do.

use std::path::PathBuf;

use thiserror::Error;

use super::btf;

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "stallscope-agent needs root (or CAP_BPF with CAP_PERFMON): run it with sudo or grant those capabilities"
    )]
    NotPrivileged,
    #[error("BTF file {path} is unreadable ({reason}): pass an existing file with --btf, or omit --btf to use {default}", default = btf::VMLINUX_BTF)]
    BtfUnreadable { path: PathBuf, reason: String },
    #[error(
        "off-CPU profiling needs the sched:sched_switch tracepoint, which this kernel lacks (is tracefs mounted?)"
    )]
    NoSchedSwitch,
    #[error("loading the eBPF probes failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("loading program {program} failed: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {0} is missing from the probe object")]
    MissingMap(&'static str),
    #[error("reading map {map} failed: {source}")]
    Map {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    MapApi {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("on-CPU sampling needs perf events on every CPU: {0}")]
    PerfEvent(String),
    #[error("the probes' map layout: {0}")]
    Layout(String),
    #[error(
        "pinning the probes in {path} failed: {reason} (or pass --pin-dir none to run without surviving restarts)"
    )]
    Pin { path: PathBuf, reason: String },
    #[error("signal `{signal}` is not available on this kernel: it needs {need}")]
    Unsupported {
        signal: &'static str,
        need: &'static str,
    },
}
