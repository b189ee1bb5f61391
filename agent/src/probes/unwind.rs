//! The probes' unwind maps (`agent-ebpf/src/unwind.rs`): sized at load, handed to the
//! unwind table loader (`crate::unwind::loader`), which fills them while the probes run.

use std::os::fd::{AsFd as _, OwnedFd};

use agent_common::{UnwindProcess, UnwindRow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError},
};

use super::{MapSizes, ProbeError, Probes, take_map};

/// The rows of every binary's table, and each process's mappings with tables.
pub struct UnwindMaps {
    pub rows: Array<MapData, UnwindRow>,
    /// The rows map's descriptor again, for batch writes (which aya does not wrap).
    pub rows_fd: OwnedFd,
    pub processes: HashMap<MapData, u32, UnwindProcess>,
    /// Rows the rows map holds.
    pub capacity: u32,
}

/// Sizes the maps (one entry each when tables are off: a map cannot be empty).
pub(super) fn size_maps(loader: &mut EbpfLoader<'_>, sizes: &MapSizes) {
    let on = sizes.unwind_rows > 0;
    loader
        .map_max_entries("UNWIND_ROWS", sizes.unwind_rows.max(1))
        .map_max_entries(
            "UNWIND_PROCESSES",
            if on { sizes.unwind_processes } else { 1 },
        );
}

/// Takes the maps out of the loaded object, if tables are on.
pub(super) fn take(ebpf: &mut Ebpf, sizes: &MapSizes) -> Result<Option<UnwindMaps>, ProbeError> {
    if sizes.unwind_rows == 0 {
        return Ok(None);
    }
    let rows = take_map(ebpf, "UNWIND_ROWS")?;
    let rows_fd = match &rows {
        Map::Array(data) => data.fd().as_fd().try_clone_to_owned(),
        _ => return Err(ProbeError::MissingMap("UNWIND_ROWS")),
    }
    .map_err(|err| ProbeError::MapApi {
        map: "UNWIND_ROWS",
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error: err,
        }),
    })?;
    let rows = Array::try_from(rows).map_err(|source| ProbeError::MapApi {
        map: "UNWIND_ROWS",
        source,
    })?;
    let processes = HashMap::try_from(take_map(ebpf, "UNWIND_PROCESSES")?).map_err(|source| {
        ProbeError::MapApi {
            map: "UNWIND_PROCESSES",
            source,
        }
    })?;
    Ok(Some(UnwindMaps {
        rows,
        rows_fd,
        processes,
        capacity: sizes.unwind_rows,
    }))
}

impl Probes {
    /// The unwind maps for the table loader (once; `None` when tables are off).
    pub fn take_unwind_maps(&mut self) -> Option<UnwindMaps> {
        self.unwind.take()
    }
}
