//! One lab at a time on a machine: an exclusive `flock` on `/tmp/stallscope-lab.lock`
//! (two labs would disturb each other's measurements, and both would throttle, hog and
//! drop packets). Holding it, the lab also removes what an earlier lab left behind when
//! its process was killed before its `Drop` ran (network namespaces, cgroups, journal
//! disks and loop images named `stallscope-lab-PID...` whose PID no longer runs).

use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::lab::disk;

pub const LOCK_PATH: &str = "/tmp/stallscope-lab.lock";

/// The held lock; dropping it (or the process ending) releases it.
pub struct LabLock {
    _file: File,
}

fn try_flock(file: &File) -> bool {
    // SAFETY: flock(2) on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl LabLock {
    /// Takes the lock, waiting up to `wait` for a running lab to finish.
    pub fn acquire(wait: Duration) -> anyhow::Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_PATH)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        let deadline = Instant::now() + wait;
        let mut said = false;
        while !try_flock(&file) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let _ = file.rewind();
            if Instant::now() >= deadline {
                bail!(
                    "another stallscope lab is running (pid {}, holding {LOCK_PATH}): wait for it to finish",
                    holder.trim()
                );
            }
            if !said {
                eprintln!(
                    "lab: waiting for the stallscope lab of pid {} to finish",
                    holder.trim()
                );
                said = true;
            }
            thread::sleep(Duration::from_millis(200));
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        sweep_stale();
        Ok(Self { _file: file })
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The PID in a name `stallscope-lab-PID...`, if that process is gone.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("stallscope-lab-")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let pid: u32 = digits.parse().ok()?;
    (pid != std::process::id() && !alive(pid)).then_some(pid)
}

/// Removes leftovers of labs whose process is gone.
fn sweep_stale() {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale_pid(&name).is_some() {
                eprintln!("lab: removing network namespace {name} left by an earlier lab");
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &name])
                    .status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(disk::BLKIO_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale_pid(&name).is_some() {
                eprintln!("lab: removing cgroup {name} left by an earlier lab");
                disk::remove_cgroup(&entry.path());
            }
        }
    }
    for dir in ["/tmp", "/dev/shm"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale_pid(&name).is_none() {
                continue;
            }
            if name.ends_with("-journal") {
                eprintln!("lab: removing the journal disk {name} left by an earlier lab");
                disk::unmount(&entry.path());
            } else if Path::new(&name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("img"))
            {
                eprintln!("lab: removing loop image {name} left by an earlier lab");
                disk::detach_loops(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_dead_labs_are_stale() {
        assert_eq!(stale_pid("stallscope-lab-99999999999-c"), None); // not a pid
        assert_eq!(stale_pid("stallscope-lab-3999999-c"), Some(3_999_999));
        assert_eq!(
            stale_pid(&format!("stallscope-lab-{}-s", std::process::id())),
            None
        );
        assert_eq!(stale_pid("stallscope-peers-12-c"), None);
    }
}
