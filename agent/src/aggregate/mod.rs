//! From drained generations to profiles: sums of totals and samples (`accumulate`), the
//! profile built from them (`assemble`), threshold-sampled stacks calibrated to exact
//! totals (`calibrate`), off-CPU time split by cause (`cause`), the losses, events and
//! notes besides the samples (`report`) and the stacks kept between drains
//! (`stack_cache`).

pub mod accumulate;
pub mod assemble;
pub mod calibrate;
pub mod cause;
mod report;
pub mod stack_cache;
