//! `stallscope-collector`: parse flags, build the validated configuration, open storage,
//! serve until SIGINT or SIGTERM.

use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::Context as _;
use clap::Parser as _;
use stallscope_collector::{
    config::{Cli, Config, StorageConfig},
    data_dir::DataDirLock,
    server,
    storage::{clickhouse::ClickHouseStore, sqlite::SqliteStore},
};

/// mimalloc instead of glibc's allocator: with batches decoded on several threads and
/// freed on the writer's, glibc's arenas (`malloc_consolidate` on every free of a large
/// decoding buffer) took about a quarter of the collector's CPU during ingest.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stallscope-collector: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: wrappers often repeat their
/// source's text (`transport error: transport error`).
fn one_line(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text.replace('\n', " ")
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in redirected logs.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!("cannot listen for SIGTERM: {err}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let config = Config::from_cli(cli)?;
    // One collector per SQLite data directory, checked before anything is opened.
    let _data_dir_lock = match &config.storage {
        StorageConfig::Sqlite { data_dir } => Some(DataDirLock::acquire(data_dir)?),
        StorageConfig::ClickHouse { .. } => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        match &config.storage {
            StorageConfig::Sqlite { data_dir } => {
                let store = SqliteStore::open(data_dir, config.retention.clone())
                    .with_context(|| format!("opening SQLite storage in {}", data_dir.display()))?;
                let listener = server::bind(&config).await?;
                let description = format!("storage SQLite {}", store.path().display());
                server::serve(store, &config, listener, &description, shutdown_signal()).await?;
            }
            StorageConfig::ClickHouse { url, database } => {
                let store = ClickHouseStore::connect(url, database, config.retention.clone())
                    .await
                    .with_context(|| {
                        format!("connecting to ClickHouse at {url} (is it running?)")
                    })?;
                let listener = server::bind(&config).await?;
                let description = format!("storage ClickHouse {url}/{database}");
                server::serve(store, &config, listener, &description, shutdown_signal()).await?;
            }
        }
        Ok(())
    });
    // Tasks still running (a query past the grace period) are dropped here, not awaited.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
