//! User-space symbolization and workload identity for the accumulator, without ever
//! blocking the drain.
//!
//! 1. Processes are read (`procs.rs`) as soon as they are known: at start-up, on exec
//!    events (`proc_events.rs`), at first sight in a drain, and again when a stack has an
//!    address their last snapshot does not map. A child forked without exec inherits its
//!    parent's snapshot instead of being read (once the parent's is there). A snapshot
//!    outlives its process.
//! 2. A user stack is normalized at drain time against its process's snapshot: each
//!    address becomes (binary file, file offset), a JIT symbol from the perf map, or an
//!    explicit unknown.
//! 3. Each binary is opened once through a live process (`binaries.rs`) and known by its
//!    build-id; offsets are symbolized per binary, in batches, on lanes, and cached per
//!    binary, so every process running the same build shares the work and the memory.
//! 4. At the end of a profile, `settle` waits (bounded) for the answers still missing;
//!    whatever is late or failed becomes an explicit `[unknown]` frame.
//!
//! All reads of other processes' files and memory happen on deadline-bounded lanes;
//! results come back as messages this side polls.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    time::{Duration, Instant},
};

use stallscope_profile::{BinaryInfo, ChangeEvent, ChangeKind, Frame, FrameKind, Labels};

use crate::{
    process::{
        identity::{self, ProcessNames, ServiceRule},
        procfs::{self, FileId},
        snapshot::{self, ProcessSnapshot},
    },
    symbols::{
        binaries::{self, Binary, BinaryFile, BinaryId, BinaryKey},
        lanes::{self, Failure, Job, Lanes},
        symbolize::{self, Frames, KernelSymbolizer, LaneSymbolizers},
    },
};

/// How the resolver reads and names processes.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    pub collect_cmdline: bool,
    pub service_rules: Vec<ServiceRule>,
    /// Deadline of one read of a process's `/proc` files or of opening a binary.
    pub read_deadline: Duration,
    /// Deadline of one batch of symbolization (parsing a large binary's DWARF included).
    pub symbolize_deadline: Duration,
    /// How long the end of a profile waits for missing symbols.
    pub settle_budget: Duration,
    /// Only this process (and nothing else) is profiled.
    pub target_pid: Option<u32>,
    /// Binaries with more DWARF than this are symbolized from their symbol tables.
    pub dwarf_max: u64,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        Self {
            collect_cmdline: false,
            service_rules: Vec::new(),
            read_deadline: Duration::from_secs(1),
            symbolize_deadline: Duration::from_secs(20),
            settle_budget: Duration::from_secs(5),
            target_pid: None,
            dwarf_max: symbolize::DWARF_MAX_BYTES,
        }
    }
}

/// What a lane job reports.
enum Outcome {
    Snapshot {
        pid: u32,
        result: Result<Arc<ProcessSnapshot>, String>,
    },
    Binary {
        file_id: FileId,
        result: Result<Arc<BinaryFile>, String>,
    },
    Symbols {
        binary: BinaryId,
        offsets: Vec<u64>,
        result: Result<Vec<(u64, Frames)>, String>,
    },
    Exited {
        pid: u32,
    },
    Forked {
        parent: u32,
        child: u32,
        start_ticks: u64,
        at: Instant,
    },
    Execed {
        pid: u32,
        at: Instant,
    },
}

/// What lane jobs and the process-event watcher share with the resolver.
pub struct Shared {
    collect_cmdline: bool,
    read_deadline: Duration,
    /// Reads of `/proc/PID` files: quick, and needed promptly (a process may be short-lived).
    read_lanes: Arc<Lanes<()>>,
    /// Opening and inspecting binaries: slower, and on any filesystem.
    binary_lanes: Arc<Lanes<()>>,
    outbox: Mutex<Sender<Outcome>>,
    /// Files whose opening was requested (by any snapshot), so each is opened once.
    opening: Mutex<HashSet<FileId>>,
    in_flight: AtomicUsize,
}

impl Shared {
    fn report(&self, outcome: Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(outbox) = self.outbox.lock() {
            let _ = outbox.send(outcome);
        }
    }

    /// Reads `pid` on a lane; the snapshot (or why not) arrives as a message.
    pub fn request_snapshot(self: &Arc<Self>, pid: u32) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let (shared, failed) = (Arc::clone(self), Arc::clone(self));
        self.read_lanes.submit(Job::new(
            lanes::key_of(&("pid", pid)),
            self.read_deadline,
            move |()| {
                let result = match snapshot::read_snapshot(pid, shared.collect_cmdline) {
                    Ok(snapshot) => {
                        shared.open_new_binaries(&snapshot);
                        Ok(Arc::new(snapshot))
                    }
                    Err(err) => Err(err.to_string()),
                };
                shared.report(Outcome::Snapshot { pid, result });
            },
            move |failure: Failure| {
                failed.report(Outcome::Snapshot {
                    pid,
                    result: Err(failure.reason().to_owned()),
                });
            },
        ));
    }

    /// Tells the resolver process `parent` forked `child` (started at `start_ticks`).
    pub fn forked(&self, parent: u32, child: u32, start_ticks: u64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.report(Outcome::Forked {
            parent,
            child,
            start_ticks,
            at: Instant::now(),
        });
    }

    /// Tells the resolver process `pid` replaced its image: what was read of it before
    /// is no model for the children it forks next.
    pub fn execed(&self, pid: u32) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.report(Outcome::Execed {
            pid,
            at: Instant::now(),
        });
    }

    /// Tells the resolver a process exited.
    pub fn exited(&self, pid: u32) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.report(Outcome::Exited { pid });
    }

    /// Opens, while the process is alive, every binary of `snapshot` not opened yet. A
    /// binary on a hung filesystem only holds up its device's lane.
    fn open_new_binaries(self: &Arc<Self>, snapshot: &ProcessSnapshot) {
        for mapping in snapshot.maps.iter() {
            let Some(file_id) = mapping.file else {
                continue;
            };
            let new = self
                .opening
                .lock()
                .is_ok_and(|mut opening| opening.insert(file_id));
            if !new {
                continue;
            }
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            let (shared, failed) = (Arc::clone(self), Arc::clone(self));
            let (pid, mapping) = (snapshot.pid, mapping.clone());
            // A hung filesystem is refused as a whole once one of its files timed out.
            self.binary_lanes.submit(
                Job::new(
                    lanes::key_of(&file_id),
                    BINARY_DEADLINE,
                    move |()| {
                        let result = binaries::open_binary(pid, &mapping).map(Arc::new);
                        shared.report(Outcome::Binary { file_id, result });
                    },
                    move |failure: Failure| {
                        failed.report(Outcome::Binary {
                            file_id,
                            result: Err(failure.reason().to_owned()),
                        });
                    },
                )
                .source(lanes::key_of(&("dev", file_id.dev))),
            );
        }
    }
}

/// One address of a normalized user stack.
#[derive(Debug, Clone)]
enum NormFrame {
    File {
        file: FileId,
        offset: u64,
        path: Arc<str>,
    },
    Jit(Arc<str>),
    Unknown {
        address: u64,
        module: Option<Arc<str>>,
        reason: &'static str,
    },
}

struct PendingStack {
    /// Lookup addresses (return addresses minus one).
    addresses: Vec<u64>,
    since: Instant,
}

#[derive(Default)]
struct ProcessEntry {
    snapshot: Option<Arc<ProcessSnapshot>>,
    requested: bool,
    exited: bool,
    /// Profile period the process was last part of.
    last_period: u64,
    /// (start ticks, executable) the change events last looked at.
    announced: Option<(u64, Option<String>)>,
    /// When the process last called exec (as far as the agent saw).
    execed_at: Option<Instant>,
}

enum FileState {
    Ready(BinaryId),
    Failed(String),
}

struct ServiceState {
    last_pid: u32,
    /// Start time of `last_pid`, in clock ticks after boot.
    last_start_ticks: u64,
    build_id: Option<String>,
    live: HashSet<u32>,
}

/// A process replaced by another of its service is a restart (an event) when its service
/// is declared ([`identity::is_declared_service`]) or when it started at least this long
/// before its replacement: a shell loop's `sleep` commands replace each other every
/// second, and are no service restarting.
pub const RESTART_MIN_LIFETIME: Duration = Duration::from_secs(10);

/// Whether a service whose only process (started at `previous_start`) was replaced by
/// one started at `start` (clock ticks after boot, `hz` a second) restarted.
fn is_restart(declared: bool, previous_start: u64, start: u64, hz: i64) -> bool {
    let lived_ticks = start.saturating_sub(previous_start);
    let min_ticks = RESTART_MIN_LIFETIME.as_secs() * u64::try_from(hz.max(1)).unwrap_or(100);
    declared || lived_ticks >= min_ticks
}

/// Deadline of opening and inspecting one binary (and finding its debug file): generous,
/// since a binary on a slow disk is not a hung one; past it the filesystem is refused.
const BINARY_DEADLINE: Duration = Duration::from_secs(5);

/// Binaries kept when unused for a while; past it the least recently used are dropped.
const MAX_BINARIES: usize = 1024;
/// Niceness of the symbolization threads: under contention a nice-10 thread gets about a
/// tenth of what a workload thread at 0 gets, and all of an idle CPU.
const SYMBOLIZE_NICE: i32 = 10;
/// Symbolized frames kept over all binaries before old binaries' caches are dropped.
const MAX_CACHED_OFFSETS: usize = 1 << 20;

const NOT_MAPPED: &str = "not mapped when the process was read";

/// Cuts a user stack (innermost first), normalized against a snapshot taken after it,
/// before its first caller address that no executable mapping covers; says whether it
/// cut. The leaf is kept whatever it is: an unmapped leaf is a fact worth showing.
fn cut_at_unmapped(frames: &mut Vec<NormFrame>) -> bool {
    let bad = frames.iter().skip(1).position(
        |frame| matches!(frame, NormFrame::Unknown { reason, .. } if *reason == NOT_MAPPED),
    );
    if let Some(good) = bad {
        frames.truncate(good + 1);
    }
    bad.is_some()
}

/// One address of a stack against its process's snapshot; `stale` is set when the
/// snapshot may be too old to map it.
fn normalize_address(snapshot: &ProcessSnapshot, address: u64, stale: &mut bool) -> NormFrame {
    let Some(mapping) = procfs::find_mapping(&snapshot.maps, address) else {
        *stale = true;
        return NormFrame::Unknown {
            address,
            module: None,
            reason: NOT_MAPPED,
        };
    };
    if let Some(file) = mapping.file {
        return NormFrame::File {
            file,
            offset: mapping.file_offset(address),
            path: Arc::clone(&mapping.path),
        };
    }
    if mapping.path.is_empty() {
        if let Some(name) = snapshot.perf_map.as_ref().and_then(|m| m.lookup(address)) {
            return NormFrame::Jit(Arc::clone(name));
        }
        *stale = true;
        return NormFrame::Unknown {
            address,
            module: None,
            reason: "JIT code without a perf map entry",
        };
    }
    if &*mapping.path == "[vdso]" {
        return NormFrame::File {
            file: binaries::VDSO_FILE,
            offset: mapping.file_offset(address),
            path: Arc::clone(&mapping.path),
        };
    }
    NormFrame::Unknown {
        address,
        module: Some(Arc::clone(&mapping.path)),
        reason: "",
    }
}

pub struct Resolver {
    settings: ResolverSettings,
    shared: Arc<Shared>,
    inbox: Receiver<Outcome>,
    symbol_lanes: Arc<Lanes<LaneSymbolizers>>,
    processes: HashMap<u32, ProcessEntry>,
    files: HashMap<FileId, FileState>,
    /// Offsets of files still being opened, to symbolize once they are.
    waiting: HashMap<FileId, HashSet<u64>>,
    binaries: HashMap<BinaryId, Binary>,
    by_key: HashMap<BinaryKey, BinaryId>,
    next_binary: BinaryId,
    pending: HashMap<(u32, u64), PendingStack>,
    /// Children (pid, start ticks) forked by a parent whose snapshot is still being read.
    forks_waiting: HashMap<u32, Vec<(u32, u64)>>,
    stacks: HashMap<(u32, u64), Arc<[NormFrame]>>,
    services: HashMap<String, ServiceState>,
    events: Vec<ChangeEvent>,
    period: u64,
    boot: (i64, i64),
    pub kernel: KernelSymbolizer,
    /// User stacks probably cut short (no thread entry point reached), this period.
    pub truncated_stacks: u64,
    /// User stacks cut where the frame-pointer walk left mapped code, this period.
    pub cut_stacks: u64,
}

impl Resolver {
    pub fn new(settings: ResolverSettings) -> Self {
        let (outbox, inbox) = mpsc::channel();
        let read_lanes = Lanes::new("proc-read", 4, 64, Duration::from_secs(60));
        let binary_lanes = Lanes::new("binary-read", 2, 32, Duration::from_secs(60));
        // Symbolization is the agent's heaviest background work and nothing waits on it
        // but the next profile: it yields the CPU to the host's workloads.
        let symbol_lanes =
            Lanes::with_nice("symbolize", 2, 16, Duration::from_secs(60), SYMBOLIZE_NICE);
        let shared = Arc::new(Shared {
            collect_cmdline: settings.collect_cmdline,
            read_deadline: settings.read_deadline,
            read_lanes,
            binary_lanes,
            outbox: Mutex::new(outbox),
            opening: Mutex::new(HashSet::new()),
            in_flight: AtomicUsize::new(0),
        });
        let mut resolver = Self {
            settings,
            shared,
            inbox,
            symbol_lanes,
            processes: HashMap::new(),
            files: HashMap::new(),
            waiting: HashMap::new(),
            binaries: HashMap::new(),
            by_key: HashMap::new(),
            next_binary: 0,
            pending: HashMap::new(),
            forks_waiting: HashMap::new(),
            stacks: HashMap::new(),
            services: HashMap::new(),
            events: Vec::new(),
            period: 1,
            boot: snapshot::boot_clock(),
            kernel: KernelSymbolizer::new(),
            truncated_stacks: 0,
            cut_stacks: 0,
        };
        if let Some(vdso) = binaries::own_vdso() {
            resolver.add_binary(binaries::VDSO_FILE, Arc::new(vdso));
        }
        resolver
    }

    /// Registers an opened binary under its build-id (or file identity), sharing the
    /// entry of an identical build opened before.
    fn add_binary(&mut self, file_id: FileId, file: Arc<BinaryFile>) {
        let key = match &file.info.build_id {
            Some(id) => BinaryKey::BuildId(Arc::from(id.as_slice())),
            None => BinaryKey::File(file_id),
        };
        let id = if let Some(&id) = self.by_key.get(&key) {
            id
        } else {
            let id = self.next_binary;
            self.next_binary += 1;
            self.by_key.insert(key.clone(), id);
            self.binaries.insert(id, Binary::new(key, file));
            id
        };
        self.files.insert(file_id, FileState::Ready(id));
        if let (Some(offsets), Some(binary)) =
            (self.waiting.remove(&file_id), self.binaries.get_mut(&id))
        {
            for offset in offsets {
                binary.want(offset);
            }
        }
    }

    /// For the process-event watcher.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Reads every process that exists now (or only the target).
    pub fn discover_existing(&mut self) {
        let pids: Vec<u32> = match self.settings.target_pid {
            Some(pid) => vec![pid],
            None => std::fs::read_dir("/proc")
                .map(|dir| {
                    dir.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
        };
        for pid in pids {
            self.discover(pid);
        }
    }

    /// A process was seen in a drain: read it if it is new.
    pub fn discover(&mut self, pid: u32) {
        if pid == 0 {
            return;
        }
        let period = self.period;
        let entry = self.processes.entry(pid).or_default();
        entry.last_period = period;
        if entry.snapshot.is_none() && !entry.requested && !entry.exited {
            entry.requested = true;
            self.shared.request_snapshot(pid);
        }
    }

    /// A user stack (addresses innermost first) of process `pid`, seen for the first time
    /// under `key`; normalized now or as soon as the process is read.
    pub fn add_user_stack(&mut self, pid: u32, key: u64, ips: &[u64]) {
        if self.stacks.contains_key(&(pid, key)) || self.pending.contains_key(&(pid, key)) {
            return;
        }
        self.discover(pid);
        self.pending.insert(
            (pid, key),
            PendingStack {
                addresses: symbolize::lookup_addresses(ips, true),
                since: Instant::now(),
            },
        );
        self.normalize_pending(false);
    }

    /// Applies what the lanes and the process-event watcher reported (before a drain's
    /// processes are looked at: a forked child inherits rather than being read).
    pub fn apply_reports(&mut self) {
        while let Ok(outcome) = self.inbox.try_recv() {
            self.apply(outcome);
        }
    }

    /// Applies what the lanes reported, normalizes stacks whose process is now known and
    /// asks for the symbols still missing. Never blocks.
    pub fn poll(&mut self) {
        self.apply_reports();
        self.normalize_pending(false);
        self.request_symbols();
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Snapshot { pid, result } => {
                let alive = Path::new(&format!("/proc/{pid}")).exists();
                let entry = self.processes.entry(pid).or_default();
                entry.requested = false;
                match result {
                    Ok(snapshot) => {
                        let newer = entry
                            .snapshot
                            .as_ref()
                            .is_none_or(|old| old.taken <= snapshot.taken);
                        if newer {
                            entry.snapshot = Some(Arc::clone(&snapshot));
                        }
                        for (child, start_ticks) in
                            self.forks_waiting.remove(&pid).unwrap_or_default()
                        {
                            self.inherit(&snapshot, child, start_ticks);
                        }
                    }
                    Err(reason) => {
                        if alive {
                            tracing::debug!("reading pid {pid}: {reason}");
                        } else {
                            entry.exited = true;
                        }
                        // No parent snapshot to inherit: the children are read themselves.
                        for (child, _) in self.forks_waiting.remove(&pid).unwrap_or_default() {
                            self.request(child);
                        }
                    }
                }
            }
            Outcome::Forked {
                parent,
                child,
                start_ticks,
                at,
            } => self.forked(parent, child, start_ticks, at),
            Outcome::Execed { pid, at } => {
                self.processes.entry(pid).or_default().execed_at = Some(at);
            }
            Outcome::Exited { pid } => {
                if let Some(entry) = self.processes.get_mut(&pid) {
                    entry.exited = true;
                }
            }
            Outcome::Binary { file_id, result } => match result {
                Ok(file) => self.add_binary(file_id, file),
                Err(reason) => {
                    if let Ok(mut opening) = self.shared.opening.lock() {
                        opening.remove(&file_id);
                    }
                    self.waiting.remove(&file_id);
                    if !matches!(self.files.get(&file_id), Some(FileState::Ready(_))) {
                        self.files.insert(file_id, FileState::Failed(reason));
                    }
                }
            },
            Outcome::Symbols {
                binary,
                offsets,
                result,
            } => {
                let Some(entry) = self.binaries.get_mut(&binary) else {
                    return;
                };
                for offset in &offsets {
                    entry.requested.remove(offset);
                }
                match result {
                    Ok(frames) => entry.frames.extend(frames),
                    Err(reason) => {
                        let path = entry.file.path.to_string();
                        for offset in offsets {
                            let frame = symbolize::unknown_frame(
                                format!("[unknown] {path}+{offset:#x} ({reason})"),
                                Some(path.clone()),
                                offset,
                                FrameKind::User,
                            );
                            entry.frames.insert(offset, Arc::from(vec![frame]));
                        }
                        entry.error = Some(reason);
                    }
                }
            }
        }
    }

    /// Process `parent` forked `child`: the child's snapshot is a copy of the parent's, now
    /// or once the parent's (next) read is done, which is then asked for if nothing asked
    /// yet. A parent that forks right after its exec (before its exec read) is read once
    /// for all its children.
    fn forked(&mut self, parent: u32, child: u32, start_ticks: u64, at: Instant) {
        let period = self.period;
        let entry = self.processes.entry(child).or_default();
        entry.last_period = period;
        entry.exited = false;
        entry.execed_at = None;
        // What was read before the fork was an earlier process with the same pid.
        if entry.snapshot.as_ref().is_some_and(|s| s.taken < at) {
            entry.snapshot = None;
        }
        let parent_entry = self.processes.entry(parent).or_default();
        // A snapshot from before the parent's last exec shows its previous image.
        let current = parent_entry
            .snapshot
            .as_ref()
            .filter(|s| parent_entry.execed_at.is_none_or(|at| s.taken >= at))
            .cloned();
        if let Some(snapshot) = current {
            self.inherit(&snapshot, child, start_ticks);
            return;
        }
        if parent_entry.exited {
            self.request(child);
            return;
        }
        if !parent_entry.requested {
            parent_entry.requested = true;
            parent_entry.last_period = period;
            self.shared.request_snapshot(parent);
        }
        self.forks_waiting
            .entry(parent)
            .or_default()
            .push((child, start_ticks));
    }

    /// Gives `child` a snapshot inherited from `parent`, unless it has one of its own.
    fn inherit(&mut self, parent: &ProcessSnapshot, child: u32, start_ticks: u64) {
        let entry = self.processes.entry(child).or_default();
        if entry.snapshot.is_none() {
            entry.snapshot = Some(Arc::new(parent.forked(child, start_ticks)));
        }
    }

    /// Reads process `pid` unless it is being read, or is known to be gone.
    fn request(&mut self, pid: u32) {
        let entry = self.processes.entry(pid).or_default();
        if !entry.requested && !entry.exited {
            entry.requested = true;
            self.shared.request_snapshot(pid);
        }
    }

    fn normalize_pending(&mut self, last_chance: bool) {
        let keys: Vec<(u32, u64)> = self.pending.keys().copied().collect();
        for key in keys {
            let Some(pending) = self.pending.get(&key) else {
                continue;
            };
            if let Some((frames, cut)) = self.normalize(key.0, pending, last_chance) {
                self.pending.remove(&key);
                self.cut_stacks += u64::from(cut);
                for frame in frames.iter() {
                    if let NormFrame::File { file, offset, .. } = frame {
                        self.want(*file, *offset);
                    }
                }
                self.stacks.insert(key, frames);
            } else {
                self.request(key.0);
            }
        }
    }

    /// Normalizes a stack against its process's snapshot, or `None` to wait for a (newer)
    /// snapshot: none yet, or one taken before the stack whose mappings miss an address.
    /// Also says whether the stack was cut: in a snapshot taken after the stack, an
    /// address past the leaf that no executable mapping covers cannot be a return
    /// address. The frame-pointer walk went wrong there (a thread fresh out of `clone3`
    /// has no frame chain yet, and the kernel's walker follows whatever `rbp` holds), so
    /// the stack ends at the last good frame instead of listing garbage.
    fn normalize(
        &self,
        pid: u32,
        pending: &PendingStack,
        last_chance: bool,
    ) -> Option<(Arc<[NormFrame]>, bool)> {
        let entry = self.processes.get(&pid);
        let exited = entry.is_some_and(|e| e.exited);
        let Some(snapshot) = entry.and_then(|e| e.snapshot.as_ref()) else {
            if last_chance || exited {
                let reason = "process exited before its memory map was read";
                let frames = pending
                    .addresses
                    .iter()
                    .map(|&address| NormFrame::Unknown {
                        address,
                        module: None,
                        reason,
                    })
                    .collect();
                return Some((frames, false));
            }
            return None;
        };
        let mut stale = false;
        let mut frames: Vec<NormFrame> = pending
            .addresses
            .iter()
            .map(|&address| normalize_address(snapshot, address, &mut stale))
            .collect();
        let fresh = !snapshot.inherited && snapshot.taken >= pending.since;
        if stale && !last_chance && !exited && !fresh {
            return None;
        }
        let cut = fresh && cut_at_unmapped(&mut frames);
        Some((frames.into(), cut))
    }

    fn want(&mut self, file: FileId, offset: u64) {
        match self.files.get(&file) {
            Some(FileState::Ready(id)) => {
                if let Some(binary) = self.binaries.get_mut(id) {
                    binary.want(offset);
                }
            }
            Some(FileState::Failed(_)) => {}
            None => {
                self.waiting.entry(file).or_default().insert(offset);
            }
        }
    }

    fn request_symbols(&mut self) {
        let dwarf_max = self.settings.dwarf_max;
        for (&id, binary) in &mut self.binaries {
            if binary.wanted.is_empty() {
                continue;
            }
            let offsets = std::mem::take(&mut binary.wanted);
            let file = Arc::clone(&binary.file);
            self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
            let (shared, failed) = (Arc::clone(&self.shared), Arc::clone(&self.shared));
            let failed_offsets = offsets.clone();
            self.symbol_lanes.submit(Job::new(
                lanes::key_of(&binary.key),
                self.settings.symbolize_deadline,
                move |lane: &mut LaneSymbolizers| {
                    let frames = symbolize::symbolize_offsets(lane, id, &file, &offsets, dwarf_max);
                    shared.report(Outcome::Symbols {
                        binary: id,
                        offsets,
                        result: Ok(frames),
                    });
                },
                move |failure: Failure| {
                    failed.report(Outcome::Symbols {
                        binary: id,
                        offsets: failed_offsets,
                        result: Err(failure.reason().to_owned()),
                    });
                },
            ));
        }
    }

    /// What the end of a profile still waits for.
    fn unresolved(&self) -> usize {
        self.pending.len()
            + self.waiting.len()
            + self
                .binaries
                .values()
                .map(|b| b.requested.len() + b.wanted.len())
                .sum::<usize>()
    }

    /// Waits, at most the settle budget, for the snapshots, binaries and symbols the
    /// profile's stacks still miss; then normalizes whatever is left as best it can.
    pub fn settle(&mut self) {
        let deadline = Instant::now() + self.settings.settle_budget;
        loop {
            self.poll();
            if self.unresolved() == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.normalize_pending(true);
        let unresolved = self.unresolved();
        if unresolved > 0 {
            tracing::info!(
                "{unresolved} stacks, binaries or symbols not resolved within {:?}; they show as [unknown]",
                self.settings.settle_budget
            );
        }
    }

    /// The frames of a user stack (innermost first) and whether it is probably truncated.
    pub fn user_frames(&mut self, pid: u32, key: u64) -> Option<(Vec<Frame>, bool)> {
        let stack = Arc::clone(self.stacks.get(&(pid, key))?);
        let mut frames = Vec::with_capacity(stack.len());
        let mut outermost_binary = None;
        for norm in stack.iter() {
            outermost_binary = None;
            match norm {
                NormFrame::File { file, offset, path } => {
                    let binary = match self.files.get(file) {
                        Some(FileState::Ready(id)) => {
                            outermost_binary = Some(*id);
                            self.binaries.get_mut(id)
                        }
                        _ => None,
                    };
                    let symbolized = binary.and_then(|b| {
                        b.last_used = self.period;
                        b.frames.get(offset)
                    });
                    if let Some(symbolized) = symbolized {
                        frames.extend(symbolized.iter().cloned());
                    } else {
                        let why = match self.files.get(file) {
                            Some(FileState::Failed(reason)) => reason.as_str(),
                            _ => "not symbolized in time",
                        };
                        frames.push(symbolize::unknown_frame(
                            format!("[unknown] {path}+{offset:#x} ({why})"),
                            Some(path.to_string()),
                            *offset,
                            FrameKind::User,
                        ));
                    }
                }
                NormFrame::Jit(name) => frames.push(symbolize::unknown_frame(
                    name.to_string(),
                    Some("[jit]".to_owned()),
                    0,
                    FrameKind::User,
                )),
                NormFrame::Unknown {
                    address,
                    module,
                    reason,
                } => {
                    let name = if reason.is_empty() {
                        format!("[unknown] {address:#x}")
                    } else {
                        format!("[unknown] {address:#x} ({reason})")
                    };
                    frames.push(symbolize::unknown_frame(
                        name,
                        module.as_deref().map(str::to_owned),
                        *address,
                        FrameKind::User,
                    ));
                }
            }
        }
        let truncated = frames.len() < agent_common::MAX_STACK_DEPTH
            && frames
                .last()
                .is_some_and(|outermost| !binaries::reaches_root(&outermost.function));
        if let Some(binary) = outermost_binary.and_then(|id| self.binaries.get_mut(&id)) {
            binary.stacks += 1;
            binary.truncated_stacks += u64::from(truncated);
        }
        self.truncated_stacks += u64::from(truncated);
        Some((frames, truncated))
    }

    /// Identity labels of process `pid`: executable, build-id, container, pod, unit,
    /// service and (when enabled) the redacted command line. `comm` is the name the probes
    /// saw, for processes that exited before they could be read.
    pub fn labels(&self, pid: u32, comm: Option<&str>) -> Labels {
        let mut labels = Labels::new();
        let Some(snapshot) = self.processes.get(&pid).and_then(|e| e.snapshot.as_ref()) else {
            if let Some(comm) = comm {
                let service = identity::service_of(
                    &self.settings.service_rules,
                    &ProcessNames {
                        comm,
                        exe: None,
                        cgroup: &identity::CgroupIdentity::default(),
                    },
                );
                labels.insert("service".into(), service);
            }
            return labels;
        };
        if let Some(exe) = &snapshot.exe {
            labels.insert("exe".into(), exe.clone());
        }
        if let Some(build_id) = self.exe_build_id(snapshot) {
            labels.insert("build_id".into(), build_id);
        }
        let cgroup = &snapshot.cgroup;
        if !cgroup.path.is_empty() {
            labels.insert("cgroup".into(), cgroup.path.clone());
        }
        if let Some(id) = &cgroup.container_id {
            labels.insert("container_id".into(), id.clone());
        }
        if let Some(runtime) = cgroup.runtime {
            labels.insert("container_runtime".into(), runtime.into());
        }
        if let Some(uid) = &cgroup.pod_uid {
            labels.insert("pod_uid".into(), uid.clone());
        }
        if let Some(unit) = &cgroup.unit {
            labels.insert("systemd_unit".into(), unit.clone());
        }
        if let Some(cmdline) = &snapshot.cmdline {
            labels.insert("cmdline".into(), cmdline.clone());
        }
        labels.insert("service".into(), self.service(snapshot));
        labels
    }

    fn service(&self, snapshot: &ProcessSnapshot) -> String {
        identity::service_of(
            &self.settings.service_rules,
            &ProcessNames {
                comm: &snapshot.comm,
                exe: snapshot.exe.as_deref(),
                cgroup: &snapshot.cgroup,
            },
        )
    }

    fn exe_build_id(&self, snapshot: &ProcessSnapshot) -> Option<String> {
        let file = snapshot.exe_mapping()?.file?;
        match self.files.get(&file)? {
            FileState::Ready(id) => self.binaries.get(id)?.file.info.build_id_hex(),
            FileState::Failed(_) => None,
        }
    }

    /// Change events since the last call: for processes read since, in start order, a
    /// deploy when a service's build-id changed, a restart when its only process was
    /// replaced.
    pub fn take_events(&mut self) -> Vec<ChangeEvent> {
        let mut fresh: Vec<Arc<ProcessSnapshot>> = self
            .processes
            .values()
            .filter_map(|entry| {
                let snapshot = entry.snapshot.as_ref()?;
                let seen = (snapshot.start_ticks, snapshot.exe.clone());
                (entry.announced.as_ref() != Some(&seen)).then(|| Arc::clone(snapshot))
            })
            .collect();
        fresh.sort_by_key(|s| (s.start_ticks, s.pid));
        for snapshot in fresh {
            // Wait for the executable's build-id while it is being read.
            let exe_file = snapshot.exe_mapping().and_then(|m| m.file);
            if exe_file.is_some_and(|f| !self.files.contains_key(&f)) {
                continue;
            }
            if let Some(entry) = self.processes.get_mut(&snapshot.pid) {
                entry.announced = Some((snapshot.start_ticks, snapshot.exe.clone()));
            }
            if snapshot.exe.is_none() {
                continue;
            }
            let service = self.service(&snapshot);
            let declared = identity::is_declared_service(
                &self.settings.service_rules,
                &ProcessNames {
                    comm: &snapshot.comm,
                    exe: snapshot.exe.as_deref(),
                    cgroup: &snapshot.cgroup,
                },
            );
            let build_id = self.exe_build_id(&snapshot);
            let pid = snapshot.pid;
            let mut labels = self.labels(pid, None);
            labels.remove("cmdline");
            let processes = &self.processes;
            let alive = |p: u32| {
                processes.get(&p).is_some_and(|e| !e.exited)
                    && Path::new(&format!("/proc/{p}")).exists()
            };
            let Some(state) = self.services.get_mut(&service) else {
                self.services.insert(
                    service,
                    ServiceState {
                        last_pid: pid,
                        last_start_ticks: snapshot.start_ticks,
                        build_id,
                        live: HashSet::from([pid]),
                    },
                );
                continue;
            };
            let live: HashSet<u32> = state
                .live
                .iter()
                .copied()
                .filter(|&p| p != pid && alive(p))
                .collect();
            state.live = live;
            let kind = match (&state.build_id, &build_id) {
                (Some(old), Some(new)) if old != new => Some(ChangeKind::Deploy),
                _ if state.live.is_empty()
                    && state.last_pid != pid
                    && is_restart(
                        declared,
                        state.last_start_ticks,
                        snapshot.start_ticks,
                        self.boot.1,
                    ) =>
                {
                    Some(ChangeKind::Restart)
                }
                _ => None,
            };
            if let Some(kind) = kind {
                let (btime, hz) = self.boot;
                let ticks = i64::try_from(snapshot.start_ticks).unwrap_or(0);
                self.events.push(ChangeEvent {
                    time_unix_ns: btime * 1_000_000_000 + ticks * (1_000_000_000 / hz.max(1)),
                    kind,
                    service: service.clone(),
                    pid,
                    previous_pid: Some(state.last_pid),
                    build_id: build_id.clone(),
                    previous_build_id: state.build_id.clone(),
                    executable: snapshot.exe.clone(),
                    labels,
                });
            }
            if let Some(state) = self.services.get_mut(&service) {
                state.last_pid = pid;
                state.last_start_ticks = snapshot.start_ticks;
                if build_id.is_some() {
                    state.build_id = build_id;
                }
                state.live.insert(pid);
            }
        }
        std::mem::take(&mut self.events)
    }

    /// Facts about the binaries used this period; resets their counters.
    pub fn take_binaries(&mut self) -> Vec<BinaryInfo> {
        let period = self.period;
        let mut infos: Vec<BinaryInfo> = self
            .binaries
            .values_mut()
            .filter(|b| b.last_used == period)
            .map(Binary::take_info)
            .collect();
        infos.sort_by(|a, b| a.path.cmp(&b.path));
        infos
    }

    /// Binaries used this period whose DWARF is over the budget (symbolized from their
    /// symbol tables): path and bytes of DWARF.
    pub fn symbols_only(&self) -> Vec<(String, u64)> {
        let mut over: Vec<(String, u64)> = self
            .binaries
            .values()
            .filter(|b| {
                b.last_used == self.period && b.file.dwarf_bytes() > self.settings.dwarf_max
            })
            .map(|b| (b.file.path.to_string(), b.file.dwarf_bytes()))
            .collect();
        over.sort();
        over
    }

    pub fn dwarf_max(&self) -> u64 {
        self.settings.dwarf_max
    }

    /// Ends a profile period: forgets processes that exited before it and user stacks of
    /// processes that are gone, and bounds the binary caches.
    pub fn end_period(&mut self) {
        let period = self.period;
        for (pid, entry) in &mut self.processes {
            if !entry.exited && !Path::new(&format!("/proc/{pid}")).exists() {
                entry.exited = true;
            }
        }
        let gone: HashSet<u32> = self
            .processes
            .iter()
            .filter(|(_, e)| e.exited && e.last_period + 1 < period && !e.requested)
            .map(|(&pid, _)| pid)
            .collect();
        self.processes.retain(|pid, _| !gone.contains(pid));
        self.stacks.retain(|(pid, _), _| !gone.contains(pid));
        self.pending.retain(|(pid, _), _| !gone.contains(pid));
        self.forks_waiting
            .retain(|parent, _| !gone.contains(parent));
        self.evict_binaries();
        self.truncated_stacks = 0;
        self.cut_stacks = 0;
        self.period += 1;
    }

    fn evict_binaries(&mut self) {
        let cached: usize = self.binaries.values().map(|b| b.frames.len()).sum();
        if self.binaries.len() <= MAX_BINARIES && cached <= MAX_CACHED_OFFSETS {
            return;
        }
        let mut by_age: Vec<(u64, BinaryId)> = self
            .binaries
            .iter()
            .filter(|(_, b)| {
                b.requested.is_empty()
                    && b.last_used < self.period
                    && b.file.file_id != binaries::VDSO_FILE
            })
            .map(|(&id, b)| (b.last_used, id))
            .collect();
        by_age.sort_unstable();
        let mut remaining_cached = cached;
        let mut count = self.binaries.len();
        for (_, id) in by_age {
            if count <= MAX_BINARIES / 2 && remaining_cached <= MAX_CACHED_OFFSETS / 2 {
                break;
            }
            if let Some(binary) = self.binaries.remove(&id) {
                remaining_cached -= binary.frames.len();
                count -= 1;
                self.by_key.remove(&binary.key);
                self.files
                    .retain(|_, state| !matches!(state, FileState::Ready(b) if *b == id));
            }
        }
        if let Ok(mut opening) = self.shared.opening.lock() {
            let files = &self.files;
            opening.retain(|file| files.contains_key(file));
        }
    }

    /// Reads that ran past their deadline so far, and threads abandoned in them.
    pub fn read_timeouts(&self) -> (u64, usize) {
        let read = &self.shared.read_lanes;
        let binaries = &self.shared.binary_lanes;
        let symbols = &self.symbol_lanes;
        (
            read.stats.timed_out.load(Ordering::Relaxed)
                + binaries.stats.timed_out.load(Ordering::Relaxed)
                + symbols.stats.timed_out.load(Ordering::Relaxed),
            read.stuck_threads() + binaries.stuck_threads() + symbols.stuck_threads(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(reason: &'static str) -> NormFrame {
        NormFrame::Unknown {
            address: 0x55d5_a199_902f,
            module: None,
            reason,
        }
    }

    fn jit() -> NormFrame {
        NormFrame::Jit(Arc::from("jitted"))
    }

    #[test]
    fn only_services_restart() {
        let hz = 100;
        // A shell loop's `sleep 1`: replaced a second after it started.
        assert!(!is_restart(false, 5_000, 5_100, hz));
        // A process that ran for a minute, replaced.
        assert!(is_restart(false, 5_000, 11_000, hz));
        // A declared service (rule, systemd unit, container) restarts whatever its age.
        assert!(is_restart(true, 5_000, 5_001, hz));
    }

    #[test]
    fn a_walk_into_unmapped_memory_is_cut_before_it() {
        let mut frames = vec![
            jit(),
            jit(),
            unknown(NOT_MAPPED),
            unknown(NOT_MAPPED),
            jit(),
        ];
        assert!(cut_at_unmapped(&mut frames));
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn an_unmapped_leaf_and_other_unknowns_are_kept() {
        let mut frames = vec![unknown(NOT_MAPPED), jit(), unknown("anonymous"), jit()];
        assert!(!cut_at_unmapped(&mut frames));
        assert_eq!(frames.len(), 4);
    }

    /// A pid no process has (above the kernel's limit of 2^22).
    const CHILD: u32 = 5_000_000;

    /// Polls until `pid` has a snapshot inherited at fork, and returns it.
    fn inherited(resolver: &mut Resolver, pid: u32) -> Arc<ProcessSnapshot> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            resolver.poll();
            let snapshot = resolver
                .processes
                .get(&pid)
                .and_then(|e| e.snapshot.clone());
            if let Some(snapshot) = snapshot.filter(|s| s.inherited) {
                return snapshot;
            }
            assert!(Instant::now() < deadline, "no inherited snapshot for {pid}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_forked_child_replaces_an_earlier_process_with_its_pid() {
        let mut resolver = Resolver::new(ResolverSettings::default());
        let parent = std::process::id();
        // An earlier process had the child's pid and exited; its snapshot is still kept.
        let mut earlier = snapshot::read_snapshot(parent, false).expect("own snapshot");
        earlier.comm = "earlier".into();
        resolver.processes.insert(
            CHILD,
            ProcessEntry {
                snapshot: Some(Arc::new(earlier)),
                exited: true,
                ..ProcessEntry::default()
            },
        );
        // The parent is not read yet: the child waits for that read.
        resolver.shared().forked(parent, CHILD, 42);
        let child = inherited(&mut resolver, CHILD);
        let own = snapshot::read_snapshot(parent, false).expect("own snapshot");
        assert_eq!((child.pid, child.start_ticks), (CHILD, 42));
        assert_eq!(child.comm, own.comm);
        assert!(!resolver.processes[&CHILD].exited);
        assert_eq!(
            resolver.labels(CHILD, None)["exe"],
            own.exe.expect("own exe")
        );
    }

    #[test]
    fn a_fork_right_after_exec_waits_for_the_new_image() {
        let mut resolver = Resolver::new(ResolverSettings::default());
        let parent = std::process::id();
        let mut before_exec = snapshot::read_snapshot(parent, false).expect("own snapshot");
        before_exec.comm = "before-exec".into();
        resolver.processes.insert(
            parent,
            ProcessEntry {
                snapshot: Some(Arc::new(before_exec)),
                ..ProcessEntry::default()
            },
        );
        resolver.shared().execed(parent);
        resolver.shared().forked(parent, CHILD, 7);
        let child = inherited(&mut resolver, CHILD);
        assert_ne!(child.comm, "before-exec");
        assert!(child.taken >= resolver.processes[&parent].execed_at.expect("exec seen"));
    }
}
