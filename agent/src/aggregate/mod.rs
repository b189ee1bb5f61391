//! From drained generations to profiles: sums of totals and samples (`accumulate`), the
//! profile built from them (`assemble`), threshold-sampled stacks calibrated to exact
//! totals (`calibrate`), off-CPU time split by cause (`cause`), samples matched with their
//! totals groups (`groups`), the period's samples with
//! interned labels (`period`), the losses, events and
//! notes besides the samples (`report`), the stacks kept between drains
//! (`stack_cache`) and each totals key's sums (`sums`).

pub mod accumulate;
pub mod assemble;
pub mod calibrate;
pub mod cause;
mod groups;
pub mod period;
mod report;
pub mod stack_cache;
pub mod sums;
