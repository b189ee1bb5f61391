//! On-CPU samples: a perf_event program on every CPU at a fixed frequency, with kernel and
//! user stacks. Each sample weighs the event's sampling period (nanoseconds of CPU time for
//! the `cpu-clock` software event).

use agent_common::{SampleKey, SampleValue, Signal};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::perf_event, programs::PerfEventContext};

use crate::maps::{SLOT_PERF, add_sample, capture_current_stack, generation, owns, wanted};

#[perf_event]
pub fn oncpu_sample(ctx: PerfEventContext) -> i32 {
    if !owns() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 || !wanted(tgid) {
        return 0;
    }
    // SAFETY: the context is the kernel's `bpf_perf_event_data`; reading `sample_period`
    // is a checked context access.
    let period = unsafe { (*ctx.ctx).sample_period };
    let generation = generation();
    let kstack = capture_current_stack(&ctx, Signal::OnCpu, generation, SLOT_PERF, false);
    // Kernel threads have no user stack; the walk returns nothing for them.
    let ustack = capture_current_stack(&ctx, Signal::OnCpu, generation, SLOT_PERF, true);
    let key = SampleKey {
        tgid,
        tid,
        kstack,
        ustack,
        signal: Signal::OnCpu as u8,
        ..SampleKey::default()
    };
    let value = SampleValue {
        ns: period,
        count: 1,
        ..SampleValue::default()
    };
    add_sample(&ctx, generation, &key, &value);
    0
}
