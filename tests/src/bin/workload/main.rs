//! A workload with known, injected behaviour for stallscope's end-to-end tests.
//!
//! It prints `ready <pid>` and waits for a line on stdin, runs the scenario, prints `done`
//! and stays alive until stdin closes (so a profiler can still read its memory maps).
//! Scenarios:
//! - `markers`: thread `sleeper` blocks 20 x 50 ms inside `offcpu_marker_sleep` while
//!   thread `spinner` burns CPU inside `oncpu_marker_spin` until the sleeper is done
//!   (plus `--spin-after` extra time); the sleeper reports `slept_ns` by its own clock.
//! - `churn N`: starts N short-lived threads, each sleeping a little, a few at a time.
//! - `pulse`: thread `pulse` sleeps 10 ms and spins about 1 ms, over and over, until
//!   stdin closes: steady off-CPU and on-CPU activity at little cost (streaming tests).
//! - `mutex`, `kernel-lock`, `syscalls`, `runqueue`, `disk`: injected waits of every kind
//!   (see `waits.rs`); `syscall-sampling FAST SLOW US`: FAST `getppid`s and SLOW
//!   `clock_nanosleep`s of US microseconds, for the syscall signal's sampled mode; `file-lock flock|fcntl THREADS ROUNDS HOLD_MS DIR`: file lock
//!   waits behind another process (see `filelock.rs`).
//! - `net-connect`, `net-peers`, `net-bulk`: network waits between two network
//!   namespaces the caller created (see `net.rs`); `net-rr`: request/response over
//!   loopback, for the network benchmark.
//! - `exit-soon N MS`: N x 50 ms in `offcpu_marker_sleep`, then MS of CPU, then exits
//!   without waiting for stdin; `fork-workers N MS`: N worker processes forked without
//!   exec, each MS in `offcpu_marker_sleep` and gone; `jit`: waits below JIT code named by a perf map (see
//!   `identity.rs`).
//! - `flood BUSY_S QUIET_S`: a syscall and context-switch flood, then quiet, for the
//!   overhead guard (see `flood.rs`).
//! - `phases HEALTHY_S DEGRADED_S RECOVERED_S`: a request-serving service that degrades
//!   once, by lock contention (see `phases.rs`).

mod filelock;
mod flood;
mod identity;
mod net;
mod phases;
mod waits;

use std::{
    hint::black_box,
    io::BufRead,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// Blocks `count` times for `each` inside this function (the off-CPU marker).
#[inline(never)]
pub fn offcpu_marker_sleep(count: u32, each: Duration) {
    for _ in 0..count {
        sleep_once(each);
    }
}

/// One blocking sleep; a separate framed function so the marker's own frame is always
/// part of the user stack, whatever the C library does with the frame pointer.
#[inline(never)]
fn sleep_once(each: Duration) {
    let spec = libc::timespec {
        tv_sec: each.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(each.subsec_nanos() as i32),
    };
    // SAFETY: valid timespec; a signal interruption just ends the sleep early.
    unsafe { libc::nanosleep(&raw const spec, std::ptr::null_mut()) };
    black_box(());
}

/// Burns CPU inside this function until `stop` is set (the on-CPU marker).
#[inline(never)]
pub fn oncpu_marker_spin(stop: &AtomicBool) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..10_000 {
            x = black_box(x.rotate_left(7) ^ x.wrapping_mul(0x2545_f491_4f6c_dd1d));
        }
    }
    x
}

fn markers(spin_after: Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("spinner".into())
            .spawn(move || black_box(oncpu_marker_spin(&stop)))
            .expect("spawn spinner")
    };
    let sleeper = thread::Builder::new()
        .name("sleeper".into())
        .spawn(|| {
            let slept = Instant::now();
            offcpu_marker_sleep(20, Duration::from_millis(50));
            // By the sleeper's own clock: what the probes must have counted.
            waits::result("slept_ns", slept.elapsed().as_nanos());
        })
        .expect("spawn sleeper");
    sleeper.join().expect("sleeper");
    thread::sleep(spin_after);
    stop.store(true, Ordering::Relaxed);
    spinner.join().expect("spinner");
}

fn churn(threads: u32) {
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..threads {
        handles.push(
            thread::Builder::new()
                .name(format!("churn-{}", i % 100))
                .spawn(|| {
                    for _ in 0..3 {
                        thread::sleep(Duration::from_micros(200));
                    }
                })
                .expect("spawn churn thread"),
        );
        if handles.len() >= 64 {
            for handle in handles.drain(..) {
                handle.join().expect("churn thread");
            }
        }
    }
    for handle in handles {
        handle.join().expect("churn thread");
    }
    eprintln!("churn: {threads} threads in {:?}", started.elapsed());
}

/// Numeric argument `index`, or `default`.
fn arg<T: std::str::FromStr>(args: &[String], index: usize, default: T) -> T {
    args.get(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Text argument `index` (empty if missing: the scenario then fails with a clear message).
fn text(args: &[String], index: usize) -> &str {
    args.get(index).map_or("", String::as_str)
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Sleeps and spins in turn until the process exits.
fn pulse() {
    let stop = AtomicBool::new(false);
    loop {
        sleep_once(Duration::from_millis(10));
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1) {
            black_box(oncpu_marker_spin(&stop));
            stop.store(true, Ordering::Relaxed);
        }
        stop.store(false, Ordering::Relaxed);
    }
}

/// The scenarios, as `--help` lists them and as an unknown name is answered.
const SCENARIOS: &str = "markers, churn, mutex, kernel-lock, file-lock, syscalls, runqueue, disk, net-connect, net-peers, net-bulk, net-rr, exit-soon, fork-workers, jit, flood, phases or pulse";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).map_or("markers", String::as_str);
    // Answered before the handshake: nothing waits on stdin for these.
    if matches!(scenario, "-h" | "--help" | "help") {
        println!(
            "stallscope-workload [SCENARIO [ARGS...]]: a workload with known, injected waits for stallscope's tests.\n\
             It prints `ready <pid>`, waits for a line on stdin, runs the scenario, prints `done`\n\
             and stays alive until stdin closes. Scenarios: {SCENARIOS} (default markers)."
        );
        return;
    }
    if scenario == "file-lock-holder" {
        // The other process of `file-lock`, started by it: no handshake.
        filelock::holder(text(&args, 2), ms(arg(&args, 3, 10)), text(&args, 4));
        return;
    }
    println!("ready {}", std::process::id());
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    match scenario {
        "markers" => {
            let spin_after = args
                .get(2)
                .and_then(|ms| ms.parse().ok())
                .map_or(Duration::from_millis(500), Duration::from_millis);
            markers(spin_after);
        }
        "churn" => churn(arg(&args, 2, 2000)),
        "pulse" => {
            thread::Builder::new()
                .name("pulse".into())
                .spawn(pulse)
                .expect("spawn pulse");
        }
        "mutex" => waits::mutex(arg(&args, 2, 4), arg(&args, 3, 5), ms(arg(&args, 4, 10))),
        "kernel-lock" => waits::kernel_lock(arg(&args, 2, 8), ms(arg(&args, 3, 1000))),
        "file-lock" => filelock::file_lock(
            text(&args, 2),
            arg(&args, 3, 4),
            arg(&args, 4, 40),
            ms(arg(&args, 5, 10)),
            args.get(6).map_or("/tmp", String::as_str),
        ),
        "flood" => flood::flood(
            Duration::from_secs(arg(&args, 2, 8)),
            Duration::from_secs(arg(&args, 3, 6)),
        ),
        "syscall-sampling" => waits::syscall_sampling(
            arg(&args, 2, 200_000),
            arg(&args, 3, 3000),
            Duration::from_micros(arg(&args, 4, 200)),
        ),
        "syscalls" => waits::syscalls(
            args.get(2).map_or("/tmp", String::as_str),
            arg(&args, 3, 50),
            ms(arg(&args, 4, 20)),
        ),
        "runqueue" => waits::runqueue(arg(&args, 2, 4), ms(arg(&args, 3, 2000))),
        "disk" => waits::disk(
            args.get(2).map_or("/dev/null", String::as_str),
            arg(&args, 3, 200),
        ),
        "net-connect" => net::connect(
            text(&args, 2),
            text(&args, 3),
            text(&args, 4),
            arg(&args, 5, 4),
        ),
        "net-peers" => net::peers(
            text(&args, 2),
            text(&args, 3),
            (text(&args, 4), text(&args, 5)),
            arg(&args, 6, 50),
            ms(arg(&args, 7, 30)),
        ),
        "net-bulk" => net::bulk(
            text(&args, 2),
            text(&args, 3),
            arg(&args, 4, 1 << 20),
            args.get(5..).unwrap_or_default(),
        ),
        "net-rr" => net::request_response(arg(&args, 2, 50_000)),
        "exit-soon" => {
            identity::exit_soon(arg(&args, 2, 5), ms(arg(&args, 3, 100)));
            println!("done");
            return;
        }
        "fork-workers" => identity::fork_workers(arg(&args, 2, 20), ms(arg(&args, 3, 10))),
        "jit" => identity::jit(),
        "phases" => phases::run(
            Duration::from_secs(arg(&args, 2, 50)),
            Duration::from_secs(arg(&args, 3, 25)),
            Duration::from_secs(arg(&args, 4, 15)),
        ),
        other => {
            eprintln!("unknown scenario {other}: use {SCENARIOS}");
            std::process::exit(2);
        }
    }
    println!("done");
    line.clear();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if scenario == "jit" {
        identity::remove_perf_map();
    }
}
