//! From profiles to the collector: a profile as a wire batch (`batch`), the on-disk spool
//! of unacknowledged batches (`spool`) and the gRPC sender that empties it (`sender`,
//! reconnecting after a `backoff`).

mod backoff;
pub mod batch;
pub mod sender;
pub mod spool;
