//! The raw syscall hooks, `sys_enter` and `sys_exit` (BTF raw tracepoints), shared by the
//! syscall signal (`syscall.rs`) and the network signal's socket waits (`net.rs`):
//! `sys_enter` keeps the syscall's number and start time in the thread's state, `sys_exit`
//! hands its duration to each family that wants it. With only the network signal on,
//! `sys_enter` keeps state for the socket syscalls alone. When the syscall signal samples
//! (`syscall_sample_every` > 1), `sys_enter` only counts the syscalls it does not time,
//! with no clock read and no thread state.

use agent_common::{Signal, THREAD_IN_SYSCALL, THREAD_SYSCALL_TIMED};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_prandom_u32},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{generation, owns, tuned, wanted, wanted_target_current, wants},
    net::{is_socket_syscall, socket_wait},
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
    // The network signal needs only the socket syscalls: every other untimed syscall
    // skips the thread state.
    if !timed && !(wants(Signal::SocketWait) && is_socket_syscall(nr)) {
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
    if timed {
        thread.flags |= THREAD_SYSCALL_TIMED;
    } else {
        thread.flags &= !THREAD_SYSCALL_TIMED;
    }
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
    let timed = thread.flags & THREAD_SYSCALL_TIMED != 0;
    thread.flags &= !(THREAD_IN_SYSCALL | THREAD_SYSCALL_TIMED);
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
    let generation = generation();
    let nr = thread.syscall_nr;
    let ids = (thread.tgid, thread.tid);
    if timed && wants(Signal::Syscall) {
        syscall_latency(&ctx, generation, task, ids, nr, duration);
    }
    if wants(Signal::SocketWait) {
        socket_wait(&ctx, generation, task, ids, nr, duration);
    }
    0
}
