//! Change events and binaries in the query API's form (`stallscope.v1.EventRecord`,
//! `BinaryRecord`).

use stallscope_proto::v1;

use super::{BinaryRecord, ChangeRecord};

pub fn event_to_wire(event: ChangeRecord) -> v1::EventRecord {
    v1::EventRecord {
        time_unix_ns: event.time_unix_ns,
        kind: event.kind,
        host: event.host,
        service: event.service,
        agent: event.agent,
        pid: event.pid,
        previous_pid: event.previous_pid.unwrap_or(0),
        build_id: event.build_id,
        previous_build_id: event.previous_build_id,
        executable: event.executable,
        labels: event
            .labels
            .into_iter()
            .map(|(key, value)| v1::LabelMatch { key, value })
            .collect(),
    }
}

pub fn binary_to_wire(binary: BinaryRecord) -> v1::BinaryRecord {
    v1::BinaryRecord {
        host: binary.host,
        service: binary.service,
        path: binary.path,
        build_id: binary.build_id,
        debug_file: binary.debug_file,
        frame_pointers: match binary.frame_pointers {
            None => v1::FramePointers::Unknown,
            Some(true) => v1::FramePointers::Present,
            Some(false) => v1::FramePointers::Absent,
        } as i32,
        stacks: binary.stacks,
        truncated_stacks: binary.truncated_stacks,
        error: binary.error,
        first_unix_ns: binary.first_unix_ns,
        last_unix_ns: binary.last_unix_ns,
    }
}
