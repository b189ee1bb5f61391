//! Network namespaces joined by veth pairs, for the network tests: a client namespace
//! and a server namespace with `links` separate paths between them, each with its own
//! IPv4 and IPv6 subnet. Everything lives inside the two namespaces, so no traffic leaves
//! the machine and nothing touches the host's own interfaces; dropping the lab deletes
//! both namespaces, which removes their veths, qdiscs and nftables tables with them (also
//! when a test fails half-way). Names carry the test's tag and the process id, so tests
//! running at once and reruns after a crash never collide.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Two namespaces and the paths between them.
pub struct NetLab {
    pub client: String,
    pub server: String,
    links: usize,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

/// Runs `program ARGS`, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("running {program} (is it installed? `cargo xtask test` installs it)")
    })?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetLab {
    /// Creates the namespaces and `links` veth pairs: path `i` has the client at
    /// `10.99.i.1` / `fd00:99:i::1` (interface `veth{i}`) and the server at `10.99.i.2` /
    /// `fd00:99:i::2`.
    pub fn create(tag: &str, links: usize) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let lab = Self {
            client: format!("stallscope-{tag}-{pid}-c"),
            server: format!("stallscope-{tag}-{pid}-s"),
            links,
        };
        // From here on, `Drop` cleans up whatever was created.
        ip(&["netns", "add", &lab.client])?;
        ip(&["netns", "add", &lab.server])?;
        for ns in [&lab.client, &lab.server] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for i in 0..links {
            let veth = format!("veth{i}");
            ip(&[
                "link",
                "add",
                &veth,
                "netns",
                &lab.client,
                "type",
                "veth",
                "peer",
                "name",
                &veth,
                "netns",
                &lab.server,
            ])?;
            for (ns, host) in [(&lab.client, 1), (&lab.server, 2)] {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("10.99.{i}.{host}/24"),
                    "dev",
                    &veth,
                ])?;
                ip(&[
                    "-n",
                    ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("fd00:99:{i}::{host}/64"),
                    "dev",
                    &veth,
                    "nodad",
                ])?;
                ip(&["-n", ns, "link", "set", &veth, "up"])?;
            }
        }
        Ok(lab)
    }

    /// The server's IPv4 address on path `i`.
    pub fn server_v4(&self, i: usize) -> String {
        assert!(i < self.links, "path {i} does not exist");
        format!("10.99.{i}.2")
    }

    /// The server's IPv6 address on path `i`.
    pub fn server_v6(&self, i: usize) -> String {
        assert!(i < self.links, "path {i} does not exist");
        format!("fd00:99:{i}::2")
    }

    /// Runs a command inside the client namespace.
    pub fn in_client(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", self.client.as_str(), program];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Drops a share (1 in `one_in`) of the TCP segments the client sends on path `i`,
    /// as they arrive in the server namespace (an nftables table there): on the wire, as
    /// a lossy link would. (Dropped in the client's own output hook, the sender would see
    /// an error and resend at once, without a retransmission.)
    pub fn lossy(&self, i: usize, one_in: u32) -> anyhow::Result<()> {
        let rules = format!(
            "table inet stallscope_loss {{\n  chain in {{\n    type filter hook input priority 0; policy accept;\n    iifname \"veth{i}\" meta l4proto tcp numgen random mod {one_in} 0 drop\n  }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{}-loss.nft", self.server));
        std::fs::write(&file, rules)?;
        let mut args = vec!["netns", "exec", self.server.as_str(), "nft", "-f"];
        let path = file.to_string_lossy().into_owned();
        args.push(&path);
        let result = ip(&args);
        let _ = std::fs::remove_file(&file);
        result
    }

    /// Shapes what the client sends on path `i` with a token bucket: `rate` (e.g.
    /// `2mbit`) and a queue of up to `latency` (e.g. `200ms`).
    pub fn shaped(&self, i: usize, rate: &str, latency: &str) -> anyhow::Result<()> {
        self.in_client(
            "tc",
            &[
                "qdisc",
                "add",
                "dev",
                &format!("veth{i}"),
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "16kbit",
                "latency",
                latency,
            ],
        )
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
