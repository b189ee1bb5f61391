//! `stallscope`: parse arguments, connect to the collector, run one subcommand; errors
//! are one line saying what to do, with a non-zero exit.

mod args;
mod client;
mod commands;
mod events;
mod frames;
mod names;
mod report;
mod table;
mod timespec;
mod why;
mod windows;

use std::process::ExitCode;

use clap::{Parser as _, error::ErrorKind};

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, like other command-line tools.
    // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("stallscope: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
            let mut parts: Vec<String> = Vec::new();
            for part in chain {
                if !parts.iter().any(|p| p.contains(&part)) {
                    parts.push(part);
                }
            }
            eprintln!("stallscope: {}", parts.join(": ").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap writes them; a usage error becomes one line (clap's
/// first), with a non-zero exit.
fn usage_error(err: &clap::Error) -> ExitCode {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = err.print();
        return if err.use_stderr() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("stallscope: {first} (see --help)");
    ExitCode::from(2)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connection = cli.connection.resolve()?;
    let mut collector = client::connect(&connection).await?;
    match &cli.command {
        Command::Targets { range, pids, json } => {
            commands::targets(&mut collector, range, *pids, *json).await
        }
        Command::Flame {
            output,
            range,
            filter,
        } => commands::flame(&mut collector, output, range, filter).await,
        Command::Top {
            range,
            filter,
            limit,
            json,
        } => commands::top_command(&mut collector, range, filter, *limit, *json).await,
        Command::Diff {
            before,
            after,
            output,
            filter,
            limit,
            json,
        } => {
            commands::diff(
                &mut collector,
                before,
                after,
                output.as_deref(),
                filter,
                *limit,
                *json,
            )
            .await
        }
        Command::Series {
            range,
            filter,
            by,
            step,
            json,
        } => commands::series(&mut collector, range, filter, *by, *step, *json).await,
        Command::Agents { json } => commands::agents(&mut collector, *json).await,
        Command::Why {
            window,
            from,
            until,
            filter,
            baseline,
            format,
            out_dir,
            ranker,
        } => {
            let now = timespec::now_ns();
            let range = match (window, from) {
                (Some(_), None) => None,
                (Some(_), Some(_)) => {
                    anyhow::bail!("give a window id or --from/--until, not both")
                }
                (None, Some(from)) => {
                    let from = timespec::parse_time(from, now)?;
                    let until = until
                        .as_deref()
                        .map_or(Ok(now), |u| timespec::parse_time(u, now))?;
                    anyhow::ensure!(
                        from < until,
                        "the range is empty: --from must be before --until"
                    );
                    Some((from, until))
                }
                (None, None) => anyhow::bail!(
                    "name a window (`stallscope why WINDOW_ID`, ids from `stallscope windows`) or a period (`--service S --from 10m --until 5m`)"
                ),
            };
            let baseline = baseline.as_deref().map(args::parse_span).transpose()?;
            why::why(
                &mut collector,
                &why::WhyRequest {
                    window_id: window.as_deref(),
                    range,
                    filter,
                    baseline,
                    format: *format,
                    out_dir: out_dir.as_deref(),
                    ranker: ranker.as_str(),
                },
            )
            .await
        }
        Command::Events {
            range,
            scope,
            binaries,
            json,
        } => events::events(&mut collector, range, scope, *binaries, *json).await,
        Command::Windows { action, list } => {
            windows::run(&mut collector, action.as_ref(), list).await
        }
    }
}
