//! Shared by both backends: turning stored rows back into a [`Profile`], and time
//! buckets.

use std::collections::HashMap;

use stallscope_profile::{Frame, FrameId, Labels, Meta, Profile, SampleType};

use super::{Losses, TimeRange};
use crate::batch::SignalDef;

/// Frame shown for a row whose stack is missing from the dictionary (never expected;
/// shown rather than dropped so totals still add up).
pub const MISSING_STACK_FRAME: &str = "[stack missing from the collector's dictionary]";

/// The start of the `resolution_s`-second bucket holding `unix_s`.
pub fn bucket_of(unix_s: i64, resolution_s: i64) -> i64 {
    unix_s - unix_s.rem_euclid(resolution_s.max(1))
}

/// Builds a merged profile from rows: each signal gets its value and count columns
/// (signals sorted by name, so the column order is stable).
pub struct ProfileBuilder {
    profile: Profile,
    columns: HashMap<String, usize>,
    stacks: HashMap<i64, Vec<FrameId>>,
}

impl ProfileBuilder {
    pub fn new(signals: &[SignalDef]) -> Self {
        let mut signals: Vec<&SignalDef> = signals.iter().collect();
        signals.sort_by(|a, b| a.name.cmp(&b.name));
        signals.dedup_by(|a, b| a.name == b.name);
        let mut types = Vec::new();
        let mut columns = HashMap::new();
        for signal in signals {
            columns.insert(signal.name.clone(), types.len());
            types.push(SampleType::new(&signal.value_kind, &signal.value_unit));
            types.push(SampleType::new(&signal.count_kind, &signal.count_unit));
        }
        Self {
            profile: Profile::new(types),
            columns,
            stacks: HashMap::new(),
        }
    }

    pub fn has_stack(&self, id: i64) -> bool {
        self.stacks.contains_key(&id)
    }

    pub fn add_stack(&mut self, id: i64, frames: Vec<Frame>) {
        let ids = frames
            .into_iter()
            .map(|frame| self.profile.intern(frame))
            .collect();
        self.stacks.insert(id, ids);
    }

    /// Adds one row. Rows of a signal without a definition are skipped (they cannot be
    /// given a unit).
    pub fn add(&mut self, signal: &str, labels: &Labels, stack: i64, value: i64, count: i64) {
        let Some(&column) = self.columns.get(signal) else {
            return;
        };
        let frames = match self.stacks.get(&stack) {
            Some(frames) => frames.clone(),
            None => vec![self.profile.intern(Frame::synthetic(MISSING_STACK_FRAME))],
        };
        let mut values = vec![0; self.profile.sample_types.len()];
        values[column] = value;
        values[column + 1] = count;
        self.profile.add(frames, labels.clone(), &values);
    }

    pub fn finish(mut self, range: TimeRange, filter_note: String, losses: Losses) -> Profile {
        self.profile.meta = Meta {
            start_unix_ns: range.from_unix_ns,
            duration_ns: range.until_unix_ns.saturating_sub(range.from_unix_ns),
            host: String::new(),
            notes: vec![
                concat!("stallscope-collector ", env!("CARGO_PKG_VERSION")).to_owned(),
                filter_note,
            ],
            losses,
            default_sample_type: 0,
            events: Vec::new(),
            binaries: Vec::new(),
        };
        self.profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_floor_to_the_resolution() {
        assert_eq!(bucket_of(125, 10), 120);
        assert_eq!(bucket_of(120, 10), 120);
        assert_eq!(bucket_of(-5, 10), -10);
        assert_eq!(bucket_of(7, 0), 7);
    }
}
