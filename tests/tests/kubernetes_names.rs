//! End to end, as root: pod and container names without the Kubernetes API. A fake
//! `/var/log/pods` tree (the kubelet's `<namespace>_<pod>_<uid>/<container>/` layout) and
//! two workloads moved into cgroups whose paths carry those pods' UIDs: one pod with one
//! container, one with two, where the workload's own mounts carry the kubelet's
//! `pods/<uid>/containers/<name>/` source path (as every container's termination log
//! does). The recorded samples carry namespace, pod and container, and the container
//! names the service. The pod log directory comes from the agent's config file, the key
//! the Kubernetes manifests set.

use std::{process::Command, time::Duration};

use stallscope_profile::{Profile, Sample};
use stallscope_tests::{
    Workload, binary, binary_dir, fixtures::CgroupTree, label, require_root, scratch_dir, serial,
    start_agent, stop_agent,
};

fn samples_of(profile: &Profile, pid: u32) -> Vec<&Sample> {
    let pid = pid.to_string();
    profile
        .samples
        .iter()
        .filter(|s| label(s, "pid") == pid)
        .collect()
}

/// The one value `key` has over all of `samples`.
fn only_value<'a>(samples: &[&'a Sample], key: &str) -> &'a str {
    let mut values: Vec<&str> = samples.iter().map(|s| label(s, key)).collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), 1, "{key}: several values {values:?}");
    values[0]
}

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

    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("[identity]\npod_logs_dir = \"{}\"\n", logs.display()),
    )
    .expect("config written");
    let out = dir.join("kube.pb.gz");
    let (out_arg, config_arg) = (
        out.to_string_lossy().into_owned(),
        config.to_string_lossy().into_owned(),
    );
    let agent = start_agent(&[
        "record",
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "--config",
        &config_arg,
        "-o",
        &out_arg,
    ])
    .expect("agent starts");
    for workload in [&mut single, &mut multi] {
        workload.go().expect("go");
    }
    for workload in [&mut single, &mut multi] {
        workload
            .wait_done(Duration::from_secs(60))
            .expect("scenario done");
    }
    let (profile, _) = stop_agent(agent, &out);

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
