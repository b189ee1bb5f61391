//! Scenarios with injected waits of every kind: lock contention (user and kernel), slow
//! syscalls, CPU contention and disk I/O. Each prints `result key=value` lines with what
//! it measured itself, for the tests to compare with what stallscope measured.

use std::{
    fs::OpenOptions,
    hint::black_box,
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// Prints one measured value for the test.
pub fn result(key: &str, value: impl std::fmt::Display) {
    println!("result {key}={value}");
}

/// Pins the calling thread to one CPU.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

/// Takes the contended lock and holds it while sleeping (the user-lock marker).
#[inline(never)]
pub fn lock_marker_contend(lock: &Mutex<u64>, hold: Duration) -> Duration {
    let started = Instant::now();
    let mut guard = lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let waited = started.elapsed();
    thread::sleep(hold);
    *guard += 1;
    waited
}

/// `mutex THREADS ROUNDS HOLD_MS`: `THREADS` threads take one `std::sync::Mutex`
/// `ROUNDS` times each and hold it `HOLD_MS` inside; an idle thread waits on a condition variable
/// meanwhile. Reports the total time the threads waited for the lock, measured around
/// `lock()`, and the lock's address.
pub fn mutex(threads: usize, rounds: usize, hold: Duration) {
    let lock = Arc::new(Mutex::new(0u64));
    let waited_ns = Arc::new(AtomicU64::new(0));
    let idle = Arc::new((Mutex::new(false), Condvar::new()));
    let idler = {
        let idle = Arc::clone(&idle);
        thread::Builder::new()
            .name("idle-waiter".into())
            .spawn(move || {
                let (flag, condvar) = &*idle;
                let mut done = flag
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                while !*done {
                    done = condvar
                        .wait(done)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            })
            .expect("spawn idle waiter")
    };
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let lock = Arc::clone(&lock);
            let waited_ns = Arc::clone(&waited_ns);
            thread::Builder::new()
                .name(format!("contender-{i}"))
                .spawn(move || {
                    for _ in 0..rounds {
                        let waited = lock_marker_contend(&lock, hold);
                        waited_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
                    }
                })
                .expect("spawn contender")
        })
        .collect();
    for worker in workers {
        worker.join().expect("contender");
    }
    {
        let (flag, condvar) = &*idle;
        *flag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        condvar.notify_all();
    }
    idler.join().expect("idle waiter");
    result("mutex_wait_ns", waited_ns.load(Ordering::Relaxed));
}

/// Maps and unmaps memory in a loop (the kernel-lock marker): the process's mmap lock
/// (an rw-semaphore) is contended when many threads do it.
#[inline(never)]
pub fn kernel_lock_marker_mmap(stop: &AtomicBool) -> u64 {
    let mut maps = 0;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: an anonymous private mapping, touched and unmapped right away.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if ptr != libc::MAP_FAILED {
                ptr.cast::<u8>().write_volatile(1);
                libc::munmap(ptr, 1 << 20);
                maps += 1;
            }
        }
    }
    maps
}

/// `kernel-lock THREADS MS`: THREADS threads map and unmap memory for MS milliseconds.
pub fn kernel_lock(threads: usize, duration: Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name(format!("mapper-{i}"))
                .spawn(move || black_box(kernel_lock_marker_mmap(&stop)))
                .expect("spawn mapper")
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let maps: u64 = workers.into_iter().map(|w| w.join().expect("mapper")).sum();
    result("maps", maps);
}

/// Calls fsync (the slow-syscall marker for files), through `File::sync_all` so the
/// marker is not the direct caller of the frameless libc wrapper (frame-pointer unwinding
/// cannot see that caller).
#[inline(never)]
pub fn syscall_marker_fsync(file: &std::fs::File) -> Duration {
    let started = Instant::now();
    let _ = black_box(file.sync_all());
    started.elapsed()
}

/// One `clock_nanosleep` of `duration` (the slow-syscall marker of the sampled mode),
/// called directly so that the syscall is that one whatever the libc.
#[inline(never)]
pub fn syscall_marker_nanosleep(duration: Duration) -> Duration {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(duration.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(duration.subsec_nanos()),
    };
    let started = Instant::now();
    // SAFETY: a valid timespec for the request, no remainder wanted.
    unsafe {
        libc::syscall(
            libc::SYS_clock_nanosleep,
            libc::CLOCK_MONOTONIC,
            0,
            &raw const ts,
            std::ptr::null_mut::<libc::timespec>(),
        )
    };
    black_box(started.elapsed())
}

/// `fast` `getppid`s, then `slow` sleeps of `sleep` in `clock_nanosleep`, on one thread
/// of their own: reports the counts and the sleeps' total as the workload timed them.
pub fn syscall_sampling(fast: u64, slow: u64, sleep: Duration) {
    let worker = thread::Builder::new()
        .name("syscalls".into())
        .spawn(move || {
            for _ in 0..fast {
                // SAFETY: getppid takes no arguments and cannot fail.
                black_box(unsafe { libc::syscall(libc::SYS_getppid) });
            }
            (0..slow)
                .map(|_| syscall_marker_nanosleep(sleep).as_nanos())
                .sum::<u128>()
        })
        .expect("spawn syscalls");
    let slept = worker.join().expect("syscalls thread");
    result("getppid_count", fast);
    result("nanosleep_count", slow);
    result("nanosleep_ns", slept);
}

/// Reads from a pipe whose writer is slow (the slow-syscall marker for pipes).
#[inline(never)]
pub fn syscall_marker_pipe_read(reader: &mut std::fs::File) -> Duration {
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let _ = black_box(reader.read(&mut byte));
    started.elapsed()
}

/// `syscalls DIR N WRITER_MS`: N fsyncs of a file in DIR, then N reads on a pipe whose
/// writer waits `WRITER_MS` before each byte. Reports each measured duration.
pub fn syscalls(dir: &str, count: usize, writer_delay: Duration) {
    let path = std::path::Path::new(dir).join("stallscope-fsync.dat");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("open fsync file");
    let mut fsyncs = Vec::with_capacity(count);
    for i in 0..count {
        file.write_all(&[i as u8; 4096]).expect("write");
        fsyncs.push(syscall_marker_fsync(&file).as_nanos().to_string());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    result("fsync_ns", fsyncs.join(","));

    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two descriptors we own from here on.
    unsafe { libc::pipe(fds.as_mut_ptr()) };
    // SAFETY: fresh descriptors from pipe(2), each owned by exactly one File.
    let (mut reader, mut writer) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let writer_thread = thread::Builder::new()
        .name("slow-writer".into())
        .spawn(move || {
            for _ in 0..count {
                thread::sleep(writer_delay);
                let _ = writer.write_all(b"x");
            }
        })
        .expect("spawn writer");
    let reads: Vec<String> = (0..count)
        .map(|_| syscall_marker_pipe_read(&mut reader).as_nanos().to_string())
        .collect();
    writer_thread.join().expect("writer");
    result("pipe_read_ns", reads.join(","));
}

/// Burns CPU until `stop` is set (the run-queue marker).
#[inline(never)]
pub fn runqueue_marker_spin(stop: &AtomicBool) -> u64 {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..10_000 {
            x = black_box(x.rotate_left(5) ^ x.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }
    x
}

/// The calling thread's run-queue wait so far, by the kernel's own accounting
/// (`/proc/thread-self/schedstat`: time on CPU, time runnable but waiting, timeslices).
fn own_run_delay_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .expect("read /proc/thread-self/schedstat")
}

/// `runqueue THREADS MS`: THREADS CPU-bound threads pinned to CPU 0 for MS milliseconds,
/// and a control thread on CPU 1 that wakes every 10 ms and does a little work. Reports
/// the kernel's run-queue accounting of both (`pinned_run_delay_ns`,
/// `control_run_delay_ns`): the truth on a machine where other work shares the CPUs.
pub fn runqueue(threads: usize, duration: Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..threads)
        .map(|i| {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name(format!("pinned-{i}"))
                .spawn(move || {
                    pin_to_cpu(0);
                    let before = own_run_delay_ns();
                    black_box(runqueue_marker_spin(&stop));
                    own_run_delay_ns() - before
                })
                .expect("spawn spinner")
        })
        .collect();
    let control = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                pin_to_cpu(1);
                let before = own_run_delay_ns();
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(10));
                    black_box((0..1000u64).sum::<u64>());
                }
                own_run_delay_ns() - before
            })
            .expect("spawn control")
    };
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let pinned: u64 = spinners
        .into_iter()
        .map(|spinner| spinner.join().expect("spinner"))
        .sum();
    let control = control.join().expect("control");
    result("pinned_run_delay_ns", pinned);
    result("control_run_delay_ns", control);
}

/// Writes one block with direct I/O (the disk marker).
#[inline(never)]
pub fn disk_marker_write(file: &std::fs::File, buffer: &[u8], offset: u64) {
    use std::os::unix::fs::FileExt;
    let _ = black_box(file.write_at(buffer, offset));
}

/// `disk DEVICE N`: N direct-I/O writes of 4 KiB to a block device; reports their count
/// and the time the N write calls took in all (each contains its block request).
pub fn disk(device: &str, count: usize) {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .expect("open the device with O_DIRECT");
    // O_DIRECT needs an aligned buffer: take a 4 KiB-aligned slice of a bigger one.
    let raw = vec![0x5au8; 8192];
    let start = raw.as_ptr().align_offset(4096);
    let buffer = &raw[start..start + 4096];
    let mut writing = Duration::ZERO;
    for i in 0..count {
        let started = Instant::now();
        disk_marker_write(&file, buffer, (i as u64 % 256) * 4096);
        writing += started.elapsed();
    }
    result("disk_writes", count);
    result("disk_write_ns", writing.as_nanos());
}
