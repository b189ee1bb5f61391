//! The Kubernetes manifests (`deploy/kubernetes`, a kustomize base): rendered with
//! `kubectl kustomize` (each file read in the kustomization's order where kubectl is
//! missing; the test says which), validated offline against the Kubernetes 1.37 schema by
//! `kubernetes-validate --strict`, and what they pass to the binaries is what the
//! binaries accept: the `DaemonSet`'s arguments go through the agent's own argument parser
//! and its `ConfigMap` through the agent's configuration loader, the `StatefulSet`'s through
//! the collector's, and ports, mounts and addresses agree across the manifests.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use clap::Parser as _;
use serde_json::Value;
use stallscope_tests::{
    collector::scratch,
    in_ci,
    kubernetes::{has_kubectl, python, validator},
};

/// The capabilities the agent's container gets: the systemd unit's set.
const AGENT_CAPABILITIES: [&str; 8] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SETPCAP",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "CHECKPOINT_RESTORE",
    "SYSLOG",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn target_dir() -> PathBuf {
    root().join("target")
}

/// Whether the validator's environment is installed; in CI its absence fails.
fn require_validator(test: &str) -> bool {
    if validator(&target_dir()).exists() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test} needs kubernetes-validate (`cargo xtask bootstrap` installs it), and CI=true forbids skipping"
    );
    eprintln!("skipping {test}: run `cargo xtask bootstrap` to install kubernetes-validate");
    false
}

/// The base rendered as one YAML stream, and how it was rendered.
fn rendered() -> (String, &'static str) {
    let base = root().join("deploy/kubernetes");
    if has_kubectl() {
        let output = Command::new("kubectl")
            .arg("kustomize")
            .arg(&base)
            .output()
            .expect("kubectl runs");
        assert!(
            output.status.success(),
            "kubectl kustomize: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return (
            String::from_utf8(output.stdout).expect("UTF-8"),
            "rendered with kubectl kustomize",
        );
    }
    // Without kubectl: the kustomization's resources, in order (the namespace the
    // kustomization sets is left out, which the schema allows).
    let kustomization =
        std::fs::read_to_string(base.join("kustomization.yaml")).expect("kustomization");
    let mut text = String::new();
    let mut in_resources = false;
    for line in kustomization.lines() {
        if line.starts_with("resources:") {
            in_resources = true;
        } else if in_resources && let Some(file) = line.trim().strip_prefix("- ") {
            text.push_str("---\n");
            text.push_str(&std::fs::read_to_string(base.join(file)).expect("resource file"));
        } else if !line.starts_with(' ') {
            in_resources = false;
        }
    }
    (
        text,
        "kubectl not installed: each resource file validated as written",
    )
}

/// The documents of a YAML stream, as JSON (`PyYAML` of the validator's environment).
fn documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python(&target_dir()))
        .args([
            "-c",
            "import json, sys, yaml\njson.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python of the validator's environment");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("YAML fed");
    let output = child.wait_with_output().expect("python finishes");
    assert!(output.status.success(), "YAML does not parse");
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// `kubernetes-validate --strict` on `yaml`; its verdict and its report.
fn validate(yaml: &str, name: &str) -> (bool, String) {
    let path = scratch(name).join("rendered.yaml");
    std::fs::write(&path, yaml).expect("rendered written");
    let output = Command::new(validator(&target_dir()))
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .arg(&path)
        .output()
        .expect("kubernetes-validate runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[test]
fn manifests_validate_offline_against_the_kubernetes_schema() {
    if !require_validator("manifests_validate_offline_against_the_kubernetes_schema") {
        return;
    }
    let (yaml, how) = rendered();
    eprintln!("deploy/kubernetes {how}");
    let (ok, report) = validate(&yaml, "k8s-validate");
    assert!(ok, "kubernetes-validate refused the manifests:\n{report}");
    for resource in [
        "daemonset/stallscope-agent",
        "statefulset/stallscope-collector",
        "service/stallscope-collector",
        "configmap/stallscope-agent",
        "configmap/stallscope-collector",
        "priorityclass/stallscope-node-agent",
    ] {
        assert!(
            report.contains(&format!("passed for resource {resource}")),
            "{resource} not validated:\n{report}"
        );
    }
    // The check is strict: a misspelt field is refused.
    let broken = yaml.replacen("hostPID: true", "hostPid: true", 1);
    assert_ne!(broken, yaml, "the DaemonSet sets hostPID");
    let (ok, report) = validate(&broken, "k8s-validate-broken");
    assert!(!ok, "a misspelt field passed:\n{report}");
}

/// The one document of `kind` named `name`.
fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A pod's volumes by mount path: the volume's definition and whether it is read-only.
fn mounts(pod: &Value, container: &Value) -> BTreeMap<String, (Value, bool)> {
    let mut volumes: BTreeMap<String, Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap_or("").to_owned(), v.clone()))
        .collect();
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let name = m["name"].as_str().unwrap_or("");
            let volume = volumes
                .remove(name)
                .unwrap_or_else(|| serde_json::json!({ "claim": name }));
            (
                m["mountPath"].as_str().unwrap_or("").to_owned(),
                (volume, m["readOnly"] == true),
            )
        })
        .collect()
}

/// Files of the `ConfigMaps` a container mounts, written under `dir` at their mount paths
/// (so `/etc/stallscope/config/agent.toml` becomes `dir/etc/stallscope/config/agent.toml`).
fn write_config_maps(
    docs: &[Value],
    volumes: &BTreeMap<String, (Value, bool)>,
    dir: &Path,
) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for (mount, (volume, _)) in volumes {
        let Some(map) = volume["configMap"]["name"].as_str() else {
            continue;
        };
        let data = &find(docs, "ConfigMap", map)["data"];
        for (file, text) in data.as_object().expect("ConfigMap data") {
            let text = text.as_str().expect("text").to_owned();
            let path = dir.join(mount.trim_start_matches('/')).join(file);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("config dir");
            std::fs::write(
                &path,
                text.replace(
                    "/etc/stallscope",
                    &format!("{}/etc/stallscope", dir.display()),
                ),
            )
            .expect("config file");
            files.insert(format!("{mount}/{file}"), text);
        }
    }
    files
}

fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name}"))
}

#[test]
fn the_manifests_pass_flags_and_config_the_binaries_accept() {
    if !require_validator("the_manifests_pass_flags_and_config_the_binaries_accept") {
        return;
    }
    let (yaml, how) = rendered();
    eprintln!("deploy/kubernetes {how}");
    let docs = documents(&yaml);
    let dir = scratch("k8s-config");

    // The agent: its arguments through the agent's parser, its file through its loader.
    let daemonset = find(&docs, "DaemonSet", "stallscope-agent");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let agent = &pod["containers"][0];
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&security["capabilities"]["add"]),
        AGENT_CAPABILITIES
    );
    let env_node = agent["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        env_node["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let volumes = mounts(pod, agent);
    let files = write_config_maps(&docs, &volumes, &dir);
    let mut argv = strings(&agent["command"]);
    argv.extend(strings(&agent["args"]).into_iter().map(|arg| {
        arg.replace("$(NODE_NAME)", "node-a").replace(
            "/etc/stallscope",
            &format!("{}/etc/stallscope", dir.display()),
        )
    }));
    let cli = stallscope_agent::config::cli::Cli::try_parse_from(&argv).unwrap_or_else(|err| {
        panic!("the agent refuses the DaemonSet's arguments {argv:?}: {err}")
    });
    let stallscope_agent::config::cli::Command::Run(run) = cli.command else {
        panic!("the DaemonSet does not run `stallscope-agent run`");
    };
    let config = run
        .config()
        .unwrap_or_else(|err| panic!("the agent refuses its ConfigMap: {err}"));
    assert_eq!(config.agent_id, "node-a");
    let metrics = config.metrics_listen.expect("metrics_listen set");
    let metrics_port = container_port(agent, "metrics");
    assert_eq!(u64::from(metrics.port()), metrics_port);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["port"].as_u64(), Some(metrics_port));
    }
    // The pod logs and the spool are the node's, where the config says.
    let pod_logs = config.sampling.pod_logs_dir.to_string_lossy().into_owned();
    let (volume, read_only) = &volumes[&pod_logs];
    assert_eq!(volume["hostPath"]["path"], "/var/log/pods");
    assert!(read_only);
    assert!(
        volumes.iter().any(|(mount, (volume, _))| {
            volume["hostPath"].is_object() && config.spool_dir.starts_with(mount)
        }),
        "the spool {} is on no hostPath volume",
        config.spool_dir.display()
    );
    // The agent streams to the collector's Service.
    let service = find(&docs, "Service", "stallscope-collector");
    let namespace = service["metadata"]["namespace"]
        .as_str()
        .unwrap_or("stallscope");
    let grpc_port = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "grpc")
        .and_then(|p| p["port"].as_u64())
        .expect("grpc port");
    assert_eq!(
        config.collector,
        format!("http://stallscope-collector.{namespace}.svc:{grpc_port}")
    );
    // The commented mTLS lines of the agent's file are valid too.
    let agent_toml = files
        .iter()
        .find(|(path, _)| path.ends_with("agent.toml"))
        .map(|(_, text)| text.clone())
        .expect("agent.toml");
    let with_tls = agent_toml.replace("# tls_", "tls_");
    let mut file = stallscope_agent::config::FileConfig::parse(&with_tls)
        .unwrap_or_else(|(line, err)| panic!("agent.toml with TLS, line {line}: {err}"));
    let run_file = std::mem::take(&mut file.run);
    let sampling = stallscope_agent::config::Config::build(
        file,
        stallscope_agent::config::Overrides::default(),
    )
    .expect("sampling");
    let tls = stallscope_agent::config::RunConfig::build(
        sampling,
        run_file,
        stallscope_agent::config::RunOverrides::default(),
    )
    .expect("agent.toml with TLS");
    assert!(tls.tls.is_some());

    // The collector: its arguments and file through the collector's own loader.
    let statefulset = find(&docs, "StatefulSet", "stallscope-collector");
    let pod = &statefulset["spec"]["template"]["spec"];
    let collector = &pod["containers"][0];
    let volumes = mounts(pod, collector);
    let files = write_config_maps(&docs, &volumes, &dir);
    for (mount, (volume, _)) in &volumes {
        if volume["secret"].is_object() {
            let tokens = dir.join(mount.trim_start_matches('/')).join("tokens.txt");
            std::fs::create_dir_all(tokens.parent().expect("parent")).expect("secret dir");
            std::fs::write(&tokens, "a-token\n").expect("token file");
        }
    }
    let mut argv = strings(&collector["command"]);
    argv.extend(strings(&collector["args"]).into_iter().map(|arg| {
        arg.replace(
            "/etc/stallscope",
            &format!("{}/etc/stallscope", dir.display()),
        )
    }));
    let cli = stallscope_collector::config::Cli::try_parse_from(&argv)
        .unwrap_or_else(|err| panic!("the collector refuses the StatefulSet's arguments: {err}"));
    let config = stallscope_collector::config::Config::from_cli(&cli)
        .unwrap_or_else(|err| panic!("the collector refuses its ConfigMap: {err}"));
    assert_eq!(
        u64::from(config.listen.port()),
        container_port(collector, "grpc")
    );
    assert_eq!(u64::from(config.listen.port()), grpc_port);
    let http = config.http.as_ref().expect("http_listen set");
    assert_eq!(
        u64::from(http.listen.port()),
        container_port(collector, "http")
    );
    let stallscope_collector::config::StorageConfig::Sqlite { data_dir } = &config.storage else {
        panic!("the base stores in SQLite");
    };
    let claim = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .expect("a volume claim");
    assert_eq!(
        volumes[&data_dir.to_string_lossy().into_owned()].0["claim"],
        claim,
        "the SQLite directory is not on the claim"
    );
    assert_eq!(
        service["spec"]["selector"],
        statefulset["spec"]["template"]["metadata"]["labels"]
    );
    // The commented ClickHouse variant of the collector's file is valid too.
    let collector_toml = files
        .iter()
        .find(|(path, _)| path.ends_with("collector.toml"))
        .map(|(_, text)| text.clone())
        .expect("collector.toml");
    let clickhouse: String = collector_toml
        .lines()
        .filter(|line| !line.starts_with("storage = ") && !line.starts_with("data_dir = "))
        .map(|line| {
            line.strip_prefix("# ")
                .filter(|rest| rest.starts_with("storage") || rest.starts_with("clickhouse_"))
                .unwrap_or(line)
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "/etc/stallscope",
            &format!("{}/etc/stallscope", dir.display()),
        );
    let variant = dir.join("collector-clickhouse.toml");
    std::fs::write(&variant, clickhouse).expect("variant written");
    let cli = stallscope_collector::config::Cli::try_parse_from([
        "stallscope-collector",
        "--config",
        &variant.to_string_lossy(),
    ])
    .expect("--config");
    let config = stallscope_collector::config::Config::from_cli(&cli)
        .unwrap_or_else(|err| panic!("the ClickHouse variant is refused: {err}"));
    assert!(matches!(
        config.storage,
        stallscope_collector::config::StorageConfig::ClickHouse { .. }
    ));
}
