//! The profile of one period as the agent assembles it: the frame table, and samples whose
//! label sets are interned strings. A busy host's period holds about 50,000 samples,
//! nearly each with its own label set of a dozen entries; kept as the profile model's
//! owned label maps (a `BTreeMap<String, String>`, about 3 KB each) they were most of the
//! agent's memory at the end of every period (150 MB on the soak's load). Here a sample is
//! its stack, one value and count, and its labels as pairs of string ids: about 200 bytes.
//! `run` turns a period into a wire batch directly (`stream::batch`), which already has a
//! string table; `record` expands it into a [`Profile`] once, when it writes its file.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
};

use stallscope_profile::{Frame, FrameId, HashIndex, Histogram, Labels, Meta, Profile, SampleType};

/// A label set: (key, value) string ids, in the keys' order.
pub type LabelIds = Box<[(u32, u32)]>;

/// One sample of a period: a stack (its id in the period's stack table), labels, and
/// one signal's value and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodSample {
    pub stack: u32,
    pub labels: LabelIds,
    /// The sample type column of the value; the count is the next column, if any.
    pub column: usize,
    pub value: i64,
    pub count: i64,
}

/// A period's profile with interned labels.
#[derive(Debug, Default)]
pub struct PeriodProfile {
    /// The frame table, the metadata and (when kept) the histograms, in the profile
    /// model; its samples stay empty (they are `samples`).
    profile: Profile,
    keep_histograms: bool,
    strings: Vec<Box<str>>,
    string_ids: HashMap<Box<str>, u32>,
    samples: Vec<PeriodSample>,
    index: HashIndex,
    /// The distinct stacks (a period's samples share a few thousand among tens of
    /// thousands), indexed by their hash.
    stacks: Vec<Box<[FrameId]>>,
    stack_index: HashIndex,
}

impl PeriodProfile {
    /// An empty period with the frame table `frames`. Histograms are kept only when
    /// `keep_histograms` (the wire batch does not carry them).
    pub fn new(sample_types: Vec<SampleType>, frames: &[Frame], keep_histograms: bool) -> Self {
        let mut profile = Profile::new(sample_types);
        profile.frames = frames.to_vec();
        Self {
            profile,
            keep_histograms,
            ..Self::default()
        }
    }

    pub fn sample_types(&self) -> &[SampleType] {
        &self.profile.sample_types
    }

    pub fn frames(&self) -> &[Frame] {
        &self.profile.frames
    }

    pub fn meta(&self) -> &Meta {
        &self.profile.meta
    }

    pub fn set_meta(&mut self, meta: Meta) {
        self.profile.meta = meta;
    }

    pub fn samples(&self) -> &[PeriodSample] {
        &self.samples
    }

    /// Takes the samples out (and drops their index), for a conversion that frees each
    /// as it goes.
    pub fn take_samples(&mut self) -> Vec<PeriodSample> {
        self.index = HashIndex::default();
        self.stack_index = HashIndex::default();
        std::mem::take(&mut self.samples)
    }

    /// The frames of a sample's stack id.
    pub fn stack(&self, id: u32) -> &[FrameId] {
        self.stacks.get(id as usize).map_or(&[], |stack| stack)
    }

    /// The text of a string id of a sample's labels.
    pub fn string(&self, id: u32) -> &str {
        self.strings.get(id as usize).map_or("", |s| s)
    }

    /// Interns `frame` into the frame table, returning its id.
    pub fn intern(&mut self, frame: Frame) -> FrameId {
        self.profile.intern(frame)
    }

    /// Index of the sample type `kind`/`unit`, if present.
    pub fn sample_type_index(&self, kind: &str, unit: &str) -> Option<usize> {
        self.profile.sample_type_index(kind, unit)
    }

    fn stack_id(&mut self, stack: &[FrameId]) -> u32 {
        let mut hasher = DefaultHasher::new();
        stack.hash(&mut hasher);
        let hash = hasher.finish();
        let stacks = &self.stacks;
        if let Some(index) = self.stack_index.find(hash, |i| *stacks[i] == *stack) {
            return index as u32;
        }
        self.stack_index.insert(hash, self.stacks.len());
        self.stacks.push(stack.into());
        (self.stacks.len() - 1) as u32
    }

    fn string_id(&mut self, text: &str) -> u32 {
        if let Some(&id) = self.string_ids.get(text) {
            return id;
        }
        let id = u32::try_from(self.strings.len()).unwrap_or(u32::MAX);
        self.strings.push(text.into());
        self.string_ids.insert(text.into(), id);
        id
    }

    /// Adds `value` and `count` (in `column` and the one after it) to the sample with
    /// this stack and labels, creating it if needed.
    pub fn add(
        &mut self,
        column: usize,
        stack: &[FrameId],
        labels: &Labels,
        value: i64,
        count: i64,
    ) {
        let labels: LabelIds = labels
            .iter()
            .map(|(key, value)| (self.string_id(key), self.string_id(value)))
            .collect();
        let stack = self.stack_id(stack);
        let mut hasher = DefaultHasher::new();
        (column, stack, &labels).hash(&mut hasher);
        let hash = hasher.finish();
        let samples = &self.samples;
        let found = self.index.find(hash, |i| {
            let sample = &samples[i];
            sample.column == column && sample.stack == stack && sample.labels == labels
        });
        if let Some(index) = found {
            let sample = &mut self.samples[index];
            sample.value = sample.value.saturating_add(value);
            sample.count = sample.count.saturating_add(count);
            return;
        }
        self.index.insert(hash, self.samples.len());
        self.samples.push(PeriodSample {
            stack,
            labels,
            column,
            value,
            count,
        });
    }

    /// Adds a histogram (merged into one with the same signal and labels), if this
    /// period keeps them.
    pub fn add_histogram(&mut self, histogram: &Histogram) {
        if self.keep_histograms {
            self.profile.add_histogram(histogram);
        }
    }

    /// Whether this period keeps histograms (building one costs its label set).
    pub fn keeps_histograms(&self) -> bool {
        self.keep_histograms
    }

    /// The labels of a sample as a label map.
    pub fn labels(&self, sample: &PeriodSample) -> Labels {
        sample
            .labels
            .iter()
            .map(|&(key, value)| (self.string(key).to_owned(), self.string(value).to_owned()))
            .collect()
    }

    /// The period in the profile model (for `record`'s file and for tests).
    pub fn into_profile(self) -> Profile {
        let mut values = vec![0; self.profile.sample_types.len()];
        let mut profile = Profile::new(self.profile.sample_types.clone());
        for sample in &self.samples {
            values.fill(0);
            if let Some(slot) = values.get_mut(sample.column) {
                *slot = sample.value;
            }
            if let Some(slot) = values.get_mut(sample.column + 1) {
                *slot = sample.count;
            }
            profile.add(
                self.stack(sample.stack).to_vec(),
                self.labels(sample),
                &values,
            );
        }
        profile.frames = self.profile.frames;
        profile.histograms = self.profile.histograms;
        profile.meta = self.profile.meta;
        profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn equal_samples_merge_and_expand_into_the_profile_model() {
        let types = vec![
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("off_cpu_events", "count"),
            SampleType::new("lock_wait", "nanoseconds"),
            SampleType::new("lock_wait_events", "count"),
        ];
        let mut period = PeriodProfile::new(types, &[], false);
        let a = period.intern(Frame::synthetic("a"));
        let b = period.intern(Frame::synthetic("b"));
        let s = labels(&[("pid", "1"), ("state", "S")]);
        let d = labels(&[("pid", "1"), ("state", "D")]);
        period.add(0, &[a, b], &s, 10, 1);
        period.add(0, &[a, b], &s, 5, 2);
        period.add(0, &[a, b], &d, 7, 1);
        period.add(0, &[b], &s, 1, 1);
        // The same stack and labels in another signal's columns: another sample.
        period.add(2, &[a, b], &s, 3, 1);
        assert_eq!(period.samples().len(), 4);
        assert_eq!(
            (period.samples()[0].value, period.samples()[0].count),
            (15, 3)
        );
        assert_eq!(period.labels(&period.samples()[1]), d);
        // One stack table entry per distinct stack.
        assert_eq!(period.samples()[1].stack, period.samples()[0].stack);
        assert_eq!(period.stack(period.samples()[2].stack), [b]);
        period.add_histogram(&Histogram::default());
        let profile = period.into_profile();
        assert!(profile.histograms.is_empty(), "not kept");
        assert_eq!(profile.frames.len(), 2);
        // Expanded, the two signals' samples with one stack and label set are one.
        assert_eq!(profile.samples.len(), 3);
        assert_eq!(profile.samples[0].values, vec![15, 3, 3, 1]);
        assert_eq!(profile.samples[0].labels, s);
        assert_eq!(profile.total(0), 23);
    }
}
