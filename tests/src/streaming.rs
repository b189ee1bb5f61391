//! Harness for streaming runs: `stallscope-agent run` against a test collector, its
//! closing summary parsed, and the totals of batches left in a spool.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use prost::Message as _;
use stallscope_proto::v1;

use crate::{AgentExit, AgentRun, binary};

/// What `stallscope-agent run` printed at exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub batches: u64,
    pub first_sequence: u64,
    pub last_sequence: Option<u64>,
    pub dropped_total: u64,
    pub all_acknowledged: bool,
    /// `kind/unit` -> total over the run's batches.
    pub totals: BTreeMap<String, i64>,
}

/// Parses `run: N batches (sequences A..=B), spool dropped D in total, ...; totals k=v ...`.
pub fn parse_summary(stderr: &str) -> anyhow::Result<RunSummary> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("run: "))
        .with_context(|| format!("no run summary in the agent's output:\n{stderr}"))?;
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &line[line.find(marker)? + marker.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let batches = number_after("run: ").context("batch count")?;
    let dropped_total = number_after("spool dropped ").context("drop count")?;
    let (first_sequence, last_sequence) = if line.contains("(sequences none)") {
        (0, None)
    } else {
        let first = number_after("(sequences ").context("first sequence")?;
        let last = number_after("..=").context("last sequence")?;
        (first, Some(last))
    };
    let totals = line
        .split("; totals ")
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect();
    Ok(RunSummary {
        batches,
        first_sequence,
        last_sequence,
        dropped_total,
        all_acknowledged: line.contains("all acknowledged"),
        totals,
    })
}

/// Starts `stallscope-agent run` for `collector_url` with a spool in `spool_dir`, fast
/// batches, and `extra` arguments; waits until its probes are attached.
pub fn start_run(
    bin_dir: &Path,
    collector_url: &str,
    spool_dir: &Path,
    agent_id: &str,
    extra: &[&str],
) -> anyhow::Result<AgentRun> {
    let spool = spool_dir.to_string_lossy().into_owned();
    let mut args = vec![
        "run",
        "--collector",
        collector_url,
        "--agent-id",
        agent_id,
        "--spool-dir",
        spool.as_str(),
    ];
    // Fast batches and reconnects by default; `extra` overrides any of them.
    for (flag, value) in [
        ("--batch-interval", "1s"),
        ("--drain-interval", "500ms"),
        ("--max-backoff", "2s"),
        ("--flush-timeout", "20s"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let mut agent = AgentRun::start(&binary(bin_dir, "stallscope-agent")?, &args)?;
    agent.wait_ready(Duration::from_secs(60))?;
    Ok(agent)
}

/// Stops a run with SIGTERM and parses its summary.
pub fn stop_run(agent: AgentRun) -> anyhow::Result<(RunSummary, AgentExit)> {
    agent.terminate();
    let exit = agent.wait(Duration::from_secs(60))?;
    if !exit.status.success() {
        bail!("agent run failed ({}): {}", exit.status, exit.stderr);
    }
    Ok((parse_summary(&exit.stderr)?, exit))
}

/// Batch files waiting in a spool directory, and the drop count in its state file.
pub fn spool_state(spool_dir: &Path) -> (usize, u64) {
    let files = std::fs::read_dir(spool_dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "frame"))
            .count()
    });
    let dropped = std::fs::read(spool_dir.join("state.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|state| state["dropped_total"].as_u64())
        .unwrap_or(0);
    (files, dropped)
}

/// Waits (up to `timeout`) until the spool satisfies `done(files, dropped)`: agents built
/// for tests symbolize slowly on a busy machine, so fixed sleeps would be flaky.
pub fn wait_for_spool(
    spool_dir: &Path,
    timeout: Duration,
    done: impl Fn(usize, u64) -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (files, dropped) = spool_state(spool_dir);
        if done(files, dropped) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "spool {} not there within {timeout:?}: {files} batches, {dropped} dropped",
                spool_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every batch spooled in `spool_dir`, with its sequence.
fn spooled_batches(spool_dir: &Path) -> anyhow::Result<Vec<(u64, v1::Batch)>> {
    let mut batches = Vec::new();
    for entry in std::fs::read_dir(spool_dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "frame") {
            continue;
        }
        let frame = v1::IngestFrame::decode(std::fs::read(&path)?.as_slice())?;
        let raw = zstd::bulk::decompress(&frame.batch_zstd, 1 << 30)?;
        batches.push((frame.sequence, v1::Batch::decode(raw.as_slice())?));
    }
    Ok(batches)
}

/// Totals (`kind/unit` -> sum) and sequences of the batches waiting in a spool directory.
pub fn spool_contents(spool_dir: &Path) -> anyhow::Result<(Vec<u64>, BTreeMap<String, i64>)> {
    let mut sequences = Vec::new();
    let mut totals = BTreeMap::new();
    for (sequence, batch) in spooled_batches(spool_dir)? {
        sequences.push(sequence);
        for sample in &batch.samples {
            if let Some(signal) = batch.signals.get(sample.signal as usize) {
                *totals
                    .entry(format!("{}/{}", signal.value_kind, signal.value_unit))
                    .or_default() += sample.value;
                *totals
                    .entry(format!("{}/{}", signal.count_kind, signal.count_unit))
                    .or_default() += sample.count;
            }
        }
    }
    sequences.sort_unstable();
    Ok((sequences, totals))
}

/// A spooled sample as a failure message shows it: batch sequence, value, count, labels
/// and the stack's functions, leaf first.
pub type SpooledSample = (u64, i64, i64, Vec<String>, Vec<String>);

/// What [`spool_waits_in`] found.
pub struct SpooledWaits {
    /// Wait time (ns) through the function.
    pub ns: i64,
    /// Waits through the function.
    pub count: i64,
    /// Waits through the function by their `state` label (`interruptible` for sleeps;
    /// `runnable` for preemptions on the way, which a busy CPU adds).
    pub count_by_state: BTreeMap<String, i64>,
    /// The notes of the batches.
    pub notes: Vec<String>,
    /// The samples through the function: batch sequence, value, count, labels and the
    /// stack's functions, leaf first (what a failure message shows).
    pub through: Vec<SpooledSample>,
    /// The other samples of the signal of 10 ms or more, the same way.
    pub others: Vec<SpooledSample>,
    /// The batches' losses with a count, by reason (what a failure message shows).
    pub losses: Vec<(String, u64)>,
}

/// Wait time (ns) and waits of `signal` in the spooled batches whose stacks run
/// through a function whose name contains `function`, and the notes of those batches.
pub fn spool_waits_in(
    spool_dir: &Path,
    signal: &str,
    function: &str,
) -> anyhow::Result<SpooledWaits> {
    let mut found = SpooledWaits {
        ns: 0,
        count: 0,
        count_by_state: BTreeMap::new(),
        notes: Vec::new(),
        through: Vec::new(),
        others: Vec::new(),
        losses: Vec::new(),
    };
    for (sequence, batch) in spooled_batches(spool_dir)? {
        found.notes.extend(batch.notes.iter().cloned());
        found.losses.extend(
            batch
                .losses
                .iter()
                .filter(|loss| loss.count > 0)
                .map(|loss| (loss.reason.clone(), loss.count)),
        );
        for sample in &batch.samples {
            let wanted = batch
                .signals
                .get(sample.signal as usize)
                .is_some_and(|s| s.name == signal);
            if !wanted {
                continue;
            }
            let functions: Vec<&str> = batch
                .stacks
                .get(sample.stack as usize)
                .map(|stack| {
                    stack
                        .frames
                        .iter()
                        .filter_map(|&f| batch.frames.get(f as usize))
                        .map(|frame| frame.function.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let string = |index: &u32| {
                batch
                    .strings
                    .get(*index as usize)
                    .cloned()
                    .unwrap_or_default()
            };
            let labels: Vec<String> = sample
                .labels
                .chunks(2)
                .map(|pair| {
                    format!(
                        "{}={}",
                        string(&pair[0]),
                        pair.get(1).map(string).unwrap_or_default()
                    )
                })
                .collect();
            let described = (
                sequence,
                sample.value,
                sample.count,
                labels,
                functions.iter().map(|f| (*f).to_owned()).collect(),
            );
            if functions.iter().any(|f| f.contains(function)) {
                found.ns += sample.value;
                found.count += sample.count;
                let state = described
                    .3
                    .iter()
                    .find_map(|label| label.strip_prefix("state="))
                    .unwrap_or_default();
                *found.count_by_state.entry(state.to_owned()).or_default() += sample.count;
                found.through.push(described);
            } else if sample.value >= 10_000_000 {
                found.others.push(described);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_parse() {
        let summary = parse_summary(
            "noise\nrun: 6 batches (sequences 3..=8), spool dropped 2 in total, all acknowledged; totals off_cpu/nanoseconds=81 on_cpu_samples/count=3\n",
        )
        .expect("parses");
        assert_eq!(
            (
                summary.batches,
                summary.first_sequence,
                summary.last_sequence,
                summary.dropped_total
            ),
            (6, 3, Some(8), 2)
        );
        assert!(summary.all_acknowledged);
        assert_eq!(summary.totals["off_cpu/nanoseconds"], 81);
    }
}
