//! What `top` and `diff` compute from profiles: one time column (every signal's
//! nanoseconds summed, each sample belonging to one signal), functions ranked by total
//! and self time, stacks ranked by time, changes between two profiles, and sparklines.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use stallscope_profile::{FlameView, Profile, view::frame_name};

/// Nanoseconds per time sample type, e.g. `off_cpu` -> total.
pub fn totals_by_kind(profile: &Profile) -> BTreeMap<String, i64> {
    profile
        .sample_types
        .iter()
        .enumerate()
        .filter(|(_, t)| t.unit == "nanoseconds")
        .map(|(i, t)| (t.kind.clone(), profile.total(i)))
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionRow {
    pub function: String,
    /// Time with this function anywhere on the stack (counted once per stack).
    pub total_ns: i64,
    /// Time with this function as the innermost frame.
    pub self_ns: i64,
    pub share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StackRow {
    /// Root first, `;`-separated, with the view's label frames.
    pub stack: String,
    pub value_ns: i64,
    pub share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Top {
    pub total_ns: i64,
    pub by_kind: BTreeMap<String, i64>,
    pub functions: Vec<FunctionRow>,
    pub stacks: Vec<StackRow>,
}

fn share(part: i64, total: i64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

/// Function totals (inclusive, self) of a one-column profile.
pub fn function_times(time: &Profile) -> HashMap<String, (i64, i64)> {
    let mut functions: HashMap<String, (i64, i64)> = HashMap::new();
    for sample in &time.samples {
        let value = sample.values.first().copied().unwrap_or(0);
        let mut seen = HashSet::new();
        for (depth, frame) in time.stack_frames(sample).enumerate() {
            let name = frame_name(frame);
            let entry = functions.entry(name.clone()).or_default();
            if seen.insert(name) {
                entry.0 += value;
            }
            if depth == 0 {
                entry.1 += value;
            }
        }
    }
    functions
}

pub fn top(profile: &Profile, limit: usize) -> Top {
    let time = profile.time_only();
    let total = time.total(0);
    let mut functions: Vec<FunctionRow> = function_times(&time)
        .into_iter()
        .map(|(function, (total_ns, self_ns))| FunctionRow {
            function,
            total_ns,
            self_ns,
            share: share(total_ns, total),
        })
        .collect();
    functions.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then(b.self_ns.cmp(&a.self_ns))
            .then(a.function.cmp(&b.function))
    });
    functions.truncate(limit);
    let view = FlameView {
        root_labels: vec!["signal".to_owned()],
        leaf_labels: vec!["state".to_owned()],
    };
    let mut stacks: Vec<StackRow> = stallscope_profile::folded_stacks(&time, 0, &view)
        .unwrap_or_default()
        .into_iter()
        .map(|(frames, value)| {
            let value_ns = i64::try_from(value).unwrap_or(i64::MAX);
            StackRow {
                stack: frames.join(";"),
                value_ns,
                share: share(value_ns, total),
            }
        })
        .collect();
    stacks.sort_by(|a, b| b.value_ns.cmp(&a.value_ns).then(a.stack.cmp(&b.stack)));
    stacks.truncate(limit);
    Top {
        total_ns: total,
        by_kind: totals_by_kind(profile),
        functions,
        stacks,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub function: String,
    /// Wait time per second of wall time in each range, so ranges of different lengths
    /// compare.
    pub before_ns_per_s: f64,
    pub after_ns_per_s: f64,
    pub delta_ns_per_s: f64,
}

/// Functions whose inclusive time per second changed most between two profiles.
pub fn changes(before: &Profile, after: &Profile, limit: usize) -> Vec<Change> {
    let per_second = |profile: &Profile| {
        let seconds = (profile.meta.duration_ns as f64 / 1e9).max(1e-9);
        function_times(&profile.time_only())
            .into_iter()
            .map(|(name, (total, _))| (name, total as f64 / seconds))
            .collect::<HashMap<String, f64>>()
    };
    let before = per_second(before);
    let after = per_second(after);
    let names: HashSet<&String> = before.keys().chain(after.keys()).collect();
    let mut changes: Vec<Change> = names
        .into_iter()
        .map(|name| {
            let b = before.get(name).copied().unwrap_or(0.0);
            let a = after.get(name).copied().unwrap_or(0.0);
            Change {
                function: name.clone(),
                before_ns_per_s: b,
                after_ns_per_s: a,
                delta_ns_per_s: a - b,
            }
        })
        .filter(|c| c.delta_ns_per_s != 0.0)
        .collect();
    changes.sort_by(|x, y| {
        y.delta_ns_per_s
            .abs()
            .total_cmp(&x.delta_ns_per_s.abs())
            .then(x.function.cmp(&y.function))
    });
    changes.truncate(limit);
    changes
}

/// Human-readable nanoseconds: `1.234s`, `56.7ms`, `890us`, `12ns`.
pub fn human_ns(ns: f64) -> String {
    let magnitude = ns.abs();
    if magnitude >= 1e9 {
        format!("{:.3}s", ns / 1e9)
    } else if magnitude >= 1e6 {
        format!("{:.1}ms", ns / 1e6)
    } else if magnitude >= 1e3 {
        format!("{:.1}us", ns / 1e3)
    } else {
        format!("{ns:.0}ns")
    }
}

/// A sparkline of `values` with block characters, one per value.
pub fn sparkline(values: &[i64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    values
        .iter()
        .map(|&v| {
            if v <= 0 {
                ' '
            } else {
                BARS[((v as f64 / max as f64) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect()
}

/// Shortens a `;`-separated stack for a table: the innermost `keep` frames.
pub fn short_stack(stack: &str, keep: usize) -> String {
    let frames: Vec<&str> = stack.split(';').collect();
    if frames.len() <= keep {
        return frames.join(" <- ");
    }
    let mut inner: Vec<&str> = frames[frames.len() - keep..].to_vec();
    inner.reverse();
    format!("{} <- ... ({} frames)", inner.join(" <- "), frames.len())
}

#[cfg(test)]
mod tests {
    use stallscope_profile::{Frame, Labels, SampleType};

    use super::*;

    fn profile(values: &[(&[&str], i64)], seconds: i64) -> Profile {
        let mut p = Profile::new(vec![
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("off_cpu_events", "count"),
        ]);
        for (stack, value) in values {
            let ids = stack
                .iter()
                .rev()
                .map(|f| p.intern(Frame::synthetic(*f)))
                .collect();
            p.add(ids, Labels::new(), &[*value, 1]);
        }
        p.meta.duration_ns = seconds * 1_000_000_000;
        p
    }

    #[test]
    fn top_ranks_functions_and_stacks() {
        let p = profile(
            &[
                (&["main", "read"], 30),
                (&["main", "write"], 10),
                (&["main", "read", "read"], 5),
            ],
            1,
        );
        let top = top(&p, 10);
        assert_eq!(top.total_ns, 45);
        assert_eq!(top.functions[0].function, "main");
        assert_eq!(top.functions[0].total_ns, 45);
        assert_eq!(top.functions[1].function, "read");
        assert_eq!(
            (top.functions[1].total_ns, top.functions[1].self_ns),
            (35, 35)
        );
        assert_eq!(top.stacks[0].stack, "main;read");
        assert!((top.stacks[0].share - 30.0 / 45.0).abs() < 1e-9);
    }

    #[test]
    fn changes_compare_rates() {
        let before = profile(&[(&["main", "read"], 100)], 10);
        let after = profile(&[(&["main", "read"], 100), (&["main", "lock"], 50)], 5);
        let changes = changes(&before, &after, 10);
        assert_eq!(changes[0].function, "main");
        assert!((changes[0].delta_ns_per_s - 20.0).abs() < 1e-9);
        assert!(
            changes
                .iter()
                .any(|c| c.function == "lock" && (c.after_ns_per_s - 10.0).abs() < 1e-9)
        );
    }

    #[test]
    fn sparklines_and_units() {
        assert_eq!(sparkline(&[0, 1, 7]), " ▂█");
        assert_eq!(human_ns(1_500_000_000.0), "1.500s");
        assert_eq!(human_ns(2_500.0), "2.5us");
        assert_eq!(short_stack("a;b;c;d", 2), "d <- c <- ... (4 frames)");
    }
}
