//! `phases HEALTHY_S DEGRADED_S RECOVERED_S`: a small request-serving service whose
//! degradation has one known cause, for the web UI's browser test. Four `worker` threads
//! serve requests in a loop: compute about 0.5 ms (`request_marker_compute`), sleep 4 ms
//! (`request_marker_wait`), and update shared state under one mutex
//! (`request_marker_commit`), sleeping while they hold it. Healthy, the mutex is held
//! 20 us; degraded, 3 ms, so the workers queue on it: lock contention. Prints
//! `phase degraded UNIX_NS` and `phase recovered UNIX_NS` when the phases start.

use std::{
    hint::black_box,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{sleep_once, waits::result};

const WORKERS: usize = 4;

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// About `spin` of CPU work.
#[inline(never)]
fn request_marker_compute(spin: Duration) -> u64 {
    let started = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while started.elapsed() < spin {
        for _ in 0..1000 {
            x = black_box(x.rotate_left(7) ^ x.wrapping_mul(0x2545_f491_4f6c_dd1d));
        }
    }
    x
}

/// The request's downstream wait.
#[inline(never)]
fn request_marker_wait() {
    sleep_once(Duration::from_millis(4));
}

/// The shared update, holding the lock for `hold`.
#[inline(never)]
fn request_marker_commit(state: &Mutex<u64>, hold: Duration) {
    let mut guard = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Off CPU while holding it (a write to a slow store): the waiters' time is the
    // lock's, the holder's is a sleep.
    thread::sleep(hold);
    *guard += 1;
}

/// Sleeps `total` in 100 ms slices: one long sleep would be reported as one wait when it
/// ends, a spike of `other` time at the phase change that outweighs the injected cause.
fn sleep_in_slices(total: Duration) {
    let until = Instant::now() + total;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(100)));
    }
}

pub fn run(healthy: Duration, degraded: Duration, recovered: Duration) {
    let hold_us = Arc::new(AtomicU64::new(20));
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let state = Arc::new(Mutex::new(0u64));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let (hold_us, stop, requests, state) = (
                Arc::clone(&hold_us),
                Arc::clone(&stop),
                Arc::clone(&requests),
                Arc::clone(&state),
            );
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        black_box(request_marker_compute(Duration::from_micros(500)));
                        request_marker_wait();
                        let hold = Duration::from_micros(hold_us.load(Ordering::Relaxed));
                        request_marker_commit(&state, hold);
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .expect("spawn worker")
        })
        .collect();
    sleep_in_slices(healthy);
    hold_us.store(3000, Ordering::Relaxed);
    println!("phase degraded {}", unix_ns());
    sleep_in_slices(degraded);
    hold_us.store(20, Ordering::Relaxed);
    println!("phase recovered {}", unix_ns());
    sleep_in_slices(recovered);
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("worker");
    }
    result("requests", requests.load(Ordering::Relaxed));
}
