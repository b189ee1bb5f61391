//! Keys and values of the aggregation maps, and the stack table's entries.

/// Deepest stack the probes record, in frames (the kernel's `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// A stack hash of zero means "no stack captured".
pub const NO_STACK: u64 = 0;

/// Fractional bits of [`SampleValue::est_count_fp`]: estimated event counts are fixed point.
pub const EST_COUNT_FP_SHIFT: u32 = 10;

/// Number of log2 buckets of a latency histogram: bucket `i` counts durations in
/// `[2^i, 2^(i+1))` nanoseconds (bucket 0 also holds 0 ns), the last bucket everything
/// from 2^39 ns (about 9 minutes) up.
pub const HIST_BUCKETS: usize = 40;

/// The histogram bucket of a duration: `floor(log2(ns))`, capped. Written with shifts
/// only, since the BPF target has no count-leading-zeros instruction.
#[inline]
pub const fn hist_bucket(ns: u64) -> usize {
    let mut value = ns;
    let mut log = 0;
    if value >= 1 << 32 {
        value >>= 32;
        log += 32;
    }
    if value >= 1 << 16 {
        value >>= 16;
        log += 16;
    }
    if value >= 1 << 8 {
        value >>= 8;
        log += 8;
    }
    if value >= 1 << 4 {
        value >>= 4;
        log += 4;
    }
    if value >= 1 << 2 {
        value >>= 2;
        log += 2;
    }
    if value >= 1 << 1 {
        log += 1;
    }
    if log >= HIST_BUCKETS {
        HIST_BUCKETS - 1
    } else {
        log
    }
}

/// [`SampleKey::flags`]: the user stack holds only the leaf instruction pointer.
pub const FLAG_USER_LEAF_ONLY: u8 = 1 << 0;
/// [`SampleKey::flags`]: capturing the kernel stack failed.
pub const FLAG_KSTACK_FAILED: u8 = 1 << 1;
/// [`SampleKey::flags`]: capturing the user stack failed.
pub const FLAG_USTACK_FAILED: u8 = 1 << 2;
/// [`SampleKey::flags`]: a kernel thread (no user stack exists).
pub const FLAG_KERNEL_THREAD: u8 = 1 << 3;
/// [`SampleKey::flags`]: the event happened outside process context (no stack of its own).
pub const FLAG_NO_CONTEXT: u8 = 1 << 4;
/// [`SampleKey::flags`], set by the agent (never by a probe): the wait happened inside
/// `execve`, so its user stack was the program that exec replaced, which the process's
/// memory map no longer shows; the stack is dropped.
pub const FLAG_USER_BEFORE_EXEC: u8 = 1 << 5;
/// [`crate::PendingWait::flags`] only: the wait is sampled for the lock signal alone (the
/// off-CPU signal is off).
pub const FLAG_NO_OFFCPU: u8 = 1 << 7;

/// Key of the exact totals and histograms: one entry per (thread, signal, class, aux),
/// updated by every event. Small on purpose: it is hashed on every context switch.
///
/// | signal | tgid/tid | class | detail | aux |
/// |---|---|---|---|---|
/// | off-CPU | thread | [`crate::OffCpuState`] | 0 | syscall number + 1 at switch-out, 0 if none |
/// | run queue | thread | [`crate::RunQueueKind`] | 0 | 0 |
/// | lock | thread | [`crate::LockKind`] | 0 | 0 |
/// | syscall | process, tid 0 | 0 | 0 | syscall number |
/// | disk | issuing thread | [`crate::DiskOp`] | 0 | device (kernel `dev_t`) |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TotalKey {
    pub tgid: u32,
    pub tid: u32,
    /// A [`crate::Signal`].
    pub signal: u8,
    pub class: u8,
    pub detail: u8,
    pub pad: u8,
    pub aux: u32,
}

/// Value of the exact totals: count, sum, the runnable tail of off-CPU waits, maximum and
/// a log2 histogram. Updated with atomic adds (the maximum with a plain store, so two
/// racing updates of one entry may keep the smaller).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotalValue {
    pub count: u64,
    pub ns: u64,
    /// Off-CPU: the part of `ns` the thread spent runnable, after its wakeup.
    pub tail_ns: u64,
    pub max_ns: u64,
    pub buckets: [u64; HIST_BUCKETS],
}

impl Default for TotalValue {
    fn default() -> Self {
        Self {
            count: 0,
            ns: 0,
            tail_ns: 0,
            max_ns: 0,
            buckets: [0; HIST_BUCKETS],
        }
    }
}

impl TotalValue {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.ns += other.ns;
        self.tail_ns += other.tail_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
        for (total, add) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *total += add;
        }
    }
}

/// Ways of the per-CPU totals cache.
pub const TOTAL_CACHE_WAYS: usize = 4;

/// One way of the per-CPU totals cache: a key and what accumulated for it on this CPU.
/// Valid when `value.count != 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TotalCacheEntry {
    pub key: TotalKey,
    pub value: TotalValue,
}

/// A small per-CPU cache in front of the totals map: events of a key seen again soon
/// after (two threads ping-ponging on a kernel lock) are added with plain stores instead
/// of a hash lookup and atomic adds. Used by the kernel-lock family, per generation; the
/// agent drains the retired generation's caches with the maps. (Syscalls have their own,
/// larger, direct-mapped cache: [`SyscallSlot`].)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TotalCache {
    pub entries: [TotalCacheEntry; TOTAL_CACHE_WAYS],
    /// Round-robin victim for the next miss.
    pub next: u64,
}

/// Users of the totals cache; the cache index is `user * 2 + generation`.
pub const CACHE_LOCK: u32 = 0;
pub const CACHE_USERS: u32 = 1;

/// log2 of the number of syscall cache slots per CPU and generation.
pub const SYSCALL_SLOT_BITS: u32 = 6;
/// Syscall cache slots per CPU and generation; slot `i` of generation `g` is map index
/// `g * SYSCALL_SLOTS + i`.
pub const SYSCALL_SLOTS: u32 = 1 << SYSCALL_SLOT_BITS;
/// [`SyscallSlot::bucket`] of a slot whose events fell into more than one bucket.
pub const SLOT_MIXED_BUCKETS: u32 = u32::MAX;
/// [`SyscallSlot::bucket`] of a slot that counted syscalls but timed none yet (sampled
/// mode): no bucket holds anything.
pub const SLOT_NO_BUCKET: u32 = u32::MAX - 1;

/// One slot of the per-CPU syscall totals cache: what one (process, syscall) added on this
/// CPU since the slot was last emptied. Valid when `count != 0`. `count` counts every
/// syscall; `ns`, `max_ns` and `buckets` only the timed ones (all of them, unless the
/// signal samples: then the histogram's sum is the number timed, and the agent scales
/// the time to `count`).
///
/// The cache is direct-mapped ([`syscall_slot`]): a hit (a thread calling the same
/// syscall again) is one array index and plain adds, with no hash and no atomic
/// instruction; a miss moves the slot's content into the shared totals map. Most
/// evicted slots hold events of a single bucket (a thrashing workload evicts after one or
/// two events), so `bucket` names it and the move is four atomic adds instead of one per
/// bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallSlot {
    pub tgid: u32,
    /// The syscall number.
    pub nr: u32,
    pub count: u64,
    pub ns: u64,
    pub max_ns: u64,
    /// The bucket all events so far fell into, or [`SLOT_MIXED_BUCKETS`].
    pub bucket: u32,
    pub pad: u32,
    pub buckets: [u64; HIST_BUCKETS],
}

impl Default for SyscallSlot {
    fn default() -> Self {
        Self {
            tgid: 0,
            nr: 0,
            count: 0,
            ns: 0,
            max_ns: 0,
            bucket: 0,
            pad: 0,
            buckets: [0; HIST_BUCKETS],
        }
    }
}

impl SyscallSlot {
    /// The slot's content as an entry of the totals.
    pub fn total(&self) -> (TotalKey, TotalValue) {
        let key = TotalKey {
            tgid: self.tgid,
            signal: crate::Signal::Syscall as u8,
            aux: self.nr,
            ..TotalKey::default()
        };
        let value = TotalValue {
            count: self.count,
            ns: self.ns,
            tail_ns: 0,
            max_ns: self.max_ns,
            buckets: self.buckets,
        };
        (key, value)
    }
}

/// The cache slot of (process, syscall): a multiplicative hash, so the syscalls of one
/// process and one syscall of many processes spread over the slots.
#[inline]
pub const fn syscall_slot(tgid: u32, nr: u32) -> u32 {
    (tgid ^ nr.wrapping_mul(0x85eb_ca6b)).wrapping_mul(0x9e37_79b1) >> (32 - SYSCALL_SLOT_BITS)
}

/// Key of the stack samples: one entry per (thread, signal, class, stacks, object).
///
/// | signal | class | detail | aux | object |
/// |---|---|---|---|---|
/// | off-CPU | state | 0 | syscall + 1 | - |
/// | on-CPU | 0 | 0 | 0 | - |
/// | lock | [`crate::LockKind`] | 0 | 0 | lock address (kernel) or futex address |
/// | syscall | 0 | [`crate::FdKind`] | syscall number | - |
/// | disk | [`crate::DiskOp`] | 0 | device | - |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SampleKey {
    pub tgid: u32,
    pub tid: u32,
    /// Hash of the kernel stack in the stack table, [`NO_STACK`] if none.
    pub kstack: u64,
    /// Hash of the user stack in the stack table, [`NO_STACK`] if none.
    pub ustack: u64,
    /// A [`crate::Signal`].
    pub signal: u8,
    pub class: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub detail: u8,
    pub aux: u32,
    pub object: [u64; 3],
}

/// Value of the stack samples. Updated with atomic adds only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SampleValue {
    /// Exactly measured nanoseconds.
    pub ns: u64,
    /// Exactly counted events.
    pub count: u64,
    /// Estimated nanoseconds of threshold-sampled events (sum of the threshold per sample).
    pub est_ns: u64,
    /// Estimated number of threshold-sampled events, fixed point ([`EST_COUNT_FP_SHIFT`]).
    pub est_count_fp: u64,
    /// Off-CPU: the runnable tail of the exactly measured waits.
    pub tail_ns: u64,
}

/// A stack as the probes store it: instruction pointers, innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackTrace {
    /// Number of valid entries in `ips`.
    pub len: u32,
    /// `STACK_*` bits.
    pub flags: u32,
    pub ips: [u64; MAX_STACK_DEPTH],
}

/// [`StackTrace::flags`]: a user stack (instruction pointers in the thread's address space).
pub const STACK_USER: u32 = 1 << 0;
/// [`StackTrace::flags`]: the walk filled every slot, so the stack is probably truncated.
pub const STACK_FULL: u32 = 1 << 1;
