//! Scoring a scenario run against its ground truth: the automatic windows the collector
//! opened (when each became visible, its onset and end) and what `stallscope why` ranked
//! for each injection, with `why`'s own ranker and with the n-sigma baseline ranker on
//! the same stored data. `tests/tests/scenarios.rs` checks one run with it and
//! `cargo xtask eval` aggregates several; both share every rule here.
//!
//! Definitions (the README's evaluation section):
//! - a window *detects* an injection when it is an automatic window of the service that
//!   overlaps the injection's `[start, end)`; the detection delay is the time the window
//!   first appeared in the query API minus the injection's start, the onset error its
//!   onset minus the start, the end error its end minus the injection's end;
//! - category AC@k: the injected category is among the first k ranked causes;
//! - object AC@k: the injected object is named by one of the first k evidence entries of
//!   the ranked causes, in rank order (an entry is its kind, name and detail lines).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use stallscope_proto::v1;

use crate::lab::{
    Lab, SERVICE, Scale,
    protocol::unix_now_ns,
    truth::{FaultClass, Injection, Object},
};

/// The windows issue's limits at the product's defaults (10 s batches), scaled.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
pub const MAX_ONSET_ERROR: Duration = Duration::from_secs(20);
pub const MAX_END_ERROR: Duration = Duration::from_secs(30);

/// The standard sequence: the healthy control, the six injections, the load-doubling
/// control (a healthy stretch comes first, recoveries between: [`Lab::run_scenarios`]).
pub fn sequence() -> Vec<FaultClass> {
    let mut classes = vec![FaultClass::Healthy];
    classes.extend(FaultClass::INJECTIONS);
    classes.push(FaultClass::LoadDoubling);
    classes
}

/// An automatic window and when it was first seen through the query API.
#[derive(Debug, Clone)]
pub struct SeenWindow {
    pub window: v1::Window,
    pub first_seen_unix_ns: i64,
}

impl SeenWindow {
    /// The window's end, or "never" while it is open.
    fn until(&self) -> i64 {
        if self.window.until_unix_ns == 0 {
            i64::MAX
        } else {
            self.window.until_unix_ns
        }
    }

    pub fn overlaps(&self, from_unix_ns: i64, until_unix_ns: i64) -> bool {
        self.window.from_unix_ns < until_unix_ns && self.until() > from_unix_ns
    }

    fn overlap_ns(&self, from_unix_ns: i64, until_unix_ns: i64) -> i64 {
        (self.until().min(until_unix_ns) - self.window.from_unix_ns.max(from_unix_ns)).max(0)
    }
}

/// Polls the lab's collector for the service's automatic windows (every 250 ms) on a
/// thread of its own, recording when each id first appeared.
pub struct WindowWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<BTreeMap<String, SeenWindow>>>>,
}

impl WindowWatch {
    pub fn start(lab: &Lab) -> anyhow::Result<Self> {
        let mut query = lab.query()?;
        let since = unix_now_ns();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("window-watch".into())
            .spawn(move || {
                let mut seen: BTreeMap<String, SeenWindow> = BTreeMap::new();
                let mut failures = 0;
                while !stopped.load(Ordering::Relaxed) {
                    // Windows may be placed before the watch began (an onset is estimated).
                    let hour = 3_600_000_000_000;
                    match query.automatic_windows(SERVICE, since - hour, unix_now_ns() + hour) {
                        Ok(windows) => {
                            let now = unix_now_ns();
                            for window in windows {
                                seen.entry(window.id.clone())
                                    .and_modify(|s| s.window = window.clone())
                                    .or_insert(SeenWindow {
                                        window,
                                        first_seen_unix_ns: now,
                                    });
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            if failures > 40 {
                                return Err(e.context("the window watch gave up"));
                            }
                        }
                    }
                    thread::sleep(Duration::from_millis(250));
                }
                Ok(seen)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops polling; every window seen, with its latest stored version.
    pub fn finish(mut self) -> anyhow::Result<Vec<SeenWindow>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .take()
            .context("the window watch already finished")?;
        let seen = thread
            .join()
            .map_err(|_| anyhow::anyhow!("the window watch panicked"))??;
        Ok(seen.into_values().collect())
    }
}

impl Drop for WindowWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One evidence entry of `why`'s JSON answer.
#[derive(Debug, Clone, Deserialize)]
pub struct WhyEvidence {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub details: Vec<String>,
}

impl WhyEvidence {
    pub fn text(&self) -> String {
        format!("{} {} {}", self.kind, self.name, self.details.join(" "))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct WhyCause {
    pub category: String,
    pub rank: Option<u32>,
    #[serde(default)]
    pub share: f64,
    #[serde(default)]
    pub change_ns_per_s: f64,
    #[serde(default)]
    pub evidence: Vec<WhyEvidence>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WhyRange {
    pub from_unix_ns: i64,
    pub until_unix_ns: i64,
}

/// `stallscope why --format json`, the parts scored.
#[derive(Debug, Clone, Deserialize)]
pub struct WhyAnswer {
    pub verdict: String,
    pub summary: String,
    #[serde(default)]
    pub service: String,
    pub window: Option<WhyRange>,
    #[serde(default)]
    pub causes: Vec<WhyCause>,
}

impl WhyAnswer {
    /// Ranked causes, first first.
    pub fn ranked(&self) -> Vec<&WhyCause> {
        let mut ranked: Vec<&WhyCause> = self.causes.iter().filter(|c| c.rank.is_some()).collect();
        ranked.sort_by_key(|c| c.rank);
        ranked
    }

    /// 1-based rank of `category` among the ranked causes.
    pub fn category_rank(&self, category: &str) -> Option<usize> {
        self.ranked()
            .iter()
            .position(|c| c.category == category)
            .map(|i| i + 1)
    }

    /// 1-based position of the first evidence entry (ranked causes in order) naming
    /// `object`.
    pub fn object_rank(&self, object: &Object) -> Option<usize> {
        self.ranked()
            .iter()
            .flat_map(|c| c.evidence.iter())
            .position(|e| names_object(object, &e.text()))
            .map(|i| i + 1)
    }

    /// Whether the first ranked cause's evidence names `object`.
    pub fn top_cause_names(&self, object: &Object) -> bool {
        self.ranked()
            .first()
            .is_some_and(|c| c.evidence.iter().any(|e| names_object(object, &e.text())))
    }

    /// Every ranked cause with its share and change, and the first cause's evidence with
    /// its details: what a miss needs to be understood without rerunning it.
    pub fn ranking_line(&self) -> String {
        let ranked: Vec<String> = self
            .ranked()
            .iter()
            .map(|c| {
                format!(
                    "{} {:.0}% {:+.0} ms/s",
                    c.category,
                    c.share * 100.0,
                    c.change_ns_per_s / 1e6
                )
            })
            .collect();
        let evidence: Vec<String> = self
            .ranked()
            .first()
            .map(|c| c.evidence.iter().take(3).map(WhyEvidence::text).collect())
            .unwrap_or_default();
        format!(
            "ranked [{}]; first cause's evidence [{}]",
            ranked.join(", "),
            evidence.join(" | ")
        )
    }

    /// The first ranked cause and its first evidence entry, for tables and misses.
    pub fn top_line(&self) -> String {
        match self.ranked().first() {
            None => self.verdict.clone(),
            Some(c) => match c.evidence.first() {
                Some(e) => format!("{}: {} {}", c.category, e.kind, e.name),
                None => c.category.clone(),
            },
        }
    }
}

/// Whether an evidence entry's text names the injected object.
pub fn names_object(object: &Object, text: &str) -> bool {
    match object {
        Object::None => false,
        Object::Mutex {
            symbol, address, ..
        } => text.contains(symbol.as_str()) || hex_numbers(text).any(|a| address.contains(a)),
        Object::Peer { address, .. } => text.contains(address.as_str()),
        Object::Process { name, .. } => text.contains(name.as_str()),
        Object::Device {
            device,
            major_minor,
            syscall,
            ..
        } => {
            text.contains(device.as_str())
                || text.contains(major_minor.as_str())
                || text
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .any(|word| word == syscall)
        }
        Object::Build {
            new_build_id,
            function,
            added_function,
            ..
        } => {
            text.contains(new_build_id.as_str())
                && (text.contains(function.as_str()) || text.contains(added_function.as_str()))
        }
    }
}

fn hex_numbers(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|word| word.strip_prefix("0x"))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
}

/// Runs `stallscope why ARGS --format json` against the lab's collector.
pub fn run_why(bin_dir: &Path, lab: &Lab, args: &[String]) -> anyhow::Result<WhyAnswer> {
    let output = Command::new(crate::binary(bin_dir, "stallscope")?)
        .arg("why")
        .args(args)
        .args(["--format", "json"])
        .env("STALLSCOPE_COLLECTOR", lab.collector_url())
        .env("STALLSCOPE_TOKEN", lab.token())
        .env_remove("STALLSCOPE_CONFIG")
        .output()
        .context("running stallscope why")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // `why` prints its JSON answer also when it exits non-zero (no data, not enough
    // baseline).
    serde_json::from_str(&stdout).with_context(|| {
        format!(
            "stallscope why {} ({}) printed no JSON answer: {}{}",
            args.join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// One injection (or control) scored.
#[derive(Debug, Clone)]
pub struct Scored {
    pub seed: u64,
    pub injection: Injection,
    /// The automatic windows that overlap it.
    pub windows: Vec<SeenWindow>,
    /// What `why` explained: `window ID`, or the injection's range when nothing was
    /// detected.
    pub explained: String,
    pub why: Option<WhyAnswer>,
    pub nsigma: Option<WhyAnswer>,
}

impl Scored {
    /// The window used for timings: the one overlapping the injection most.
    pub fn window(&self) -> Option<&SeenWindow> {
        let (s, e) = (self.injection.start_unix_ns, self.injection.end_unix_ns);
        self.windows.iter().max_by_key(|w| w.overlap_ns(s, e))
    }

    pub fn delay_ns(&self) -> Option<i64> {
        self.window()
            .map(|w| w.first_seen_unix_ns - self.injection.start_unix_ns)
    }

    pub fn onset_error_ns(&self) -> Option<i64> {
        self.window()
            .map(|w| w.window.from_unix_ns - self.injection.start_unix_ns)
    }

    pub fn end_error_ns(&self) -> Option<i64> {
        self.window()
            .filter(|w| w.window.until_unix_ns != 0)
            .map(|w| w.window.until_unix_ns - self.injection.end_unix_ns)
    }

    fn is_control(&self) -> bool {
        self.injection.category.is_none()
    }

    /// Everything this injection fails of the issues' "done when" (empty: all good).
    pub fn failures(&self, scale: Scale) -> Vec<String> {
        let class = self.injection.class;
        let mut out = Vec::new();
        if self.is_control() {
            if !self.windows.is_empty() {
                out.push(format!(
                    "{class}: {} automatic window(s) in a control: {}",
                    self.windows.len(),
                    self.windows
                        .iter()
                        .map(|w| describe_window(&w.window))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            return out;
        }
        if self.windows.len() != 1 {
            out.push(format!(
                "{class}: {} automatic windows overlap the injection, expected exactly 1",
                self.windows.len()
            ));
        }
        let limit = |d: Duration| scale.scaled(d).as_nanos() as i64;
        if let Some(delay) = self.delay_ns()
            && delay > limit(MAX_DELAY)
        {
            out.push(format!(
                "{class}: the window appeared {} after the onset (at most {})",
                secs(delay),
                secs(limit(MAX_DELAY))
            ));
        }
        if let Some(error) = self.onset_error_ns()
            && error.abs() > limit(MAX_ONSET_ERROR)
        {
            out.push(format!(
                "{class}: onset off by {} (at most {})",
                secs(error),
                secs(limit(MAX_ONSET_ERROR))
            ));
        }
        if self.window().is_some() {
            match self.end_error_ns() {
                Some(error) if error.abs() > limit(MAX_END_ERROR) => out.push(format!(
                    "{class}: end off by {} (at most {})",
                    secs(error),
                    secs(limit(MAX_END_ERROR))
                )),
                None => out.push(format!("{class}: the window is still open")),
                Some(_) => {}
            }
        }
        let category = self
            .injection
            .category
            .map_or("", super::truth::Category::label);
        match &self.why {
            None => out.push(format!("{class}: no `why` answer")),
            Some(answer) => {
                if answer.category_rank(category) != Some(1) {
                    out.push(format!(
                        "{class}: why ranked {} first (expected {category}): {}",
                        answer.top_line(),
                        answer.summary
                    ));
                } else if !answer.top_cause_names(&self.injection.object) {
                    out.push(format!(
                        "{class}: the top cause's evidence does not name {} (first: {})",
                        self.injection.object,
                        answer.top_line()
                    ));
                }
            }
        }
        out
    }
}

fn secs(ns: i64) -> String {
    format!("{:.1} s", ns as f64 / 1e9)
}

fn opt_secs(ns: Option<i64>) -> String {
    ns.map_or("-".to_owned(), secs)
}

fn describe_window(w: &v1::Window) -> String {
    let indicators: Vec<&str> = w.indicators.iter().map(|i| i.name.as_str()).collect();
    format!(
        "{} {}..{} [{}]",
        w.id,
        w.from_unix_ns / 1_000_000_000,
        if w.until_unix_ns == 0 {
            "open".to_owned()
        } else {
            (w.until_unix_ns / 1_000_000_000).to_string()
        },
        indicators.join(", ")
    )
}

/// After the sequence: waits until everything is stored and the windows closed, stops
/// the watch, and explains every injection with both rankers (its window when one was
/// detected, else its own range).
pub fn score_run(
    lab: &mut Lab,
    watch: WindowWatch,
    injections: &[Injection],
    bin_dir: &Path,
) -> anyhow::Result<(Vec<Scored>, Vec<SeenWindow>)> {
    let last_end = injections.iter().map(|i| i.end_unix_ns).max().unwrap_or(0);
    let scale = lab.scale();
    // Recoveries follow every injection; give the last windows time to close.
    let settle = scale.batch_interval() * 6;
    lab.wait_ingested(unix_now_ns())?;
    thread::sleep(settle);
    let windows = watch.finish()?;
    let seed = lab.config().seed;
    let mut scored = Vec::new();
    for injection in injections {
        let overlapping: Vec<SeenWindow> = windows
            .iter()
            .filter(|w| w.overlaps(injection.start_unix_ns, injection.end_unix_ns))
            .cloned()
            .collect();
        let mut entry = Scored {
            seed,
            injection: injection.clone(),
            windows: overlapping,
            explained: String::new(),
            why: None,
            nsigma: None,
        };
        let target: Vec<String> = match entry.window() {
            Some(w) => vec![w.window.id.clone()],
            None => vec![
                "--service".into(),
                SERVICE.into(),
                "--from".into(),
                (injection.start_unix_ns / 1_000_000_000).to_string(),
                "--until".into(),
                (injection.end_unix_ns / 1_000_000_000).to_string(),
            ],
        };
        entry.explained = match entry.window() {
            Some(w) => format!("window {}", w.window.id),
            None => "range".to_owned(),
        };
        for ranker in ["why", "nsigma"] {
            let mut args = target.clone();
            args.extend(["--ranker".to_owned(), ranker.to_owned()]);
            let answer = run_why(bin_dir, lab, &args)
                .with_context(|| format!("{}: why --ranker {ranker}", injection.class))?;
            if ranker == "why" {
                entry.why = Some(answer);
            } else {
                entry.nsigma = Some(answer);
            }
        }
        scored.push(entry);
    }
    if last_end == 0 {
        bail!("no injection ran");
    }
    Ok((scored, windows))
}

/// Automatic windows that overlap no injection and no control (false windows outside
/// the controls: in the healthy stretch or a recovery).
pub fn stray_windows<'a>(
    windows: &'a [SeenWindow],
    injections: &[Injection],
) -> Vec<&'a SeenWindow> {
    windows
        .iter()
        .filter(|w| {
            !injections
                .iter()
                .any(|i| w.overlaps(i.start_unix_ns, i.end_unix_ns))
        })
        .collect()
}

/// One line per injection: what was injected against what was measured.
pub fn run_table(scored: &[Scored]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>4} {:>8} {:>8} {:>8} {:>4} {:>4} {:>4} {:>4}  {:<44} injected",
        "class", "wins", "delay", "onset", "end", "why", "obj", "nsig", "obj", "why's top cause",
    );
    for s in scored {
        let rank = |a: &Option<WhyAnswer>, category: bool| -> String {
            let Some(a) = a else { return "-".into() };
            let r = if category {
                s.injection
                    .category
                    .and_then(|c| a.category_rank(c.label()))
            } else {
                a.object_rank(&s.injection.object)
            };
            match (r, &s.injection.category) {
                (_, None) => a.verdict.chars().take(4).collect(),
                (Some(r), _) => r.to_string(),
                (None, _) => "x".into(),
            }
        };
        let top = s.why.as_ref().map_or("-".to_owned(), WhyAnswer::top_line);
        let _ = writeln!(
            out,
            "{:<14} {:>4} {:>8} {:>8} {:>8} {:>4} {:>4} {:>4} {:>4}  {:<44} {} ({}; {})",
            s.injection.class.name(),
            s.windows.len(),
            opt_secs(s.delay_ns()),
            opt_secs(s.onset_error_ns()),
            opt_secs(s.end_error_ns()),
            rank(&s.why, true),
            rank(&s.why, false),
            rank(&s.nsigma, true),
            rank(&s.nsigma, false),
            truncate(&top, 44),
            s.injection.fault,
            s.injection.object,
            s.explained,
        );
    }
    out
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut t: String = text.chars().take(max - 1).collect();
        t.push('~');
        t
    }
}

/// Accuracy at k: the share of `ranks` (1-based, `None`: not found) at most `k`.
fn accuracy(ranks: &[Option<usize>], k: usize) -> f64 {
    if ranks.is_empty() {
        return f64::NAN;
    }
    ranks.iter().filter(|r| r.is_some_and(|r| r <= k)).count() as f64 / ranks.len() as f64
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

/// The evaluation's numbers for a group of scored injections.
#[derive(Debug, Clone)]
pub struct Accuracy {
    pub runs: usize,
    pub detected: usize,
    pub why_cat1: f64,
    pub why_cat3: f64,
    pub why_obj3: f64,
    pub nsigma_cat1: f64,
    pub nsigma_cat3: f64,
    pub nsigma_obj3: f64,
    /// Seconds: median and max over detected injections.
    pub delay: (f64, f64),
    /// Seconds, absolute.
    pub onset_error: (f64, f64),
    pub end_error: (f64, f64),
}

impl Accuracy {
    pub fn of(scored: &[&Scored]) -> Self {
        fn why(s: &Scored) -> Option<&WhyAnswer> {
            s.why.as_ref()
        }
        fn nsigma(s: &Scored) -> Option<&WhyAnswer> {
            s.nsigma.as_ref()
        }
        let ranks = |pick: fn(&Scored) -> Option<&WhyAnswer>, category: bool| {
            scored
                .iter()
                .map(|s| {
                    let answer = pick(s)?;
                    if category {
                        answer.category_rank(s.injection.category?.label())
                    } else {
                        answer.object_rank(&s.injection.object)
                    }
                })
                .collect::<Vec<_>>()
        };
        let stat = |f: fn(&Scored) -> Option<i64>| {
            let mut v: Vec<f64> = scored
                .iter()
                .filter_map(|s| f(s))
                .map(|ns| (ns as f64 / 1e9).abs())
                .collect();
            let max = v.iter().copied().fold(f64::NAN, f64::max);
            (median(&mut v), max)
        };
        Self {
            runs: scored.len(),
            detected: scored.iter().filter(|s| s.window().is_some()).count(),
            why_cat1: accuracy(&ranks(why, true), 1),
            why_cat3: accuracy(&ranks(why, true), 3),
            why_obj3: accuracy(&ranks(why, false), 3),
            nsigma_cat1: accuracy(&ranks(nsigma, true), 1),
            nsigma_cat3: accuracy(&ranks(nsigma, true), 3),
            nsigma_obj3: accuracy(&ranks(nsigma, false), 3),
            delay: stat(Scored::delay_ns),
            onset_error: stat(Scored::onset_error_ns),
            end_error: stat(Scored::end_error_ns),
        }
    }
}

/// The evaluation's table (markdown): per class and overall, both rankers, detection
/// timings, and the controls' false windows.
pub fn markdown_table(scored: &[Scored], stray: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| class | runs | detected | why AC@1 | why AC@3 | why object AC@3 | n-sigma AC@1 | n-sigma AC@3 | n-sigma object AC@3 | delay median / max | onset error median / max | end error median / max |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let row = |out: &mut String, name: &str, group: &[&Scored]| {
        let a = Accuracy::of(group);
        let pair = |(m, x): (f64, f64)| {
            if m.is_nan() {
                "-".to_owned()
            } else {
                format!("{m:.1} s / {x:.1} s")
            }
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            a.runs,
            a.detected,
            a.why_cat1,
            a.why_cat3,
            a.why_obj3,
            a.nsigma_cat1,
            a.nsigma_cat3,
            a.nsigma_obj3,
            pair(a.delay),
            pair(a.onset_error),
            pair(a.end_error),
        );
    };
    let injections: Vec<&Scored> = scored.iter().filter(|s| !s.is_control()).collect();
    for class in FaultClass::INJECTIONS {
        let group: Vec<&Scored> = injections
            .iter()
            .copied()
            .filter(|s| s.injection.class == class)
            .collect();
        if !group.is_empty() {
            row(&mut out, class.name(), &group);
        }
    }
    row(&mut out, "**overall**", &injections);
    let _ = writeln!(out);
    for class in FaultClass::CONTROLS {
        let group: Vec<&Scored> = scored
            .iter()
            .filter(|s| s.injection.class == class)
            .collect();
        if group.is_empty() {
            continue;
        }
        let windows: usize = group.iter().map(|s| s.windows.len()).sum();
        let inconclusive = group
            .iter()
            .filter(|s| s.why.as_ref().is_some_and(|a| a.verdict == "inconclusive"))
            .count();
        let _ = writeln!(
            out,
            "- control `{}`: {} runs, {windows} automatic windows; `why` on its range inconclusive in {inconclusive} of {}",
            class.name(),
            group.len(),
            group.len()
        );
    }
    let _ = writeln!(
        out,
        "- automatic windows outside every injection and control (healthy stretches, recoveries): {stray}"
    );
    out
}

/// Every miss: undetected injections, wrong categories (both rankers), objects not in
/// the top three, windows in controls.
pub fn misses(scored: &[Scored]) -> Vec<String> {
    let mut out = Vec::new();
    for s in scored {
        let class = s.injection.class;
        let seed = s.seed;
        let Some(category) = s.injection.category else {
            if !s.windows.is_empty() {
                out.push(format!(
                    "{class} (seed {seed}): {} window(s) in a control",
                    s.windows.len()
                ));
            }
            continue;
        };
        if s.window().is_none() {
            out.push(format!("{class} (seed {seed}): no window detected"));
        }
        for (name, answer) in [("why", &s.why), ("n-sigma", &s.nsigma)] {
            let Some(a) = answer else { continue };
            if a.category_rank(category.label()) != Some(1) {
                out.push(format!(
                    "{class} (seed {seed}): {name} ranked {} first, expected {category} ({}): {}",
                    a.top_line(),
                    s.injection.fault,
                    a.ranking_line()
                ));
            }
            if a.object_rank(&s.injection.object).is_none_or(|r| r > 3) {
                out.push(format!(
                    "{class} (seed {seed}): {name} did not name {} in its first 3 evidence entries (first: {})",
                    s.injection.object,
                    a.top_line()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::protocol::AddressRange;

    #[test]
    fn objects_are_named_by_their_evidence() {
        let mutex = Object::Mutex {
            name: "inventory".into(),
            symbol: "demo::shop::INVENTORY".into(),
            address: AddressRange {
                start: 0x5000,
                size: 64,
            },
            waiter_function: "reserve_inventory".into(),
            holder_function: "audit_inventory".into(),
        };
        assert!(names_object(&mutex, "lock futex 0x5008 waiters in x"));
        assert!(!names_object(&mutex, "lock futex 0x5040"));
        let device = Object::Device {
            device: "zram1".into(),
            major_minor: "253:1".into(),
            syscall: "fdatasync".into(),
            function: "sync_journal".into(),
        };
        assert!(names_object(&device, "syscall fdatasync +3 ms/s"));
        assert!(!names_object(&device, "syscall fdatasync2"));
        let build = Object::Build {
            executable: "demo-shop".into(),
            old_build_id: "aa".into(),
            new_build_id: "bb11".into(),
            function: "format_line_items".into(),
            added_function: "recompute_tax_table".into(),
            old_pid: 1,
            new_pid: 2,
        };
        assert!(names_object(
            &build,
            "build bb11 grew in the new build: recompute_tax_table +3 ms/s"
        ));
        assert!(!names_object(&build, "build bb11"));
        assert!((accuracy(&[Some(1), Some(3), None, Some(2)], 1) - 0.25).abs() < 1e-12);
        assert!((accuracy(&[Some(1), Some(3), None, Some(2)], 3) - 0.75).abs() < 1e-12);
        assert!((median(&mut [3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
    }
}
