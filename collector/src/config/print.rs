//! `--print-config`: the collector's effective configuration (the file and the flags
//! merged, defaults filled in) as a TOML file that, given back with `--config`, yields
//! the same configuration. Query tokens are never printed: `query_token_file` names
//! where they are; tokens from `--query-tokens`/`STALLSCOPE_QUERY_TOKENS` stay there.

use toml::{Table, Value};

use super::{Cli, Config, FileConfig, StorageConfig};

fn text(value: impl Into<String>) -> Value {
    Value::String(value.into())
}

fn seconds(value: std::time::Duration) -> Value {
    text(format!("{}s", value.as_secs()))
}

fn integer(value: impl TryInto<i64>) -> Value {
    Value::Integer(value.try_into().unwrap_or(i64::MAX))
}

fn labels(list: &[String]) -> Value {
    Value::Array(list.iter().map(|label| text(label.clone())).collect())
}

/// The effective configuration of `config`, built from `cli` over `file`; `detect` is
/// the file's `[detect]` table as written (the detection flags are merged into it, keys
/// it lacks keep their documented defaults).
pub fn effective_toml(
    cli: &Cli,
    file: &FileConfig,
    detect: Option<&Table>,
    config: &Config,
) -> Table {
    let mut out = Table::new();
    let mut put = |key: &str, value: Value| {
        out.insert(key.to_owned(), value);
    };
    put("listen", text(config.listen.to_string()));
    match &config.storage {
        StorageConfig::Sqlite { data_dir } => {
            put("storage", text("sqlite"));
            put("data_dir", text(data_dir.to_string_lossy()));
        }
        StorageConfig::ClickHouse { url, database } => {
            put("storage", text("clickhouse"));
            put("clickhouse_url", text(url.clone()));
            put("clickhouse_database", text(database.clone()));
        }
    }
    put("retention", text(config.retention.to_string()));
    put("maintenance_interval", seconds(config.maintenance_interval));
    let path = |flag: &Option<std::path::PathBuf>, key: &Option<std::path::PathBuf>| {
        flag.clone()
            .or_else(|| key.clone())
            .map(|path| text(path.to_string_lossy()))
    };
    if config.tls.is_some() {
        for (key, value) in [
            ("tls_cert", path(&cli.tls_cert, &file.tls_cert)),
            ("tls_key", path(&cli.tls_key, &file.tls_key)),
            ("client_ca", path(&cli.client_ca, &file.client_ca)),
        ] {
            if let Some(value) = value {
                put(key, value);
            }
        }
    } else {
        put("plaintext", Value::Boolean(true));
    }
    put(
        "allow_plaintext_non_loopback",
        Value::Boolean(
            cli.allow_plaintext_non_loopback || file.allow_plaintext_non_loopback.unwrap_or(false),
        ),
    );
    if let Some(tokens) = path(&cli.query_token_file, &file.query_token_file) {
        put("query_token_file", tokens);
    }
    put(
        "insecure_no_query_auth",
        Value::Boolean(cli.insecure_no_query_auth || file.insecure_no_query_auth.unwrap_or(false)),
    );
    put("max_message_bytes", integer(config.max_message_bytes));
    put(
        "max_batch_bytes",
        integer(config.limits.max_uncompressed_bytes),
    );
    put("max_streams", integer(config.max_streams));
    put("shutdown_timeout", seconds(config.shutdown_timeout));
    if let Some(http) = &config.http {
        put("http_listen", text(http.listen.to_string()));
        put("http_max_body_bytes", integer(http.max_body_bytes));
        put(
            "http_require_client_cert",
            Value::Boolean(http.require_client_cert),
        );
        put(
            "alertmanager_service_labels",
            labels(&http.label_rule.service_labels),
        );
        put(
            "alertmanager_host_labels",
            labels(&http.label_rule.host_labels),
        );
    }
    if let Some(ui) = &config.ui {
        put("ui_listen", text(ui.listen.to_string()));
    }
    let mut detect = detect.cloned().unwrap_or_default();
    let flags = &cli.detect;
    if flags.no_detect {
        detect.insert("enabled".into(), Value::Boolean(false));
    }
    for (key, value) in [
        ("grace", flags.detect_grace.clone().map(text)),
        (
            "baseline_refresh",
            flags.detect_baseline_refresh.clone().map(text),
        ),
        (
            "min_baseline_buckets",
            flags.detect_min_baseline_buckets.map(integer),
        ),
        ("baseline_lag", flags.detect_baseline_lag.map(integer)),
        ("max_gap", flags.detect_max_gap.map(integer)),
    ] {
        if let Some(value) = value {
            detect.insert(key.into(), value);
        }
    }
    if !detect.is_empty() {
        out.insert("detect".into(), Value::Table(detect));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::config::ConfigError;

    fn load(args: &[&str], text: &str) -> Result<(Config, Table), ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "stallscope-collector-print-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| ConfigError::Read {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("collector.toml");
        std::fs::write(&path, text).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let path_arg = path.to_string_lossy().into_owned();
        let mut all = vec!["stallscope-collector", "--config", path_arg.as_str()];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|err| ConfigError::Invalid(err.to_string()))?;
        let loaded = Config::load(&cli);
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }

    #[test]
    fn printed_configuration_round_trips() {
        let file = r#"
            listen = "127.0.0.1:7171"
            storage = "sqlite"
            data_dir = "/var/lib/stallscope-test"
            retention = "10s:12h,1m:7d"
            maintenance_interval = "2m"
            plaintext = true
            insecure_no_query_auth = true
            max_message_bytes = 2048
            max_batch_bytes = 4096
            max_streams = 7
            shutdown_timeout = "3s"
            http_listen = "127.0.0.1:7172"
            http_max_body_bytes = 8192
            alertmanager_service_labels = ["app"]
            ui_listen = "127.0.0.1:7173"
            [detect]
            max_delay = "6s"
            z_open = 4.5
        "#;
        let flags = [
            "--max-streams",
            "9",
            "--detect-grace",
            "2s",
            "--retention",
            "10s:1d",
        ];
        let (first, printed) = load(&flags, file).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(first.max_streams, 9, "the flag wins");
        let printed = printed.to_string();
        let (second, reprinted) = load(&[], &printed)
            .unwrap_or_else(|err| panic!("the printed configuration is refused: {err}\n{printed}"));
        assert_eq!(format!("{first:?}"), format!("{second:?}"), "{printed}");
        assert_eq!(printed, reprinted.to_string());
        assert!(printed.contains("grace = \"2s\"") && printed.contains("z_open = 4.5"));
    }

    #[test]
    fn file_errors_name_the_key_and_the_value() {
        for (text, expected) in [
            (
                "max_streams = \"many\"\n",
                "max_streams: invalid type: string \"many\"",
            ),
            (
                "listen = \"127.0.0.1:1\"\nbogus = 1\n",
                "bogus: unknown field `bogus`",
            ),
            (
                "plaintext = true\ninsecure_no_query_auth = true\nmax_message_bytes = 10\n",
                "max_message_bytes (--max-message-bytes) must be at least 1024 bytes, got 10",
            ),
            (
                "plaintext = true\ninsecure_no_query_auth = true\nmax_streams = 0\n",
                "max_streams (--max-streams) must be at least 1, got 0",
            ),
        ] {
            let err = load(&[], text).expect_err("invalid").to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
