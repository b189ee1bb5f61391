//! Off-CPU time and run-queue latency on kernels with BTF tracepoints (5.18+).
//!
//! Off-CPU fast path: switch-out writes a timestamp and state into the thread's task-local
//! storage; switch-in computes the wait and adds it to the exact totals. Stacks are taken
//! for waits at or above a threshold, and for shorter waits with probability
//! `wait / threshold` (threshold sampling: stack totals stay unbiased). A selected wait
//! takes the kernel stack of the thread at switch-in (`bpf_get_task_stack`: where it
//! blocked) and its user stack in the thread's own context when it next returns to user
//! space (tracepoint `rseq_update`, which fires on that return for every thread that
//! registered rseq, as glibc 2.35+ does for all threads), or at its next switch-out if it
//! blocks again first. Threads without rseq have their user stack walked at every
//! switch-out instead (exact, more expensive).
//!
//! Run queue: `sched_wakeup`/`sched_wakeup_new` stamp when a sleeping thread became
//! runnable; at switch-in the time since then (or since a preemption) is its run-queue
//! wait, and the off-CPU wait records that part as its runnable tail.
//!
//! User-space lock waits: a thread switched out inside a futex syscall (its saved user
//! registers say which syscall, which futex, which operation and value) waits on that
//! futex; one with a file lock request the kernel deferred (`filelock.rs`) waits for that
//! file. The blocked part of the wait is a lock wait, sampled and attributed with the
//! same stacks; the kernel's evidence of what the wait is for travels as its wait hint.

use agent_common::{
    EST_COUNT_FP_SHIFT, FLAG_KERNEL_THREAD, FLAG_KSTACK_FAILED, FLAG_NO_OFFCPU,
    FLAG_USER_LEAF_ONLY, FLAG_USTACK_FAILED, LockKind, Loss, NO_STACK, OffCpuState, PendingWait,
    RunQueueKind, SampleKey, SampleValue, Signal, StackTrace, THREAD_HAS_RSEQ, THREAD_KERNEL,
    THREAD_PENDING, THREAD_SOCKET_WAIT, THREAD_USER_SNAPSHOT, ThreadState, TotalKey,
    WAIT_HINT_FILE_LOCK, WAIT_HINT_FUTEX, WAIT_HINT_FUTEX_CONDVAR, WAIT_HINT_FUTEX_LOCK,
    WAIT_HINT_KERNEL_LOCK, WAIT_HINT_NONE,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, task_struct},
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_get_prandom_u32, bpf_get_stack, bpf_get_task_stack,
            bpf_task_pt_regs,
        },
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};

use crate::{
    maps::{
        COMMS, SLOT_RSEQ, SLOT_SCHED, SLOT_SYSCALL, add_offcpu_total, add_sample, add_total,
        capture_current_stack, config, count_loss, generation, owns, scratch, set_leaf, set_len,
        store_stack, tuned, wanted, wants,
    },
    net::{is_socket_syscall, socket_wait_begin, socket_wait_end},
    task_storage::TaskStorage,
    threads::{read_task_u32, read_task_u64, thread_of, thread_or_create},
};

/// User stacks walked at switch-out, for threads whose return to user space is not seen.
#[btf_map]
static USER_SNAPSHOT: TaskStorage<StackTrace> = TaskStorage::new();

/// Sampled waits whose user stack is still to be taken, keyed by thread id.
#[map]
static PENDING: HashMap<u32, PendingWait> = HashMap::with_max_entries(4096, 0);

/// Per-CPU scratch for building a [`PendingWait`] (too big for the BPF stack).
#[map]
static PENDING_SCRATCH: PerCpuArray<PendingWait> = PerCpuArray::with_max_entries(1, 0);

/// `TASK_DEAD` in `task->__state`: the thread's final switch-out.
const TASK_DEAD: u32 = 0x80;

#[cfg(bpf_target_arch = "aarch64")]
mod regs {
    /// `struct user_pt_regs`: regs[31], sp, pc.
    pub const SP_OFFSET: usize = 31 * 8;
    pub const IP_OFFSET: usize = 32 * 8;
}
#[cfg(not(bpf_target_arch = "aarch64"))]
mod regs {
    /// `struct pt_regs` on x86-64 (uapi layout): ip and sp.
    pub const IP_OFFSET: usize = 16 * 8;
    pub const SP_OFFSET: usize = 19 * 8;
    /// The block from `r11` to `flags`, read at once: r11, r10, r9, r8, ax, cx, dx, si,
    /// di, orig_ax, ip, cs, flags.
    pub const SYSCALL_BLOCK_OFFSET: usize = 6 * 8;
    pub const SYSCALL_BLOCK_LEN: usize = 13;
    /// `orig_ax`: the syscall number (for an exception, its error code; -1 for an
    /// interrupt).
    pub const ORIG_AX_OFFSET: usize = 15 * 8;
}

/// `FUTEX_CMD_MASK`: the operation without the private and clock flags.
const FUTEX_CMD_MASK: u64 = 0x7f;
const FUTEX_WAIT: u64 = 0;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAIT_REQUEUE_PI: u64 = 11;
const FUTEX_LOCK_PI2: u64 = 13;
/// The futex word of a three-state mutex that is locked and has waiters: a thread that
/// waits for the word to change from this value waits to acquire a lock.
const MUTEX_LOCKED_WITH_WAITERS: u32 = 2;

/// A user-space lock wait as the kernel sees it at switch-out.
struct UserWait {
    /// The futex address, or the file's inode number.
    object: u64,
    kind: LockKind,
    /// `WAIT_HINT_*`: the kernel's evidence of what the wait is for.
    hint: u8,
}

/// The evidence of a futex wait for the word to change from `value`.
#[inline(always)]
fn futex_wait(uaddr: u64, value: u32) -> UserWait {
    UserWait {
        object: uaddr,
        kind: LockKind::Futex,
        hint: if value == MUTEX_LOCKED_WITH_WAITERS {
            WAIT_HINT_FUTEX_LOCK
        } else {
            WAIT_HINT_FUTEX
        },
    }
}

/// The syscall a switched-out thread is inside, from its saved user registers: its
/// number and first three arguments.
struct Syscall {
    nr: u32,
    args: [u64; 3],
}

/// The syscall `task` (the current task) is inside, if `wanted` says yes to its number
/// and its saved user registers are a syscall entry's: it saves the return address in
/// both `cx` and `ip` and the flags in both `r11` and `flags`, which tells it apart from
/// an interrupt or a fault. The number alone is read first: most switch-outs (a pipe
/// read, a sleep) are in no syscall anyone wants.
#[cfg(not(bpf_target_arch = "aarch64"))]
#[inline(always)]
fn syscall_of(task: *mut task_struct, wanted: impl Fn(u32) -> bool) -> Option<Syscall> {
    // SAFETY: `task` is the current task's BTF pointer.
    let regs = unsafe { bpf_task_pt_regs(task) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // SAFETY: a fault-tolerant read of the saved user registers.
    let nr: u64 = unsafe { bpf_probe_read_kernel(regs.add(regs::ORIG_AX_OFFSET).cast()) }.ok()?;
    if !wanted(nr as u32) {
        return None;
    }
    // SAFETY: a fault-tolerant read of the saved user registers.
    let block: [u64; regs::SYSCALL_BLOCK_LEN] =
        unsafe { bpf_probe_read_kernel(regs.add(regs::SYSCALL_BLOCK_OFFSET).cast()) }.ok()?;
    let [r11, _, _, _, _, cx, dx, si, di, orig_ax, ip, cs, flags] = block;
    if cs & 3 != 3 || cx != ip || r11 != flags {
        return None;
    }
    Some(Syscall {
        nr: orig_ax as u32,
        args: [di, si, dx],
    })
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
fn syscall_of(_task: *mut task_struct, _wanted: impl Fn(u32) -> bool) -> Option<Syscall> {
    None
}

/// Whether syscall `nr` is one of the futex waits.
#[inline(always)]
fn is_futex_wait(nr: u32) -> bool {
    nr == config!(futex_nr) || nr == config!(futex_wait_nr) || nr == config!(futex_waitv_nr)
}

/// What a thread blocked inside `call` waits for, if that is a futex wait syscall, or a
/// file lock the kernel deferred (`file_lock`: the thread's note of it, kind and inode).
/// The futex operation and the value waited on tell a lock acquire from other waits.
#[inline(always)]
fn user_wait_of(call: &Syscall, file_lock: (u8, u64)) -> Option<UserWait> {
    let nr = call.nr;
    let [di, si, dx] = call.args;
    let (file_kind, inode) = file_lock;
    // A deferred flock or record lock is waited for inside `flock` or `fcntl` (a request
    // interrupted by a signal leaves its note behind: outside them it means nothing); a
    // lease is waited for between two tracepoints that always fire.
    if file_kind != 0
        && (file_kind == LockKind::FileLease as u8
            || nr == config!(flock_nr)
            || nr == config!(fcntl_nr))
    {
        return Some(UserWait {
            object: inode,
            kind: LockKind::from_u8(file_kind).unwrap_or(LockKind::Other),
            hint: WAIT_HINT_FILE_LOCK,
        });
    }
    if nr == config!(futex_nr) {
        // futex(uaddr, op, val, ...)
        match si & FUTEX_CMD_MASK {
            FUTEX_WAIT | FUTEX_WAIT_BITSET => Some(futex_wait(di, dx as u32)),
            FUTEX_WAIT_REQUEUE_PI => Some(UserWait {
                object: di,
                kind: LockKind::Futex,
                hint: WAIT_HINT_FUTEX_CONDVAR,
            }),
            FUTEX_LOCK_PI | FUTEX_LOCK_PI2 => Some(UserWait {
                object: di,
                kind: LockKind::FutexPi,
                hint: WAIT_HINT_FUTEX_LOCK,
            }),
            _ => None,
        }
    } else if nr == config!(futex_wait_nr) {
        // futex_wait(uaddr, val, mask, flags, timeout, clockid)
        Some(futex_wait(di, si as u32))
    } else if nr == config!(futex_waitv_nr) {
        // `struct futex_waitv { u64 val; u64 uaddr; ... }`: the first futex's address, read
        // in the waiter's own context.
        // SAFETY: a fault-tolerant read of the current thread's own memory.
        let uaddr = unsafe { bpf_probe_read_user((di + 8) as *const u64) }.ok()?;
        Some(UserWait {
            object: uaddr,
            kind: LockKind::Futex,
            hint: WAIT_HINT_FUTEX,
        })
    } else {
        None
    }
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`, the switch-out half. Switch-out and switch-in are two
/// programs on the same tracepoint so the verifier checks each on its own (as one
/// program, every path of one half multiplies the paths of the other).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_out_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let preempt: u64 = ctx.arg(0);
    let prev: *mut task_struct = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    switch_out(
        &ctx,
        generation(),
        now,
        prev,
        preempt & 0xff != 0,
        prev_state as u32,
    );
    0
}

/// The switch-in half of `sched_switch`.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_in_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let next: *mut task_struct = ctx.arg(2);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    switch_in(&ctx, generation(), now, next);
    0
}

/// `sched_wakeup(struct task_struct *p)`: an off-CPU thread became runnable.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let task: *mut task_struct = ctx.arg(0);
    if let Some(thread) = thread_of(task)
        && thread.off_since_ns != 0
        && thread.woken_ns == 0
    {
        // SAFETY: helper without arguments.
        thread.woken_ns = unsafe { bpf_ktime_get_ns() };
    }
    0
}

/// `sched_wakeup_new(struct task_struct *p)`: a new thread is runnable for the first time.
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    if !wants(Signal::RunQueue) {
        return 0;
    }
    let task: *mut task_struct = ctx.arg(0);
    if let Some(thread) = thread_or_create(&ctx, Signal::RunQueue, task, false)
        && wanted(thread.tgid)
    {
        // SAFETY: helper without arguments.
        thread.woken_ns = unsafe { bpf_ktime_get_ns() };
    }
    0
}

/// `task_rename(struct task_struct *task, const char *comm)`: keep thread names current.
#[btf_tracepoint(function = "task_rename")]
pub fn task_rename_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let task: *mut task_struct = ctx.arg(0);
    let comm: *const u8 = ctx.arg(1);
    let tid = read_task_u32(task, config!(task_pid_offset));
    let mut name = [0u8; 16];
    // SAFETY: the kernel's NUL-terminated new name; the copy is bounded by `name`.
    if tid != 0 && unsafe { bpf_probe_read_kernel_str_bytes(comm, &mut name) }.is_ok() {
        let _ = COMMS.insert(tid, name, 0);
    }
    0
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`:
/// a new program, a new name.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec_btf(_ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    if let Ok(comm) = aya_ebpf::helpers::bpf_get_current_comm() {
        let _ = COMMS.insert(tid, comm, 0);
    }
    0
}

/// `rseq_update(struct task_struct *t)`: the current thread is about to return to user
/// space after having been switched out; its user registers are those of the wait.
#[btf_tracepoint(function = "rseq_update")]
pub fn rseq_update_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    // SAFETY: helper without arguments; the current task is always valid.
    let task = unsafe { bpf_get_current_task_btf() };
    let Some(thread) = thread_of(task) else {
        return 0;
    };
    if thread.flags & (THREAD_PENDING | THREAD_SOCKET_WAIT) == 0 {
        return 0;
    }
    let generation = generation();
    let mut ustack = None;
    if thread.flags & THREAD_PENDING != 0 {
        thread.flags &= !THREAD_PENDING;
        let stack = capture_current_stack(&ctx, Signal::OffCpu, generation, SLOT_RSEQ, true);
        finalize_pending(&ctx, generation, thread.tid, stack, 0);
        ustack = Some(stack);
    }
    if thread.flags & THREAD_SOCKET_WAIT != 0 {
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        socket_wait_end(&ctx, generation, task, thread, now, || match ustack {
            Some(stack) => stack,
            None => capture_current_stack(&ctx, Signal::SocketWait, generation, SLOT_SYSCALL, true),
        });
    }
    0
}

#[inline(always)]
fn switch_out(
    ctx: &BtfTracePointContext,
    generation: u32,
    now: u64,
    prev: *mut task_struct,
    preempt: bool,
    raw_state: u32,
) {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    if pid_tgid as u32 == 0 || !wanted((pid_tgid >> 32) as u32) {
        return;
    }
    let dying = !preempt && raw_state & TASK_DEAD != 0;
    let thread = if dying {
        thread_of(prev)
    } else {
        thread_or_create(ctx, Signal::OffCpu, prev, true)
    };
    let Some(thread) = thread else {
        return;
    };
    if thread.flags & THREAD_PENDING != 0 {
        // Blocked again before returning to user space: the user registers are still the
        // wait's, unless rseq was unregistered meanwhile (checked against the saved ones).
        thread.flags &= !THREAD_PENDING;
        if dying {
            let _ = PENDING.remove(thread.tid);
        } else {
            finalize_at_switch_out(ctx, generation, thread.tid);
        }
    }
    if dying {
        return;
    }
    thread.off_since_ns = now;
    thread.woken_ns = 0;
    thread.state = OffCpuState::from_task_state(preempt, raw_state) as u8;
    thread.wait_hint = if thread.lock_since_ns != 0 {
        WAIT_HINT_KERNEL_LOCK
    } else {
        WAIT_HINT_NONE
    };
    thread.futex_uaddr = 0;
    let want_lock = wants(Signal::Lock);
    let want_offcpu = wants(Signal::OffCpu);
    // A socket wait starts at the first switch-out inside the syscall and lasts until the
    // return to user space: a thread that blocks again inside it keeps its start.
    let socket_starts = wants(Signal::SocketWait) && thread.flags & THREAD_SOCKET_WAIT == 0;
    let user_waits = want_lock || want_offcpu;
    let file_lock = thread.file_lock_kind != 0;
    let wanted = |nr: u32| {
        (socket_starts && is_socket_syscall(nr)) || (user_waits && (file_lock || is_futex_wait(nr)))
    };
    if (user_waits || socket_starts)
        && thread.state != OffCpuState::Runnable as u8
        && thread.flags & THREAD_KERNEL == 0
        && let Some(call) = syscall_of(prev, wanted)
    {
        if socket_starts {
            socket_wait_begin(thread, call.nr, (call.args[0], call.args[1]), now);
        }
        if user_waits
            && let Some(wait) = user_wait_of(&call, (thread.file_lock_kind, thread.file_lock_ino))
        {
            if thread.wait_hint == WAIT_HINT_NONE {
                thread.wait_hint = wait.hint;
            }
            // Blocked on a kernel lock inside the syscall (the mmap lock, taken by a fault
            // on the futex word): a kernel lock wait, which `contention_end` counts. Not
            // twice.
            if want_lock && thread.lock_since_ns == 0 {
                thread.futex_uaddr = wait.object;
                thread.futex_kind = wait.kind as u8;
            }
        }
    }
    // User stacks: for the off-CPU and lock waits, and for a socket wait in progress.
    let stacks_wanted = want_offcpu || want_lock || thread.flags & THREAD_SOCKET_WAIT != 0;
    if !stacks_wanted || thread.flags & (THREAD_HAS_RSEQ | THREAD_KERNEL) != 0 {
        return;
    }
    let rseq_offset = config!(task_rseq_offset);
    if rseq_offset != 0 && read_task_u64(prev, rseq_offset) != 0 {
        thread.flags |= THREAD_HAS_RSEQ;
        thread.flags &= !THREAD_USER_SNAPSHOT;
        return;
    }
    // No rseq: this thread's return to user space is invisible, so walk its user stack
    // now, in its own context.
    thread.flags &= !THREAD_USER_SNAPSHOT;
    if let Some(snapshot) = USER_SNAPSHOT.get_or_create(prev) {
        // SAFETY: the thread's own storage; the buffer size is the array's size.
        let snapshot = unsafe { &mut *snapshot };
        // At `sched_switch` the current task is `prev`: its process's tables, if any.
        let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
        if crate::unwind::walk_user_stack(tgid, snapshot) {
            if snapshot.len > 0 {
                thread.flags |= THREAD_USER_SNAPSHOT;
            }
            return;
        }
        // SAFETY: the helper writes at most the byte length passed, which is exactly the
        // size of `snapshot.ips` (this thread's own storage, borrowed mutably here only);
        // `ctx` is this program's context, and at `sched_switch` the current task is
        // `prev`, so BPF_F_USER_STACK walks the switching-out thread's own user stack.
        let written = unsafe {
            bpf_get_stack(
                ctx.as_ptr(),
                snapshot.ips.as_mut_ptr().cast(),
                core::mem::size_of_val(&snapshot.ips) as u32,
                u64::from(BPF_F_USER_STACK),
            )
        };
        if written > 0 {
            set_len(snapshot, written as usize / 8, true);
            thread.flags |= THREAD_USER_SNAPSHOT;
        }
    }
}

#[inline(always)]
fn switch_in(ctx: &BtfTracePointContext, generation: u32, now: u64, next: *mut task_struct) {
    let Some(thread) = thread_of(next) else {
        return;
    };
    if thread.flags & (THREAD_SOCKET_WAIT | THREAD_HAS_RSEQ) == THREAD_SOCKET_WAIT {
        // A socket wait of a thread without rseq: its return to user space is not seen,
        // so the wait ends here, with the user stack walked at its switch-out.
        let snapshot = thread.flags & THREAD_USER_SNAPSHOT != 0;
        socket_wait_end(ctx, generation, next, thread, now, || {
            match USER_SNAPSHOT.lookup(next) {
                // SAFETY: the thread's storage; it is off CPU, nobody else writes it.
                Some(stack) if snapshot => {
                    store_stack(ctx, Signal::SocketWait, generation, unsafe { &*stack })
                }
                _ => NO_STACK,
            }
        });
    }
    let off_since = thread.off_since_ns;
    let woken = thread.woken_ns;
    thread.off_since_ns = 0;
    thread.woken_ns = 0;
    // The runnable tail: since the preemption, or since the wakeup.
    let preempted = thread.state == OffCpuState::Runnable as u8 && off_since != 0;
    let runnable_since = if preempted { off_since } else { woken };
    let tail_ns = if runnable_since != 0 && runnable_since <= now {
        now - runnable_since
    } else {
        0
    };
    if wants(Signal::RunQueue) && runnable_since != 0 {
        let kind = if preempted {
            RunQueueKind::Preempted
        } else {
            RunQueueKind::Woken
        };
        let key = TotalKey {
            tgid: thread.tgid,
            tid: thread.tid,
            signal: Signal::RunQueue as u8,
            class: kind as u8,
            ..TotalKey::default()
        };
        add_total(ctx, generation, &key, tail_ns, 0);
    }
    let want_offcpu = wants(Signal::OffCpu);
    let futex = if wants(Signal::Lock) {
        thread.futex_uaddr
    } else {
        0
    };
    thread.futex_uaddr = 0;
    if off_since == 0 || off_since > now || !(want_offcpu || futex != 0) {
        return;
    }
    let wait_ns = now - off_since;
    let tail_ns = if tail_ns > wait_ns { wait_ns } else { tail_ns };
    let threshold = if want_offcpu {
        tuned!(offcpu_stack_threshold_ns)
    } else {
        tuned!(lock_stack_threshold_ns)
    };
    let (est_ns, est_count_fp) = if wait_ns >= threshold {
        (0, 0)
    } else {
        // Threshold sampling: keep with probability wait/threshold; a kept sample then
        // stands for `threshold` nanoseconds and `threshold / wait` waits.
        // SAFETY: helper without arguments.
        let draw = (u64::from(unsafe { bpf_get_prandom_u32() }) * threshold) >> 32;
        if draw >= wait_ns {
            if want_offcpu {
                add_offcpu_total(
                    ctx,
                    generation,
                    (thread.tgid, thread.tid),
                    (thread.state, thread.wait_hint),
                    wait_ns,
                    tail_ns,
                );
            }
            if futex != 0 {
                add_futex_total(ctx, generation, thread, wait_ns - tail_ns);
            }
            return;
        }
        (
            threshold,
            (threshold << EST_COUNT_FP_SHIFT) / wait_ns.max(1),
        )
    };
    let Some(pending) = PENDING_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch of this program.
    let pending = unsafe { &mut *pending };
    pending.wait_ns = wait_ns;
    pending.tail_ns = tail_ns;
    pending.est_ns = est_ns;
    pending.est_count_fp = est_count_fp;
    pending.tgid = thread.tgid;
    pending.state = thread.state;
    pending.wait_hint = thread.wait_hint;
    pending.flags = if want_offcpu { 0 } else { FLAG_NO_OFFCPU };
    pending.futex_uaddr = futex;
    pending.futex_kind = thread.futex_kind;
    (pending.lock_dev, pending.lock_holder) = if thread.wait_hint == WAIT_HINT_FILE_LOCK {
        (thread.file_lock_dev, thread.file_lock_holder)
    } else {
        (0, 0)
    };
    let blocked_ns = wait_ns - tail_ns;
    // The lock sample's share: the blocked part, exact or scaled like the wait.
    (pending.lock_ns, pending.lock_est_ns) = if est_count_fp == 0 {
        (blocked_ns, 0)
    } else {
        (0, (blocked_ns * est_count_fp) >> EST_COUNT_FP_SHIFT)
    };
    // SAFETY: `next` is a BTF task pointer; the buffer is the scratch stack's array.
    let written = unsafe {
        bpf_get_task_stack(
            next,
            pending.kstack.ips.as_mut_ptr().cast(),
            core::mem::size_of_val(&pending.kstack.ips) as u32,
            0,
        )
    };
    if written < 0 {
        count_loss(ctx, Signal::OffCpu, Loss::KernelStackFailed);
        pending.flags |= FLAG_KSTACK_FAILED;
        pending.kstack.len = 0;
    } else {
        set_len(&mut pending.kstack, written as usize / 8, false);
    }
    let tid = thread.tid;
    if thread.flags & THREAD_KERNEL != 0 {
        pending.flags |= FLAG_KERNEL_THREAD;
        emit(ctx, generation, tid, pending, NO_STACK);
    } else if thread.flags & THREAD_USER_SNAPSHOT != 0 {
        let ustack = match USER_SNAPSHOT.lookup(next) {
            // SAFETY: the thread's storage; it is off CPU, nobody else writes it.
            Some(snapshot) => store_stack(ctx, Signal::OffCpu, generation, unsafe { &*snapshot }),
            None => NO_STACK,
        };
        emit(ctx, generation, tid, pending, ustack);
    } else if thread.flags & THREAD_HAS_RSEQ != 0 {
        // SAFETY: `next` is a BTF task pointer.
        let regs = unsafe { bpf_task_pt_regs(next) } as *const u8;
        (pending.user_ip, pending.user_sp) = read_user_regs(regs);
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value, the 1 KiB entry would be copied onto the 512-byte BPF stack"
        )]
        let inserted = PENDING.insert(tid, &*pending, 0);
        if inserted.is_err() {
            count_loss(ctx, Signal::OffCpu, Loss::PendingFull);
            pending.flags |= FLAG_USTACK_FAILED;
            emit(ctx, generation, tid, pending, NO_STACK);
            return;
        }
        thread.flags |= THREAD_PENDING;
    } else {
        pending.flags |= FLAG_USTACK_FAILED;
        emit(ctx, generation, tid, pending, NO_STACK);
    }
}

/// A pending wait of the current thread, which blocks again before having returned to
/// user space.
#[inline(never)]
fn finalize_at_switch_out(ctx: &BtfTracePointContext, generation: u32, tid: u32) {
    let Some(pending) = PENDING.get_ptr(tid) else {
        return;
    };
    // SAFETY: the entry is this thread's; only it removes it.
    let (saved_ip, saved_sp) = unsafe { ((*pending).user_ip, (*pending).user_sp) };
    // SAFETY: helpers on the current task, which is always valid.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if read_user_regs(regs) == (saved_ip, saved_sp) {
        let ustack = capture_current_stack(ctx, Signal::OffCpu, generation, SLOT_SCHED, true);
        finalize_pending(ctx, generation, tid, ustack, 0);
        return;
    }
    // The thread ran user code since (rseq unregistered): only the leaf frame is known.
    count_loss(ctx, Signal::OffCpu, Loss::UserLeafOnly);
    let ustack = match scratch(SLOT_SCHED) {
        Some(leaf) => {
            set_leaf(leaf, saved_ip);
            store_stack(ctx, Signal::OffCpu, generation, leaf)
        }
        None => NO_STACK,
    };
    finalize_pending(ctx, generation, tid, ustack, FLAG_USER_LEAF_ONLY);
}

#[inline(never)]
fn finalize_pending<C: EbpfContext>(ctx: &C, generation: u32, tid: u32, ustack: u64, flags: u8) {
    let Some(pending) = PENDING.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: the entry is this thread's and is removed right after its last use.
    let pending = unsafe { &mut *pending };
    pending.flags |= flags;
    emit(ctx, generation, tid, pending, ustack);
    let _ = PENDING.remove(tid);
}

/// Adds a futex wait's blocked part to the lock totals.
#[inline(always)]
fn add_futex_total<C: EbpfContext>(
    ctx: &C,
    generation: u32,
    thread: &ThreadState,
    blocked_ns: u64,
) {
    let key = TotalKey {
        tgid: thread.tgid,
        tid: thread.tid,
        signal: Signal::Lock as u8,
        class: thread.futex_kind,
        ..TotalKey::default()
    };
    add_total(ctx, generation, &key, blocked_ns, 0);
}

/// Adds a sampled wait with its stacks, and its exact amount to the totals: as an
/// off-CPU wait, and as a lock wait when it was a futex wait.
#[inline(never)]
fn emit<C: EbpfContext>(ctx: &C, generation: u32, tid: u32, pending: &PendingWait, ustack: u64) {
    let kstack = store_stack(ctx, Signal::OffCpu, generation, &pending.kstack);
    if pending.futex_uaddr != 0 {
        let key = SampleKey {
            tgid: pending.tgid,
            tid,
            kstack,
            ustack,
            signal: Signal::Lock as u8,
            class: pending.futex_kind,
            flags: pending.flags & !FLAG_NO_OFFCPU,
            detail: pending.wait_hint,
            object: [
                pending.futex_uaddr,
                u64::from(pending.lock_dev),
                u64::from(pending.lock_holder),
            ],
            ..SampleKey::default()
        };
        let value = SampleValue {
            ns: pending.lock_ns,
            count: u64::from(pending.est_count_fp == 0),
            est_ns: pending.lock_est_ns,
            est_count_fp: pending.est_count_fp,
            tail_ns: 0,
        };
        add_sample(ctx, generation, &key, &value);
        let total = TotalKey {
            tgid: pending.tgid,
            tid,
            signal: Signal::Lock as u8,
            class: pending.futex_kind,
            ..TotalKey::default()
        };
        add_total(
            ctx,
            generation,
            &total,
            pending.wait_ns - pending.tail_ns,
            0,
        );
    }
    if pending.flags & FLAG_NO_OFFCPU != 0 {
        return;
    }
    let key = SampleKey {
        tgid: pending.tgid,
        tid,
        kstack,
        ustack,
        signal: Signal::OffCpu as u8,
        class: pending.state,
        flags: pending.flags,
        detail: pending.wait_hint,
        ..SampleKey::default()
    };
    let exact = pending.est_count_fp == 0;
    let value = SampleValue {
        ns: if exact { pending.wait_ns } else { 0 },
        count: u64::from(exact),
        est_ns: pending.est_ns,
        est_count_fp: pending.est_count_fp,
        tail_ns: if exact { pending.tail_ns } else { 0 },
    };
    add_sample(ctx, generation, &key, &value);
    add_offcpu_total(
        ctx,
        generation,
        (pending.tgid, tid),
        (pending.state, pending.wait_hint),
        pending.wait_ns,
        pending.tail_ns,
    );
}

#[inline(always)]
fn read_user_regs(regs: *const u8) -> (u64, u64) {
    if regs.is_null() {
        return (0, 0);
    }
    // SAFETY: fault-tolerant reads of the saved user registers.
    unsafe {
        (
            bpf_probe_read_kernel(regs.add(regs::IP_OFFSET).cast::<u64>()).unwrap_or(0),
            bpf_probe_read_kernel(regs.add(regs::SP_OFFSET).cast::<u64>()).unwrap_or(0),
        )
    }
}
