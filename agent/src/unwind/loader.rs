//! Loading unwind tables into the probes' maps, on a thread of its own: for each process
//! the resolver reads, the binaries it maps that lack frame pointers get their table
//! (built once per binary, shared by every process mapping it) and the process gets its
//! list of mappings with tables, after which the probes unwind its stacks by table. A
//! process that exits or execs loses its list at once (the next read of it brings the
//! new image's). Rows live in one array map; a table that does not fit evicts the tables
//! no registered process uses, least recently used first. What it holds is reported
//! (`LoaderStats`) with every profile.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

use agent_common::{UNWIND_MAPPINGS, UnwindMapping, UnwindProcess, UnwindRow};

use super::table;
use crate::{
    probes::{bpf_sys, unwind::UnwindMaps},
    process::{
        procfs::{FileId, Mapping},
        snapshot::ProcessSnapshot,
    },
    symbols::{binaries, elf::Load, resolver::SnapshotListener},
};

/// What to subtract from an address of `mapping` for the binary's own address: from the
/// load segment whose file range the mapping maps most of (the page the mapping starts
/// on may also hold the end of the segment before, as lld lays binaries out).
fn bias_of(mapping: &Mapping, loads: &[Load]) -> Option<u64> {
    let (first, last) = (
        mapping.offset,
        mapping.offset + (mapping.end - mapping.start),
    );
    let overlap = |load: &Load| {
        last.min(load.offset + load.size)
            .saturating_sub(first.max(load.offset))
    };
    let load = loads
        .iter()
        .filter(|load| overlap(load) > 0)
        .max_by_key(|load| overlap(load))?;
    // address = start + (file offset - mapping offset); vaddr = file offset - load offset
    // + load vaddr; so address - vaddr is the same for every address of the mapping.
    Some(
        mapping
            .start
            .wrapping_sub(mapping.offset)
            .wrapping_add(load.offset)
            .wrapping_sub(load.vaddr),
    )
}

/// What the resolver tells the loader.
#[derive(Debug)]
enum Notice {
    /// A process's mappings as read (or inherited at fork).
    Process(Arc<ProcessSnapshot>),
    /// The process exited or replaced its image: its mappings no longer hold.
    Gone(u32),
}

/// What the loader holds, for the profile's notes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoaderStats {
    /// Binaries with a table in the map, and their rows.
    pub tables: u32,
    pub rows: u32,
    pub capacity: u32,
    /// Processes whose stacks are unwound by table.
    pub processes: u32,
    /// Binaries with no table (it could not be built, or did not fit).
    pub failed: u32,
    /// Tables evicted to make room, since start.
    pub evicted: u64,
}

/// The loader's handle: notices go to its thread; its figures are read from here.
#[derive(Clone)]
pub struct LoaderFeed {
    notices: Sender<Notice>,
    stats: Arc<Mutex<LoaderStats>>,
}

impl LoaderFeed {
    pub fn stats(&self) -> LoaderStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

// A send fails only once the loader's thread ended: stacks keep the frame-pointer walk.
impl SnapshotListener for LoaderFeed {
    fn process(&self, snapshot: Arc<ProcessSnapshot>) {
        let _ = self.notices.send(Notice::Process(snapshot));
    }

    fn gone(&self, pid: u32) {
        let _ = self.notices.send(Notice::Gone(pid));
    }
}

/// Starts the loader's thread.
pub fn spawn(maps: UnwindMaps) -> std::io::Result<LoaderFeed> {
    let (notices, inbox) = mpsc::channel();
    let stats = Arc::new(Mutex::new(LoaderStats {
        capacity: maps.capacity,
        ..LoaderStats::default()
    }));
    let shared = Arc::clone(&stats);
    std::thread::Builder::new()
        .name("unwind-tables".into())
        .spawn(move || Loader::new(maps).run(&inbox, &shared))?;
    Ok(LoaderFeed { notices, stats })
}

/// A binary's place in the rows map, or why it has none.
enum Table {
    Loaded {
        first: u32,
        rows: u32,
        last_used: Instant,
        /// The binary's load segments (file offsets to its own addresses).
        loads: Vec<Load>,
        /// Held open: while it is, its inode (the table's key) is not reused.
        _file: std::fs::File,
    },
    /// Keeps frame pointers: the kernel's walk serves it.
    NotNeeded,
    Failed,
}

struct Loader {
    maps: UnwindMaps,
    /// Free extents of the rows map: (first, length), sorted by first.
    free: Vec<(u32, u32)>,
    tables: HashMap<FileId, Table>,
    /// The binaries each registered process's list uses.
    processes: HashMap<u32, Vec<FileId>>,
    evicted: u64,
}

impl Loader {
    fn new(maps: UnwindMaps) -> Self {
        let capacity = maps.capacity;
        Self {
            maps,
            free: vec![(0, capacity)],
            tables: HashMap::new(),
            processes: HashMap::new(),
            evicted: 0,
        }
    }

    fn run(mut self, inbox: &Receiver<Notice>, stats: &Mutex<LoaderStats>) {
        loop {
            match inbox.recv_timeout(Duration::from_secs(1)) {
                Ok(Notice::Process(snapshot)) => self.register(&snapshot),
                Ok(Notice::Gone(pid)) => self.forget(pid),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if let Ok(mut stats) = stats.lock() {
                *stats = self.stats();
            }
        }
    }

    fn stats(&self) -> LoaderStats {
        let mut stats = LoaderStats {
            capacity: self.maps.capacity,
            processes: self.processes.len() as u32,
            evicted: self.evicted,
            ..LoaderStats::default()
        };
        for table in self.tables.values() {
            match table {
                Table::Loaded { rows, .. } => {
                    stats.tables += 1;
                    stats.rows += rows;
                }
                Table::Failed => stats.failed += 1,
                Table::NotNeeded => {}
            }
        }
        stats
    }

    fn forget(&mut self, pid: u32) {
        if self.processes.remove(&pid).is_some() {
            let _ = self.maps.processes.remove(&pid);
        }
    }

    /// Lists `snapshot`'s mappings of binaries with tables for the probes (building and
    /// loading the tables it lacks); a process with none keeps the kernel's walk.
    fn register(&mut self, snapshot: &ProcessSnapshot) {
        let pid = snapshot.pid;
        let mut entry = UnwindProcess::default();
        let mut used = Vec::new();
        let mut count = 0;
        for mapping in snapshot.maps.iter() {
            // The vDSO has no file, but every process's is the agent's own.
            let file_id = match mapping.file {
                Some(file_id) => file_id,
                None if &*mapping.path == "[vdso]" => binaries::VDSO_FILE,
                None => continue,
            };
            if count == UNWIND_MAPPINGS {
                break;
            }
            if !self.tables.contains_key(&file_id) {
                let table = self.load(pid, mapping, file_id, &used);
                self.tables.insert(file_id, table);
            }
            let Some(Table::Loaded {
                first,
                rows,
                last_used,
                loads,
                ..
            }) = self.tables.get_mut(&file_id)
            else {
                continue;
            };
            *last_used = Instant::now();
            let Some(bias) = bias_of(mapping, loads) else {
                continue;
            };
            entry.mappings[count] = UnwindMapping {
                start: mapping.start,
                end: mapping.end,
                bias,
                first_row: *first,
                rows: *rows,
            };
            count += 1;
            used.push(file_id);
        }
        entry.count = count as u32;
        if count == 0 {
            self.forget(pid);
            return;
        }
        match self.maps.processes.insert(pid, entry, 0) {
            Ok(()) => {
                self.processes.insert(pid, used);
            }
            Err(err) => {
                tracing::debug!("unwind tables: listing pid {pid}: {err}");
                // An earlier list of the process may still be in the map: it goes too,
                // or its tables, no longer protected, could be evicted under it.
                self.forget(pid);
            }
        }
    }

    /// Builds and loads the table of `mapping`'s binary if it lacks frame pointers (the
    /// vDSO's always).
    fn load(&mut self, pid: u32, mapping: &Mapping, file_id: FileId, in_use: &[FileId]) -> Table {
        let vdso = file_id == binaries::VDSO_FILE;
        let opened = if vdso {
            binaries::own_vdso().ok_or_else(|| "no vDSO of its own to read".to_owned())
        } else {
            binaries::open_binary(pid, mapping)
        };
        let binary = match opened {
            Ok(binary) => binary,
            Err(reason) => {
                tracing::debug!("unwind tables: opening {}: {reason}", mapping.path);
                return Table::Failed;
            }
        };
        // The vDSO's functions are leaves that set up no frame (a frame-pointer step
        // from one skips its caller): it gets its table whatever its prologues say.
        if !vdso
            && binary
                .info
                .frame_pointers
                .is_some_and(crate::symbols::elf::FramePointers::present)
        {
            return Table::NotNeeded;
        }
        let started = Instant::now();
        let table = match table::build(&binary.file) {
            Ok(table) if !table.rows.is_empty() => table,
            Ok(_) => return Table::Failed,
            Err(err) => {
                tracing::debug!("unwind tables: {}: {err}", mapping.path);
                return Table::Failed;
            }
        };
        let Ok(rows) = u32::try_from(table.rows.len()) else {
            return Table::Failed;
        };
        let Some(first) = self.allocate(rows, in_use) else {
            tracing::info!(
                "unwind tables: {} needs {rows} rows, more than the map's free room ({} rows in all): its stacks keep the frame-pointer walk",
                mapping.path,
                self.maps.capacity
            );
            return Table::Failed;
        };
        if let Err(err) = self.write_rows(first, &table.rows) {
            tracing::debug!("unwind tables: writing {}: {err}", mapping.path);
            self.release(first, rows);
            return Table::Failed;
        }
        tracing::debug!(
            "unwind tables: {} ({rows} rows from {}) in {:?}",
            mapping.path,
            table.source.section(),
            started.elapsed()
        );
        Table::Loaded {
            first,
            rows,
            last_used: Instant::now(),
            loads: binary.info.loads.clone(),
            _file: binary.file,
        }
    }

    /// Writes rows into the map from `first` on: in batches of thousands per syscall (a
    /// syscall per row was most of the agent's CPU while it loaded tables), one by one
    /// on kernels without batch updates.
    fn write_rows(&mut self, first: u32, rows: &[UnwindRow]) -> Result<(), String> {
        let fd = self.maps.rows_fd.as_fd();
        match bpf_sys::update_array(fd, first, rows) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::Unsupported => {}
            Err(err) => return Err(err.to_string()),
        }
        for (index, row) in rows.iter().enumerate() {
            self.maps
                .rows
                .set(first + index as u32, row, 0)
                .map_err(|err| err.to_string())?;
        }
        Ok(())
    }

    /// A free extent of `rows` rows, evicting tables no registered process uses (and
    /// not in `in_use`), least recently used first, until one fits.
    fn allocate(&mut self, rows: u32, in_use: &[FileId]) -> Option<u32> {
        loop {
            if let Some(index) = self.free.iter().position(|&(_, length)| length >= rows) {
                let (first, length) = self.free[index];
                if length == rows {
                    self.free.remove(index);
                } else {
                    self.free[index] = (first + rows, length - rows);
                }
                return Some(first);
            }
            let used: HashSet<FileId> = self
                .processes
                .values()
                .flatten()
                .chain(in_use)
                .copied()
                .collect();
            let victim = self
                .tables
                .iter()
                .filter_map(|(id, table)| match table {
                    Table::Loaded {
                        first,
                        rows,
                        last_used,
                        ..
                    } if !used.contains(id) => Some((*last_used, *id, *first, *rows)),
                    _ => None,
                })
                .min()?;
            let (_, id, first, length) = victim;
            self.tables.remove(&id);
            self.release(first, length);
            self.evicted += 1;
        }
    }

    /// Returns an extent to the free list, merged with its neighbours.
    fn release(&mut self, first: u32, length: u32) {
        let index = self.free.partition_point(|&(start, _)| start < first);
        self.free.insert(index, (first, length));
        if index + 1 < self.free.len() && first + length == self.free[index + 1].0 {
            self.free[index].1 += self.free[index + 1].1;
            self.free.remove(index + 1);
        }
        if index > 0 && self.free[index - 1].0 + self.free[index - 1].1 == first {
            self.free[index - 1].1 += self.free[index].1;
            self.free.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_bias_comes_from_the_segment_the_mapping_maps_most_of() {
        // lld's layout: the read-only segment ends on the page where code begins, and
        // code sits a page above its file offset.
        let loads = [
            Load {
                offset: 0,
                size: 0x1_607c,
                vaddr: 0,
            },
            Load {
                offset: 0x1_6080,
                size: 0x4_2710,
                vaddr: 0x1_7080,
            },
        ];
        let base = 0x5555_5555_4000;
        let mapping = Mapping {
            start: base + 0x1_7000,
            end: base + 0x5_a000,
            offset: 0x1_6000,
            file: None,
            path: Arc::from("/bin/x"),
            deleted: false,
        };
        assert_eq!(bias_of(&mapping, &loads), Some(base));
    }
}
