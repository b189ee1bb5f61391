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

mod binary_table;
mod labels;
mod normalize;
mod processes;
mod shared;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver},
    },
    time::{Duration, Instant},
};

use stallscope_profile::{ChangeEvent, FrameKind};

use self::{
    binary_table::{Binary, FileState},
    labels::ServiceState,
    normalize::{NormFrame, PendingStack},
    processes::ProcessEntry,
    shared::{EventFeed, Outcome, Shared},
};
use crate::{
    process::{
        events::ProcessListener, identity::ServiceRule, kubernetes, procfs::FileId, snapshot,
    },
    symbols::{
        binaries::{self, BinaryId, BinaryKey},
        lanes::Lanes,
        symbolize::{self, KernelSymbolizer, LaneSymbolizers},
    },
};

/// How the resolver reads and names processes.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    pub collect_cmdline: bool,
    /// Label samples with their thread's id (`tid`) as well as its name. Off by default:
    /// on a host that starts threads all day every thread id is a series of its own
    /// (most of the agent's memory at each period's end and of the collector's rows).
    pub thread_ids: bool,
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
    /// The kubelet's pod log directories, naming the pods of processes in one.
    pub pod_logs_dir: PathBuf,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        Self {
            collect_cmdline: false,
            thread_ids: false,
            service_rules: Vec::new(),
            read_deadline: Duration::from_secs(1),
            symbolize_deadline: Duration::from_secs(20),
            settle_budget: Duration::from_secs(5),
            target_pid: None,
            dwarf_max: symbolize::DWARF_MAX_BYTES,
            pod_logs_dir: PathBuf::from(kubernetes::DEFAULT_POD_LOGS_DIR),
        }
    }
}

/// Niceness of the symbolization threads: under contention a nice-10 thread gets about a
/// tenth of what a workload thread at 0 gets, and all of an idle CPU.
const SYMBOLIZE_NICE: i32 = 10;

/// Told of every process the resolver reads (or a child inherits at fork), and of every
/// exit and exec, from the resolver's thread: must not block.
pub trait SnapshotListener: Send {
    fn process(&self, snapshot: Arc<snapshot::ProcessSnapshot>);
    fn gone(&self, pid: u32);
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
    /// Told of every process read, exit and exec (the unwind table loader).
    unwind: Option<Box<dyn SnapshotListener>>,
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
            pod_logs_dir: settings.pod_logs_dir.clone(),
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
            unwind: None,
        };
        if let Some(vdso) = binaries::own_vdso() {
            resolver.add_binary(binaries::VDSO_FILE, Arc::new(vdso));
        }
        resolver
    }

    /// Tells `listener` of every process read so far and from now on, and of every exit
    /// and exec.
    pub fn set_snapshot_listener(&mut self, listener: Box<dyn SnapshotListener>) {
        for entry in self.processes.values() {
            if let Some(snapshot) = &entry.snapshot {
                listener.process(Arc::clone(snapshot));
            }
        }
        self.unwind = Some(listener);
    }

    fn tell_gone(&self, pid: u32) {
        if let Some(listener) = &self.unwind {
            listener.gone(pid);
        }
    }

    /// For the process-event watcher.
    pub fn event_feed(&self) -> Arc<dyn ProcessListener> {
        Arc::new(EventFeed(Arc::clone(&self.shared)))
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
        self.poll_for(false);
    }

    fn poll_for(&mut self, settling: bool) {
        self.apply_reports();
        self.normalize_pending(false);
        self.request_symbols(settling);
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Snapshot { pid, result } => {
                let alive = Path::new(&format!("/proc/{pid}")).exists();
                let entry = self.processes.entry(pid).or_default();
                entry.requested = false;
                match result {
                    Ok(snapshot) => {
                        if entry.replaced_by(&snapshot) {
                            entry.snapshot = Some(Arc::clone(&snapshot));
                            if let Some(listener) = &self.unwind {
                                listener.process(Arc::clone(&snapshot));
                            }
                        }
                        let waiting = self.forks_waiting.remove(&pid).unwrap_or_default();
                        if entry.shows_current_image(&snapshot) {
                            for (child, start_ticks) in waiting {
                                self.inherit(&snapshot, child, start_ticks);
                            }
                        } else if !waiting.is_empty() {
                            // Read before the parent's last exec: the children were forked
                            // from the new image, which the next read shows.
                            self.forks_waiting.insert(pid, waiting);
                            self.request(pid, true);
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
                            self.request(child, true);
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
                self.tell_gone(pid);
                self.execed(pid, at);
            }
            Outcome::Exited { pid } => {
                self.tell_gone(pid);
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
                    Ok(frames) => {
                        let period = self.period;
                        entry
                            .frames
                            .extend(frames.into_iter().map(|(offset, f)| (offset, (f, period))));
                    }
                    Err(reason) => {
                        let path = entry.file.path.to_string();
                        for offset in offsets {
                            let frame = symbolize::unknown_frame(
                                format!("[unknown] {path}+{offset:#x} ({reason})"),
                                Some(path.clone()),
                                offset,
                                FrameKind::User,
                            );
                            entry
                                .frames
                                .insert(offset, (Arc::from(vec![frame]), self.period));
                        }
                        entry.error = Some(reason);
                    }
                }
            }
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
            self.poll_for(true);
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
        self.forget_unused_offsets();
        self.evict_binaries();
        self.kernel.end_period();
        self.truncated_stacks = 0;
        self.cut_stacks = 0;
        self.period += 1;
    }

    /// The sizes of what it keeps between periods (for the daemon's memory figures).
    pub fn table_sizes(&self) -> String {
        format!(
            "{} processes, {} binaries, {} symbolized user offsets, {} user stacks, {} kernel addresses, {} services",
            self.processes.len(),
            self.binaries.len(),
            self.binaries
                .values()
                .map(|b| b.frames.len())
                .sum::<usize>(),
            self.stacks.len(),
            self.kernel.cached(),
            self.services.len()
        )
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
