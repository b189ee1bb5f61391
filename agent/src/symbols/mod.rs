//! Symbolization: binaries opened once and known by build-id (`binaries`, `elf`),
//! addresses turned into frames (`symbolize`, DWARF from plain copies of compressed debug
//! files: `plain_dwarf`), deadline-bounded background work
//! (`lanes`) and the resolver that drives it all without blocking a drain (`resolver`).

pub mod binaries;
pub mod elf;
pub mod lanes;
pub mod plain_dwarf;
pub mod resolver;
pub mod symbolize;

/// Profile periods a cached stack, frame or symbolized address is kept after a sample
/// last used it: what the daemon remembers is bounded by what recent periods saw, and a
/// stack stored at one event and referenced by a later one (classic-tracepoint
/// switch-out, disk submission) is still found.
pub const KEEP_PERIODS: u32 = 6;
