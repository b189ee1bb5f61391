//! CPU work of a given length: a loop calibrated once at start-up against the thread's
//! own CPU clock, so "300 us of rendering" is the same amount of work whether or not
//! the machine is busy (a busy machine makes it take longer, as it would a real one).

use std::{hint::black_box, sync::OnceLock, time::Duration};

/// Loop iterations per microsecond of this thread's CPU time.
static ITERATIONS_PER_US: OnceLock<f64> = OnceLock::new();

/// One step of the work loop; inlined into each caller so the caller's own frame is
/// where the CPU time shows.
#[expect(
    clippy::inline_always,
    reason = "the CPU time must show in the calling step's own frame, not in a shared helper"
)]
#[inline(always)]
pub fn mix(x: u64) -> u64 {
    black_box(x.rotate_left(7) ^ x.wrapping_mul(0x2545_f491_4f6c_dd1d))
}

/// This thread's CPU time.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Measures the loop's speed (the best of a few 5 ms rounds: preemption only slows a
/// round down, and CPU time already leaves most of it out).
pub fn calibrate() -> f64 {
    *ITERATIONS_PER_US.get_or_init(|| {
        let mut best: f64 = 0.0;
        let mut x = 1u64;
        for _ in 0..5 {
            let start = thread_cpu_time();
            let mut iterations = 0u64;
            while thread_cpu_time().saturating_sub(start) < Duration::from_millis(5) {
                for _ in 0..20_000 {
                    x = mix(x);
                }
                iterations += 20_000;
            }
            let took = thread_cpu_time().saturating_sub(start).as_secs_f64() * 1e6;
            best = best.max(iterations as f64 / took);
        }
        black_box(x);
        best.max(1.0)
    })
}

/// Iterations of [`mix`] that take `cpu` of CPU time.
pub fn iterations_for(cpu: Duration) -> u64 {
    (calibrate() * cpu.as_secs_f64() * 1e6) as u64
}
