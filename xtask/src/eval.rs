//! `cargo xtask eval`: how well the collector finds degradation windows and how well
//! `stallscope why` names their causes, measured on the scenario lab. Each run is one
//! lab (a fresh collector, agent and demo service) through the standard sequence with
//! parameters drawn from its seed (seeds S, S+1, ...); every injection is ranked with
//! `why` and, on the same stored data, with the n-sigma baseline ranker
//! (`--ranker nsigma`). Scoring is `stallscope_tests::lab::score`, shared with
//! `tests/tests/scenarios.rs`. Prints per class and overall category AC@1/AC@3 and
//! object AC@3 for both rankers, detection delay, onset and end errors, the controls'
//! false windows and every miss, and writes the table to `docs/eval.md`.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, bail};
use stallscope_collector::explain::iso;
use stallscope_tests::lab::{
    FaultClass, Lab, LabConfig, Scale,
    protocol::unix_now_ns,
    score::{self, Scored, WindowWatch},
};

use crate::{bootstrap, debian, demo::LAB_PACKAGES, util};

const USAGE: &str =
    "usage: cargo xtask eval [--runs R] [--scale F] [--seed S] [--classes C,..] [--release]

  --runs R       runs of the whole sequence (default 3), seeds S, S+1, ...
  --scale F      timing factor: 1.0 = the product's defaults (10 s batches, 60 s faults;
                 about 30 minutes a run), 0.2 = CI (2 s batches, 12 s faults; about 6)
  --seed S       the first run's seed (default 20261206)
  --classes C,.. which classes, in order (default: healthy, lock, slow-peer, cpu-hog,
                 disk, deploy, packet-loss, load-doubling)
  --release      build and run release binaries (default: debug, like the tests)";

struct Options {
    runs: u64,
    scale: Scale,
    seed: u64,
    classes: Vec<FaultClass>,
    release: bool,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        runs: 3,
        scale: Scale::DEFAULT,
        seed: 20_261_206,
        classes: score::sequence(),
        release: false,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{flag} needs a value\n\n{USAGE}"))
        };
        match flag.as_str() {
            "--runs" => {
                options.runs = value()?
                    .parse()
                    .ok()
                    .filter(|&r| r > 0)
                    .with_context(|| format!("--runs takes a positive number\n\n{USAGE}"))?;
            }
            "--scale" => {
                let factor: f64 = value()?
                    .parse()
                    .with_context(|| format!("--scale takes a number like 0.2\n\n{USAGE}"))?;
                options.scale = Scale::new(factor).map_err(anyhow::Error::msg)?;
            }
            "--seed" => {
                options.seed = value()?
                    .parse()
                    .with_context(|| format!("--seed takes a number\n\n{USAGE}"))?;
            }
            "--classes" => {
                options.classes = value()?
                    .split(',')
                    .filter(|c| !c.trim().is_empty())
                    .map(|c| c.trim().parse().map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<_>>()?;
                if options.classes.is_empty() {
                    bail!("--classes names no class\n\n{USAGE}");
                }
            }
            "--release" => options.release = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown eval option `{other}`\n\n{USAGE}"),
        }
    }
    Ok(options)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let options = parse(args)?;
    if !util::is_root() {
        bail!(
            "the evaluation runs the scenario lab (eBPF probes, namespaces, a loop device, a cgroup): run it as root, e.g. `sudo -E cargo xtask eval`"
        );
    }
    bootstrap::ensure()?;
    debian::ensure(LAB_PACKAGES)?;
    let profile = if options.release { "release" } else { "debug" };
    if options.release {
        util::cargo(&["build", "--release", "--bins"])?;
    } else {
        util::cargo(&["build", "--bins"])?;
    }
    let bin_dir = util::root().join("target").join(profile);
    let started = unix_now_ns();
    let mut scored: Vec<Scored> = Vec::new();
    let mut stray = 0;
    for run in 0..options.runs {
        let seed = options.seed + run;
        println!(
            "== run {} of {} (seed {seed}, scale {})",
            run + 1,
            options.runs,
            options.scale.factor()
        );
        let mut config = LabConfig::new(options.scale, seed);
        config.bin_dir.clone_from(&bin_dir);
        config.collector_config = Some(options.scale.detect_toml());
        config.scratch =
            Some(std::env::temp_dir().join(format!("stallscope-eval-{}", std::process::id())));
        config.lock_wait = Duration::from_secs(60 * 60);
        let mut lab = Lab::start(config)?;
        let watch = WindowWatch::start(&lab)?;
        let injections = lab.run_scenarios(&options.classes)?;
        let (run_scored, windows) = score::score_run(&mut lab, watch, &injections, &bin_dir)?;
        print!("{}", score::run_table(&run_scored));
        for s in &run_scored {
            if let Some(why) = &s.why {
                println!("  {} why: {}", s.injection.class, why.ranking_line());
            }
        }
        let run_stray = score::stray_windows(&windows, &injections);
        for w in &run_stray {
            println!(
                "  window outside every injection and control: {} from {}",
                w.window.id,
                iso(w.window.from_unix_ns)
            );
        }
        stray += run_stray.len();
        scored.extend(run_scored);
    }
    let table = score::markdown_table(&scored, stray);
    let misses = score::misses(&scored);
    println!("\n{table}");
    println!("misses ({}):", misses.len());
    for miss in &misses {
        println!("  {miss}");
    }
    let command = format!(
        "cargo xtask eval --runs {} --scale {} --seed {}{}{}",
        options.runs,
        options.scale.factor(),
        options.seed,
        if options.classes == score::sequence() {
            String::new()
        } else {
            format!(
                " --classes {}",
                options
                    .classes
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        },
        if options.release { " --release" } else { "" }
    );
    let doc = document(&command, started, &options, &table, &misses);
    let path = util::root().join("docs").join("eval.md");
    std::fs::create_dir_all(path.parent().context("docs/ has a parent")?)?;
    std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
    println!("written: {}", path.display());
    Ok(())
}

fn document(
    command: &str,
    started: i64,
    options: &Options,
    table: &str,
    misses: &[String],
) -> String {
    let mut out = format!(
        "# How well `why` finds the cause\n\n`{command}`, started {} ({} runs at scale {}: {} s batches, {} s injections; seeds {}..{}).\n\n\
         AC@k: the share of injections whose injected category is among the first k causes\n\
         ranked; object AC@3: the injected object (mutex, peer address:port, process, device\n\
         or syscall, new build-id with the grown function) is named by one of the first three\n\
         evidence entries of the ranked causes. `why` ranks by what a cause explains among\n\
         changes the baseline's variation does not explain; n-sigma (RCAEval's baseline) by\n\
         robust z-score, on the same stored data and window. Delay: from the injection's start\n\
         to the window appearing in the query API; onset and end errors: absolute, against the\n\
         injection's start and end. Injections without a window are ranked on their own range.\n\n",
        iso(started),
        options.runs,
        options.scale.factor(),
        options.scale.batch_interval().as_secs(),
        options.scale.inject().as_secs(),
        options.seed,
        options.seed + options.runs - 1,
    );
    out.push_str(table);
    out.push_str("\n## Misses\n\n");
    if misses.is_empty() {
        out.push_str("None.\n");
    }
    for miss in misses {
        let _ = writeln!(out, "- {miss}");
    }
    out
}
