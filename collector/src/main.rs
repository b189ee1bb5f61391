//! `stallscope-collector`: parse flags, build the validated configuration, open storage,
//! serve until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use stallscope_collector::{
    config::{Cli, Config, StorageConfig},
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
            let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
            eprintln!(
                "stallscope-collector: {}",
                chain.join(": ").replace('\n', " ")
            );
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
    tracing::info!("shutting down");
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let config = Config::from_cli(cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mode = if config.tls.is_some() {
            "mTLS"
        } else {
            "plaintext"
        };
        match &config.storage {
            StorageConfig::Sqlite { data_dir } => {
                let store = SqliteStore::open(data_dir, config.retention.clone())
                    .with_context(|| format!("opening SQLite storage in {}", data_dir.display()))?;
                tracing::info!(
                    "listening on {} ({mode}), storage SQLite {}",
                    config.listen,
                    store.path().display()
                );
                server::serve(store, &config, shutdown_signal()).await?;
            }
            StorageConfig::ClickHouse { url, database } => {
                let store = ClickHouseStore::connect(url, database, config.retention.clone())
                    .await
                    .with_context(|| {
                        format!("connecting to ClickHouse at {url} (is it running?)")
                    })?;
                tracing::info!(
                    "listening on {} ({mode}), storage ClickHouse {url}/{database}",
                    config.listen
                );
                server::serve(store, &config, shutdown_signal()).await?;
            }
        }
        Ok(())
    })
}
