//! Plain copies of debug files whose DWARF is compressed. Distributions compress their
//! debug files' DWARF (`SHF_COMPRESSED` sections, zlib): libc's is 4 MB on disk and 10 MB
//! plain. blazesym inflates every compressed section it reads into the heap, for every
//! parse, and a source with that much DWARF is parsed once a profile period and dropped
//! (`symbolize.rs`): measured on libc's debug file, 215 addresses, a peak of +19.2 MB
//! compressed against +14.1 MB from a plain copy, whose sections are mapped (pages of the
//! file, only those touched, dropped with the mapping) instead of inflated.
//!
//! The copy is written once per debug file the agent symbolizes with DWARF, into an
//! unnamed file (`O_TMPFILE`) of the directory [`use_dir`] names (the spool's directory
//! for `run`): on disk, gone when the agent closes it. The same ELF, each compressed
//! section stored inflated, sections and their header table moved to fit, the program
//! headers kept as they were (a debug file's segments have no contents anyway).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Read, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// Where plain copies are written; none are without it.
static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Writes plain copies of compressed debug files into `dir` from now on (the first call
/// wins).
pub fn use_dir(dir: &Path) {
    let _ = DIR.set(dir.to_path_buf());
}

/// A plain copy of `source`'s compressed sections, if the directory is set, `source` has
/// any and the copy could be written (a failure is logged once per file and leaves the
/// original in use).
pub fn copy_of(source: &File, name: &Path) -> Option<File> {
    let dir = DIR.get()?;
    match plain_copy(source, dir) {
        Ok(copy) => {
            if copy.is_some() {
                tracing::debug!("{}: DWARF inflated into a plain copy", name.display());
            }
            copy
        }
        Err(err) => {
            tracing::warn!(
                "{}: no plain copy of its compressed DWARF in {} ({err}); blazesym inflates it at every parse",
                name.display(),
                dir.display()
            );
            None
        }
    }
}

const SHF_COMPRESSED: u64 = 0x800;
const SHT_NULL: u32 = 0;
const SHT_NOBITS: u32 = 8;
const ELFCOMPRESS_ZLIB: u32 = 1;
/// `Elf64_Chdr`: type, reserved, size, alignment.
const CHDR_LEN: u64 = 24;
const EHDR_LEN: usize = 64;
const SHDR_LEN: usize = 64;

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// One section header's fields this needs (`Elf64_Shdr`, little-endian).
struct Section {
    kind: u32,
    flags: u64,
    offset: u64,
    size: u64,
    align: u64,
}

impl Section {
    fn parse(header: &[u8]) -> Self {
        Self {
            kind: u32_at(header, 4),
            flags: u64_at(header, 8),
            offset: u64_at(header, 24),
            size: u64_at(header, 32),
            align: u64_at(header, 48),
        }
    }

    fn has_contents(&self) -> bool {
        self.kind != SHT_NULL && self.kind != SHT_NOBITS && self.size > 0
    }

    fn compressed(&self) -> bool {
        self.has_contents() && self.flags & SHF_COMPRESSED != 0
    }
}

/// Reads a file from a position on (positioned reads: the descriptor is shared).
struct ReadAt<'a> {
    file: &'a File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.file.read_at(buf, self.at)?;
        self.at += read as u64;
        Ok(read)
    }
}

/// A writer that knows its position.
struct Out {
    writer: BufWriter<File>,
    at: u64,
}

impl Out {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.at += bytes.len() as u64;
        Ok(())
    }

    fn align(&mut self, align: u64) -> io::Result<()> {
        let align = align.max(1);
        let padding = self.at.next_multiple_of(align) - self.at;
        self.write(&vec![0u8; padding as usize])
    }

    /// Copies everything `reader` gives; returns how many bytes.
    fn copy(&mut self, reader: &mut impl Read) -> io::Result<u64> {
        let copied = io::copy(reader, &mut self.writer)?;
        self.at += copied;
        Ok(copied)
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Writes a copy of `source` with its compressed sections inflated into an unnamed file of
/// `dir`. `None` if `source` is not a 64-bit little-endian ELF file with zlib-compressed
/// sections (nothing to gain, or a format this does not write).
pub fn plain_copy(source: &File, dir: &Path) -> io::Result<Option<File>> {
    let mut header = [0u8; EHDR_LEN];
    if source.read_exact_at(&mut header, 0).is_err()
        || header[..4] != *b"\x7fELF"
        || header[4] != 2
        || header[5] != 1
    {
        return Ok(None);
    }
    let table_offset = u64_at(&header, 0x28);
    let entry_len = usize::from(u16_at(&header, 0x3a));
    let count = usize::from(u16_at(&header, 0x3c));
    if entry_len != SHDR_LEN || count == 0 {
        return Ok(None);
    }
    let mut table = vec![0u8; count * SHDR_LEN];
    source.read_exact_at(&mut table, table_offset)?;
    let sections: Vec<Section> = table.chunks_exact(SHDR_LEN).map(Section::parse).collect();
    if !sections.iter().any(Section::compressed) {
        return Ok(None);
    }
    // Each compressed section's inflated size and alignment, from its `Elf64_Chdr`.
    let mut inflated_as: Vec<Option<(u64, u64)>> = vec![None; sections.len()];
    for (i, section) in sections.iter().enumerate().filter(|(_, s)| s.compressed()) {
        let mut chdr = [0u8; CHDR_LEN as usize];
        source.read_exact_at(&mut chdr, section.offset)?;
        if u32_at(&chdr, 0) != ELFCOMPRESS_ZLIB || section.size < CHDR_LEN {
            return Ok(None);
        }
        inflated_as[i] = Some((u64_at(&chdr, 8), u64_at(&chdr, 16)));
    }
    // The ELF and program headers: everything before the first section's contents.
    let prefix = sections
        .iter()
        .filter(|s| s.has_contents())
        .map(|s| s.offset)
        .min()
        .unwrap_or(table_offset)
        .min(table_offset);
    if prefix < EHDR_LEN as u64 {
        return Err(invalid("section contents overlap the ELF header"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)?;
    let mut out = Out {
        writer: BufWriter::with_capacity(256 << 10, file.try_clone()?),
        at: 0,
    };
    out.copy(
        &mut ReadAt {
            file: source,
            at: 0,
        }
        .take(prefix),
    )?;
    // Contents in their original order; each section's new offset, size, flags, alignment.
    let mut order: Vec<usize> = (0..sections.len())
        .filter(|&i| sections[i].has_contents())
        .collect();
    order.sort_by_key(|&i| sections[i].offset);
    let mut placed: Vec<Option<(u64, u64, u64, u64)>> = vec![None; sections.len()];
    for i in order {
        let section = &sections[i];
        if let Some((size, align)) = inflated_as[i] {
            out.align(align)?;
            let at = out.at;
            let compressed = ReadAt {
                file: source,
                at: section.offset + CHDR_LEN,
            }
            .take(section.size - CHDR_LEN);
            let inflated = out.copy(&mut flate2::read::ZlibDecoder::new(compressed))?;
            if inflated != size {
                return Err(invalid(
                    "a compressed section inflates to another size than its header says",
                ));
            }
            placed[i] = Some((at, size, section.flags & !SHF_COMPRESSED, align));
        } else {
            out.align(section.align)?;
            let at = out.at;
            let copied = out.copy(
                &mut ReadAt {
                    file: source,
                    at: section.offset,
                }
                .take(section.size),
            )?;
            if copied != section.size {
                return Err(invalid("a section runs past the end of the file"));
            }
            placed[i] = Some((at, section.size, section.flags, section.align));
        }
    }
    out.align(8)?;
    let new_table_offset = out.at;
    for (entry, place) in table.chunks_exact_mut(SHDR_LEN).zip(&placed) {
        if let Some((at, size, flags, align)) = *place {
            entry[24..32].copy_from_slice(&at.to_le_bytes());
            entry[32..40].copy_from_slice(&size.to_le_bytes());
            entry[8..16].copy_from_slice(&flags.to_le_bytes());
            entry[48..56].copy_from_slice(&align.to_le_bytes());
        }
    }
    out.write(&table)?;
    out.writer.flush()?;
    drop(out);
    file.write_all_at(&new_table_offset.to_le_bytes(), 0x28)?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(file: &File) -> Vec<u8> {
        let mut bytes = Vec::new();
        ReadAt { file, at: 0 }
            .read_to_end(&mut bytes)
            .expect("reads");
        bytes
    }

    /// Section names and contents of an ELF file, compressed ones inflated (read with
    /// `object`, inflated here).
    fn sections_of(file: &File) -> Vec<(String, Vec<u8>)> {
        use object::{Object as _, ObjectSection as _};
        let bytes = bytes_of(file);
        let elf = object::File::parse(&*bytes).expect("an ELF file");
        elf.sections()
            .map(|s| {
                let name = s.name().expect("name").to_owned();
                let data = match s.compressed_data() {
                    Ok(data) if data.format != object::CompressionFormat::None => {
                        let range = s.compressed_file_range().expect("range");
                        let raw = &bytes[range.offset as usize..][..range.compressed_size as usize];
                        let mut plain = Vec::new();
                        flate2::read::ZlibDecoder::new(raw)
                            .read_to_end(&mut plain)
                            .expect("inflates");
                        plain
                    }
                    _ => s.data().expect("data").to_owned(),
                };
                (name, data)
            })
            .collect()
    }

    /// This test binary's DWARF compressed with `objcopy`, then copied plain: the same
    /// sections with the same contents, none compressed, and `object` reads the copy.
    #[test]
    fn a_compressed_debug_file_is_copied_with_the_same_sections_inflated() {
        let dir = std::env::temp_dir().join(format!("stallscope-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let compressed = dir.join("compressed");
        let status = std::process::Command::new("objcopy")
            .args(["--only-keep-debug", "--compress-debug-sections=zlib"])
            .arg(std::env::current_exe().expect("test binary"))
            .arg(&compressed)
            .status()
            .expect("objcopy runs (binutils)");
        assert!(status.success(), "objcopy failed");
        let source = File::open(&compressed).expect("opens");
        let before = sections_of(&source);
        assert!(
            before.iter().any(|(name, _)| name == ".debug_info"),
            "the test binary has DWARF"
        );
        let copy = plain_copy(&source, &dir)
            .expect("copies")
            .expect("there are compressed sections");
        assert!(
            plain_copy(&copy, &dir).expect("reads").is_none(),
            "the copy still has compressed sections"
        );
        assert_eq!(sections_of(&copy), before);
        // blazesym reads the same function, file and line from both.
        let vaddr = function_address(&source, "plain_copy");
        let from = |file: &File| {
            use std::os::fd::AsRawFd as _;

            use blazesym::symbolize::{
                Input, Symbolizer,
                source::{Elf, Source},
            };
            let mut elf = Elf::new(format!("/proc/self/fd/{}", file.as_raw_fd()));
            elf.debug_syms = true;
            let symbolizer = Symbolizer::new();
            let symbolized = symbolizer
                .symbolize_single(&Source::Elf(elf), Input::VirtOffset(vaddr))
                .expect("symbolizes");
            let sym = symbolized.as_sym().expect("a symbol").clone();
            let code = sym.code_info.as_ref().expect("file and line");
            (
                sym.name.into_owned(),
                code.line,
                code.file.to_string_lossy().into_owned(),
            )
        };
        let compressed_frame = from(&source);
        assert!(
            compressed_frame.0.contains("plain_copy"),
            "{compressed_frame:?}"
        );
        assert!(compressed_frame.1.is_some(), "{compressed_frame:?}");
        assert_eq!(from(&copy), compressed_frame);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The address of the first function whose name contains `part`, from `file`'s
    /// symbol table.
    fn function_address(file: &File, part: &str) -> u64 {
        use object::{Object as _, ObjectSymbol as _, SymbolKind};
        let bytes = bytes_of(file);
        let elf = object::File::parse(&*bytes).expect("an ELF file");
        elf.symbols()
            .find(|s| s.kind() == SymbolKind::Text && s.name().is_ok_and(|n| n.contains(part)))
            .map_or_else(
                || panic!("no function named like {part}"),
                |s| s.address() + 1,
            )
    }

    #[test]
    fn files_without_compressed_sections_are_not_copied() {
        let exe = File::open(std::env::current_exe().expect("test binary")).expect("opens");
        assert!(
            plain_copy(&exe, &std::env::temp_dir())
                .expect("reads")
                .is_none()
        );
        let text = tempfile_with(b"not an ELF file at all, only text");
        assert!(
            plain_copy(&text, &std::env::temp_dir())
                .expect("reads")
                .is_none()
        );
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(std::env::temp_dir())
            .expect("unnamed file");
        file.write_all_at(bytes, 0).expect("writes");
        file
    }
}
