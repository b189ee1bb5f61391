//! The service's journal disk and the disk-stall injection: an ext4 file system on a
//! RAM-backed block device of the lab's own, and a cgroup (v1 `blkio`) of the lab's own
//! that the service joins. A stall limits the device's write IOPS for that cgroup to 1
//! (`blkio.throttle.write_iops_device`) for a few hundred milliseconds, again and again:
//! the service's writes wait in the block layer until the stall ends, so `fdatasync`s
//! that arrive during a stall take up to its length, while nothing else on the host is
//! touched. (A lasting IOPS limit above the demand delays few writes, and one below it
//! makes a queue that grows until the injection ends; periodic stalls give a steady,
//! known degradation.)
//!
//! The device is a zram device (`/sys/class/zram-control/hot_add`, RAM-backed): it
//! completes each write in the writing thread, so healthy `fdatasync`s take about 10 us
//! and depend neither on the machine's disk nor on CPU contention. Loop devices hand
//! requests to kernel worker threads (with direct I/O only when the inline attempt
//! fails, which concurrent writers make common), so under the CPU-hungry neighbour the
//! service's disk wait rose tenfold and a CPU injection leaked into disk time; a loop
//! device over a file in `/dev/shm` is only the fallback when zram is missing. The price:
//! zram is bio-based, and stallscope's disk signal reads the block layer's request
//! tracepoints, which bio-based devices never reach, so the agent sees the stall as
//! off-CPU disk time in `fdatasync` (and in the syscall signal) but not the device. The
//! file system has no jbd2 journal: jbd2 commits run in a kernel thread outside the
//! service's cgroup and serialize every file's `fdatasync`; without it, each write of an
//! `fdatasync` (the data block and the inode) is issued by the calling thread and
//! throttled in its cgroup. (The bytes-per-second limit does not slow such small writes;
//! the IOPS limit does.)
//!
//! Everything is named after the lab's pid and removed on drop, in reverse order: the
//! throttle, the cgroup (its processes moved back to the root first), the mount, the
//! device (and the loop fallback's backing file).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The v1 blkio hierarchy this kernel mounts (hybrid cgroups).
pub const BLKIO_ROOT: &str = "/sys/fs/cgroup/blkio";
const ZRAM_CONTROL: &str = "/sys/class/zram-control";
const DEVICE_BYTES: u64 = 128 << 20;

pub struct JournalDisk {
    /// `/dev/zramN` (or `/dev/loopN`).
    pub device: String,
    /// `zramN`, as the kernel names it.
    pub name: String,
    /// `MAJOR:MINOR`.
    pub major_minor: String,
    /// Where the file system is mounted.
    pub mount: PathBuf,
    /// The cgroup the service joins (`--cgroup`).
    pub cgroup: PathBuf,
    /// The zram device's number, or the loop device's backing file, once made.
    zram: Option<u32>,
    image: Option<PathBuf>,
    mounted: bool,
    cgroup_made: bool,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("running {program} (is it installed? `cargo xtask test` installs it)")
    })?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The names a lab with process id `pid` gives what it creates: the mount point, the
/// cgroup, and the loop fallback's backing file.
pub fn names(pid: u32) -> (PathBuf, PathBuf, PathBuf) {
    (
        PathBuf::from(format!("/tmp/stallscope-lab-{pid}-journal")),
        Path::new(BLKIO_ROOT).join(format!("stallscope-lab-{pid}")),
        PathBuf::from(format!("/dev/shm/stallscope-lab-{pid}.img")),
    )
}

impl JournalDisk {
    /// Creates the device, the file system, its mount and the cgroup.
    pub fn create() -> anyhow::Result<Self> {
        if !Path::new(BLKIO_ROOT)
            .join("blkio.throttle.write_iops_device")
            .exists()
        {
            bail!(
                "{BLKIO_ROOT} has no blkio.throttle.write_iops_device: the disk injection needs cgroup v1 blkio throttling"
            );
        }
        let (mount, cgroup, image) = names(std::process::id());
        let mut disk = Self {
            device: String::new(),
            name: String::new(),
            major_minor: String::new(),
            mount,
            cgroup,
            zram: None,
            image: None,
            mounted: false,
            cgroup_made: false,
        };
        // From here on, `Drop` removes whatever was made.
        if Path::new(ZRAM_CONTROL).join("hot_add").exists() {
            let number: u32 = std::fs::read_to_string(Path::new(ZRAM_CONTROL).join("hot_add"))
                .context("adding a zram device")?
                .trim()
                .parse()
                .context("zram's hot_add answered no device number")?;
            disk.zram = Some(number);
            disk.name = format!("zram{number}");
            std::fs::write(
                format!("/sys/block/{}/disksize", disk.name),
                DEVICE_BYTES.to_string(),
            )
            .with_context(|| format!("sizing {}", disk.name))?;
            disk.device = format!("/dev/{}", disk.name);
        } else {
            eprintln!(
                "lab: no {ZRAM_CONTROL}: the journal goes on a loop device, whose fdatasyncs CPU contention slows"
            );
            let file = std::fs::File::create(&image)
                .with_context(|| format!("creating {}", image.display()))?;
            file.set_len(DEVICE_BYTES)?;
            drop(file);
            disk.image = Some(image.clone());
            let image_arg = image.to_string_lossy().into_owned();
            disk.device = run(
                "losetup",
                &["--find", "--show", "--direct-io=on", &image_arg],
            )
            .or_else(|_| run("losetup", &["--find", "--show", &image_arg]))?;
            disk.name = disk
                .device
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
        }
        std::fs::read_to_string(format!("/sys/block/{}/dev", disk.name))
            .with_context(|| format!("reading the device number of {}", disk.device))?
            .trim()
            .clone_into(&mut disk.major_minor);
        // No jbd2 journal (see the module documentation).
        run(
            "mkfs.ext4",
            &["-q", "-F", "-O", "^has_journal", &disk.device],
        )?;
        std::fs::create_dir_all(&disk.mount)?;
        run("mount", &[&disk.device, &disk.mount.to_string_lossy()])?;
        disk.mounted = true;
        std::fs::create_dir(&disk.cgroup)
            .with_context(|| format!("creating cgroup {}", disk.cgroup.display()))?;
        disk.cgroup_made = true;
        Ok(disk)
    }

    /// Limits the service cgroup's writes to the device to `iops` per second (0: no
    /// limit).
    pub fn throttle_writes(&self, iops: u32) -> anyhow::Result<()> {
        let file = self.cgroup.join("blkio.throttle.write_iops_device");
        std::fs::write(&file, format!("{} {iops}", self.major_minor))
            .with_context(|| format!("writing {}", file.display()))
    }

    /// Starts stalling the device for the service's cgroup: for `stall` out of every
    /// `period` its write limit is 1 IOPS (a write that arrives waits until the stall
    /// ends), the rest of the time there is none. The first stall starts at once.
    pub fn start_stalls(&self, stall: Duration, period: Duration) -> anyhow::Result<Stalls> {
        let file = self.cgroup.join("blkio.throttle.write_iops_device");
        let device = self.major_minor.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("lab-disk-stall".into())
                .spawn(move || {
                    let started = Instant::now();
                    let mut cycle = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let cycle_start = started + period * cycle;
                        let _ = std::fs::write(&file, format!("{device} 1"));
                        sleep_until(cycle_start + stall, &stop);
                        let _ = std::fs::write(&file, format!("{device} 0"));
                        cycle += 1;
                        sleep_until(started + period * cycle, &stop);
                    }
                    let _ = std::fs::write(&file, format!("{device} 0"));
                })?
        };
        Ok(Stalls {
            stop,
            thread: Some(thread),
        })
    }

    /// The write requests the service cgroup issued to the device so far.
    pub fn writes_issued(&self) -> u64 {
        let text = std::fs::read_to_string(self.cgroup.join("blkio.throttle.io_serviced"))
            .unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(self.major_minor.as_str()) && words.next() == Some("Write"))
                    .then(|| words.next().and_then(|n| n.parse::<u64>().ok()))
                    .flatten()
            })
            .sum()
    }
}

/// Sleeps until `deadline`, waking early when `stop` is set.
fn sleep_until(deadline: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::Relaxed) {
            return;
        }
        thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// Stalls in progress ([`JournalDisk::start_stalls`]); ending them lifts the limit.
pub struct Stalls {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Stalls {
    /// Stops stalling; returns once the device takes writes freely again.
    pub fn end(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Stalls {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Moves every process of `cgroup` to the hierarchy's root and removes it.
pub fn remove_cgroup(cgroup: &Path) {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.split_whitespace() {
        let _ = std::fs::write(Path::new(BLKIO_ROOT).join("cgroup.procs"), pid);
    }
    let _ = std::fs::remove_dir(cgroup);
}

/// Removes zram device `number` (never `zram0`, which the system may use).
fn remove_zram(number: u32) {
    if number != 0 {
        let _ = std::fs::write(
            Path::new(ZRAM_CONTROL).join("hot_remove"),
            number.to_string(),
        );
    }
}

/// Unmounts `mount` (lazily if it is still busy), removes the zram device that was
/// mounted there, if any, and the mount point.
pub fn unmount(mount: &Path) {
    let target = mount.to_string_lossy();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let zram = mounts.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let device = words.next()?;
        (words.next() == Some(target.as_ref()))
            .then(|| device.strip_prefix("/dev/zram")?.parse::<u32>().ok())
            .flatten()
    });
    if run("umount", &[&target]).is_err() {
        let _ = run("umount", &["-l", &target]);
    }
    if let Some(number) = zram {
        remove_zram(number);
    }
    let _ = std::fs::remove_dir(mount);
}

/// Detaches every loop device backed by `image`, and removes the file.
pub fn detach_loops(image: &Path) {
    let image_arg = image.to_string_lossy().into_owned();
    if let Ok(devices) = run(
        "losetup",
        &["--noheadings", "--output", "NAME", "-j", &image_arg],
    ) {
        for device in devices.lines().map(str::trim).filter(|d| !d.is_empty()) {
            let _ = run("losetup", &["-d", device]);
        }
    }
    let _ = std::fs::remove_file(image);
}

impl Drop for JournalDisk {
    fn drop(&mut self) {
        if self.cgroup_made {
            let _ = self.throttle_writes(0);
            remove_cgroup(&self.cgroup);
        }
        if self.mounted {
            if run("umount", &[&self.mount.to_string_lossy()]).is_err() {
                // Still busy (a process that did not exit yet): detach it lazily.
                let _ = run("umount", &["-l", &self.mount.to_string_lossy()]);
            }
            let _ = std::fs::remove_dir(&self.mount);
        }
        if let Some(number) = self.zram.take() {
            remove_zram(number);
        }
        if let Some(image) = self.image.take() {
            detach_loops(&image);
        }
    }
}
