//! Interactive flame graph SVGs, rendered by inferno from the folded stacks.

use std::io::{self, Write};

use inferno::flamegraph::{
    self,
    color::{MultiPalette, Palette},
};

use crate::{error::FormatError, folded::folded_stacks, model::Profile, view::FlameView};

/// The single frame drawn for a profile without samples: inferno refuses empty input,
/// and an empty file would not tell the reader why nothing is there.
pub const NO_SAMPLES_FRAME: &str = "[no samples]";

/// Renders `profile`'s value column `value_index` as a flame graph SVG titled `title`.
/// Kernel frames (`_[k]`) get the kernel colours of inferno's "java" palette, which
/// shows them without the suffix.
pub fn write_svg<W: Write>(
    profile: &Profile,
    value_index: usize,
    view: &FlameView,
    title: &str,
    mut out: W,
) -> Result<(), FormatError> {
    let stacks = folded_stacks(profile, value_index, view)?;
    let mut lines: Vec<String> = stacks
        .iter()
        .map(|(frames, value)| format!("{} {value}", frames.join(";")))
        .collect();
    let mut options = flamegraph::Options::default();
    if lines.is_empty() {
        lines.push(format!("{NO_SAMPLES_FRAME} 1"));
        options.subtitle = Some("The profile has no samples with this value.".to_owned());
    }
    title.clone_into(&mut options.title);
    options.count_name = profile.sample_types.get(value_index).map_or_else(
        || "samples".to_owned(),
        |sample_type| short_unit(&sample_type.unit),
    );
    options.colors = Palette::Multi(MultiPalette::Java);
    // Colour by name, not at random, so the same frame looks the same in every graph and
    // the output is reproducible.
    options.hash = true;
    options.deterministic = true;

    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut out).map_err(
        |err| match err.kind() {
            io::ErrorKind::InvalidData => FormatError::Render(err.to_string()),
            _ => FormatError::Io(err),
        },
    )?;
    out.flush()?;
    Ok(())
}

/// The unit as the graph's tooltips show it after each count ("1,234 ns").
fn short_unit(unit: &str) -> String {
    match unit {
        "nanoseconds" => "ns",
        "microseconds" => "us",
        "milliseconds" => "ms",
        "seconds" => "s",
        other => other,
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frame, FrameKind, Labels, SampleType};

    fn render(profile: &Profile) -> String {
        let mut out = Vec::new();
        write_svg(profile, 0, &FlameView::default(), "off-CPU time", &mut out)
            .expect("renders to memory");
        String::from_utf8(out).expect("SVG is UTF-8")
    }

    #[test]
    fn renders_frames_titles_and_units() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let main = profile.intern(Frame::synthetic("main"));
        let schedule = profile.intern(Frame {
            kind: FrameKind::Kernel,
            ..Frame::synthetic("schedule")
        });
        profile.add(vec![schedule, main], Labels::new(), &[1_000]);
        let svg = render(&profile);
        assert!(svg.starts_with("<?xml"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        // inferno colours `_[k]` frames as kernel code and drops the suffix from the label.
        assert!(svg.contains("<title>schedule (1,000 ns, 100.00%)</title>"));
        assert!(svg.contains("off-CPU time"));
    }

    #[test]
    fn empty_profile_still_renders() {
        let svg = render(&Profile::new(vec![SampleType::new(
            "off_cpu",
            "nanoseconds",
        )]));
        assert!(svg.contains(NO_SAMPLES_FRAME));
        assert!(svg.trim_end().ends_with("</svg>"));
        let svg = render(&Profile::default());
        assert!(svg.contains(NO_SAMPLES_FRAME));
    }
}
