//! Least privilege: once the probes are loaded and attached (and the process-events
//! connector subscribed), the agent keeps only the capabilities reading other processes
//! still needs, in every one of its threads (capabilities are per thread: the sender
//! and the symbolization lanes already run), and drops the rest from the effective,
//! permitted, inheritable, ambient and (with `CAP_SETPCAP`) bounding sets, so neither
//! it nor anything it could execute gets them back.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use thiserror::Error;

/// A capability's number and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability(pub u32, pub &'static str);

pub const CAP_DAC_OVERRIDE: Capability = Capability(1, "CAP_DAC_OVERRIDE");
pub const CAP_DAC_READ_SEARCH: Capability = Capability(2, "CAP_DAC_READ_SEARCH");
pub const CAP_SETPCAP: Capability = Capability(8, "CAP_SETPCAP");
pub const CAP_SYS_PTRACE: Capability = Capability(19, "CAP_SYS_PTRACE");
pub const CAP_SYSLOG: Capability = Capability(34, "CAP_SYSLOG");
pub const CAP_CHECKPOINT_RESTORE: Capability = Capability(40, "CAP_CHECKPOINT_RESTORE");

/// What the running agent still needs once its probes are attached: reading other
/// processes' `/proc/PID/{maps,root,exe,...}` (`CAP_SYS_PTRACE`), their binaries
/// whatever their owner and mode (`CAP_DAC_READ_SEARCH`), deleted or namespaced
/// binaries through `/proc/PID/map_files` (`CAP_CHECKPOINT_RESTORE`), and kernel symbol
/// addresses in `/proc/kallsyms` (`CAP_SYSLOG`).
pub const RUN_KEEPS: [Capability; 4] = [
    CAP_SYS_PTRACE,
    CAP_DAC_READ_SEARCH,
    CAP_CHECKPOINT_RESTORE,
    CAP_SYSLOG,
];

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("reading the agent's capabilities: {0}")]
    Read(std::io::Error),
    #[error("dropping capabilities: {0}")]
    Drop(std::io::Error),
    #[error("threads {0} did not drop their capabilities within 2s")]
    Threads(String),
}

/// The capabilities of a thread, from its `/proc/.../status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub bounding: u64,
}

impl CapSets {
    /// The sets in a `/proc/PID/status` (or `/proc/PID/task/TID/status`) text.
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        };
        Some(Self {
            effective: field("CapEff:")?,
            permitted: field("CapPrm:")?,
            bounding: field("CapBnd:")?,
        })
    }

    fn of_task(path: &str) -> Result<Self, PrivilegeError> {
        let text = std::fs::read_to_string(path).map_err(PrivilegeError::Read)?;
        Self::parse(&text).ok_or_else(|| {
            PrivilegeError::Read(std::io::Error::other(format!("{path} has no CapEff")))
        })
    }
}

/// The names of the capabilities in `mask`, e.g. `CAP_SYS_PTRACE,CAP_SYSLOG`.
pub fn names(mask: u64) -> String {
    const NAMES: [&str; 41] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];
    let mut text = String::new();
    for bit in 0..64 {
        if mask & (1 << bit) != 0 {
            if !text.is_empty() {
                text.push(',');
            }
            match NAMES.get(bit) {
                Some(name) => text.push_str(name),
                None => {
                    let _ = write!(text, "cap_{bit}");
                }
            }
        }
    }
    if text.is_empty() {
        text.push_str("none");
    }
    text
}

/// The mask of `caps`.
pub fn mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |mask, cap| mask | 1 << cap.0)
}

/// The set every thread keeps (effective and permitted).
static TARGET_KEEP: AtomicU64 = AtomicU64::new(0);
/// Whether the bounding set is reduced too (the thread had `CAP_SETPCAP`).
static TARGET_BOUNDING: AtomicU64 = AtomicU64::new(0);
/// Threads that ran the handler.
static HANDLED: AtomicUsize = AtomicUsize::new(0);

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

/// Reduces the calling thread to `keep`; with `bounding`, drops everything else from
/// its bounding set first (which needs `CAP_SETPCAP`, dropped last). Only system calls:
/// it also runs in a signal handler.
fn reduce_this_thread(keep: u64, bounding: bool) -> libc::c_long {
    if bounding {
        for cap in 0..64u64 {
            if keep & (1 << cap) == 0 && cap != u64::from(CAP_SETPCAP.0) {
                // SAFETY: prctl with integer arguments; an unknown capability only fails.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            }
        }
        if keep & mask(&[CAP_SETPCAP]) == 0 {
            // SAFETY: as above.
            unsafe {
                libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    libc::c_ulong::from(CAP_SETPCAP.0),
                    0,
                    0,
                    0,
                )
            };
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = (keep & 0xffff_ffff) as u32;
    let high = (keep >> 32) as u32;
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: a v3 header and two data elements, as capset(2) expects for version 3.
    unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) }
}

extern "C" fn on_reduce_signal(_signal: libc::c_int) {
    let keep = TARGET_KEEP.load(Ordering::SeqCst);
    let bounding = TARGET_BOUNDING.load(Ordering::SeqCst) != 0;
    reduce_this_thread(keep, bounding);
    HANDLED.fetch_add(1, Ordering::SeqCst);
}

/// Which capabilities the agent kept and which it gave up.
#[derive(Debug, Clone, Copy)]
pub struct Reduced {
    pub kept: u64,
    pub dropped: u64,
    pub bounding_reduced: bool,
}

/// Keeps only `keep` (as far as the agent has them) in every thread of the process.
pub fn keep_only(keep: &[Capability]) -> Result<Reduced, PrivilegeError> {
    let before = CapSets::of_task("/proc/thread-self/status")?;
    let kept = before.permitted & mask(keep);
    let bounding = before.effective & mask(&[CAP_SETPCAP]) != 0;
    TARGET_KEEP.store(kept, Ordering::SeqCst);
    TARGET_BOUNDING.store(u64::from(bounding), Ordering::SeqCst);
    let signal = libc::SIGRTMIN();
    let handler: extern "C" fn(libc::c_int) = on_reduce_signal;
    // SAFETY: the handler only makes system calls and touches atomics
    // (async-signal-safe); SA_RESTART keeps interrupted calls going.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        if libc::sigaction(signal, &raw const action, std::ptr::null_mut()) != 0 {
            return Err(PrivilegeError::Drop(std::io::Error::last_os_error()));
        }
    }
    if reduce_this_thread(kept, bounding) != 0 {
        return Err(PrivilegeError::Drop(std::io::Error::last_os_error()));
    }
    // Other threads: signal each until its status shows the reduced sets; a thread
    // started meanwhile by a thread not yet reduced is found on the next pass.
    let deadline = Instant::now() + Duration::from_secs(2);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    loop {
        let mut pending = Vec::new();
        for tid in thread_ids()? {
            let Ok(sets) = CapSets::of_task(&format!("/proc/self/task/{tid}/status")) else {
                continue; // the thread ended
            };
            if sets.effective != kept || sets.permitted != kept {
                pending.push(tid);
            }
        }
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let list: Vec<String> = pending.iter().map(ToString::to_string).collect();
            return Err(PrivilegeError::Threads(list.join(",")));
        }
        for tid in pending {
            // SAFETY: tgkill to a thread of this process, with a handled signal.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = CapSets::of_task("/proc/thread-self/status")?;
    Ok(Reduced {
        kept: after.permitted,
        dropped: before.permitted & !after.permitted,
        bounding_reduced: bounding && after.bounding & !mask(keep) == 0,
    })
}

fn thread_ids() -> Result<Vec<libc::c_int>, PrivilegeError> {
    let entries = std::fs::read_dir("/proc/self/task").map_err(PrivilegeError::Read)?;
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect())
}

/// Drops what the attached probes no longer need, keeping [`RUN_KEEPS`] and `extra`,
/// and logs what it kept. A failure is logged, not fatal: the agent then runs with more
/// privilege than it needs, which the warning says.
pub fn drop_after_attach(extra: &[Capability]) {
    let mut keep = RUN_KEEPS.to_vec();
    keep.extend_from_slice(extra);
    match keep_only(&keep) {
        Ok(reduced) => tracing::info!(
            "capabilities: kept {} (reading other processes and their binaries, kernel symbols); dropped {}{}",
            names(reduced.kept),
            names(reduced.dropped),
            if reduced.bounding_reduced {
                "; bounding set reduced to the kept ones"
            } else {
                "; bounding set unchanged (no CAP_SETPCAP)"
            }
        ),
        Err(err) => tracing::warn!(
            "{err}: the agent keeps more privilege than it needs (kept capabilities may include CAP_BPF, CAP_PERFMON)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_names_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000010400080004\nCapEff:\t0000010400080004\nCapBnd:\t000001c400081104\n";
        let sets = CapSets::parse(status).expect("status has capabilities");
        assert_eq!(sets.effective, mask(&RUN_KEEPS));
        assert_eq!(
            names(sets.effective),
            "CAP_DAC_READ_SEARCH,CAP_SYS_PTRACE,CAP_SYSLOG,CAP_CHECKPOINT_RESTORE"
        );
        assert_eq!(names(0), "none");
        assert!(names(sets.bounding).contains("CAP_BPF"));
    }
}
