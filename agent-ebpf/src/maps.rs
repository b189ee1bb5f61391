//! Maps shared by every probe family, and the primitives built on them: the active
//! generation, exact totals, stack samples, the stack table and loss counters.
//!
//! Totals, samples and stacks come in two generations. Every program reads the active
//! generation once and writes only into that generation's maps; the agent flips the
//! generation, waits for an RCU grace period (so every program that saw the old value has
//! finished) and then drains the old maps with no writer left. Nothing that races with a
//! drain is lost or counted twice.

use agent_common::{
    GENERATION_INDEX, Loss, MAX_STACK_DEPTH, NO_STACK, ProbeConfig, STACK_FULL, SampleKey,
    SampleValue, Signal, StackTrace, TotalKey, TotalValue,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::generated::bpf_get_stack,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};

/// Read-only configuration, written by the agent before load.
#[unsafe(no_mangle)]
static PROBE_CONFIG: ProbeConfig = ProbeConfig::DEFAULT;

#[inline(always)]
pub fn config() -> ProbeConfig {
    // SAFETY: a read-only global; the volatile read stops the compiler from folding in the
    // default value the loader replaces.
    unsafe { core::ptr::read_volatile(&raw const PROBE_CONFIG) }
}

#[map]
static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static TOTALS_0: HashMap<TotalKey, TotalValue> = HashMap::with_max_entries(16384, 0);
#[map]
static TOTALS_1: HashMap<TotalKey, TotalValue> = HashMap::with_max_entries(16384, 0);

#[map]
static SAMPLES_0: HashMap<SampleKey, SampleValue> = HashMap::with_max_entries(16384, 0);
#[map]
static SAMPLES_1: HashMap<SampleKey, SampleValue> = HashMap::with_max_entries(16384, 0);

#[map]
static STACKS_0: HashMap<u64, StackTrace> = HashMap::with_max_entries(4096, 0);
#[map]
static STACKS_1: HashMap<u64, StackTrace> = HashMap::with_max_entries(4096, 0);

#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(Loss::COUNT, 0);

/// Per-CPU scratch stacks, one slot per program that can nest with another on a CPU.
#[map]
static SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);

/// Scratch slot of the scheduler tracepoint programs.
pub const SLOT_SCHED: u32 = 0;
/// Scratch slot of the return-to-user (`rseq_update`) program.
pub const SLOT_RSEQ: u32 = 1;
/// Scratch slot of the perf_event (NMI) program.
pub const SLOT_PERF: u32 = 2;
const SCRATCH_SLOTS: u32 = 3;

const EEXIST: i32 = 17;
const EBUSY: i32 = 16;

/// Whether the probes measure this process (all, or the one `record --pid` names).
#[inline(always)]
pub fn wanted(tgid: u32) -> bool {
    let target = config().target_tgid;
    target == 0 || target == tgid
}

/// The generation programs write into; read once per program run.
#[inline(always)]
pub fn generation() -> u32 {
    GENERATION.get(GENERATION_INDEX).copied().unwrap_or(0) & 1
}

#[inline(always)]
fn totals_map(generation: u32) -> &'static HashMap<TotalKey, TotalValue> {
    if generation == 0 {
        &TOTALS_0
    } else {
        &TOTALS_1
    }
}

#[inline(always)]
fn samples_map(generation: u32) -> &'static HashMap<SampleKey, SampleValue> {
    if generation == 0 {
        &SAMPLES_0
    } else {
        &SAMPLES_1
    }
}

#[inline(always)]
fn stack_map(generation: u32) -> &'static HashMap<u64, StackTrace> {
    if generation == 0 {
        &STACKS_0
    } else {
        &STACKS_1
    }
}

/// Counts a loss. The first loss of a kind on a CPU is also logged (through aya-log), so
/// the agent's log says when the probes start dropping; later ones are only counted.
#[inline(always)]
pub fn count_loss<C: EbpfContext>(ctx: &C, loss: Loss) {
    if let Some(counter) = LOSSES.get_ptr_mut(loss as u32) {
        // SAFETY: per-CPU slot; programs on one CPU that could nest update it with an
        // atomic add, so a nested increment is never lost.
        let first = unsafe { *counter } == 0;
        unsafe { atomic_add(counter, 1) };
        if first {
            aya_log_ebpf::warn!(
                ctx,
                "first {} loss on this CPU (counted in every profile from now on)",
                loss.name()
            );
        }
    }
}

/// # Safety
/// `target` points into a map value that stays valid for the program's run.
#[inline(always)]
unsafe fn atomic_add(target: *mut u64, value: u64) {
    // The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` does not exist;
    // the intrinsic lowers to the BPF atomic add instruction.
    // SAFETY: map values are 8-byte aligned and live for the program's run.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            target, value,
        );
    }
}

/// Adds `value` to `key` in `map`, creating the entry if needed.
#[inline(always)]
fn upsert<C: EbpfContext, K, V>(
    ctx: &C,
    map: &HashMap<K, V>,
    key: &K,
    value: &V,
    add: impl Fn(*mut V, &V),
) {
    // Two rounds: the second covers losing an insert race against another CPU.
    for _ in 0..2 {
        if let Some(entry) = map.get_ptr_mut(key) {
            add(entry, value);
            return;
        }
        match map.insert(key, value, u64::from(BPF_NOEXIST)) {
            Ok(()) => return,
            Err(err) if err == -EEXIST => {}
            Err(err) if err == -EBUSY => {
                count_loss(ctx, Loss::MapBusy);
                return;
            }
            Err(_) => {
                count_loss(ctx, Loss::AggFull);
                return;
            }
        }
    }
}

/// Adds one event to the exact totals of (thread, signal, class).
#[inline(always)]
pub fn add_total<C: EbpfContext>(ctx: &C, generation: u32, key: &TotalKey, ns: u64) {
    let value = TotalValue { ns, count: 1 };
    upsert(ctx, totals_map(generation), key, &value, |entry, value| {
        // SAFETY: the entry lives until the program returns (RCU); fields are u64.
        unsafe {
            atomic_add(&raw mut (*entry).ns, value.ns);
            atomic_add(&raw mut (*entry).count, value.count);
        }
    });
}

/// Adds one off-CPU wait to the exact totals of (thread, state).
#[inline(always)]
pub fn add_offcpu_total<C: EbpfContext>(
    ctx: &C,
    generation: u32,
    tgid: u32,
    tid: u32,
    state: u8,
    wait_ns: u64,
) {
    let key = TotalKey {
        tgid,
        tid,
        signal: Signal::OffCpu as u8,
        class: state,
        ..TotalKey::default()
    };
    add_total(ctx, generation, &key, wait_ns);
}

/// Adds `value` to the stack sample `key`.
#[inline(always)]
pub fn add_sample<C: EbpfContext>(ctx: &C, generation: u32, key: &SampleKey, value: &SampleValue) {
    upsert(ctx, samples_map(generation), key, value, |entry, value| {
        // SAFETY: the entry lives until the program returns (RCU); fields are u64.
        unsafe {
            atomic_add(&raw mut (*entry).ns, value.ns);
            atomic_add(&raw mut (*entry).count, value.count);
            if value.est_count_fp != 0 {
                atomic_add(&raw mut (*entry).est_ns, value.est_ns);
                atomic_add(&raw mut (*entry).est_count_fp, value.est_count_fp);
            }
        }
    });
}

/// FNV-1a style hash over the valid frames; never returns [`NO_STACK`].
#[inline(always)]
fn stack_hash(stack: &StackTrace) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(stack.flags);
    let len = stack.len as usize;
    for i in 0..MAX_STACK_DEPTH {
        if i >= len {
            break;
        }
        hash = (hash ^ stack.ips[i]).wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= hash >> 29;
    }
    if hash == NO_STACK { 1 } else { hash }
}

/// Stores `stack` in the stack table of `generation` and returns its hash, or [`NO_STACK`]
/// if the table was full.
#[inline(always)]
pub fn store_stack<C: EbpfContext>(ctx: &C, generation: u32, stack: &StackTrace) -> u64 {
    if stack.len == 0 {
        return NO_STACK;
    }
    let hash = stack_hash(stack);
    let map = stack_map(generation);
    if map.get_ptr(hash).is_some() {
        return hash;
    }
    match map.insert(hash, stack, u64::from(BPF_NOEXIST)) {
        Ok(()) => hash,
        Err(err) if err == -EEXIST => hash,
        Err(err) if err == -EBUSY => {
            count_loss(ctx, Loss::MapBusy);
            NO_STACK
        }
        Err(_) => {
            count_loss(ctx, Loss::StackTableFull);
            NO_STACK
        }
    }
}

/// The per-CPU scratch stack of `slot`.
#[inline(always)]
pub fn scratch(slot: u32) -> Option<&'static mut StackTrace> {
    // SAFETY: per-CPU memory used by one non-nesting program at a time (see the slots).
    SCRATCH.get_ptr_mut(slot).map(|ptr| unsafe { &mut *ptr })
}

/// Walks the current task's kernel (`user == false`) or user stack from `ctx` into the
/// scratch slot and stores it; returns the stack hash or [`NO_STACK`].
#[inline(always)]
pub fn capture_current_stack<C: EbpfContext>(
    ctx: &C,
    generation: u32,
    slot: u32,
    user: bool,
) -> u64 {
    let Some(stack) = scratch(slot) else {
        return NO_STACK;
    };
    let flags = if user { u64::from(BPF_F_USER_STACK) } else { 0 };
    // SAFETY: the buffer is the scratch slot's `ips` array and its size is passed along.
    let written = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            stack.ips.as_mut_ptr().cast(),
            core::mem::size_of_val(&stack.ips) as u32,
            flags,
        )
    };
    if written < 0 {
        count_loss(
            ctx,
            if user {
                Loss::UserStackFailed
            } else {
                Loss::KernelStackFailed
            },
        );
        return NO_STACK;
    }
    set_len(stack, written as usize / 8, user);
    store_stack(ctx, generation, stack)
}

/// Sets the length and flags of a freshly walked stack.
#[inline(always)]
pub fn set_len(stack: &mut StackTrace, frames: usize, user: bool) {
    let frames = if frames > MAX_STACK_DEPTH {
        MAX_STACK_DEPTH
    } else {
        frames
    };
    stack.len = frames as u32;
    stack.flags = if user { agent_common::STACK_USER } else { 0 };
    if frames == MAX_STACK_DEPTH {
        stack.flags |= STACK_FULL;
    }
}
