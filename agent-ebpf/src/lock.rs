//! Kernel lock waits, with kernel and user stacks, from `lock:contention_begin`/
//! `contention_end` (BTF tracepoints). Waits at or above the lock stack threshold always
//! get stacks, shorter ones are threshold-sampled; both stacks are taken when the wait
//! ends, in the waiter's own context (a contention ends where it began).
//!
//! User-space lock waits (futex waits) come from the scheduler probes instead
//! (`sched_btf.rs`): a thread switched out inside a futex syscall is waiting on that
//! futex, so only waits that really block cost anything.

use agent_common::{
    CACHE_LOCK, EST_COUNT_FP_SHIFT, LockKind, SampleKey, SampleValue, Signal, TotalKey,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_prandom_u32},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{
        SLOT_LOCK, add_sample, add_total_cached, capture_current_stack, generation, owns, tuned,
        wanted,
    },
    threads::{current, current_task, thread_of, thread_or_create},
};

/// `contention_begin(void *lock, unsigned int flags)`.
#[btf_tracepoint(function = "contention_begin")]
pub fn contention_begin_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let lock: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    let (task, pid_tgid) = current();
    if pid_tgid as u32 == 0 || !wanted((pid_tgid >> 32) as u32) {
        return 0;
    }
    let Some(thread) = thread_or_create(&ctx, Signal::Lock, task, true) else {
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
    if !owns() {
        return 0;
    }
    let lock: u64 = ctx.arg(0);
    let task = current_task();
    let Some(thread) = thread_of(task) else {
        return 0;
    };
    if thread.lock_since_ns == 0 || thread.lock_addr != lock {
        return 0;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let since = thread.lock_since_ns;
    if since <= now {
        record_wait(
            &ctx,
            (thread.tgid, thread.tid),
            thread.lock_kind,
            lock,
            now - since,
        );
    }
    // Cleared last: an interrupt that contends a lock while this program runs sees the
    // contention in progress and leaves the thread's state alone. (Its own
    // `contention_end` cannot run while this program does, so a `contention_begin` it
    // recorded would never end, and a much later end of that lock would count from it.)
    thread.lock_since_ns = 0;
    0
}

/// Adds a lock wait to the totals and, threshold-sampled, to the stack samples.
#[inline(always)]
fn record_wait<C: EbpfContext>(ctx: &C, thread: (u32, u32), kind: u8, address: u64, wait_ns: u64) {
    let generation = generation();
    let key = TotalKey {
        tgid: thread.0,
        tid: thread.1,
        signal: Signal::Lock as u8,
        class: kind,
        ..TotalKey::default()
    };
    add_total_cached(ctx, generation, CACHE_LOCK, &key, wait_ns);
    let threshold = tuned!(lock_stack_threshold_ns);
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
    let kstack = capture_current_stack(ctx, Signal::Lock, generation, SLOT_LOCK, false);
    let ustack = capture_current_stack(ctx, Signal::Lock, generation, SLOT_LOCK, true);
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
