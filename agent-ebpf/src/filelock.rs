//! File locks (`flock`, `fcntl` record locks, leases), from the kernel's `filelock`
//! tracepoints (BTF): they say when a lock request is deferred (the thread is about to
//! wait for another holder), on which inode, and behind whom. The wait itself is measured
//! by the scheduler programs like a futex wait (`sched_btf.rs`): a thread switched out
//! with a deferred request, inside the syscall that waits for it, waits for that file
//! lock. These programs only keep the thread's note of it current.

use agent_common::{LockKind, Signal};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{config, owns, wanted},
    threads::{current_task, thread_of, thread_or_create},
};

/// `FILE_LOCK_DEFERRED`: the request conflicts and the caller will wait.
const FILE_LOCK_DEFERRED: i32 = 1;

/// Reads a kernel value at `base + offset` (zero if the read fails).
#[inline(always)]
fn read_at<T: Default>(base: u64, offset: u32) -> T {
    if base == 0 {
        return T::default();
    }
    // SAFETY: a fault-tolerant read of a kernel object.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.unwrap_or_default()
}

/// Notes a deferred request of the current thread (the wait that follows is a file lock
/// wait), or forgets it when the attempt got the lock or gave up.
#[inline(always)]
fn note_request(ctx: &BtfTracePointContext, kind: LockKind, inode: u64, request: u64, ret: i32) {
    if !wanted((bpf_get_current_pid_tgid() >> 32) as u32) {
        return;
    }
    if ret != FILE_LOCK_DEFERRED {
        if let Some(thread) = thread_of(current_task()) {
            thread.file_lock_kind = 0;
        }
        return;
    }
    if config!(file_lock_walk) == 0 {
        return;
    }
    let Some(thread) = thread_or_create(ctx, Signal::Lock, current_task(), true) else {
        return;
    };
    thread.file_lock_kind = kind as u8;
    thread.file_lock_ino = read_at::<u64>(inode, config!(inode_ino_offset));
    let sb = read_at::<u64>(inode, config!(inode_sb_offset));
    thread.file_lock_dev = read_at::<u32>(sb, config!(sb_dev_offset));
    // The request waits behind `flc_blocker`: the lock holding it up (or a request queued
    // ahead of it that conflicts), whose `flc_pid` is its owner's process. Open file
    // description locks belong to no process (`flc_pid` -1): unknown.
    thread.file_lock_holder = if request == 0 {
        0
    } else {
        let core = request + u64::from(config!(file_lock_core_offset));
        let blocker = read_at::<u64>(core, config!(flc_blocker_offset));
        let pid = read_at::<i32>(blocker, config!(flc_pid_offset));
        if pid > 0 { pid as u32 } else { 0 }
    };
}

/// `flock_lock_inode(struct inode *inode, struct file_lock *fl, int ret)`.
#[btf_tracepoint(function = "flock_lock_inode")]
pub fn flock_lock_inode_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let inode: u64 = ctx.arg(0);
    let request: u64 = ctx.arg(1);
    let ret: i64 = ctx.arg(2);
    note_request(&ctx, LockKind::FileFlock, inode, request, ret as i32);
    0
}

/// `posix_lock_inode(struct inode *inode, struct file_lock *fl, int ret)`.
#[btf_tracepoint(function = "posix_lock_inode")]
pub fn posix_lock_inode_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let inode: u64 = ctx.arg(0);
    let request: u64 = ctx.arg(1);
    let ret: i64 = ctx.arg(2);
    note_request(&ctx, LockKind::FilePosix, inode, request, ret as i32);
    0
}

/// `break_lease_block(struct inode *inode, struct file_lease *fl)`: an open or truncate
/// waits for a lease holder to give up its lease (the holder is not in the request).
#[btf_tracepoint(function = "break_lease_block")]
pub fn break_lease_block_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let inode: u64 = ctx.arg(0);
    note_request(&ctx, LockKind::FileLease, inode, 0, FILE_LOCK_DEFERRED);
    0
}

/// `break_lease_unblock(struct inode *inode, struct file_lease *fl)`: the wait is over.
#[btf_tracepoint(function = "break_lease_unblock")]
pub fn break_lease_unblock_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let inode: u64 = ctx.arg(0);
    note_request(&ctx, LockKind::FileLease, inode, 0, 0);
    0
}
