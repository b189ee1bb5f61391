//! What the agent reads about another process from `/proc/PID`: its executable mappings
//! (to normalize user addresses to file offsets), its start time (to tell a recycled pid
//! from the process that had it), its names, cgroup and namespace pid, and its JIT perf
//! map. The reads are the agent's own (bounded in size, and every function that reads may
//! block on the target, a held mmap lock or a hung mount, so it is only called from a
//! deadline-bounded lane, `symbols/lanes.rs`); the `procfs` crate parses what they read.

use std::{
    fs::File,
    io::{self, Read},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use procfs::{
    FromBufRead, FromRead,
    process::{MMPermissions, MMapPath, MemoryMap, MemoryMaps, Stat, Status},
};

/// A file's identity on this host: device and inode, as `/proc/PID/maps` shows them. While
/// the agent holds the file open its inode cannot be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub inode: u64,
}

/// One executable mapping of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// `None` for anonymous memory (JIT code) and pseudo-files (`[vdso]`).
    pub file: Option<FileId>,
    /// The path in the process's own mount namespace, without ` (deleted)`; pseudo-file
    /// names such as `[vdso]`; empty for anonymous memory.
    pub path: Arc<str>,
    pub deleted: bool,
}

impl Mapping {
    /// The file offset of `address`, which must lie in the mapping.
    pub fn file_offset(&self, address: u64) -> u64 {
        address - self.start + self.offset
    }

    /// The `/proc/PID/map_files` entry that opens this mapping's file whatever namespace or
    /// deletion state it is in.
    pub fn map_files_path(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
    }
}

/// What the agent keeps of `/proc/PID/maps`.
#[derive(Debug, Default)]
pub struct AddressSpace {
    /// Executable mappings, sorted by address.
    pub code: Vec<Mapping>,
    /// Address ranges (start, end) of files mapped without execute permission (data and
    /// read-only segments), sorted and merged: an address there is never a return address.
    pub file_data: Vec<(u64, u64)>,
}

/// Parses `/proc/PID/maps` (as read, bytes) with the `procfs` crate.
pub fn parse_maps(maps: &[u8]) -> io::Result<AddressSpace> {
    let maps = MemoryMaps::from_buf_read(maps).map_err(|err| unparsable("maps", &err))?;
    let mut space = AddressSpace::default();
    for map in maps {
        if map.perms.contains(MMPermissions::EXECUTE) {
            space.code.push(executable_mapping(map));
        } else if map.inode != 0 && matches!(map.pathname, MMapPath::Path(_)) {
            let (start, end) = map.address;
            match space.file_data.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => space.file_data.push((start, end)),
            }
        }
    }
    space.code.sort_by_key(|m| m.start);
    space.file_data.sort_unstable();
    Ok(space)
}

/// Whether `address` lies in one of `ranges` (sorted, not overlapping).
pub fn in_ranges(ranges: &[(u64, u64)], address: u64) -> bool {
    let index = ranges.partition_point(|&(start, _)| start <= address);
    index
        .checked_sub(1)
        .and_then(|i| ranges.get(i))
        .is_some_and(|&(_, end)| address < end)
}

/// The agent's view of one executable line of `/proc/PID/maps`.
fn executable_mapping(map: MemoryMap) -> Mapping {
    let path = match map.pathname {
        MMapPath::Path(path) => path.to_string_lossy().into_owned(),
        MMapPath::Anonymous => String::new(),
        MMapPath::Vdso => "[vdso]".to_owned(),
        MMapPath::Vvar => "[vvar]".to_owned(),
        MMapPath::Vsyscall => "[vsyscall]".to_owned(),
        MMapPath::Heap => "[heap]".to_owned(),
        MMapPath::Stack => "[stack]".to_owned(),
        MMapPath::TStack(tid) => format!("[stack:{tid}]"),
        MMapPath::Rollup => "[rollup]".to_owned(),
        MMapPath::Vsys(key) => format!("/SYSV{key:08x}"),
        MMapPath::Other(name) => format!("[{name}]"),
    };
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(path) => (path.to_owned(), true),
        None => (path, false),
    };
    let (major, minor) = map.dev;
    let dev = (u64::from(major as u32) << 32) | u64::from(minor as u32);
    let file = (map.inode != 0 && path.starts_with('/')).then_some(FileId {
        dev,
        inode: map.inode,
    });
    Mapping {
        start: map.address.0,
        end: map.address.1,
        offset: map.offset,
        file,
        path: Arc::from(path),
        deleted,
    }
}

fn unparsable(file: &str, err: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unparsable /proc/PID/{file}: {err}"),
    )
}

/// The mapping holding `address` in `mappings` (sorted by start).
pub fn find_mapping(mappings: &[Mapping], address: u64) -> Option<&Mapping> {
    let index = mappings.partition_point(|m| m.start <= address);
    let mapping = mappings.get(index.checked_sub(1)?)?;
    (address < mapping.end).then_some(mapping)
}

/// Reads a small `/proc` file; at most `limit` bytes.
pub fn read_small(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The process's start time in clock ticks after boot (`starttime` of `/proc/PID/stat`).
pub fn start_ticks(pid: u32) -> io::Result<u64> {
    let stat = read_small(Path::new(&format!("/proc/{pid}/stat")), 4096)?;
    parse_start_ticks(&stat)
}

/// `starttime` of a `/proc/PID/stat` (as read, bytes), parsed by the `procfs` crate.
fn parse_start_ticks(stat: &[u8]) -> io::Result<u64> {
    Stat::from_read(stat)
        .map(|stat| stat.starttime)
        .map_err(|err| unparsable("stat", &err))
}

/// The pid of the process in its own (innermost) pid namespace, from `NSpid:` of a
/// `/proc/PID/status` (as read, bytes), parsed by the `procfs` crate.
pub fn parse_ns_pid(status: &[u8]) -> Option<u32> {
    let status = Status::from_buf_read(status).ok()?;
    let innermost = *status.nspid?.last()?;
    u32::try_from(innermost).ok()
}

/// Command-line arguments from `/proc/PID/cmdline` (NUL-separated bytes). The `procfs`
/// crate only parses this file through its own unbounded read (`Process::cmdline`), so
/// the split stays here, behind the agent's bounded read.
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&byte| byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// A JIT's symbol map (`/tmp/perf-PID.map`): `START SIZE name` lines, addresses in hex.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PerfMap {
    /// (start, end, name), sorted by start.
    symbols: Vec<(u64, u64, Arc<str>)>,
}

/// Largest perf map read (a runaway JIT can write gigabytes).
const PERF_MAP_LIMIT: u64 = 64 * 1024 * 1024;

impl PerfMap {
    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, u64, Arc<str>)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.trim().splitn(3, ' ');
                let start = parts.next()?.trim_start_matches("0x");
                let size = parts.next()?.trim_start_matches("0x");
                let name = parts.next()?.trim();
                let start = u64::from_str_radix(start, 16).ok()?;
                let size = u64::from_str_radix(size, 16).ok()?;
                (!name.is_empty()).then(|| (start, start.saturating_add(size), Arc::from(name)))
            })
            .collect();
        // A later entry for the same address wins (code was re-JITted): keep the last.
        symbols.reverse();
        symbols.sort_by_key(|(start, _, _)| *start);
        symbols.dedup_by_key(|(start, _, _)| *start);
        Self { symbols }
    }

    pub fn lookup(&self, address: u64) -> Option<&Arc<str>> {
        let index = self
            .symbols
            .partition_point(|(start, _, _)| *start <= address);
        let (_, end, name) = self.symbols.get(index.checked_sub(1)?)?;
        (address < *end).then_some(name)
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Reads the perf map of `pid` (whose pid in its own namespace is `ns_pid`) through its
    /// root directory, so a containerized JIT's `/tmp` is found. Only a regular file is
    /// read (a FIFO planted there would block the reader forever).
    pub fn read(pid: u32, ns_pid: u32) -> io::Result<Self> {
        let path = PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map"));
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)?;
        let kind = file.metadata()?.file_type();
        if !kind.is_file() || kind.is_fifo() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let mut text = String::new();
        file.take(PERF_MAP_LIMIT).read_to_string(&mut text)?;
        Ok(Self::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0a0000000-55d0a0001000 r--p 00000000 08:01 1234 /usr/bin/app
55d0a0001000-55d0a0005000 r-xp 00001000 08:01 1234 /usr/bin/app
7f0000000000-7f0000010000 rwxp 00000000 00:00 0 
7f1000000000-7f1000100000 r-xp 00028000 fd:02 99 /tmp/with space/lib.so (deleted)
7f2000000000-7f2000002000 r--p 00031000 fe:00 325843 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f2000002000-7f2000003000 rw-p 00033000 fe:00 325843 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f3000000000-7f3000001000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn keeps_the_data_ranges_of_mapped_files() {
        let space = parse_maps(MAPS.as_bytes()).expect("parses");
        // The app's read-only header, then the data of ld.so (two adjacent segments).
        assert_eq!(
            space.file_data,
            vec![
                (0x55d0_a000_0000, 0x55d0_a000_1000),
                (0x7f20_0000_0000, 0x7f20_0000_3000)
            ]
        );
        assert!(in_ranges(&space.file_data, 0x7f20_0000_2fff));
        assert!(!in_ranges(&space.file_data, 0x7f20_0000_3000));
        assert!(!in_ranges(&space.file_data, 0x55d0_a000_1010), "code");
        assert!(!in_ranges(&space.file_data, 0x7ffd_0000_0000), "anonymous");
    }

    #[test]
    fn parses_executable_mappings() {
        let maps = parse_maps(MAPS.as_bytes()).expect("parses").code;
        assert_eq!(maps.len(), 4, "{maps:?}");
        let app = &maps[0];
        assert_eq!(
            app.file,
            Some(FileId {
                dev: 0x8 << 32 | 1,
                inode: 1234
            })
        );
        assert_eq!(app.file_offset(0x55d0_a000_1010), 0x1010);
        assert_eq!(&*maps[1].path, "");
        assert_eq!(maps[1].file, None);
        assert_eq!(&*maps[2].path, "/tmp/with space/lib.so");
        assert!(maps[2].deleted);
        assert_eq!(&*maps[3].path, "[vdso]");
        assert_eq!(maps[3].file, None);
        assert_eq!(
            find_mapping(&maps, 0x7f10_0000_0010).map(Mapping::inode),
            Some(99)
        );
        assert!(
            find_mapping(&maps, 0x55d0_a000_0010).is_none(),
            "not executable"
        );
        assert!(find_mapping(&maps, 0x10).is_none());
    }

    impl Mapping {
        fn inode(&self) -> u64 {
            self.file.map_or(0, |f| f.inode)
        }
    }

    #[test]
    fn start_time_skips_odd_comms() {
        let stat = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 777 \
                    1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(parse_start_ticks(stat.as_bytes()).expect("parses"), 777);
        assert!(parse_start_ticks(b"garbage").is_err());
    }

    #[test]
    fn own_stat_and_status_parse() {
        let pid = std::process::id();
        assert!(start_ticks(pid).expect("own stat") > 0);
        let status = read_small(Path::new("/proc/self/status"), 64 * 1024).expect("status");
        // Not in a pid namespace of its own here: the innermost pid is the pid.
        assert_eq!(parse_ns_pid(&status), Some(pid));
        assert_eq!(parse_ns_pid(b"Name:\tx\n"), None);
    }

    #[test]
    fn namespace_pid_is_the_innermost() {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let status = status
            .lines()
            .map(|line| {
                if line.starts_with("NSpid:") {
                    "NSpid:\t4242\t7"
                } else {
                    line
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_ns_pid(status.as_bytes()), Some(7));
    }

    #[test]
    fn command_lines_split_at_nul() {
        assert_eq!(
            parse_cmdline(b"/usr/bin/app\0--token\0s3cret\0\0"),
            ["/usr/bin/app", "--token", "s3cret"]
        );
    }

    #[test]
    fn perf_map_lookup() {
        let map = PerfMap::parse(
            "1000 10 jit_a\n0x2000 0x20 LazyCompile:*foo bar.js:3\nbad\n1000 10 jit_a2\n",
        );
        assert_eq!(map.lookup(0x1005).map(|n| &**n), Some("jit_a2"));
        assert_eq!(
            map.lookup(0x201f).map(|n| &**n),
            Some("LazyCompile:*foo bar.js:3")
        );
        assert_eq!(map.lookup(0x2020), None);
        assert_eq!(map.lookup(0x10), None);
    }
}
