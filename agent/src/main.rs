//! `stallscope-agent`: parse arguments, build the validated configuration, run.

use std::process::ExitCode;

use clap::Parser;
use stallscope_agent::{
    config::{
        cli::{Cli, Command},
        flag_duration,
    },
    logging,
    sampling::{check, record, run},
    system,
};

fn main() -> ExitCode {
    system::tune_malloc();
    let cli = Cli::parse();
    logging::init(cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            // One line: the chain of causes, joined.
            eprintln!("stallscope-agent: {}", logging::one_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Record(args) => {
            let config = args.common.config()?;
            let duration = flag_duration("--duration", &args.duration)?;
            let Some(output) = args.output.filter(|_| !args.common.print_config) else {
                print!("{}", config.to_toml_text());
                return Ok(ExitCode::SUCCESS);
            };
            let summary = record::record(&config, duration, &output)?;
            eprintln!("{}", record::summary_line(&summary, &output));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let config = args.config()?;
            if args.common.print_config {
                print!("{}", config.to_toml_text());
                return Ok(ExitCode::SUCCESS);
            }
            let summary = run::run(&config)?;
            eprintln!("{}", run::summary_line(&summary));
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let config = args.config()?;
            let (report, ok) = check::check(&config);
            print!("{report}");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
