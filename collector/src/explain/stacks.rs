//! Evidence from stacks: for a cause, the code paths whose time grew most between the
//! baseline and the window (a stack that is new is marked so), the syscalls its waits
//! were in, and builds that appeared. Descriptive, per second of covered time; the
//! bucket-by-bucket significance is the cause's and its objects'.

use std::collections::{BTreeMap, BTreeSet};

use stallscope_profile::{Profile, Sample};

use super::{
    categories::{Category, IDLE_FUTEX_EVIDENCE, is_client_labels, signals},
    frames::{own_path, syscall_of},
    report::Evidence,
};
use crate::storage::signal_matches;

/// Time and events of one sample, whatever its signal: the collector's profiles have a
/// (time, count) column pair per signal and each sample fills only its own.
pub fn amounts(sample: &Sample) -> (f64, f64) {
    sample
        .values
        .chunks(2)
        .find(|pair| pair.iter().any(|v| *v != 0))
        .map_or((0.0, 0.0), |pair| {
            (
                pair.first().copied().unwrap_or(0) as f64,
                pair.get(1).copied().unwrap_or(0) as f64,
            )
        })
}

/// The category a stack sample's time belongs to, if it is request-path time.
pub fn category_of(sample: &Sample) -> Option<Category> {
    let label = |key: &str| sample.labels.get(key).map(String::as_str);
    match label("signal")? {
        signals::ON_CPU => Some(Category::CpuWork),
        signals::OFF_CPU => match Category::from_label(label("cause").unwrap_or("other"))? {
            // Network stacks come from the client socket waits (the off-CPU ones mix in
            // servers waiting for requests).
            Category::Network => None,
            Category::Other if label("evidence") == Some(IDLE_FUTEX_EVIDENCE) => None,
            category => Some(category),
        },
        signals::SOCKET_WAIT if is_client_labels(&sample.labels) => Some(Category::Network),
        _ => None,
    }
}

/// Per category, time per key, summed over a profile.
type Sums = BTreeMap<Category, BTreeMap<String, f64>>;

fn sum_by(profile: &Profile, key: impl Fn(&Profile, &Sample) -> Option<String>) -> Sums {
    let mut out: Sums = BTreeMap::new();
    for sample in &profile.samples {
        let Some(category) = category_of(sample) else {
            continue;
        };
        let Some(k) = key(profile, sample) else {
            continue;
        };
        *out.entry(category).or_default().entry(k).or_default() += amounts(sample).0;
    }
    out
}

/// The profiles a report compares, with the seconds each covers.
pub struct Compared<'a> {
    pub window: &'a Profile,
    pub window_seconds: f64,
    pub baseline: &'a Profile,
    pub baseline_seconds: f64,
}

impl Compared<'_> {
    /// The keys whose time per second grew most for `category`, largest first.
    fn grown(
        &self,
        category: Category,
        kind: &str,
        key: impl Fn(&Profile, &Sample) -> Option<String>,
        limit: usize,
        min_ns_per_s: f64,
    ) -> Vec<Evidence> {
        let window = sum_by(self.window, &key);
        let baseline = sum_by(self.baseline, &key);
        let empty = BTreeMap::new();
        let w = window.get(&category).unwrap_or(&empty);
        let b = baseline.get(&category).unwrap_or(&empty);
        let per_s = |ns: f64, seconds: f64| if seconds > 0.0 { ns / seconds } else { 0.0 };
        let mut rows: Vec<Evidence> = w
            .iter()
            .map(|(name, &ns)| {
                let base = b.get(name).copied().unwrap_or(0.0);
                Evidence {
                    kind: kind.to_owned(),
                    name: name.clone(),
                    window_ns_per_s: per_s(ns, self.window_seconds),
                    baseline_ns_per_s: per_s(base, self.baseline_seconds),
                    window_ns_per_event: None,
                    baseline_ns_per_event: None,
                    details: Vec::new(),
                    q_value: None,
                    new: base <= 0.0,
                }
            })
            .filter(|e| e.change_ns_per_s() >= min_ns_per_s)
            .collect();
        rows.sort_by(|a, b| b.change_ns_per_s().total_cmp(&a.change_ns_per_s()));
        rows.truncate(limit);
        rows
    }

    /// Code paths (the program's own innermost frames, three deep) that grew.
    pub fn grown_stacks(&self, category: Category, min_ns_per_s: f64) -> Vec<Evidence> {
        self.grown(
            category,
            "stack",
            |profile, sample| own_path(profile, sample, 3),
            3,
            min_ns_per_s,
        )
    }

    /// Functions (the program's innermost own frame) whose time grew.
    pub fn grown_functions(&self, category: Category, min_ns_per_s: f64) -> Vec<Evidence> {
        self.grown(
            category,
            "function",
            |profile, sample| own_path(profile, sample, 1),
            3,
            min_ns_per_s,
        )
    }

    /// Syscalls (from kernel frames) whose wait grew.
    pub fn grown_syscalls(&self, category: Category, min_ns_per_s: f64) -> Vec<Evidence> {
        self.grown(category, "syscall", syscall_of, 3, min_ns_per_s)
    }

    /// The waiters' code paths of one lock (its `lock` label), for the lock's details.
    pub fn lock_waiters(&self, address: &str) -> Option<String> {
        let mut by_path: BTreeMap<String, f64> = BTreeMap::new();
        for sample in &self.window.samples {
            if !sample
                .labels
                .get("signal")
                .is_some_and(|signal| signal_matches(signal, signals::LOCK))
                || sample.labels.get("lock").map(String::as_str) != Some(address)
            {
                continue;
            }
            if let Some(path) = own_path(self.window, sample, 2) {
                *by_path.entry(path).or_default() += amounts(sample).0;
            }
        }
        let (path, _) = by_path.into_iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
        Some(format!("waiters in {path}"))
    }

    /// Build-ids the scope ran in the window but not in the baseline (a deploy), with
    /// the ones the baseline ran.
    pub fn new_builds(&self) -> Option<(BTreeSet<String>, BTreeSet<String>)> {
        let builds = |profile: &Profile| -> BTreeSet<String> {
            profile
                .samples
                .iter()
                .filter_map(|s| s.labels.get("build_id").cloned())
                .filter(|b| !b.is_empty())
                .collect()
        };
        let window = builds(self.window);
        let baseline = builds(self.baseline);
        let new: BTreeSet<String> = window.difference(&baseline).cloned().collect();
        (!new.is_empty() && !baseline.is_empty()).then_some((new, baseline))
    }

    /// On-CPU code paths (the innermost own function and two callers) that grew,
    /// counting only samples of `build` in the window: what the new build does more of.
    /// A path, not a leaf: a new call into a helper the old build also ran (a hash, a
    /// copy) grows that helper, and only its callers say which code is new.
    pub fn grown_in_build(&self, build: &str, min_ns_per_s: f64) -> Vec<Evidence> {
        let key = |profile: &Profile, sample: &Sample| {
            (sample.labels.get("build_id").map(String::as_str) == Some(build)
                || !std::ptr::eq(profile, self.window))
            .then(|| own_path(profile, sample, 3))
            .flatten()
        };
        self.grown(Category::CpuWork, "function", key, 3, min_ns_per_s)
    }
}

#[cfg(test)]
mod tests {
    use stallscope_profile::{Frame, FrameKind, Labels, SampleType};

    use super::*;

    /// (function, labels, nanoseconds) of one sample.
    type Spec<'a> = (&'a str, &'a [(&'a str, &'a str)], i64);

    fn profile(samples: &[Spec<'_>]) -> Profile {
        let mut profile = Profile::new(vec![
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("off_cpu_events", "count"),
            SampleType::new("on_cpu", "nanoseconds"),
            SampleType::new("on_cpu_samples", "count"),
        ]);
        for (function, labels, ns) in samples {
            let frame = profile.intern(Frame {
                function: (*function).into(),
                module: Some("/app/demo".into()),
                file: None,
                line: None,
                address: 0,
                kind: FrameKind::User,
            });
            let labels: Labels = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let values = if labels.get("signal").map(String::as_str) == Some("on-cpu") {
                [0, 0, *ns, 1]
            } else {
                [*ns, 1, 0, 0]
            };
            profile.add(vec![frame], labels, &values);
        }
        profile
    }

    #[test]
    fn the_new_build_and_what_it_does_more_of() {
        let old: &[(&str, &str)] = &[("signal", "on-cpu"), ("build_id", "aa")];
        let new: &[(&str, &str)] = &[("signal", "on-cpu"), ("build_id", "bb")];
        let baseline = profile(&[("render", old, 100), ("parse", old, 100)]);
        let window = profile(&[("render", new, 900), ("parse", new, 100)]);
        let compared = Compared {
            window: &window,
            window_seconds: 1.0,
            baseline: &baseline,
            baseline_seconds: 1.0,
        };
        let (new_builds, old_builds) = compared.new_builds().expect("a new build");
        assert!(new_builds.contains("bb") && old_builds.contains("aa"));
        let grown = compared.grown_in_build("bb", 1.0);
        assert_eq!(grown[0].name, "render");
        assert!((grown[0].change_ns_per_s() - 800.0).abs() < 1e-9);
        assert_eq!(grown.len(), 1);
    }

    #[test]
    fn grown_stacks_per_second_and_new_ones_marked() {
        let lock: &[(&str, &str)] = &[("signal", "off-cpu"), ("cause", "lock")];
        let idle: &[(&str, &str)] = &[
            ("signal", "off-cpu"),
            ("cause", "other"),
            ("evidence", IDLE_FUTEX_EVIDENCE),
        ];
        let baseline = profile(&[("reserve", lock, 100), ("park", idle, 1000)]);
        let window = profile(&[
            ("reserve", lock, 400),
            ("compact", lock, 300),
            ("park", idle, 10),
        ]);
        let compared = Compared {
            window: &window,
            window_seconds: 1.0,
            baseline: &baseline,
            baseline_seconds: 2.0,
        };
        let grown = compared.grown_stacks(Category::Lock, 1.0);
        assert_eq!(grown[0].name, "reserve");
        assert!((grown[0].change_ns_per_s() - 350.0).abs() < 1e-9);
        assert_eq!(grown[1].name, "compact");
        assert!(grown[1].new);
        assert!(compared.grown_stacks(Category::Other, 1.0).is_empty());
    }
}
