//! Symbolization: binaries opened once and known by build-id (`binaries`, `elf`),
//! addresses turned into frames (`symbolize`), deadline-bounded background work
//! (`lanes`) and the resolver that drives it all without blocking a drain (`resolver`).

pub mod binaries;
pub mod elf;
pub mod lanes;
pub mod resolver;
pub mod symbolize;
