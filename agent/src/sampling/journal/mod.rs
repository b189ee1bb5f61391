//! The drain journal: what `run` drained from the probes but has not yet spooled. A batch
//! closes every batch interval (10 s by default) while the probes are drained every drain
//! interval (1 s), so up to a batch interval of waits lives only in the agent's memory;
//! a SIGKILL, an OOM kill or a crash would lose it. Each drained generation is therefore
//! appended here (checksummed, its header written last) before it is aggregated, and the journal
//! starts over once the batch covering it is in the spool. The next start finds what is
//! left and spools it as the batch of the period it belongs to, unless the spool already
//! holds that period (a crash between spooling and starting over).
//!
//! The journal is written without `fsync`: it survives the agent's death, which is what
//! it is for, not the host's (the page cache goes with the host, and so do the waits).
//! Records are the probes' own map entries, so a journal of another entry layout is
//! refused, never misread: the first profile of the new agent notes the gap.

use std::{
    fs::{self, File, OpenOptions},
    io,
    path::{Path, PathBuf},
};

use agent_common::{Peer, SampleKey, SampleValue, StackTrace, TotalKey, TotalValue};

use self::fields::{
    RECORD_HEADER, Reader, RecordWriter, put_pairs, put_stacks, put_u64s, write_at,
};
use crate::probes::Drained;

mod fields;

const FILE_NAME: &str = "drains.journal";
/// Version 2: stacks as their valid addresses only.
const MAGIC: &[u8; 8] = b"SSJRNL02";
const RECORD: u8 = 1;

/// The entry layout the records were written with: sizes of every map entry type.
fn layout() -> u64 {
    let sizes = [
        size_of::<TotalKey>(),
        size_of::<TotalValue>(),
        size_of::<SampleKey>(),
        size_of::<SampleValue>(),
        size_of::<StackTrace>(),
        size_of::<Peer>(),
    ];
    sizes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &size| {
        (hash ^ size as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What an earlier run drained and never spooled.
pub struct Recovered {
    /// Start of the period the lost batch was to cover.
    pub period_start_unix_ns: i64,
    /// When the last recovered generation was drained.
    pub last_drain_unix_ns: i64,
    /// Losses the earlier run had already reported (cumulative counters).
    pub reported_losses: Vec<u64>,
    pub drains: Vec<Drained>,
    /// Bytes at the end that did not form a whole record (the run died mid-write).
    pub torn_bytes: usize,
}

/// What a start finds in the journal directory.
pub enum Recovery {
    /// No journal, or one without drains.
    Nothing,
    /// A journal this agent cannot read (another format or map entry layout: an
    /// upgrade): its drains are lost, and the first profile says so.
    Refused(&'static str),
    Drains(Recovered),
}

impl Recovery {
    /// The recovered drains, if any.
    pub fn drains(self) -> Option<Recovered> {
        match self {
            Self::Drains(recovered) => Some(recovered),
            Self::Nothing | Self::Refused(_) => None,
        }
    }
}

/// The open journal of the current period.
pub struct Journal {
    file: File,
}

impl Journal {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Reads what an earlier run left in `dir`; an error names the file and what to do.
    pub fn recover(dir: &Path) -> anyhow::Result<Recovery> {
        let path = Self::path(dir);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Recovery::Nothing),
            Err(err) => anyhow::bail!(
                "reading the drain journal {}: {err} (remove it to start without it)",
                path.display()
            ),
        };
        Ok(decode(&bytes))
    }

    /// Starts the journal of a period over (truncating what was there).
    pub fn start(
        dir: &Path,
        period_start_unix_ns: i64,
        reported_losses: &[u64],
    ) -> io::Result<Self> {
        let path = Self::path(dir);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        let mut journal = Self { file };
        journal.write_header(period_start_unix_ns, reported_losses)?;
        Ok(journal)
    }

    /// Starts the next period over in the same file.
    pub fn restart(
        &mut self,
        period_start_unix_ns: i64,
        reported_losses: &[u64],
    ) -> io::Result<()> {
        self.file.set_len(0)?;
        self.write_header(period_start_unix_ns, reported_losses)
    }

    fn write_header(
        &mut self,
        period_start_unix_ns: i64,
        reported_losses: &[u64],
    ) -> io::Result<()> {
        let mut header = Vec::with_capacity(32 + 8 * reported_losses.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&layout().to_le_bytes());
        header.extend_from_slice(&period_start_unix_ns.to_le_bytes());
        put_u64s(&mut header, reported_losses)?;
        // Positioned writes: `set_len(0)` does not move the file offset.
        write_at(&self.file, &header, 0)
    }

    /// Appends one drained generation. The record is streamed to the file through a
    /// small buffer (a drain's entries are the agent's largest transient, not to be
    /// copied whole) and its header, with the length and checksum, written last: a
    /// record cut off at any point reads as torn.
    pub fn append(&mut self, drained: &Drained, unix_ns: i64) -> io::Result<()> {
        let start = self.file.metadata()?.len();
        let mut out = RecordWriter::new(&self.file, start + RECORD_HEADER as u64);
        out.put(&unix_ns.to_le_bytes())?;
        put_pairs(&mut out, &drained.totals)?;
        put_pairs(&mut out, &drained.samples)?;
        put_stacks(&mut out, &drained.stacks)?;
        put_pairs(&mut out, &drained.peers)?;
        put_u64s(&mut out, &drained.losses)?;
        out.put(&(drained.names.len() as u32).to_le_bytes())?;
        for (id, name) in &drained.names {
            out.put(&id.to_le_bytes())?;
            let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
            out.put(&(name.len() as u16).to_le_bytes())?;
            out.put(name)?;
        }
        let (length, checksum) = out.finish()?;
        let mut header = [0u8; RECORD_HEADER];
        header[0] = RECORD;
        header[1..5].copy_from_slice(&length.to_le_bytes());
        header[5..].copy_from_slice(&checksum.to_le_bytes());
        write_at(&self.file, &header, start)
    }
}

/// The journal as the sampling loop keeps it: a period's journal begins when the period
/// does; a write that fails (a full disk) stops journaling until the next period, which
/// tries again. Logged when it stops and when it works again.
pub struct Lane {
    dir: PathBuf,
    journal: Option<Journal>,
    failing: bool,
}

impl Lane {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            journal: None,
            failing: false,
        }
    }

    /// Starts the journal of the period starting at `period_start_unix_ns`.
    pub fn begin(&mut self, period_start_unix_ns: i64, reported_losses: &[u64]) {
        let started = match &mut self.journal {
            Some(journal) => journal.restart(period_start_unix_ns, reported_losses),
            None => Journal::start(&self.dir, period_start_unix_ns, reported_losses)
                .map(|journal| self.journal = Some(journal)),
        };
        match started {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("the drain journal {} works again", self.path().display());
            }
            Ok(()) => {}
            Err(err) => self.fail(&err),
        }
    }

    /// Journals a drained generation (before it is aggregated).
    pub fn append(&mut self, drained: &Drained, unix_ns: i64) {
        if let Some(journal) = &mut self.journal
            && let Err(err) = journal.append(drained, unix_ns)
        {
            self.fail(&err);
        }
    }

    /// A clean stop: everything is in the sink, nothing is left to recover.
    pub fn end(self) {
        let _ = fs::remove_file(self.path());
    }

    fn path(&self) -> PathBuf {
        Journal::path(&self.dir)
    }

    fn fail(&mut self, err: &io::Error) {
        self.journal = None;
        let _ = fs::remove_file(self.path());
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(
                "writing the drain journal {}: {err}; this period is not journaled (an unclean stop would lose it), the next one tries again",
                self.path().display()
            );
        }
    }
}

fn decode_drain(body: &[u8]) -> Option<(i64, Drained)> {
    let mut r = Reader { bytes: body };
    let unix_ns = r.u64()? as i64;
    let totals = r.pairs()?;
    let samples = r.pairs()?;
    let stacks = r.stacks()?;
    let peers = r.pairs()?;
    let losses = r.u64s()?;
    let names_len = r.u32()? as usize;
    let mut names = Vec::with_capacity(names_len.min(body.len()));
    for _ in 0..names_len {
        let id = r.u32()?;
        let len = r.u16()? as usize;
        names.push((id, String::from_utf8_lossy(r.take(len)?).into_owned()));
    }
    let drained = Drained {
        totals,
        samples,
        stacks,
        losses,
        names,
        peers,
        measuring_since: None,
    };
    Some((unix_ns, drained))
}

/// The header and every whole record of a journal, or why it is refused (another
/// format or entry layout: logged, and that period is a gap the first profile notes).
fn decode(bytes: &[u8]) -> Recovery {
    let mut r = Reader { bytes };
    let refused = match (r.take(MAGIC.len()), r.u64()) {
        (Some(magic), _) if magic != MAGIC => Some("not in this agent's format"),
        (Some(_), Some(layout_id)) if layout_id != layout() => {
            Some("written with another map entry layout")
        }
        (Some(_), Some(_)) => None,
        // Shorter than its own header: nothing was journaled.
        (None, _) | (Some(_), None) => return Recovery::Nothing,
    };
    if let Some(why) = refused {
        tracing::warn!("the drain journal left by an earlier agent is {why}; its drains are lost");
        return Recovery::Refused(why);
    }
    decode_records(r).map_or(Recovery::Nothing, Recovery::Drains)
}

/// The period header and the whole records after a journal's format header.
fn decode_records(mut r: Reader<'_>) -> Option<Recovered> {
    let period_start_unix_ns = r.u64()? as i64;
    let reported_losses = r.u64s()?;
    let mut recovered = Recovered {
        period_start_unix_ns,
        last_drain_unix_ns: period_start_unix_ns,
        reported_losses,
        drains: Vec::new(),
        torn_bytes: 0,
    };
    while !r.bytes.is_empty() {
        let rest = r.bytes.len();
        let whole = (|| {
            if r.take(1)? != [RECORD] {
                return None;
            }
            let len = r.u32()? as usize;
            let crc = r.u32()?;
            let body = r.take(len)?;
            (crc32fast::hash(body) == crc).then_some(body)
        })();
        let Some((unix_ns, drained)) = whole.and_then(decode_drain) else {
            recovered.torn_bytes = rest;
            break;
        };
        recovered.last_drain_unix_ns = unix_ns;
        recovered.drains.push(drained);
    }
    (!recovered.drains.is_empty()).then_some(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::DrainedStack;

    fn drained(n: u64) -> Drained {
        let key = TotalKey {
            signal: 1,
            tgid: 42,
            tid: 43,
            ..TotalKey::default()
        };
        let value = TotalValue {
            ns: 1000 * n,
            count: n,
            ..TotalValue::default()
        };
        Drained {
            totals: vec![(key, value)],
            samples: vec![(SampleKey::default(), SampleValue::default())],
            stacks: Vec::new(),
            losses: vec![n, 0, 7],
            names: vec![(43, "worker-1".to_owned())],
            peers: vec![(3, Peer::default())],
            measuring_since: None,
        }
    }

    /// The drains an earlier run left in `dir`, if it left any.
    fn recovered(dir: &Path) -> Option<Recovered> {
        Journal::recover(dir).expect("read").drains()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch");
        dir
    }

    #[test]
    fn drains_come_back_as_written_and_a_restart_forgets_them() {
        let dir = scratch("roundtrip");
        assert!(recovered(&dir).is_none());
        let mut journal = Journal::start(&dir, 1_000, &[5, 0, 1]).expect("start");
        assert!(recovered(&dir).is_none(), "no drain yet");
        journal.append(&drained(2), 2_000).expect("append");
        journal.append(&drained(3), 3_000).expect("append");
        let back = recovered(&dir).expect("two drains");
        assert_eq!(back.period_start_unix_ns, 1_000);
        assert_eq!(back.last_drain_unix_ns, 3_000);
        assert_eq!(back.reported_losses, vec![5, 0, 1]);
        assert_eq!(back.torn_bytes, 0);
        assert_eq!(back.drains.len(), 2);
        let d = &back.drains[1];
        assert_eq!(d.totals, drained(3).totals);
        assert_eq!(d.losses, vec![3, 0, 7]);
        assert_eq!(d.names, vec![(43, "worker-1".to_owned())]);
        assert_eq!(d.peers.len(), 1);
        journal.restart(4_000, &[6]).expect("restart");
        assert!(recovered(&dir).is_none());
        journal.append(&drained(1), 5_000).expect("append");
        let back = recovered(&dir).expect("one drain");
        assert_eq!(back.period_start_unix_ns, 4_000);
        assert_eq!(back.drains.len(), 1);
    }

    #[test]
    fn a_torn_last_record_is_left_out_and_measured() {
        let dir = scratch("torn");
        let mut journal = Journal::start(&dir, 1_000, &[]).expect("start");
        journal.append(&drained(2), 2_000).expect("append");
        journal.append(&drained(3), 3_000).expect("append");
        let path = Journal::path(&dir);
        let len = fs::metadata(&path).expect("journal").len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(len - 5))
            .expect("tear");
        let back = recovered(&dir).expect("the whole record");
        assert_eq!(back.drains.len(), 1);
        assert_eq!(back.last_drain_unix_ns, 2_000);
        assert!(back.torn_bytes > 0);
    }

    #[test]
    fn a_record_larger_than_the_buffer_comes_back_whole_and_without_its_header_is_torn() {
        let dir = scratch("large");
        let mut journal = Journal::start(&dir, 1_000, &[]).expect("start");
        let mut large = drained(2);
        large.stacks = (0..10_000u64)
            .map(|hash| DrainedStack {
                hash,
                flags: 1,
                ips: vec![hash, hash + 1, hash + 2].into(),
            })
            .collect();
        journal.append(&large, 2_000).expect("append");
        let path = Journal::path(&dir);
        let first_end = fs::metadata(&path).expect("journal").len();
        assert!(first_end > RecordWriter::BUFFER as u64, "spans buffers");
        journal.append(&large, 3_000).expect("append");
        let back = recovered(&dir).expect("two drains");
        assert_eq!(back.drains.len(), 2);
        let stacks = &back.drains[1].stacks;
        assert_eq!(stacks.len(), 10_000);
        assert_eq!(stacks[9_999].hash, 9_999);
        assert_eq!(stacks[9_999].flags, 1);
        assert_eq!(*stacks[9_999].ips, [9_999, 10_000, 10_001]);
        // An agent killed after the body and before the header: a hole where the
        // header goes, the whole body after it.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        write_at(&file, &[0; RECORD_HEADER], first_end).expect("unwrite the header");
        let back = recovered(&dir).expect("the first drain");
        assert_eq!(back.drains.len(), 1);
        assert_eq!(back.last_drain_unix_ns, 2_000);
        assert_eq!(
            back.torn_bytes as u64,
            fs::metadata(&path).expect("journal").len() - first_end
        );
    }

    #[test]
    fn garbage_is_refused_not_misread() {
        let dir = scratch("garbage");
        fs::write(Journal::path(&dir), b"not a journal at all").expect("write");
        assert!(matches!(
            Journal::recover(&dir).expect("read"),
            Recovery::Refused("not in this agent's format")
        ));
        // The format of an earlier version, with another entry layout.
        let mut other = MAGIC.to_vec();
        other.extend_from_slice(&(layout() ^ 1).to_le_bytes());
        fs::write(Journal::path(&dir), &other).expect("write");
        assert!(matches!(
            Journal::recover(&dir).expect("read"),
            Recovery::Refused("written with another map entry layout")
        ));
        fs::write(Journal::path(&dir), b"SSJ").expect("write");
        assert!(matches!(
            Journal::recover(&dir).expect("read"),
            Recovery::Nothing
        ));
    }
}
