//! Syscall latency: every syscall of every (wanted) thread, from `sys_enter` to `sys_exit`
//! (BTF raw tracepoints), into per-(process, syscall) totals and log2 histograms. Syscalls
//! at or above the slow threshold also get the user stack (taken at exit, in the thread's
//! own context, where the user registers are the syscall's) and, for syscalls whose first
//! argument is a file descriptor, the kind of file it refers to. The hooks themselves are
//! in `raw_syscalls.rs`, shared with the network signal's socket waits. In sampled mode
//! (one in N timed) every syscall is still counted; the timed ones carry the time and the
//! histogram, and a slow one's stack sample stands for N (the agent scales the totals).

use agent_common::{
    FD_SYSCALLS_LEN, FdKind, SLOT_MIXED_BUCKETS, SLOT_NO_BUCKET, SYSCALL_SLOTS, SampleKey,
    SampleValue, Signal, SyscallSlot, hist_bucket, syscall_slot,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
    programs::BtfTracePointContext,
};

use crate::{
    kernel::{fd_file, file_kind, syscall_arg},
    maps::{SLOT_SYSCALL, add_sample, capture_current_stack, config, flush_syscall_slot, tuned},
};

/// Syscall numbers whose first argument is a file descriptor (1), set by the agent.
#[map]
static FD_SYSCALLS: Array<u8> = Array::with_max_entries(FD_SYSCALLS_LEN, 0);

/// The per-CPU syscall totals cache, one half per generation (see [`SyscallSlot`]).
#[map]
static SYSCALL_CACHE: PerCpuArray<SyscallSlot> =
    PerCpuArray::with_max_entries(2 * SYSCALL_SLOTS, 0);

/// The syscall signal's part of a syscall exit: totals, and for slow syscalls the user
/// stack and the kind of file descriptor.
#[inline(always)]
pub fn syscall_latency(
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
    // Sampled mode: one timed syscall stands for `every` (a Horvitz-Thompson estimate).
    let every = u64::from(tuned!(syscall_sample_every).max(1));
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
        ns: duration * every,
        count: every,
        ..SampleValue::default()
    };
    add_sample(ctx, generation, &sample, &value);
}

/// The cache slot of (process, syscall) on this CPU in `generation`; its previous
/// content, another pair's, goes to the totals map first.
#[inline(always)]
fn cache_slot<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    generation: u32,
    tgid: u32,
    nr: u32,
) -> Option<&'static mut SyscallSlot> {
    // A per-CPU array lookup of a valid index cannot fail.
    let slot = SYSCALL_CACHE.get_ptr_mut(generation * SYSCALL_SLOTS + syscall_slot(tgid, nr))?;
    // SAFETY: per-CPU memory written only by `sys_enter` and `sys_exit`, which never nest
    // with each other on a CPU; drained by the agent only after the generation is retired.
    let slot = unsafe { &mut *slot };
    if slot.count != 0 && (slot.tgid != tgid || slot.nr != nr) {
        flush_syscall_slot(ctx, generation, slot);
    }
    Some(slot)
}

/// Counts one syscall the signal does not time (sampled mode): the count only.
#[inline(always)]
pub fn count_untimed_syscall<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    generation: u32,
    tgid: u32,
    nr: u32,
) {
    let Some(slot) = cache_slot(ctx, generation, tgid, nr) else {
        return;
    };
    if slot.count == 0 {
        slot.tgid = tgid;
        slot.nr = nr;
        slot.count = 1;
        slot.ns = 0;
        slot.max_ns = 0;
        slot.bucket = SLOT_NO_BUCKET;
    } else {
        slot.count += 1;
    }
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
    let Some(slot) = cache_slot(ctx, generation, tgid, nr) else {
        return;
    };
    let bucket = hist_bucket(duration);
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
        if slot.bucket == SLOT_NO_BUCKET {
            slot.bucket = bucket as u32;
        } else if slot.bucket != bucket as u32 {
            slot.bucket = SLOT_MIXED_BUCKETS;
        }
    }
    if let Some(count) = slot.buckets.get_mut(bucket) {
        *count += 1;
    }
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
