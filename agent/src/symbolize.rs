//! Turning instruction pointers into frames: kernel addresses through `/proc/kallsyms`,
//! user addresses through blazesym by process (ELF symbols, DWARF for file, line and inlined
//! functions, Rust and C++ demangling). Results are cached per address.

use std::{
    collections::HashMap,
    ffi::OsStr,
    path::{Path, PathBuf},
};

use blazesym::{
    Pid,
    symbolize::{
        CodeInfo, Input, Symbolized, Symbolizer as Blazesym,
        source::{Kernel, Process, Source},
    },
};
use stallscope_profile::{Frame, FrameKind};

/// Caches of symbolized frames; the inner Vec holds one address's frames (inlined calls
/// expanded), innermost first.
pub struct Symbolizer {
    inner: Blazesym,
    kernel_cache: HashMap<u64, Vec<Frame>>,
    user_cache: HashMap<(u32, u64), Vec<Frame>>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Addresses of return sites point after the call; looking up `ip - 1` finds the call
/// itself (the right function, line and inline chain). The innermost frame is an exact IP.
fn lookup_addresses(ips: &[u64], leaf_is_exact: bool) -> Vec<u64> {
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

fn module_name(module: Option<&OsStr>) -> Option<String> {
    module.map(|m| m.to_string_lossy().into_owned())
}

fn unknown_frame(ip: u64, module: Option<String>, kind: FrameKind) -> Frame {
    Frame {
        function: format!("[unknown] {ip:#x}"),
        module,
        file: None,
        line: None,
        address: ip,
        kind,
    }
}

/// Frames for one symbolized address, innermost first (inlined callees before the
/// function that contains them). blazesym gives each function of the inline chain its own
/// location: where the address is, or where it calls the next inlined function.
fn frames_of(symbolized: &Symbolized<'_>, ip: u64, kind: FrameKind) -> Vec<Frame> {
    let Some(sym) = symbolized.as_sym() else {
        return vec![unknown_frame(ip, None, kind)];
    };
    let module = module_name(sym.module.as_deref());
    let frame = |function: &str, code: Option<&CodeInfo<'_>>| Frame {
        function: function.to_owned(),
        module: module.clone(),
        file: code.map(|code| code.to_path().display().to_string()),
        line: code.and_then(|code| code.line),
        address: ip,
        kind,
    };
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|inlined| frame(&inlined.name, inlined.code_info.as_ref()))
        .collect();
    frames.push(frame(&sym.name, sym.code_info.as_deref()));
    frames
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            inner: Blazesym::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .build(),
            kernel_cache: HashMap::new(),
            user_cache: HashMap::new(),
        }
    }

    /// Kernel frames for a kernel stack (innermost first).
    pub fn kernel_frames(&mut self, ips: &[u64], leaf_is_exact: bool) -> Vec<Frame> {
        let addresses = lookup_addresses(ips, leaf_is_exact);
        let missing: Vec<u64> = addresses
            .iter()
            .copied()
            .filter(|addr| !self.kernel_cache.contains_key(addr))
            .collect();
        if !missing.is_empty() {
            let source = Source::Kernel(Kernel {
                kallsyms: blazesym::MaybeDefault::Default,
                vmlinux: blazesym::MaybeDefault::None,
                debug_syms: false,
                ..Kernel::default()
            });
            match self.inner.symbolize(&source, Input::AbsAddr(&missing)) {
                Ok(results) => {
                    for (addr, symbolized) in missing.iter().zip(&results) {
                        let frames = frames_of(symbolized, *addr, FrameKind::Kernel);
                        self.kernel_cache.insert(*addr, frames);
                    }
                }
                Err(err) => {
                    tracing::debug!("kernel symbolization failed: {err}");
                    for addr in &missing {
                        self.kernel_cache
                            .insert(*addr, vec![unknown_frame(*addr, None, FrameKind::Kernel)]);
                    }
                }
            }
        }
        addresses
            .iter()
            .flat_map(|addr| self.kernel_cache.get(addr).cloned().unwrap_or_default())
            .collect()
    }

    /// User frames of process `pid` for a user stack (innermost first). The process must
    /// still be alive for its mappings to be read.
    pub fn user_frames(&mut self, pid: u32, ips: &[u64], leaf_is_exact: bool) -> Vec<Frame> {
        let addresses = lookup_addresses(ips, leaf_is_exact);
        let missing: Vec<u64> = addresses
            .iter()
            .copied()
            .filter(|addr| !self.user_cache.contains_key(&(pid, *addr)))
            .collect();
        if !missing.is_empty() {
            let source = Source::Process(Process::new(Pid::from(pid)));
            match self.inner.symbolize(&source, Input::AbsAddr(&missing)) {
                Ok(results) => {
                    let exe = executable(pid);
                    for (addr, symbolized) in missing.iter().zip(&results) {
                        let mut frames = frames_of(symbolized, *addr, FrameKind::User);
                        if symbolized.as_sym().is_none() {
                            frames = vec![unknown_frame(*addr, exe.clone(), FrameKind::User)];
                        }
                        self.user_cache.insert((pid, *addr), frames);
                    }
                }
                Err(err) => {
                    // One unreadable module fails the whole batch; retry one by one so the
                    // other addresses still get their symbols.
                    tracing::debug!(
                        "symbolizing pid {pid} failed ({err}); retrying address by address"
                    );
                    let exe = executable(pid);
                    for addr in &missing {
                        let frames =
                            match self.inner.symbolize_single(&source, Input::AbsAddr(*addr)) {
                                Ok(symbolized) if symbolized.as_sym().is_some() => {
                                    frames_of(&symbolized, *addr, FrameKind::User)
                                }
                                _ => vec![unknown_frame(*addr, exe.clone(), FrameKind::User)],
                            };
                        self.user_cache.insert((pid, *addr), frames);
                    }
                }
            }
        }
        addresses
            .iter()
            .flat_map(|addr| {
                self.user_cache
                    .get(&(pid, *addr))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Drops cached user frames of processes that exited, so a recycled pid is not
    /// symbolized with a dead process's addresses.
    pub fn forget_process(&mut self, pid: u32) {
        self.user_cache
            .retain(|(cached_pid, _), _| *cached_pid != pid);
    }
}

/// The executable of `pid`, for frames no symbol covers.
fn executable(pid: u32) -> Option<String> {
    std::fs::read_link(Path::new("/proc").join(pid.to_string()).join("exe"))
        .ok()
        .map(|path: PathBuf| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_for_symbolization() -> u64 {
        marker_for_symbolization as *const () as u64
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_earlier() {
        assert_eq!(lookup_addresses(&[10, 20, 30], true), vec![10, 19, 29]);
        assert_eq!(lookup_addresses(&[10, 20], false), vec![9, 19]);
    }

    #[test]
    fn symbolizes_own_function() {
        let mut symbolizer = Symbolizer::new();
        let addr = marker_for_symbolization();
        let frames = symbolizer.user_frames(std::process::id(), &[addr], true);
        assert!(
            frames
                .iter()
                .any(|f| f.function.contains("marker_for_symbolization")),
            "{frames:?}"
        );
    }
}
