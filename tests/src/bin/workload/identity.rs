//! Scenarios for symbolization and identity: a process that exits right after its last
//! wait, worker processes forked without exec that live a few milliseconds, and JIT code
//! named only by a perf map.

use std::{
    hint::black_box,
    io::Write,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use crate::{offcpu_marker_sleep, waits::result};

/// Waits `count` x 50 ms in `offcpu_marker_sleep`, then burns CPU for `spin` and returns
/// (the caller exits at once): the last wait ends `spin` before the process is gone.
pub fn exit_soon(count: u32, spin: Duration) {
    let slept = Instant::now();
    offcpu_marker_sleep(count, Duration::from_millis(50));
    result("slept_ns", slept.elapsed().as_nanos());
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let mut x = 0u64;
    while started.elapsed() < spin && !stop.load(Ordering::Relaxed) {
        x = black_box(x.wrapping_mul(31).wrapping_add(7));
    }
    result("waited_ns", u64::from(count) * 50_000_000);
}

/// Forks `workers` child processes (no exec), each blocking once for `wait` inside
/// `offcpu_marker_sleep` and exiting at once; waits for all of them. Reports how long
/// the workers' sleeps lasted by their own clocks (`slept_ns`, a sleep overshoots on a
/// busy host), through a page shared with them.
pub fn fork_workers(workers: u32, wait: Duration) {
    let slots = workers as usize;
    // SAFETY: an anonymous shared mapping, checked below; zero-filled.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            slots.max(1) * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(shared != libc::MAP_FAILED, "mmap of the shared page failed");
    // SAFETY: the mapping holds `slots` aligned, zeroed u64s, shared with the children;
    // each child writes only its own slot, and the parent reads after reaping them all.
    let slept: &[AtomicU64] = unsafe { std::slice::from_raw_parts(shared.cast(), slots) };
    let mut children = Vec::new();
    for slot in slept {
        // SAFETY: the process is single-threaded here; the child only sleeps and exits.
        match unsafe { libc::fork() } {
            0 => {
                let started = Instant::now();
                offcpu_marker_sleep(1, wait);
                slot.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                // SAFETY: ends the child without running the parent's exit handlers.
                unsafe { libc::_exit(0) }
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            child => children.push(child),
        }
    }
    for child in &children {
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(*child, &raw mut status, 0) };
        assert!(
            libc::WIFEXITED(status),
            "worker {child} ended with {status}"
        );
    }
    let pids: Vec<String> = children.iter().map(ToString::to_string).collect();
    result("workers", pids.join(","));
    result("waited_ns", u64::from(workers) * wait.as_nanos() as u64);
    let total: u64 = slept.iter().map(|slot| slot.load(Ordering::Relaxed)).sum();
    result("slept_ns", total);
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(shared, slots.max(1) * 8) };
}

/// Called by the JIT stub: the waits happen below a frame only the perf map can name.
extern "C" fn jit_callback() {
    offcpu_marker_sleep(10, Duration::from_millis(50));
}

/// Generates a stub in anonymous executable memory that sets up a frame and calls
/// `jit_callback`, announces it in `/tmp/perf-PID.map` as `jit_marker_stub`, and calls
/// it. Like a real JIT, the code and its map stay until the process ends
/// ([`remove_perf_map`]).
#[cfg(target_arch = "x86_64")]
pub fn jit() {
    const SIZE: usize = 4096;
    // SAFETY: an anonymous private mapping; checked below.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(page != libc::MAP_FAILED, "mmap of JIT memory failed");
    let target = jit_callback as *const () as u64;
    let mut code = vec![
        0x55, // push %rbp
        0x48, 0x89, 0xe5, // mov %rsp,%rbp
        0x48, 0xb8, // movabs $target,%rax
    ];
    code.extend_from_slice(&target.to_le_bytes());
    code.extend_from_slice(&[
        0xff, 0xd0, // call *%rax
        0x5d, // pop %rbp
        0xc3, // ret
    ]);
    // SAFETY: `page` is a fresh writable mapping of SIZE bytes; the code fits.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), page.cast::<u8>(), code.len()) };
    let map_path = format!("/tmp/perf-{}.map", std::process::id());
    {
        let mut map = std::fs::File::create(&map_path).expect("create perf map");
        writeln!(map, "{:x} {:x} jit_marker_stub", page as u64, code.len())
            .expect("write perf map");
    }
    // SAFETY: the page holds a complete function with the C calling convention.
    let stub: extern "C" fn() = unsafe { std::mem::transmute(page) };
    call_jit(stub);
}

/// Removes the perf map [`jit`] wrote.
pub fn remove_perf_map() {
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", std::process::id()));
}

/// A framed caller, so the frames above the stub are known code.
#[inline(never)]
fn call_jit(stub: extern "C" fn()) {
    stub();
    black_box(());
}

#[cfg(not(target_arch = "x86_64"))]
pub fn jit() {
    eprintln!("the jit scenario generates x86-64 code");
    std::process::exit(2);
}
