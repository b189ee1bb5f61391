//! pprof message → Profile: resolves string indices and ids, refusing dangling ones
//! instead of guessing.

use std::collections::HashMap;

use super::{
    BINARY_COMMENT_PREFIX, EVENT_COMMENT_PREFIX, HISTOGRAM_COMMENT_PREFIX, HOST_COMMENT_PREFIX,
    KERNEL_MAPPING, LOSS_COMMENT_PREFIX, proto,
};
use crate::{
    error::FormatError,
    model::{Frame, FrameId, FrameKind, Histogram, Labels, Meta, Profile, SampleType},
};

fn invalid(reason: impl Into<String>) -> FormatError {
    FormatError::InvalidPprof(reason.into())
}

/// Looks strings up by index, as every pprof message refers to them.
struct Strings<'a>(&'a [String]);

impl<'a> Strings<'a> {
    fn new(table: &'a [String]) -> Result<Self, FormatError> {
        match table.first() {
            Some(first) if !first.is_empty() => {
                Err(invalid("string_table[0] must be the empty string"))
            }
            _ => Ok(Self(table)),
        }
    }

    fn get(&self, index: i64, what: &str) -> Result<&'a str, FormatError> {
        if index == 0 {
            return Ok("");
        }
        usize::try_from(index)
            .ok()
            .and_then(|index| self.0.get(index))
            .map(String::as_str)
            .ok_or_else(|| {
                invalid(format!(
                    "{what} refers to string {index}, but the string table has {} entries",
                    self.0.len()
                ))
            })
    }
}

/// How many stack frames the samples of a message may expand to, per byte of encoded
/// message. Locations with many (inlined) lines referenced by many samples multiply; a
/// real profile stays far below this, a crafted one would exhaust memory.
const FRAMES_PER_INPUT_BYTE: usize = 64;

/// Rebuilds a profile from a decoded pprof message that was `encoded_len` bytes long.
pub(super) fn from_message(
    message: &proto::Profile,
    encoded_len: usize,
) -> Result<Profile, FormatError> {
    let strings = Strings::new(&message.string_table)?;
    let sample_types = message
        .sample_type
        .iter()
        .map(|value_type| {
            Ok(SampleType::new(
                strings.get(value_type.r#type, "sample_type.type")?,
                strings.get(value_type.unit, "sample_type.unit")?,
            ))
        })
        .collect::<Result<Vec<_>, FormatError>>()?;
    let mut profile = Profile::new(sample_types);

    let mappings: HashMap<u64, &proto::Mapping> = message
        .mapping
        .iter()
        .map(|mapping| (mapping.id, mapping))
        .collect();
    let functions: HashMap<u64, &proto::Function> = message
        .function
        .iter()
        .map(|function| (function.id, function))
        .collect();

    let mut locations: HashMap<u64, Vec<FrameId>> = HashMap::with_capacity(message.location.len());
    for location in &message.location {
        let frames = location_frames(location, &mappings, &functions, &strings)?;
        let ids = frames
            .into_iter()
            .map(|frame| profile.intern(frame))
            .collect();
        locations.insert(location.id, ids);
    }

    let type_count = profile.sample_types.len();
    let frame_budget = encoded_len
        .saturating_mul(FRAMES_PER_INPUT_BYTE)
        .max(1 << 16);
    let mut frames_used = 0_usize;
    for (index, sample) in message.sample.iter().enumerate() {
        if sample.value.len() != type_count {
            return Err(invalid(format!(
                "sample {index} has {} values but the profile has {type_count} sample types",
                sample.value.len()
            )));
        }
        let mut stack = Vec::with_capacity(sample.location_id.len());
        for location_id in &sample.location_id {
            let frames = locations.get(location_id).ok_or_else(|| {
                invalid(format!(
                    "sample {index} refers to location {location_id}, which does not exist"
                ))
            })?;
            frames_used = frames_used.saturating_add(frames.len());
            if frames_used > frame_budget {
                return Err(invalid(format!(
                    "samples expand to more than {frame_budget} stack frames for a \
                     {encoded_len}-byte message; refusing it as malformed"
                )));
            }
            stack.extend_from_slice(frames);
        }
        let labels = sample_labels(&sample.label, &strings)?;
        profile.add(stack, labels, &sample.value);
    }

    profile.meta = meta(message, &strings, &profile.sample_types)?;
    // Histogram comments came back as notes: move them to the profile's histograms.
    let notes = std::mem::take(&mut profile.meta.notes);
    // So did change events and binaries.
    for note in notes {
        if let Some(histogram) = note
            .strip_prefix(HISTOGRAM_COMMENT_PREFIX)
            .and_then(|json| serde_json::from_str::<Histogram>(json).ok())
        {
            profile.histograms.push(histogram);
        } else if let Some(event) = note
            .strip_prefix(EVENT_COMMENT_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
        {
            profile.meta.events.push(event);
        } else if let Some(binary) = note
            .strip_prefix(BINARY_COMMENT_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
        {
            profile.meta.binaries.push(binary);
        } else {
            profile.meta.notes.push(note);
        }
    }
    Ok(profile)
}

/// The frames of one location, innermost first: one per line, since inlined callees come
/// before their callers; a location without lines becomes its hex address.
fn location_frames(
    location: &proto::Location,
    mappings: &HashMap<u64, &proto::Mapping>,
    functions: &HashMap<u64, &proto::Function>,
    strings: &Strings<'_>,
) -> Result<Vec<Frame>, FormatError> {
    let (kind, module) = if location.mapping_id == 0 {
        (FrameKind::Synthetic, None)
    } else {
        let mapping = mappings.get(&location.mapping_id).ok_or_else(|| {
            invalid(format!(
                "location {} refers to mapping {}, which does not exist",
                location.id, location.mapping_id
            ))
        })?;
        match strings.get(mapping.filename, "mapping.filename")? {
            KERNEL_MAPPING => (FrameKind::Kernel, None),
            "" => (FrameKind::User, None),
            filename => (FrameKind::User, Some(filename.to_owned())),
        }
    };
    if location.line.is_empty() {
        return Ok(vec![Frame {
            function: format!("{:#x}", location.address),
            module,
            file: None,
            line: None,
            address: location.address,
            kind,
        }]);
    }
    location
        .line
        .iter()
        .map(|line| {
            let function = functions.get(&line.function_id).ok_or_else(|| {
                invalid(format!(
                    "location {} refers to function {}, which does not exist",
                    location.id, line.function_id
                ))
            })?;
            let file = strings.get(function.filename, "function.filename")?;
            Ok(Frame {
                function: strings.get(function.name, "function.name")?.to_owned(),
                module: module.clone(),
                file: (!file.is_empty()).then(|| file.to_owned()),
                line: u32::try_from(line.line).ok().filter(|&line| line != 0),
                address: location.address,
                kind,
            })
        })
        .collect()
}

/// String labels as they are; numeric labels as their number, followed by the unit when
/// one is given.
fn sample_labels(labels: &[proto::Label], strings: &Strings<'_>) -> Result<Labels, FormatError> {
    labels
        .iter()
        .map(|label| {
            let key = strings.get(label.key, "label.key")?.to_owned();
            let value = if label.str != 0 {
                strings.get(label.str, "label.str")?.to_owned()
            } else if label.num_unit != 0 {
                format!(
                    "{} {}",
                    label.num,
                    strings.get(label.num_unit, "label.num_unit")?
                )
            } else if label.num != 0 {
                label.num.to_string()
            } else {
                String::new()
            };
            Ok((key, value))
        })
        .collect()
}

/// Times from the header fields; host, losses and notes from the comments.
fn meta(
    message: &proto::Profile,
    strings: &Strings<'_>,
    sample_types: &[SampleType],
) -> Result<Meta, FormatError> {
    let mut meta = Meta {
        start_unix_ns: message.time_nanos,
        duration_ns: message.duration_nanos,
        ..Meta::default()
    };
    for &index in &message.comment {
        let comment = strings.get(index, "comment")?;
        if let Some(host) = comment.strip_prefix(HOST_COMMENT_PREFIX) {
            host.clone_into(&mut meta.host);
            continue;
        }
        let loss = comment
            .strip_prefix(LOSS_COMMENT_PREFIX)
            .and_then(|loss| loss.rsplit_once('='))
            .and_then(|(reason, count)| Some((reason, count.parse::<u64>().ok()?)));
        match loss {
            Some((reason, count)) => {
                let total = meta.losses.entry(reason.to_owned()).or_default();
                *total = total.saturating_add(count);
            }
            None => meta.notes.push(comment.to_owned()),
        }
    }
    // pprof's rule: without a default, viewers show the last sample type.
    let default_kind = strings.get(message.default_sample_type, "default_sample_type")?;
    meta.default_sample_type = if message.default_sample_type == 0 {
        sample_types.len().saturating_sub(1)
    } else {
        sample_types
            .iter()
            .position(|sample_type| sample_type.kind == default_kind)
            .unwrap_or_else(|| sample_types.len().saturating_sub(1))
    };
    Ok(meta)
}
