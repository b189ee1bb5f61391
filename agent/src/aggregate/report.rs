//! What a profile's meta says besides its samples: losses per signal and reason, the
//! exact totals, change events, the binaries the stacks ran through, and the reads that
//! missed their deadline.

use std::collections::HashMap;

use agent_common::{Loss, Signal, StackEnd, TotalKey};
use stallscope_profile::Meta;

use crate::{aggregate::accumulate::Accumulator, naming};

impl Accumulator {
    /// Change events, the binaries the stacks ran through (and which lack frame
    /// pointers), and the reads that missed their deadline.
    pub(super) fn report_identity(&mut self, meta: &mut Meta) {
        meta.events = self.resolver.take_events();
        meta.binaries = self.resolver.take_binaries();
        meta.losses.insert(
            "user_stack_probably_truncated".to_owned(),
            self.resolver.truncated_stacks,
        );
        meta.losses.insert(
            "user_stack_cut_at_unmapped_address".to_owned(),
            self.resolver.cut_stacks,
        );
        self.report_stack_ends(meta);
        let (timed_out, stuck) = self.resolver.read_timeouts();
        meta.losses.insert(
            "process_read_timed_out".to_owned(),
            timed_out.saturating_sub(self.reported_timeouts),
        );
        self.reported_timeouts = timed_out;
        if stuck > 0 {
            meta.notes.push(format!(
                "{stuck} reader threads are stuck in reads of other processes' files (hung filesystem?)"
            ));
        }
        for (path, dwarf_bytes) in self.resolver.symbols_only() {
            meta.notes.push(format!(
                "{path}: function names only (no file:line, no inlined frames): its {} MB of DWARF exceed the {} MB symbolization budget (symbols.dwarf_max_mb)",
                dwarf_bytes >> 20,
                self.resolver.dwarf_max() >> 20
            ));
        }
        for binary in &meta.binaries {
            if binary.frame_pointers == Some(false) {
                meta.notes.push(format!(
                    "{} has no frame pointers: {} of its {} stacks probably truncated",
                    binary.path, binary.truncated_stacks, binary.stacks
                ));
            }
        }
        self.resolver.end_period();
        self.user_stacks_done();
    }

    /// User stacks by how their walk ended: the table-driven walk's truncations are
    /// counted per reason (`user_stack_unwind.<reason>`), and a note gives the whole.
    fn report_stack_ends(&mut self, meta: &mut Meta) {
        let ends = std::mem::take(&mut self.user_stack_ends);
        for end in [
            StackEnd::NotCovered,
            StackEnd::Unsupported,
            StackEnd::ReadFailed,
            StackEnd::DepthLimit,
            StackEnd::NoRegisters,
        ] {
            meta.losses.insert(
                format!("user_stack_unwind.{}", naming::stack_end_label(end)),
                ends[end as usize],
            );
        }
        let by_table: u64 = ends[1..].iter().sum();
        if by_table > 0 {
            meta.notes.push(format!(
                "user stacks: {} by the kernel's frame-pointer walk, {by_table} by the mixed walk with unwind tables ({} reached an entry point, {} ended where frame pointers did)",
                ends[StackEnd::FramePointerWalk as usize],
                ends[StackEnd::EntryPoint as usize],
                ends[StackEnd::FramePointerEnd as usize]
            ));
        }
    }

    pub(super) fn report_losses(
        &mut self,
        meta: &mut Meta,
        totals: &HashMap<TotalKey, super::sums::Sums>,
    ) {
        for &signal in &self.signals {
            for loss in Loss::ALL {
                let index = loss.index(signal) as usize;
                let delta = self
                    .losses
                    .get(index)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(self.reported_losses.get(index).copied().unwrap_or(0));
                meta.losses.insert(
                    format!("{}.{}", naming::signal_label(signal), loss.name()),
                    delta,
                );
            }
        }
        self.reported_losses.clone_from(&self.losses);
        self.report_wait_window(meta, totals);
        meta.losses.insert(
            "stack_unresolved".to_owned(),
            std::mem::take(&mut self.unresolved_stacks),
        );
        for &signal in &self.signals {
            if signal == Signal::OnCpu {
                continue;
            }
            let (ns, count) = totals
                .iter()
                .filter(|(key, _)| key.signal == signal as u8)
                .fold((0u64, 0u64), |(ns, count), (_, v)| {
                    (ns + v.ns, count + v.count)
                });
            meta.notes.push(format!(
                "{} exact total: {ns} ns over {count} events",
                naming::signal_label(signal)
            ));
        }
    }
}
