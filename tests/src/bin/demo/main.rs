//! `stallscope-demo`: the bundled demo service of stallscope's scenario lab and of
//! `cargo xtask demo`, one binary with four roles:
//!
//! - `serve`: a small shop service. A pool of worker threads answers line-framed
//!   requests (`browse`, `checkout`); each request takes one of two mutexes
//!   (`inventory`, `sessions`), renders a page (CPU), asks two downstream peers over
//!   persistent TCP connections (`pricing`, `shipping`), appends to a journal and, for a
//!   checkout, `fdatasync`s it. Idle workers park on a condition variable.
//! - `peer`: a downstream that answers each request after a delay.
//! - `load`: an open-loop load generator reporting per-second latency quantiles.
//! - `hog`: a CPU-hungry neighbour (spinning threads).
//!
//! Each role prints `ready key=value...` on stdout once it is up, then reads commands on
//! stdin, one per line, and answers each with one line (`ok VERB unix_ns=T`,
//! `stats {json}` or `error REASON`); the commands and replies are defined in the
//! lab's `protocol` module, which this binary compiles in too (it links nothing else of
//! the test library, so its debug info stays small enough to be read in full: profiles of
//! it show inlined frames). Closing stdin ends the role, like `quit`.

mod control;
mod cpu;
mod hog;
mod load;
mod peer;
#[expect(dead_code, reason = "the lab's half of the protocol is unused here")]
#[path = "../../lab/protocol.rs"]
mod protocol;
mod request;
mod serve;

use std::{fs::File, os::fd::AsRawFd, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stallscope-demo",
    about = "The demo service of stallscope's scenario lab: a service, its peers, a load generator and a CPU-hungry neighbour"
)]
struct Cli {
    /// Run inside this network namespace (`ip netns add` made it)
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    /// Join this cgroup (a directory under /sys/fs/cgroup) before starting
    #[arg(long, global = true, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// Exit when the process that started this one exits (the lab's safety net)
    #[arg(long, global = true)]
    die_with_parent: bool,
    /// Run at this niceness (-20..=19; lower than the caller's needs root)
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: Option<i32>,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// The shop service: listens for requests from the load generator
    Serve(serve::Args),
    /// A downstream peer answering after a delay
    Peer(peer::Args),
    /// An open-loop load generator
    Load(load::Args),
    /// A CPU-hungry neighbour: spinning threads
    Hog(hog::Args),
}

/// Moves this process (still single-threaded) into network namespace `name`.
fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path)
        .with_context(|| format!("opening {path}: create it with `ip netns add {name}`"))?;
    // SAFETY: setns(2) on a namespace file we hold open. Called before any thread is
    // spawned, so every thread of the role lives in the namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "entering network namespace {name}: {} (needs root)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Moves this process into the cgroup at `dir` (v1 or v2: both take a pid in
/// `cgroup.procs`).
fn join_cgroup(dir: &std::path::Path) -> anyhow::Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).with_context(|| {
        format!(
            "joining cgroup {}: writing {}",
            dir.display(),
            procs.display()
        )
    })
}

fn die_with_parent() -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if rc != 0 {
        bail!(
            "prctl(PR_SET_PDEATHSIG): {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: getppid has no preconditions. A parent that died before the prctl left
    // this process to init.
    if unsafe { libc::getppid() } == 1 {
        bail!("the parent exited before the demo started");
    }
    Ok(())
}

/// Sets this process's niceness; threads spawned afterwards inherit it.
fn set_nice(nice: i32) -> anyhow::Result<()> {
    // SAFETY: setpriority on this process (who = 0) with a valid range.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        bail!(
            "setting niceness {nice}: {} (lowering it needs root)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.die_with_parent {
        die_with_parent()?;
    }
    if let Some(nice) = cli.nice {
        set_nice(nice)?;
    }
    if let Some(dir) = &cli.cgroup {
        join_cgroup(dir)?;
    }
    if let Some(name) = &cli.netns {
        enter_netns(name)?;
    }
    match cli.role {
        Role::Serve(args) => serve::run(&args),
        Role::Peer(args) => peer::run(&args),
        Role::Load(args) => load::run(&args),
        Role::Hog(args) => hog::run(&args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stallscope-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}
