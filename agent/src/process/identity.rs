//! Workload identity from what the kernel says about a process: its cgroup path parsed to
//! a container id (containerd, CRI-O, Docker, Podman), a Kubernetes pod UID and a systemd
//! unit; the `service` label derived from them with a documented precedence (overridable
//! by configuration rules); and command lines with secret-looking values redacted.

use serde::Deserialize;

/// What a cgroup path says about the workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The path the rest was parsed from (cgroup v2 when it says anything, else v1).
    pub path: String,
    pub container_id: Option<String>,
    /// `containerd`, `cri-o`, `docker` or `podman`; `None` for a bare id.
    pub runtime: Option<&'static str>,
    pub pod_uid: Option<String>,
    /// The systemd unit (`nginx.service`), when the process runs in one.
    pub unit: Option<String>,
}

/// Picks the most telling path from `/proc/PID/cgroup` and parses it. In hybrid and v1
/// hierarchies the unified (`0::`) path may be `/` while a v1 controller has the
/// container's path, so every line is tried: the first one naming a container or pod
/// wins, then the unified path, then the `name=systemd` one.
pub fn from_proc_cgroup(text: &str) -> CgroupIdentity {
    let mut unified = None;
    let mut systemd = None;
    let mut others = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        } else if controllers == "name=systemd" {
            systemd = Some(path);
        } else {
            others.push(path);
        }
    }
    let ordered: Vec<&str> = unified.into_iter().chain(systemd).chain(others).collect();
    let parsed: Vec<CgroupIdentity> = ordered.iter().map(|path| from_cgroup_path(path)).collect();
    if let Some(found) = parsed
        .iter()
        .find(|id| id.container_id.is_some() || id.pod_uid.is_some())
    {
        return found.clone();
    }
    parsed
        .iter()
        .find(|id| id.path != "/" && !id.path.is_empty())
        .or(parsed.first())
        .cloned()
        .unwrap_or_default()
}

const CONTAINER_SCOPES: [(&str, &str); 4] = [
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("docker-", "docker"),
    ("libpod-", "podman"),
];

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses one cgroup path: systemd-driver names (`cri-containerd-<id>.scope`,
/// `kubepods-burstable-pod<uid>.slice`) and cgroupfs-driver ones (`/kubepods/pod<uid>/<id>`,
/// `/docker/<id>`).
pub fn from_cgroup_path(path: &str) -> CgroupIdentity {
    let mut identity = CgroupIdentity {
        path: path.to_owned(),
        ..CgroupIdentity::default()
    };
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let in_kubepods = components.iter().any(|c| c.starts_with("kubepods"));
    for (index, component) in components.iter().enumerate() {
        if let Some(scope) = component.strip_suffix(".scope")
            && let Some((id, runtime)) = CONTAINER_SCOPES.iter().find_map(|(prefix, runtime)| {
                scope
                    .strip_prefix(prefix)
                    .filter(|id| is_container_id(id))
                    .map(|id| (id, *runtime))
            })
        {
            identity.container_id = Some(id.to_owned());
            identity.runtime = Some(runtime);
            continue;
        }
        if is_container_id(component) {
            identity.container_id = Some((*component).to_owned());
            let parent = index.checked_sub(1).and_then(|i| components.get(i));
            identity.runtime = match parent {
                Some(&"docker") => Some("docker"),
                Some(p) if p.starts_with("crio") => Some("cri-o"),
                _ => identity.runtime,
            };
            continue;
        }
        if let Some(slice) = component.strip_suffix(".slice")
            && slice.starts_with("kubepods")
            && let Some(uid) = slice.rsplit_once("-pod").map(|(_, uid)| uid)
        {
            identity.pod_uid = Some(uid.replace('_', "-"));
            continue;
        }
        if in_kubepods && let Some(uid) = component.strip_prefix("pod") {
            identity.pod_uid = Some(uid.to_owned());
            continue;
        }
        if component.ends_with(".service") {
            identity.unit = Some((*component).to_owned());
        }
    }
    identity
}

/// A configuration rule naming the service of matching processes. Every matcher given
/// must match; a rule with none is rejected when the configuration is built.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceRule {
    pub service: String,
    /// The systemd unit, e.g. `checkout.service`.
    pub unit: Option<String>,
    /// The process name (comm, at most 15 bytes).
    pub process: Option<String>,
    /// The executable: a full path, or a file name matched against the path's last part.
    pub executable: Option<String>,
    /// A container id or a prefix of one (12 characters, as `docker ps` shows, suffice).
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// A prefix of the cgroup path.
    pub cgroup_prefix: Option<String>,
}

impl ServiceRule {
    pub fn has_matcher(&self) -> bool {
        self.unit.is_some()
            || self.process.is_some()
            || self.executable.is_some()
            || self.container_id.is_some()
            || self.pod_uid.is_some()
            || self.cgroup_prefix.is_some()
    }

    fn matches(&self, process: &ProcessNames<'_>) -> bool {
        let exact = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|want| have == Some(want))
        };
        exact(&self.unit, process.cgroup.unit.as_deref())
            && exact(&self.process, Some(process.comm))
            && exact(&self.pod_uid, process.cgroup.pod_uid.as_deref())
            && self.executable.as_deref().is_none_or(|want| {
                process.exe.is_some_and(|exe| {
                    exe == want || (!want.contains('/') && file_name(exe) == want)
                })
            })
            && self.container_id.as_deref().is_none_or(|want| {
                process
                    .cgroup
                    .container_id
                    .as_deref()
                    .is_some_and(|id| !want.is_empty() && id.starts_with(want))
            })
            && self
                .cgroup_prefix
                .as_deref()
                .is_none_or(|want| process.cgroup.path.starts_with(want))
    }
}

/// What the service label is derived from.
pub struct ProcessNames<'a> {
    pub comm: &'a str,
    pub exe: Option<&'a str>,
    pub cgroup: &'a CgroupIdentity,
    /// The Kubernetes container (from the pod log directories), if known.
    pub container: Option<&'a str>,
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Units that hold unrelated processes, so they do not name a service.
fn is_generic_unit(unit: &str) -> bool {
    unit.starts_with("user@") || unit.starts_with("session-") || unit == "init.scope"
}

/// The `service` label, by precedence: (1) the first configuration rule that matches;
/// (2) the Kubernetes container name; (3) the systemd unit without `.service` (units
/// shared by unrelated processes, such as `user@1000.service`, excepted); (4) the
/// executable's file name; (5) the process name.
pub fn service_of(rules: &[ServiceRule], process: &ProcessNames<'_>) -> String {
    if let Some(rule) = rules.iter().find(|rule| rule.matches(process)) {
        return rule.service.clone();
    }
    if let Some(container) = process.container {
        return container.to_owned();
    }
    if let Some(unit) = process
        .cgroup
        .unit
        .as_deref()
        .filter(|u| !is_generic_unit(u))
    {
        return unit.strip_suffix(".service").unwrap_or(unit).to_owned();
    }
    if let Some(exe) = process.exe.filter(|exe| !exe.is_empty()) {
        return file_name(exe).to_owned();
    }
    process.comm.to_owned()
}

/// Whether the process's service is declared rather than guessed: a configuration rule
/// names it, or it runs in a systemd unit or a container. Only such services, and
/// processes that ran for a while, have restarts worth an event.
pub fn is_declared_service(rules: &[ServiceRule], process: &ProcessNames<'_>) -> bool {
    rules.iter().any(|rule| rule.matches(process))
        || process.cgroup.container_id.is_some()
        || process
            .cgroup
            .unit
            .as_deref()
            .is_some_and(|unit| !is_generic_unit(unit))
}

/// Words that make an argument's value a secret.
const SECRET_WORDS: [&str; 9] = [
    "password",
    "passwd",
    "pwd",
    "token",
    "secret",
    "key",
    "credential",
    "auth",
    "private",
];

pub const REDACTED: &str = "<redacted>";

fn is_secret_name(name: &str) -> bool {
    let name = name.trim_start_matches('-').to_ascii_lowercase();
    !name.is_empty() && SECRET_WORDS.iter().any(|word| name.contains(word))
}

/// Redacts the values of secret-looking arguments: `--password=x`, `token=x`,
/// `--token x`, `-p`-style flags whose name contains a secret word, and the user
/// information of URLs (`https://user:pass@host`).
pub fn redact_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut index = 0;
    while index < args.len() {
        let arg = &args[index];
        index += 1;
        if let Some((name, value)) = arg.split_once('=') {
            if is_secret_name(name) {
                out.push(format!("{name}={REDACTED}"));
            } else {
                out.push(format!("{name}={}", redact_url_credentials(value)));
            }
            continue;
        }
        if arg.starts_with('-') && is_secret_name(arg) {
            out.push(arg.clone());
            if args.get(index).is_some_and(|next| !next.starts_with('-')) {
                out.push(REDACTED.to_owned());
                index += 1;
            }
            continue;
        }
        out.push(redact_url_credentials(arg));
    }
    out
}

fn redact_url_credentials(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_owned();
    };
    let rest = &arg[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &arg[..scheme_end + 3], &rest[at..]),
        None => arg.to_owned(),
    }
}

/// Longest command line kept (after redaction).
pub const CMDLINE_LIMIT: usize = 1024;

/// The command line as one label value: redacted, space-joined, capped.
pub fn cmdline_label(args: &[String]) -> String {
    let mut line = redact_args(args).join(" ");
    if line.len() > CMDLINE_LIMIT {
        let mut cut = CMDLINE_LIMIT;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn kubernetes_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/cri-containerd-{ID}.scope"
        );
        let id = from_cgroup_path(&path);
        assert_eq!(id.container_id.as_deref(), Some(ID));
        assert_eq!(id.runtime, Some("containerd"));
        assert_eq!(
            id.pod_uid.as_deref(),
            Some("1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901")
        );
        assert_eq!(id.unit, None);
        let crio = from_cgroup_path(&format!(
            "/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice/crio-{ID}.scope"
        ));
        assert_eq!(crio.runtime, Some("cri-o"));
        assert_eq!(
            crio.pod_uid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        assert_eq!(
            from_cgroup_path(&format!("/kubepods.slice/crio-conmon-{ID}.scope")).container_id,
            None
        );
    }

    #[test]
    fn cgroupfs_driver_and_docker() {
        let id = from_cgroup_path(&format!(
            "/kubepods/besteffort/pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901/{ID}"
        ));
        assert_eq!(id.container_id.as_deref(), Some(ID));
        assert_eq!(
            id.pod_uid.as_deref(),
            Some("1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901")
        );
        let docker = from_cgroup_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(docker.runtime, Some("docker"));
        assert_eq!(docker.unit, None);
        assert_eq!(
            from_cgroup_path(&format!("/docker/{ID}")).runtime,
            Some("docker")
        );
    }

    #[test]
    fn systemd_unit() {
        let id = from_cgroup_path("/system.slice/nginx.service");
        assert_eq!(id.unit.as_deref(), Some("nginx.service"));
        assert_eq!(id.container_id, None);
    }

    #[test]
    fn proc_cgroup_prefers_the_telling_line() {
        let hybrid = format!("9:name=systemd:/\n4:memory:/docker/{ID}\n0::/\n");
        assert_eq!(from_proc_cgroup(&hybrid).container_id.as_deref(), Some(ID));
        let v2 = "0::/system.slice/cron.service\n";
        assert_eq!(from_proc_cgroup(v2).unit.as_deref(), Some("cron.service"));
        let v1 = "9:name=systemd:/system.slice/sshd.service\n1:cpu:/\n0::/\n";
        assert_eq!(from_proc_cgroup(v1).unit.as_deref(), Some("sshd.service"));
    }

    #[test]
    fn service_precedence() {
        let unit = from_cgroup_path("/system.slice/checkout.service");
        let names = ProcessNames {
            comm: "java",
            exe: Some("/opt/jdk/bin/java"),
            cgroup: &unit,
            container: None,
        };
        assert_eq!(service_of(&[], &names), "checkout");
        let rule = ServiceRule {
            service: "shop".into(),
            executable: Some("java".into()),
            ..ServiceRule::default()
        };
        assert!(rule.has_matcher());
        assert_eq!(service_of(&[rule], &names), "shop");
        let plain = from_cgroup_path("/user.slice/user-0.slice/user@0.service/app.slice");
        let names = ProcessNames {
            comm: "worker",
            exe: Some("/usr/bin/worker-bin"),
            cgroup: &plain,
            container: None,
        };
        assert_eq!(service_of(&[], &names), "worker-bin");
        let none = CgroupIdentity::default();
        let names = ProcessNames {
            comm: "kworker/0:1",
            exe: None,
            cgroup: &none,
            container: None,
        };
        assert_eq!(service_of(&[], &names), "kworker/0:1");
        let pod = from_cgroup_path("/kubepods/besteffort/pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901");
        let names = ProcessNames {
            comm: "python3",
            exe: Some("/usr/bin/python3.11"),
            cgroup: &pod,
            container: Some("checkout"),
        };
        assert_eq!(service_of(&[], &names), "checkout");
    }

    #[test]
    fn secrets_are_redacted() {
        let args: Vec<String> = [
            "app",
            "--password=hunter2",
            "--token",
            "abc",
            "--db-key",
            "k1",
            "API_TOKEN=t",
            "--verbose",
            "-v",
            "https://bob:pw@example.invalid/x",
            "--name=visible",
            "--url=https://u:p@host/auth",
        ]
        .map(str::to_owned)
        .to_vec();
        let line = cmdline_label(&args);
        assert_eq!(
            line,
            "app --password=<redacted> --token <redacted> --db-key <redacted> API_TOKEN=<redacted> --verbose -v https://<redacted>@example.invalid/x --name=visible --url=https://<redacted>@host/auth"
        );
        // A secret flag followed by another flag has no value to hide.
        assert_eq!(
            redact_args(&["--token".to_owned(), "--x".to_owned()]),
            vec!["--token".to_owned(), "--x".to_owned()]
        );
    }
}
