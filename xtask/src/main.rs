//! `cargo xtask <task>`: the project's own bootstrap, build, demo, test and bench tasks, so
//! a fresh machine needs nothing installed by hand.

mod bench;
mod bench_collector;
mod bench_common;
mod bench_soak;
mod bench_ui;
mod bootstrap;
mod clickhouse;
mod debian;
mod demo;
mod eval;
mod image;
mod import_cycles;
mod lint;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  bootstrap   install the eBPF toolchain (nightly rust-src, bpf-linker) into .toolchain/
              and the Kubernetes manifests' validator into target/kubernetes-validate/
  build       bootstrap, then build everything in release mode
  demo [--fault CLASS]  (root) the whole product on this machine: a demo service under load
              runs healthy, degrades once, and the CLI shows what changed
  eval [--runs R] [--scale F] [--seed S] [--classes C,..]  (root) the scenario sequence R
              times: windows found and `why`'s ranking against n-sigma; writes docs/eval.md
  test        bootstrap, build, run unit and end-to-end tests (root for the latter)
  bench [NAME..]  measure, with no NAME all of: the agent's overhead against a baseline,
              interleaved (root: offcpu, syscall, futex, messaging, iperf3, reqresp);
              `symbolize`: criterion benchmarks of symbolization; `ingest`, `query`
              [sqlite|clickhouse]: collector ingest throughput and 24 h query latency;
              `ui`: the web UI's pages on a day of data, and its size
  image [--debug] [--check]  (root) the container image localhost/stallscope:VERSION (agent,
              collector, CLI) with buildah from local files; --check runs the agent from it
              with podman against a host process
  clickhouse start|stop  a private ClickHouse on 127.0.0.1:18123 for running tests by hand
  lint        import-cycle check, rustfmt check and clippy (host crates and the eBPF crate)
  import-cycles  only the import-cycle check of lint: no module imports one that imports it back
  fmt         format the workspace with nightly rustfmt (import grouping)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let rest = &args[1..];
    let result = match task.as_str() {
        "bootstrap" => bootstrap::ensure().and_then(|()| {
            // The offline validator of the Kubernetes manifests, in a venv under target/.
            stallscope_tests::kubernetes::install_validator(&util::root().join("target"))
        }),
        "build" => {
            bootstrap::ensure().and_then(|()| util::cargo(&["build", "--release", "--bins"]))
        }
        "demo" => demo::run(rest),
        "eval" => eval::run(rest),
        "test" => test::run(rest),
        "bench" => bench::run(rest),
        "clickhouse" => clickhouse::run(rest),
        "image" => image::run(rest),
        "lint" => lint::lint(),
        "import-cycles" => lint::import_cycle_check(),
        "fmt" => lint::fmt(),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(anyhow::anyhow!("unknown task `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask {task}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
