//! Harness for a real Alertmanager (Debian's `prometheus-alertmanager`, 0.25): started
//! with a generated configuration whose only receiver is a webhook to the collector
//! (bearer token from a file, TLS where given), short grouping intervals so deliveries
//! repeat within a test, loopback ports, its own storage directory and no clustering.
//! Alerts are posted to its API (`/api/v2/alerts`) as Prometheus would.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{collector::free_port, http};

/// Where Debian installs Alertmanager.
pub const BINARY: &str = "/usr/bin/prometheus-alertmanager";

/// Whether Alertmanager is installed; in CI a missing one is a failure, not a skip.
pub fn require_alertmanager(test: &str) -> bool {
    if Path::new(BINARY).is_file() {
        return true;
    }
    assert!(
        !crate::in_ci(),
        "{test} needs {BINARY} (Debian's prometheus-alertmanager), and CI=true forbids skipping it"
    );
    eprintln!(
        "skipping {test}: {BINARY} is missing (`apt-get install prometheus-alertmanager`, or run `cargo xtask test`)"
    );
    false
}

/// How Alertmanager reaches the webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    /// File holding the bearer token (`http_config.authorization.credentials_file`).
    pub token_file: PathBuf,
    /// `tls_config`: CA of the collector's certificate, and a client certificate and key.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// A running Alertmanager.
pub struct AlertmanagerProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub api: SocketAddr,
}

fn config(webhook: &Webhook) -> String {
    let mut http_config = format!(
        "        http_config:\n          authorization:\n            type: Bearer\n            credentials_file: {}\n",
        webhook.token_file.display()
    );
    if let Some((ca, cert, key)) = &webhook.tls {
        let _ = write!(
            http_config,
            "          tls_config:\n            ca_file: {}\n            cert_file: {}\n            key_file: {}\n            server_name: localhost\n",
            ca.display(),
            cert.display(),
            key.display()
        );
    }
    // Resends every 2-3 s: a group is flushed every group_interval and, with nothing
    // new, notified again once repeat_interval has passed.
    format!(
        "route:\n  receiver: stallscope\n  group_by: ['alertname']\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 2s\n\
         receivers:\n  - name: stallscope\n    webhook_configs:\n      - url: {}\n        send_resolved: true\n{http_config}",
        webhook.url
    )
}

impl AlertmanagerProcess {
    /// Starts Alertmanager in `dir` (configuration and storage) and waits until its API
    /// answers.
    pub fn start(dir: &Path, webhook: &Webhook) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let config_path = dir.join("alertmanager.yml");
        std::fs::write(&config_path, config(webhook))?;
        let port = free_port()?;
        let mut child = Command::new(BINARY)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {BINARY}"))?;
        let stderr = child.stderr.take().context("alertmanager stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        let mut process = Self {
            child,
            log,
            api: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http::request(
                process.api,
                None,
                "GET",
                "/-/ready",
                &[],
                b"",
                http::Framing::ContentLength,
            );
            if ready.is_ok_and(|reply| reply.status == 200) {
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                bail!("alertmanager exited ({status}): {}", process.log());
            }
            if Instant::now() > deadline {
                bail!("alertmanager not ready within 30 s: {}", process.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Posts alerts (a JSON array, API v2) the way Prometheus does.
    pub fn post_alerts(&self, alerts_json: &str) -> anyhow::Result<()> {
        let reply = http::post_json(self.api, None, "/api/v2/alerts", None, alerts_json)?;
        if reply.status != 200 {
            bail!(
                "alertmanager refused the alerts ({}): {}",
                reply.status,
                reply.body
            );
        }
        Ok(())
    }
}

impl Drop for AlertmanagerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RFC 3339 (UTC, whole seconds) of Unix seconds, as Alertmanager's API takes times.
pub fn rfc3339(unix_s: i64) -> String {
    stallscope_collector::windows::rfc3339::format(unix_s.saturating_mul(1_000_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn the_configuration_names_the_webhook_and_its_credentials() {
        let text = config(&Webhook {
            url: "https://localhost:1/webhook/alertmanager".into(),
            token_file: "/t/token".into(),
            tls: Some(("/t/ca.pem".into(), "/t/c.pem".into(), "/t/c.key".into())),
        });
        assert!(text.contains("      - url: https://localhost:1/webhook/alertmanager\n"));
        assert!(text.contains("            credentials_file: /t/token\n"));
        assert!(text.contains("            cert_file: /t/c.pem\n"));
    }
}
