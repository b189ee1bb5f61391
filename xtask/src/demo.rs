//! `cargo xtask demo`: the whole product on one machine. The scenario lab (`tests/src/lab`)
//! starts a collector (SQLite in a temporary directory), `stallscope-agent run`, and the
//! bundled demo service with its two peers under steady load; the service runs healthy,
//! then degrades once (one injected fault, a slow peer unless `--fault` says otherwise),
//! then recovers. The demo then prints what the product shows about it, through the
//! `stallscope` CLI: totals by cause around the degradation, and the diff of the degraded
//! period against the healthy one with the functions whose wait time changed most.
//!
//! Each section is one function of [`Story`], the last one `stallscope why` on the
//! degraded period against the healthy one.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use stallscope_tests::lab::{
    FaultClass, Injection, Lab, LabConfig, LoadSummary, Phase, SERVICE, Scale, random_fault,
};

use crate::{bootstrap, debian, util};

/// Debian packages the lab needs: namespaces and veths (`ip`), the packet-loss rule
/// (`nft`), the journal's file system (`mkfs.ext4`), `losetup` and `mount`.
pub const LAB_PACKAGES: &[&str] = &["iproute2", "nftables", "e2fsprogs", "util-linux", "mount"];

/// The demo's timeline, at 2 s batches.
// `why` compares the degraded period with the healthy one and wants at least twice the
// window's buckets of it (2 s buckets here): 70 s of health for 30 s of degradation.
const HEALTHY: Duration = Duration::from_secs(70);
const DEGRADED: Duration = Duration::from_secs(30);
const RECOVER: Duration = Duration::from_secs(20);

const USAGE: &str = "usage: cargo xtask demo [--fault CLASS] [--seed N]

  --fault CLASS  what degrades the service: slow-peer (default), lock, cpu-hog, disk,
                 deploy or packet-loss
  --seed N       seeds the fault's parameters (which peer or mutex, how much)";

struct Options {
    fault: FaultClass,
    seed: u64,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        fault: FaultClass::SlowPeer,
        seed: std::process::id().into(),
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{flag} needs a value\n\n{USAGE}"))
        };
        match flag.as_str() {
            "--fault" => {
                options.fault = value()?.parse().map_err(anyhow::Error::msg)?;
                if options.fault.category().is_none() {
                    bail!(
                        "--fault {}: choose an injection, not a control\n\n{USAGE}",
                        options.fault
                    );
                }
            }
            "--seed" => {
                options.seed = value()?
                    .parse()
                    .with_context(|| format!("--seed takes a number\n\n{USAGE}"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown demo option `{other}`\n\n{USAGE}"),
        }
    }
    Ok(options)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let options = parse(args)?;
    if !util::is_root() {
        bail!(
            "the demo loads eBPF probes and builds a small lab (namespaces, a loop device, a cgroup): run it as root, e.g. `sudo -E cargo xtask demo`"
        );
    }
    bootstrap::ensure()?;
    debian::ensure(LAB_PACKAGES)?;
    util::cargo(&["build", "--release", "--bins"])?;
    let root = util::root();
    let mut config = LabConfig::new(Scale::CI, options.seed);
    config.bin_dir = root.join("target").join("release");
    config.scratch =
        Some(std::env::temp_dir().join(format!("stallscope-demo-{}", std::process::id())));
    config.lock_wait = Duration::from_secs(10);
    println!(
        "Starting a collector, the agent, and the demo service `{SERVICE}` (two peers, 200 requests/s)..."
    );
    let mut lab = Lab::start(config)?;
    println!("Healthy for {}s...", HEALTHY.as_secs());
    let healthy = lab.healthy(HEALTHY)?;
    let fault = random_fault(options.fault, lab.rng());
    println!("Degrading for {}s: {fault}", DEGRADED.as_secs());
    let injection = lab.inject(fault, DEGRADED)?;
    println!("Recovering for {}s...", RECOVER.as_secs());
    let recovered = lab.recover(RECOVER)?;
    lab.wait_ingested(recovered.end_unix_ns)?;
    let story = Story {
        lab: &lab,
        healthy,
        injection,
        recovered,
        bin_dir: root.join("target").join("release"),
    };
    story.injected();
    story.load()?;
    story.series()?;
    story.diff()?;
    story.why()?;
    story.files();
    Ok(())
}

/// What happened, and how to show it.
struct Story<'a> {
    lab: &'a Lab,
    healthy: Phase,
    injection: Injection,
    recovered: Phase,
    bin_dir: PathBuf,
}

fn seconds(unix_ns: i64) -> String {
    (unix_ns / 1_000_000_000).to_string()
}

fn heading(title: &str) {
    println!("\n== {title}");
}

impl Story<'_> {
    /// Runs `stallscope ARGS` against the lab's collector, printing what it prints.
    fn cli(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("$ stallscope {}", args.join(" "));
        let output = Command::new(self.bin_dir.join("stallscope"))
            .args(args)
            .env("STALLSCOPE_COLLECTOR", self.lab.collector_url())
            .env("STALLSCOPE_TOKEN", self.lab.token())
            .env_remove("STALLSCOPE_CONFIG")
            .output()
            .context("running stallscope")?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            bail!("stallscope {} failed", args.join(" "));
        }
        Ok(())
    }

    fn injected(&self) {
        heading("What was injected (the lab's ground truth)");
        let i = &self.injection;
        println!(
            "{}: {} from {} to {} (Unix seconds)\ncategory {}; object: {}",
            i.class,
            i.fault,
            seconds(i.start_unix_ns),
            seconds(i.end_unix_ns),
            i.category.map_or("-".to_owned(), |c| c.to_string()),
            i.object
        );
    }

    fn load(&self) -> anyhow::Result<()> {
        heading("What the users saw (the load generator)");
        let report = self.lab.load_report()?;
        for (name, from, until) in [
            (
                "healthy",
                self.healthy.start_unix_ns,
                self.healthy.end_unix_ns,
            ),
            (
                "degraded",
                self.injection.start_unix_ns,
                self.injection.end_unix_ns,
            ),
            (
                "recovered",
                self.recovered.start_unix_ns,
                self.recovered.end_unix_ns,
            ),
        ] {
            let summary = LoadSummary::of(&report, from, until);
            println!(
                "{name:<10} {:>6.0} requests/s  p50 {:>7.1} ms  p99 {:>7.1} ms  errors {}",
                summary.throughput(),
                summary.p50_us() as f64 / 1e3,
                summary.p99_us() as f64 / 1e3,
                summary.errors
            );
        }
        Ok(())
    }

    fn series(&self) -> anyhow::Result<()> {
        heading("Where the service's time went, by cause (off-CPU; on-CPU is cpu-work)");
        let (from, until) = (
            seconds(self.healthy.start_unix_ns),
            seconds(self.recovered.end_unix_ns),
        );
        let common = [
            "--from",
            &from,
            "--until",
            &until,
            "--service",
            SERVICE,
            "--step",
            "4s",
        ];
        let mut args = vec!["series", "--by", "cause", "--signal", "off-cpu"];
        args.extend(common);
        self.cli(&args)?;
        let mut args = vec!["series", "--signal", "on-cpu"];
        args.extend(common);
        self.cli(&args)
    }

    fn diff(&self) -> anyhow::Result<()> {
        heading("What changed: degraded against healthy, per second of wall time");
        let before = format!(
            "{}..{}",
            seconds(self.healthy.start_unix_ns),
            seconds(self.healthy.end_unix_ns)
        );
        let after = format!(
            "{}..{}",
            seconds(self.injection.start_unix_ns),
            seconds(self.injection.end_unix_ns)
        );
        let svg = self.diff_svg().to_string_lossy().into_owned();
        self.cli(&[
            "diff",
            "--before",
            &before,
            "--after",
            &after,
            "--service",
            SERVICE,
            "-n",
            "12",
            "-o",
            &svg,
        ])
    }

    /// `stallscope why` on the degraded period, against the healthy one.
    fn why(&self) -> anyhow::Result<()> {
        heading("Why: the causes of the degradation, ranked, with their evidence");
        let from = seconds(self.injection.start_unix_ns);
        let until = seconds(self.injection.end_unix_ns);
        let baseline = format!(
            "{}..{}",
            seconds(self.healthy.start_unix_ns),
            seconds(self.healthy.end_unix_ns)
        );
        self.cli(&[
            "why",
            "--service",
            SERVICE,
            "--from",
            &from,
            "--until",
            &until,
            "--baseline",
            &baseline,
        ])
    }

    fn diff_svg(&self) -> PathBuf {
        self.lab.scratch().join("diff.svg")
    }

    fn files(&self) {
        heading("Files");
        let scratch = self.lab.scratch();
        println!("differential flame graph:  {}", self.diff_svg().display());
        println!(
            "collector data (SQLite):   {}",
            scratch.join("data").display()
        );
        println!(
            "ground truth:              {}",
            scratch.join("ground-truth.json").display()
        );
        println!(
            "load generator, per second: {}",
            self.lab.load_report_path().display()
        );
        println!(
            "logs:                      {}",
            scratch.join("logs").display()
        );
        println!(
            "\nTo look further, serve the data again and query it:\n  {} --plaintext --insecure-no-query-auth --data-dir {} --retention {} &\n  {} --collector http://127.0.0.1:7070 targets --since 1h",
            self.bin_dir.join("stallscope-collector").display(),
            scratch.join("data").display(),
            self.lab.scale().retention(),
            self.bin_dir.join("stallscope").display(),
        );
    }
}
