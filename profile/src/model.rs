//! The profile model: a table of interned frames and samples that point into it, each with
//! labels (signal, process, thread, state...) and one value per sample type.
//!
//! Stacks are stored innermost frame first, as pprof and the kernel do.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
};

use serde::{Deserialize, Serialize};

/// Index into [`Profile::frames`].
pub type FrameId = u32;

/// Sample labels, sorted by key so equal label sets compare equal.
pub type Labels = BTreeMap<String, String>;

/// What kind of code a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FrameKind {
    User,
    Kernel,
    /// Not code: a marker such as `[unsampled short waits]` or `[unknown]`.
    Synthetic,
}

/// One symbolized frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frame {
    /// Function name (demangled), or a hex address when no symbol was found.
    pub function: String,
    /// The binary or kernel module the code lives in.
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Address in the module (file offset for user code, kernel address for kernel code).
    pub address: u64,
    pub kind: FrameKind,
}

impl Frame {
    pub fn synthetic(name: impl Into<String>) -> Self {
        Self {
            function: name.into(),
            module: None,
            file: None,
            line: None,
            address: 0,
            kind: FrameKind::Synthetic,
        }
    }
}

/// A sample type: what a value counts and in which unit, e.g. `off_cpu`/`nanoseconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SampleType {
    pub kind: String,
    pub unit: String,
}

impl SampleType {
    pub fn new(kind: impl Into<String>, unit: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            unit: unit.into(),
        }
    }
}

/// One aggregated sample: a stack, its labels and one value per sample type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Frame ids, innermost first.
    pub stack: Vec<FrameId>,
    pub values: Vec<i64>,
    pub labels: Labels,
}

/// Facts about how a profile was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Wall-clock start, nanoseconds since the Unix epoch.
    pub start_unix_ns: i64,
    pub duration_ns: i64,
    pub host: String,
    /// Free-form facts, one line each (hooks used, thresholds, kernel, agent version).
    pub notes: Vec<String>,
    /// Events the probes could not record or attribute, by reason.
    pub losses: BTreeMap<String, u64>,
    /// Index of the sample type a viewer should show first.
    pub default_sample_type: usize,
    /// What changed in the workloads during the profile (deploys, restarts).
    #[serde(default)]
    pub events: Vec<ChangeEvent>,
    /// The user-space binaries the profile's stacks run through, with what the agent
    /// learned about them (build-id, debug file, frame pointers, truncated stacks).
    #[serde(default)]
    pub binaries: Vec<BinaryInfo>,
}

/// What kind of change a [`ChangeEvent`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A new process of a service runs a binary with a different build-id than the
    /// service's previous process: a deploy.
    Deploy,
    /// A service's only process ended and a new one with the same build-id started.
    Restart,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploy => "deploy",
            Self::Restart => "restart",
        }
    }
}

/// A change in a workload, observed by the agent, carried with the profile of the period
/// it happened in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// When the new process started, nanoseconds since the Unix epoch.
    pub time_unix_ns: i64,
    pub kind: ChangeKind,
    /// The `service` label both processes share.
    pub service: String,
    pub pid: u32,
    pub previous_pid: Option<u32>,
    /// Build-id (hex) of the new process's executable.
    pub build_id: Option<String>,
    pub previous_build_id: Option<String>,
    pub executable: Option<String>,
    /// Identity labels of the new process (container, pod, unit...).
    #[serde(default)]
    pub labels: Labels,
}

/// A user-space binary seen in the profile's stacks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryInfo {
    /// The path in its process's mount namespace (frames' `module`).
    pub path: String,
    /// Build-id in hex, when the binary has one.
    pub build_id: Option<String>,
    /// Where separate debug information was found, if it was used.
    pub debug_file: Option<String>,
    /// Whether its functions set up frame pointers (a sample of prologues); `None` when
    /// it could not be told.
    pub frame_pointers: Option<bool>,
    /// User stacks whose outermost frame is in this binary.
    pub stacks: u64,
    /// Of those, stacks that end before reaching a thread's entry point: probably cut
    /// short by a function without a frame pointer.
    pub truncated_stacks: u64,
    /// Why the binary could not be symbolized, if it could not.
    pub error: Option<String>,
}

/// A latency histogram of one signal for one label set (a process, a syscall, a
/// device...; the agent keeps one per process, not per thread), with log2 buckets:
/// bucket `i` counts durations in `[2^i, 2^(i+1))` ns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub signal: String,
    pub labels: Labels,
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    pub buckets: Vec<u64>,
}

impl Histogram {
    /// Adds `other` (same signal and labels) into this histogram.
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (total, add) in self.buckets.iter_mut().zip(&other.buckets) {
            *total += add;
        }
    }

    /// Lower bound, in nanoseconds, of bucket `index`.
    pub fn bucket_floor_ns(index: usize) -> u64 {
        if index == 0 { 0 } else { 1u64 << index.min(63) }
    }

    /// The smallest duration at or above which a fraction `1 - q` of the events lie,
    /// to bucket precision (the bucket's upper bound).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let target = (self.count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (index, &count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= target.max(1) {
                return Self::bucket_floor_ns(index + 1).min(self.max_ns.max(1));
            }
        }
        self.max_ns
    }
}

/// A profile: frames, samples and metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub meta: Meta,
    pub sample_types: Vec<SampleType>,
    pub frames: Vec<Frame>,
    pub samples: Vec<Sample>,
    /// Latency histograms of the signals that keep them.
    #[serde(default)]
    pub histograms: Vec<Histogram>,
    #[serde(skip)]
    frame_index: HashMap<Frame, FrameId>,
    #[serde(skip)]
    sample_index: HashIndex,
    #[serde(skip)]
    histogram_index: HashIndex,
}

/// Positions of samples or histograms by a hash of their key (stack or signal, and
/// labels). The keys are not copied into the index: a busy host's profile holds hundreds
/// of thousands of label sets, and a copy of each doubled the agent's memory at the end
/// of every period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashIndex {
    first: HashMap<u64, usize>,
    /// Positions whose hash an earlier key already had (a 64-bit collision: rare).
    more: Vec<(u64, usize)>,
}

impl HashIndex {
    pub fn len(&self) -> usize {
        self.first.len() + self.more.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// The position with this hash whose key `is` accepts.
    pub fn find(&self, hash: u64, is: impl Fn(usize) -> bool) -> Option<usize> {
        let &first = self.first.get(&hash)?;
        if is(first) {
            return Some(first);
        }
        self.more
            .iter()
            .find(|&&(h, index)| h == hash && is(index))
            .map(|&(_, index)| index)
    }

    pub fn insert(&mut self, hash: u64, index: usize) {
        match self.first.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => self.more.push((hash, index)),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(index);
            }
        }
    }
}

fn key_hash<A: Hash + ?Sized>(first: &A, labels: &Labels) -> u64 {
    let mut hasher = DefaultHasher::new();
    first.hash(&mut hasher);
    labels.hash(&mut hasher);
    hasher.finish()
}

impl Profile {
    pub fn new(sample_types: Vec<SampleType>) -> Self {
        Self {
            sample_types,
            ..Self::default()
        }
    }

    /// Interns `frame`, returning its id.
    pub fn intern(&mut self, frame: Frame) -> FrameId {
        if self.frame_index.len() != self.frames.len() {
            self.rebuild_indexes();
        }
        if let Some(&id) = self.frame_index.get(&frame) {
            return id;
        }
        let id = self.frames.len() as FrameId;
        self.frames.push(frame.clone());
        self.frame_index.insert(frame, id);
        id
    }

    /// A one-column copy: the sum of the `nanoseconds` columns, named after them (for
    /// example `off_cpu+on_cpu`). Each sample belongs to one signal, so the sum is that
    /// signal's time; flame graphs and rankings of "where the time went" read this.
    #[must_use]
    pub fn time_only(&self) -> Profile {
        let columns: Vec<usize> = self
            .sample_types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.unit == "nanoseconds")
            .map(|(i, _)| i)
            .collect();
        let kind = columns
            .iter()
            .map(|&i| self.sample_types[i].kind.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let mut time = Profile::new(vec![SampleType::new(kind, "nanoseconds")]);
        time.meta = self.meta.clone();
        time.meta.default_sample_type = 0;
        for sample in &self.samples {
            let total: i64 = columns.iter().filter_map(|&i| sample.values.get(i)).sum();
            if total == 0 {
                continue;
            }
            let stack = sample
                .stack
                .iter()
                .filter_map(|&id| self.frames.get(id as usize))
                .map(|frame| time.intern(frame.clone()))
                .collect();
            time.add(stack, sample.labels.clone(), &[total]);
        }
        time
    }

    /// Adds `values` to the sample with this stack and labels, creating it if needed.
    /// `values` must have one entry per sample type.
    pub fn add(&mut self, stack: Vec<FrameId>, labels: Labels, values: &[i64]) {
        debug_assert_eq!(values.len(), self.sample_types.len());
        if self.sample_index.len() != self.samples.len() {
            self.rebuild_indexes();
        }
        let hash = key_hash(stack.as_slice(), &labels);
        let samples = &self.samples;
        if let Some(index) = self.sample_index.find(hash, |i| {
            samples[i].stack == stack && samples[i].labels == labels
        }) {
            for (total, value) in self.samples[index].values.iter_mut().zip(values) {
                *total += value;
            }
            return;
        }
        let mut padded = values.to_vec();
        padded.resize(self.sample_types.len(), 0);
        self.sample_index.insert(hash, self.samples.len());
        let key = (stack, labels);
        self.samples.push(Sample {
            stack: key.0,
            values: padded,
            labels: key.1,
        });
    }

    /// Index of the sample type `kind`/`unit`, if present.
    pub fn sample_type_index(&self, kind: &str, unit: &str) -> Option<usize> {
        self.sample_types
            .iter()
            .position(|t| t.kind == kind && t.unit == unit)
    }

    /// Sum of one value column over all samples.
    pub fn total(&self, value_index: usize) -> i64 {
        self.samples
            .iter()
            .filter_map(|sample| sample.values.get(value_index))
            .sum()
    }

    /// Sum of one value column over the samples `keep` accepts.
    pub fn total_where(&self, value_index: usize, keep: impl Fn(&Sample) -> bool) -> i64 {
        self.samples
            .iter()
            .filter(|sample| keep(sample))
            .filter_map(|sample| sample.values.get(value_index))
            .sum()
    }

    /// The frames of a sample's stack, innermost first.
    pub fn stack_frames<'a>(&'a self, sample: &'a Sample) -> impl Iterator<Item = &'a Frame> + 'a {
        sample
            .stack
            .iter()
            .filter_map(|&id| self.frames.get(id as usize))
    }

    /// Whether any frame of `sample` has a function name containing `needle`.
    pub fn stack_contains(&self, sample: &Sample, needle: &str) -> bool {
        self.stack_frames(sample)
            .any(|frame| frame.function.contains(needle))
    }

    /// Adds every sample of `other` into this profile, matching sample types by kind and
    /// unit (types this profile lacks are appended). Metadata losses add up; notes are
    /// kept once; the time range grows to cover both.
    pub fn merge(&mut self, other: &Self) {
        let mapping: Vec<usize> = other
            .sample_types
            .iter()
            .map(|t| {
                self.sample_type_index(&t.kind, &t.unit).unwrap_or_else(|| {
                    self.sample_types.push(t.clone());
                    for sample in &mut self.samples {
                        sample.values.push(0);
                    }
                    self.sample_types.len() - 1
                })
            })
            .collect();
        for sample in &other.samples {
            let stack = sample
                .stack
                .iter()
                .filter_map(|&id| other.frames.get(id as usize))
                .map(|frame| self.intern(frame.clone()))
                .collect();
            let mut values = vec![0; self.sample_types.len()];
            for (from, &to) in mapping.iter().enumerate() {
                values[to] = sample.values.get(from).copied().unwrap_or(0);
            }
            self.add(stack, sample.labels.clone(), &values);
        }
        for histogram in &other.histograms {
            self.add_histogram(histogram);
        }
        for (loss, count) in &other.meta.losses {
            *self.meta.losses.entry(loss.clone()).or_default() += count;
        }
        for note in &other.meta.notes {
            if !self.meta.notes.contains(note) {
                self.meta.notes.push(note.clone());
            }
        }
        if self.meta.host.is_empty() {
            self.meta.host.clone_from(&other.meta.host);
        }
        for event in &other.meta.events {
            if !self.meta.events.contains(event) {
                self.meta.events.push(event.clone());
            }
        }
        for binary in &other.meta.binaries {
            match self
                .meta
                .binaries
                .iter_mut()
                .find(|b| b.path == binary.path && b.build_id == binary.build_id)
            {
                Some(known) => {
                    known.stacks += binary.stacks;
                    known.truncated_stacks += binary.truncated_stacks;
                }
                None => self.meta.binaries.push(binary.clone()),
            }
        }
        merge_time_range(&mut self.meta, &other.meta);
    }

    /// Adds a histogram, merging it into one with the same signal and labels.
    pub fn add_histogram(&mut self, histogram: &Histogram) {
        if self.histogram_index.len() != self.histograms.len() {
            self.rebuild_indexes();
        }
        let hash = key_hash(histogram.signal.as_str(), &histogram.labels);
        let histograms = &self.histograms;
        if let Some(index) = self.histogram_index.find(hash, |i| {
            histograms[i].signal == histogram.signal && histograms[i].labels == histogram.labels
        }) {
            self.histograms[index].merge(histogram);
            return;
        }
        self.histogram_index.insert(hash, self.histograms.len());
        self.histograms.push(histogram.clone());
    }

    fn rebuild_indexes(&mut self) {
        self.frame_index = self
            .frames
            .iter()
            .enumerate()
            .map(|(id, frame)| (frame.clone(), id as FrameId))
            .collect();
        self.sample_index = HashIndex::default();
        for (index, sample) in self.samples.iter().enumerate() {
            self.sample_index
                .insert(key_hash(sample.stack.as_slice(), &sample.labels), index);
        }
        self.histogram_index = HashIndex::default();
        for (index, h) in self.histograms.iter().enumerate() {
            self.histogram_index
                .insert(key_hash(h.signal.as_str(), &h.labels), index);
        }
    }
}

fn merge_time_range(into: &mut Meta, other: &Meta) {
    if other.duration_ns == 0 && other.start_unix_ns == 0 {
        return;
    }
    if into.duration_ns == 0 && into.start_unix_ns == 0 {
        into.start_unix_ns = other.start_unix_ns;
        into.duration_ns = other.duration_ns;
        return;
    }
    let start = into.start_unix_ns.min(other.start_unix_ns);
    let end = (into.start_unix_ns + into.duration_ns).max(other.start_unix_ns + other.duration_ns);
    into.start_unix_ns = start;
    into.duration_ns = end - start;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_index_tells_keys_with_one_hash_apart() {
        // Three positions whose keys share a hash (a collision), and one of another hash.
        let keys = ["a", "b", "c", "d"];
        let mut index = HashIndex::default();
        for (position, hash) in [(0, 7), (1, 7), (2, 7), (3, 9)] {
            index.insert(hash, position);
        }
        assert_eq!(index.len(), 4);
        for (position, key) in keys.iter().enumerate() {
            let hash = if *key == "d" { 9 } else { 7 };
            assert_eq!(index.find(hash, |i| keys[i] == *key), Some(position));
        }
        assert_eq!(index.find(7, |i| keys[i] == "e"), None);
        assert_eq!(index.find(8, |_| true), None);
    }

    #[test]
    fn samples_merge_by_stack_and_labels_after_the_index_is_rebuilt() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let labels = |tid: &str| Labels::from([("tid".to_owned(), tid.to_owned())]);
        profile.add(vec![0, 1], labels("1"), &[10]);
        profile.add(vec![0, 1], labels("2"), &[20]);
        profile.add(vec![0, 1], labels("1"), &[5]);
        assert_eq!(profile.samples.len(), 2);
        // A profile read back has no index: the next add rebuilds it and still merges.
        let mut copy = Profile {
            sample_index: HashIndex::default(),
            ..profile.clone()
        };
        copy.add(vec![0, 1], labels("2"), &[1]);
        assert_eq!(copy.samples.len(), 2);
        assert_eq!(copy.samples[0].values, vec![15]);
        assert_eq!(copy.samples[1].values, vec![21]);
    }

    fn user(name: &str) -> Frame {
        Frame {
            function: name.to_owned(),
            module: Some("/bin/app".to_owned()),
            file: None,
            line: None,
            address: 0x10,
            kind: FrameKind::User,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn interning_and_adding_merge_equal_samples() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let a = profile.intern(user("a"));
        let b = profile.intern(user("b"));
        assert_eq!(profile.intern(user("a")), a);
        profile.add(vec![a, b], labels(&[("state", "S")]), &[10]);
        profile.add(vec![a, b], labels(&[("state", "S")]), &[5]);
        profile.add(vec![a, b], labels(&[("state", "D")]), &[7]);
        assert_eq!(profile.samples.len(), 2);
        assert_eq!(profile.total(0), 22);
        assert!(profile.stack_contains(&profile.samples[0], "b"));
    }

    #[test]
    fn histograms_merge_by_signal_and_labels() {
        let histogram = |signal: &str, pid: &str, ns: u64| Histogram {
            signal: signal.into(),
            labels: labels(&[("pid", pid)]),
            count: 1,
            sum_ns: ns,
            max_ns: ns,
            buckets: vec![0, 1],
        };
        let mut profile = Profile::default();
        // Many label sets (a host with thousands of processes) stay one histogram each.
        for pid in 0..5000 {
            profile.add_histogram(&histogram("syscall", &pid.to_string(), 10));
        }
        profile.add_histogram(&histogram("syscall", "7", 30));
        profile.add_histogram(&histogram("runqueue", "7", 5));
        // Pushed directly (as a decoder does), then merged into.
        profile.histograms.push(histogram("disk", "7", 1));
        profile.add_histogram(&histogram("disk", "7", 2));
        assert_eq!(profile.histograms.len(), 5002);
        let seven = profile
            .histograms
            .iter()
            .find(|h| h.signal == "syscall" && h.labels["pid"] == "7")
            .expect("pid 7");
        assert_eq!((seven.count, seven.sum_ns, seven.max_ns), (2, 40, 30));
        assert_eq!(seven.buckets, vec![0, 2]);
        let disk = profile.histograms.iter().find(|h| h.signal == "disk");
        assert_eq!(disk.map(|h| h.count), Some(2));
    }

    #[test]
    fn merge_aligns_sample_types_and_adds_losses() {
        let mut left = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let frame = left.intern(user("a"));
        left.add(vec![frame], Labels::new(), &[1]);
        left.meta.losses.insert("map_full".into(), 2);
        left.meta.start_unix_ns = 100;
        left.meta.duration_ns = 10;

        let mut right = Profile::new(vec![
            SampleType::new("on_cpu", "nanoseconds"),
            SampleType::new("off_cpu", "nanoseconds"),
        ]);
        let frame = right.intern(user("a"));
        right.add(vec![frame], Labels::new(), &[3, 4]);
        right.meta.losses.insert("map_full".into(), 1);
        right.meta.start_unix_ns = 105;
        right.meta.duration_ns = 20;

        left.merge(&right);
        assert_eq!(left.sample_types.len(), 2);
        assert_eq!(left.samples.len(), 1);
        assert_eq!(left.samples[0].values, vec![5, 3]);
        assert_eq!(left.meta.losses["map_full"], 3);
        assert_eq!((left.meta.start_unix_ns, left.meta.duration_ns), (100, 25));
    }
}
