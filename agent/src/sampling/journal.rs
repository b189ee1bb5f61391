//! The drain journal: what `run` drained from the probes but has not yet spooled. A batch
//! closes every batch interval (10 s by default) while the probes are drained every drain
//! interval (1 s), so up to a batch interval of waits lives only in the agent's memory;
//! a SIGKILL, an OOM kill or a crash would lose it. Each drained generation is therefore
//! appended here (one `write`, checksummed) before it is aggregated, and the journal
//! starts over once the batch covering it is in the spool. The next start finds what is
//! left and spools it as the batch of the period it belongs to, unless the spool already
//! holds that period (a crash between spooling and starting over).
//!
//! The journal is written without `fsync`: it survives the agent's death, which is what
//! it is for, not the host's (the page cache goes with the host, and so do the waits).
//! Records are the probes' own map entries, so a journal of another entry layout is
//! refused (and counted as a gap), never misread.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use agent_common::{Peer, SampleKey, SampleValue, StackTrace, TotalKey, TotalValue};
use aya::Pod;

use crate::probes::Drained;

const FILE_NAME: &str = "drains.journal";
const MAGIC: &[u8; 8] = b"SSJRNL01";
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

/// The open journal of the current period.
pub struct Journal {
    file: File,
}

impl Journal {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Reads what an earlier run left in `dir`: `Ok(None)` when there is nothing (no
    /// journal, or one without drains); an error names the file and what to do.
    pub fn recover(dir: &Path) -> anyhow::Result<Option<Recovered>> {
        let path = Self::path(dir);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
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
        put_u64s(&mut header, reported_losses);
        // Positioned writes: `set_len(0)` does not move the file offset.
        write_at(&self.file, &header, 0)
    }

    /// Appends one drained generation (one write: a torn record is detected on reading).
    /// The record is built in one buffer, its header filled in last: a drain's entries
    /// are the agent's largest transient, not to be copied twice.
    pub fn append(&mut self, drained: &Drained, unix_ns: i64) -> io::Result<()> {
        const HEADER: usize = 9;
        let mut body = Vec::with_capacity(
            HEADER
                + 64
                + drained.totals.len() * (size_of::<TotalKey>() + size_of::<TotalValue>())
                + drained.samples.len() * (size_of::<SampleKey>() + size_of::<SampleValue>())
                + drained.stacks.len() * (8 + size_of::<StackTrace>()),
        );
        body.resize(HEADER, 0);
        body.extend_from_slice(&unix_ns.to_le_bytes());
        put_pairs(&mut body, &drained.totals);
        put_pairs(&mut body, &drained.samples);
        put_pairs(&mut body, &drained.stacks);
        put_pairs(&mut body, &drained.peers);
        put_u64s(&mut body, &drained.losses);
        body.extend_from_slice(&(drained.names.len() as u32).to_le_bytes());
        for (id, name) in &drained.names {
            body.extend_from_slice(&id.to_le_bytes());
            let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
            body.extend_from_slice(&(name.len() as u16).to_le_bytes());
            body.extend_from_slice(name);
        }
        let length = ((body.len() - HEADER) as u32).to_le_bytes();
        let checksum = crc32fast::hash(&body[HEADER..]).to_le_bytes();
        body[0] = RECORD;
        body[1..5].copy_from_slice(&length);
        body[5..HEADER].copy_from_slice(&checksum);
        let end = self.file.metadata()?.len();
        write_at(&self.file, &body, end)
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

fn write_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    file.write_all_at(bytes, offset)?;
    // Not a flush to disk: the page cache outlives the process (see the module).
    (&*file).flush()
}

fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn put_pairs<K: Pod, V: Pod>(out: &mut Vec<u8>, pairs: &[(K, V)]) {
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (key, value) in pairs {
        out.extend_from_slice(pod_bytes(key));
        out.extend_from_slice(pod_bytes(value));
    }
}

fn pod_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are `repr(C)` plain data without pointers; the probes' entry
    // types spell out their padding, so every byte is initialized.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
}

/// A cursor over a record's bytes; every read checks the length.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn pod<T: Pod>(&mut self) -> Option<T> {
        let bytes = self.take(size_of::<T>())?;
        // SAFETY: exactly `size_of::<T>()` bytes, written from a `T` of the same layout
        // (the header's layout hash matched); `Pod` types are valid for any bytes.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    fn pairs<K: Pod, V: Pod>(&mut self) -> Option<Vec<(K, V)>> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(self.bytes.len()));
        for _ in 0..n {
            out.push((self.pod()?, self.pod()?));
        }
        Some(out)
    }

    fn u64s(&mut self) -> Option<Vec<u64>> {
        let n = self.u32()? as usize;
        (0..n).map(|_| self.u64()).collect()
    }
}

fn decode_drain(body: &[u8]) -> Option<(i64, Drained)> {
    let mut r = Reader { bytes: body };
    let unix_ns = r.u64()? as i64;
    let totals = r.pairs()?;
    let samples = r.pairs()?;
    let stacks = r.pairs()?;
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

/// The header and every whole record of a journal; `None` if it holds no drain or was
/// written with another entry layout (logged: that period is a gap).
fn decode(bytes: &[u8]) -> Option<Recovered> {
    let mut r = Reader { bytes };
    if r.take(MAGIC.len())? != MAGIC {
        tracing::warn!("the drain journal is not one this agent writes; its drains are lost");
        return None;
    }
    if r.u64()? != layout() {
        tracing::warn!(
            "the drain journal was written by an agent with another map entry layout; its drains are lost"
        );
        return None;
    }
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

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch");
        dir
    }

    #[test]
    fn drains_come_back_as_written_and_a_restart_forgets_them() {
        let dir = scratch("roundtrip");
        assert!(Journal::recover(&dir).expect("read").is_none());
        let mut journal = Journal::start(&dir, 1_000, &[5, 0, 1]).expect("start");
        assert!(
            Journal::recover(&dir).expect("read").is_none(),
            "no drain yet"
        );
        journal.append(&drained(2), 2_000).expect("append");
        journal.append(&drained(3), 3_000).expect("append");
        let back = Journal::recover(&dir).expect("read").expect("two drains");
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
        assert!(Journal::recover(&dir).expect("read").is_none());
        journal.append(&drained(1), 5_000).expect("append");
        let back = Journal::recover(&dir).expect("read").expect("one drain");
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
        let back = Journal::recover(&dir)
            .expect("read")
            .expect("the whole record");
        assert_eq!(back.drains.len(), 1);
        assert_eq!(back.last_drain_unix_ns, 2_000);
        assert!(back.torn_bytes > 0);
    }

    #[test]
    fn garbage_is_refused_not_misread() {
        let dir = scratch("garbage");
        fs::write(Journal::path(&dir), b"not a journal at all").expect("write");
        assert!(Journal::recover(&dir).expect("read").is_none());
    }
}
