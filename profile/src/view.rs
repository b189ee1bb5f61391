//! How a sample reads as a flame graph path: label frames at the root, then the stack
//! from outermost to innermost call, then label frames at the leaf.
//!
//! Names are made safe for folded-stack lines here, once, so every writer (folded, SVG,
//! speedscope) shows the same frames.

use crate::model::{Frame, FrameKind, Profile, Sample};

/// Suffix marking kernel frames; flamegraph.pl's and inferno's "java" palette colour
/// frames ending in it as kernel code.
pub const KERNEL_SUFFIX: &str = "_[k]";

/// Name shown for a frame whose function name is empty.
pub const UNKNOWN_FRAME: &str = "[unknown]";

/// Which sample labels become frames, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlameView {
    /// Labels rendered above the stack, outermost first (e.g. signal, then process).
    pub root_labels: Vec<String>,
    /// Labels rendered below the innermost frame (e.g. the thread state).
    pub leaf_labels: Vec<String>,
}

impl Default for FlameView {
    fn default() -> Self {
        Self {
            root_labels: vec!["signal".to_owned(), "process".to_owned()],
            leaf_labels: vec!["state".to_owned()],
        }
    }
}

impl FlameView {
    /// A view with no label frames: just the stacks.
    pub fn stacks_only() -> Self {
        Self {
            root_labels: Vec::new(),
            leaf_labels: Vec::new(),
        }
    }
}

/// The frame names of `sample`, root first: one frame per root label the sample has,
/// the stack from outermost to innermost call, then one frame per leaf label it has.
pub fn flame_frames(profile: &Profile, sample: &Sample, view: &FlameView) -> Vec<String> {
    let label_frames = |keys: &[String]| -> Vec<String> {
        keys.iter()
            .filter_map(|key| {
                sample
                    .labels
                    .get(key)
                    .map(|value| label_frame_name(key, value))
            })
            .collect()
    };
    let mut names = label_frames(&view.root_labels);
    names.reserve(sample.stack.len() + view.leaf_labels.len());
    // Stacks are stored innermost first; flame graphs read from the root.
    let stack: Vec<&Frame> = profile.stack_frames(sample).collect();
    names.extend(stack.iter().rev().map(|frame| frame_name(frame)));
    names.extend(label_frames(&view.leaf_labels));
    names
}

/// The flame graph name of one frame: its function name, made folded-safe, with
/// [`KERNEL_SUFFIX`] for kernel code.
pub fn frame_name(frame: &Frame) -> String {
    let mut name = sanitize(&frame.function);
    if name.is_empty() {
        name.push_str(UNKNOWN_FRAME);
    }
    if frame.kind == FrameKind::Kernel {
        name.push_str(KERNEL_SUFFIX);
    }
    name
}

/// The frame shown for label `key` with `value`: the thread state reads as
/// `[state: D]` so it cannot be mistaken for a function; other labels show their value.
pub fn label_frame_name(key: &str, value: &str) -> String {
    if key == "state" {
        format!("[state: {}]", sanitize(value))
    } else {
        let name = sanitize(value);
        if name.is_empty() {
            format!("[{key}: ]")
        } else {
            name
        }
    }
}

/// Replaces what would break a folded line: `;` separates frames and a newline ends the
/// line.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            ';' => ':',
            '\n' | '\r' => ' ',
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Labels, SampleType};

    fn frame(name: &str, kind: FrameKind) -> Frame {
        Frame {
            function: name.to_owned(),
            module: None,
            file: None,
            line: None,
            address: 0,
            kind,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn sample_renders_root_labels_stack_root_first_then_leaf_labels() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let main = profile.intern(frame("main", FrameKind::User));
        let read = profile.intern(frame("read", FrameKind::User));
        let schedule = profile.intern(frame("schedule", FrameKind::Kernel));
        profile.add(
            vec![schedule, read, main],
            labels(&[
                ("state", "D"),
                ("process", "postgres"),
                ("signal", "io"),
                ("thread", "worker"),
            ]),
            &[5],
        );
        let names = flame_frames(&profile, &profile.samples[0], &FlameView::default());
        assert_eq!(
            names,
            [
                "io",
                "postgres",
                "main",
                "read",
                "schedule_[k]",
                "[state: D]"
            ]
        );
    }

    #[test]
    fn missing_labels_add_no_frames() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let main = profile.intern(frame("main", FrameKind::User));
        profile.add(vec![main], labels(&[("process", "app")]), &[1]);
        let names = flame_frames(&profile, &profile.samples[0], &FlameView::default());
        assert_eq!(names, ["app", "main"]);
        let bare = flame_frames(&profile, &profile.samples[0], &FlameView::stacks_only());
        assert_eq!(bare, ["main"]);
    }

    #[test]
    fn names_are_folded_safe() {
        let generic = frame("drop<[u8; 8]>\nnext", FrameKind::User);
        assert_eq!(frame_name(&generic), "drop<[u8: 8]> next");
        assert_eq!(frame_name(&frame("", FrameKind::Kernel)), "[unknown]_[k]");
        assert_eq!(
            frame_name(&frame("[unsampled short waits]", FrameKind::Synthetic)),
            "[unsampled short waits]"
        );
        assert_eq!(label_frame_name("state", "S;x"), "[state: S:x]");
        assert_eq!(label_frame_name("process", ""), "[process: ]");
    }
}
