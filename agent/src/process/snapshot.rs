//! A snapshot of one process: its executable mappings (to normalize user addresses even
//! after it exits), its start time, names, cgroup identity, namespace pid, JIT perf map
//! and (only when enabled, redacted) command line. Environment variables are never read.

use std::{io, path::Path, sync::Arc, time::Instant};

use crate::process::{
    identity::{self, CgroupIdentity},
    kubernetes::PodNames,
    procfs::{self, Mapping, PerfMap},
};

/// What the agent knows about a process, as read at `taken`.
#[derive(Debug)]
pub struct ProcessSnapshot {
    pub pid: u32,
    /// Clock ticks after boot: tells this process from a later one with the same pid.
    pub start_ticks: u64,
    pub ns_pid: u32,
    pub comm: String,
    /// The executable's path in the process's mount namespace.
    pub exe: Option<String>,
    pub cgroup: CgroupIdentity,
    /// Namespace, pod and container, for a process in a pod (set after the read, from
    /// the pod log directories).
    pub kubernetes: Option<Arc<PodNames>>,
    /// Redacted command line, when collection is enabled.
    pub cmdline: Option<String>,
    /// Executable mappings, sorted by address.
    pub maps: Arc<[Mapping]>,
    /// Ranges of files mapped without execute permission (`procfs::AddressSpace`).
    pub file_data: Arc<[(u64, u64)]>,
    pub perf_map: Option<Arc<PerfMap>>,
    /// When the mappings were read (for an inherited snapshot: the parent's read).
    pub taken: Instant,
    /// Copied from the parent at fork rather than read: its mappings are the parent's
    /// as of `taken`, so an address they miss is no proof of a bad stack.
    pub inherited: bool,
}

impl ProcessSnapshot {
    /// The snapshot of `child`, forked (without exec) from the process of `self`: a fork
    /// copies the address space, names, cgroup and perf map, so nothing needs reading.
    /// `start_ticks` comes from the fork event.
    #[must_use]
    pub fn forked(&self, child: u32, start_ticks: u64) -> Self {
        Self {
            pid: child,
            start_ticks,
            // A child shares its parent's pid namespace (a fork into a new one execs).
            ns_pid: if self.ns_pid == self.pid { child } else { 0 },
            comm: self.comm.clone(),
            exe: self.exe.clone(),
            cgroup: self.cgroup.clone(),
            kubernetes: self.kubernetes.clone(),
            cmdline: self.cmdline.clone(),
            maps: Arc::clone(&self.maps),
            file_data: Arc::clone(&self.file_data),
            perf_map: self.perf_map.clone(),
            taken: self.taken,
            inherited: true,
        }
    }

    /// The mapping of the executable itself (its first one).
    pub fn exe_mapping(&self) -> Option<&Mapping> {
        let exe = self.exe.as_deref()?;
        self.maps.iter().find(|m| &*m.path == exe)
    }
}

const SMALL_FILE_LIMIT: u64 = 64 * 1024;

/// Reads a snapshot of `pid`. Blocks on the target (its mmap lock, its filesystems): run
/// it on a lane.
pub fn read_snapshot(pid: u32, collect_cmdline: bool) -> io::Result<ProcessSnapshot> {
    let dir = format!("/proc/{pid}");
    let dir = Path::new(&dir);
    let start_ticks = procfs::start_ticks(pid)?;
    let space = procfs::parse_maps(&procfs::read_small(&dir.join("maps"), 64 * 1024 * 1024)?)?;
    let maps: Arc<[Mapping]> = space.code.into();
    let comm = procfs::read_small(&dir.join("comm"), 256)
        .map(|c| String::from_utf8_lossy(&c).trim_end().to_owned())
        .unwrap_or_default();
    let exe = std::fs::read_link(dir.join("exe")).ok().map(|path| {
        let path = path.to_string_lossy().into_owned();
        path.strip_suffix(" (deleted)")
            .map_or(path.clone(), str::to_owned)
    });
    let cgroup = procfs::read_small(&dir.join("cgroup"), SMALL_FILE_LIMIT)
        .map(|text| identity::from_proc_cgroup(&String::from_utf8_lossy(&text)))
        .unwrap_or_default();
    let ns_pid = procfs::read_small(&dir.join("status"), SMALL_FILE_LIMIT)
        .ok()
        .and_then(|status| procfs::parse_ns_pid(&status))
        .unwrap_or(pid);
    let cmdline = if collect_cmdline {
        procfs::read_small(&dir.join("cmdline"), SMALL_FILE_LIMIT)
            .ok()
            .map(|raw| identity::cmdline_label(&procfs::parse_cmdline(&raw)))
    } else {
        None
    };
    // JIT code lives in anonymous executable memory; only then is a perf map worth reading.
    let perf_map = if maps.iter().any(|m| m.file.is_none() && m.path.is_empty()) {
        PerfMap::read(pid, ns_pid)
            .ok()
            .filter(|map| !map.is_empty())
            .map(Arc::new)
    } else {
        None
    };
    // The process may have been replaced by another with the same pid while we read.
    if procfs::start_ticks(pid)? != start_ticks {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "process replaced while being read",
        ));
    }
    Ok(ProcessSnapshot {
        pid,
        start_ticks,
        ns_pid,
        comm,
        exe,
        cgroup,
        kubernetes: None,
        cmdline,
        maps,
        file_data: space.file_data.into(),
        perf_map,
        taken: Instant::now(),
        inherited: false,
    })
}

/// Seconds since the epoch at boot (`btime` in `/proc/stat`) and clock ticks per second,
/// to turn start ticks into wall-clock time.
pub fn boot_clock() -> (i64, i64) {
    let btime = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    (btime, i64::from(hz as i32))
}

/// Clock ticks after boot (the unit of `start_ticks`) of `monotonic_ns`, a recent
/// `CLOCK_MONOTONIC` time such as a process event's timestamp: the kernel counts process
/// start times on the boot-time clock, which runs ahead of the monotonic one by the
/// time spent suspended.
pub fn boot_ticks_of_monotonic(monotonic_ns: u64) -> u64 {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec; the clocks exist on every supported kernel.
        unsafe { libc::clock_gettime(clock, &raw mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    let suspended = now(libc::CLOCK_BOOTTIME).saturating_sub(now(libc::CLOCK_MONOTONIC));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (monotonic_ns + suspended) / (1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_of_self() {
        let snapshot = read_snapshot(std::process::id(), true).expect("own snapshot");
        assert!(!snapshot.maps.is_empty());
        assert!(snapshot.exe_mapping().is_some(), "{:?}", snapshot.exe);
        assert!(snapshot.cmdline.is_some());
        assert_eq!(snapshot.ns_pid, std::process::id());
        let without = read_snapshot(std::process::id(), false).expect("own snapshot");
        assert!(without.cmdline.is_none());
    }

    #[test]
    fn a_forked_child_inherits_its_parents_snapshot() {
        let parent = read_snapshot(std::process::id(), false).expect("own snapshot");
        let child = parent.forked(4_000_000, 77);
        assert_eq!((child.pid, child.start_ticks), (4_000_000, 77));
        assert!(Arc::ptr_eq(&child.maps, &parent.maps));
        assert_eq!(
            (child.comm.as_str(), &child.exe),
            (parent.comm.as_str(), &parent.exe)
        );
        assert_eq!(child.taken, parent.taken);
        assert!(child.inherited && !parent.inherited);
    }

    #[test]
    fn boot_ticks_match_the_kernels_start_time() {
        // This process started at `start_ticks`; a monotonic time read now converts to at
        // least that, and to no more than the ticks elapsed since boot.
        let own = procfs::start_ticks(std::process::id()).expect("own stat");
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
        let now = boot_ticks_of_monotonic(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .expect("uptime")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("uptime seconds");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert!(now >= own, "{now} < {own}");
        assert!(
            (now as f64 - uptime * hz).abs() <= 2.0,
            "{now} vs uptime {uptime}"
        );
    }
}
