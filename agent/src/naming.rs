//! Names the agent gives to signals, classes and devices in profiles: label values and
//! pprof sample types.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use agent_common::{
    ConnectOutcome, Direction, DiskOp, FdKind, LockKind, OffCpuState, Peer, RunQueueKind, Signal,
    SocketOp, StackEnd, TcpEvent,
};
use stallscope_profile::SampleType;

pub const fn signal_label(signal: Signal) -> &'static str {
    match signal {
        Signal::OffCpu => "off-cpu",
        Signal::OnCpu => "on-cpu",
        Signal::RunQueue => "runqueue",
        Signal::Lock => "lock",
        Signal::Syscall => "syscall",
        Signal::Disk => "disk",
        Signal::Connect => "tcp-connect",
        Signal::SocketWait => "socket-wait",
        Signal::Tcp => "tcp",
    }
}

/// The pprof sample types of a signal: time and events.
pub fn sample_types(signal: Signal) -> [SampleType; 2] {
    let (time, events) = match signal {
        Signal::OffCpu => ("off_cpu", "off_cpu_events"),
        Signal::OnCpu => ("on_cpu", "on_cpu_samples"),
        Signal::RunQueue => ("runqueue", "runqueue_events"),
        Signal::Lock => ("lock_wait", "lock_waits"),
        Signal::Syscall => ("syscall", "syscalls"),
        Signal::Disk => ("disk_io", "disk_ios"),
        Signal::Connect => ("tcp_connect", "tcp_connects"),
        Signal::SocketWait => ("socket_wait", "socket_waits"),
        // The time column holds the smoothed-RTT samples (divide by their count for the
        // mean); the event column counts RTT samples, retransmits and listen overflows.
        Signal::Tcp => ("tcp_srtt", "tcp_events"),
    };
    [
        SampleType::new(time, "nanoseconds"),
        SampleType::new(events, "count"),
    ]
}

pub const fn state_label(state: OffCpuState) -> &'static str {
    match state {
        OffCpuState::Runnable => "runnable",
        OffCpuState::Interruptible => "interruptible",
        OffCpuState::Uninterruptible => "uninterruptible",
        OffCpuState::Idle => "idle",
        OffCpuState::Other => "other",
    }
}

pub const fn runqueue_label(kind: RunQueueKind) -> &'static str {
    match kind {
        RunQueueKind::Preempted => "preempted",
        RunQueueKind::Woken => "woken",
    }
}

pub const fn lock_kind_label(kind: LockKind) -> &'static str {
    match kind {
        LockKind::Spin => "spin",
        LockKind::Mutex => "mutex",
        LockKind::RwsemRead => "rwsem-read",
        LockKind::RwsemWrite => "rwsem-write",
        LockKind::RtMutex => "rt-mutex",
        LockKind::PercpuRwsem => "percpu-rwsem",
        LockKind::Futex => "futex",
        LockKind::FutexPi => "futex-pi",
        LockKind::Other => "other",
        LockKind::FileFlock => "file-flock",
        LockKind::FilePosix => "file-posix",
        LockKind::FileLease => "file-lease",
    }
}

pub const fn disk_op_label(op: DiskOp) -> &'static str {
    match op {
        DiskOp::Read => "read",
        DiskOp::Write => "write",
        DiskOp::Flush => "flush",
        DiskOp::Discard => "discard",
        DiskOp::Other => "other",
    }
}

pub const fn fd_kind_label(kind: FdKind) -> &'static str {
    match kind {
        FdKind::Unknown => "unknown",
        FdKind::File => "file",
        FdKind::Socket => "socket",
        FdKind::Pipe => "pipe",
        FdKind::Other => "other",
    }
}

pub const fn connect_outcome_label(outcome: ConnectOutcome) -> &'static str {
    match outcome {
        ConnectOutcome::Established => "established",
        ConnectOutcome::Refused => "refused",
        ConnectOutcome::TimedOut => "timed-out",
        ConnectOutcome::Failed => "failed",
        ConnectOutcome::Aborted => "aborted",
    }
}

pub const fn socket_op_label(op: SocketOp) -> &'static str {
    match op {
        SocketOp::None => "none",
        SocketOp::Receive => "receive",
        SocketOp::Send => "send",
        SocketOp::Poll => "poll",
        SocketOp::Connect => "connect",
    }
}

pub const fn tcp_event_label(event: TcpEvent) -> &'static str {
    match event {
        TcpEvent::Rtt => "rtt",
        TcpEvent::Retransmit => "retransmit",
        TcpEvent::ListenOverflow => "listen-overflow",
    }
}

/// How a table-driven user stack walk ended, as counted in a profile's losses.
pub const fn stack_end_label(end: StackEnd) -> &'static str {
    match end {
        StackEnd::FramePointerWalk => "frame_pointer_walk",
        StackEnd::EntryPoint => "entry_point",
        StackEnd::FramePointerEnd => "frame_pointer_end",
        StackEnd::NotCovered => "not_covered",
        StackEnd::Unsupported => "unsupported_rule",
        StackEnd::ReadFailed => "read_failed",
        StackEnd::DepthLimit => "depth_limit",
        StackEnd::NoRegisters => "no_registers",
    }
}

pub const fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::Unknown => "unknown",
        Direction::Client => "client",
        Direction::Server => "server",
    }
}

/// The name of a TCP state (`include/net/tcp_states.h`).
pub fn tcp_state_label(state: u8) -> String {
    const NAMES: [&str; 12] = [
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
        "NEW_SYN_RECV",
    ];
    state
        .checked_sub(1)
        .and_then(|index| NAMES.get(usize::from(index)))
        .map_or_else(|| format!("state_{state}"), |name| (*name).to_owned())
}

/// The peer's address as text: dotted IPv4 for IPv4 sockets and IPv4-mapped addresses,
/// IPv6 otherwise.
pub fn peer_address(peer: &Peer) -> String {
    let v6 = Ipv6Addr::from(peer.address_bytes());
    match v6.to_ipv4_mapped() {
        Some(v4) if peer.family == 4 || v4 != Ipv4Addr::UNSPECIFIED => v4.to_string(),
        _ => v6.to_string(),
    }
}

/// Labels of a peer: `peer` (address and, for a client connection, the service port),
/// `direction`, `local_port` (a server connection's own port; `ephemeral` for a client
/// connection) and `family`.
pub fn peer_labels(peer: &Peer) -> Vec<(&'static str, String)> {
    let address = peer_address(peer);
    let direction = Direction::from_u8(peer.direction).unwrap_or(Direction::Unknown);
    let bracketed = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.clone()
    };
    let (peer_label, local_port) = match direction {
        Direction::Client => (
            format!("{bracketed}:{}", peer.remote_port),
            "ephemeral".to_owned(),
        ),
        _ if peer.addr == [0, 0] => ("*".to_owned(), peer.local_port.to_string()),
        _ => (address, peer.local_port.to_string()),
    };
    vec![
        ("peer", peer_label),
        ("direction", direction_label(direction).to_owned()),
        ("local_port", local_port),
        ("family", format!("ipv{}", peer.family)),
    ]
}

/// `MAJOR:MINOR` of a kernel `dev_t` as the block tracepoints report it.
pub const fn dev_numbers(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0x000f_ffff)
}

/// The device's name (`loop0`, `nvme0n1`), or `MAJOR:MINOR` when sysfs does not say.
pub fn device_name(dev: u32) -> String {
    let (major, minor) = dev_numbers(dev);
    let uevent = Path::new("/sys/dev/block")
        .join(format!("{major}:{minor}"))
        .join("uevent");
    std::fs::read_to_string(uevent)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("DEVNAME=").map(str::to_owned))
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_follow_the_kernel_encoding() {
        assert_eq!(dev_numbers((7 << 20) | 3), (7, 3));
        assert_eq!(dev_numbers((259 << 20) | 1), (259, 1));
    }

    #[test]
    fn peers_read_as_addresses_and_ports() {
        let client = Peer {
            addr: Peer::ipv4_mapped(u32::from_le_bytes([10, 0, 0, 2])),
            remote_port: 8080,
            family: 4,
            direction: Direction::Client as u8,
            ..Peer::default()
        };
        let labels = peer_labels(&client);
        assert_eq!(labels[0], ("peer", "10.0.0.2:8080".to_owned()));
        assert_eq!(labels[1], ("direction", "client".to_owned()));
        let v6 = Peer {
            addr: [0, 0],
            family: 6,
            ..client
        };
        assert_eq!(peer_labels(&v6)[0], ("peer", "[::]:8080".to_owned()));
        let mut bytes = [0u8; 16];
        bytes[..2].copy_from_slice(&[0xfd, 0x00]);
        bytes[15] = 2;
        let server = Peer {
            addr: [
                u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")),
            ],
            remote_port: 0,
            local_port: 9000,
            family: 6,
            direction: Direction::Server as u8,
            ..Peer::default()
        };
        let labels = peer_labels(&server);
        assert_eq!(labels[0], ("peer", "fd00::2".to_owned()));
        assert_eq!(labels[2], ("local_port", "9000".to_owned()));
        assert_eq!(tcp_state_label(2), "SYN_SENT");
        assert_eq!(tcp_state_label(99), "state_99");
    }

    #[test]
    fn every_signal_has_distinct_sample_types() {
        let mut kinds: Vec<String> = Signal::ALL
            .iter()
            .flat_map(|&s| sample_types(s))
            .map(|t| t.kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        assert_eq!(kinds.len(), Signal::ALL.len() * 2);
    }
}
