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
    sync::OnceLock,
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
/// Only functions whose first instruction decides it count: one that sets up the frame
/// pointer, or one that builds a frame without it (pushes another register, moves the
/// stack pointer, calls). Leaf and tail-call stubs (`lea ...; ret`, `jmp`) have no frame
/// either way, and the C runtime's start-up code (`_start`, `_init`, `frame_dummy`, ...)
/// and Rust's precompiled standard library are not built with the program's flags:
/// none of them is counted.
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
            let (table, names) = match object.section_by_name(".symtab") {
                Some(table) => (table, object.section_by_name(".strtab")),
                None => (
                    object.section_by_name(".dynsym")?,
                    object.section_by_name(".dynstr"),
                ),
            };
            Some(SymbolTable {
                entries: table.file_range()?,
                names: names.and_then(|names| names.file_range()),
            })
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
    if let Some(table) = symbols {
        let mut check = FramePointers {
            sampled: 0,
            with_frame_pointer: 0,
        };
        for address in sample_functions(file, &table) {
            let Some(offset) = info.offset_of(address) else {
                continue;
            };
            let mut prologue = [0u8; 16];
            if file.read_exact_at(&mut prologue, offset).is_err() {
                continue;
            }
            match prologue_kind(architecture, &prologue) {
                Prologue::FramePointer => {
                    check.sampled += 1;
                    check.with_frame_pointer += 1;
                }
                Prologue::FrameWithout => check.sampled += 1,
                Prologue::Undecided => {}
            }
            if check.sampled as usize == PROLOGUE_SAMPLES {
                break;
            }
        }
        info.frame_pointers = (check.sampled > 0).then_some(check);
    }
    Ok(info)
}

/// Where a symbol table and its names are in the file.
struct SymbolTable {
    entries: (u64, u64),
    names: Option<(u64, u64)>,
}

/// Functions of the C runtime's start-up and shutdown code (crt1.o, crti.o, crtbegin.o):
/// linked into every C program, built without regard to its flags, and rarely on a stack.
const CRT_FUNCTIONS: [&str; 10] = [
    "_start",
    "_init",
    "_fini",
    "deregister_tm_clones",
    "register_tm_clones",
    "__do_global_dtors_aux",
    "frame_dummy",
    "__libc_csu_init",
    "__libc_csu_fini",
    "_dl_relocate_static_pie",
];

/// Crates of Rust's standard library (and the crates it is built from), shipped
/// precompiled: their functions keep frame pointers or not whatever the program's own
/// flags say (x86-64 Linux builds them with frame pointers).
const RUST_STD_CRATES: [&str; 14] = [
    "std",
    "core",
    "alloc",
    "__rustc",
    "panic_unwind",
    "panic_abort",
    "hashbrown",
    "std_detect",
    "rustc_demangle",
    "addr2line",
    "gimli",
    "object",
    "miniz_oxide",
    "adler2",
];

/// Whether `name` is a function of the C runtime or of Rust's precompiled standard
/// library: code linked into the binary but not built with its flags.
fn is_crt_function(name: &[u8]) -> bool {
    CRT_FUNCTIONS.iter().any(|crt| crt.as_bytes() == name)
        || name.starts_with(b"__x86.get_pc_thunk")
        || rust_crate(name)
            .is_some_and(|krate| RUST_STD_CRATES.iter().any(|s| s.as_bytes() == krate))
}

/// The crate of a mangled Rust name: the first path component of a legacy name
/// (`_ZN3std2io5stdio...` is `std`; `_ZN60_$LT$alloc..string..String$u20$as$u20$...` is
/// `alloc`), the first crate root of a v0 name (`_RNvNtCsgEmfK_3std2io5print` is `std`).
fn rust_crate(name: &[u8]) -> Option<&[u8]> {
    if let Some(path) = name.strip_prefix(b"_R") {
        return v0_crate(path);
    }
    let rest = name.strip_prefix(b"_ZN")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let len: usize = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let component = rest.get(digits..digits + len)?;
    let component = component.strip_prefix(b"_$LT$").unwrap_or(component);
    let end = component
        .windows(2)
        .position(|pair| pair == b"..")
        .unwrap_or(component.len());
    Some(&component[..end])
}

/// The first crate root (`C`, an optional `s<base62>_` disambiguator, then `<len><name>`)
/// of a v0-mangled path.
fn v0_crate(path: &[u8]) -> Option<&[u8]> {
    (0..path.len()).find_map(|at| {
        let mut rest = path[at..].strip_prefix(b"C")?;
        if let Some(after) = rest.strip_prefix(b"s") {
            let hash = after
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
            rest = after[hash..].strip_prefix(b"_")?;
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let len: usize = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        // A `_` separates the length from a name that starts with a digit or `_`.
        let start = digits + usize::from(rest.get(digits) == Some(&b'_'));
        let ident = rest.get(start..start + len)?;
        (len > 0
            && ident
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_'))
        .then_some(ident)
    })
}

/// Size of an `Elf64_Sym`.
const SYMBOL_SIZE: u64 = 24;
/// `STT_FUNC`.
const FUNCTION_SYMBOL: u8 = 2;

/// Addresses of function symbols spread evenly over an ELF64 little-endian symbol table,
/// read entry by entry (large binaries have millions of symbols), leaving out the C
/// runtime's own functions and Rust's precompiled standard library. More than [`PROLOGUE_SAMPLES`]: not every prologue decides.
fn sample_functions(file: &File, table: &SymbolTable) -> Vec<u64> {
    let (offset, size) = table.entries;
    let count = size / SYMBOL_SIZE;
    // Look at more entries than needed: many symbols are not functions.
    let probes = (PROLOGUE_SAMPLES as u64 * 8).min(count);
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
        let name = u32::from_le_bytes(entry[0..4].try_into().unwrap_or_default());
        let value = u64::from_le_bytes(entry[8..16].try_into().unwrap_or_default());
        let size = u64::from_le_bytes(entry[16..24].try_into().unwrap_or_default());
        if kind != FUNCTION_SYMBOL || value == 0 || size < 8 || functions.contains(&value) {
            continue;
        }
        if symbol_name(file, table.names, name).is_some_and(|name| is_crt_function(&name)) {
            continue;
        }
        functions.push(value);
        if functions.len() == PROLOGUE_SAMPLES * 4 {
            break;
        }
    }
    functions
}

/// The name at `offset` in a string table (at most 64 bytes: enough to recognise the
/// C runtime's functions).
fn symbol_name(file: &File, names: Option<(u64, u64)>, offset: u32) -> Option<Vec<u8>> {
    let (start, size) = names?;
    let offset = u64::from(offset);
    if offset >= size {
        return None;
    }
    let mut name = vec![0u8; (size - offset).min(64) as usize];
    file.read_exact_at(&mut name, start + offset).ok()?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    name.truncate(end);
    Some(name)
}

fn invalid(err: object::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not a readable ELF file: {err}"),
    )
}

/// What a function's first instructions say about frame pointers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prologue {
    /// Saves and sets up the frame pointer.
    FramePointer,
    /// Builds a frame without one: saves another register, moves the stack pointer or
    /// calls right away.
    FrameWithout,
    /// No frame at entry (a leaf, a tail call, a test before a shrink-wrapped
    /// prologue): says nothing about how the binary was built.
    Undecided,
}

fn prologue_kind(architecture: object::Architecture, code: &[u8; 16]) -> Prologue {
    match architecture {
        object::Architecture::X86_64 => {
            // An `endbr64` may come first (CET).
            let code = code.strip_prefix(&[0xf3, 0x0f, 0x1e, 0xfa]).unwrap_or(code);
            let contains = |needle: &[u8]| code.windows(needle.len()).any(|w| w == needle);
            // push %rbp; mov %rsp,%rbp (either encoding), at the start or after the
            // early-exit test of a shrink-wrapped function.
            if contains(&[0x55, 0x48, 0x89, 0xe5]) || contains(&[0x55, 0x48, 0x8b, 0xec]) {
                return Prologue::FramePointer;
            }
            let frame = matches!(
                code,
                // push of a register (%rbp too: saved as a plain register), or a call.
                [0x50..=0x57 | 0xe8, ..] | [0x41, 0x50..=0x57, ..]
            ) || contains(&[0x48, 0x83, 0xec])
                || contains(&[0x48, 0x81, 0xec]);
            if frame {
                Prologue::FrameWithout
            } else {
                Prologue::Undecided
            }
        }
        object::Architecture::Aarch64 => {
            let words = code
                .chunks_exact(4)
                .take(3)
                .map(|word| u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
            let mut frame = false;
            for insn in words {
                // stp x29, x30, [sp, #imm]{!}: pre-indexed or signed offset.
                if insn & 0xffc0_7fff == 0xa980_7bfd || insn & 0xffc0_7fff == 0xa900_7bfd {
                    return Prologue::FramePointer;
                }
                // sub sp, sp, #imm, or any store pair pre-indexed on sp.
                frame |= insn & 0xff80_03ff == 0xd100_03ff || insn & 0xffc0_03e0 == 0xa980_03e0;
            }
            if frame {
                Prologue::FrameWithout
            } else {
                Prologue::Undecided
            }
        }
        _ => Prologue::Undecided,
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
    /// Its copy with compressed sections stored plain, made the first time its DWARF is
    /// read (`None`: nothing compressed, or no copy could be made).
    plain: OnceLock<Option<File>>,
}

impl DebugFile {
    /// The file to read its DWARF from: the plain copy of a compressed one.
    pub fn dwarf_source(&self) -> &File {
        self.plain
            .get_or_init(|| super::plain_dwarf::copy_of(&self.file, &self.path))
            .as_ref()
            .unwrap_or(&self.file)
    }
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
            plain: OnceLock::new(),
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
        let code = |bytes: &[u8]| {
            let mut code = [0u8; 16];
            code[..bytes.len()].copy_from_slice(bytes);
            prologue_kind(object::Architecture::X86_64, &code)
        };
        assert_eq!(code(&[0x55, 0x48, 0x89, 0xe5]), Prologue::FramePointer);
        assert_eq!(
            code(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5]),
            Prologue::FramePointer
        );
        // push %rbx; sub $0x10,%rsp
        assert_eq!(
            code(&[0x53, 0x48, 0x83, 0xec, 0x10]),
            Prologue::FrameWithout
        );
        // push %r15
        assert_eq!(code(&[0x41, 0x57]), Prologue::FrameWithout);
        // sub $0x8,%rsp (gcc -O2's main without frame pointers)
        assert_eq!(code(&[0x48, 0x83, 0xec, 0x08]), Prologue::FrameWithout);
        // push %rbp; mov $0xa,%ebp: %rbp saved as a plain register.
        assert_eq!(code(&[0x55, 0xbd, 0x0a, 0, 0, 0]), Prologue::FrameWithout);
        // movabs $imm,%rax; sub $0x18,%rsp
        let mut movabs = vec![0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8];
        movabs.extend([0x48, 0x83, 0xec, 0x18]);
        assert_eq!(code(&movabs), Prologue::FrameWithout);
        // test %edi,%edi; jle; push %rbp; mov %rsp,%rbp: shrink-wrapped, with.
        assert_eq!(
            code(&[0x85, 0xff, 0x7e, 0x10, 0x55, 0x48, 0x89, 0xe5]),
            Prologue::FramePointer
        );
        // call rel32 at entry
        assert_eq!(code(&[0xe8, 1, 2, 3, 4]), Prologue::FrameWithout);
        // lea 0x1(%rdi,%rdi,2),%eax; ret: a leaf, undecided.
        assert_eq!(code(&[0x8d, 0x44, 0x3f, 0x01, 0xc3]), Prologue::Undecided);
        // endbr64; jmp: a tail-call stub (frame_dummy).
        assert_eq!(
            code(&[0xf3, 0x0f, 0x1e, 0xfa, 0xe9, 0, 0, 0, 0]),
            Prologue::Undecided
        );
        // stp x29, x30, [sp, #-16]!
        let mut arm = [0u8; 16];
        arm[..4].copy_from_slice(&0xa9bf_7bfd_u32.to_le_bytes());
        assert_eq!(
            prologue_kind(object::Architecture::Aarch64, &arm),
            Prologue::FramePointer
        );
        assert!(is_crt_function(b"deregister_tm_clones"));
        assert!(!is_crt_function(b"w"));
        assert!(is_crt_function(
            b"_ZN3std2io5stdio6_print17h0123456789abcdefE"
        ));
        assert!(is_crt_function(
            b"_ZN60_$LT$alloc..string..String$u20$as$u20$core..fmt..Display$GT$3fmt17h01E"
        ));
        assert!(!is_crt_function(b"_ZN7release4busy17h0123456789abcdefE"));
        assert!(!is_crt_function(b"_ZN6core_x3foo17h01E"));
        assert!(is_crt_function(b"_RNvNtCsgEmfK2Xq_3std2io5print"));
        assert!(is_crt_function(
            b"_RNvMs_NtCs1a_5alloc3vecINtB4_3VecpE4push"
        ));
        assert!(!is_crt_function(b"_RNvCsfLfy_7release4main"));
        assert!(is_crt_function(b"_RNvCsfLfy6EI15iL_7___rustc10rust_panic"));
    }
}
