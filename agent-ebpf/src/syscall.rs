//! Syscall latency: every syscall of every (wanted) thread, from `sys_enter` to `sys_exit`
//! (BTF raw tracepoints), into per-(process, syscall) totals and log2 histograms. Syscalls
//! at or above the slow threshold also get the user stack (taken at exit, in the thread's
//! own context, where the user registers are the syscall's) and, for syscalls whose first
//! argument is a file descriptor, the kind of file it refers to.
//!
//! The same two programs serve the network signal's socket waits (`net.rs`): with only
//! that signal on, `sys_enter` keeps state for the socket syscalls alone.

use agent_common::{
    FD_SYSCALLS_LEN, FdKind, SLOT_MIXED_BUCKETS, SYSCALL_SLOTS, SampleKey, SampleValue, Signal,
    SyscallSlot, THREAD_IN_SYSCALL, hist_bucket, syscall_slot,
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray},
    programs::BtfTracePointContext,
};

use crate::{
    maps::{
        SLOT_SYSCALL, add_sample, capture_current_stack, config, flush_syscall_slot, generation,
        wanted, wanted_target_current, wants,
    },
    threads::{current_task, thread_of, thread_or_create},
};

/// Syscall numbers whose first argument is a file descriptor (1), set by the agent.
#[map]
static FD_SYSCALLS: Array<u8> = Array::with_max_entries(FD_SYSCALLS_LEN, 0);

/// The per-CPU syscall totals cache, one half per generation (see [`SyscallSlot`]).
#[map]
static SYSCALL_CACHE: PerCpuArray<SyscallSlot> =
    PerCpuArray::with_max_entries(2 * SYSCALL_SLOTS, 0);

/// Offsets of `di` and `si` (the first two syscall arguments) in x86-64 `struct pt_regs`.
#[cfg(not(bpf_target_arch = "aarch64"))]
const ARG0_OFFSET: usize = 14 * 8;
#[cfg(not(bpf_target_arch = "aarch64"))]
const ARG1_OFFSET: usize = 13 * 8;
/// Offsets of `regs[0]` and `regs[1]` in arm64 `struct pt_regs`.
#[cfg(bpf_target_arch = "aarch64")]
const ARG0_OFFSET: usize = 0;
#[cfg(bpf_target_arch = "aarch64")]
const ARG1_OFFSET: usize = 8;

/// `sys_enter(struct pt_regs *regs, long id)`.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter_btf(ctx: BtfTracePointContext) -> i32 {
    if !wanted_target_current() {
        return 0;
    }
    let task = current_task();
    let id: u64 = ctx.arg(1);
    // The network signal alone needs only the socket syscalls: every other syscall skips
    // the thread state.
    if !wants(Signal::Syscall) && !crate::net::is_socket_syscall(id as u32) {
        return 0;
    }
    let Some(thread) = thread_or_create(&ctx, Signal::Syscall, task, true) else {
        return 0;
    };
    if !wanted(thread.tgid) {
        // The agent itself.
        return 0;
    }
    // SAFETY: helper without arguments.
    thread.syscall_since_ns = unsafe { bpf_ktime_get_ns() };
    thread.syscall_nr = id as u32;
    thread.flags |= THREAD_IN_SYSCALL;
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`.
#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_btf(ctx: BtfTracePointContext) -> i32 {
    let task = current_task();
    let Some(thread) = thread_of(task) else {
        return 0;
    };
    if thread.flags & THREAD_IN_SYSCALL == 0 {
        return 0;
    }
    thread.flags &= !THREAD_IN_SYSCALL;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if thread.syscall_since_ns == 0 || thread.syscall_since_ns > now {
        return 0;
    }
    let duration = now - thread.syscall_since_ns;
    let generation = generation();
    let nr = thread.syscall_nr;
    let ids = (thread.tgid, thread.tid);
    if wants(Signal::Syscall) {
        syscall_latency(&ctx, generation, task, ids, nr, duration);
    }
    if wants(Signal::SocketWait) {
        crate::net::socket_wait(&ctx, generation, task, ids, nr, duration);
    }
    0
}

/// The syscall signal's part of a syscall exit: totals, and for slow syscalls the user
/// stack and the kind of file descriptor.
#[inline(always)]
fn syscall_latency(
    ctx: &BtfTracePointContext,
    generation: u32,
    task: *mut aya_ebpf::bindings::task_struct,
    (tgid, tid): (u32, u32),
    nr: u32,
    duration: u64,
) {
    add_syscall_total(ctx, generation, tgid, nr, duration);
    if duration < config!(syscall_slow_threshold_ns) {
        return;
    }
    let fd_kind = if FD_SYSCALLS.get(nr).copied().unwrap_or(0) != 0 {
        fd_kind(task, syscall_arg(ctx, 0))
    } else {
        FdKind::Unknown
    };
    let ustack = capture_current_stack(ctx, Signal::Syscall, generation, SLOT_SYSCALL, true);
    let sample = SampleKey {
        tgid,
        tid,
        ustack,
        signal: Signal::Syscall as u8,
        detail: fd_kind as u8,
        aux: nr,
        ..SampleKey::default()
    };
    let value = SampleValue {
        ns: duration,
        count: 1,
        ..SampleValue::default()
    };
    add_sample(ctx, generation, &sample, &value);
}

/// Adds one syscall of `duration` to (process, syscall) in this CPU's cache slot: plain
/// adds when the slot holds that pair already, else the slot's previous content goes to
/// the totals map first.
#[inline(always)]
fn add_syscall_total(
    ctx: &BtfTracePointContext,
    generation: u32,
    tgid: u32,
    nr: u32,
    duration: u64,
) {
    // A per-CPU array lookup of a valid index cannot fail.
    let Some(slot) = SYSCALL_CACHE.get_ptr_mut(generation * SYSCALL_SLOTS + syscall_slot(tgid, nr))
    else {
        return;
    };
    // SAFETY: per-CPU memory written only by `sys_exit`, which never nests with itself on
    // a CPU; drained by the agent only after the generation is retired.
    let slot = unsafe { &mut *slot };
    let bucket = hist_bucket(duration);
    if slot.count != 0 && (slot.tgid != tgid || slot.nr != nr) {
        flush_syscall_slot(ctx, generation, slot);
    }
    if slot.count == 0 {
        slot.tgid = tgid;
        slot.nr = nr;
        slot.count = 1;
        slot.ns = duration;
        slot.max_ns = duration;
        slot.bucket = bucket as u32;
    } else {
        slot.count += 1;
        slot.ns += duration;
        if duration > slot.max_ns {
            slot.max_ns = duration;
        }
        if slot.bucket != bucket as u32 {
            slot.bucket = SLOT_MIXED_BUCKETS;
        }
    }
    if let Some(count) = slot.buckets.get_mut(bucket) {
        *count += 1;
    }
}

/// Argument `index` (0 or 1) of the syscall that is exiting: the saved user registers
/// still hold the arguments at exit. `u64::MAX` if they cannot be read.
#[inline(always)]
pub fn syscall_arg(ctx: &BtfTracePointContext, index: usize) -> u64 {
    let regs: *const u8 = ctx.arg(0);
    if regs.is_null() {
        return u64::MAX;
    }
    let offset = if index == 0 { ARG0_OFFSET } else { ARG1_OFFSET };
    // SAFETY: a fault-tolerant read of the saved user registers.
    unsafe { bpf_probe_read_kernel(regs.add(offset).cast::<u64>()) }.unwrap_or(u64::MAX)
}

/// Reads a pointer-sized kernel value at `base + offset` (zero if `base` is null or the
/// read fails).
#[inline(always)]
pub fn read_ptr(base: u64, offset: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.unwrap_or(0)
}

/// The `struct file` behind descriptor `fd` of `task` (task->files->fdt->fd[fd]), zero
/// if there is none or the offsets are unknown.
#[inline(always)]
pub fn fd_file(task: *mut aya_ebpf::bindings::task_struct, fd: u64) -> u64 {
    if config!(fd_walk) == 0 {
        return 0;
    }
    let files = read_ptr(task as u64, config!(task_files_offset));
    let fdt = read_ptr(files, config!(files_fdt_offset));
    if fdt == 0 {
        return 0;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    let max_fds: u32 = unsafe {
        bpf_probe_read_kernel((fdt + u64::from(config!(fdt_max_fds_offset))) as *const u32)
    }
    .unwrap_or(0);
    if fd >= u64::from(max_fds) {
        return 0;
    }
    let fd_array = read_ptr(fdt, config!(fdt_fd_offset));
    read_ptr(fd_array, (fd * 8) as u32)
}

/// What kind of file `file` is, from its inode's `i_mode`.
#[inline(always)]
pub fn file_kind(file: u64) -> FdKind {
    let inode = read_ptr(file, config!(file_inode_offset));
    if inode == 0 {
        return FdKind::Unknown;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    let mode: u16 = unsafe {
        bpf_probe_read_kernel((inode + u64::from(config!(inode_mode_offset))) as *const u16)
    }
    .unwrap_or(0);
    FdKind::from_mode(u32::from(mode))
}

/// What file descriptor `fd` of `task` refers to: task->files->fdt->fd[fd]->f_inode->i_mode.
#[inline(always)]
fn fd_kind(task: *mut aya_ebpf::bindings::task_struct, fd: u64) -> FdKind {
    let file = fd_file(task, fd);
    if file == 0 {
        return FdKind::Unknown;
    }
    file_kind(file)
}
