//! One period's profile as a wire batch: the stack table (frames, then stacks as frame
//! indices), a string table for labels, and one sample per (stack, labels, signal) with
//! the signal's value and count. Signals come from the profile's sample types, taken in
//! pairs: a value type followed by its `count` type (`off_cpu`/nanoseconds then
//! `off_cpu_events`/count), named like the `signal` label (`off-cpu`).

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use stallscope_profile::{Frame, FrameKind, SampleType};
use stallscope_proto::v1;

use crate::aggregate::period::PeriodProfile;

/// The signal pairs of a profile's sample types: (value column, count column, definition).
fn signal_pairs(types: &[SampleType]) -> Vec<(usize, Option<usize>, v1::SignalType)> {
    let mut pairs = Vec::new();
    let mut index = 0;
    while index < types.len() {
        let value = &types[index];
        let count = types
            .get(index + 1)
            .filter(|next| next.unit == "count" && value.unit != "count");
        pairs.push((
            index,
            count.map(|_| index + 1),
            v1::SignalType {
                name: value.kind.replace('_', "-"),
                value_kind: value.kind.clone(),
                value_unit: value.unit.clone(),
                count_kind: count
                    .map_or_else(|| format!("{}_events", value.kind), |c| c.kind.clone()),
                count_unit: "count".to_owned(),
            },
        ));
        index += if count.is_some() { 2 } else { 1 };
    }
    pairs
}

/// The batch's string table: the period's label strings keep their ids (id 0 is the
/// empty string the wire format reserves), other strings are added after them.
struct Strings {
    list: Vec<String>,
    ids: HashMap<String, u32>,
    /// Batch id of each of the period's string ids, once used.
    of_period: Vec<Option<u32>>,
}

impl Strings {
    fn intern(&mut self, text: &str) -> u32 {
        if let Some(&id) = self.ids.get(text) {
            return id;
        }
        let id = u32::try_from(self.list.len()).unwrap_or(u32::MAX);
        self.list.push(text.to_owned());
        self.ids.insert(text.to_owned(), id);
        id
    }

    fn of_period(&mut self, period: &PeriodProfile, id: u32) -> u32 {
        let index = id as usize;
        if self.of_period.len() <= index {
            self.of_period.resize(index + 1, None);
        }
        if let Some(batch_id) = self.of_period[index] {
            return batch_id;
        }
        let batch_id = self.intern(period.string(id));
        self.of_period[index] = Some(batch_id);
        batch_id
    }
}

fn wire_frame(frame: &Frame) -> v1::Frame {
    v1::Frame {
        function: frame.function.clone(),
        module: frame.module.clone().unwrap_or_default(),
        file: frame.file.clone().unwrap_or_default(),
        line: frame.line.unwrap_or(0),
        address: frame.address,
        kind: match frame.kind {
            FrameKind::User => v1::FrameKind::User,
            FrameKind::Kernel => v1::FrameKind::Kernel,
            FrameKind::Synthetic => v1::FrameKind::Synthetic,
        } as i32,
    }
}

/// `Batch.samples`' field number in `stallscope.proto`.
const SAMPLES_FIELD: u32 = 10;

/// One period's batch, encoded (without its sequence and the spool's drop count, which
/// the spool appends), and what it sums to per sample type.
pub struct EncodedBatch {
    pub bytes: Vec<u8>,
    pub start_unix_ns: i64,
    /// Per sample type (`kind/unit`), the sum over the batch: what the agent reports
    /// at exit so its totals can be compared with the collector's.
    pub totals: BTreeMap<String, i64>,
}

/// Encodes one period's profile as a wire batch, consuming it: each sample is encoded
/// as it is converted and its label ids freed, so neither the period nor a decoded batch is whole in memory next to the
/// encoding at the end of a period. The samples are encoded first and the rest of the
/// batch (its tables, built meanwhile) after them: a protobuf message's fields may come
/// in any order, and repeated ones keep theirs.
pub fn encode_period(mut period: PeriodProfile, agent_id: &str) -> EncodedBatch {
    let pairs = signal_pairs(period.sample_types());
    let signal_of_column: HashMap<usize, (u32, bool)> = (pairs.iter().enumerate())
        .map(|(signal, (column, count, _))| (*column, (signal as u32, count.is_some())))
        .collect();
    let mut strings = Strings {
        list: vec![String::new()],
        ids: HashMap::from([(String::new(), 0)]),
        of_period: Vec::new(),
    };
    let mut frames = Vec::new();
    let mut frame_index: HashMap<u32, u32> = HashMap::new();
    let mut stacks: Vec<v1::Stack> = Vec::new();
    // The batch's index of each of the period's stack ids, once used.
    let mut stack_index: Vec<Option<u32>> = Vec::new();
    let period_samples = period.take_samples();
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    // Per signal: its value and count summed, if it has samples.
    let mut sums: Vec<Option<(i64, i64)>> = vec![None; pairs.len()];
    let mut bytes = Vec::new();
    let mut wire = v1::Sample::default();
    for sample in period_samples {
        let Some(&(signal, counted)) = signal_of_column.get(&sample.column) else {
            continue;
        };
        let count = if counted { sample.count } else { 0 };
        if sample.value == 0 && count == 0 {
            continue;
        }
        let slot = sample.stack as usize;
        if stack_index.len() <= slot {
            stack_index.resize(slot + 1, None);
        }
        let stack = if let Some(index) = stack_index[slot] {
            index
        } else {
            let ids = (period.stack(sample.stack).iter())
                .filter_map(|&id| {
                    let frame = period.frames().get(id as usize)?;
                    Some(*frame_index.entry(id).or_insert_with(|| {
                        frames.push(wire_frame(frame));
                        (frames.len() - 1) as u32
                    }))
                })
                .collect();
            stacks.push(v1::Stack { frames: ids });
            let index = (stacks.len() - 1) as u32;
            stack_index[slot] = Some(index);
            index
        };
        wire.labels.clear();
        for (key, value) in period.label_ids(&sample) {
            wire.labels.push(strings.of_period(&period, key));
            wire.labels.push(strings.of_period(&period, value));
        }
        (wire.stack, wire.signal, wire.value, wire.count) = (stack, signal, sample.value, count);
        prost::encoding::message::encode(SAMPLES_FIELD, &wire, &mut bytes);
        let (value, counted) = sums[signal as usize].get_or_insert((0, 0));
        (*value, *counted) = (*value + sample.value, *counted + count);
    }
    for ((_, _, signal), sum) in pairs.iter().zip(sums) {
        let Some((value, count)) = sum else {
            continue;
        };
        *totals
            .entry(format!("{}/{}", signal.value_kind, signal.value_unit))
            .or_default() += value;
        *totals
            .entry(format!("{}/{}", signal.count_kind, signal.count_unit))
            .or_default() += count;
    }
    let meta = period.meta();
    // Change events (their labels share the string table) and the binaries table.
    let events = (meta.events.iter())
        .map(|event| v1::ChangeEvent {
            time_unix_ns: event.time_unix_ns,
            kind: event.kind.as_str().to_owned(),
            service: event.service.clone(),
            pid: event.pid,
            previous_pid: event.previous_pid.unwrap_or(0),
            build_id: event.build_id.clone().unwrap_or_default(),
            previous_build_id: event.previous_build_id.clone().unwrap_or_default(),
            executable: event.executable.clone().unwrap_or_default(),
            labels: (event.labels.iter())
                .flat_map(|(key, value)| [strings.intern(key), strings.intern(value)])
                .collect(),
        })
        .collect();
    let binaries = (meta.binaries.iter())
        .map(|binary| v1::BinaryInfo {
            path: binary.path.clone(),
            build_id: binary.build_id.clone().unwrap_or_default(),
            debug_file: binary.debug_file.clone().unwrap_or_default(),
            frame_pointers: match binary.frame_pointers {
                None => v1::FramePointers::Unknown,
                Some(true) => v1::FramePointers::Present,
                Some(false) => v1::FramePointers::Absent,
            } as i32,
            stacks: binary.stacks,
            truncated_stacks: binary.truncated_stacks,
            error: binary.error.clone().unwrap_or_default(),
        })
        .collect();
    let rest = v1::Batch {
        agent_id: agent_id.to_owned(),
        host: meta.host.clone(),
        sequence: 0,
        start_unix_ns: meta.start_unix_ns,
        duration_ns: meta.duration_ns,
        signals: pairs.into_iter().map(|(_, _, signal)| signal).collect(),
        frames,
        stacks,
        strings: strings.list,
        samples: Vec::new(),
        losses: (meta.losses.iter())
            .filter(|(_, count)| **count > 0)
            .map(|(reason, &count)| v1::Loss {
                reason: reason.clone(),
                count,
            })
            .collect(),
        notes: meta.notes.clone(),
        spool_dropped_total: 0,
        events,
        binaries,
    };
    bytes.extend_from_slice(&rest.encode_to_vec());
    EncodedBatch {
        bytes,
        start_unix_ns: meta.start_unix_ns,
        totals,
    }
}

#[cfg(test)]
mod tests {
    use stallscope_profile::{Frame, Labels, SampleType};

    use super::*;

    #[test]
    fn profile_becomes_a_compact_batch() {
        let types = vec![
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("off_cpu_events", "count"),
            SampleType::new("on_cpu", "nanoseconds"),
            SampleType::new("on_cpu_samples", "count"),
        ];
        let mut profile = PeriodProfile::new(stallscope_profile::Profile::new(types), false);
        let main = profile.intern(Frame::synthetic("main"));
        let read = profile.intern(Frame {
            kind: FrameKind::Kernel,
            ..Frame::synthetic("read")
        });
        let labels = |signal: &str| Labels::from([("signal".to_owned(), signal.to_owned())]);
        profile.add(0, &[read, main], &labels("off-cpu"), 100, 2);
        profile.add(2, &[main], &labels("on-cpu"), 50, 1);
        let mut meta = stallscope_profile::Meta {
            host: "h".into(),
            ..Default::default()
        };
        meta.events.push(stallscope_profile::ChangeEvent {
            time_unix_ns: 7,
            kind: stallscope_profile::ChangeKind::Deploy,
            service: "svc".into(),
            pid: 2,
            previous_pid: Some(1),
            build_id: Some("bb".into()),
            previous_build_id: Some("aa".into()),
            executable: None,
            labels: Labels::from([("unit".to_owned(), "svc.service".to_owned())]),
        });
        meta.binaries.push(stallscope_profile::BinaryInfo {
            path: "/usr/bin/svc".into(),
            frame_pointers: Some(false),
            stacks: 3,
            ..Default::default()
        });
        profile.set_meta(meta);
        let encoded = encode_period(profile, "agent");
        let batch = v1::Batch::decode(encoded.bytes.as_slice()).expect("decodes");
        let event = &batch.events[0];
        assert_eq!((event.kind.as_str(), event.previous_pid), ("deploy", 1));
        let label = |i: usize| batch.strings[event.labels[i] as usize].as_str();
        assert_eq!((label(0), label(1)), ("unit", "svc.service"));
        assert_eq!(
            batch.binaries[0].frame_pointers,
            v1::FramePointers::Absent as i32
        );
        assert_eq!(batch.signals.len(), 2);
        assert_eq!(batch.signals[0].name, "off-cpu");
        assert_eq!(batch.signals[1].count_kind, "on_cpu_samples");
        assert_eq!(batch.frames.len(), 2);
        assert_eq!(batch.stacks.len(), 2);
        assert_eq!(batch.samples.len(), 2);
        assert_eq!(
            (
                batch.samples[0].signal,
                batch.samples[0].value,
                batch.samples[0].count
            ),
            (0, 100, 2)
        );
        assert_eq!((batch.samples[1].signal, batch.samples[1].value), (1, 50));
        let sample_label = |i: usize| batch.strings[batch.samples[1].labels[i] as usize].as_str();
        assert_eq!((sample_label(0), sample_label(1)), ("signal", "on-cpu"));
        assert_eq!(encoded.start_unix_ns, batch.start_unix_ns);
        assert_eq!(encoded.totals["off_cpu/nanoseconds"], 100);
        assert_eq!(encoded.totals["on_cpu_samples/count"], 1);
    }
}
