//! Turning addresses into frames with blazesym: kernel addresses through `/proc/kallsyms`
//! (module names from its `[module]` column), user code by binary: a normalized address
//! (a file offset in a binary known by its build-id) is symbolized from the binary, or
//! from its separate debug file, with DWARF for file, line and inlined functions, Rust and
//! C++ demangling. User symbolization runs on deadline-bounded lanes (`lanes.rs`), one
//! blazesym instance per binary, shared by every process that runs it.

use std::{
    collections::HashMap,
    ffi::OsStr,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use blazesym::symbolize::{
    CodeInfo, Input, Symbolized, Symbolizer as Blazesym,
    source::{Elf, Kernel, Source},
};
use stallscope_profile::{Frame, FrameKind};

use crate::{
    metrics::{METRICS, SymbolCache},
    symbols::binaries::BinaryFile,
};

/// Frames of one address (inlined calls expanded), innermost first.
pub type Frames = Arc<[Frame]>;

/// Addresses of return sites point after the call; looking up `ip - 1` finds the call
/// itself (the right function, line and inline chain). The innermost frame is an exact IP.
pub fn lookup_addresses(ips: &[u64], leaf_is_exact: bool) -> Vec<u64> {
    ips.iter()
        .enumerate()
        .map(|(i, &ip)| {
            if i == 0 && leaf_is_exact {
                ip
            } else {
                ip.saturating_sub(1)
            }
        })
        .collect()
}

pub fn unknown_frame(
    function: String,
    module: Option<String>,
    address: u64,
    kind: FrameKind,
) -> Frame {
    Frame {
        function,
        module,
        file: None,
        line: None,
        address,
        kind,
    }
}

/// A symbol name as people read it: Rust (legacy `_ZN...E` and v0 `_R...`) and C++
/// (`_Z...`) names demangled, Rust's without the hash; anything else as it is. A name is
/// demangled only when it carries a mangling prefix: blazesym 0.2.7 (`maybe_demangle_impl`
/// in `src/symbolize/symbolizer.rs`) hands every name whose language it does not know,
/// which includes all C, to `cpp_demangle`, which parses a bare type code as a complete
/// mangled name, so C functions called `w`, `x` or `a` came out as `wchar_t`, `long long`
/// and `signed char`. Its demangling is therefore off and this is used instead.
pub fn demangle(name: &str) -> String {
    if (name.starts_with("_R") || name.starts_with("_ZN"))
        && let Ok(rust) = rustc_demangle::try_demangle(name)
    {
        return format!("{rust:#}");
    }
    if name.starts_with("_Z")
        && let Ok(symbol) = cpp_demangle::Symbol::new(name)
        && let Ok(text) = symbol.demangle()
    {
        return text;
    }
    name.to_owned()
}

/// Frames for one symbolized address, innermost first (inlined callees before the
/// function that contains them). blazesym gives each function of the inline chain its own
/// location: where the address is, or where it calls the next inlined function.
fn frames_of(
    symbolized: &Symbolized<'_>,
    module: Option<&str>,
    address: u64,
    kind: FrameKind,
) -> Option<Vec<Frame>> {
    let sym = symbolized.as_sym()?;
    let module = module.map(str::to_owned).or_else(|| {
        sym.module
            .as_deref()
            .map(|m: &OsStr| m.to_string_lossy().into_owned())
    });
    let frame = |function: &str, code: Option<&CodeInfo<'_>>| Frame {
        function: demangle(function),
        module: module.clone(),
        file: code.map(|code| code.to_path().display().to_string()),
        line: code.and_then(|code| code.line),
        address,
        kind,
    };
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|inlined| frame(&inlined.name, inlined.code_info.as_ref()))
        .collect();
    frames.push(frame(&sym.name, sym.code_info.as_deref()));
    Some(frames)
}

fn blazesym() -> Blazesym {
    Blazesym::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        // Names are demangled by `demangle`, only where they carry a mangling prefix.
        .enable_demangling(false)
        // Debug files are found by the agent in the binary's own mount namespace
        // (`elf::find_debug_file`); searching the host's directories could pick a wrong
        // file for a container's binary.
        .set_debug_dirs(Some(Vec::<PathBuf>::new()))
        .build()
}

/// Kernel symbolization, cached per address while recent periods use the address.
pub struct KernelSymbolizer {
    inner: Blazesym,
    /// Frames by address, with the period that last used them.
    cache: HashMap<u64, (Frames, u32)>,
    period: u32,
    /// Address ranges of loaded modules, from kallsyms.
    modules: Option<Vec<(u64, u64, Arc<str>)>>,
}

impl Default for KernelSymbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl KernelSymbolizer {
    /// Addresses cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Ends a profile period: forgets addresses no stack used for
    /// [`KEEP_PERIODS`](crate::symbols::KEEP_PERIODS) periods.
    pub fn end_period(&mut self) {
        let period = self.period;
        self.cache
            .retain(|_, (_, used)| period.wrapping_sub(*used) < crate::symbols::KEEP_PERIODS);
        self.period = self.period.wrapping_add(1);
    }

    pub fn new() -> Self {
        Self {
            inner: blazesym(),
            cache: HashMap::new(),
            period: 0,
            modules: None,
        }
    }

    /// Kernel frames for a kernel stack (innermost first).
    pub fn frames(&mut self, ips: &[u64], leaf_is_exact: bool) -> Vec<Frame> {
        let addresses = lookup_addresses(ips, leaf_is_exact);
        let missing: Vec<u64> = addresses
            .iter()
            .copied()
            .filter(|addr| !self.cache.contains_key(addr))
            .collect();
        METRICS.symbol_lookups(
            SymbolCache::Kernel,
            (addresses.len() - missing.len()) as u64,
            missing.len() as u64,
        );
        if !missing.is_empty() {
            let source = Source::Kernel(Kernel {
                kallsyms: blazesym::MaybeDefault::Default,
                vmlinux: blazesym::MaybeDefault::None,
                debug_syms: false,
                ..Kernel::default()
            });
            let modules: Vec<Option<String>> =
                missing.iter().map(|&addr| self.module_of(addr)).collect();
            let results = self
                .inner
                .symbolize(&source, Input::AbsAddr(&missing))
                .map_err(|err| tracing::debug!("kernel symbolization failed: {err}"))
                .unwrap_or_default();
            for ((index, &addr), module) in missing.iter().enumerate().zip(modules) {
                let frames = results
                    .get(index)
                    .and_then(|s| frames_of(s, module.as_deref(), addr, FrameKind::Kernel))
                    .unwrap_or_else(|| {
                        vec![unknown_frame(
                            format!("[unknown] {addr:#x}"),
                            module,
                            addr,
                            FrameKind::Kernel,
                        )]
                    });
                self.cache.insert(addr, (frames.into(), self.period));
            }
        }
        let mut stack = Vec::with_capacity(addresses.len());
        for addr in &addresses {
            if let Some((frames, used)) = self.cache.get_mut(addr) {
                *used = self.period;
                stack.extend(frames.iter().cloned());
            }
        }
        stack
    }

    /// The module holding `addr`, or `None` for the kernel image.
    fn module_of(&mut self, addr: u64) -> Option<String> {
        let modules = self.modules.get_or_insert_with(read_module_ranges);
        let index = modules.partition_point(|(start, _, _)| *start <= addr);
        let (_, end, name) = modules.get(index.checked_sub(1)?)?;
        (addr <= *end).then(|| name.to_string())
    }
}

/// Address ranges of kernel modules, from the symbols `/proc/kallsyms` tags `[module]`.
fn read_module_ranges() -> Vec<(u64, u64, Arc<str>)> {
    let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    parse_module_ranges(&text)
}

fn parse_module_ranges(kallsyms: &str) -> Vec<(u64, u64, Arc<str>)> {
    let mut ranges: HashMap<&str, (u64, u64)> = HashMap::new();
    for line in kallsyms.lines() {
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(_name), Some(module)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Some(module), Ok(addr)) = (
            module.strip_prefix('[').and_then(|m| m.strip_suffix(']')),
            u64::from_str_radix(addr, 16),
        ) else {
            continue;
        };
        if addr == 0 {
            continue;
        }
        let range = ranges.entry(module).or_insert((addr, addr));
        range.0 = range.0.min(addr);
        range.1 = range.1.max(addr);
    }
    let mut ranges: Vec<(u64, u64, Arc<str>)> = ranges
        .into_iter()
        // The last symbol's size is unknown: allow a page past it.
        .map(|(name, (start, end))| (start, end + 4096, Arc::from(name)))
        .collect();
    ranges.sort_by_key(|(start, _, _)| *start);
    ranges
}

/// Most binaries whose blazesym state (parsed symbols and DWARF) one lane keeps.
const BINARIES_PER_LANE: usize = 32;

/// Most bytes of symbol sources (binaries or their debug files) whose parsed state one
/// lane keeps between jobs. Parsed DWARF grows with the file, so a host running a few
/// large binaries with debug info would otherwise hold hundreds of megabytes. A file
/// larger than the budget is parsed, used for one job and dropped; the resolver's
/// per-binary frame cache means it is parsed again only for offsets not seen before.
const SOURCE_BYTES_PER_LANE: u64 = 24 << 20;

/// Most DWARF (uncompressed) of a source a lane keeps parsed between jobs, whatever its
/// file's size: blazesym holds the sections decompressed and its tables built from
/// them. On a busy host that is libc's debug file (4 MB compressed, 10 MB of DWARF;
/// 12-20 MB resident while kept, a 15 MB burst and 35 ms of CPU to parse), which sees a
/// few new offsets nearly every second: the resolver asks for such a source's new
/// offsets once a profile period, when it settles, and the lane drops it after.
const KEPT_DWARF_BYTES: u64 = 4 << 20;

/// What a symbol source counts against a lane's budget (its file's `file_bytes`), or
/// `None` if a lane does not keep it between jobs (more DWARF than
/// [`KEPT_DWARF_BYTES`] to symbolize with, at most `dwarf_max`).
fn counted_bytes(file_bytes: u64, file: &BinaryFile, dwarf_max: u64) -> Option<u64> {
    let dwarf = file.dwarf_bytes();
    let large_dwarf = dwarf <= dwarf_max && dwarf > KEPT_DWARF_BYTES;
    (!large_dwarf && file_bytes <= SOURCE_BYTES_PER_LANE).then_some(file_bytes)
}

/// Whether a lane keeps `file`'s parsed symbol source between jobs. A source it does
/// not keep is parsed again for every job.
pub fn kept_between_jobs(file: &BinaryFile, dwarf_max: u64) -> bool {
    let source = file.debug.as_ref().map_or(&file.file, |debug| &debug.file);
    let file_bytes = source.metadata().map_or(0, |meta| meta.len());
    counted_bytes(file_bytes, file, dwarf_max).is_some()
}

struct Kept {
    symbolizer: Blazesym,
    used: Instant,
    source_bytes: u64,
}

/// A lane's blazesym instances, one per binary, least recently used evicted beyond
/// [`BINARIES_PER_LANE`] binaries or [`SOURCE_BYTES_PER_LANE`] bytes of sources.
#[derive(Default)]
pub struct LaneSymbolizers {
    by_binary: HashMap<u32, Kept>,
}

impl LaneSymbolizers {
    fn get(&mut self, binary: u32, source_bytes: u64) -> &Blazesym {
        let entry = self.by_binary.entry(binary).or_insert_with(|| Kept {
            symbolizer: blazesym(),
            used: Instant::now(),
            source_bytes,
        });
        entry.used = Instant::now();
        &entry.symbolizer
    }

    /// Evicts least recently used state until the lane is within its budgets. The heap
    /// that parsed DWARF leaves free goes back to the kernel: glibc would otherwise keep
    /// the arena at its high-water mark (24 MB after one large debug build).
    fn trim(&mut self) {
        // A source over the budget on its own goes first, not the others before it.
        let before = self.by_binary.len();
        self.by_binary
            .retain(|_, kept| kept.source_bytes <= SOURCE_BYTES_PER_LANE);
        let mut evicted = self.by_binary.len() < before;
        loop {
            let bytes =
                (self.by_binary.values()).fold(0u64, |sum, k| sum.saturating_add(k.source_bytes));
            if self.by_binary.len() <= BINARIES_PER_LANE && bytes <= SOURCE_BYTES_PER_LANE {
                break;
            }
            let Some(oldest) = self
                .by_binary
                .iter()
                .min_by_key(|(_, kept)| kept.used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            self.by_binary.remove(&oldest);
            evicted = true;
        }
        if evicted {
            crate::system::release_free_memory();
        }
    }

    /// Drops the state of a binary the agent no longer tracks.
    pub fn forget(&mut self, binary: u32) {
        self.by_binary.remove(&binary);
    }
}

/// Most bytes of DWARF (`.debug_*` sections, uncompressed) the agent parses to symbolize
/// one binary, by default. Parsing DWARF maps the file and touches most of it (unit
/// headers, string tables, line programs), then builds tables from it: a 111 MB debug
/// build with 95 MB of DWARF costs 40 MB for its first address and over 100 MB for a few
/// hundred, in one burst. A binary with more DWARF (a debug build, a large C++ or Rust
/// service's debug file) is symbolized from its ELF symbol table instead: demangled
/// function names, without `file:line` and without inlined frames; each profile notes
/// which binaries were. Bounds the transient cost of one symbolization job to about the
/// budget (`[symbols] dwarf_max_mb` raises or lowers it).
pub const DWARF_MAX_BYTES: u64 = 16 << 20;

/// Held while a lane parses a source it does not keep after the job (and until it
/// dropped it).
static PARSED_PER_JOB: Mutex<()> = Mutex::new(());

/// Symbolizes file offsets of one binary (`binary` is its id in the agent's table), with
/// DWARF if the binary's (or its debug file's) DWARF is at most `dwarf_max` bytes, else
/// from its symbol table. Returns one entry per offset; an offset without a symbol gets
/// an `[unknown]` frame naming the binary and offset.
pub fn symbolize_offsets(
    lane: &mut LaneSymbolizers,
    binary: u32,
    file: &BinaryFile,
    offsets: &[u64],
    dwarf_max: u64,
) -> Vec<(u64, Frames)> {
    let module = file.path.to_string();
    let source_file = file.debug.as_ref().map_or(&file.file, |debug| &debug.file);
    let file_bytes = source_file.metadata().map_or(0, |meta| meta.len());
    let with_dwarf = file.dwarf_bytes() <= dwarf_max;
    // A debug file's DWARF from its plain copy if it is compressed (`plain_dwarf.rs`).
    let parsed_file = match &file.debug {
        Some(debug) if with_dwarf => debug.dwarf_source(),
        _ => source_file,
    };
    // Through the agent's own descriptor: works whatever namespace the binary lives in,
    // and after it was deleted or its process exited.
    let mut elf = Elf::new(format!("/proc/self/fd/{}", parsed_file.as_raw_fd()));
    elf.debug_syms = with_dwarf;
    // Not kept: more than any budget, so the lane drops it after this job.
    let source_bytes = counted_bytes(file_bytes, file, dwarf_max).unwrap_or(u64::MAX);
    let source = Source::Elf(elf);
    let vaddrs: Vec<Option<u64>> = offsets.iter().map(|&o| file.info.vaddr_of(o)).collect();
    let valid: Vec<u64> = vaddrs.iter().flatten().copied().collect();
    if !lane.by_binary.contains_key(&binary) {
        tracing::debug!(
            "symbolizing {} offsets of {module}: parsing its symbol source ({file_bytes} bytes{})",
            valid.len(),
            if source_bytes == u64::MAX {
                ", not kept after the job"
            } else {
                ""
            }
        );
    }
    // A source parsed for this job only is the lanes' largest transient: one at a time
    // across the lanes, so two (libc's debug file and a 23 MB library, say) never add up.
    let _one_at_a_time = (source_bytes == u64::MAX).then(|| {
        PARSED_PER_JOB
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    });
    let symbolizer = lane.get(binary, source_bytes);
    let results = match symbolizer.symbolize(&source, Input::VirtOffset(&valid)) {
        Ok(results) => results,
        Err(err) => {
            tracing::debug!("symbolizing {module} failed: {err}");
            Vec::new()
        }
    };
    let mut results = results.into_iter();
    let frames: Vec<(u64, Frames)> = offsets
        .iter()
        .zip(vaddrs)
        .map(|(&offset, vaddr)| {
            let symbolized = vaddr.and_then(|_| results.next());
            let frames = symbolized
                .as_ref()
                .and_then(|s| frames_of(s, Some(&module), offset, FrameKind::User))
                .unwrap_or_else(|| {
                    vec![unknown_frame(
                        format!("[unknown] {module}+{offset:#x}"),
                        Some(module.clone()),
                        offset,
                        FrameKind::User,
                    )]
                });
            (offset, Frames::from(frames))
        })
        .collect();
    drop(results);
    lane.trim();
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mangled_names_are_demangled() {
        // C functions whose names are also C++ type codes stay what they are.
        for name in ["w", "x", "a", "c", "i", "xy", "abc", "main", "Z"] {
            assert_eq!(demangle(name), name);
        }
        assert_eq!(
            demangle("_ZN3std2rt10lang_start17h0123456789abcdefE"),
            "std::rt::lang_start"
        );
        assert_eq!(demangle("_Z3addii"), "add(int, int)");
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_earlier() {
        assert_eq!(lookup_addresses(&[10, 20, 30], true), vec![10, 19, 29]);
        assert_eq!(lookup_addresses(&[10, 20], false), vec![9, 19]);
    }

    /// Symbolizes a function of this test binary (a debug build, with DWARF) under a
    /// DWARF budget; returns the innermost frame.
    #[inline(never)]
    fn own_function_frame(dwarf_max: u64) -> Frame {
        let maps = std::fs::read("/proc/self/maps").expect("own maps");
        let mappings = crate::process::procfs::parse_maps(&maps)
            .expect("own maps parse")
            .code;
        let here = own_function_frame as *const () as u64;
        let mapping = crate::process::procfs::find_mapping(&mappings, here).expect("mapped");
        let binary =
            crate::symbols::binaries::open_binary(std::process::id(), mapping).expect("opens");
        assert!(
            binary.dwarf_bytes() > 0,
            "test binaries are built with DWARF"
        );
        let offset = mapping.file_offset(here);
        let mut lane = LaneSymbolizers::default();
        let frames = symbolize_offsets(&mut lane, 0, &binary, &[offset], dwarf_max);
        frames[0].1.last().expect("a frame").clone()
    }

    #[test]
    fn dwarf_within_the_budget_gives_file_and_line() {
        let frame = own_function_frame(u64::MAX);
        assert!(frame.function.contains("own_function_frame"), "{frame:?}");
        assert!(
            frame
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("symbolize.rs")),
            "{frame:?}"
        );
        assert!(frame.line.is_some(), "{frame:?}");
    }

    #[test]
    fn dwarf_over_the_budget_gives_the_symbol_only() {
        let frame = own_function_frame(0);
        assert!(frame.function.contains("own_function_frame"), "{frame:?}");
        assert_eq!(
            (frame.file.as_deref(), frame.line),
            (None, None),
            "{frame:?}"
        );
    }

    #[test]
    fn a_source_over_the_budget_goes_without_evicting_the_others() {
        let mut lane = LaneSymbolizers::default();
        let kept = |lane: &LaneSymbolizers| {
            let mut ids: Vec<u32> = lane.by_binary.keys().copied().collect();
            ids.sort_unstable();
            ids
        };
        let _ = lane.get(1, 4 << 20);
        let _ = lane.get(2, 4 << 20);
        let _ = lane.get(3, SOURCE_BYTES_PER_LANE + 1);
        lane.trim();
        assert_eq!(kept(&lane), [1, 2]);
        // Over the budget together: the least recently used goes.
        let _ = lane.get(4, 20 << 20);
        lane.trim();
        assert_eq!(kept(&lane), [2, 4]);
    }

    #[test]
    fn module_ranges_from_kallsyms() {
        let text = "ffffffff81000000 T _text\nffffffffc0001000 t foo_init\t[foo]\nffffffffc0002000 T foo_read\t[foo]\nffffffffc0100000 t bar_x\t[bar]\n";
        let ranges = parse_module_ranges(text);
        assert_eq!(ranges.len(), 2);
        assert_eq!(&*ranges[0].2, "foo");
        assert_eq!(ranges[0].0, 0xffff_ffff_c000_1000);
        assert_eq!(ranges[0].1, 0xffff_ffff_c000_2000 + 4096);
    }
}
