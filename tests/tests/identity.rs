//! End to end, as root: workload identity. Processes moved into cgroups shaped like
//! Kubernetes' and systemd's get the container id, pod UID, unit and service labels; a
//! service restarted with a rebuilt binary produces a deploy event with both build-ids;
//! secrets on command lines never reach any output.

use std::{path::Path, time::Duration};

use stallscope_profile::ChangeKind;
use stallscope_tests::{
    Workload, binary, binary_dir,
    fixtures::{self, Build, CgroupTree},
    label, only_value, record_started_with_config, record_workload, require_root, samples_of,
    scratch_dir, serial, start_agent, stop_agent,
};

fn workload_binary() -> std::path::PathBuf {
    binary(&binary_dir(), "stallscope-workload").expect("workload built")
}

#[test]
fn cgroups_shaped_like_kubernetes_and_systemd_name_the_workload() {
    if !require_root("cgroups_shaped_like_kubernetes_and_systemd_name_the_workload") {
        return;
    }
    let _serial = serial();
    let me = std::process::id();
    let container_id = format!("{:064x}", 0x00c0_ffee_u64 << 32 | u64::from(me));
    let pod_uid = format!("1b2c3d4e-5f60-7182-93a4-{me:012x}");
    let root = format!("stallscope-test-{me}");
    // Declared outer first: dropped last, after the tree that reuses its root.
    let kube = CgroupTree::create(&format!(
        "{root}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
        pod_uid.replace('-', "_")
    ))
    .expect("kubepods cgroup");
    let unit = CgroupTree::create(&format!("{root}/system.slice/stallscope-probe.service"))
        .expect("system.slice cgroup");

    let mut in_pod =
        Workload::start(&workload_binary(), &["markers", "300"]).expect("workload in a pod");
    let mut in_unit =
        Workload::start(&workload_binary(), &["markers", "300"]).expect("workload in a unit");
    kube.enter(in_pod.pid).expect("enter pod cgroup");
    unit.enter(in_unit.pid).expect("enter unit cgroup");

    // A rule names the pod's service by container id prefix; the unit's comes from it.
    let dir = scratch_dir("cgroups");
    let profile = record_started_with_config(
        &dir,
        &format!(
            "[[identity.service]]\nservice = \"checkout\"\ncontainer_id = \"{}\"\n",
            &container_id[..12]
        ),
        &mut [&mut in_pod, &mut in_unit],
    );

    let pod = samples_of(&profile, in_pod.pid);
    assert!(!pod.is_empty(), "no samples of the pod's process");
    assert_eq!(only_value(&pod, "container_id"), container_id);
    assert_eq!(only_value(&pod, "container_runtime"), "containerd");
    assert_eq!(only_value(&pod, "pod_uid"), pod_uid);
    assert_eq!(only_value(&pod, "cgroup"), kube.path());
    assert_eq!(only_value(&pod, "systemd_unit"), "");
    assert_eq!(only_value(&pod, "service"), "checkout");

    let service = samples_of(&profile, in_unit.pid);
    assert!(!service.is_empty(), "no samples of the unit's process");
    assert_eq!(
        only_value(&service, "systemd_unit"),
        "stallscope-probe.service"
    );
    assert_eq!(only_value(&service, "service"), "stallscope-probe");
    assert_eq!(only_value(&service, "container_id"), "");
    assert_eq!(only_value(&service, "pod_uid"), "");

    for workload in [in_pod, in_unit] {
        let status = workload.finish(Duration::from_secs(10)).expect("exits");
        assert!(status.success());
    }
    drop(unit);
    drop(kube);
}

#[test]
fn restart_with_a_rebuilt_binary_is_a_deploy_event() {
    if !require_root("restart_with_a_rebuilt_binary_is_a_deploy_event") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("deploy");
    let app = dir.join("identapp");
    let build = |version: &str, path: &Path| {
        fixtures::build_identapp(
            path,
            Build {
                version,
                build_id: true,
                split_debug: false,
            },
        )
        .expect("builds the C workload");
    };
    build("1", &app);
    let old_build = fixtures::build_id(&app).expect("build-id");
    let out = dir.join("deploy.pb.gz");
    let out_arg = out.to_string_lossy().into_owned();
    let agent = start_agent(&[
        "record",
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "-o",
        &out_arg,
    ])
    .expect("agent starts");

    let mut first = Workload::start(&app, &["2"]).expect("version 1");
    let first_pid = first.pid;
    first.go().expect("go");
    first
        .wait_done(Duration::from_secs(60))
        .expect("version 1 done");
    assert!(
        first
            .finish(Duration::from_secs(10))
            .expect("exits")
            .success()
    );

    // The deploy: a new build replaces the file, and the service starts again.
    let staged = dir.join("identapp.new");
    build("2", &staged);
    std::fs::rename(&staged, &app).expect("replace the binary");
    let new_build = fixtures::build_id(&app).expect("build-id");
    assert_ne!(old_build, new_build);
    let mut second = Workload::start(&app, &["2"]).expect("version 2");
    let second_pid = second.pid;
    second.go().expect("go");
    second
        .wait_done(Duration::from_secs(60))
        .expect("version 2 done");
    let (profile, _) = stop_agent(agent, &out);
    assert!(
        second
            .finish(Duration::from_secs(10))
            .expect("exits")
            .success()
    );

    let deploys: Vec<_> = profile
        .meta
        .events
        .iter()
        .filter(|e| e.service == "identapp")
        .collect();
    assert_eq!(deploys.len(), 1, "{deploys:?}");
    let deploy = deploys[0];
    assert_eq!(deploy.kind, ChangeKind::Deploy);
    assert_eq!(deploy.pid, second_pid);
    assert_eq!(deploy.previous_pid, Some(first_pid));
    assert_eq!(deploy.build_id.as_deref(), Some(new_build.as_str()));
    assert_eq!(
        deploy.previous_build_id.as_deref(),
        Some(old_build.as_str())
    );
    assert_eq!(
        deploy.executable.as_deref(),
        Some(app.to_string_lossy().as_ref())
    );
}

/// Whether `needle` occurs in `text` as a word of its own (not inside a longer word or
/// a hex number).
fn has_word(text: &str, needle: &str) -> bool {
    text.match_indices(needle).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + needle.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

#[test]
fn secrets_on_command_lines_never_reach_any_output() {
    if !require_root("secrets_on_command_lines_never_reach_any_output") {
        return;
    }
    let scenario = ["markers", "300", "--password=hunter2", "--token", "abc"];
    for extension in ["pb.gz", "folded", "svg", "json"] {
        let out = scratch_dir(&format!("redact-{}", extension.replace('.', "-")))
            .join(format!("redact.{extension}"));
        let out_arg = out.to_string_lossy().into_owned();
        let exit = record_workload(
            &binary_dir(),
            &scenario,
            &["-o", &out_arg, "--signals", "offcpu", "--cmdline"],
        )
        .expect("recording runs");
        assert!(exit.status.success(), "agent failed: {}", exit.stderr);
        let bytes = std::fs::read(&out).expect("output written");
        let text = if extension == "pb.gz" {
            let profile = stallscope_profile::decode_pprof(&bytes).expect("valid pprof");
            let cmdline = profile
                .samples
                .iter()
                .map(|s| label(s, "cmdline"))
                .find(|c| !c.is_empty())
                .expect("command lines were collected")
                .to_owned();
            assert!(
                cmdline.ends_with("markers 300 --password=<redacted> --token <redacted>"),
                "{cmdline}"
            );
            format!("{profile:?}")
        } else {
            String::from_utf8_lossy(&bytes).into_owned()
        };
        for output in [&text, &exit.stderr] {
            assert!(
                !output.contains("hunter2"),
                "password leaked in {extension}"
            );
            assert!(!has_word(output, "abc"), "token leaked in {extension}");
        }
    }
}

#[test]
fn words_are_told_from_hex() {
    assert!(has_word("--token abc x", "abc"));
    assert!(has_word("abc", "abc"));
    assert!(!has_word("0x7fabc1 [unknown] 0x7f0abc", "abc"));
}

/// Records the whole host while a shell loop runs `runs` short-lived copies of `sleep`
/// named `napper` (each replacing the last), with `config` as the agent's configuration
/// file (if any). Returns the restart events of the profile and the napper's service.
fn record_sleep_loop(
    test: &str,
    config: Option<&str>,
) -> (Vec<stallscope_profile::ChangeEvent>, String) {
    let dir = scratch_dir(test);
    let napper = dir.join("stallscope-napper");
    std::fs::copy("/bin/sleep", &napper).expect("copy sleep");
    let out = dir.join("loop.pb.gz");
    let out_arg = out.to_string_lossy().into_owned();
    let mut args = vec![
        "record",
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "-o",
        &out_arg,
    ];
    let config_path = dir.join("agent.toml");
    let config_arg = config_path.to_string_lossy().into_owned();
    if let Some(text) = config {
        std::fs::write(&config_path, text).expect("write config");
        args.extend(["--config", &config_arg]);
    }
    let agent = start_agent(&args).expect("agent starts");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do {} 0.2; done",
            napper.display()
        ))
        .status()
        .expect("shell loop runs");
    assert!(status.success());
    let (profile, _) = stop_agent(agent, &out);
    let restarts: Vec<_> = profile
        .meta
        .events
        .iter()
        .filter(|e| e.kind == ChangeKind::Restart)
        .cloned()
        .collect();
    (restarts, napper.to_string_lossy().into_owned())
}

#[test]
fn short_lived_commands_are_no_restarts_but_declared_services_are() {
    if !require_root("short_lived_commands_are_no_restarts_but_declared_services_are") {
        return;
    }
    let _serial = serial();
    // Twelve 0.2 s commands replacing each other: no service restarted.
    let (restarts, _) = record_sleep_loop("restart-loop", None);
    let loop_restarts: Vec<_> = restarts
        .iter()
        .filter(|e| e.service == "stallscope-napper")
        .collect();
    assert!(
        loop_restarts.is_empty(),
        "a shell loop's commands became restart events: {loop_restarts:?}"
    );
    // The same processes, declared a service by a rule: each replacement is a restart.
    let rule = "[[identity.service]]\nservice = \"napper\"\nprocess = \"stallscope-napp\"\n";
    let (restarts, napper) = record_sleep_loop("restart-rule", Some(rule));
    let declared: Vec<_> = restarts.iter().filter(|e| e.service == "napper").collect();
    assert!(
        declared.len() >= 8,
        "a declared service's replacements were not restarts ({} of 11): {restarts:?}",
        declared.len()
    );
    assert!(
        declared
            .iter()
            .all(|e| e.executable.as_deref() == Some(napper.as_str())),
        "{declared:?}"
    );
}
