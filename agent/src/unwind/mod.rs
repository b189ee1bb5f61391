//! Unwinding user stacks of binaries built without frame pointers: per-binary tables
//! from their call frame information (`table`), loaded into the probes' maps for the
//! processes that map them (`loader`), where the probes' mixed walk uses them.

pub mod loader;
pub mod table;
