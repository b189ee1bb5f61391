//! The profile of one period as the agent assembles it: the frame table, and samples whose
//! label sets are interned strings. A busy host's period holds about 50,000 samples,
//! nearly each with its own label set of a dozen entries; kept as the profile model's
//! owned label maps (a `BTreeMap<String, String>`, about 3 KB each) they were most of the
//! agent's memory at the end of every period (150 MB on the soak's load). Here a sample is
//! its stack, one value and count, and its labels as varint pairs of string ids in one
//! arena: about 80 bytes (a boxed slice of pairs per sample cost about 160 with it).
//! `run` turns a period into a wire batch directly (`stream::batch`), which already has a
//! string table; `record` expands it into a [`Profile`] once, when it writes its file.

use std::hash::{DefaultHasher, Hash, Hasher};

use stallscope_profile::{Frame, FrameId, HashIndex, Histogram, Labels, Meta, Profile, SampleType};

/// One sample of a period: a stack (its id in the period's stack table), labels (in the
/// period's label arena: [`PeriodProfile::label_ids`]), and one signal's value and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodSample {
    pub stack: u32,
    /// Where the sample's label pairs start in the label arena, and their bytes.
    labels_at: u32,
    labels_len: u32,
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
    /// The strings' ids by their hash (each string is stored once, in `strings`).
    string_index: HashIndex,
    /// Every sample's label pairs, (key, value) string ids in the keys' order, as
    /// varints: about 40 bytes a sample, where a boxed slice of pairs per sample cost
    /// about 110 (a period holds tens of thousands of samples, nearly each with its own
    /// label set).
    label_arena: Vec<u8>,
    samples: Vec<PeriodSample>,
    index: HashIndex,
    /// The distinct stacks (a period's samples share a few thousand among tens of
    /// thousands), indexed by their hash.
    stacks: Vec<Box<[FrameId]>>,
    stack_index: HashIndex,
}

impl PeriodProfile {
    /// An empty period over `table`'s frame table and sample types (taken over, not
    /// copied: the accumulator's table becomes the period's). Histograms are kept only
    /// when `keep_histograms` (the wire batch does not carry them).
    pub fn new(table: Profile, keep_histograms: bool) -> Self {
        let mut profile = table;
        profile.samples.clear();
        profile.histograms.clear();
        profile.meta = Meta::default();
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
        self.string_index = HashIndex::default();
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
        intern_in(&mut self.stacks, &mut self.stack_index, stack)
    }

    fn string_id(&mut self, text: &str) -> u32 {
        intern_in(&mut self.strings, &mut self.string_index, text)
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
        let start = self.label_arena.len();
        for (key, value) in labels {
            let (key, value) = (self.string_id(key), self.string_id(value));
            put_varint(&mut self.label_arena, key);
            put_varint(&mut self.label_arena, value);
        }
        let (Ok(labels_at), Ok(labels_len)) = (
            u32::try_from(start),
            u32::try_from(self.label_arena.len() - start),
        ) else {
            // Over 4 GiB of labels in one period: not representable, and not plausible.
            self.label_arena.truncate(start);
            return;
        };
        let stack = self.stack_id(stack);
        let new_labels = &self.label_arena[start..];
        let mut hasher = DefaultHasher::new();
        (column, stack, new_labels).hash(&mut hasher);
        let hash = hasher.finish();
        let (samples, arena) = (&self.samples, &self.label_arena);
        let found = self.index.find(hash, |i| {
            let sample = &samples[i];
            sample.column == column
                && sample.stack == stack
                && label_bytes(arena, sample) == new_labels
        });
        if let Some(index) = found {
            self.label_arena.truncate(start);
            let sample = &mut self.samples[index];
            sample.value = sample.value.saturating_add(value);
            sample.count = sample.count.saturating_add(count);
            return;
        }
        self.index.insert(hash, self.samples.len());
        self.samples.push(PeriodSample {
            stack,
            labels_at,
            labels_len,
            column,
            value,
            count,
        });
    }

    /// A sample's labels as (key, value) string ids ([`PeriodProfile::string`]).
    pub fn label_ids(&self, sample: &PeriodSample) -> impl Iterator<Item = (u32, u32)> + '_ {
        let mut bytes = label_bytes(&self.label_arena, sample);
        std::iter::from_fn(move || Some((take_varint(&mut bytes)?, take_varint(&mut bytes)?)))
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
        self.label_ids(sample)
            .map(|(key, value)| (self.string(key).to_owned(), self.string(value).to_owned()))
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

/// The id of `item` in `table` (whose positions `index` holds by hash), appended if new.
fn intern_in<T>(table: &mut Vec<Box<T>>, index: &mut HashIndex, item: &T) -> u32
where
    T: Hash + PartialEq + ?Sized,
    for<'a> &'a T: Into<Box<T>>,
{
    let mut hasher = DefaultHasher::new();
    item.hash(&mut hasher);
    let hash = hasher.finish();
    if let Some(found) = index.find(hash, |i| *table[i] == *item) {
        return found as u32;
    }
    index.insert(hash, table.len());
    table.push(item.into());
    u32::try_from(table.len() - 1).unwrap_or(u32::MAX)
}

/// The label bytes of `sample` in `arena`.
fn label_bytes<'a>(arena: &'a [u8], sample: &PeriodSample) -> &'a [u8] {
    let start = sample.labels_at as usize;
    arena
        .get(start..start + sample.labels_len as usize)
        .unwrap_or(&[])
}

/// Appends `value` as a LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a LEB128 varint off the front of `bytes`; `None` at the end.
fn take_varint(bytes: &mut &[u8]) -> Option<u32> {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
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
    fn label_ids_come_back_from_their_varints() {
        let mut arena = Vec::new();
        let ids = [0, 1, 127, 128, 16_383, 16_384, u32::MAX];
        for &id in &ids {
            put_varint(&mut arena, id);
        }
        let mut bytes = &arena[..];
        let back: Vec<u32> = std::iter::from_fn(|| take_varint(&mut bytes)).collect();
        assert_eq!(back, ids);
    }

    #[test]
    fn equal_samples_merge_and_expand_into_the_profile_model() {
        let types = vec![
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("off_cpu_events", "count"),
            SampleType::new("lock_wait", "nanoseconds"),
            SampleType::new("lock_wait_events", "count"),
        ];
        let mut period = PeriodProfile::new(Profile::new(types), false);
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
