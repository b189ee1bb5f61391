//! The raw syscall hooks of the syscall signal, `sys_enter` and `sys_exit` (BTF raw
//! tracepoints): `sys_enter` keeps the syscall's number and start time in the thread's
//! state, `sys_exit` hands its duration to `syscall.rs`. When the signal samples
//! (`syscall_sample_every` > 1), `sys_enter` only counts the syscalls it does not time,
//! with no clock read and no thread state. (The network signal's socket waits need no
//! syscall hook: they start when a thread blocks inside a socket syscall, `net.rs`.)

use agent_common::{Signal, THREAD_IN_SYSCALL};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_prandom_u32},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{generation, owns, tuned, wanted, wanted_target_current, wants},
    syscall::{count_untimed_syscall, syscall_latency},
    threads::{current_task, thread_of, thread_or_create},
};

/// Whether the syscall signal times this syscall: always, unless it samples one in
/// `syscall_sample_every`, drawn at random (a per-thread or per-CPU counter would alias
/// with threads that alternate on a CPU or syscalls that alternate in a loop).
#[inline(always)]
fn timed_by_syscall_signal() -> bool {
    let every: u32 = tuned!(syscall_sample_every);
    // SAFETY: helper without arguments.
    every <= 1 || unsafe { bpf_get_prandom_u32() } % every == 0
}

/// `sys_enter(struct pt_regs *regs, long id)`.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    if !wanted_target_current() {
        return 0;
    }
    let id: u64 = ctx.arg(1);
    let nr = id as u32;
    let syscall = wants(Signal::Syscall);
    let timed = syscall && timed_by_syscall_signal();
    if syscall && !timed {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if !wanted(tgid) {
            // The agent itself.
            return 0;
        }
        count_untimed_syscall(&ctx, generation(), tgid, nr);
    }
    if !timed {
        return 0;
    }
    let task = current_task();
    let Some(thread) = thread_or_create(&ctx, Signal::Syscall, task, true) else {
        return 0;
    };
    if !wanted(thread.tgid) {
        // The agent itself.
        return 0;
    }
    // SAFETY: helper without arguments.
    thread.syscall_since_ns = unsafe { bpf_ktime_get_ns() };
    thread.syscall_nr = nr;
    thread.syscall_epoch = tuned!(syscall_epoch);
    thread.flags |= THREAD_IN_SYSCALL;
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`.
#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let task = current_task();
    let Some(thread) = thread_of(task) else {
        return 0;
    };
    if thread.flags & THREAD_IN_SYSCALL == 0 {
        return 0;
    }
    thread.flags &= !THREAD_IN_SYSCALL;
    if thread.syscall_epoch != tuned!(syscall_epoch) {
        // Entered before the programs were detached: its exit may be another syscall's.
        return 0;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if thread.syscall_since_ns == 0 || thread.syscall_since_ns > now {
        return 0;
    }
    let duration = now - thread.syscall_since_ns;
    if wants(Signal::Syscall) {
        let ids = (thread.tgid, thread.tid);
        syscall_latency(&ctx, generation(), task, ids, thread.syscall_nr, duration);
    }
    0
}
