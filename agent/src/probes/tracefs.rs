//! Classic tracepoints: whether one exists, and where its record's fields sit (from the
//! tracepoint's `format` file), so fallback probes read them at the right offsets.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Mounts tracefs at `/sys/kernel/tracing` if no tracefs is mounted yet (classic
/// tracepoints are attached through it). Many hosts mount it at boot; minimal ones do not.
pub fn ensure_mounted() -> std::io::Result<()> {
    if TRACEFS_ROOTS
        .iter()
        .any(|root| Path::new(root).join("events").is_dir())
    {
        return Ok(());
    }
    let source = c"nodev";
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        tracing::info!("mounted tracefs at /sys/kernel/tracing");
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The directory of tracepoint `category:name`, if this kernel exposes it.
pub fn event_dir(category: &str, name: &str) -> Option<PathBuf> {
    TRACEFS_ROOTS
        .iter()
        .map(|root| Path::new(root).join("events").join(category).join(name))
        .find(|dir| dir.join("format").is_file())
}

/// Field name to (offset, size) for tracepoint `category:name`.
pub fn field_offsets(category: &str, name: &str) -> Option<HashMap<String, (u32, u32)>> {
    let dir = event_dir(category, name)?;
    let text = std::fs::read_to_string(dir.join("format")).ok()?;
    Some(parse_format(&text))
}

fn parse_format(text: &str) -> HashMap<String, (u32, u32)> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(value) = part.strip_prefix("offset:") {
                offset = value.parse().ok();
            } else if let Some(value) = part.strip_prefix("size:") {
                size = value.parse().ok();
            } else if decl.is_none() && !part.is_empty() {
                decl = Some(part);
            }
        }
        if let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) {
            // "char prev_comm[16]" -> "prev_comm"; "long prev_state" -> "prev_state".
            let last = decl.rsplit(' ').next().unwrap_or(decl);
            let name = last.split('[').next().unwrap_or(last);
            fields.insert(name.to_owned(), (offset, size));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_SWITCH: &str = "name: sched_switch
ID: 316
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;

\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;
";

    #[test]
    fn parses_field_offsets() {
        let fields = parse_format(SCHED_SWITCH);
        assert_eq!(fields["prev_comm"], (8, 16));
        assert_eq!(fields["prev_state"], (32, 8));
        assert_eq!(fields["next_pid"], (56, 4));
        assert_eq!(fields["common_type"], (0, 2));
    }
}
