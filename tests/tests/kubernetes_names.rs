//! End to end, as root: pod and container names without the Kubernetes API. A fake
//! `/var/log/pods` tree (the kubelet's `<namespace>_<pod>_<uid>/<container>/` layout) and
//! two workloads moved into cgroups whose paths carry those pods' UIDs: one pod with one
//! container, one with two, where the workload's own mounts carry the kubelet's
//! `pods/<uid>/containers/<name>/` source path (as every container's termination log
//! does). The recorded samples carry namespace, pod and container, and the container
//! names the service. The pod log directory comes from the agent's config file, the key
//! the Kubernetes manifests set.

use std::{process::Command, time::Duration};

use stallscope_tests::{
    Workload, binary, binary_dir, fixtures::CgroupTree, label, only_value,
    record_started_with_config, require_root, samples_of, scratch_dir, serial,
};

#[test]
fn pod_log_directories_name_pods_and_containers() {
    if !require_root("pod_log_directories_name_pods_and_containers") {
        return;
    }
    let _serial = serial();
    let me = std::process::id();
    let dir = scratch_dir("kube-names");
    let single_uid = format!("5a1e0000-0000-4000-8000-{me:012x}");
    let multi_uid = format!("5a1e0000-0000-4000-9000-{me:012x}");
    let logs = dir.join("pods");
    for container in [
        format!("shop_checkout-7d9f8_{single_uid}/checkout"),
        format!("batch_report-x2k_{multi_uid}/report"),
        format!("batch_report-x2k_{multi_uid}/log-shipper"),
        // Another pod, for a UID no process has.
        "shop_cart-1_5a1e0000-0000-4000-a000-000000000000/cart".to_owned(),
    ] {
        let container_dir = logs.join(container);
        std::fs::create_dir_all(&container_dir).expect("pod log directory");
        std::fs::write(container_dir.join("0.log"), "").expect("log file");
    }
    // The kubelet's per-container directory the multi-container workload mounts.
    let kubelet_dir = dir.join(format!("kubelet/pods/{multi_uid}/containers/report/4f2a"));
    std::fs::create_dir_all(&kubelet_dir).expect("kubelet dir");

    let root = format!("stallscope-kube-{me}");
    let single_cgroup = CgroupTree::create(&format!(
        "{root}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{:064x}.scope",
        single_uid.replace('-', "_"),
        u64::from(me)
    ))
    .expect("pod cgroup");
    let multi_cgroup = CgroupTree::create(&format!(
        "{root}/kubepods/burstable/pod{multi_uid}/{:064x}",
        u64::from(me) + 1
    ))
    .expect("second pod cgroup");

    let workload = binary(&binary_dir(), "stallscope-workload").expect("workload built");
    let mut single = Workload::start(&workload, &["markers", "300"]).expect("single workload");
    // The second workload in a mount namespace of its own, with the kubelet directory
    // bind-mounted as a container's termination log is.
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mkdir -p {target} && mount --bind {source} {target} && exec {workload} markers 300",
            target = dir.join("termination-log").display(),
            source = kubelet_dir.display(),
            workload = workload.display(),
        ));
    let mut multi = Workload::spawn(command).expect("workload in its own mount namespace");
    single_cgroup.enter(single.pid).expect("enter pod cgroup");
    multi_cgroup
        .enter(multi.pid)
        .expect("enter second pod cgroup");

    let profile = record_started_with_config(
        &dir,
        &format!("[identity]\npod_logs_dir = \"{}\"\n", logs.display()),
        &mut [&mut single, &mut multi],
    );

    let one = samples_of(&profile, single.pid);
    assert!(!one.is_empty(), "no samples of the single-container pod");
    assert_eq!(only_value(&one, "pod_uid"), single_uid);
    assert_eq!(only_value(&one, "namespace"), "shop");
    assert_eq!(only_value(&one, "pod"), "checkout-7d9f8");
    assert_eq!(only_value(&one, "container"), "checkout");
    assert_eq!(only_value(&one, "service"), "checkout");

    let two = samples_of(&profile, multi.pid);
    assert!(!two.is_empty(), "no samples of the two-container pod");
    assert_eq!(only_value(&two, "pod_uid"), multi_uid);
    assert_eq!(only_value(&two, "namespace"), "batch");
    assert_eq!(only_value(&two, "pod"), "report-x2k");
    assert_eq!(only_value(&two, "container"), "report");
    assert_eq!(only_value(&two, "service"), "report");

    // A process outside any pod has none of these labels.
    let in_pods = [single.pid.to_string(), multi.pid.to_string()];
    assert!(
        profile
            .samples
            .iter()
            .filter(|s| !in_pods.iter().any(|pid| pid == label(s, "pid")))
            .all(|s| label(s, "pod").is_empty())
    );

    for workload in [single, multi] {
        let status = workload.finish(Duration::from_secs(10)).expect("exits");
        assert!(status.success());
    }
    drop(multi_cgroup);
    drop(single_cgroup);
}
