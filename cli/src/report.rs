//! What `top` and `diff` compute from profiles: one time column (every signal's
//! nanoseconds summed, each sample belonging to one signal), functions ranked by total
//! and self time (without the entry and scheduler frames every stack shares), waits
//! grouped by what tells them apart (process, signal and cause, the program's own frames
//! nearest the wait), changes between two profiles, and sparklines.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use stallscope_profile::{Frame, Profile, view::frame_name};

use crate::frames::{is_plumbing, telling_frames};

/// Own-code frames shown per row of `top`.
pub const FRAMES_PER_ROW: usize = 3;

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

/// Waits that look alike to a person: one process, signal and cause, and the same own
/// frames nearest the wait.
#[derive(Debug, Clone, Serialize)]
pub struct StackRow {
    pub process: String,
    pub signal: String,
    /// Empty for signals without a cause label.
    pub cause: String,
    /// The program's own frames nearest the wait, innermost first (else other user
    /// frames, else kernel frames).
    pub frames: Vec<String>,
    /// The function those frames called into (a library's or the kernel's), if any.
    pub calling: Option<String>,
    /// The heaviest whole stack of the group, root first, `;`-separated.
    pub example_stack: String,
    pub value_ns: i64,
    pub share: f64,
}

impl StackRow {
    /// `signal/cause`, or the signal alone.
    pub fn kind(&self) -> String {
        if self.cause.is_empty() {
            self.signal.clone()
        } else {
            format!("{}/{}", self.signal, self.cause)
        }
    }

    /// The frames for a table: `inner <- outer  [in callee]`.
    pub fn code(&self) -> String {
        let mut text = self.frames.join(" <- ");
        if let Some(calling) = &self.calling {
            text.push_str("  [in ");
            text.push_str(calling);
            text.push(']');
        }
        text
    }
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

/// Function totals (inclusive, self) of a one-column profile, leaving out the entry and
/// scheduler frames every stack shares ([`is_plumbing`]).
pub fn function_times(time: &Profile) -> HashMap<String, (i64, i64)> {
    let mut functions: HashMap<String, (i64, i64)> = HashMap::new();
    for sample in &time.samples {
        let value = sample.values.first().copied().unwrap_or(0);
        let mut seen = HashSet::new();
        let mut innermost = true;
        for frame in time.stack_frames(sample) {
            if is_plumbing(frame) {
                continue;
            }
            let name = frame_name(frame);
            let entry = functions.entry(name.clone()).or_default();
            if seen.insert(name) {
                entry.0 += value;
            }
            if innermost {
                entry.1 += value;
                innermost = false;
            }
        }
    }
    functions
}

fn label<'a>(labels: &'a stallscope_profile::Labels, key: &str) -> &'a str {
    labels.get(key).map_or("", String::as_str)
}

/// Waits grouped by [`StackRow`]'s key, heaviest first.
fn stack_rows(time: &Profile, total: i64) -> Vec<StackRow> {
    type Key = (String, String, String, Vec<String>, Option<String>);
    let mut groups: HashMap<Key, (i64, i64, String)> = HashMap::new();
    for sample in &time.samples {
        let value = sample.values.first().copied().unwrap_or(0);
        let stack: Vec<&Frame> = time.stack_frames(sample).collect();
        let (frames, calling) = telling_frames(&stack, FRAMES_PER_ROW);
        let key: Key = (
            label(&sample.labels, "process").to_owned(),
            label(&sample.labels, "signal").to_owned(),
            label(&sample.labels, "cause").to_owned(),
            frames.iter().map(|f| frame_name(f)).collect(),
            calling.map(frame_name),
        );
        let group = groups.entry(key).or_insert((0, i64::MIN, String::new()));
        group.0 += value;
        if value > group.1 {
            group.1 = value;
            group.2 = stack
                .iter()
                .rev()
                .map(|f| frame_name(f))
                .collect::<Vec<_>>()
                .join(";");
        }
    }
    let mut rows: Vec<StackRow> = groups
        .into_iter()
        .map(
            |((process, signal, cause, frames, calling), (value_ns, _, example_stack))| StackRow {
                process,
                signal,
                cause,
                frames,
                calling,
                example_stack,
                value_ns,
                share: share(value_ns, total),
            },
        )
        .collect();
    rows.sort_by(|a, b| {
        b.value_ns
            .cmp(&a.value_ns)
            .then_with(|| a.example_stack.cmp(&b.example_stack))
    });
    rows
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
    let mut stacks = stack_rows(&time, total);
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

/// Functions whose inclusive time per second changed most between two profiles, each
/// side's time divided by the seconds it covers (time with data, not the range asked
/// for: a range half without data would otherwise read as a halving).
pub fn changes(
    before: &Profile,
    before_seconds: f64,
    after: &Profile,
    after_seconds: f64,
    limit: usize,
) -> Vec<Change> {
    let per_second = |profile: &Profile, seconds: f64| {
        let seconds = seconds.max(1e-9);
        function_times(&profile.time_only())
            .into_iter()
            .map(|(name, (total, _))| (name, total as f64 / seconds))
            .collect::<HashMap<String, f64>>()
    };
    let before = per_second(before, before_seconds);
    let after = per_second(after, after_seconds);
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

/// A sparkline with block characters, one per mark: the height is the mark's value
/// against the largest; a mark without data (`None`) is blank.
pub fn sparkline(values: &[Option<f64>]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().flatten().copied().fold(0.0_f64, f64::max);
    values
        .iter()
        .map(|value| match value {
            None => ' ',
            Some(v) if max <= 0.0 || *v <= 0.0 => BARS[0],
            Some(v) => BARS[((v / max) * 7.0).round().clamp(0.0, 7.0) as usize],
        })
        .collect()
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
        assert_eq!(top.stacks[0].frames, ["read", "main"]);
        assert_eq!(top.stacks[0].example_stack, "main;read");
        assert!((top.stacks[0].share - 30.0 / 45.0).abs() < 1e-9);
    }

    #[test]
    fn changes_compare_rates() {
        let before = profile(&[(&["main", "read"], 100)], 10);
        let after = profile(&[(&["main", "read"], 100), (&["main", "lock"], 50)], 5);
        let changes = changes(&before, 10.0, &after, 5.0, 10);
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
        assert_eq!(sparkline(&[None, Some(0.0), Some(1.0), Some(7.0)]), " ▁▂█");
        assert_eq!(human_ns(1_500_000_000.0), "1.500s");
        assert_eq!(human_ns(2_500.0), "2.5us");
    }
}
