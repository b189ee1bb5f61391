//! Folded stacks (Brendan Gregg's format): one `root;...;leaf value` line per distinct
//! stack, as read by flamegraph.pl, inferno and most flame graph tools.

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
};

use crate::{
    error::FormatError,
    model::{Frame, FrameKind, Labels, Profile, SampleType},
    view::{FlameView, KERNEL_SUFFIX, flame_frames},
};

/// Name of the single frame standing for a sample with no frames at all (no stack and
/// none of the view's labels), so its value still shows.
pub const NO_STACK_FRAME: &str = "[no stack]";

/// Root-first frame names with their summed value.
pub type FoldedStack = (Vec<String>, u64);

/// Fails unless `value_index` names one of the profile's sample types. A profile with no
/// sample types has no values at all and renders empty under any index.
pub(crate) fn check_value_index(profile: &Profile, value_index: usize) -> Result<(), FormatError> {
    let available = profile.sample_types.len();
    if available != 0 && value_index >= available {
        return Err(FormatError::NoSuchSampleType {
            index: value_index,
            available,
        });
    }
    Ok(())
}

/// The samples of `profile` as folded stacks for value column `value_index`: samples with
/// identical frame lists merged, stacks whose total is zero or negative left out, sorted
/// by frame list so output is deterministic.
pub fn folded_stacks(
    profile: &Profile,
    value_index: usize,
    view: &FlameView,
) -> Result<Vec<FoldedStack>, FormatError> {
    check_value_index(profile, value_index)?;
    let mut merged: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    for sample in &profile.samples {
        let value = sample.values.get(value_index).copied().unwrap_or(0);
        if value == 0 {
            continue;
        }
        let mut frames = flame_frames(profile, sample, view);
        if frames.is_empty() {
            frames.push(NO_STACK_FRAME.to_owned());
        }
        let total = merged.entry(frames).or_default();
        *total = total.saturating_add(value);
    }
    Ok(merged
        .into_iter()
        .filter_map(|(frames, total)| u64::try_from(total).ok().map(|total| (frames, total)))
        .filter(|(_, total)| *total > 0)
        .collect())
}

/// Writes `profile` as folded stacks for value column `value_index`, one line per
/// distinct frame list (see [`folded_stacks`]).
pub fn write_folded<W: Write>(
    profile: &Profile,
    value_index: usize,
    view: &FlameView,
    mut out: W,
) -> Result<(), FormatError> {
    for (frames, value) in folded_stacks(profile, value_index, view)? {
        writeln!(out, "{} {value}", frames.join(";"))?;
    }
    out.flush()?;
    Ok(())
}

/// Reads folded stacks: each non-empty line is `frame;frame;... value`, the value being
/// the last space-separated token (frame names may contain spaces). Lines starting with
/// `#` are comments.
pub fn parse_folded<R: BufRead>(input: R) -> Result<Vec<FoldedStack>, FormatError> {
    let mut stacks = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let line_number = index + 1;
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        stacks.push(parse_line(line).map_err(|reason| FormatError::Malformed {
            line: line_number,
            reason,
        })?);
    }
    Ok(stacks)
}

fn parse_line(line: &str) -> Result<FoldedStack, String> {
    let Some((stack, value)) = line.rsplit_once(' ') else {
        return Err(format!(
            "expected `frame;frame;... value`, found no value in {line:?}"
        ));
    };
    let value: u64 = value.parse().map_err(|_| {
        format!("the value {value:?} after the last space is not a non-negative integer")
    })?;
    let stack = stack.trim_end();
    if stack.is_empty() {
        return Err("the line has a value but no frames".to_owned());
    }
    let frames: Vec<String> = stack.split(';').map(str::to_owned).collect();
    if frames.iter().any(String::is_empty) {
        return Err(format!(
            "empty frame name in {stack:?} (two `;` in a row, or one at an end)"
        ));
    }
    Ok((frames, value))
}

/// Builds a profile with one value column of `sample_type` from folded stacks, so they
/// can be merged or converted like any other profile. Names ending in `_[k]` become
/// kernel frames (suffix removed), bracketed names such as `[state: D]` synthetic frames,
/// the rest user frames; no labels are recovered, so writing the profile back with
/// [`FlameView::stacks_only`] reproduces the input lines.
pub fn profile_from_folded(lines: &[FoldedStack], sample_type: SampleType) -> Profile {
    let mut profile = Profile::new(vec![sample_type]);
    for (frames, value) in lines {
        let stack = frames
            .iter()
            .rev()
            .map(|name| profile.intern(frame_from_name(name)))
            .collect();
        let value = i64::try_from(*value).unwrap_or(i64::MAX);
        profile.add(stack, Labels::new(), &[value]);
    }
    profile
}

fn frame_from_name(name: &str) -> Frame {
    if let Some(function) = name.strip_suffix(KERNEL_SUFFIX) {
        return Frame {
            kind: FrameKind::Kernel,
            ..Frame::synthetic(function)
        };
    }
    if name.starts_with('[') && name.ends_with(']') {
        return Frame::synthetic(name);
    }
    Frame {
        kind: FrameKind::User,
        ..Frame::synthetic(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_profile() -> Profile {
        let mut profile = Profile::new(vec![
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("waits", "count"),
        ]);
        let main = profile.intern(Frame {
            kind: FrameKind::User,
            ..Frame::synthetic("main")
        });
        let schedule = profile.intern(Frame {
            kind: FrameKind::Kernel,
            ..Frame::synthetic("schedule")
        });
        let state = |s: &str| Labels::from([("state".to_owned(), s.to_owned())]);
        profile.add(vec![schedule, main], state("S"), &[30, 3]);
        profile.add(vec![schedule, main], state("D"), &[20, 0]);
        profile.add(vec![main], Labels::new(), &[0, 1]);
        // A different thread with the same frames merges into the same line.
        let mut thread = state("S");
        thread.insert("thread".to_owned(), "t2".to_owned());
        profile.add(vec![schedule, main], thread, &[5, 1]);
        profile
    }

    fn folded_text(profile: &Profile, value_index: usize, view: &FlameView) -> String {
        let mut out = Vec::new();
        write_folded(profile, value_index, view, &mut out).expect("writes to memory");
        String::from_utf8(out).expect("folded output is UTF-8")
    }

    #[test]
    fn writes_merged_sorted_lines_and_skips_zero_values() {
        let profile = sample_profile();
        let view = FlameView::default();
        assert_eq!(
            folded_text(&profile, 0, &view),
            "main;schedule_[k];[state: D] 20\nmain;schedule_[k];[state: S] 35\n"
        );
        assert_eq!(
            folded_text(&profile, 1, &view),
            "main 1\nmain;schedule_[k];[state: S] 4\n"
        );
        assert_eq!(
            folded_text(&profile, 0, &FlameView::stacks_only()),
            "main;schedule_[k] 55\n"
        );
    }

    #[test]
    fn unknown_sample_type_is_an_error() {
        let err = write_folded(&sample_profile(), 2, &FlameView::default(), Vec::new());
        assert!(matches!(
            err,
            Err(FormatError::NoSuchSampleType {
                index: 2,
                available: 2
            })
        ));
    }

    #[test]
    fn parses_lines_with_spaces_comments_and_blank_lines() {
        let input = "# comment\n\nmain;do work;read 12\n  a;b 0  \n";
        let stacks = parse_folded(input.as_bytes()).expect("test input is valid");
        assert_eq!(
            stacks,
            vec![
                (vec!["main".into(), "do work".into(), "read".into()], 12),
                (vec!["a".into(), "b".into()], 0),
            ]
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let cases = [
            ("a;b 1\nnovalue\n", 2),
            ("a;b 1\n\na;b x\n", 3),
            ("a;b -4\n", 1),
            ("a;;b 1\n", 1),
            (" 5\n", 1),
        ];
        for (input, expected_line) in cases {
            match parse_folded(input.as_bytes()) {
                Err(FormatError::Malformed { line, reason }) => {
                    assert_eq!(line, expected_line, "{input:?}: {reason}");
                }
                other => panic!("{input:?}: expected a malformed-line error, got {other:?}"),
            }
        }
        let message = parse_folded("x y\n".as_bytes())
            .expect_err("value is not a number")
            .to_string();
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn folded_round_trips_through_a_profile() {
        let text = folded_text(&sample_profile(), 0, &FlameView::default());
        let stacks = parse_folded(text.as_bytes()).expect("test input is valid");
        let rebuilt = profile_from_folded(&stacks, SampleType::new("off_cpu", "nanoseconds"));
        assert_eq!(rebuilt.total(0), 55);
        let kernel = rebuilt
            .frames
            .iter()
            .find(|frame| frame.function == "schedule")
            .expect("kernel frame rebuilt");
        assert_eq!(kernel.kind, FrameKind::Kernel);
        assert_eq!(
            folded_text(&rebuilt, 0, &FlameView::stacks_only()),
            text,
            "writing the rebuilt profile reproduces the input"
        );
    }
}
