//! The deploy injection's "new build": a copy of the demo binary whose GNU build-id note
//! is rewritten in place (same code, same length, another identity). stallscope keys
//! symbols, binaries and deploy events by build-id, so to it this is a different build;
//! the slower code path itself is selected by a flag (`--tax-table-us`), which the lab
//! passes only to this copy.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, bail};

const NT_GNU_BUILD_ID: u32 = 3;
const SHT_NOTE: u32 = 7;

fn u16_at(bytes: &[u8], at: usize) -> anyhow::Result<u16> {
    let slice = bytes.get(at..at + 2).context("ELF truncated")?;
    Ok(u16::from_le_bytes([slice[0], slice[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> anyhow::Result<u32> {
    let slice = bytes.get(at..at + 4).context("ELF truncated")?;
    Ok(u32::from_le_bytes([slice[0], slice[1], slice[2], slice[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> anyhow::Result<u64> {
    let slice = bytes.get(at..at + 8).context("ELF truncated")?;
    let mut word = [0u8; 8];
    word.copy_from_slice(slice);
    Ok(u64::from_le_bytes(word))
}

/// Where the build-id's bytes are in a 64-bit little-endian ELF file: the descriptor of
/// the `NT_GNU_BUILD_ID` note, found through the section headers.
fn build_id_span(elf: &[u8]) -> anyhow::Result<(usize, usize)> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        bail!("not a 64-bit little-endian ELF file");
    }
    let section_headers = u64_at(elf, 0x28)? as usize;
    let entry_size = usize::from(u16_at(elf, 0x3a)?);
    let count = usize::from(u16_at(elf, 0x3c)?);
    for index in 0..count {
        let header = section_headers + index * entry_size;
        if u32_at(elf, header + 4)? != SHT_NOTE {
            continue;
        }
        let offset = u64_at(elf, header + 0x18)? as usize;
        let size = u64_at(elf, header + 0x20)? as usize;
        let mut at = offset;
        while at + 12 <= offset + size {
            let name_size = u32_at(elf, at)? as usize;
            let desc_size = u32_at(elf, at + 4)? as usize;
            let kind = u32_at(elf, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at + name_size.next_multiple_of(4);
            if kind == NT_GNU_BUILD_ID && elf.get(name_at..name_at + name_size) == Some(b"GNU\0") {
                if desc_at + desc_size > elf.len() {
                    bail!("build-id note runs past the end of the file");
                }
                return Ok((desc_at, desc_size));
            }
            at = desc_at + desc_size.next_multiple_of(4);
        }
    }
    bail!("no GNU build-id note (link with --build-id)")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The build-id of the ELF file at `path`, in hex.
pub fn build_id(path: &Path) -> anyhow::Result<String> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (at, size) = build_id_span(&elf).with_context(|| path.display().to_string())?;
    Ok(hex(&elf[at..at + size]))
}

/// Copies `from` to `to` with a different build-id derived from `salt`; returns the new
/// build-id in hex.
pub fn copy_with_new_build_id(from: &Path, to: &Path, salt: u64) -> anyhow::Result<String> {
    let mut elf = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let (at, size) = build_id_span(&elf).with_context(|| from.display().to_string())?;
    let salt = salt.to_le_bytes();
    for (index, byte) in elf[at..at + size].iter_mut().enumerate() {
        // Never zero: every byte changes.
        *byte ^= salt[index % 8] | 1;
    }
    let new_id = hex(&elf[at..at + size]);
    std::fs::write(to, &elf).with_context(|| format!("writing {}", to.display()))?;
    make_executable(to)?;
    Ok(new_id)
}

pub fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_copy_differs_only_in_its_build_id() {
        let me = std::env::current_exe().expect("test binary");
        let dir = std::env::temp_dir().join(format!("stallscope-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let copy = dir.join("copy");
        let old = build_id(&me).expect("the test binary has a build-id");
        let new = copy_with_new_build_id(&me, &copy, 0x1234_5678).expect("copied");
        assert_ne!(old, new);
        assert_eq!(build_id(&copy).expect("readable"), new);
        let (a, b) = (
            std::fs::read(&me).expect("read"),
            std::fs::read(&copy).expect("read"),
        );
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!((a.len(), differing), (b.len(), old.len() / 2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
