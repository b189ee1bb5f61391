//! The processes the resolver knows: read when first seen, inherited by a child forked
//! without exec, forgotten a period after they exit.

use std::{sync::Arc, time::Instant};

use super::Resolver;
use crate::process::snapshot::ProcessSnapshot;

#[derive(Default)]
pub(super) struct ProcessEntry {
    pub(super) snapshot: Option<Arc<ProcessSnapshot>>,
    pub(super) requested: bool,
    pub(super) exited: bool,
    /// Profile period the process was last part of.
    pub(super) last_period: u64,
    /// (start ticks, executable) the change events last looked at.
    pub(super) announced: Option<(u64, Option<String>)>,
    /// When the agent heard of the fork that made this process (its pid's last one).
    pub(super) forked_at: Option<Instant>,
    /// When the process last called exec after that fork (as far as the agent saw).
    pub(super) execed_at: Option<Instant>,
}

impl ProcessEntry {
    /// Whether `snapshot` shows the process's current image: a copy of the parent's
    /// snapshot does until the process calls exec; a read of its own does if it was taken
    /// after the fork and the last exec. (A copy's `taken` is the parent's read, which
    /// can come after the child's exec: it says nothing about the child's image.)
    pub(super) fn shows_current_image(&self, snapshot: &ProcessSnapshot) -> bool {
        if snapshot.inherited {
            self.execed_at.is_none()
        } else {
            self.execed_at
                .or(self.forked_at)
                .is_none_or(|at| snapshot.taken >= at)
        }
    }

    /// Whether a new read, `new`, replaces the snapshot kept: one that shows the current
    /// image beats one that does not; between two that do, a read of the process's own
    /// beats a copy of its parent's, then the later read wins.
    pub(super) fn replaced_by(&self, new: &ProcessSnapshot) -> bool {
        let Some(old) = &self.snapshot else {
            return true;
        };
        match (self.shows_current_image(old), self.shows_current_image(new)) {
            (false, true) => true,
            (true, false) => false,
            (true, true) if old.inherited != new.inherited => old.inherited,
            _ => old.taken <= new.taken,
        }
    }
}

impl Resolver {
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
            self.shared.request_snapshot(pid, false);
        }
    }

    /// Process `parent` forked `child`: the child's snapshot is a copy of the parent's, now
    /// or once the parent's (next) read is done, which is then asked for if nothing asked
    /// yet. A parent that forks right after its exec (before its exec read) is read once
    /// for all its children.
    pub(super) fn forked(&mut self, parent: u32, child: u32, start_ticks: u64, at: Instant) {
        let period = self.period;
        let entry = self.processes.entry(child).or_default();
        entry.last_period = period;
        entry.exited = false;
        entry.forked_at = Some(at);
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
            .filter(|s| parent_entry.shows_current_image(s))
            .cloned();
        if let Some(snapshot) = current {
            self.inherit(&snapshot, child, start_ticks);
            return;
        }
        if parent_entry.exited {
            self.request(child, true);
            return;
        }
        if !parent_entry.requested {
            parent_entry.requested = true;
            parent_entry.last_period = period;
            self.shared.request_snapshot(parent, true);
        }
        self.forks_waiting
            .entry(parent)
            .or_default()
            .push((child, start_ticks));
    }

    /// Gives `child` a snapshot inherited from `parent`, unless it has one of its own or
    /// has called exec since the fork (its parent's image is no longer its own).
    pub(super) fn inherit(&mut self, parent: &ProcessSnapshot, child: u32, start_ticks: u64) {
        let entry = self.processes.entry(child).or_default();
        if entry.snapshot.is_none() && entry.execed_at.is_none() {
            let snapshot = Arc::new(parent.forked(child, start_ticks));
            if let Some(listener) = &self.unwind {
                listener.process(Arc::clone(&snapshot));
            }
            entry.snapshot = Some(snapshot);
        }
    }

    /// Process `pid` called exec at `at`: what is kept of it shows its previous image
    /// unless it was read since (the watcher reads it again shortly).
    pub(super) fn execed(&mut self, pid: u32, at: Instant) {
        let entry = self.processes.entry(pid).or_default();
        entry.execed_at = Some(at);
        if entry
            .snapshot
            .as_ref()
            .is_some_and(|s| !entry.shows_current_image(s))
        {
            entry.snapshot = None;
        }
    }

    /// Whether `pid` was forked from a process whose read it waits for, to inherit it.
    pub(super) fn awaits_parents_read(&self, pid: u32) -> bool {
        self.forks_waiting
            .values()
            .any(|children| children.iter().any(|&(child, _)| child == pid))
    }

    /// Reads process `pid` unless it is being read, or is known to be gone; `urgent`
    /// as [`Shared::request_snapshot`](super::shared::Shared::request_snapshot) says.
    pub(super) fn request(&mut self, pid: u32, urgent: bool) {
        let entry = self.processes.entry(pid).or_default();
        if !entry.requested && !entry.exited {
            entry.requested = true;
            self.shared.request_snapshot(pid, urgent);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        process::snapshot,
        symbols::resolver::{ResolverSettings, shared::Outcome},
    };

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
        resolver.event_feed().forked(parent, CHILD, 42);
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
    fn a_parents_read_that_lands_after_the_childs_exec_is_not_the_childs_image() {
        let mut resolver = Resolver::new(ResolverSettings::default());
        let parent = std::process::id();
        // The parent's read is under way (as at start-up, when every process is read)
        // while the child forks and calls exec.
        resolver.processes.insert(
            parent,
            ProcessEntry {
                requested: true,
                ..ProcessEntry::default()
            },
        );
        resolver.event_feed().forked(parent, CHILD, 42);
        resolver.event_feed().execed(CHILD);
        resolver.apply_reports();
        // The child's own read, after its exec, is taken before the parent's read ends;
        // the parent's lands first.
        let mut own = snapshot::read_snapshot(parent, false).expect("own snapshot");
        (own.pid, own.comm) = (CHILD, "after-exec".into());
        std::thread::sleep(Duration::from_millis(2));
        let mut parents = snapshot::read_snapshot(parent, false).expect("own snapshot");
        parents.comm = "parent".into();
        resolver.apply(Outcome::Snapshot {
            pid: parent,
            result: Ok(Arc::new(parents)),
        });
        assert!(
            resolver.processes[&CHILD].snapshot.is_none(),
            "a child that called exec inherited its parent's image"
        );
        resolver.apply(Outcome::Snapshot {
            pid: CHILD,
            result: Ok(Arc::new(own)),
        });
        let child = resolver.processes[&CHILD].snapshot.clone().expect("read");
        assert_eq!(child.comm, "after-exec");
        assert!(!child.inherited);
    }

    #[test]
    fn an_exec_forgets_the_inherited_image_even_if_its_read_was_later() {
        let mut resolver = Resolver::new(ResolverSettings::default());
        let parent = std::process::id();
        resolver.event_feed().forked(1, parent, 7);
        resolver.event_feed().execed(parent);
        resolver.apply_reports();
        // A copy of the grandparent's image, read after the exec.
        let mut grandparents = snapshot::read_snapshot(parent, false).expect("own snapshot");
        grandparents.comm = "grandparent".into();
        let copy = grandparents.forked(parent, 7);
        let entry = resolver.processes.get_mut(&parent).expect("entry");
        assert!(!entry.shows_current_image(&copy));
        assert!(entry.replaced_by(&copy), "nothing is kept yet");
        entry.snapshot = Some(Arc::new(copy));
        // A worker forked now waits for the parent's own read.
        resolver.event_feed().forked(parent, CHILD, 9);
        let child = inherited(&mut resolver, CHILD);
        assert_ne!(child.comm, "grandparent");
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
        resolver.event_feed().execed(parent);
        resolver.event_feed().forked(parent, CHILD, 7);
        let child = inherited(&mut resolver, CHILD);
        assert_ne!(child.comm, "before-exec");
        assert!(child.taken >= resolver.processes[&parent].execed_at.expect("exec seen"));
    }
}
