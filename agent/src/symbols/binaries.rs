//! The binaries user stacks run through. Each is opened once, while a process that maps
//! it is alive (through `/proc/PID/map_files`, so it works across mount namespaces and for
//! deleted files), and kept open: symbolization reads it later through the agent's own
//! descriptor, after the process is gone. A binary is known by its build-id (by its file
//! identity without one), so every process and container running the same build shares
//! one entry (the resolver's binary table) and one cache of symbolized frames.

use std::{fs::File, os::unix::fs::MetadataExt, path::PathBuf, sync::Arc};

use crate::{
    process::procfs::{FileId, Mapping},
    symbols::elf::{self, DebugFile, ElfInfo},
};

/// An opened, inspected binary.
#[derive(Debug)]
pub struct BinaryFile {
    pub file_id: FileId,
    /// The path in its process's mount namespace.
    pub path: Arc<str>,
    pub file: File,
    pub debug: Option<DebugFile>,
    pub info: ElfInfo,
}

impl BinaryFile {
    /// Bytes of DWARF the binary's symbols would be read from: its debug file's, if it
    /// has one, else its own.
    pub fn dwarf_bytes(&self) -> u64 {
        self.debug
            .as_ref()
            .map_or(self.info.dwarf_bytes, |debug| debug.dwarf_bytes)
    }
}

/// How `/proc/PID/maps` encodes a device (`major:minor`), from a `stat` device number.
fn maps_dev(dev: u64) -> u64 {
    (u64::from(libc::major(dev)) << 32) | u64::from(libc::minor(dev))
}

fn same_file(file: &File, id: FileId) -> bool {
    file.metadata()
        .is_ok_and(|meta| meta.ino() == id.inode && maps_dev(meta.dev()) == id.dev)
}

/// Opens and inspects the binary of `mapping` in process `pid`: through `map_files` (any
/// namespace, deleted files), else through the process's root directory, else at the
/// same path on the host if it is the same file. Blocks on the file's filesystem: run it
/// on a lane.
pub fn open_binary(pid: u32, mapping: &Mapping) -> Result<BinaryFile, String> {
    let file_id = mapping
        .file
        .ok_or_else(|| "anonymous mapping has no file".to_owned())?;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let relative = mapping.path.trim_start_matches('/');
    let file = File::open(mapping.map_files_path(pid))
        .ok()
        .or_else(|| {
            File::open(root.join(relative))
                .ok()
                .filter(|f| same_file(f, file_id))
        })
        .or_else(|| {
            File::open(&*mapping.path)
                .ok()
                .filter(|f| same_file(f, file_id))
        })
        .ok_or_else(|| format!("cannot open {} of pid {pid}", mapping.path))?;
    let info = elf::inspect(&file).map_err(|err| format!("{}: {err}", mapping.path))?;
    let debug = if info.has_dwarf && info.has_symtab {
        None
    } else {
        elf::find_debug_file(&[root, PathBuf::from("/")], &mapping.path, &info)
    };
    Ok(BinaryFile {
        file_id,
        path: Arc::clone(&mapping.path),
        file,
        debug,
        info,
    })
}

/// The file identity standing for the vDSO, which is not a file.
pub const VDSO_FILE: FileId = FileId {
    dev: u64::MAX,
    inode: 0,
};

/// The vDSO every process of this kernel maps (at its own address): the agent's own copy,
/// saved to an anonymous file so it can be symbolized like any binary. Frames in it are
/// common (`clock_gettime` and friends run there).
pub fn own_vdso() -> Option<BinaryFile> {
    use std::io::Write as _;
    // SAFETY: getauxval has no preconditions.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    if base == 0 {
        return None;
    }
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let (start, end) = maps.lines().find_map(|line| {
        if !line.ends_with("[vdso]") {
            return None;
        }
        let range = line.split_whitespace().next()?;
        let (start, end) = range.split_once('-')?;
        Some((
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        ))
    })?;
    if start != base || end <= start {
        return None;
    }
    // SAFETY: the vDSO is mapped readable at [start, end) for the life of the process.
    let image = unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"stallscope-vdso".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(image).ok()?;
    let info = elf::inspect(&file).ok()?;
    Some(BinaryFile {
        file_id: VDSO_FILE,
        path: Arc::from("[vdso]"),
        file,
        debug: None,
        info,
    })
}

/// How a binary is shared: by build-id, or by file identity when it has none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BinaryKey {
    BuildId(Arc<[u8]>),
    File(FileId),
}

/// Id of a binary in the table.
pub type BinaryId = u32;

/// Functions a complete user stack ends in (its thread's entry point).
const STACK_ROOTS: [&str; 12] = [
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "thread_start",
    "__thread_start",
    "_dl_start_user",
    "runtime.goexit",
];

/// Whether a user stack whose outermost function is `function` reached its thread's
/// entry point; if not, the unwinder probably met a function without a frame pointer.
pub fn reaches_root(function: &str) -> bool {
    STACK_ROOTS.iter().any(|root| {
        function == *root
            || function
                .strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('@') || rest.starts_with('.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots() {
        assert!(reaches_root("start_thread"));
        assert!(reaches_root("__clone3"));
        assert!(reaches_root("runtime.goexit.abi0"));
        assert!(!reaches_root("main"));
        assert!(!reaches_root("start_threads_now"));
    }

    #[test]
    fn own_vdso_is_an_elf_image() {
        let vdso = own_vdso().expect("this kernel maps a vDSO");
        assert!(!vdso.info.loads.is_empty());
    }

    #[test]
    fn opens_own_binary_through_map_files() {
        let maps = std::fs::read("/proc/self/maps").expect("own maps");
        let mappings = crate::process::procfs::parse_maps(&maps)
            .expect("own maps parse")
            .code;
        let here = opens_own_binary_through_map_files as *const () as u64;
        let mapping = crate::process::procfs::find_mapping(&mappings, here).expect("mapped");
        // map_files needs CAP_SYS_ADMIN; the root-path fallback works for anyone.
        let binary = open_binary(std::process::id(), mapping).expect("opens");
        assert!(binary.info.vaddr_of(mapping.file_offset(here)).is_some());
    }
}
