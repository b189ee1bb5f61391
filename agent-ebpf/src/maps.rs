//! Maps shared by every probe family, and the primitives built on them: the active
//! generation, exact totals, stack samples, the stack table and loss counters.
//!
//! Totals, samples and stacks come in two generations. Every program reads the active
//! generation once and writes only into that generation's maps; the agent flips the
//! generation, waits for an RCU grace period (so every program that saw the old value has
//! finished) and then drains the old maps with no writer left. Nothing that races with a
//! drain is lost or counted twice.

use core::ffi::c_void;

use agent_common::{
    CACHE_USERS, GENERATION_ENTRIES, GENERATION_INDEX, LOSS_COUNTERS, Loss, MAX_STACK_DEPTH,
    NO_STACK, ProbeConfig, SLOT_MIXED_BUCKETS, STACK_FULL, SampleKey, SampleValue, Signal,
    StackTrace, SyscallSlot, TOTAL_CACHE_WAYS, TotalCache, TotalKey, TotalValue, Tuning,
    hist_bucket,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::generated::{bpf_get_stack, bpf_loop},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};

/// Read-only configuration, written by the agent before load.
#[unsafe(no_mangle)]
pub(crate) static PROBE_CONFIG: ProbeConfig = ProbeConfig::DEFAULT;

/// Reads one field of the configuration: `config!(field)`. Volatile, so the compiler does
/// not fold in the default value the loader replaces; one field at a time, so a program
/// loads only what it uses (the verifier then knows the value: the map is frozen).
macro_rules! config {
    ($field:ident) => {{
        // SAFETY: a read-only global, written by the loader before the programs load.
        #[allow(unused_unsafe, reason = "also expanded inside unsafe blocks")]
        let value =
            unsafe { core::ptr::read_volatile(&raw const $crate::maps::PROBE_CONFIG.$field) };
        value
    }};
}
pub(crate) use config;

/// What the overhead guard tunes while the programs run ([`Tuning`]); entry 0, written by
/// the loader before the programs attach.
#[map]
static TUNING: Array<Tuning> = Array::with_max_entries(1, 0);

/// One field of the current tuning: `tuned!(field)`.
macro_rules! tuned {
    ($field:ident) => {{
        match $crate::maps::tuning() {
            // SAFETY: the map's only entry; a torn read of a value being replaced yields
            // the old or the new value of each aligned field, both valid.
            Some(tuning) => unsafe { core::ptr::read_volatile(&raw const (*tuning).$field) },
            None => agent_common::Tuning::DEFAULT.$field,
        }
    }};
}
pub(crate) use tuned;

/// The tuning entry ([`tuned`] reads its fields).
#[inline(always)]
pub fn tuning() -> Option<*const Tuning> {
    TUNING.get_ptr(0)
}

/// Whether the agent asked for `signal`.
#[inline(always)]
pub fn wants(signal: Signal) -> bool {
    let signals: u32 = config!(signals);
    signals & (1 << signal as u32) != 0
}

#[map]
static GENERATION: Array<u32> = Array::with_max_entries(GENERATION_ENTRIES, 0);

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

/// Thread names, kept after the threads exit (user space reads them at each drain).
#[map]
pub static COMMS: LruHashMap<u32, [u8; 16]> = LruHashMap::with_max_entries(65536, 0);

/// Records the current thread's name the first time the thread is seen.
#[inline(always)]
pub fn remember_comm(tid: u32) {
    if tid == 0 || COMMS.get_ptr(tid).is_some() {
        return;
    }
    if let Ok(comm) = aya_ebpf::helpers::bpf_get_current_comm() {
        let _ = COMMS.insert(tid, comm, 0);
    }
}

#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_COUNTERS, 0);

/// Per-CPU scratch stacks, one slot per program that can nest with another on a CPU.
#[map]
static SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);

/// Scratch slots: one per program that walks stacks, because programs nest on a CPU
/// (interrupts, NMIs, and tracepoints hit inside another program's map operations).
pub const SLOT_SCHED: u32 = 0;
pub const SLOT_RSEQ: u32 = 1;
pub const SLOT_PERF: u32 = 2;
pub const SLOT_SYSCALL: u32 = 3;
pub const SLOT_LOCK: u32 = 4;
pub const SLOT_DISK: u32 = 5;
pub const SLOT_NET: u32 = 6;
const SCRATCH_SLOTS: u32 = 7;

const EEXIST: i32 = 17;
const EBUSY: i32 = 16;

/// Whether the probes measure this process: the one `record --pid` names, else every
/// process but the agent itself (unless it asked to be included).
#[inline(always)]
pub fn wanted(tgid: u32) -> bool {
    let target = config!(target_tgid);
    if target != 0 {
        target == tgid
    } else {
        tgid != config!(exclude_tgid)
    }
}

/// Whether the current process is the one `record --pid` names (or none is named); asks
/// for its ids only when one is. It does not leave the agent itself out: hot paths check
/// [`wanted`] on the thread state's tgid instead of asking for the ids on every event.
#[inline(always)]
pub fn wanted_target_current() -> bool {
    let target: u32 = config!(target_tgid);
    target == 0 || (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32 == target
}

/// Whether this agent's programs count: the `GENERATION` value carries their owner tag.
/// Checked first by every program, so programs attached while the previous owner's still
/// run (an agent adopting pinned maps) stay idle until the agent hands over.
#[inline(always)]
pub fn owns() -> bool {
    GENERATION
        .get(GENERATION_INDEX)
        .is_some_and(|&value| agent_common::generation_owner(value) == config!(owner))
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

/// Counts a loss. Counters are cumulative; the agent logs the first loss of each kind and
/// every profile reports them. (No log record from here: each call site of a logging call
/// costs the verifier about a thousand instructions on every path that reaches it.)
#[inline(never)]
pub fn count_loss<C: EbpfContext>(_ctx: &C, signal: Signal, loss: Loss) {
    if let Some(counter) = LOSSES.get_ptr_mut(loss.index(signal)) {
        // SAFETY: per-CPU slot; programs on one CPU that could nest update it with an
        // atomic add, so a nested increment is never lost.
        unsafe { atomic_add(counter, 1) };
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
    signal: Signal,
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
                count_loss(ctx, signal, Loss::MapBusy);
                return;
            }
            Err(_) => {
                count_loss(ctx, signal, Loss::AggFull);
                return;
            }
        }
    }
}

#[map]
static TOTAL_CACHE: PerCpuArray<TotalCache> = PerCpuArray::with_max_entries(CACHE_USERS * 2, 0);

/// Adds one event of `ns` (of which `tail_ns` runnable, for off-CPU waits) straight to the
/// exact totals and histogram of `key`: for the scheduler and disk paths, whose programs
/// already branch a lot (the cache's paths would multiply into theirs).
#[inline(always)]
pub fn add_total<C: EbpfContext>(ctx: &C, generation: u32, key: &TotalKey, ns: u64, tail_ns: u64) {
    if let Some(entry) = totals_entry(ctx, generation, key) {
        // SAFETY: the entry lives until the program returns (RCU); fields are u64.
        unsafe {
            atomic_add(&raw mut (*entry).count, 1);
            atomic_add(&raw mut (*entry).ns, ns);
            if tail_ns != 0 {
                atomic_add(&raw mut (*entry).tail_ns, tail_ns);
            }
            if let Some(slot) = (*entry).buckets.get_mut(hist_bucket(ns)) {
                atomic_add(slot, 1);
            }
            // Racy maximum: a concurrent larger update on another CPU can be overwritten.
            if ns > (*entry).max_ns {
                (*entry).max_ns = ns;
            }
        }
    }
}

/// Adds one event of `ns` to the exact totals of `key` through this CPU's totals cache of
/// `user` (the kernel-lock path: many events, few keys at a time). A BPF
/// subprogram of its own (at most five arguments).
#[inline(never)]
pub fn add_total_cached<C: EbpfContext>(
    ctx: &C,
    generation: u32,
    user: u32,
    key: &TotalKey,
    ns: u64,
) {
    // A per-CPU array lookup of a valid index cannot fail.
    let Some(cache) = TOTAL_CACHE.get_ptr_mut(user * 2 + generation) else {
        return;
    };
    // SAFETY: per-CPU memory of one program family, which never nests with itself.
    let cache = unsafe { &mut *cache };
    let bucket = hist_bucket(ns);
    for entry in &mut cache.entries {
        if entry.value.count != 0 && entry.key == *key {
            entry.value.count += 1;
            entry.value.ns += ns;
            if ns > entry.value.max_ns {
                entry.value.max_ns = ns;
            }
            if let Some(slot) = entry.value.buckets.get_mut(bucket) {
                *slot += 1;
            }
            return;
        }
    }
    let victim = (cache.next as usize) & (TOTAL_CACHE_WAYS - 1);
    cache.next = cache.next.wrapping_add(1);
    let Some(entry) = cache.entries.get_mut(victim) else {
        return;
    };
    if entry.value.count != 0 {
        flush_total(ctx, generation, &entry.key, &entry.value);
    }
    entry.key = *key;
    entry.value.count = 1;
    entry.value.ns = ns;
    entry.value.tail_ns = 0;
    entry.value.max_ns = ns;
    for slot in &mut entry.value.buckets {
        // Volatile, so the compiler does not turn the loop into a byte-wise `memset`,
        // which the verifier would walk byte by byte on every path.
        // SAFETY: a valid, aligned u64 in this CPU's cache entry.
        unsafe { core::ptr::write_volatile(slot, 0) };
    }
    if let Some(slot) = entry.value.buckets.get_mut(bucket) {
        *slot = 1;
    }
}

/// Adds an evicted cache entry's `value` into the totals map entry of `key`.
#[inline(always)]
fn flush_total<C: EbpfContext>(ctx: &C, generation: u32, key: &TotalKey, value: &TotalValue) {
    let Some(entry) = totals_entry(ctx, generation, key) else {
        return;
    };
    // SAFETY: the entry lives until the program returns (RCU); fields are u64.
    unsafe {
        atomic_add(&raw mut (*entry).count, value.count);
        atomic_add(&raw mut (*entry).ns, value.ns);
        // Every bucket, unconditionally: a branch per bucket would give the verifier a
        // path per combination.
        for (total, &add) in (*entry).buckets.iter_mut().zip(value.buckets.iter()) {
            atomic_add(total, add);
        }
        if value.max_ns > (*entry).max_ns {
            (*entry).max_ns = value.max_ns;
        }
    }
}

/// Moves an evicted syscall cache slot of `generation` into the totals map and empties it
/// (count zero, every bucket zero again). A BPF subprogram of its own: the miss path is
/// verified once, not once per branch of the hit path.
#[inline(never)]
pub fn flush_syscall_slot<C: EbpfContext>(ctx: &C, generation: u32, slot: &mut SyscallSlot) {
    let key = TotalKey {
        tgid: slot.tgid,
        signal: Signal::Syscall as u8,
        aux: slot.nr,
        ..TotalKey::default()
    };
    let single = slot.bucket != SLOT_MIXED_BUCKETS;
    if let Some(entry) = totals_entry(ctx, generation, &key) {
        // SAFETY: the entry lives until the program returns (RCU); fields are u64.
        unsafe {
            atomic_add(&raw mut (*entry).count, slot.count);
            atomic_add(&raw mut (*entry).ns, slot.ns);
            if single {
                if let (Some(total), Some(&add)) = (
                    (*entry).buckets.get_mut(slot.bucket as usize),
                    slot.buckets.get(slot.bucket as usize),
                ) {
                    atomic_add(total, add);
                }
            } else {
                // Every bucket, unconditionally: a branch per bucket would give the
                // verifier a path per combination.
                for (total, &add) in (*entry).buckets.iter_mut().zip(slot.buckets.iter()) {
                    atomic_add(total, add);
                }
            }
            // Racy maximum: a concurrent larger update on another CPU can be overwritten.
            if slot.max_ns > (*entry).max_ns {
                (*entry).max_ns = slot.max_ns;
            }
        }
    }
    if single {
        if let Some(bucket) = slot.buckets.get_mut(slot.bucket as usize) {
            *bucket = 0;
        }
    } else {
        for bucket in &mut slot.buckets {
            // Volatile, so the compiler does not turn the loop into a byte-wise `memset`.
            // SAFETY: a valid, aligned u64 in this CPU's slot.
            unsafe { core::ptr::write_volatile(bucket, 0) };
        }
    }
    slot.count = 0;
}

/// The totals map entry of `key` in `generation`, created empty if missing.
#[inline(always)]
fn totals_entry<C: EbpfContext>(
    ctx: &C,
    generation: u32,
    key: &TotalKey,
) -> Option<*mut TotalValue> {
    let map = totals_map(generation);
    if let Some(entry) = map.get_ptr_mut(key) {
        return Some(entry);
    }
    // Insert an empty entry, then add through a lookup: the histogram is too big to build
    // on the BPF stack. Losing the insert race to another CPU is fine (`EEXIST`).
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the 352-byte entry would be copied onto the BPF stack"
    )]
    let inserted = map.insert(key, &EMPTY_TOTAL, u64::from(BPF_NOEXIST));
    match inserted {
        Ok(()) => {}
        Err(err) if err == -EEXIST => {}
        Err(err) => {
            let signal = Signal::from_u8(key.signal).unwrap_or(Signal::OffCpu);
            let loss = if err == -EBUSY {
                Loss::MapBusy
            } else {
                Loss::AggFull
            };
            count_loss(ctx, signal, loss);
            return None;
        }
    }
    map.get_ptr_mut(key)
}

/// An empty totals entry, inserted before the first add.
static EMPTY_TOTAL: TotalValue = TotalValue {
    count: 0,
    ns: 0,
    tail_ns: 0,
    max_ns: 0,
    buckets: [0; agent_common::HIST_BUCKETS],
};

/// Adds one off-CPU wait to the exact totals of (thread, state, wait hint).
#[inline(always)]
pub fn add_offcpu_total<C: EbpfContext>(
    ctx: &C,
    generation: u32,
    thread: (u32, u32),
    (state, hint): (u8, u8),
    wait_ns: u64,
    tail_ns: u64,
) {
    let key = TotalKey {
        tgid: thread.0,
        tid: thread.1,
        signal: Signal::OffCpu as u8,
        class: state,
        detail: hint,
        ..TotalKey::default()
    };
    add_total(ctx, generation, &key, wait_ns, tail_ns);
}

/// Adds `value` to the stack sample `key`.
#[inline(never)]
pub fn add_sample<C: EbpfContext>(ctx: &C, generation: u32, key: &SampleKey, value: &SampleValue) {
    let signal = Signal::from_u8(key.signal).unwrap_or(Signal::OffCpu);
    upsert(
        ctx,
        signal,
        samples_map(generation),
        key,
        value,
        |entry, value| {
            // SAFETY: the entry lives until the program returns (RCU); fields are u64.
            unsafe {
                atomic_add(&raw mut (*entry).ns, value.ns);
                atomic_add(&raw mut (*entry).count, value.count);
                if value.tail_ns != 0 {
                    atomic_add(&raw mut (*entry).tail_ns, value.tail_ns);
                }
                if value.est_count_fp != 0 {
                    atomic_add(&raw mut (*entry).est_ns, value.est_ns);
                    atomic_add(&raw mut (*entry).est_count_fp, value.est_count_fp);
                }
            }
        },
    );
}

/// FNV-1a style hash over the stack's frames; never returns [`NO_STACK`].
#[inline(always)]
fn stack_hash(stack: &StackTrace) -> u64 {
    let mut state = HashState {
        stack,
        hash: 0xcbf2_9ce4_8422_2325 ^ u64::from(stack.flags) ^ u64::from(stack.len),
    };
    // `bpf_loop` (5.17+): the verifier checks the step once, whatever the number of
    // iterations, so the loop runs over the stack's own frames only (an unrolled loop
    // would have to visit all 127 slots on every path that stores a stack).
    // SAFETY: `hash_step` matches the callback ABI; `state` outlives the call.
    unsafe {
        bpf_loop(
            stack.len.min(MAX_STACK_DEPTH as u32),
            hash_step as *mut c_void,
            (&raw mut state).cast(),
            0,
        );
    }
    if state.hash == NO_STACK {
        1
    } else {
        state.hash
    }
}

/// The running state of `stack_hash`'s loop.
#[repr(C)]
struct HashState {
    stack: *const StackTrace,
    hash: u64,
}

/// One step of `stack_hash`: mixes in frame `index`.
extern "C" fn hash_step(index: u64, state: *mut c_void) -> i64 {
    // SAFETY: `state` is the `HashState` passed to `bpf_loop`.
    let state = unsafe { &mut *state.cast::<HashState>() };
    let index = index as usize;
    if index >= MAX_STACK_DEPTH {
        return 1;
    }
    // SAFETY: the stack outlives the loop; the index is bounds-checked above.
    let ip = unsafe { (*state.stack).ips[index] };
    state.hash = (state.hash ^ ip).wrapping_mul(0x0000_0100_0000_01b3);
    state.hash ^= state.hash >> 29;
    0
}

/// Stores `stack` in the stack table of `generation` and returns its hash, or [`NO_STACK`]
/// if the table was full.
#[inline(never)]
pub fn store_stack<C: EbpfContext>(
    ctx: &C,
    signal: Signal,
    generation: u32,
    stack: &StackTrace,
) -> u64 {
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
            count_loss(ctx, signal, Loss::MapBusy);
            NO_STACK
        }
        Err(_) => {
            count_loss(ctx, signal, Loss::StackTableFull);
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
#[inline(never)]
pub fn capture_current_stack<C: EbpfContext>(
    ctx: &C,
    signal: Signal,
    generation: u32,
    slot: u32,
    user: bool,
) -> u64 {
    let Some(stack) = scratch(slot) else {
        return NO_STACK;
    };
    if user
        && crate::unwind::walk_user_stack(
            (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32,
            stack,
        )
    {
        return store_stack(ctx, signal, generation, stack);
    }
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
        let loss = if user {
            Loss::UserStackFailed
        } else {
            Loss::KernelStackFailed
        };
        count_loss(ctx, signal, loss);
        return NO_STACK;
    }
    set_len(stack, written as usize / 8, user);
    store_stack(ctx, signal, generation, stack)
}

/// Makes `stack` a one-frame user stack holding `ip` (every other slot cleared).
#[inline(always)]
pub fn set_leaf(stack: &mut StackTrace, ip: u64) {
    for slot in &mut stack.ips {
        *slot = 0;
    }
    stack.ips[0] = ip;
    set_len(stack, usize::from(ip != 0), true);
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
