//! Off-CPU time from the classic `sched:sched_switch` tracepoint: the fallback for kernels
//! without BTF tracepoints (or when forced). No task pointers here, so both stacks are
//! walked at every switch-out in the thread's own context and every wait gets them:
//! exact, and more expensive than the BTF path.

use agent_common::{Loss, OffCpuState, SampleKey, SampleValue, Signal, TpThreadState};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};

use crate::maps::{
    SLOT_SCHED, add_offcpu_total, add_sample, capture_current_stack, config, count_loss,
    generation, owns, remember_comm, wanted,
};

/// Per-thread state, keyed by thread id.
#[map]
static THREADS: HashMap<u32, TpThreadState> = HashMap::with_max_entries(32768, 0);

/// `TASK_REPORT` bits of the record's `prev_state`: X (dead) and Z (zombie).
const REPORTED_EXIT: u64 = 0x10 | 0x20;

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch_tp(ctx: TracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let generation = generation();
    // SAFETY: offsets come from the tracepoint's format file; reads are bounds-checked.
    let (prev_state, next_tid) = unsafe {
        (
            ctx.read_at::<u64>(config!(tp_prev_state_offset) as usize)
                .unwrap_or(0),
            ctx.read_at::<u32>(config!(tp_next_pid_offset) as usize)
                .unwrap_or(0),
        )
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid != 0 && wanted(tgid) {
        if prev_state & REPORTED_EXIT != 0 {
            let _ = THREADS.remove(tid);
        } else {
            remember_comm(tid);
            let thread = TpThreadState {
                off_since_ns: now,
                tgid,
                state: OffCpuState::from_reported_state(prev_state) as u8,
                kstack: capture_current_stack(&ctx, Signal::OffCpu, generation, SLOT_SCHED, false),
                ustack: capture_current_stack(&ctx, Signal::OffCpu, generation, SLOT_SCHED, true),
                ..TpThreadState::default()
            };
            if THREADS.insert(tid, thread, 0).is_err() {
                count_loss(&ctx, Signal::OffCpu, Loss::ThreadTableFull);
            }
        }
    }
    if next_tid == 0 {
        return 0;
    }
    let Some(thread) = THREADS.get_ptr_mut(next_tid) else {
        return 0;
    };
    // SAFETY: a thread's entry is touched only by its own switch-out and switch-in, which
    // the scheduler serialises.
    let thread = unsafe { &mut *thread };
    if thread.off_since_ns == 0 || thread.off_since_ns > now {
        return 0;
    }
    let wait_ns = now - thread.off_since_ns;
    thread.off_since_ns = 0;
    let key = SampleKey {
        tgid: thread.tgid,
        tid: next_tid,
        kstack: thread.kstack,
        ustack: thread.ustack,
        signal: Signal::OffCpu as u8,
        class: thread.state,
        ..SampleKey::default()
    };
    let value = SampleValue {
        ns: wait_ns,
        count: 1,
        ..SampleValue::default()
    };
    add_sample(&ctx, generation, &key, &value);
    add_offcpu_total(
        &ctx,
        generation,
        (thread.tgid, next_tid),
        (thread.state, 0),
        wait_ns,
        0,
    );
    0
}
