//! `stallscope-collector`: parse flags, build the validated configuration, open storage,
//! serve until SIGINT or SIGTERM.

use std::{io::IsTerminal as _, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use stallscope_collector::{
    config::{Cli, Config, StorageConfig},
    data_dir::DataDirLock,
    server,
    storage::{clickhouse::ClickHouseStore, sqlite::SqliteStore},
};
use stallscope_proto::sd_notify::ServiceNotifier;

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

/// Under systemd (`Type=notify`): `READY=1` once listening, `WATCHDOG=1` from a task of
/// the runtime (so it stops when the runtime does), `STOPPING=1` on the shutdown signal.
fn notify_ready(notifier: Option<&Arc<ServiceNotifier>>, description: &str) {
    let Some(notifier) = notifier else {
        return;
    };
    if let Err(err) = notifier.ready(&format!("listening; {description}")) {
        tracing::warn!("notifying systemd (NOTIFY_SOCKET): {err}");
    }
    if let Some(every) = notifier.watchdog_every() {
        let notifier = Arc::clone(notifier);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                if let Err(err) = notifier.notify("WATCHDOG=1") {
                    tracing::warn!("notifying systemd's watchdog: {err}");
                }
            }
        });
    }
}

async fn shutdown_then_notify(notifier: Option<Arc<ServiceNotifier>>) {
    shutdown_signal().await;
    if let Some(notifier) = notifier
        && let Err(err) = notifier.stopping()
    {
        tracing::warn!("notifying systemd (NOTIFY_SOCKET): {err}");
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let (config, effective) = Config::load(cli)?;
    if cli.print_config {
        print!("{effective}");
        return Ok(());
    }
    let notifier = ServiceNotifier::from_env()
        .context("NOTIFY_SOCKET is set but unusable")?
        .map(Arc::new);
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
                notify_ready(notifier.as_ref(), &description);
                let shutdown = shutdown_then_notify(notifier.clone());
                server::serve(store, &config, listener, &description, shutdown).await?;
            }
            StorageConfig::ClickHouse { url, database } => {
                let store = ClickHouseStore::connect(url, database, config.retention.clone())
                    .await
                    .with_context(|| {
                        format!("connecting to ClickHouse at {url} (is it running?)")
                    })?;
                let listener = server::bind(&config).await?;
                let description = format!("storage ClickHouse {url}/{database}");
                notify_ready(notifier.as_ref(), &description);
                let shutdown = shutdown_then_notify(notifier.clone());
                server::serve(store, &config, listener, &description, shutdown).await?;
            }
        }
        Ok(())
    });
    // Tasks still running (a query past the grace period) are dropped here, not awaited.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
