//! speedscope's JSON file format (<https://www.speedscope.app/file-format-schema.json>):
//! one "sampled" profile whose stacks are the folded stacks of one value column.

use std::{collections::HashMap, io::Write};

use serde::Serialize;

use crate::{error::FormatError, folded::folded_stacks, model::Profile, view::FlameView};

/// The schema URL speedscope recognises its files by.
pub const SPEEDSCOPE_SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct File<'a> {
    #[serde(rename = "$schema")]
    schema: &'static str,
    shared: Shared,
    profiles: [SampledProfile<'a>; 1],
    name: &'a str,
    active_profile_index: usize,
    exporter: &'static str,
}

#[derive(Serialize)]
struct Shared {
    frames: Vec<SharedFrame>,
}

#[derive(Serialize)]
struct SharedFrame {
    name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SampledProfile<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    unit: &'static str,
    start_value: u64,
    end_value: u64,
    /// Frame indices per stack, root first.
    samples: Vec<Vec<usize>>,
    weights: Vec<u64>,
}

/// Writes `profile`'s value column `value_index` as a speedscope file named `name`.
pub fn write_speedscope<W: Write>(
    profile: &Profile,
    value_index: usize,
    view: &FlameView,
    name: &str,
    mut out: W,
) -> Result<(), FormatError> {
    let stacks = folded_stacks(profile, value_index, view)?;
    let mut frames = Vec::new();
    let mut frame_index: HashMap<String, usize> = HashMap::new();
    let mut samples = Vec::with_capacity(stacks.len());
    let mut weights = Vec::with_capacity(stacks.len());
    for (stack, weight) in stacks {
        let indices = stack
            .into_iter()
            .map(|frame| {
                *frame_index.entry(frame).or_insert_with_key(|frame| {
                    frames.push(SharedFrame {
                        name: frame.clone(),
                    });
                    frames.len() - 1
                })
            })
            .collect();
        samples.push(indices);
        weights.push(weight);
    }
    let total = weights.iter().fold(0_u64, |sum, &w| sum.saturating_add(w));
    let unit = profile
        .sample_types
        .get(value_index)
        .map_or("none", |sample_type| speedscope_unit(&sample_type.unit));

    let file = File {
        schema: SPEEDSCOPE_SCHEMA,
        shared: Shared { frames },
        profiles: [SampledProfile {
            kind: "sampled",
            name,
            unit,
            start_value: 0,
            end_value: total,
            samples,
            weights,
        }],
        name,
        active_profile_index: 0,
        exporter: concat!("stallscope ", env!("CARGO_PKG_VERSION")),
    };
    serde_json::to_writer(&mut out, &file)?;
    out.flush()?;
    Ok(())
}

/// speedscope's name for `unit`, or "none" for units it does not know (counts, events).
fn speedscope_unit(unit: &str) -> &'static str {
    match unit {
        "nanoseconds" => "nanoseconds",
        "microseconds" => "microseconds",
        "milliseconds" => "milliseconds",
        "seconds" => "seconds",
        "bytes" => "bytes",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::model::{Frame, FrameKind, Labels, SampleType};

    fn write(profile: &Profile, value_index: usize) -> Value {
        let mut out = Vec::new();
        write_speedscope(profile, value_index, &FlameView::default(), "db1", &mut out)
            .expect("writes to memory");
        serde_json::from_slice(&out).expect("output is JSON")
    }

    #[test]
    fn writes_shared_frames_root_first_samples_and_weights() {
        let mut profile = Profile::new(vec![
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("waits", "count"),
        ]);
        let main = profile.intern(Frame::synthetic("main"));
        let schedule = profile.intern(Frame {
            kind: FrameKind::Kernel,
            ..Frame::synthetic("schedule")
        });
        let state = |s: &str| Labels::from([("state".to_owned(), s.to_owned())]);
        profile.add(vec![schedule, main], state("S"), &[300, 2]);
        profile.add(vec![schedule, main], state("D"), &[45, 1]);
        profile.add(vec![main], Labels::new(), &[0, 4]);

        let json = write(&profile, 0);
        assert_eq!(json["$schema"], SPEEDSCOPE_SCHEMA);
        let sampled = &json["profiles"][0];
        assert_eq!(sampled["type"], "sampled");
        assert_eq!(sampled["unit"], "nanoseconds");
        assert_eq!(sampled["endValue"], 345);
        let weights: Vec<u64> = sampled["weights"]
            .as_array()
            .expect("weights")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert_eq!(weights.iter().sum::<u64>(), 345);

        let frames = json["shared"]["frames"].as_array().expect("frames");
        let name = |index: &Value| {
            let index = usize::try_from(index.as_u64().expect("index")).expect("fits");
            frames[index]["name"].as_str().expect("name").to_owned()
        };
        let first: Vec<String> = sampled["samples"][0]
            .as_array()
            .expect("stack")
            .iter()
            .map(name)
            .collect();
        assert_eq!(first, ["main", "schedule_[k]", "[state: D]"]);
        assert_eq!(frames.len(), 4, "frames are shared between stacks");

        let counts = write(&profile, 1);
        assert_eq!(counts["profiles"][0]["unit"], "none");
        assert_eq!(counts["profiles"][0]["endValue"], 7);
    }

    #[test]
    fn empty_profile_is_valid() {
        let json = write(
            &Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]),
            0,
        );
        assert_eq!(
            json["profiles"][0]["samples"].as_array().map(Vec::len),
            Some(0)
        );
        assert_eq!(json["profiles"][0]["endValue"], 0);
    }
}
