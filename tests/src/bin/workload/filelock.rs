//! File lock waits: threads that take a shared lock on a file (`flock` or an `fcntl`
//! record lock) that another process holds exclusively most of the time.

use std::{
    fs::{File, OpenOptions},
    io::BufRead,
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::waits::result;

/// How the lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Flock,
    Fcntl,
}

impl Mode {
    fn parse(text: &str) -> Self {
        if text == "fcntl" {
            Self::Fcntl
        } else {
            Self::Flock
        }
    }

    /// Takes the lock (shared or exclusive), blocking until it is granted.
    fn lock(self, file: &File, exclusive: bool) {
        let fd = file.as_raw_fd();
        match self {
            // SAFETY: flock(2) on a descriptor this function's caller owns.
            Self::Flock => unsafe {
                libc::flock(
                    fd,
                    if exclusive {
                        libc::LOCK_EX
                    } else {
                        libc::LOCK_SH
                    },
                );
            },
            Self::Fcntl => {
                let kind = if exclusive {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                };
                set_record_lock(fd, kind, libc::F_SETLKW);
            }
        }
    }

    fn unlock(self, file: &File) {
        let fd = file.as_raw_fd();
        match self {
            // SAFETY: flock(2) on a descriptor the caller owns.
            Self::Flock => unsafe {
                libc::flock(fd, libc::LOCK_UN);
            },
            Self::Fcntl => set_record_lock(fd, libc::F_UNLCK, libc::F_SETLK),
        }
    }
}

/// A whole-file `fcntl` record lock of `kind` (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`).
fn set_record_lock(fd: i32, kind: i32, command: i32) {
    // SAFETY: a zeroed flock struct is valid: whole file (start 0, length 0).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as i16;
    lock.l_whence = libc::SEEK_SET as i16;
    // SAFETY: fcntl(2) with a valid descriptor and a pointer to a live struct.
    unsafe { libc::fcntl(fd, command, &raw mut lock) };
}

fn open(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .expect("open the lock file")
}

/// Takes the shared lock; the file-lock marker, so stacks show where the wait is.
#[inline(never)]
fn file_lock_marker_wait(mode: Mode, file: &File) -> Duration {
    let started = Instant::now();
    mode.lock(file, false);
    started.elapsed()
}

/// `file-lock MODE THREADS ROUNDS HOLD_MS DIR`: a holder process (this program, started
/// as `file-lock-holder`) takes the file's exclusive lock for `HOLD_MS` at a time with 2 ms
/// breaks; `THREADS` threads each take the shared lock `ROUNDS` times, each on its own
/// open file. Reports the total time the threads waited inside the lock calls
/// (`file_lock_wait_ns`), the holder's pid and the file's inode.
pub fn file_lock(mode: &str, threads: usize, rounds: usize, hold: Duration, dir: &str) {
    let path = Path::new(dir).join("stallscope-file-lock");
    let file = open(&path);
    let exe = std::env::current_exe().expect("own executable");
    let mut holder = Command::new(exe)
        .arg("file-lock-holder")
        .arg(mode)
        .arg(hold.as_millis().to_string())
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the lock holder");
    // The holder says when it holds the lock for the first time.
    let mut line = String::new();
    let stdout = holder.stdout.take().expect("holder stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("holder ready");
    let mode = Mode::parse(mode);
    let waited_ns = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let path = path.clone();
            let waited_ns = Arc::clone(&waited_ns);
            thread::Builder::new()
                .name(format!("file-waiter-{i}"))
                .spawn(move || {
                    let file = open(&path);
                    for _ in 0..rounds {
                        let waited = file_lock_marker_wait(mode, &file);
                        waited_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
                        mode.unlock(&file);
                        thread::sleep(Duration::from_millis(1));
                    }
                })
                .expect("spawn waiter")
        })
        .collect();
    for worker in workers {
        worker.join().expect("waiter");
    }
    drop(holder.stdin.take());
    let _ = holder.wait();
    result("file_lock_wait_ns", waited_ns.load(Ordering::Relaxed));
    result("holder_pid", holder.id());
    result(
        "inode",
        std::os::unix::fs::MetadataExt::ino(&file.metadata().expect("stat")),
    );
    drop(file);
    let _ = std::fs::remove_file(&path);
}

/// `file-lock-holder MODE HOLD_MS PATH`: holds the file's exclusive lock `HOLD_MS` at a
/// time, with 2 ms breaks, until stdin closes.
pub fn holder(mode: &str, hold: Duration, path: &str) {
    let mode = Mode::parse(mode);
    let file = open(Path::new(path));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin()
                .lock()
                .read_line(&mut line)
                .is_ok_and(|n| n > 0)
            {
                line.clear();
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let mut first = true;
    while !done.load(Ordering::Relaxed) {
        mode.lock(&file, true);
        if first {
            println!("holding");
            first = false;
        }
        thread::sleep(hold);
        mode.unlock(&file);
        thread::sleep(Duration::from_millis(2));
    }
    let _ = watcher.join();
}
