//! Stack samples in their totals groups: the totals entry each sample's amounts are
//! calibrated against (`group_of`), and the order both are sorted in so that a period's
//! samples are matched with their totals by walking them side by side, without copying
//! the samples into per-group vectors.

use agent_common::{SampleKey, SampleValue, Signal, TotalKey};

/// A stack sample in its totals group: the group, the sample's key and value.
pub(crate) type Member<'a> = (TotalKey, &'a SampleKey, &'a SampleValue);

/// A total order of totals keys (groups are sorted by it to be matched with their
/// totals).
pub(crate) fn group_order(key: &TotalKey) -> (u8, u32, u32, u8, u32, u8, u8) {
    (
        key.signal, key.tgid, key.tid, key.class, key.aux, key.detail, key.pad,
    )
}

/// The first group's run of `members` (sorted by group) and what follows it.
pub(crate) fn split_run<'m, 'a>(members: &'m [Member<'a>]) -> (&'m [Member<'a>], &'m [Member<'a>]) {
    let group = members.first().map(|(group, ..)| *group);
    let end = members
        .iter()
        .position(|(other, ..)| Some(*other) != group)
        .unwrap_or(members.len());
    members.split_at(end)
}

/// The totals entry a sample's amounts are calibrated against.
pub(crate) fn group_of(key: &SampleKey) -> TotalKey {
    let signal = key.signal;
    // Syscall totals are per process and syscall; lock totals leave the address out.
    let (tid, class, aux) = match Signal::from_u8(signal) {
        Some(Signal::Syscall) => (0, 0, key.aux),
        Some(Signal::Lock) => (key.tid, key.class, 0),
        _ => (key.tid, key.class, key.aux),
    };
    // Off-CPU groups keep the wait hint (`detail`), like their totals.
    let detail = if signal == Signal::OffCpu as u8 {
        key.detail
    } else {
        0
    };
    TotalKey {
        tgid: key.tgid,
        tid,
        signal,
        class,
        detail,
        aux,
        ..TotalKey::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(signal: Signal, tid: u32, ustack: u64) -> SampleKey {
        SampleKey {
            signal: signal as u8,
            tgid: 10,
            tid,
            ustack,
            ..SampleKey::default()
        }
    }

    #[test]
    fn sorted_members_split_into_one_run_per_group() {
        let keys = [
            sample(Signal::Lock, 12, 1),
            sample(Signal::OffCpu, 11, 1),
            sample(Signal::Lock, 12, 2),
            sample(Signal::OffCpu, 11, 2),
            sample(Signal::OffCpu, 13, 1),
        ];
        let value = SampleValue::default();
        let mut members: Vec<Member> = keys.iter().map(|k| (group_of(k), k, &value)).collect();
        members.sort_unstable_by_key(|(group, ..)| group_order(group));
        let mut runs = Vec::new();
        let mut rest = &members[..];
        while !rest.is_empty() {
            let (run, after) = split_run(rest);
            runs.push((run[0].0.signal, run[0].0.tid, run.len()));
            rest = after;
        }
        assert_eq!(
            runs,
            [
                (Signal::OffCpu as u8, 11, 2),
                (Signal::OffCpu as u8, 13, 1),
                (Signal::Lock as u8, 12, 2)
            ]
        );
    }
}
