//! `--print-config`: the effective configuration (file and flags merged, defaults filled
//! in) as the TOML file that, given back with `--config`, yields the same configuration.
//! Flag-only settings (`--pid`, `--duration`) have no key and are not printed.

use std::{path::Path, time::Duration};

use toml::{Table, Value};

use super::{Config, RunConfig};
use crate::probes::SchedHookChoice;

/// A duration as the configuration file writes it, in the largest unit that keeps it
/// exact: `10s`, `500ms`, `2m`.
pub fn duration_text(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    for (unit, size) in [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos.is_multiple_of(size) {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

fn text(value: impl Into<String>) -> Value {
    Value::String(value.into())
}

fn duration(value: Duration) -> Value {
    text(duration_text(value))
}

fn path(value: &Path) -> Value {
    text(value.to_string_lossy())
}

fn integer(value: impl TryInto<i64>) -> Value {
    Value::Integer(value.try_into().unwrap_or(i64::MAX))
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Table {
    entries
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

impl Config {
    /// The configuration as a TOML table of the file's keys.
    pub fn to_toml(&self) -> Table {
        let mut file = Table::new();
        let signals = self.signals.iter().map(|s| text(s.as_str())).collect();
        file.insert("signals".into(), Value::Array(signals));
        file.insert("drain_interval".into(), duration(self.drain_interval));
        file.insert("include_agent".into(), Value::Boolean(self.include_agent));
        file.insert(
            "offcpu".into(),
            Value::Table(table([(
                "stack_threshold",
                duration(self.offcpu_stack_threshold),
            )])),
        );
        file.insert(
            "oncpu".into(),
            Value::Table(table([("frequency_hz", integer(self.oncpu_frequency_hz))])),
        );
        file.insert(
            "lock".into(),
            Value::Table(table([(
                "stack_threshold",
                duration(self.lock_stack_threshold),
            )])),
        );
        file.insert(
            "syscall".into(),
            Value::Table(table([
                ("slow_threshold", duration(self.syscall_slow_threshold)),
                (
                    "sample_every",
                    integer(u64::from(self.syscall_sample_every)),
                ),
            ])),
        );
        file.insert(
            "guard".into(),
            Value::Table(table([(
                "budget_percent",
                Value::Float(self.overhead_budget_percent),
            )])),
        );
        file.insert(
            "network".into(),
            Value::Table(table([
                ("min_wait", duration(self.socket_wait_min)),
                ("stack_threshold", duration(self.socket_stack_threshold)),
                ("rtt_interval", duration(self.tcp_rtt_interval)),
            ])),
        );
        let hook = match self.sched_hook {
            SchedHookChoice::Auto => "auto",
            SchedHookChoice::Tracepoint => "tracepoint",
        };
        let mut probes = table([
            ("sched_hook", text(hook)),
            ("max_threads", integer(self.map_sizes.threads)),
            ("max_totals", integer(self.map_sizes.totals)),
            ("max_samples", integer(self.map_sizes.samples)),
            ("max_stacks", integer(self.map_sizes.stacks)),
            ("max_pending", integer(self.map_sizes.pending)),
            ("unwind_table_rows", integer(self.map_sizes.unwind_rows)),
            ("unwind_processes", integer(self.map_sizes.unwind_processes)),
        ]);
        if let Some(btf) = &self.btf {
            probes.insert("btf".into(), path(btf));
        }
        file.insert("probes".into(), Value::Table(probes));
        let rules = self
            .service_rules
            .iter()
            .map(|rule| {
                let mut entry = Table::new();
                entry.insert("service".into(), text(rule.service.clone()));
                for (key, value) in [
                    ("unit", &rule.unit),
                    ("process", &rule.process),
                    ("executable", &rule.executable),
                    ("container_id", &rule.container_id),
                    ("pod_uid", &rule.pod_uid),
                    ("cgroup_prefix", &rule.cgroup_prefix),
                ] {
                    if let Some(value) = value {
                        entry.insert(key.into(), text(value.clone()));
                    }
                }
                Value::Table(entry)
            })
            .collect();
        file.insert(
            "identity".into(),
            Value::Table(table([
                ("cmdline", Value::Boolean(self.collect_cmdline)),
                ("thread_ids", Value::Boolean(self.thread_ids)),
                ("read_deadline", duration(self.read_deadline)),
                ("pod_logs_dir", path(&self.pod_logs_dir)),
                ("service", Value::Array(rules)),
            ])),
        );
        file.insert(
            "symbols".into(),
            Value::Table(table([("dwarf_max_mb", integer(self.dwarf_max >> 20))])),
        );
        file
    }

    /// [`Config::to_toml`] as the text of a configuration file.
    pub fn to_toml_text(&self) -> String {
        self.to_toml().to_string()
    }
}

impl RunConfig {
    /// The sampling configuration and the `[run]` section as one TOML table.
    pub fn to_toml(&self) -> Table {
        let mut file = self.sampling.to_toml();
        let mut run = Table::new();
        run.insert("collector".into(), text(self.collector.clone()));
        run.insert("agent_id".into(), text(self.agent_id.clone()));
        if let Some(tls) = &self.tls {
            run.insert("tls_cert".into(), path(&tls.cert));
            run.insert("tls_key".into(), path(&tls.key));
            run.insert("tls_ca".into(), path(&tls.ca));
            if let Some(name) = &tls.server_name {
                run.insert("tls_server_name".into(), text(name.clone()));
            }
        }
        run.insert("batch_interval".into(), duration(self.batch_interval));
        run.insert("spool_dir".into(), path(&self.spool_dir));
        run.insert(
            "pin_dir".into(),
            self.pin_root
                .as_ref()
                .map_or_else(|| text("none".to_owned()), |dir| path(dir)),
        );
        run.insert(
            "spool_max_batches".into(),
            integer(self.spool_limits.max_batches),
        );
        run.insert(
            "spool_max_bytes".into(),
            integer(self.spool_limits.max_bytes),
        );
        run.insert("flush_timeout".into(), duration(self.flush_timeout));
        run.insert("max_backoff".into(), duration(self.max_backoff));
        if let Some(listen) = &self.metrics_listen {
            run.insert("metrics_listen".into(), text(listen.to_string()));
        }
        file.insert("run".into(), Value::Table(run));
        file
    }

    /// [`RunConfig::to_toml`] as the text of a configuration file.
    pub fn to_toml_text(&self) -> String {
        self.to_toml().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, FileConfig, Overrides, RunOverrides};

    fn run_config(text: &str, flags: Overrides) -> Result<RunConfig, ConfigError> {
        let mut file = FileConfig::parse(text).map_err(|(line, message)| ConfigError::Parse {
            path: "test.toml".into(),
            line,
            message,
        })?;
        let run = std::mem::take(&mut file.run);
        RunConfig::build(Config::build(file, flags)?, run, RunOverrides::default())
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        assert_eq!(duration_text(Duration::from_secs(7200)), "2h");
        assert_eq!(duration_text(Duration::from_secs(90)), "90s");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_text(Duration::from_micros(100)), "100us");
        assert_eq!(duration_text(Duration::from_nanos(1)), "1ns");
    }

    /// Every key set away from its default, and flags over some: what is printed,
    /// read back, is the same configuration, and prints the same again.
    #[test]
    fn printed_configuration_round_trips() {
        let file = r#"
            signals = ["offcpu", "lock"]
            drain_interval = "2s"
            include_agent = true
            [offcpu]
            stack_threshold = "3ms"
            [oncpu]
            frequency_hz = 99
            [lock]
            stack_threshold = "250us"
            [syscall]
            slow_threshold = "7ms"
            sample_every = 16
            [guard]
            budget_percent = 2.5
            [network]
            min_wait = "20us"
            stack_threshold = "4ms"
            rtt_interval = "50ms"
            [probes]
            sched_hook = "tracepoint"
            btf = "/sys/kernel/btf/vmlinux"
            max_threads = 1024
            max_totals = 2048
            max_samples = 4096
            max_stacks = 512
            max_pending = 256
            [identity]
            cmdline = true
            read_deadline = "250ms"
            pod_logs_dir = "/srv/kubelet/pods"
            [[identity.service]]
            service = "shop"
            unit = "shop.service"
            [[identity.service]]
            service = "db"
            executable = "postgres"
            cgroup_prefix = "/system.slice"
            [symbols]
            dwarf_max_mb = 64
            [run]
            collector = "https://collector.example:7443"
            agent_id = "host-7"
            tls_cert = "/etc/stallscope/agent.pem"
            tls_key = "/etc/stallscope/agent.key"
            tls_ca = "/etc/stallscope/ca.pem"
            tls_server_name = "collector"
            batch_interval = "20s"
            spool_dir = "/var/lib/stallscope-agent/spool2"
            spool_max_batches = 100
            spool_max_bytes = 1048576
            flush_timeout = "3s"
            max_backoff = "1m"
            metrics_listen = "127.0.0.1:7072"
        "#;
        let flags = Overrides {
            frequency_hz: Some(19),
            offcpu_threshold: Some("9ms".into()),
            ..Overrides::default()
        };
        let first = run_config(file, flags).expect("valid");
        assert_eq!(first.sampling.oncpu_frequency_hz, 19, "the flag wins");
        let printed = first.to_toml_text();
        let second = run_config(&printed, Overrides::default())
            .unwrap_or_else(|err| panic!("the printed configuration is refused: {err}\n{printed}"));
        assert_eq!(format!("{first:?}"), format!("{second:?}"), "{printed}");
        assert_eq!(printed, second.to_toml_text());
        // And the defaults alone.
        let defaults = run_config("", Overrides::default()).expect("defaults");
        let again = run_config(&defaults.to_toml_text(), Overrides::default()).expect("valid");
        assert_eq!(format!("{defaults:?}"), format!("{again:?}"));
    }
}
