//! The ABI shared by the eBPF probes and the agent: map keys and values, enums encoded as
//! fixed-width integers, loss counters and the read-only probe configuration.
//!
//! Everything here is `#[repr(C)]`, fixed-width and free of implicit padding, so the kernel
//! side and the user side agree byte for byte; `layout.rs` checks that at compile time.
#![no_std]

mod config;
mod keys;
mod kinds;
mod layout;
mod loss;
mod net;
mod state;
mod unwind;

pub use config::*;
pub use keys::*;
pub use kinds::*;
pub use loss::*;
pub use net::*;
pub use state::*;
pub use unwind::*;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is `#[repr(C)]`, made of fixed-width integers with no
    // implicit padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::TotalKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TotalValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TotalCache {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SyscallSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackTrace {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TpThreadState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingWait {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DiskRequestKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DiskRequest {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Tuning {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Peer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnwindRow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnwindProcess {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_map_ipv4_into_ipv6_and_have_stable_ids() {
        // 10.1.2.3 as the kernel stores it: bytes 10, 1, 2, 3 in memory.
        let daddr = u32::from_le_bytes([10, 1, 2, 3]);
        let peer = Peer {
            addr: Peer::ipv4_mapped(daddr),
            remote_port: 8080,
            family: 4,
            direction: Direction::Client as u8,
            ..Peer::default()
        };
        assert_eq!(
            peer.address_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        let other = Peer {
            remote_port: 8081,
            ..peer
        };
        assert_ne!(peer.id(), other.id());
        assert_ne!(peer.id(), 0);
        assert_eq!(peer.id(), Peer { ..peer }.id());
    }

    #[test]
    fn connect_outcomes_from_socket_errors() {
        assert_eq!(
            ConnectOutcome::from_socket_error(111),
            ConnectOutcome::Refused
        );
        assert_eq!(
            ConnectOutcome::from_socket_error(110),
            ConnectOutcome::TimedOut
        );
        assert_eq!(
            ConnectOutcome::from_socket_error(113),
            ConnectOutcome::Failed
        );
        assert_eq!(
            ConnectOutcome::from_socket_error(0),
            ConnectOutcome::Aborted
        );
    }

    #[test]
    fn histogram_buckets() {
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(1), 0);
        assert_eq!(hist_bucket(2), 1);
        assert_eq!(hist_bucket(1023), 9);
        assert_eq!(hist_bucket(1024), 10);
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
    }

    #[test]
    fn syscall_slots_spread_and_convert() {
        // One process's syscalls, and one syscall of consecutive processes, spread over
        // the slots (a direct-mapped cache thrashes on collisions).
        let mut used = [false; SYSCALL_SLOTS as usize];
        for nr in 0..16 {
            let slot = syscall_slot(4242, nr);
            assert!(slot < SYSCALL_SLOTS);
            used[slot as usize] = true;
        }
        assert!(used.iter().filter(|&&u| u).count() >= 10);
        let mut used = [false; SYSCALL_SLOTS as usize];
        for tgid in 1000..1016 {
            used[syscall_slot(tgid, 0) as usize] = true;
        }
        assert!(used.iter().filter(|&&u| u).count() >= 10);

        let mut slot = SyscallSlot {
            tgid: 7,
            nr: 39,
            count: 2,
            ns: 300,
            max_ns: 200,
            bucket: SLOT_MIXED_BUCKETS,
            ..SyscallSlot::default()
        };
        slot.buckets[6] = 1;
        slot.buckets[7] = 1;
        let (key, value) = slot.total();
        assert_eq!(
            (key.tgid, key.tid, key.signal, key.aux),
            (7, 0, Signal::Syscall as u8, 39)
        );
        assert_eq!((value.count, value.ns, value.max_ns), (2, 300, 200));
        assert_eq!(value.buckets[6] + value.buckets[7], 2);
    }

    #[test]
    fn lock_kinds_from_contention_flags() {
        assert_eq!(LockKind::from_contention_flags(1), LockKind::Spin);
        assert_eq!(LockKind::from_contention_flags(1 | 2), LockKind::Spin);
        assert_eq!(LockKind::from_contention_flags(32), LockKind::Mutex);
        assert_eq!(LockKind::from_contention_flags(2), LockKind::RwsemRead);
        assert_eq!(LockKind::from_contention_flags(4), LockKind::RwsemWrite);
        assert_eq!(LockKind::from_contention_flags(8 | 32), LockKind::RtMutex);
        assert_eq!(
            LockKind::from_contention_flags(16 | 2),
            LockKind::PercpuRwsem
        );
    }

    #[test]
    fn disk_ops_and_fd_kinds() {
        assert_eq!(DiskOp::from_rwbs(b"WS\0\0"), DiskOp::Write);
        assert_eq!(DiskOp::from_rwbs(b"R"), DiskOp::Read);
        assert_eq!(DiskOp::from_rwbs(b"FWS"), DiskOp::Write);
        assert_eq!(DiskOp::from_rwbs(b"F"), DiskOp::Flush);
        assert_eq!(DiskOp::from_rwbs(b"DS"), DiskOp::Discard);
        assert_eq!(FdKind::from_mode(0o100_644), FdKind::File);
        assert_eq!(FdKind::from_mode(0o140_777), FdKind::Socket);
        assert_eq!(FdKind::from_mode(0o010_600), FdKind::Pipe);
        assert_eq!(FdKind::from_mode(0o020_666), FdKind::Other);
    }

    #[test]
    fn task_state_classification() {
        assert_eq!(OffCpuState::from_task_state(true, 1), OffCpuState::Runnable);
        assert_eq!(
            OffCpuState::from_task_state(false, 0),
            OffCpuState::Runnable
        );
        assert_eq!(
            OffCpuState::from_task_state(false, 1),
            OffCpuState::Interruptible
        );
        // TASK_KILLABLE = TASK_WAKEKILL | TASK_UNINTERRUPTIBLE
        assert_eq!(
            OffCpuState::from_task_state(false, 0x102),
            OffCpuState::Uninterruptible
        );
        // TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
        assert_eq!(
            OffCpuState::from_task_state(false, 0x402),
            OffCpuState::Idle
        );
        // __TASK_STOPPED
        assert_eq!(OffCpuState::from_task_state(false, 0x4), OffCpuState::Other);
    }

    #[test]
    fn reported_state_classification() {
        assert_eq!(OffCpuState::from_reported_state(0), OffCpuState::Runnable);
        assert_eq!(
            OffCpuState::from_reported_state(1),
            OffCpuState::Interruptible
        );
        assert_eq!(
            OffCpuState::from_reported_state(2),
            OffCpuState::Uninterruptible
        );
        assert_eq!(OffCpuState::from_reported_state(0x80), OffCpuState::Idle);
        assert_eq!(
            OffCpuState::from_reported_state(0x100),
            OffCpuState::Runnable
        );
        assert_eq!(OffCpuState::from_reported_state(0x4), OffCpuState::Other);
    }
}
