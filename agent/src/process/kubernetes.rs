//! Kubernetes names without the Kubernetes API: the kubelet keeps a log directory per pod,
//! `/var/log/pods/<namespace>_<pod>_<uid>/<container>/`, so the pod UID a process's cgroup
//! carries names its namespace and pod, and the directories inside name its containers.
//! A pod of one container names it; in a pod of several, the process's own mounts say
//! which one it runs in: the kubelet bind-mounts
//! `/var/lib/kubelet/pods/<uid>/containers/<container>/<id>` into every container (its
//! termination log), and that source path shows in `/proc/PID/mountinfo`.

use std::path::Path;

use crate::process::procfs;

/// Where kubelets keep pod logs, unless `[identity] pod_logs_dir` says otherwise.
pub const DEFAULT_POD_LOGS_DIR: &str = "/var/log/pods";

/// Directories read of one pod at most (a pod has a handful of containers).
const MAX_CONTAINERS: usize = 256;

/// The names of a process's pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    /// The container, when the pod has one or the process's mounts name it.
    pub container: Option<String>,
}

/// The names of the pod with `uid`, from the pod log directories under `pod_logs_dir`,
/// with the container of process `pid`; `None` when no directory has that UID.
pub fn pod_names(pod_logs_dir: &Path, uid: &str, pid: u32) -> Option<PodNames> {
    let suffix = format!("_{uid}");
    let entry = std::fs::read_dir(pod_logs_dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| entry.file_name().to_string_lossy().ends_with(&suffix))?;
    let name = entry.file_name().to_string_lossy().into_owned();
    // Namespaces and pod names are DNS labels and subdomains: no `_` in either.
    let (namespace, pod) = name.strip_suffix(&suffix)?.split_once('_')?;
    let mut containers: Vec<String> = std::fs::read_dir(entry.path())
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .take(MAX_CONTAINERS)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    containers.sort_unstable();
    let container = if let [only] = containers.as_slice() {
        Some(only.clone())
    } else {
        procfs::read_small(
            &Path::new("/proc").join(pid.to_string()).join("mountinfo"),
            1024 * 1024,
        )
        .ok()
        .and_then(|text| container_of_mounts(&String::from_utf8_lossy(&text), uid))
        .filter(|name| containers.contains(name))
    };
    Some(PodNames {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        container,
    })
}

/// The container whose kubelet directory (`.../pods/<uid>/containers/<name>/...`) is the
/// source of one of the mounts in `mountinfo` (the fourth field, the mount's root).
fn container_of_mounts(mountinfo: &str, uid: &str) -> Option<String> {
    let marker = format!("/pods/{uid}/containers/");
    mountinfo.lines().find_map(|line| {
        let root = line.split(' ').nth(3)?;
        let (_, rest) = root.split_once(&marker)?;
        let name = rest.split('/').next()?;
        (!name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0c4e3a5e-1b2c-4d5e-8f90-123456789abc";

    #[test]
    fn pod_and_container_from_the_log_directories() {
        let root = std::env::temp_dir().join(format!("stallscope-pods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(format!("shop_checkout-7d9f_{UID}/app")))
            .expect("pod dir");
        std::fs::create_dir_all(root.join("shop_other_0c4e3a5e-0000-0000-0000-000000000000/x"))
            .expect("other pod");
        let names = pod_names(&root, UID, std::process::id()).expect("found");
        assert_eq!(
            names,
            PodNames {
                namespace: "shop".into(),
                pod: "checkout-7d9f".into(),
                container: Some("app".into()),
            }
        );
        // Two containers: this process's mounts name neither.
        std::fs::create_dir_all(root.join(format!("shop_checkout-7d9f_{UID}/sidecar")))
            .expect("second container");
        let names = pod_names(&root, UID, std::process::id()).expect("found");
        assert_eq!(names.container, None);
        assert!(pod_names(&root, "no-such-uid", std::process::id()).is_none());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_termination_log_mount_names_the_container() {
        let mountinfo = format!(
            "1040 1020 0:52 / / rw,relatime - overlay overlay rw\n\
             1051 1040 253:1 /var/lib/kubelet/pods/{UID}/containers/sidecar/3c1b2a /dev/termination-log rw - ext4 /dev/vda1 rw\n"
        );
        assert_eq!(
            container_of_mounts(&mountinfo, UID).as_deref(),
            Some("sidecar")
        );
        assert_eq!(container_of_mounts(&mountinfo, "other"), None);
    }
}
