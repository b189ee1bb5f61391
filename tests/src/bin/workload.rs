//! A workload with known, injected behaviour for stallscope's end-to-end tests.
//!
//! It prints `ready <pid>` and waits for a line on stdin, runs the scenario, prints `done`
//! and stays alive until stdin closes (so a profiler can still read its memory maps).
//! Scenarios:
//! - `markers`: thread `sleeper` blocks 20 x 50 ms inside `offcpu_marker_sleep` while
//!   thread `spinner` burns CPU inside `oncpu_marker_spin` until the sleeper is done
//!   (plus `--spin-after` extra time).
//! - `churn N`: starts N short-lived threads, each sleeping a little, a few at a time.
//! - `pulse`: thread `pulse` sleeps 10 ms and spins about 1 ms, over and over, until
//!   stdin closes: steady off-CPU and on-CPU activity at little cost (streaming tests).

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
        .spawn(|| offcpu_marker_sleep(20, Duration::from_millis(50)))
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).map_or("markers", String::as_str);
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
        "churn" => churn(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(2000)),
        "pulse" => {
            thread::Builder::new()
                .name("pulse".into())
                .spawn(pulse)
                .expect("spawn pulse");
        }
        other => {
            eprintln!("unknown scenario {other}: use markers, churn or pulse");
            std::process::exit(2);
        }
    }
    println!("done");
    line.clear();
    let _ = std::io::stdin().lock().read_line(&mut line);
}
