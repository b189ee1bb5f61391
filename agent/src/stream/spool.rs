//! The on-disk spool between the sampling loop and the collector: every batch is written
//! (compressed, fsynced) before it is sent and deleted only once the collector has
//! acknowledged it, so batches survive collector outages and agent restarts. Bounded:
//! when full, the oldest batches are dropped and counted; the count travels with every
//! later batch. A full disk counts as a full spool (the oldest batches make room). The
//! next sequence number lives here too, so sequences stay unique per agent across
//! restarts.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    time::Instant,
};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use stallscope_proto::v1;
use thiserror::Error;

use crate::metrics::METRICS;

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}; choose a writable --spool-dir")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool state {path} is corrupt ({reason}); remove it to start a new sequence")]
    State { path: PathBuf, reason: String },
}

/// Limits of the spool.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    pub max_batches: usize,
    pub max_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self {
            max_batches: 8640,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    next_sequence: u64,
    dropped_total: u64,
    /// The start of the period the newest spooled batch covers (the drain journal asks).
    #[serde(default)]
    last_period_start_unix_ns: i64,
}

/// zstd level for spooled batches: fast, still several times smaller than raw.
const ZSTD_LEVEL: i32 = 3;
const STATE_FILE: &str = "state.json";
const BATCH_PREFIX: &str = "batch-";
const BATCH_SUFFIX: &str = ".frame";

/// A bounded directory of unacknowledged batches.
pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    state: State,
    /// Sequence -> file size, for every batch on disk.
    batches: BTreeMap<u64, u64>,
    bytes: u64,
    /// Batches sent and not yet acknowledged: never dropped to make room, since the
    /// collector may be storing them right now (the drop count must be exact). With
    /// when each was sent, for the send latency metric.
    in_flight: HashMap<u64, Instant>,
    /// The state on disk is behind the one in memory (the disk was full).
    state_unsaved: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` atomically and durably: temporary file, fsync, rename, fsync
/// of the directory. A failed write leaves no temporary file behind.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let temp = path.with_extension("tmp");
    let written = File::create(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(io(&temp));
    if let Err(err) = written {
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    if let Err(err) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(io(path)(err));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl SpoolError {
    /// The filesystem (or the user's quota on it) is full: the spool treats it like its
    /// own limits, by dropping the oldest batches.
    fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }
}

/// What became of a batch handed to [`Spool::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written with this sequence.
    Stored(u64),
    /// The disk was full and no older batch could make room (all in flight): the batch
    /// was dropped and counted, without a sequence.
    Dropped,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, picking up batches left by an
    /// earlier run.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let state_path = dir.join(STATE_FILE);
        let state = match fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| SpoolError::State {
                path: state_path.clone(),
                reason: err.to_string(),
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(err) => return Err(io(&state_path)(err)),
        };
        let mut batches = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(sequence) = name
                .strip_prefix(BATCH_PREFIX)
                .and_then(|rest| rest.strip_suffix(BATCH_SUFFIX))
                .and_then(|seq| seq.parse::<u64>().ok())
            {
                let size = entry.metadata().map_err(io(dir))?.len();
                batches.insert(sequence, size);
            } else if Path::new(&name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("tmp"))
            {
                // A write interrupted by a crash: never acknowledged, never complete.
                let _ = fs::remove_file(entry.path());
            }
        }
        let mut state = state;
        if let Some((&last, _)) = batches.last_key_value() {
            state.next_sequence = state.next_sequence.max(last + 1);
        }
        let bytes = batches.values().sum();
        let spool = Self {
            dir: dir.to_owned(),
            limits,
            state,
            batches,
            bytes,
            in_flight: HashMap::new(),
            state_unsaved: false,
        };
        spool.publish();
        Ok(spool)
    }

    /// Shows the spool's size and drops in the self-metrics.
    fn publish(&self) {
        METRICS.spool(self.batches.len(), self.bytes, self.state.dropped_total);
    }

    fn batch_path(&self, sequence: u64) -> PathBuf {
        self.dir
            .join(format!("{BATCH_PREFIX}{sequence:020}{BATCH_SUFFIX}"))
    }

    fn save_state(&mut self) -> Result<(), SpoolError> {
        let bytes = serde_json::to_vec(&self.state).unwrap_or_default();
        write_durably(&self.dir, &self.dir.join(STATE_FILE), &bytes)?;
        self.state_unsaved = false;
        Ok(())
    }

    /// Saves the state; on a full disk, older batches make room for it (the state must
    /// not fall behind: acknowledged batches are deleted, and a restart would otherwise
    /// reuse their sequences). If nothing can be dropped the state stays unsaved, is
    /// saved again as soon as an acknowledgement frees space, and the failure is logged.
    fn save_state_making_room(&mut self) -> Result<(), SpoolError> {
        loop {
            match self.save_state() {
                Err(err) if err.is_disk_full() => {
                    self.state_unsaved = true;
                    if !self.drop_oldest("disk full") {
                        tracing::warn!("{err}; the spool state is saved when space frees up");
                        return Ok(());
                    }
                }
                other => return other,
            }
        }
    }

    /// Drops the oldest batch that is not in flight; false if there is none.
    fn drop_oldest(&mut self, why: &str) -> bool {
        let Some(oldest) = self
            .batches
            .keys()
            .copied()
            .find(|seq| !self.in_flight.contains_key(seq))
        else {
            return false;
        };
        if let Err(err) = self.remove(oldest) {
            tracing::error!("{err}");
            return false;
        }
        self.state.dropped_total += 1;
        tracing::warn!(
            "spool full ({why}): dropped batch {oldest} ({} dropped so far)",
            self.state.dropped_total
        );
        true
    }

    /// Batches dropped to make room since the spool was created.
    pub fn dropped_total(&self) -> u64 {
        self.state.dropped_total
    }

    /// The sequence the next batch will get.
    pub fn next_sequence(&self) -> u64 {
        self.state.next_sequence
    }

    /// Unacknowledged batches, oldest first.
    pub fn pending(&self) -> Vec<u64> {
        self.batches.keys().copied().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Makes room for one batch of `incoming` bytes by dropping the oldest batches that
    /// are not in flight.
    fn make_room(&mut self, incoming: u64) {
        while self.batches.len() + 1 > self.limits.max_batches.max(1)
            || (self.bytes + incoming > self.limits.max_bytes && !self.batches.is_empty())
        {
            if !self.drop_oldest("limit reached") {
                break;
            }
        }
    }

    fn remove(&mut self, sequence: u64) -> Result<(), SpoolError> {
        if let Some(size) = self.batches.remove(&sequence) {
            self.bytes = self.bytes.saturating_sub(size);
            let path = self.batch_path(sequence);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io(&path)(err)),
            }
        }
        self.in_flight.remove(&sequence);
        Ok(())
    }

    /// Gives an encoded batch (`encoded`, from [`crate::stream::batch::encode_period`],
    /// without a sequence or a drop count, for the period starting at `start_unix_ns`)
    /// the next sequence number and the drop count, compresses it and writes it
    /// durably. A full disk is a full spool: the oldest batches not in flight are dropped
    /// (and counted) until the batch fits, and if none is left the batch itself is
    /// dropped and counted.
    pub fn append(
        &mut self,
        mut encoded: Vec<u8>,
        start_unix_ns: i64,
    ) -> Result<Appended, SpoolError> {
        let sequence = self.state.next_sequence;
        // The sequence and the drop count, which a full disk changes between attempts,
        // are appended to the encoding as their own fields (a protobuf message may carry
        // a field after the others; the last one read counts).
        let body = encoded.len();
        // Room first, so the count this batch carries includes every drop so far and
        // no drop happens after the last batch. The encoded size bounds the compressed
        // one closely enough for a byte limit.
        self.make_room(body as u64);
        let written = loop {
            encoded.truncate(body);
            append_spool_fields(&mut encoded, sequence, self.state.dropped_total);
            let compressed = zstd::bulk::compress(&encoded, ZSTD_LEVEL).map_err(io(&self.dir))?;
            let frame = v1::IngestFrame {
                sequence,
                uncompressed_size: encoded.len() as u64,
                batch_zstd: compressed,
            }
            .encode_to_vec();
            // The batch goes first: after a crash between the two, `open` sees its file
            // and continues after it, so a sequence is never reused nor skipped.
            match write_durably(&self.dir, &self.batch_path(sequence), &frame) {
                Ok(()) => break frame.len() as u64,
                Err(err) if err.is_disk_full() => {
                    if !self.drop_oldest("disk full") {
                        self.state.dropped_total += 1;
                        tracing::warn!(
                            "{err}: dropped the new batch, no older one can make room ({} dropped so far)",
                            self.state.dropped_total
                        );
                        self.save_state_making_room()?;
                        self.publish();
                        return Ok(Appended::Dropped);
                    }
                }
                Err(err) => return Err(err),
            }
        };
        self.state.next_sequence = sequence + 1;
        self.state.last_period_start_unix_ns = start_unix_ns;
        self.batches.insert(sequence, written);
        self.bytes += written;
        self.save_state_making_room()?;
        self.publish();
        METRICS.batch_spooled();
        Ok(Appended::Stored(sequence))
    }

    /// Whether the newest batch spooled covers the period starting at `start_unix_ns`
    /// (by the state, or by the newest batch file when the state was not saved after it).
    pub fn holds_period(&self, start_unix_ns: i64) -> bool {
        if self.state.last_period_start_unix_ns == start_unix_ns {
            return true;
        }
        let Some((&newest, _)) = self.batches.last_key_value() else {
            return false;
        };
        fs::read(self.batch_path(newest))
            .ok()
            .and_then(|bytes| v1::IngestFrame::decode(bytes.as_slice()).ok())
            .and_then(|frame| {
                zstd::bulk::decompress(
                    &frame.batch_zstd,
                    usize::try_from(frame.uncompressed_size).ok()?,
                )
                .ok()
            })
            .and_then(|bytes| v1::Batch::decode(bytes.as_slice()).ok())
            .is_some_and(|batch| batch.start_unix_ns == start_unix_ns)
    }

    /// Reads a spooled frame and marks it in flight. `None` if it is gone (acknowledged
    /// or dropped) or unreadable (then it is discarded and counted as dropped).
    pub fn take_for_sending(&mut self, sequence: u64) -> Option<v1::IngestFrame> {
        let path = self.batch_path(sequence);
        let bytes = fs::read(&path).ok()?;
        match v1::IngestFrame::decode(bytes.as_slice()) {
            Ok(frame) => {
                self.in_flight.insert(sequence, Instant::now());
                Some(frame)
            }
            Err(err) => {
                tracing::error!(
                    "spooled batch {} is corrupt ({err}); dropping it",
                    path.display()
                );
                let _ = self.discard(sequence);
                None
            }
        }
    }

    /// The collector stored `sequence`: forget it (and save a state a full disk held
    /// back, now that there is room).
    pub fn acknowledge(&mut self, sequence: u64) -> Result<(), SpoolError> {
        if let Some(sent) = self.in_flight.get(&sequence) {
            METRICS.batch_acknowledged(sent.elapsed());
        }
        self.remove(sequence)?;
        if self.state_unsaved {
            self.save_state_making_room()?;
        }
        self.publish();
        Ok(())
    }

    /// Drops a batch the collector refused as malformed or too large (retrying would
    /// fail forever); counted with the spool's drops.
    pub fn discard(&mut self, sequence: u64) -> Result<(), SpoolError> {
        if self.batches.contains_key(&sequence) {
            self.remove(sequence)?;
            self.state.dropped_total += 1;
            self.save_state_making_room()?;
            self.publish();
        }
        Ok(())
    }

    /// A new connection: nothing is in flight any more.
    pub fn reset_in_flight(&mut self) {
        self.in_flight.clear();
    }
}

/// `Batch.sequence`'s and `Batch.spool_dropped_total`'s field numbers in
/// `stallscope.proto`.
const SEQUENCE_FIELD: u32 = 3;
const SPOOL_DROPPED_TOTAL_FIELD: u32 = 13;

/// Appends the spool's fields to a batch encoded without them.
fn append_spool_fields(encoded: &mut Vec<u8>, sequence: u64, dropped_total: u64) {
    prost::encoding::uint64::encode(SEQUENCE_FIELD, &sequence, encoded);
    prost::encoding::uint64::encode(SPOOL_DROPPED_TOTAL_FIELD, &dropped_total, encoded);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("stallscope-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn batch(host: &str) -> v1::Batch {
        v1::Batch {
            host: host.to_owned(),
            ..v1::Batch::default()
        }
    }

    fn append(spool: &mut Spool, batch: &v1::Batch) -> Result<Appended, SpoolError> {
        spool.append(batch.encode_to_vec(), batch.start_unix_ns)
    }

    #[test]
    fn the_spools_fields_appended_to_an_encoding_decode_as_its_fields() {
        let mut batch = batch("h");
        batch.events.push(v1::ChangeEvent {
            kind: "deploy".into(),
            ..v1::ChangeEvent::default()
        });
        batch.notes.push("a note".into());
        let mut encoded = batch.encode_to_vec();
        append_spool_fields(&mut encoded, 4, 300);
        (batch.sequence, batch.spool_dropped_total) = (4, 300);
        assert_eq!(
            v1::Batch::decode(encoded.as_slice()).expect("decodes"),
            batch
        );
    }

    #[test]
    fn sequences_survive_reopening_and_acks_delete() {
        let dir = dir("reopen");
        let mut spool = Spool::open(&dir, SpoolLimits::default()).expect("open");
        assert_eq!(
            append(&mut spool, &batch("a")).expect("append"),
            Appended::Stored(0)
        );
        assert_eq!(
            append(&mut spool, &batch("b")).expect("append"),
            Appended::Stored(1)
        );
        spool.acknowledge(0).expect("ack");
        drop(spool);
        let mut spool = Spool::open(&dir, SpoolLimits::default()).expect("reopen");
        assert_eq!(spool.pending(), [1]);
        assert_eq!(
            append(&mut spool, &batch("c")).expect("append"),
            Appended::Stored(2)
        );
        let frame = spool.take_for_sending(1).expect("spooled");
        assert_eq!(frame.sequence, 1);
        let raw = zstd::bulk::decompress(&frame.batch_zstd, 1 << 20).expect("zstd");
        assert_eq!(v1::Batch::decode(raw.as_slice()).expect("batch").host, "b");
    }

    #[test]
    fn full_spool_drops_the_oldest_and_counts_exactly() {
        let dir = dir("full");
        let limits = SpoolLimits {
            max_batches: 3,
            max_bytes: u64::MAX,
        };
        let mut spool = Spool::open(&dir, limits).expect("open");
        for _ in 0..10 {
            append(&mut spool, &batch("x")).expect("append");
        }
        assert_eq!(spool.pending(), [7, 8, 9]);
        assert_eq!(spool.dropped_total(), 7);
        let frame = spool.take_for_sending(9).expect("spooled");
        let raw = zstd::bulk::decompress(&frame.batch_zstd, 1 << 20).expect("zstd");
        assert_eq!(
            v1::Batch::decode(raw.as_slice())
                .expect("batch")
                .spool_dropped_total,
            7
        );
        // In-flight batches are not dropped.
        spool.take_for_sending(7).expect("spooled");
        append(&mut spool, &batch("x")).expect("append");
        assert_eq!(spool.pending(), [7, 9, 10]);
        assert_eq!(spool.dropped_total(), 8);
        drop(spool);
        assert_eq!(
            Spool::open(&dir, limits).expect("reopen").dropped_total(),
            8
        );
    }
}
