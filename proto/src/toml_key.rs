//! Naming the key a TOML error is about, for the agent's and the collector's config
//! errors: parsers report a byte offset, users want `run.batch_interval`.

/// The dotted key (`run.batch_interval`) of the line holding byte `offset` of a TOML
/// `text`, with the table it sits in; `None` for a line that holds no key.
pub fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| header.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_their_tables() {
        let text = "top = 1\n[run]\nbatch_interval = \"x\"\n";
        assert_eq!(key_at(text, 2).as_deref(), Some("top"));
        let at = text.find("batch").unwrap_or(0);
        assert_eq!(key_at(text, at + 3).as_deref(), Some("run.batch_interval"));
        assert_eq!(key_at(text, text.find("[run]").unwrap_or(0)), None);
    }
}
