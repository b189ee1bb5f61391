//! Compile-time checks of the ABI's layouts: every struct the probes and the agent share
//! is exactly the sum of its fields (no implicit padding, whose bytes would be
//! uninitialized on one side and compared or hashed on the other), and the sizes the
//! design depends on (a 16-byte totals key) stay what they are. A change that breaks
//! either fails the build, on both sides.

use core::mem::size_of;

use crate::{
    DiskRequest, DiskRequestKey, HIST_BUCKETS, MAX_STACK_DEPTH, Peer, PendingWait, ProbeConfig,
    SampleKey, SampleValue, SocketInfo, StackTrace, SyscallSlot, ThreadState, TotalCache,
    TotalCacheEntry, TotalKey, TotalValue, TpThreadState, Tuning, UnwindMapping, UnwindProcess,
    UnwindRow,
};

/// Fails to compile if a struct's size is not the sum of its listed fields' sizes: it has
/// implicit padding, or a field is missing from the list.
macro_rules! assert_no_padding {
    ($($ty:ident { $($field:ident),* $(,)? })*) => {
        $(const _: () = {
            const fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
                size_of::<F>()
            }
            assert!(
                size_of::<$ty>() == 0 $(+ size_of_field(|value: &$ty| &value.$field))*,
                concat!(
                    "`", stringify!($ty),
                    "` has implicit padding (or a field missing here): make every byte a named field"
                )
            );
        };)*
    };
}

assert_no_padding! {
    TotalKey { tgid, tid, signal, class, detail, pad, aux }
    TotalValue { count, ns, tail_ns, max_ns, buckets }
    TotalCacheEntry { key, value }
    TotalCache { entries, next }
    SyscallSlot { tgid, nr, count, ns, max_ns, bucket, pad, buckets }
    SampleKey { tgid, tid, kstack, ustack, signal, class, flags, detail, aux, object }
    SampleValue { ns, count, est_ns, est_count_fp, tail_ns }
    StackTrace { len, flags, ips }
    ThreadState {
        off_since_ns, woken_ns, lock_since_ns, lock_addr, syscall_since_ns, futex_uaddr,
        file_lock_ino, socket_since_ns, tgid, tid, syscall_nr, syscall_epoch, socket_fd,
        socket_nr, file_lock_dev, file_lock_holder, state, flags, lock_kind, wait_hint,
        futex_kind, file_lock_kind, pad,
    }
    TpThreadState { off_since_ns, tgid, state, pad, kstack, ustack }
    PendingWait {
        wait_ns, tail_ns, est_ns, est_count_fp, user_ip, user_sp, futex_uaddr, lock_ns,
        lock_est_ns, tgid, pad32, lock_dev, lock_holder, state, flags, wait_hint, futex_kind,
        pad, kstack,
    }
    DiskRequestKey { dev, pad, sector }
    DiskRequest { start_ns, issue_ns, kstack, ustack, tgid, tid, op, flags, pad }
    ProbeConfig {
        syscall_slow_threshold_ns,
        socket_wait_min_ns, socket_stack_threshold_ns, tcp_rtt_interval_ns, target_tgid,
        signals, task_pid_offset, task_tgid_offset, task_flags_offset, task_rseq_offset,
        task_files_offset, files_fdt_offset, fdt_fd_offset, fdt_max_fds_offset,
        file_inode_offset, inode_mode_offset, tp_prev_state_offset, tp_next_pid_offset,
        tp_block_rwbs_offset, futex_nr, futex_wait_nr, futex_waitv_nr, exclude_tgid, owner, owner_pad, fd_walk,
        file_private_data_offset, socket_sk_offset, sk_daddr_offset, sk_dport_offset,
        sk_num_offset, sk_family_offset, sk_state_offset, sk_v6_daddr_offset, sk_err_offset,
        sk_protocol_offset, tcp_srtt_offset, sock_walk, ephemeral_port_lo, ephemeral_port_hi,
        listen_overflow_reason, flock_nr, fcntl_nr, file_lock_core_offset, flc_blocker_offset,
        flc_pid_offset, inode_ino_offset, inode_sb_offset, sb_dev_offset, file_lock_walk,
    }
    Tuning { offcpu_stack_threshold_ns, lock_stack_threshold_ns, syscall_sample_every, syscall_epoch }
    Peer { addr, remote_port, local_port, family, direction, flags, pad }
    SocketInfo { connect_start_ns, last_rtt_ns, kstack, ustack, tgid, tid, peer_id, direction, pad }
    UnwindRow { pc, cfa_offset, rbp_offset, cfa_kind, rbp_kind, pad }
    UnwindMapping { start, end, bias, first_row, rows }
    UnwindProcess { count, pad, mappings }
}

// The sizes the design counts on (the totals key is hashed on every context switch).
const _: () = assert!(size_of::<TotalKey>() == 16);
const _: () = assert!(size_of::<TotalValue>() == 8 * (4 + HIST_BUCKETS));
const _: () = assert!(size_of::<SampleKey>() == 56);
const _: () = assert!(size_of::<SampleValue>() == 40);
const _: () = assert!(size_of::<StackTrace>() == 8 + 8 * MAX_STACK_DEPTH);
const _: () = assert!(size_of::<ThreadState>() == 8 * 8 + 8 * 4 + 8);
const _: () = assert!(size_of::<TpThreadState>() == 32);
const _: () = assert!(size_of::<DiskRequestKey>() == 16);
const _: () = assert!(size_of::<DiskRequest>() == 48);
const _: () = assert!(size_of::<ProbeConfig>() == 4 * 8 + 46 * 4);
const _: () = assert!(size_of::<Tuning>() == 24);
const _: () = assert!(size_of::<Peer>() == 24);
const _: () = assert!(size_of::<SocketInfo>() == 48);
const _: () = assert!(size_of::<UnwindRow>() == 16);
const _: () = assert!(size_of::<UnwindMapping>() == 32);
