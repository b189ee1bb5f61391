//! What the agent learns from a binary before symbolizing it: its build-id (the identity
//! shared by every copy, in every container), where its separate debug file is, how file
//! offsets map to virtual addresses, and whether its functions keep frame pointers (the
//! eBPF unwinder needs them; without, user stacks are cut short). Reads go through an
//! open file, so they work for binaries of other mount namespaces and for deleted ones;
//! callers run them on a deadline-bounded lane.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSegment, read::ReadCache};

/// A loadable segment: file range and the virtual address it is mapped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub offset: u64,
    pub size: u64,
    pub vaddr: u64,
}

/// Whether a binary's functions set up frame pointers, from a sample of their prologues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePointers {
    pub sampled: u32,
    pub with_frame_pointer: u32,
}

impl FramePointers {
    /// Most sampled functions push and set up the frame pointer.
    pub fn present(self) -> bool {
        self.sampled > 0 && self.with_frame_pointer * 2 >= self.sampled
    }
}

/// What inspection found in one binary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfInfo {
    pub build_id: Option<Vec<u8>>,
    /// `.gnu_debuglink`: the debug file's name and the CRC-32 of its contents.
    pub debuglink: Option<(String, u32)>,
    pub loads: Vec<Load>,
    /// `None` when the binary has no function symbols to sample.
    pub frame_pointers: Option<FramePointers>,
    /// Has a `.symtab` (not fully stripped).
    pub has_symtab: bool,
    /// Has DWARF line information of its own.
    pub has_dwarf: bool,
    /// Bytes of its DWARF sections (`.debug_*`, uncompressed): what parsing its debug
    /// information may touch and decompress.
    pub dwarf_bytes: u64,
}

impl ElfInfo {
    /// The virtual address (as the binary's symbols see it) of file offset `offset`.
    pub fn vaddr_of(&self, offset: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|load| (load.offset..load.offset + load.size).contains(&offset))
            .map(|load| offset - load.offset + load.vaddr)
    }

    /// The file offset of virtual address `vaddr`.
    pub fn offset_of(&self, vaddr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|load| (load.vaddr..load.vaddr + load.size).contains(&vaddr))
            .map(|load| vaddr - load.vaddr + load.offset)
    }

    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.as_deref().map(hex)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Function symbols sampled for the frame-pointer check.
const PROLOGUE_SAMPLES: usize = 64;

/// Inspects an ELF binary through `file`.
pub fn inspect(file: &File) -> io::Result<ElfInfo> {
    let cache = ReadCache::new(file);
    let object = object::File::parse(&cache).map_err(invalid)?;
    let build_id = object.build_id().map_err(invalid)?.map(<[u8]>::to_vec);
    let debuglink = object
        .gnu_debuglink()
        .map_err(invalid)?
        .map(|(name, crc)| (String::from_utf8_lossy(name).into_owned(), crc));
    let loads: Vec<Load> = object
        .segments()
        .map(|segment| {
            let (offset, size) = segment.file_range();
            Load {
                offset,
                size,
                vaddr: segment.address(),
            }
        })
        .filter(|load| load.size > 0)
        .collect();
    let has_symtab = object.section_by_name(".symtab").is_some();
    let has_dwarf = object.section_by_name(".debug_line").is_some()
        || object.section_by_name(".zdebug_line").is_some();
    let dwarf_bytes = object
        .sections()
        .filter(|section| {
            section
                .name()
                .is_ok_and(|name| name.starts_with(".debug_") || name.starts_with(".zdebug_"))
        })
        .map(|section| {
            section
                .compressed_file_range()
                .map_or(section.size(), |range| range.uncompressed_size)
        })
        .sum();
    // The symbol table (else the dynamic one), to sample function entries from without
    // reading all of it: large binaries have millions of symbols.
    let symbols = (object.is_64() && object.is_little_endian())
        .then(|| {
            object
                .section_by_name(".symtab")
                .or_else(|| object.section_by_name(".dynsym"))
                .and_then(|section| section.file_range())
        })
        .flatten();
    let architecture = object.architecture();
    drop(object);
    drop(cache);
    let mut info = ElfInfo {
        build_id,
        debuglink,
        loads,
        frame_pointers: None,
        has_symtab,
        has_dwarf,
        dwarf_bytes,
    };
    if let Some((offset, size)) = symbols {
        let functions = sample_functions(file, offset, size);
        let mut check = FramePointers {
            sampled: 0,
            with_frame_pointer: 0,
        };
        for address in functions {
            let Some(offset) = info.offset_of(address) else {
                continue;
            };
            let mut prologue = [0u8; 16];
            if file.read_exact_at(&mut prologue, offset).is_err() {
                continue;
            }
            check.sampled += 1;
            if sets_up_frame_pointer(architecture, &prologue) {
                check.with_frame_pointer += 1;
            }
        }
        info.frame_pointers = (check.sampled > 0).then_some(check);
    }
    Ok(info)
}

/// Size of an `Elf64_Sym`.
const SYMBOL_SIZE: u64 = 24;
/// `STT_FUNC`.
const FUNCTION_SYMBOL: u8 = 2;

/// Addresses of up to [`PROLOGUE_SAMPLES`] function symbols spread evenly over an ELF64
/// little-endian symbol table at `offset`, read entry by entry.
fn sample_functions(file: &File, offset: u64, size: u64) -> Vec<u64> {
    let count = size / SYMBOL_SIZE;
    // Look at more entries than needed: many symbols are not functions.
    let probes = (PROLOGUE_SAMPLES as u64 * 4).min(count);
    let mut functions = Vec::new();
    for probe in 0..probes {
        let index = probe * count / probes.max(1);
        let mut entry = [0u8; SYMBOL_SIZE as usize];
        if file
            .read_exact_at(&mut entry, offset + index * SYMBOL_SIZE)
            .is_err()
        {
            break;
        }
        let kind = entry[4] & 0xf;
        let value = u64::from_le_bytes(entry[8..16].try_into().unwrap_or_default());
        let size = u64::from_le_bytes(entry[16..24].try_into().unwrap_or_default());
        if kind == FUNCTION_SYMBOL && value != 0 && size >= 8 && !functions.contains(&value) {
            functions.push(value);
            if functions.len() == PROLOGUE_SAMPLES {
                break;
            }
        }
    }
    functions
}

fn invalid(err: object::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not a readable ELF file: {err}"),
    )
}

/// Whether a function's first bytes save and set up the frame pointer.
fn sets_up_frame_pointer(architecture: object::Architecture, code: &[u8; 16]) -> bool {
    match architecture {
        object::Architecture::X86_64 => {
            // An `endbr64` may come first (CET).
            let code = code.strip_prefix(&[0xf3, 0x0f, 0x1e, 0xfa]).unwrap_or(code);
            // push %rbp; mov %rsp,%rbp (either encoding).
            code.starts_with(&[0x55, 0x48, 0x89, 0xe5])
                || code.starts_with(&[0x55, 0x48, 0x8b, 0xec])
        }
        object::Architecture::Aarch64 => code.chunks_exact(4).take(3).any(|word| {
            let insn = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            // stp x29, x30, [sp, #imm]{!}: pre-indexed or signed offset.
            insn & 0xffc0_7fff == 0xa980_7bfd || insn & 0xffc0_7fff == 0xa900_7bfd
        }),
        _ => false,
    }
}

/// A separate debug file found for a binary.
#[derive(Debug)]
pub struct DebugFile {
    pub file: File,
    /// Where it was found (as the agent opened it).
    pub path: PathBuf,
    /// Bytes of its DWARF sections.
    pub dwarf_bytes: u64,
}

/// Looks for the separate debug file of a binary at `path` (as its process sees it),
/// under each of `roots` (the process's root, `/proc/PID/root`, then the host's): by
/// build-id under `/usr/lib/debug/.build-id/`, then by debuglink next to the binary, in
/// its `.debug/` directory and under `/usr/lib/debug/`. A candidate must carry the same
/// build-id, or (without one) match the debuglink's CRC.
pub fn find_debug_file(roots: &[PathBuf], path: &str, info: &ElfInfo) -> Option<DebugFile> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    let dir = Path::new(path).parent().unwrap_or(Path::new("/"));
    let relative_dir = dir.strip_prefix("/").unwrap_or(dir);
    for root in roots {
        if let Some(id) = info.build_id.as_deref().filter(|id| id.len() > 1) {
            candidates.push(root.join(format!(
                "usr/lib/debug/.build-id/{}/{}.debug",
                hex(&id[..1]),
                hex(&id[1..])
            )));
        }
        if let Some((name, _)) = &info.debuglink {
            if name.contains('/') || name.is_empty() {
                continue;
            }
            candidates.push(root.join(relative_dir).join(name));
            candidates.push(root.join(relative_dir).join(".debug").join(name));
            candidates.push(root.join("usr/lib/debug").join(relative_dir).join(name));
        }
    }
    candidates.into_iter().find_map(|candidate| {
        let file = File::open(&candidate).ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let debug = inspect(&file).ok()?;
        let matches = match (&info.build_id, &debug.build_id) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => info
                .debuglink
                .as_ref()
                .is_some_and(|(_, crc)| crc32_of(&file).is_ok_and(|actual| actual == *crc)),
        };
        (matches && (debug.has_dwarf || debug.has_symtab)).then_some(DebugFile {
            file,
            path: candidate,
            dwarf_bytes: debug.dwarf_bytes,
        })
    })
}

fn crc32_of(file: &File) -> io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut offset = 0;
    loop {
        let read = file.read_at(&mut buffer, offset)?;
        if read == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buffer[..read]);
        offset += read as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_the_test_binary() {
        let exe = File::open("/proc/self/exe").expect("own executable");
        let info = inspect(&exe).expect("valid ELF");
        assert!(!info.loads.is_empty());
        // Built with force-frame-pointers (see .cargo/config.toml).
        let fp = info.frame_pointers.expect("has function symbols");
        assert!(fp.present(), "{fp:?}");
        // Test builds carry DWARF; it is part of the file.
        let size = exe.metadata().expect("metadata").len();
        assert!(
            info.has_dwarf && info.dwarf_bytes > 0 && info.dwarf_bytes < size,
            "{info:?}"
        );
        let text = info
            .loads
            .iter()
            .find(|l| l.offset > 0)
            .expect("a second load");
        let offset = text.offset + 4;
        assert_eq!(
            info.offset_of(info.vaddr_of(offset).expect("mapped")),
            Some(offset)
        );
    }

    #[test]
    fn prologue_patterns() {
        let mut code = [0u8; 16];
        code[..4].copy_from_slice(&[0x55, 0x48, 0x89, 0xe5]);
        assert!(sets_up_frame_pointer(object::Architecture::X86_64, &code));
        let mut endbr = [0u8; 16];
        endbr[..8].copy_from_slice(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5]);
        assert!(sets_up_frame_pointer(object::Architecture::X86_64, &endbr));
        // push %rbx; sub $0x10,%rsp: no frame pointer.
        let mut other = [0u8; 16];
        other[..5].copy_from_slice(&[0x53, 0x48, 0x83, 0xec, 0x10]);
        assert!(!sets_up_frame_pointer(object::Architecture::X86_64, &other));
        // stp x29, x30, [sp, #-16]!
        let mut arm = [0u8; 16];
        arm[..4].copy_from_slice(&0xa9bf_7bfd_u32.to_le_bytes());
        assert!(sets_up_frame_pointer(object::Architecture::Aarch64, &arm));
    }
}
