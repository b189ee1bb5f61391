//! From drained generations to profiles: sums of totals and samples (`accumulate`), the
//! profile built from them (`assemble`), threshold-sampled stacks calibrated to exact
//! totals (`calibrate`) and off-CPU time split by cause (`cause`).

pub mod accumulate;
pub mod assemble;
pub mod calibrate;
pub mod cause;
