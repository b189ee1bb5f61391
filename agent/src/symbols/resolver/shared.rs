//! What lane jobs and the process-event watcher share with the resolver: the lanes that
//! read processes and open binaries, and the outbox their outcomes come back through.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc::Sender,
    },
    time::{Duration, Instant},
};

use crate::{
    process::{
        events::ProcessListener,
        kubernetes,
        procfs::FileId,
        snapshot::{self, ProcessSnapshot},
    },
    symbols::{
        binaries::{self, BinaryFile, BinaryId},
        lanes::{self, Failure, Job, Lanes},
        symbolize::Frames,
    },
};

/// What a lane job reports.
pub(super) enum Outcome {
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
pub(super) struct Shared {
    pub(super) collect_cmdline: bool,
    pub(super) pod_logs_dir: PathBuf,
    pub(super) read_deadline: Duration,
    /// Reads of `/proc/PID` files: quick, and needed promptly (a process may be short-lived).
    pub(super) read_lanes: Arc<Lanes<()>>,
    /// Opening and inspecting binaries: slower, and on any filesystem.
    pub(super) binary_lanes: Arc<Lanes<()>>,
    pub(super) outbox: Mutex<Sender<Outcome>>,
    /// Files whose opening was requested (by any snapshot), so each is opened once.
    pub(super) opening: Mutex<HashSet<FileId>>,
    pub(super) in_flight: AtomicUsize,
}

impl Shared {
    pub(super) fn report(&self, outcome: Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(outbox) = self.outbox.lock() {
            let _ = outbox.send(outcome);
        }
    }

    /// Reads `pid` on a lane; the snapshot (or why not) arrives as a message. An
    /// `urgent` read (of a process just started, or of a parent whose children wait for
    /// it) goes ahead of the reads queued, such as those of every process at start-up.
    pub fn request_snapshot(self: &Arc<Self>, pid: u32, urgent: bool) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let (shared, failed) = (Arc::clone(self), Arc::clone(self));
        let job = Job::new(
            lanes::key_of(&("pid", pid)),
            self.read_deadline,
            move |()| {
                let result = match snapshot::read_snapshot(pid, shared.collect_cmdline) {
                    Ok(mut snapshot) => {
                        if let Some(uid) = &snapshot.cgroup.pod_uid {
                            snapshot.kubernetes =
                                kubernetes::pod_names(&shared.pod_logs_dir, uid, pid).map(Arc::new);
                        }
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
        );
        self.read_lanes
            .submit(if urgent { job.urgent() } else { job });
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

/// The process-event watcher's handle on the resolver.
pub(super) struct EventFeed(pub(super) Arc<Shared>);

impl ProcessListener for EventFeed {
    fn forked(&self, parent: u32, child: u32, start_ticks: u64) {
        self.0.forked(parent, child, start_ticks);
    }

    fn execed(&self, pid: u32) {
        self.0.execed(pid);
    }

    fn exited(&self, pid: u32) {
        self.0.exited(pid);
    }

    fn read(&self, pid: u32) {
        self.0.request_snapshot(pid, true);
    }
}

/// Deadline of opening and inspecting one binary (and finding its debug file): generous,
/// since a binary on a slow disk is not a hung one; past it the filesystem is refused.
pub(super) const BINARY_DEADLINE: Duration = Duration::from_secs(5);
