//! `why`: what was different in a window, ranked by cause, with evidence.
//!
//! The method, the way an SRE would work it by hand:
//! 1. Scope the slow period (the window) and find normal: the time just before it and the
//!    same time on earlier days, outside every known window ([`baseline`]).
//! 2. Compare per cause category, in wait time per second of wall time, request-path
//!    waits only ([`categories`]): the change in each category, its share of the total
//!    change, and how surprising it is against the baseline's own bucket-to-bucket
//!    variation (a moving-block bootstrap; Benjamini-Hochberg across categories).
//!    Ranked by how much of the change a category explains; noise is not ranked.
//! 3. One level down for the ranked causes: which lock, peer, device, other process
//!    ([`objects`], tested bucket by bucket like the categories, with false-discovery
//!    control across objects), which code paths, syscalls and builds ([`stacks`]).
//! 4. Follow a slow peer to its own service when the data says which one it is, and
//!    credit CPU contention on a shared host where that is what slowed the peer
//!    ([`downstream`]).
//! 5. Say what weakens the answer: gaps, losses, incomplete stacks, missing hosts.

pub mod baseline;
pub mod categories;
pub mod downstream;
pub mod frames;
pub mod objects;
pub mod report;
pub mod stacks;
pub mod stats;
pub mod timeline;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use stallscope_profile::Profile;

use self::{
    baseline::{BaselinePolicy, Candidate},
    categories::{Category, CategoryBuckets},
    objects::human_ns,
    report::{BaselinePeriod, CauseChange, EventNote, Evidence, Report, Span, Verdict},
    stacks::Compared,
    stats::SplitMix64,
    timeline::{BucketAmounts, Rates, Timeline},
};
use crate::{
    events::ChangeRecord,
    long_waits::spread_long_waits,
    storage::{Filter, SeriesTotals, Storage, StorageError, TimeRange},
};

const NS: i64 = 1_000_000_000;

/// What to explain.
#[derive(Debug, Clone)]
pub struct Question {
    pub window_id: Option<String>,
    /// Host and service of the window (`None`: every one).
    pub host: Option<String>,
    pub service: Option<String>,
    pub window: TimeRange,
    /// A baseline chosen by the caller instead of the automatic one.
    pub baseline: Option<TimeRange>,
    /// Other windows of the scope: never part of the baseline.
    pub exclude: Vec<Span>,
}

/// How causes and objects are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ranker {
    /// By how much of the change a cause explains, among changes the baseline's own
    /// variation does not explain (bootstrap, false-discovery control).
    #[default]
    Why,
    /// By robust z-score alone (the "n-sigma" method of the `RCAEval` benchmark): the
    /// simple baseline `why` is measured against; significant at z >= 3.
    NSigma,
}

/// The z-score at which the n-sigma ranker calls a change significant.
pub const NSIGMA_THRESHOLD: f64 = 3.0;

/// The thresholds of an answer (documented in the README's `why` section).
#[derive(Debug, Clone)]
pub struct Settings {
    pub ranker: Ranker,
    /// The storage's finest bucket (seconds): the comparison's buckets are multiples.
    pub base_resolution_s: i64,
    /// About this many buckets per window (fewer for windows shorter than that many base
    /// buckets).
    pub buckets_per_window: i64,
    pub policy: BaselinePolicy,
    /// False-discovery rate across the categories (and across the objects).
    pub alpha: f64,
    /// A category's rise is ranked only if at least this much wait per second...
    pub min_change_ns_per_s: f64,
    /// ...and at least this share of its own baseline.
    pub min_relative_change: f64,
    /// Fewer usable baseline buckets than this (or than twice the window's) and `why`
    /// refuses to answer.
    pub min_baseline_buckets: usize,
    /// Evidence lines per cause.
    pub evidence_per_cause: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ranker: Ranker::Why,
            base_resolution_s: 10,
            buckets_per_window: 30,
            policy: BaselinePolicy::default(),
            alpha: 0.05,
            min_change_ns_per_s: 10e6,
            min_relative_change: 0.2,
            min_baseline_buckets: 12,
            evidence_per_cause: 4,
        }
    }
}

impl Settings {
    /// The bucket width for a window of `length_s` seconds.
    fn step_s(&self, length_s: i64) -> i64 {
        let base = self.base_resolution_s.max(1);
        base * (length_s / (self.buckets_per_window.max(1) * base)).max(1)
    }
}

fn floor_to(value: i64, step: i64) -> i64 {
    value - value.rem_euclid(step)
}

fn ceil_to(value: i64, step: i64) -> i64 {
    floor_to(value + step - 1, step)
}

fn scope_filter(question: &Question) -> Filter {
    Filter {
        host: question.host.clone(),
        service: question.service.clone(),
        ..Filter::default()
    }
}

/// A stable seed for the bootstrap: the same question gets the same answer.
fn seed_of(question: &Question) -> u64 {
    crate::hash::StableHasher::new()
        .str(question.host.as_deref().unwrap_or(""))
        .str(question.service.as_deref().unwrap_or(""))
        .u64(question.window.from_unix_ns as u64)
        .u64(question.window.until_unix_ns as u64)
        .finish() as u64
}

fn range_s(from_s: i64, until_s: i64) -> TimeRange {
    TimeRange {
        from_unix_ns: from_s * NS,
        until_unix_ns: until_s * NS,
    }
}

/// Per category, the (time, events) of every bucket.
fn category_amounts(buckets: &CategoryBuckets) -> BTreeMap<Category, BucketAmounts> {
    let mut out: BTreeMap<Category, BucketAmounts> = BTreeMap::new();
    for (&bucket, sums) in &buckets.buckets {
        for category in Category::ALL {
            out.entry(category)
                .or_default()
                .insert(bucket, (sums.ns(category), sums.events(category)));
        }
    }
    out
}

/// Answers `question` from `storage`.
pub async fn explain<S: Storage>(
    storage: &S,
    question: &Question,
    settings: &Settings,
) -> Result<Report, StorageError> {
    let mut report = explain_scope(storage, question, settings).await?;
    if settings.ranker == Ranker::Why {
        downstream::follow(storage, question, settings, &mut report).await?;
    }
    Ok(report)
}

/// The answer for the question's own scope, without following peers downstream.
async fn explain_scope<S: Storage>(
    storage: &S,
    question: &Question,
    settings: &Settings,
) -> Result<Report, StorageError> {
    let filter = scope_filter(question);
    let (window_from_s, window_until_s) = question.window.seconds();
    let step = settings.step_s(window_until_s - window_from_s);
    let (from_s, until_s) = (floor_to(window_from_s, step), ceil_to(window_until_s, step));
    let mut report = empty_report(question, step);

    let mut window_series = storage
        .series_totals(range_s(from_s, until_s), filter.clone(), step)
        .await?;
    spread_long_waits(&mut window_series, step, from_s);
    let window_buckets = CategoryBuckets::from_series(&window_series);
    if window_buckets.buckets.is_empty() {
        report.verdict = Verdict::NoData;
        report.summary = format!(
            "no data for {} between {} and {}: check the name and range with `stallscope targets`",
            scope_name(question),
            iso(question.window.from_unix_ns),
            iso(question.window.until_unix_ns)
        );
        return Ok(report);
    }

    // The baseline: candidate periods, minus windows and buckets without data.
    let candidates = match question.baseline {
        Some(given) => {
            let (f, u) = given.seconds();
            vec![Candidate {
                from_s: floor_to(f, step),
                until_s: ceil_to(u, step),
                days_back: 0,
            }]
        }
        None => settings.policy.candidates(from_s, until_s, step, 0),
    };
    let mut exclude = question.exclude.clone();
    exclude.push(Span {
        from_unix_ns: from_s * NS,
        until_unix_ns: until_s * NS,
    });
    let mut all_series: Vec<SeriesTotals> = window_series;
    let mut all_buckets = window_buckets;
    let mut described = Vec::new();
    for candidate in candidates {
        let mut series = storage
            .series_totals(
                range_s(candidate.from_s, candidate.until_s),
                filter.clone(),
                step,
            )
            .await?;
        spread_long_waits(&mut series, step, candidate.from_s);
        let buckets = CategoryBuckets::from_series(&series);
        let runs = baseline::usable_buckets(
            &candidate,
            step,
            |b| buckets.buckets.contains_key(&b),
            &exclude,
        );
        all_buckets.has_socket_waits |= buckets.has_socket_waits;
        all_buckets.buckets.extend(buckets.buckets);
        all_series.extend(series);
        described.push((candidate, runs));
    }
    let timeline = Timeline {
        step_s: step,
        window: (from_s..until_s)
            .step_by(step as usize)
            .filter(|b| all_buckets.buckets.contains_key(b))
            .collect(),
        baseline_runs: described
            .iter()
            .flat_map(|(_, runs)| runs.clone())
            .collect(),
    };
    report.window_buckets = timeline.window.len();
    report.baseline_buckets = timeline.baseline_buckets();
    report.baseline = baseline::describe(&described, step, question.baseline.is_some());
    let needed = settings.min_baseline_buckets.max(2 * timeline.window.len());
    if timeline.baseline_buckets() < needed {
        report.verdict = Verdict::NotEnoughBaseline;
        let searched = match question.baseline {
            Some(given) => format!(
                "in the given baseline {} .. {}",
                iso(given.from_unix_ns),
                iso(given.until_unix_ns)
            ),
            None => format!(
                "in the {} before the window and the same time on earlier days",
                human_span(
                    settings
                        .policy
                        .candidates(from_s, until_s, step, 0)
                        .first()
                        .map_or(0, |c| c.until_s - c.from_s)
                )
            ),
        };
        let remedy = if question.baseline.is_some() {
            "pass a longer baseline range"
        } else {
            "wait for more data, or pass a baseline range"
        };
        report.summary = format!(
            "not enough baseline for {}: {} s of data outside windows {searched}; `why` needs at least {} s ({remedy})",
            scope_name(question),
            timeline.baseline_seconds() as i64,
            needed as i64 * step
        );
        return Ok(report);
    }

    let mut rng = SplitMix64::new(seed_of(question));
    let amounts = category_amounts(&all_buckets);
    rank_causes(&mut report, &timeline, &amounts, settings, &mut rng);
    let idle: BucketAmounts = all_buckets
        .buckets
        .iter()
        .map(|(&b, s)| (b, (s.idle_ns, 0.0)))
        .collect();
    let idle = timeline.rates(&idle);
    report.idle_window_ns_per_s = idle.window_ns_per_s;
    report.idle_baseline_ns_per_s = idle.baseline_ns_per_s;

    // Objects: every candidate tested, false discoveries controlled across all of them.
    let ranked: BTreeSet<Category> = report
        .causes
        .iter()
        .filter(|c| c.rank.is_some())
        .filter_map(|c| Category::from_label(&c.category))
        .collect();
    let mut candidates = objects::locks(&all_series);
    candidates.extend(objects::peers(&all_series, &timeline));
    candidates.extend(objects::retransmitting_peers(&all_series));
    candidates.extend(objects::devices(&all_series, &timeline));
    if ranked.contains(&Category::CpuContention) {
        let host_series = host_oncpu(storage, &all_series, &timeline, question).await?;
        candidates.extend(objects::cpu_takers(
            &host_series,
            question.service.as_deref().unwrap_or(""),
        ));
    }
    let tested: Vec<(objects::Candidate, Rates, f64)> = candidates
        .into_iter()
        .map(|c| {
            let rates = timeline.rates(&c.amounts);
            let score = match settings.ranker {
                Ranker::Why => timeline.p_value(&c.amounts, &mut rng),
                Ranker::NSigma => timeline.robust_z(&c.amounts),
            };
            (c, rates, score)
        })
        .collect();
    // Why: false-discovery-adjusted p-values; n-sigma: objects at z >= 3 pass (their
    // "q" is then 0, and they are ordered by z below).
    let q_values: Vec<f64> = match settings.ranker {
        Ranker::Why => stats::benjamini_hochberg(&tested.iter().map(|t| t.2).collect::<Vec<_>>()),
        Ranker::NSigma => tested
            .iter()
            .map(|t| if t.2 >= NSIGMA_THRESHOLD { 0.0 } else { 1.0 })
            .collect(),
    };

    // Stacks, syscalls and builds for the ranked causes.
    let (window_profile, baseline_profile) = if ranked.is_empty() {
        (Profile::default(), Profile::default())
    } else {
        profiles(storage, &filter, &timeline, from_s, until_s).await?
    };
    let compared = Compared {
        window: &window_profile,
        window_seconds: timeline.window_seconds(),
        baseline: &baseline_profile,
        baseline_seconds: timeline.baseline_seconds(),
    };
    // Change events near the window: the stored ones (deploys with both build-ids,
    // restarts), else build-ids the window ran and the baseline never did.
    let length_s = until_s - from_s;
    let stored = storage
        .events(range_s(from_s - length_s, until_s), filter.clone())
        .await?;
    report.events = stored.iter().map(|e| event_note(e, from_s)).collect();
    let mut deploys: Vec<(String, Vec<String>)> = stored
        .iter()
        .filter(|e| e.kind == "deploy" && !e.build_id.is_empty())
        .map(|e| {
            let previous = (!e.previous_build_id.is_empty())
                .then(|| e.previous_build_id.clone())
                .into_iter()
                .collect();
            (e.build_id.clone(), previous)
        })
        .collect();
    if deploys.is_empty()
        && let Some((new, old)) = compared.new_builds()
    {
        let old: Vec<String> = old.into_iter().collect();
        for build in new {
            report.events.push(EventNote {
                time_unix_ns: question.window.from_unix_ns,
                kind: "deploy".into(),
                host: question.host.clone().unwrap_or_default(),
                service: question.service.clone().unwrap_or_default(),
                build_id: Some(build.clone()),
                previous_build_id: old.first().cloned(),
                detail: "a build-id the baseline never ran appears in the window (no stored event)"
                    .into(),
            });
            deploys.push((build, old.clone()));
        }
    }
    let runqueue = objects::runqueue_detail(&all_series, &timeline);
    for cause in &mut report.causes {
        let Some(category) = Category::from_label(&cause.category) else {
            continue;
        };
        if cause.rank.is_none() {
            continue;
        }
        let floor = (cause.change_ns_per_s * 0.05).max(1e6);
        let mut passed: Vec<(&(objects::Candidate, Rates, f64), f64)> = tested
            .iter()
            .zip(q_values.iter().copied())
            .filter(|((c, rates, _), q)| {
                c.category == category && *q <= settings.alpha && rates.change() > 0.0
            })
            .collect();
        match settings.ranker {
            Ranker::Why => passed.sort_by(|a, b| b.0.1.change().total_cmp(&a.0.1.change())),
            Ranker::NSigma => passed.sort_by(|a, b| b.0.2.total_cmp(&a.0.2)),
        }
        let mut evidence: Vec<Evidence> = passed
            .into_iter()
            .map(|((c, rates, _), q)| {
                let mut e = objects::evidence(c, rates, q);
                if c.kind == "lock"
                    && let Some(address) = c.name.split_whitespace().nth(1)
                    && let Some(waiters) = compared.lock_waiters(address)
                {
                    e.details.insert(0, waiters);
                }
                e
            })
            .collect();
        match category {
            Category::CpuContention => {
                if let Some(line) = &runqueue {
                    evidence.push(detail_only("run queue", line));
                }
            }
            Category::CpuWork => {
                for (build, previous) in &deploys {
                    let mut e = detail_only("build", build);
                    if !previous.is_empty() {
                        e.details
                            .push(format!("the baseline ran {}", previous.join(", ")));
                    }
                    for grown in compared.grown_in_build(build, floor) {
                        e.details.push(format!(
                            "grew in the new build: {} +{}/s",
                            grown.name,
                            human_ns(grown.change_ns_per_s())
                        ));
                    }
                    evidence.push(e);
                }
                evidence.extend(compared.grown_functions(category, floor));
            }
            Category::Disk | Category::Lock | Category::Other => {
                evidence.extend(compared.grown_syscalls(category, floor));
            }
            Category::Network => {}
        }
        evidence.truncate(settings.evidence_per_cause);
        evidence.extend(compared.grown_stacks(category, floor).into_iter().take(2));
        cause.evidence = evidence;
    }
    report.weaknesses = weaknesses(
        &timeline,
        &all_series,
        &all_buckets,
        &window_profile,
        &baseline_profile,
    );
    report.summary = summary(&report, question);
    Ok(report)
}

/// Fills `report.causes` with every category's change, ranked where significant.
fn rank_causes(
    report: &mut Report,
    timeline: &Timeline,
    amounts: &BTreeMap<Category, BucketAmounts>,
    settings: &Settings,
    rng: &mut SplitMix64,
) {
    let empty = BucketAmounts::new();
    let tested: Vec<(Category, Rates, f64, f64)> = Category::ALL
        .into_iter()
        .map(|category| {
            let a = amounts.get(&category).unwrap_or(&empty);
            (
                category,
                timeline.rates(a),
                timeline.p_value(a, rng),
                timeline.robust_z(a),
            )
        })
        .collect();
    let q = stats::benjamini_hochberg(&tested.iter().map(|t| t.2).collect::<Vec<_>>());
    let mut causes: Vec<(CauseChange, f64)> = tested
        .iter()
        .zip(q)
        .map(|((category, rates, p, z), q)| {
            let change = rates.change();
            let big_enough = change
                >= settings
                    .min_change_ns_per_s
                    .max(settings.min_relative_change * rates.baseline_ns_per_s);
            let significant = match settings.ranker {
                Ranker::Why => q <= settings.alpha && big_enough,
                Ranker::NSigma => *z >= NSIGMA_THRESHOLD,
            };
            (
                CauseChange {
                    category: category.label().to_owned(),
                    rank: None,
                    window_ns_per_s: rates.window_ns_per_s,
                    baseline_ns_per_s: rates.baseline_ns_per_s,
                    change_ns_per_s: change,
                    window_ns_per_event: rates.window_ns_per_event,
                    baseline_ns_per_event: rates.baseline_ns_per_event,
                    share: 0.0,
                    p_value: *p,
                    q_value: q,
                    significant,
                    evidence: Vec::new(),
                },
                *z,
            )
        })
        .collect();
    // Why ranks by what a cause explains; n-sigma by how far it deviated.
    causes.sort_by(|(a, za), (b, zb)| {
        b.significant
            .cmp(&a.significant)
            .then(match settings.ranker {
                Ranker::Why => b.change_ns_per_s.total_cmp(&a.change_ns_per_s),
                Ranker::NSigma => zb.total_cmp(za),
            })
    });
    let mut causes: Vec<CauseChange> = causes.into_iter().map(|(c, _)| c).collect();
    let total: f64 = causes
        .iter()
        .filter(|c| c.significant)
        .map(CauseChange::change)
        .sum();
    for (index, cause) in causes.iter_mut().filter(|c| c.significant).enumerate() {
        cause.rank = Some(index as u32 + 1);
        cause.share = if total > 0.0 {
            cause.change_ns_per_s / total
        } else {
            0.0
        };
    }
    report.verdict = if causes.iter().any(|c| c.rank.is_some()) {
        Verdict::Explained
    } else {
        Verdict::Inconclusive
    };
    report.causes = causes;
}

/// Host-wide on-CPU series of the scope's hosts over the window and baseline buckets.
async fn host_oncpu<S: Storage>(
    storage: &S,
    scope_series: &[SeriesTotals],
    timeline: &Timeline,
    question: &Question,
) -> Result<Vec<SeriesTotals>, StorageError> {
    let hosts: BTreeSet<String> = match &question.host {
        Some(host) => std::iter::once(host.clone()).collect(),
        None => scope_series.iter().map(|s| s.host.clone()).collect(),
    };
    let mut out = Vec::new();
    for (from_s, until_s) in spans_of(timeline) {
        for host in &hosts {
            let filter = Filter {
                host: Some(host.clone()),
                signal: Some(categories::signals::ON_CPU.to_owned()),
                ..Filter::default()
            };
            out.extend(
                storage
                    .series_totals(range_s(from_s, until_s), filter, timeline.step_s)
                    .await?,
            );
        }
    }
    Ok(out)
}

/// The contiguous stretches of the window and baseline buckets, `[from_s, until_s)`.
fn spans_of(timeline: &Timeline) -> Vec<(i64, i64)> {
    let mut spans = Vec::new();
    let step = timeline.step_s;
    for run in timeline
        .baseline_runs
        .iter()
        .map(Vec::as_slice)
        .chain(std::iter::once(timeline.window.as_slice()))
    {
        if let (Some(first), Some(last)) = (run.first(), run.last()) {
            spans.push((*first, last + step));
        }
    }
    spans
}

/// Most baseline stretches whose profiles are read (the longest ones).
const MAX_BASELINE_PROFILES: usize = 24;

/// The window's profile and the baseline's, merged over its stretches.
async fn profiles<S: Storage>(
    storage: &S,
    filter: &Filter,
    timeline: &Timeline,
    from_s: i64,
    until_s: i64,
) -> Result<(Profile, Profile), StorageError> {
    let window = storage
        .profile(range_s(from_s, until_s), filter.clone())
        .await?;
    let mut runs: Vec<&Vec<i64>> = timeline.baseline_runs.iter().collect();
    runs.sort_by_key(|run| std::cmp::Reverse(run.len()));
    let mut baseline = Profile::default();
    for run in runs.into_iter().take(MAX_BASELINE_PROFILES) {
        if let (Some(first), Some(last)) = (run.first(), run.last()) {
            let part = storage
                .profile(range_s(*first, last + timeline.step_s), filter.clone())
                .await?;
            if baseline.sample_types.is_empty() {
                baseline = part;
            } else {
                baseline.merge(&part);
            }
        }
    }
    Ok((window, baseline))
}

/// A stored change event as the report lists it, placed relative to the window's start.
fn event_note(event: &ChangeRecord, window_from_s: i64) -> EventNote {
    let offset_s = event.time_unix_ns / NS - window_from_s;
    let when = if offset_s < 0 {
        format!("{} before the window", human_span(-offset_s))
    } else {
        format!("{} into the window", human_span(offset_s))
    };
    let pids = match event.previous_pid {
        Some(previous) => format!("pid {previous} -> {}", event.pid),
        None => format!("pid {}", event.pid),
    };
    EventNote {
        time_unix_ns: event.time_unix_ns,
        kind: event.kind.clone(),
        host: event.host.clone(),
        service: event.service.clone(),
        build_id: (!event.build_id.is_empty()).then(|| event.build_id.clone()),
        previous_build_id: (!event.previous_build_id.is_empty())
            .then(|| event.previous_build_id.clone()),
        detail: format!("{when} ({pids})"),
    }
}

fn detail_only(kind: &str, line: &str) -> Evidence {
    Evidence {
        kind: kind.to_owned(),
        name: line.to_owned(),
        window_ns_per_s: 0.0,
        baseline_ns_per_s: 0.0,
        window_ns_per_event: None,
        baseline_ns_per_event: None,
        details: Vec::new(),
        q_value: None,
        new: false,
    }
}

/// What weakens the answer.
fn weaknesses(
    timeline: &Timeline,
    series: &[SeriesTotals],
    buckets: &CategoryBuckets,
    window: &Profile,
    baseline: &Profile,
) -> Vec<String> {
    let mut out = Vec::new();
    let _ = buckets;
    let hosts_with = |buckets: &mut dyn Iterator<Item = &i64>| -> BTreeSet<String> {
        let wanted: BTreeSet<i64> = buckets.copied().collect();
        series
            .iter()
            .filter(|s| s.points.iter().any(|p| wanted.contains(&p.0)))
            .map(|s| s.host.clone())
            .collect()
    };
    let window_hosts = hosts_with(&mut timeline.window.iter());
    let baseline_hosts = hosts_with(&mut timeline.baseline_runs.iter().flatten());
    for host in baseline_hosts.difference(&window_hosts) {
        out.push(format!(
            "host {host} has data in the baseline but none in the window: its agent may have stopped"
        ));
    }
    if !buckets.has_socket_waits {
        out.push(
            "no socket-wait signal: network time includes servers waiting for requests (enable the network signals)"
                .into(),
        );
    }
    for (name, profile, seconds) in [
        ("window", window, timeline.window_seconds()),
        ("baseline", baseline, timeline.baseline_seconds()),
    ] {
        let lost: u64 = profile
            .meta
            .losses
            .iter()
            .filter(|(r, _)| !r.contains("truncated"))
            .map(|(_, n)| n)
            .sum();
        if lost > 0 && seconds > 0.0 {
            out.push(format!(
                "{lost} events lost in the {name} ({:.1}/s): totals there are low by that much",
                lost as f64 / seconds
            ));
        }
        let total: f64 = profile.samples.iter().map(|s| stacks::amounts(s).0).sum();
        let partial: f64 = profile
            .samples
            .iter()
            .filter(|s| s.labels.contains_key("stack_note"))
            .map(|s| stacks::amounts(s).0)
            .sum();
        if total > 0.0 && partial / total >= 0.05 {
            out.push(format!(
                "{:.0}% of the {name}'s time has incomplete stacks (functions without frame pointers or failed walks): code paths there may be cut short",
                100.0 * partial / total
            ));
        }
    }
    if timeline.baseline_buckets() < 3 * timeline.window.len() {
        out.push(format!(
            "a short baseline ({} buckets against the window's {}): significance is rough",
            timeline.baseline_buckets(),
            timeline.window.len()
        ));
    }
    out
}

fn scope_name(question: &Question) -> String {
    match (&question.service, &question.host) {
        (Some(s), Some(h)) => format!("service {s} on host {h}"),
        (Some(s), None) => format!("service {s}"),
        (None, Some(h)) => format!("host {h}"),
        (None, None) => "every service".to_owned(),
    }
}

fn summary(report: &Report, question: &Question) -> String {
    let Some(top) = report.causes.iter().find(|c| c.rank == Some(1)) else {
        let largest = report
            .causes
            .iter()
            .max_by(|a, b| a.change_ns_per_s.total_cmp(&b.change_ns_per_s));
        return match largest {
            Some(c) if c.change_ns_per_s > 0.0 => format!(
                "inconclusive: nothing changed beyond the baseline's own variation for {} (largest rise: {} +{}/s, q = {:.2})",
                scope_name(question),
                c.category,
                human_ns(c.change_ns_per_s),
                c.q_value
            ),
            _ => format!(
                "inconclusive: no cause of {} rose against the baseline",
                scope_name(question)
            ),
        };
    };
    let mut line = format!(
        "{} explains {:.0}% of the extra wait of {} (+{}/s of wall time",
        top.category,
        100.0 * top.share,
        scope_name(question),
        human_ns(top.change_ns_per_s),
    );
    if let (Some(w), Some(b)) = (top.window_ns_per_event, top.baseline_ns_per_event) {
        let _ = write!(line, "; {} per wait, baseline {}", human_ns(w), human_ns(b));
    }
    line.push(')');
    if let Some(e) = top.evidence.first() {
        let _ = write!(line, ": {} {}", e.kind, e.name);
    }
    if let Some(deploy) = report.events.iter().find(|e| e.kind == "deploy") {
        let _ = write!(
            line,
            "; deploy of build {} {}",
            deploy.build_id.as_deref().unwrap_or("?"),
            deploy.detail
        );
    }
    line
}

fn empty_report(question: &Question, step: i64) -> Report {
    Report {
        window_id: question.window_id.clone(),
        host: question.host.clone().unwrap_or_default(),
        service: question.service.clone().unwrap_or_default(),
        window: Span {
            from_unix_ns: question.window.from_unix_ns,
            until_unix_ns: question.window.until_unix_ns,
        },
        verdict: Verdict::Inconclusive,
        summary: String::new(),
        bucket_s: step,
        window_buckets: 0,
        baseline_buckets: 0,
        baseline: Vec::<BaselinePeriod>::new(),
        causes: Vec::new(),
        idle_window_ns_per_s: 0.0,
        idle_baseline_ns_per_s: 0.0,
        events: Vec::new(),
        weaknesses: Vec::new(),
    }
}

/// `2026-12-06T04:02:41Z` for Unix nanoseconds (whole seconds).
pub fn iso(unix_ns: i64) -> String {
    crate::windows::rfc3339::format(unix_ns - unix_ns.rem_euclid(NS))
}

fn human_span(seconds: i64) -> String {
    if seconds >= 3600 {
        format!("{:.1} h", seconds as f64 / 3600.0)
    } else if seconds >= 60 {
        format!("{} min", seconds / 60)
    } else {
        format!("{seconds} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_796_529_761 * NS), "2026-12-06T04:02:41Z");
    }

    #[test]
    fn buckets_are_multiples_of_the_base_resolution() {
        let settings = Settings::default();
        assert_eq!(settings.step_s(60), 10);
        assert_eq!(settings.step_s(3600), 120);
        let fine = Settings {
            base_resolution_s: 1,
            ..Settings::default()
        };
        assert_eq!(fine.step_s(20), 1);
    }
}
