//! The systemd side of the tests: a real `NOTIFY_SOCKET` (an abstract unix datagram
//! socket the daemons' `sd_notify` messages arrive on), the shipped unit files, and the
//! capability set a unit grants, to start the agent with exactly that set.

use std::{
    os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// `deploy/systemd/<name>` in the repository.
pub fn unit_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(name)
}

/// The capabilities a unit grants: its `CapabilityBoundingSet=` lines (and any
/// `AmbientCapabilities=`), lower case without `cap_`, as `setpriv` names them.
pub fn unit_capabilities(unit: &str) -> Vec<String> {
    let mut caps: Vec<String> = unit
        .lines()
        .filter_map(|line| {
            line.strip_prefix("CapabilityBoundingSet=")
                .or_else(|| line.strip_prefix("AmbientCapabilities="))
        })
        .flat_map(str::split_whitespace)
        .map(|cap| cap.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    caps.sort();
    caps.dedup();
    caps
}

/// `setpriv` starting `binary` as root's uid but with only `caps` in its bounding set
/// (hence in its permitted and effective sets after exec), no inheritable or ambient
/// capabilities, and no new privileges: what systemd does with the agent's unit.
pub fn with_only_capabilities(binary: &Path, caps: &[String]) -> Command {
    let mut bounding = String::from("-all");
    for cap in caps {
        bounding.push_str(",+");
        bounding.push_str(cap);
    }
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--bounding-set={bounding}"))
        .args([
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(binary);
    command
}

/// The bit mask of capabilities named as [`unit_capabilities`] names them.
pub fn capability_mask(caps: &[&str]) -> u64 {
    const NUMBERS: [(&str, u32); 9] = [
        ("dac_override", 1),
        ("dac_read_search", 2),
        ("setpcap", 8),
        ("net_admin", 12),
        ("sys_ptrace", 19),
        ("syslog", 34),
        ("perfmon", 38),
        ("bpf", 39),
        ("checkpoint_restore", 40),
    ];
    caps.iter()
        .map(|name| {
            NUMBERS
                .iter()
                .find(|(known, _)| known == name)
                .map_or_else(|| panic!("capability {name} unknown to the test"), |n| n.1)
        })
        .fold(0, |mask, bit| mask | 1 << bit)
}

/// A process's capability sets (`CapEff`, `CapPrm`, `CapBnd`) from `/proc/PID/status`.
pub fn process_capabilities(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let hex = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .with_context(|| format!("no {name} in the status of {pid}"))?;
        Ok(u64::from_str_radix(hex.trim(), 16)?)
    };
    Ok((field("CapEff:")?, field("CapPrm:")?, field("CapBnd:")?))
}

/// A notification socket in the abstract namespace, as systemd gives a `Type=notify`
/// service: pass [`NotifySocket::address`] as `NOTIFY_SOCKET`.
pub struct NotifySocket {
    socket: UnixDatagram,
    name: String,
    received: Vec<String>,
}

impl NotifySocket {
    pub fn bind(test: &str) -> anyhow::Result<Self> {
        let name = format!("stallscope-test-notify-{test}-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&address)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self {
            socket,
            name,
            received: Vec::new(),
        })
    }

    /// The `NOTIFY_SOCKET` value (`@name`).
    pub fn address(&self) -> String {
        format!("@{}", self.name)
    }

    /// Every message so far, in order.
    pub fn received(&mut self) -> &[String] {
        let mut buffer = [0u8; 4096];
        while let Ok(len) = self.socket.recv(&mut buffer) {
            self.received
                .push(String::from_utf8_lossy(&buffer[..len]).into_owned());
        }
        &self.received
    }

    /// Waits until `count` messages holding `line` (a whole line, e.g. `READY=1`) came.
    pub fn wait_for(&mut self, line: &str, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self
                .received()
                .iter()
                .filter(|message| message.lines().any(|l| l == line))
                .count();
            if seen >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{seen} of {count} `{line}` within {timeout:?}; got {:?}",
                    self.received
                );
            }
        }
    }

    /// How many messages so far hold `line`.
    pub fn count(&mut self, line: &str) -> usize {
        self.received()
            .iter()
            .filter(|message| message.lines().any(|l| l == line))
            .count()
    }
}
