//! `flood BUSY_S QUIET_S`: what the overhead guard must hold. For `BUSY_S` seconds thread
//! `syscalls` calls `getppid` in bursts of a hundred between 500 us of work, with a 100 us
//! `nanosleep` after every thousand (a syscall flood with known slow syscalls), while
//! threads `ping` and `pong` bounce a byte over two pipes, ping working 100 us between
//! round trips (context switches); then `QUIET_S` seconds of nothing, for the guard to
//! relax. The work between bursts keeps the probes' share of the threads' time small, so
//! the threads run at about the same pace whether the probes are attached or not (what
//! a duty cycle's estimates assume). Reports the counts and the sleeps' own timing.

use std::{
    fs::File,
    hint::black_box,
    io::{Read, Write},
    os::fd::FromRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::waits::{result, syscall_marker_nanosleep};

/// Computes for `how_long`.
fn work(how_long: Duration) {
    let started = Instant::now();
    let mut x = 0u64;
    while started.elapsed() < how_long {
        x = black_box(x.wrapping_mul(31).wrapping_add(7));
    }
}

/// Waits `how_long` without `nanosleep` (a futex wait): the sleeps the workload reports
/// are the only ones.
fn idle(how_long: Duration) {
    let until = Instant::now() + how_long;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        thread::park_timeout(left);
    }
}

/// A pipe's two ends.
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two descriptors, checked, each owned by one File from here.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: as above.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

pub fn flood(busy: Duration, quiet: Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let syscalls = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("syscalls".into())
            .spawn(move || {
                let (mut calls, mut sleeps, mut slept) = (0u64, 0u64, 0u128);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..10 {
                        for _ in 0..100 {
                            // SAFETY: getppid takes no arguments and cannot fail.
                            black_box(unsafe { libc::syscall(libc::SYS_getppid) });
                        }
                        calls += 100;
                        work(Duration::from_micros(500));
                    }
                    slept += syscall_marker_nanosleep(Duration::from_micros(100)).as_nanos();
                    sleeps += 1;
                }
                (calls, sleeps, slept)
            })
            .expect("spawn syscalls")
    };
    // Reading end first: ping writes to pong through the first, pong answers through
    // the second.
    let (mut from_ping, mut to_pong) = pipe();
    let (mut from_pong, mut to_ping) = pipe();
    let pong = thread::Builder::new()
        .name("pong".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            while from_ping.read_exact(&mut byte).is_ok() && byte[0] != b'q' {
                let _ = to_ping.write_all(b"o");
            }
        })
        .expect("spawn pong");
    let ping = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("ping".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                let mut trips = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = to_pong.write_all(b"i");
                    let _ = from_pong.read_exact(&mut byte);
                    trips += 1;
                    work(Duration::from_micros(100));
                }
                let _ = to_pong.write_all(b"q");
                trips
            })
            .expect("spawn ping")
    };
    idle(busy);
    stop.store(true, Ordering::Relaxed);
    let (calls, sleeps, slept) = syscalls.join().expect("syscalls thread");
    let trips = ping.join().expect("ping thread");
    pong.join().expect("pong thread");
    idle(quiet);
    result("getppid_count", calls);
    result("nanosleep_count", sleeps);
    result("nanosleep_ns", slept);
    result("round_trips", trips);
}
