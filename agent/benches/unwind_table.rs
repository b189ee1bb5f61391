//! How long building a binary's unwind table takes, against binutils reading the same
//! call frame information in the same run (`readelf --debug-dump=frames-interp`, output
//! discarded): the agent's own release binary, the C library, and any binary named in
//! `BENCH_UNWIND_BINARIES` (colon-separated). The median of `BENCH_ROUNDS` (default 5)
//! of each. Prints a markdown section, also written to `STALLSCOPE_BENCH_SECTION` when
//! set (`cargo xtask bench unwind` sets it).

use std::{
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use stallscope_agent::unwind::table;

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn libc_path() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("libc.so"))
        })
        .map(PathBuf::from)
}

fn main() -> anyhow::Result<()> {
    // cargo bench passes `--bench`; nothing else is taken.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut binaries = vec![root.join("target/release/stallscope-agent")];
    binaries.extend(libc_path());
    if let Ok(extra) = std::env::var("BENCH_UNWIND_BINARIES") {
        binaries.extend(
            extra
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        );
    }
    let mut section = String::from(
        "## Unwind tables\n\n\
         Building a binary's unwind table (`agent/src/unwind/table.rs`) against `readelf \
         --debug-dump=frames-interp` reading the same call frame information (the \
         baseline, output discarded), median of each; the issue's target is under 1 s for \
         a binary the size of the agent.\n\n\
         | binary | size | functions | rows | table | build | readelf | build / readelf |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for binary in &binaries {
        let size = std::fs::metadata(binary)
            .map_err(|err| anyhow::anyhow!("{}: {err} (build it first)", binary.display()))?
            .len();
        let mut builds = Vec::new();
        let mut built = None;
        for _ in 0..rounds {
            let file = File::open(binary)?;
            let start = Instant::now();
            let table = table::build(&file)?;
            builds.push(start.elapsed());
            built = Some(table);
        }
        let mut reads = Vec::new();
        for _ in 0..rounds {
            let start = Instant::now();
            let status = Command::new("readelf")
                // The binary's own sections, not a separate debug file's.
                .args([
                    "--wide",
                    "--debug-dump=no-follow-links",
                    "--debug-dump=frames-interp",
                ])
                .arg(binary)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            anyhow::ensure!(status.success(), "readelf failed on {}", binary.display());
            reads.push(start.elapsed());
        }
        let table = built.expect("at least one round");
        let (build, read) = (median(builds), median(reads));
        let _ = writeln!(
            section,
            "| {} | {:.1} MB | {} | {} | {} KiB | {:.0} ms | {:.0} ms | {:.2} |",
            binary.display(),
            size as f64 / 1e6,
            table.stats.functions,
            table.rows.len(),
            table.bytes().div_ceil(1024),
            build.as_secs_f64() * 1e3,
            read.as_secs_f64() * 1e3,
            build.as_secs_f64() / read.as_secs_f64()
        );
    }
    print!("{section}");
    if let Ok(path) = std::env::var("STALLSCOPE_BENCH_SECTION") {
        std::fs::write(path, &section)?;
    }
    Ok(())
}
