//! New processes, as they start: the kernel's process-events connector (netlink) reports
//! every fork, exec and exit. A process is read shortly after its exec (once the dynamic
//! loader has mapped its libraries) and again a little later, so a process that lives
//! less than a drain interval is still symbolized after it exits. A fork without exec is
//! not read at all: the child inherits its parent's snapshot (the resolver, told through
//! [`ProcessListener`], does that), which
//! keeps a host that forks hundreds of workers a second from costing hundreds of
//! `/proc/PID/maps` reads. Without the connector (no `CAP_NET_ADMIN`, a kernel without
//! it) processes are read at first sight in a drain.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::process::snapshot;

/// Who hears of processes as they start and end (the resolver): fork, exec and exit as
/// they happen, and when a process should be read.
pub trait ProcessListener: Send + Sync {
    /// Process `parent` forked `child`, started at `start_ticks` (boot clock ticks).
    fn forked(&self, parent: u32, child: u32, start_ticks: u64);
    /// Process `pid` replaced its image.
    fn execed(&self, pid: u32);
    /// Process `pid` exited.
    fn exited(&self, pid: u32);
    /// Process `pid` should be read now (a while after its exec).
    fn read(&self, pid: u32);
}

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// Size of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// Size of `struct cn_msg` before its payload.
const CN_MSG_LEN: usize = 20;
/// Offset of `timestamp_ns` in `struct proc_event` (after what and cpu).
const TIMESTAMP: usize = 8;
/// Offset of `event_data` in `struct proc_event` (what, cpu, aligned timestamp).
const EVENT_DATA: usize = 16;

/// After an exec, when to read the process: once the loader is done, and once more for
/// libraries loaded at start-up.
const EXEC_READS: [Duration; 2] = [Duration::from_millis(20), Duration::from_millis(300)];

/// A process event from the connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// A new process (not a thread) of process `parent`, at `timestamp_ns`
    /// (`CLOCK_MONOTONIC`).
    Fork {
        pid: u32,
        parent: u32,
        timestamp_ns: u64,
    },
    Exec {
        pid: u32,
    },
    /// A process (its last thread) exited.
    Exit {
        pid: u32,
    },
}

/// Parses the events of one netlink datagram.
pub fn parse_events(datagram: &[u8]) -> Vec<ProcEvent> {
    let u32_at = |buf: &[u8], at: usize| -> Option<u32> {
        buf.get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |buf: &[u8], at: usize| -> Option<u64> {
        buf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let mut events = Vec::new();
    let mut offset = 0;
    while let Some(len) = u32_at(datagram, offset) {
        let len = len as usize;
        if len < NLMSG_HDRLEN || offset + len > datagram.len() {
            break;
        }
        let message = &datagram[offset..offset + len];
        let event = NLMSG_HDRLEN + CN_MSG_LEN;
        let data = event + EVENT_DATA;
        let what = u32_at(message, event);
        let first = u32_at(message, data);
        let second = u32_at(message, data + 4);
        let event = match (what, first, second) {
            (Some(PROC_EVENT_FORK), Some(_parent), Some(parent_tgid)) => {
                match (
                    u32_at(message, data + 8),
                    u32_at(message, data + 12),
                    u64_at(message, event + TIMESTAMP),
                ) {
                    (Some(child), Some(child_tgid), Some(timestamp_ns)) if child == child_tgid => {
                        Some(ProcEvent::Fork {
                            pid: child,
                            parent: parent_tgid,
                            timestamp_ns,
                        })
                    }
                    _ => None,
                }
            }
            (Some(PROC_EVENT_EXEC), Some(_), Some(tgid)) => Some(ProcEvent::Exec { pid: tgid }),
            (Some(PROC_EVENT_EXIT), Some(pid), Some(tgid)) if pid == tgid => {
                Some(ProcEvent::Exit { pid: tgid })
            }
            _ => None,
        };
        events.extend(event);
        // Messages are 4-byte aligned.
        offset += (len + 3) & !3;
    }
    events
}

/// Watches process events until dropped.
pub struct ProcWatcher {
    stop: Arc<AtomicBool>,
}

impl Drop for ProcWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_CONNECTOR,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid.
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    address.nl_groups = CN_IDX_PROC;
    // SAFETY: `address` is a valid sockaddr_nl of the given size.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 10_000,
    };
    // SAFETY: `timeout` is a valid timeval of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    // nlmsghdr, cn_msg { id { idx, val }, seq, ack, len, flags }, then the listen op.
    let total = NLMSG_HDRLEN + CN_MSG_LEN + 4;
    let mut message = Vec::with_capacity(total);
    message.extend_from_slice(&(total as u32).to_ne_bytes());
    message.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    message.extend_from_slice(&0u16.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&std::process::id().to_ne_bytes());
    message.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    message.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&4u16.to_ne_bytes());
    message.extend_from_slice(&0u16.to_ne_bytes());
    message.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Starts watching; `target` limits the reads to one process. `None` (logged) if the
/// connector is unavailable.
pub fn watch(listener: Arc<dyn ProcessListener>, target: Option<u32>) -> Option<ProcWatcher> {
    let socket = match subscribe() {
        Ok(socket) => socket,
        Err(err) => {
            tracing::info!(
                "process events unavailable ({err}): processes are read when first seen in a drain, so very short-lived ones may stay unsymbolized"
            );
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let spawned = thread::Builder::new()
        .name("proc-events".into())
        .spawn(move || run(&socket, listener.as_ref(), target, &stopped));
    spawned.ok().map(|_| ProcWatcher { stop })
}

fn run(socket: &OwnedFd, listener: &dyn ProcessListener, target: Option<u32>, stop: &AtomicBool) {
    let mut due: BinaryHeap<Reverse<(Instant, u32)>> = BinaryHeap::new();
    let mut buffer = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: the buffer is valid for its length.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received > 0 {
            let now = Instant::now();
            for event in parse_events(&buffer[..received as usize]) {
                match event {
                    ProcEvent::Exec { pid } if target.is_none_or(|t| t == pid) => {
                        listener.execed(pid);
                        due.extend(EXEC_READS.iter().map(|d| Reverse((now + *d, pid))));
                    }
                    ProcEvent::Fork {
                        pid,
                        parent,
                        timestamp_ns,
                    } if target.is_none() => {
                        listener.forked(
                            parent,
                            pid,
                            snapshot::boot_ticks_of_monotonic(timestamp_ns),
                        );
                    }
                    ProcEvent::Exit { pid } if target.is_none_or(|t| t == pid) => {
                        listener.exited(pid);
                    }
                    _ => {}
                }
            }
        } else if received < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOBUFS) {
                // The kernel dropped events for this socket: a process whose exec was
                // among them keeps its pre-exec snapshot until a stack it does not cover
                // has it read again (if it is still alive).
                tracing::warn!(
                    "process events overflowed: some forks and execs were missed; short-lived processes among them may stay unsymbolized"
                );
            }
            if !matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) && err.raw_os_error() != Some(libc::ENOBUFS)
            {
                tracing::warn!("process events stopped: {err}");
                return;
            }
        }
        let now = Instant::now();
        while let Some(Reverse((when, pid))) = due.peek().copied() {
            if when > now {
                break;
            }
            due.pop();
            listener.read(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, data: [u32; 4]) -> Vec<u8> {
        let mut bytes = vec![0u8; NLMSG_HDRLEN + CN_MSG_LEN + EVENT_DATA + 16];
        let len = bytes.len() as u32;
        bytes[..4].copy_from_slice(&len.to_ne_bytes());
        let event = NLMSG_HDRLEN + CN_MSG_LEN;
        bytes[event..event + 4].copy_from_slice(&what.to_ne_bytes());
        let timestamp = 1_000_000_000u64 + u64::from(data[2]);
        bytes[event + TIMESTAMP..event + EVENT_DATA].copy_from_slice(&timestamp.to_ne_bytes());
        for (i, value) in data.iter().enumerate() {
            let at = event + EVENT_DATA + 4 * i;
            bytes[at..at + 4].copy_from_slice(&value.to_ne_bytes());
        }
        bytes
    }

    #[test]
    fn parses_fork_exec_exit() {
        let mut datagram = message(PROC_EVENT_FORK, [1, 1, 50, 50]);
        datagram.extend(message(PROC_EVENT_FORK, [50, 50, 51, 50]));
        datagram.extend(message(PROC_EVENT_EXEC, [50, 50, 0, 0]));
        datagram.extend(message(PROC_EVENT_EXIT, [51, 50, 0, 0]));
        datagram.extend(message(PROC_EVENT_EXIT, [50, 50, 0, 0]));
        assert_eq!(
            parse_events(&datagram),
            vec![
                ProcEvent::Fork {
                    pid: 50,
                    parent: 1,
                    timestamp_ns: 1_000_000_050
                },
                ProcEvent::Exec { pid: 50 },
                ProcEvent::Exit { pid: 50 }
            ]
        );
        assert!(parse_events(&[1, 2, 3]).is_empty());
    }
}
