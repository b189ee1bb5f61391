//! Profile → pprof message: interns strings, functions and mappings, one location per
//! frame.

use std::collections::HashMap;

use super::{
    BINARY_COMMENT_PREFIX, EVENT_COMMENT_PREFIX, HISTOGRAM_COMMENT_PREFIX, HOST_COMMENT_PREFIX,
    KERNEL_MAPPING, LOSS_COMMENT_PREFIX, proto,
};
use crate::model::{Frame, FrameKind, Profile};

/// pprof's string table: every string once, `""` at index 0.
#[derive(Default)]
struct StringTable {
    strings: Vec<String>,
    index: HashMap<String, i64>,
}

impl StringTable {
    fn new() -> Self {
        let mut table = Self::default();
        table.intern("");
        table
    }

    fn intern(&mut self, value: &str) -> i64 {
        if let Some(&index) = self.index.get(value) {
            return index;
        }
        let index = self.strings.len() as i64;
        self.strings.push(value.to_owned());
        self.index.insert(value.to_owned(), index);
        index
    }
}

/// Which mapping a frame belongs to: the kernel, or a user binary by file name (the
/// empty name for user code whose binary is unknown). Synthetic frames have none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum MappingKey {
    Kernel,
    User(String),
}

impl MappingKey {
    fn of(frame: &Frame) -> Option<Self> {
        match frame.kind {
            FrameKind::Kernel => Some(Self::Kernel),
            FrameKind::User => Some(Self::User(frame.module.clone().unwrap_or_default())),
            FrameKind::Synthetic => None,
        }
    }
}

/// Builds the tables of the message as frames are added.
struct Builder {
    strings: StringTable,
    mappings: Vec<proto::Mapping>,
    mapping_ids: HashMap<MappingKey, u64>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(String, Option<String>), u64>,
    /// Build-ids of user binaries by path, from the profile's binaries table.
    build_ids: HashMap<String, String>,
}

impl Builder {
    fn mapping_id(&mut self, frame: &Frame) -> u64 {
        let Some(key) = MappingKey::of(frame) else {
            return 0;
        };
        let id = if let Some(&id) = self.mapping_ids.get(&key) {
            id
        } else {
            let filename = match &key {
                MappingKey::Kernel => KERNEL_MAPPING,
                MappingKey::User(module) => module.as_str(),
            };
            let build_id = match &key {
                MappingKey::User(module) => self.build_ids.get(module).cloned(),
                MappingKey::Kernel => None,
            };
            let build_id = build_id.map_or(0, |id| self.strings.intern(&id));
            let filename = self.strings.intern(filename);
            let id = self.mappings.len() as u64 + 1;
            self.mappings.push(proto::Mapping {
                id,
                memory_start: frame.address,
                memory_limit: frame.address.saturating_add(1),
                file_offset: frame.address,
                filename,
                build_id,
                // Frames arrive symbolized; this keeps pprof from trying again.
                has_functions: true,
                ..Default::default()
            });
            self.mapping_ids.insert(key, id);
            id
        };
        if let Some(mapping) = self.mappings.get_mut((id - 1) as usize) {
            // Cover every address of the mapping, and keep address == file offset so
            // pprof's address-to-offset arithmetic is the identity.
            mapping.memory_start = mapping.memory_start.min(frame.address);
            mapping.file_offset = mapping.memory_start;
            mapping.memory_limit = mapping.memory_limit.max(frame.address.saturating_add(1));
            mapping.has_filenames |= frame.file.is_some();
            mapping.has_line_numbers |= frame.line.is_some();
        }
        id
    }

    fn function_id(&mut self, frame: &Frame) -> u64 {
        let key = (frame.function.clone(), frame.file.clone());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let name = self.strings.intern(&frame.function);
        let filename = self
            .strings
            .intern(frame.file.as_deref().unwrap_or_default());
        let id = self.functions.len() as u64 + 1;
        self.functions.push(proto::Function {
            id,
            name,
            // Names arrive demangled. pprof demangles, and "simplifies" by deleting every
            // `<...>` and `(...)` group, each function whose system name equals its name
            // (`<std::sys::thread::unix::Thread>::new::thread_start` would read
            // `::new::thread_start`); a function whose system name differs counts as
            // demangled already and keeps its whole name. We keep no mangled name, so the
            // system name stays empty and the whole name is in `name`.
            system_name: 0,
            filename,
            start_line: 0,
        });
        self.function_ids.insert(key, id);
        id
    }
}

/// The pprof message for `profile`, uncompressed. Location ids are frame ids plus one
/// (pprof ids are nonzero).
pub(super) fn to_message(profile: &Profile) -> proto::Profile {
    let mut builder = Builder {
        strings: StringTable::new(),
        mappings: Vec::new(),
        mapping_ids: HashMap::new(),
        functions: Vec::new(),
        function_ids: HashMap::new(),
        build_ids: profile
            .meta
            .binaries
            .iter()
            .filter_map(|binary| Some((binary.path.clone(), binary.build_id.clone()?)))
            .collect(),
    };

    let sample_type = profile
        .sample_types
        .iter()
        .map(|sample_type| proto::ValueType {
            r#type: builder.strings.intern(&sample_type.kind),
            unit: builder.strings.intern(&sample_type.unit),
        })
        .collect();

    let location = profile
        .frames
        .iter()
        .enumerate()
        .map(|(index, frame)| proto::Location {
            id: index as u64 + 1,
            mapping_id: builder.mapping_id(frame),
            address: frame.address,
            line: vec![proto::Line {
                function_id: builder.function_id(frame),
                line: frame.line.map_or(0, i64::from),
                column: 0,
            }],
            is_folded: false,
        })
        .collect();

    let frame_count = profile.frames.len();
    let sample = profile
        .samples
        .iter()
        .map(|sample| {
            let mut value = sample.values.clone();
            value.resize(profile.sample_types.len(), 0);
            proto::Sample {
                location_id: sample
                    .stack
                    .iter()
                    .filter(|&&id| (id as usize) < frame_count)
                    .map(|&id| u64::from(id) + 1)
                    .collect(),
                value,
                label: sample
                    .labels
                    .iter()
                    .map(|(key, value)| proto::Label {
                        key: builder.strings.intern(key),
                        str: builder.strings.intern(value),
                        num: 0,
                        num_unit: 0,
                    })
                    .collect(),
            }
        })
        .collect();

    let meta = &profile.meta;
    let mut comment: Vec<i64> = meta
        .notes
        .iter()
        .map(|note| builder.strings.intern(note))
        .collect();
    if !meta.host.is_empty() {
        comment.push(
            builder
                .strings
                .intern(&format!("{HOST_COMMENT_PREFIX}{}", meta.host)),
        );
    }
    for histogram in &profile.histograms {
        if let Ok(json) = serde_json::to_string(histogram) {
            comment.push(
                builder
                    .strings
                    .intern(&format!("{HISTOGRAM_COMMENT_PREFIX}{json}")),
            );
        }
    }
    let json_comments = meta
        .events
        .iter()
        .filter_map(|event| {
            serde_json::to_string(event)
                .ok()
                .map(|j| (EVENT_COMMENT_PREFIX, j))
        })
        .chain(meta.binaries.iter().filter_map(|binary| {
            serde_json::to_string(binary)
                .ok()
                .map(|j| (BINARY_COMMENT_PREFIX, j))
        }));
    for (prefix, json) in json_comments {
        comment.push(builder.strings.intern(&format!("{prefix}{json}")));
    }
    for (reason, count) in &meta.losses {
        comment.push(
            builder
                .strings
                .intern(&format!("{LOSS_COMMENT_PREFIX}{reason}={count}")),
        );
    }
    let default_sample_type = profile
        .sample_types
        .get(meta.default_sample_type)
        .map_or(0, |sample_type| builder.strings.intern(&sample_type.kind));

    proto::Profile {
        sample_type,
        sample,
        mapping: builder.mappings,
        location,
        function: builder.functions,
        string_table: builder.strings.strings,
        time_nanos: meta.start_unix_ns,
        duration_nanos: meta.duration_ns,
        comment,
        default_sample_type,
        ..Default::default()
    }
}
