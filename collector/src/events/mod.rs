//! Change events (deploys, restarts) and the binaries table as the collector keeps them:
//! checked when a batch is decoded (bad indices and sizes refuse the batch like any other
//! inconsistency), stored per host and service with the batch that carried them (so
//! exactly once, like its samples), and listed by the `Events` query.

pub mod wire;

use std::collections::{BTreeSet, HashMap};

use stallscope_profile::Labels;
use stallscope_proto::v1;

use crate::hash::StableHasher;

/// Most change events one batch may carry.
pub const MAX_EVENTS: usize = 10_000;
/// Most binaries one batch may carry.
pub const MAX_BINARIES: usize = 100_000;
/// Longest path, executable, debug file or error text.
const MAX_TEXT: usize = 4096;
/// Longest service name or build-id.
const MAX_NAME: usize = 1024;
/// Longest event kind.
const MAX_KIND: usize = 64;

/// A change event as stored: the agent's event plus where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Stable: a hash of (host, service, kind, time, pid), whichever replica stores it.
    pub id: i64,
    pub time_unix_ns: i64,
    /// `deploy`, `restart`, or a kind a newer agent knows.
    pub kind: String,
    pub host: String,
    pub service: String,
    pub agent: String,
    pub pid: u32,
    pub previous_pid: Option<u32>,
    /// Build-ids in hex; empty when unknown.
    pub build_id: String,
    pub previous_build_id: String,
    pub executable: String,
    pub labels: Labels,
}

impl ChangeRecord {
    pub fn labels_json(&self) -> String {
        serde_json::to_string(&self.labels).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// The id of an event: the same event reported twice (a replayed batch, two replicas)
/// is stored once.
pub fn event_id(host: &str, service: &str, kind: &str, time_unix_ns: i64, pid: u32) -> i64 {
    StableHasher::new()
        .str(host)
        .str(service)
        .str(kind)
        .u64(time_unix_ns as u64)
        .u64(u64::from(pid))
        .finish()
}

/// A binary of one service on one host: what a batch reported (its time span is the
/// batch's), or sums over a queried range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryRecord {
    pub host: String,
    pub service: String,
    pub path: String,
    /// Hex; empty when the binary has none.
    pub build_id: String,
    pub debug_file: String,
    /// `None` when the agent could not tell.
    pub frame_pointers: Option<bool>,
    /// User stacks whose outermost frame is in this binary (host-wide: the agent does
    /// not split them by service).
    pub stacks: u64,
    pub truncated_stacks: u64,
    pub error: String,
    pub first_unix_ns: i64,
    pub last_unix_ns: i64,
}

/// Frame pointers as stored: 1 present, 0 absent, -1 unknown.
pub fn frame_pointers_code(frame_pointers: Option<bool>) -> i8 {
    match frame_pointers {
        Some(true) => 1,
        Some(false) => 0,
        None => -1,
    }
}

pub fn frame_pointers_from_code(code: i64) -> Option<bool> {
    match code {
        1 => Some(true),
        0 => Some(false),
        _ => None,
    }
}

fn check_len(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!(
            "{what} is {} bytes long (at most {max})",
            text.len()
        ));
    }
    Ok(())
}

/// Checks a batch's change events and turns them into records of `host`, attributed to
/// `agent`. `strings` is the batch's string table (event labels point into it).
pub fn changes_from_wire(
    agent: &str,
    host: &str,
    events: &[v1::ChangeEvent],
    strings: &[String],
) -> Result<Vec<ChangeRecord>, String> {
    if events.len() > MAX_EVENTS {
        return Err(format!(
            "{} change events (at most {MAX_EVENTS} per batch)",
            events.len()
        ));
    }
    let string = |index: u32, event: usize| {
        strings.get(index as usize).ok_or_else(|| {
            format!(
                "change event {event} refers to string {index}, but the string table has {} entries",
                strings.len()
            )
        })
    };
    let mut records = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        let what = |field: &str| format!("change event {index}: {field}");
        if event.kind.is_empty()
            || event.kind.len() > MAX_KIND
            || !event
                .kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(what(&format!(
                "kind `{}` is not a lower-case word of at most {MAX_KIND} characters",
                event.kind.escape_debug()
            )));
        }
        if event.service.is_empty() {
            return Err(what("the service is empty"));
        }
        check_len(&what("the service"), &event.service, MAX_NAME)?;
        check_len(&what("the build-id"), &event.build_id, MAX_NAME)?;
        check_len(
            &what("the previous build-id"),
            &event.previous_build_id,
            MAX_NAME,
        )?;
        check_len(&what("the executable"), &event.executable, MAX_TEXT)?;
        if event.time_unix_ns < 0 {
            return Err(what("the time is negative"));
        }
        if event.labels.len() % 2 != 0 {
            return Err(what(
                "odd number of label indices (key, value pairs expected)",
            ));
        }
        let mut labels = Labels::new();
        for pair in event.labels.chunks_exact(2) {
            labels.insert(
                string(pair[0], index)?.clone(),
                string(pair[1], index)?.clone(),
            );
        }
        records.push(ChangeRecord {
            id: event_id(
                host,
                &event.service,
                &event.kind,
                event.time_unix_ns,
                event.pid,
            ),
            time_unix_ns: event.time_unix_ns,
            kind: event.kind.clone(),
            host: host.to_owned(),
            service: event.service.clone(),
            agent: agent.to_owned(),
            pid: event.pid,
            previous_pid: (event.previous_pid != 0).then_some(event.previous_pid),
            build_id: event.build_id.clone(),
            previous_build_id: event.previous_build_id.clone(),
            executable: event.executable.clone(),
            labels,
        });
    }
    Ok(records)
}

/// Checks a batch's binaries table (sizes only: every field is informational).
pub fn check_binaries(binaries: &[v1::BinaryInfo]) -> Result<(), String> {
    if binaries.len() > MAX_BINARIES {
        return Err(format!(
            "{} binaries (at most {MAX_BINARIES} per batch)",
            binaries.len()
        ));
    }
    for (index, binary) in binaries.iter().enumerate() {
        let what = |field: &str| format!("binary {index}: {field}");
        if binary.path.is_empty() {
            return Err(what("the path is empty"));
        }
        check_len(&what("the path"), &binary.path, MAX_TEXT)?;
        check_len(&what("the build-id"), &binary.build_id, MAX_NAME)?;
        check_len(&what("the debug file"), &binary.debug_file, MAX_TEXT)?;
        check_len(&what("the error"), &binary.error, MAX_TEXT)?;
    }
    Ok(())
}

/// Attributes a batch's binaries to services: a binary belongs to every service whose
/// samples have a stack with a frame in it (frames name their binary in `module`). A
/// binary no stack of the batch runs through is kept with an empty service.
///
/// `modules` holds each frame's module; `uses` yields (service, stack id, stack frames)
/// for every stored (series, stack) pair.
pub fn attribute_binaries<'a>(
    host: &str,
    span: (i64, i64),
    binaries: &[v1::BinaryInfo],
    modules: &[&str],
    uses: impl Iterator<Item = (&'a str, i64, &'a [u32])>,
) -> Vec<BinaryRecord> {
    if binaries.is_empty() {
        return Vec::new();
    }
    let by_path: HashMap<&str, usize> = binaries
        .iter()
        .enumerate()
        .map(|(index, binary)| (binary.path.as_str(), index))
        .collect();
    let frame_binary: Vec<Option<usize>> = modules
        .iter()
        .map(|module| by_path.get(module).copied())
        .collect();
    // Each distinct stack's binaries are looked up once.
    let mut stack_binaries: HashMap<i64, Vec<usize>> = HashMap::new();
    let mut pairs: BTreeSet<(&str, usize)> = BTreeSet::new();
    for (service, stack, frames) in uses {
        let found = stack_binaries.entry(stack).or_insert_with(|| {
            let mut found: Vec<usize> = frames
                .iter()
                .filter_map(|&frame| frame_binary.get(frame as usize).copied().flatten())
                .collect();
            found.sort_unstable();
            found.dedup();
            found
        });
        pairs.extend(found.iter().map(|&binary| (service, binary)));
    }
    let mut used = vec![false; binaries.len()];
    let mut records: Vec<BinaryRecord> = pairs
        .into_iter()
        .map(|(service, index)| {
            used[index] = true;
            binary_record(host, service, span, &binaries[index])
        })
        .collect();
    for (index, binary) in binaries.iter().enumerate() {
        if !used[index] {
            records.push(binary_record(host, "", span, binary));
        }
    }
    records
}

fn binary_record(
    host: &str,
    service: &str,
    (first_unix_ns, last_unix_ns): (i64, i64),
    binary: &v1::BinaryInfo,
) -> BinaryRecord {
    BinaryRecord {
        host: host.to_owned(),
        service: service.to_owned(),
        path: binary.path.clone(),
        build_id: binary.build_id.clone(),
        debug_file: binary.debug_file.clone(),
        frame_pointers: match v1::FramePointers::try_from(binary.frame_pointers) {
            Ok(v1::FramePointers::Present) => Some(true),
            Ok(v1::FramePointers::Absent) => Some(false),
            _ => None,
        },
        stacks: binary.stacks,
        truncated_stacks: binary.truncated_stacks,
        error: binary.error.clone(),
        first_unix_ns,
        last_unix_ns,
    }
}

/// Sums binaries over stored rows: one record per (host, service, path, build-id), with
/// the latest facts (debug file, frame pointers, error) and the whole time span.
#[derive(Default)]
pub struct BinariesBuilder(
    std::collections::BTreeMap<(String, String, String, String), BinaryRecord>,
);

impl BinariesBuilder {
    pub fn add(&mut self, row: BinaryRecord) {
        let key = (
            row.host.clone(),
            row.service.clone(),
            row.path.clone(),
            row.build_id.clone(),
        );
        match self.0.get_mut(&key) {
            None => {
                self.0.insert(key, row);
            }
            Some(total) => {
                total.stacks = total.stacks.saturating_add(row.stacks);
                total.truncated_stacks =
                    total.truncated_stacks.saturating_add(row.truncated_stacks);
                if row.last_unix_ns >= total.last_unix_ns {
                    total.debug_file = row.debug_file;
                    total.frame_pointers = row.frame_pointers.or(total.frame_pointers);
                    total.error = row.error;
                }
                total.first_unix_ns = total.first_unix_ns.min(row.first_unix_ns);
                total.last_unix_ns = total.last_unix_ns.max(row.last_unix_ns);
            }
        }
    }

    pub fn finish(self) -> Vec<BinaryRecord> {
        self.0.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, labels: Vec<u32>) -> v1::ChangeEvent {
        v1::ChangeEvent {
            time_unix_ns: 5,
            kind: kind.to_owned(),
            service: "svc".to_owned(),
            pid: 9,
            previous_pid: 0,
            build_id: "ab".to_owned(),
            labels,
            ..Default::default()
        }
    }

    #[test]
    fn events_are_checked_and_keep_their_labels() {
        let strings = vec![String::new(), "unit".to_owned(), "svc.service".to_owned()];
        let records =
            changes_from_wire("a", "h", &[event("deploy", vec![1, 2])], &strings).expect("valid");
        assert_eq!(records[0].labels["unit"], "svc.service");
        assert_eq!(records[0].previous_pid, None);
        assert_eq!(records[0].id, event_id("h", "svc", "deploy", 5, 9));
        for (bad, reason) in [
            (event("deploy", vec![1, 7]), "refers to string 7"),
            (event("deploy", vec![1]), "odd number"),
            (event("Deploy!", vec![]), "lower-case word"),
            (event("", vec![]), "lower-case word"),
        ] {
            let err = changes_from_wire("a", "h", &[bad], &strings).expect_err(reason);
            assert!(err.contains(reason), "{err}");
        }
        let mut long = event("deploy", vec![]);
        long.service = "s".repeat(MAX_NAME + 1);
        assert!(changes_from_wire("a", "h", &[long], &strings).is_err());
    }

    #[test]
    fn binaries_belong_to_the_services_whose_stacks_use_them() {
        let binary = |path: &str| v1::BinaryInfo {
            path: path.to_owned(),
            stacks: 4,
            ..Default::default()
        };
        let binaries = [
            binary("/bin/app"),
            binary("/lib/libc.so"),
            binary("/bin/idle"),
        ];
        let modules = ["/bin/app", "/lib/libc.so", "", "/lib/libc.so"];
        let app_stack = [0_u32, 1];
        let db_stack = [3_u32, 2];
        let uses = [
            ("app", 1, &app_stack[..]),
            ("db", 2, &db_stack[..]),
            ("app", 1, &app_stack[..]),
        ];
        let records = attribute_binaries("h", (1, 2), &binaries, &modules, uses.into_iter());
        let pairs: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (r.service.as_str(), r.path.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("app", "/bin/app"),
                ("app", "/lib/libc.so"),
                ("db", "/lib/libc.so"),
                ("", "/bin/idle")
            ]
        );
        let mut long = binary("/x");
        long.path = "p".repeat(MAX_TEXT + 1);
        assert!(check_binaries(&[long]).is_err());
        assert!(check_binaries(&[binary("")]).is_err());
    }
}
