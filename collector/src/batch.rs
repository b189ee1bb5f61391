//! From an ingest frame to a batch ready for storage: bounded zstd decompression, protobuf
//! decoding, and validation of every index, so storage never sees a malformed batch. Each
//! failure is an [`InvalidBatch`] whose text becomes the gRPC status message.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    io::Read as _,
};

use prost::{Message as _, bytes::Bytes};
use stallscope_profile::{Frame, FrameKind, Labels};
use stallscope_proto::v1;
use thiserror::Error;

pub use self::wire::{DecodedBatch, FrameRef, parse_frame};
use crate::{
    events::{self, BinaryRecord, ChangeRecord},
    hash::StableHasher,
};

mod wire;

/// Limits on what one ingest frame may hold.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Largest decoded batch, in bytes.
    pub max_uncompressed_bytes: u64,
    /// Most samples in one batch.
    pub max_samples: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_uncompressed_bytes: 64 * 1024 * 1024,
            max_samples: 1_000_000,
        }
    }
}

/// Why a batch was refused.
#[derive(Debug, Error)]
pub enum InvalidBatch {
    #[error(
        "batch {sequence} decompresses to more than {limit} bytes (claimed {claimed}); refused as too large or a compression bomb"
    )]
    TooLarge {
        sequence: u64,
        limit: u64,
        claimed: u64,
    },
    #[error("batch {sequence}: payload is not valid zstd data: {reason}")]
    Compression { sequence: u64, reason: String },
    #[error("batch {sequence}: payload is not a stallscope.v1.Batch message: {reason}")]
    Decode { sequence: u64, reason: String },
    #[error("batch {sequence}: {reason}")]
    Inconsistent { sequence: u64, reason: String },
}

impl InvalidBatch {
    /// Whether the batch was refused for its size (`RESOURCE_EXHAUSTED`) rather than its
    /// content (`INVALID_ARGUMENT`).
    pub fn is_size(&self) -> bool {
        matches!(self, Self::TooLarge { .. })
    }
}

/// A signal's two value columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalDef {
    pub name: String,
    pub value_kind: String,
    pub value_unit: String,
    pub count_kind: String,
    pub count_unit: String,
}

/// A distinct label set of one agent: the unit rows are filtered by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesDef {
    pub id: i64,
    pub agent: String,
    pub host: String,
    pub signal: String,
    /// The `service` label, or the process name until services exist.
    pub service: String,
    pub process: String,
    pub pid: String,
    pub cause: String,
    pub labels: Labels,
}

impl SeriesDef {
    pub fn new(agent: &str, host: &str, signal: &str, labels: Labels) -> Self {
        let mut hasher = StableHasher::new().str(agent).str(host).str(signal);
        for (key, value) in &labels {
            hasher = hasher.str(key).str(value);
        }
        let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
        let process = label("process");
        let service = labels
            .get("service")
            .cloned()
            .unwrap_or_else(|| process.clone());
        Self {
            id: hasher.finish(),
            agent: agent.to_owned(),
            host: host.to_owned(),
            signal: signal.to_owned(),
            service,
            process,
            pid: label("pid"),
            cause: label("cause"),
            labels,
        }
    }

    pub fn labels_json(&self) -> String {
        serde_json::to_string(&self.labels).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// A deduplicated stack: its content hash and its frames (indices into the batch's
/// frames), innermost first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackDef {
    pub id: i64,
    pub frames: Vec<u32>,
}

/// The content hash of one frame; a stack's id hashes its frames' hashes, so each frame is
/// hashed once per batch however many stacks share it. Equal to the hash of the same frame
/// in model form (an empty module or file is "none", line 0 is "unknown").
pub fn frame_hash(frame: &v1::Frame) -> u64 {
    frame_ref_hash(&FrameRef {
        function: &frame.function,
        module: &frame.module,
        file: &frame.file,
        line: frame.line,
        address: frame.address,
        kind: frame.kind,
    })
}

/// [`frame_hash`] of a frame read in place.
pub fn frame_ref_hash(frame: &FrameRef<'_>) -> u64 {
    let kind = match v1::FrameKind::try_from(frame.kind) {
        Ok(v1::FrameKind::Kernel) => FrameKind::Kernel,
        Ok(v1::FrameKind::Synthetic) => FrameKind::Synthetic,
        _ => FrameKind::User,
    };
    StableHasher::new()
        .str(frame.function)
        .str(frame.module)
        .str(frame.file)
        .u64(u64::from(frame.line))
        .u64(frame.address)
        .u64(frame_kind_code(kind))
        .finish() as u64
}

/// A stack's id from its frames' hashes, innermost first.
pub fn stack_id(frame_hashes: impl ExactSizeIterator<Item = u64>) -> i64 {
    let mut hasher = StableHasher::new().u64(frame_hashes.len() as u64);
    for hash in frame_hashes {
        hasher = hasher.u64(hash);
    }
    hasher.finish()
}

fn frame_kind_code(kind: FrameKind) -> u64 {
    match kind {
        FrameKind::User => 0,
        FrameKind::Kernel => 1,
        FrameKind::Synthetic => 2,
    }
}

/// One stored row: a series, a stack and the signal's value and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub series: i64,
    pub stack: i64,
    pub value: i64,
    pub count: i64,
}

/// A validated batch, ready for storage.
#[derive(Debug, Clone)]
pub struct NormalizedBatch {
    pub agent: String,
    pub sequence: u64,
    pub host: String,
    pub start_unix_ns: i64,
    pub duration_ns: i64,
    pub spool_dropped_total: u64,
    pub signals: Vec<SignalDef>,
    pub series: Vec<SeriesDef>,
    /// Frames the stacks refer to: each the encoded `Frame` message as it came (checked,
    /// and copied into storage only for new stacks).
    pub frames: Vec<Bytes>,
    pub stacks: Vec<StackDef>,
    /// One row per distinct (series, stack).
    pub rows: Vec<Row>,
    pub losses: BTreeMap<String, u64>,
    /// Change events (deploys, restarts) the agent saw in the interval.
    pub events: Vec<ChangeRecord>,
    /// The binaries of the interval's stacks, per service that ran through them.
    pub binaries: Vec<BinaryRecord>,
}

impl NormalizedBatch {
    /// The batch's deterministic id: the same (agent, sequence) always gives the same id,
    /// whichever collector replica stores it.
    pub fn batch_id(&self) -> i64 {
        batch_id(&self.agent, self.sequence)
    }

    /// A stack as storage keeps it: a [`StoredStack`] message, built from the frames'
    /// own encodings.
    pub fn encode_stack(&self, stack: &StackDef) -> Vec<u8> {
        let frames = || {
            stack
                .frames
                .iter()
                .filter_map(|&i| self.frames.get(i as usize))
        };
        let mut out = Vec::with_capacity(frames().map(|f| f.len() + 3).sum());
        for frame in frames() {
            wire::append_frame(&mut out, 1, frame);
        }
        out
    }

    pub fn losses_json(&self) -> String {
        serde_json::to_string(&self.losses).unwrap_or_else(|_| "{}".to_owned())
    }
}

pub fn batch_id(agent: &str, sequence: u64) -> i64 {
    StableHasher::new().str(agent).u64(sequence).finish()
}

/// Decompresses (bounded) and decodes the batch of `frame`.
pub fn decode_frame(
    frame: &v1::IngestFrame,
    limits: &BatchLimits,
) -> Result<DecodedBatch, InvalidBatch> {
    let sequence = frame.sequence;
    let limit = limits.max_uncompressed_bytes;
    if frame.uncompressed_size > limit {
        return Err(InvalidBatch::TooLarge {
            sequence,
            limit,
            claimed: frame.uncompressed_size,
        });
    }
    if let Some(raw) = decompress_as_claimed(frame) {
        return DecodedBatch::decode(Bytes::from(raw)).map_err(|err| InvalidBatch::Decode {
            sequence,
            reason: err.to_string(),
        });
    }
    // The batch is not what it claims (larger, or not zstd at all): decode it the slow
    // way, which tells which.
    let mut decoder =
        zstd::stream::read::Decoder::new(frame.batch_zstd.as_slice()).map_err(|err| {
            InvalidBatch::Compression {
                sequence,
                reason: err.to_string(),
            }
        })?;
    let mut raw =
        Vec::with_capacity(usize::try_from(frame.uncompressed_size.min(limit)).unwrap_or(0));
    // Read one byte past the limit to tell "exactly at the limit" from "beyond it"
    // without ever holding more than that.
    (&mut decoder)
        .take(limit.saturating_add(1))
        .read_to_end(&mut raw)
        .map_err(|err| InvalidBatch::Compression {
            sequence,
            reason: err.to_string(),
        })?;
    if raw.len() as u64 > limit {
        return Err(InvalidBatch::TooLarge {
            sequence,
            limit,
            claimed: frame.uncompressed_size,
        });
    }
    DecodedBatch::decode(Bytes::from(raw)).map_err(|err| InvalidBatch::Decode {
        sequence,
        reason: err.to_string(),
    })
}

thread_local! {
    /// One decompression context per decoding thread, reused: creating one (and its
    /// window buffers) for each batch cost more allocator time than decompressing it.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Decompresses `frame` into exactly its claimed size (at most the limit, checked by the
/// caller) with this thread's context; `None` if it does not fit or is not valid zstd.
fn decompress_as_claimed(frame: &v1::IngestFrame) -> Option<Vec<u8>> {
    let claimed = usize::try_from(frame.uncompressed_size).ok()?;
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.try_borrow_mut().ok()?;
        if cell.is_none() {
            *cell = zstd::bulk::Decompressor::new().ok();
        }
        let decompressor = cell.as_mut()?;
        let mut raw = Vec::with_capacity(claimed);
        decompressor
            .decompress_to_buffer(frame.batch_zstd.as_slice(), &mut raw)
            .ok()?;
        Some(raw)
    })
}

/// Checks every index of `batch` and builds the storage form, attributing it to `agent`
/// (the identity the transport established, not the one the batch claims).
pub fn normalize(
    agent: &str,
    sequence: u64,
    batch: impl Into<DecodedBatch>,
    limits: &BatchLimits,
) -> Result<NormalizedBatch, InvalidBatch> {
    let mut batch: DecodedBatch = batch.into();
    let bad = |reason: String| InvalidBatch::Inconsistent { sequence, reason };
    if batch.sequence != sequence {
        return Err(bad(format!(
            "the frame says sequence {sequence} but the batch inside says {}",
            batch.sequence
        )));
    }
    if batch.samples.len() > limits.max_samples {
        return Err(InvalidBatch::TooLarge {
            sequence,
            limit: limits.max_samples as u64,
            claimed: batch.samples.len() as u64,
        });
    }
    if batch.duration_ns < 0 || batch.start_unix_ns < 0 {
        return Err(bad("negative start or duration".to_owned()));
    }
    let host = if batch.host.is_empty() {
        agent.to_owned()
    } else {
        batch.host.clone()
    };
    let signals: Vec<SignalDef> = batch
        .signals
        .iter()
        .map(|s| SignalDef {
            name: s.name.clone(),
            value_kind: s.value_kind.clone(),
            value_unit: s.value_unit.clone(),
            count_kind: s.count_kind.clone(),
            count_unit: s.count_unit.clone(),
        })
        .collect();
    if let Some(empty) = signals
        .iter()
        .position(|s| s.name.is_empty() || s.value_kind.is_empty())
    {
        return Err(bad(format!("signal {empty} has no name or value kind")));
    }
    let changes =
        events::changes_from_wire(agent, &host, &batch.events, &batch.strings).map_err(&bad)?;
    events::check_binaries(&batch.binaries).map_err(&bad)?;
    // Frames' modules name their binaries, which are attributed to services below.
    let want_modules = !batch.binaries.is_empty();
    let mut modules: Vec<&str> = Vec::new();
    let hashes: Vec<u64> = batch
        .frames
        .iter()
        .enumerate()
        .map(|(index, frame)| {
            parse_frame(frame)
                .map(|frame| {
                    if want_modules {
                        modules.push(frame.module);
                    }
                    frame_ref_hash(&frame)
                })
                .map_err(|reason| bad(format!("frame {index} is not a valid Frame: {reason}")))
        })
        .collect::<Result<_, _>>()?;
    let frame_count = batch.frames.len();
    // Taken, so each stack's frame list moves into its definition instead of a copy.
    let wire_stacks = std::mem::take(&mut batch.stacks);
    let mut stacks = Vec::with_capacity(wire_stacks.len());
    for (index, stack) in wire_stacks.into_iter().enumerate() {
        if let Some(&dangling) = stack.frames.iter().find(|&&f| f as usize >= frame_count) {
            return Err(bad(format!(
                "stack {index} refers to frame {dangling}, but the batch has {frame_count} frames"
            )));
        }
        stacks.push(StackDef {
            id: stack_id(stack.frames.iter().map(|&f| hashes[f as usize])),
            frames: stack.frames,
        });
    }
    let string = |index: u32| -> Result<&str, InvalidBatch> {
        batch
            .strings
            .get(index as usize)
            .map(String::as_str)
            .ok_or_else(|| {
                bad(format!(
                    "a label refers to string {index}, but the string table has {} entries",
                    batch.strings.len()
                ))
            })
    };
    let mut series = Vec::new();
    // Samples of one series (same labels, other stacks) share their label indices: the
    // series is built once per distinct (signal, label indices).
    let mut series_of: HashMap<(u32, &[u32]), i64> = HashMap::new();
    let mut rows: HashMap<(i64, i64), (i64, i64)> = HashMap::with_capacity(batch.samples.len());
    let mut used_stacks = vec![false; stacks.len()];
    for (index, sample) in batch.samples.iter().enumerate() {
        let signal = signals.get(sample.signal as usize).ok_or_else(|| {
            bad(format!(
                "sample {index} refers to signal {}, but the batch has {} signals",
                sample.signal,
                signals.len()
            ))
        })?;
        let stack = stacks.get(sample.stack as usize).ok_or_else(|| {
            bad(format!(
                "sample {index} refers to stack {}, but the batch has {} stacks",
                sample.stack,
                stacks.len()
            ))
        })?;
        used_stacks[sample.stack as usize] = true;
        let id = if let Some(&id) = series_of.get(&(sample.signal, sample.labels.as_slice())) {
            id
        } else {
            {
                if sample.labels.len() % 2 != 0 {
                    return Err(bad(format!(
                        "sample {index} has an odd number of label indices (key, value pairs expected)"
                    )));
                }
                let mut labels = Labels::new();
                for pair in sample.labels.chunks_exact(2) {
                    labels.insert(string(pair[0])?.to_owned(), string(pair[1])?.to_owned());
                }
                labels.insert("signal".to_owned(), signal.name.clone());
                let def = SeriesDef::new(agent, &host, &signal.name, labels);
                let id = def.id;
                if !series.iter().any(|s: &SeriesDef| s.id == id) {
                    series.push(def);
                }
                series_of.insert((sample.signal, sample.labels.as_slice()), id);
                id
            }
        };
        let entry = rows.entry((id, stack.id)).or_default();
        entry.0 = entry.0.saturating_add(sample.value);
        entry.1 = entry.1.saturating_add(sample.count);
    }
    let mut seen = std::collections::HashSet::new();
    let stacks: Vec<StackDef> = stacks
        .into_iter()
        .zip(used_stacks)
        .filter_map(|(stack, used)| used.then_some(stack))
        .filter(|stack| seen.insert(stack.id))
        .collect();
    let mut rows: Vec<Row> = rows
        .into_iter()
        .map(|((series, stack), (value, count))| Row {
            series,
            stack,
            value,
            count,
        })
        .collect();
    rows.sort_unstable_by_key(|row| (row.series, row.stack));
    let binaries = if want_modules {
        let service_of: HashMap<i64, &str> =
            series.iter().map(|s| (s.id, s.service.as_str())).collect();
        let frames_of: HashMap<i64, &[u32]> = stacks
            .iter()
            .map(|stack| (stack.id, stack.frames.as_slice()))
            .collect();
        let end = batch.start_unix_ns.saturating_add(batch.duration_ns);
        events::attribute_binaries(
            &host,
            (batch.start_unix_ns, end),
            &batch.binaries,
            &modules,
            rows.iter().filter_map(|row| {
                Some((
                    *service_of.get(&row.series)?,
                    row.stack,
                    *frames_of.get(&row.stack)?,
                ))
            }),
        )
    } else {
        Vec::new()
    };
    drop(modules);
    Ok(NormalizedBatch {
        agent: agent.to_owned(),
        sequence,
        host,
        start_unix_ns: batch.start_unix_ns,
        duration_ns: batch.duration_ns,
        spool_dropped_total: batch.spool_dropped_total,
        signals,
        series,
        frames: batch.frames,
        stacks,
        rows,
        losses: batch
            .losses
            .into_iter()
            .map(|l| (l.reason, l.count))
            .collect(),
        events: changes,
        binaries,
    })
}

fn frame_from_wire(frame: &v1::Frame) -> Frame {
    let optional = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    Frame {
        function: frame.function.clone(),
        module: optional(&frame.module),
        file: optional(&frame.file),
        line: (frame.line != 0).then_some(frame.line),
        address: frame.address,
        kind: match v1::FrameKind::try_from(frame.kind) {
            Ok(v1::FrameKind::Kernel) => FrameKind::Kernel,
            Ok(v1::FrameKind::Synthetic) => FrameKind::Synthetic,
            _ => FrameKind::User,
        },
    }
}

/// Stacks as storage keeps them: a protobuf `Stack`-like message of full frames.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredStack {
    #[prost(message, repeated, tag = "1")]
    pub frames: Vec<v1::Frame>,
}

impl StoredStack {
    pub fn decode_frames(bytes: &[u8]) -> Option<Vec<Frame>> {
        Self::decode(bytes)
            .ok()
            .map(|stack| stack.frames.iter().map(frame_from_wire).collect())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn frame(payload: &[u8], claimed: u64) -> v1::IngestFrame {
        v1::IngestFrame {
            sequence: 3,
            uncompressed_size: claimed,
            batch_zstd: zstd::bulk::compress(payload, 3).expect("compress"),
        }
    }

    #[test]
    fn claimed_sizes_are_a_hint_and_the_limit_holds() {
        let batch =
            crate::synthetic::batch("a", "h", 3, 10, 20, crate::synthetic::Shape::default());
        let encoded = batch.encode_to_vec();
        let limits = BatchLimits::default();
        let exact = decode_frame(&frame(&encoded, encoded.len() as u64), &limits).expect("decode");
        assert_eq!(exact.frames.len(), batch.frames.len());
        // Claiming less or more than the truth decodes the same (through the slow path).
        for claimed in [0, 10, encoded.len() as u64 * 2] {
            let decoded = decode_frame(&frame(&encoded, claimed), &limits).expect("decode");
            assert_eq!(decoded, exact, "claimed {claimed}");
        }
        // Larger than the limit while claiming less: refused for its size.
        let small = BatchLimits {
            max_uncompressed_bytes: encoded.len() as u64 - 1,
            ..limits
        };
        let err = decode_frame(&frame(&encoded, 100), &small).expect_err("too large");
        assert!(err.is_size(), "{err}");
        let garbage = v1::IngestFrame {
            sequence: 3,
            uncompressed_size: 100,
            batch_zstd: vec![1, 2, 3, 4],
        };
        assert!(matches!(
            decode_frame(&garbage, &limits),
            Err(InvalidBatch::Compression { .. })
        ));
    }
}
