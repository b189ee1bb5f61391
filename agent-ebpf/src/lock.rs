//! Lock waits, with kernel and user stacks: kernel locks from `lock:contention_begin`/
//! `contention_end` (BTF tracepoints), user-space locks from futex waits (the
//! `syscalls:sys_enter_futex*`/`sys_exit_futex*` tracepoints, which fire only for futex
//! syscalls). Waits at or above the lock stack threshold always get stacks, shorter ones
//! are threshold-sampled. Both stacks are taken when the wait ends, in the waiter's own
//! context (the kernel stack of a contention ends where it began). User-space lock waits
//! are keyed by futex address, so one hot lock shows up as one lock across threads;
//! telling contention from idle waiting (condition variables) is done by the agent from
//! the waiter's stack.

use agent_common::{
    EST_COUNT_FP_SHIFT, FutexWait, LockKind, Loss, SampleKey, SampleValue, Signal, TotalKey,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_prandom_u32,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, TracePointContext},
};

use crate::{
    maps::{
        SLOT_FUTEX, SLOT_LOCK, add_sample, add_total, capture_current_stack, config, count_loss,
        generation, remember_comm, wanted,
    },
    threads::{current, thread_of, thread_or_create},
};

/// Futex waits in progress, keyed by thread id.
#[map]
static FUTEX_WAITS: HashMap<u32, FutexWait> = HashMap::with_max_entries(16384, 0);

/// `contention_begin(void *lock, unsigned int flags)`.
#[btf_tracepoint(function = "contention_begin")]
pub fn contention_begin_btf(ctx: BtfTracePointContext) -> i32 {
    let lock: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    let (task, pid_tgid) = current();
    if pid_tgid as u32 == 0 || !wanted((pid_tgid >> 32) as u32) {
        return 0;
    }
    let Some(thread) = thread_or_create(&ctx, Signal::Lock, task, Some(pid_tgid)) else {
        return 0;
    };
    if thread.lock_since_ns != 0 {
        // Nested contention (e.g. on a mutex's internal spinlock): the outer one counts.
        return 0;
    }
    // SAFETY: helper without arguments.
    thread.lock_since_ns = unsafe { bpf_ktime_get_ns() };
    thread.lock_addr = lock;
    thread.lock_kind = LockKind::from_contention_flags(flags as u32) as u8;
    0
}

/// `contention_end(void *lock, int ret)`.
#[btf_tracepoint(function = "contention_end")]
pub fn contention_end_btf(ctx: BtfTracePointContext) -> i32 {
    let lock: u64 = ctx.arg(0);
    let (task, _) = current();
    let Some(thread) = thread_of(task) else {
        return 0;
    };
    if thread.lock_since_ns == 0 || thread.lock_addr != lock {
        return 0;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let since = thread.lock_since_ns;
    thread.lock_since_ns = 0;
    if since > now {
        return 0;
    }
    record_wait(
        &ctx,
        SLOT_LOCK,
        (thread.tgid, thread.tid),
        thread.lock_kind,
        lock,
        now - since,
        true,
    );
    0
}

/// Adds a lock wait to the totals and, threshold-sampled, to the stack samples.
#[inline(always)]
fn record_wait<C: EbpfContext>(
    ctx: &C,
    slot: u32,
    thread: (u32, u32),
    kind: u8,
    address: u64,
    wait_ns: u64,
    kernel_stack: bool,
) {
    let generation = generation();
    let key = TotalKey {
        tgid: thread.0,
        tid: thread.1,
        signal: Signal::Lock as u8,
        class: kind,
        ..TotalKey::default()
    };
    add_total(ctx, generation, &key, wait_ns, 0);
    let threshold = config().lock_stack_threshold_ns;
    let (ns, count, est_ns, est_count_fp) = if wait_ns >= threshold {
        (wait_ns, 1, 0, 0)
    } else {
        // SAFETY: helper without arguments.
        let draw = (u64::from(unsafe { bpf_get_prandom_u32() }) * threshold) >> 32;
        if draw >= wait_ns {
            return;
        }
        (
            0,
            0,
            threshold,
            (threshold << EST_COUNT_FP_SHIFT) / wait_ns.max(1),
        )
    };
    let kstack = if kernel_stack {
        capture_current_stack(ctx, Signal::Lock, generation, slot, false)
    } else {
        0
    };
    let ustack = capture_current_stack(ctx, Signal::Lock, generation, slot, true);
    let sample = SampleKey {
        tgid: thread.0,
        tid: thread.1,
        kstack,
        ustack,
        signal: Signal::Lock as u8,
        class: kind,
        object: [address, 0, 0],
        ..SampleKey::default()
    };
    let value = SampleValue {
        ns,
        count,
        est_ns,
        est_count_fp,
        tail_ns: 0,
    };
    add_sample(ctx, generation, &sample, &value);
}

/// `FUTEX_CMD_MASK`: the operation without the private and clock flags.
const FUTEX_CMD_MASK: u64 = 0x7f;
const FUTEX_WAIT: u64 = 0;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAIT_REQUEUE_PI: u64 = 11;
const FUTEX_LOCK_PI2: u64 = 13;

/// Syscall tracepoint records put argument `n` at `16 + 8 * n`.
const ARG0: usize = 16;
const ARG1: usize = 24;

#[inline(always)]
fn begin_futex_wait(ctx: &TracePointContext, uaddr: u64, kind: LockKind) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !wanted((pid_tgid >> 32) as u32) {
        return;
    }
    remember_comm(pid_tgid as u32);
    let wait = FutexWait {
        // SAFETY: helper without arguments.
        since_ns: unsafe { bpf_ktime_get_ns() },
        uaddr,
        kind: kind as u8,
        pad: [0; 7],
    };
    if FUTEX_WAITS.insert(pid_tgid as u32, wait, 0).is_err() {
        count_loss(ctx, Signal::Lock, Loss::PendingFull);
    }
}

#[inline(always)]
fn end_futex_wait(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(wait) = FUTEX_WAITS.get_ptr(tid) else {
        return;
    };
    // SAFETY: this thread's own entry, removed right below.
    let wait = unsafe { *wait };
    let _ = FUTEX_WAITS.remove(tid);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if wait.since_ns == 0 || wait.since_ns > now {
        return;
    }
    record_wait(
        ctx,
        SLOT_FUTEX,
        ((pid_tgid >> 32) as u32, tid),
        wait.kind,
        wait.uaddr,
        now - wait.since_ns,
        false,
    );
}

/// `futex(uaddr, op, ...)`: waits and PI locks.
#[tracepoint(category = "syscalls", name = "sys_enter_futex")]
pub fn sys_enter_futex(ctx: TracePointContext) -> i32 {
    // SAFETY: bounds-checked reads of the tracepoint record.
    let (uaddr, op) = unsafe {
        (
            ctx.read_at::<u64>(ARG0).unwrap_or(0),
            ctx.read_at::<u64>(ARG1).unwrap_or(0),
        )
    };
    let kind = match op & FUTEX_CMD_MASK {
        FUTEX_WAIT | FUTEX_WAIT_BITSET | FUTEX_WAIT_REQUEUE_PI => LockKind::Futex,
        FUTEX_LOCK_PI | FUTEX_LOCK_PI2 => LockKind::FutexPi,
        _ => return 0,
    };
    begin_futex_wait(&ctx, uaddr, kind);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_futex")]
pub fn sys_exit_futex(ctx: TracePointContext) -> i32 {
    end_futex_wait(&ctx);
    0
}

/// `futex_wait(uaddr, val, mask, flags, timeout, clockid)` (6.7+).
#[tracepoint(category = "syscalls", name = "sys_enter_futex_wait")]
pub fn sys_enter_futex_wait(ctx: TracePointContext) -> i32 {
    // SAFETY: bounds-checked read of the tracepoint record.
    let uaddr = unsafe { ctx.read_at::<u64>(ARG0) }.unwrap_or(0);
    begin_futex_wait(&ctx, uaddr, LockKind::Futex);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_futex_wait")]
pub fn sys_exit_futex_wait(ctx: TracePointContext) -> i32 {
    end_futex_wait(&ctx);
    0
}

/// `futex_waitv(waiters, nr_futexes, flags, timeout, clockid)`: keyed by the first
/// futex's address (`struct futex_waitv { u64 val; u64 uaddr; u32 flags; u32 pad; }`).
#[tracepoint(category = "syscalls", name = "sys_enter_futex_waitv")]
pub fn sys_enter_futex_waitv(ctx: TracePointContext) -> i32 {
    // SAFETY: bounds-checked read of the tracepoint record.
    let waiters = unsafe { ctx.read_at::<u64>(ARG0) }.unwrap_or(0);
    let uaddr = if waiters == 0 {
        0
    } else {
        // SAFETY: fault-tolerant read of the caller's own memory.
        unsafe { bpf_probe_read_user((waiters + 8) as *const u64) }.unwrap_or(0)
    };
    begin_futex_wait(&ctx, uaddr, LockKind::Futex);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_futex_waitv")]
pub fn sys_exit_futex_waitv(ctx: TracePointContext) -> i32 {
    end_futex_wait(&ctx);
    0
}
