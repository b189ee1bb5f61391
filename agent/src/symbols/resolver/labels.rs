//! What the resolver says about workloads: identity labels of a process (executable,
//! build-id, container, pod, unit, service) and change events (deploys, restarts).

use std::{collections::HashSet, path::Path, sync::Arc, time::Duration};

use stallscope_profile::{ChangeEvent, ChangeKind, Labels};

use super::{Resolver, binary_table::FileState};
use crate::process::{
    identity::{self, ProcessNames},
    snapshot::ProcessSnapshot,
};

pub(super) struct ServiceState {
    pub(super) last_pid: u32,
    /// Start time of `last_pid`, in clock ticks after boot.
    pub(super) last_start_ticks: u64,
    pub(super) build_id: Option<String>,
    pub(super) live: HashSet<u32>,
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

/// The Kubernetes container a process runs in, when its pod's names are known.
fn kube_container(snapshot: &ProcessSnapshot) -> Option<&str> {
    snapshot.kubernetes.as_ref()?.container.as_deref()
}

impl Resolver {
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
                        container: None,
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
        if let Some(names) = &snapshot.kubernetes {
            labels.insert("namespace".into(), names.namespace.clone());
            labels.insert("pod".into(), names.pod.clone());
            if let Some(container) = &names.container {
                labels.insert("container".into(), container.clone());
            }
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

    pub(super) fn service(&self, snapshot: &ProcessSnapshot) -> String {
        identity::service_of(
            &self.settings.service_rules,
            &ProcessNames {
                comm: &snapshot.comm,
                exe: snapshot.exe.as_deref(),
                cgroup: &snapshot.cgroup,
                container: kube_container(snapshot),
            },
        )
    }

    pub(super) fn exe_build_id(&self, snapshot: &ProcessSnapshot) -> Option<String> {
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
                    container: kube_container(&snapshot),
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
