//! `stallscope-demo hog`: a CPU-hungry neighbour. N threads spin in `crunch_numbers`
//! until the role ends; the lab runs it from a copy of this binary named `demo-hog`, so
//! it shows as its own process and service.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread,
};

use crate::{
    control::{not_here, say, serve_commands},
    cpu::mix,
    protocol::Command,
};

#[derive(clap::Args)]
pub struct Args {
    /// Spinning threads (default: twice the CPUs)
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| 2 * thread::available_parallelism().map_or(1, usize::from));
    let stop = Arc::new(AtomicBool::new(false));
    let mut spinners = Vec::new();
    for index in 0..threads.max(1) {
        let stop = Arc::clone(&stop);
        spinners.push(
            thread::Builder::new()
                .name(format!("hog-spin-{index}"))
                .spawn(move || std::hint::black_box(crunch_numbers(&stop)))?,
        );
    }
    say(&format!(
        "ready pid={} threads={threads}",
        std::process::id()
    ));
    serve_commands(|command| match command {
        Command::Stats => Ok("stats {}".to_owned()),
        other => Err(not_here("hog", other)),
    });
    stop.store(true, Relaxed);
    for spinner in spinners {
        let _ = spinner.join();
    }
    Ok(())
}

/// Burns CPU until `stop` is set.
#[inline(never)]
fn crunch_numbers(stop: &AtomicBool) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while !stop.load(Relaxed) {
        for _ in 0..100_000 {
            x = mix(x);
        }
    }
    x
}
