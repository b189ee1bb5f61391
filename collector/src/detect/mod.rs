//! Automatic degradation windows: the collector watches every (host, service) with data,
//! bucket by bucket, and opens a window when its indicators leave normal for long enough,
//! closes it when they are back, and asks `why` what changed.
//!
//! - [`indicators`]: per bucket, quantities normalised by the work done (shares of
//!   request-path time, latency per event, CPU per operation), so a change of load alone
//!   moves none of them.
//! - [`baseline`]: normal per indicator, robustly (median, MAD) over the recent hours and
//!   the same time on earlier days, outside known windows, recomputed on a fixed grid.
//! - [`cusum`]: the persistence test (a clipped-z CUSUM with a gate and a minimum effect)
//!   and the change point.
//! - [`scope`]: one (host, service)'s state machine: buckets in, windows opened, updated
//!   and closed out, with onsets and ends placed on the data's own time.
//! - [`runner`]: the collector's task: reads complete buckets, keeps the scopes, stores
//!   windows (one per degradation, whatever the number of replicas), runs `why`.
//! - [`settings`]: every threshold, with its default.

pub mod baseline;
pub mod cusum;
pub mod indicators;
pub mod runner;
pub mod scope;
pub mod settings;
pub mod store;

#[cfg(test)]
mod scope_tests;

pub use self::{
    runner::Detector,
    settings::{DetectArgs, DetectFile, DetectSettings},
};
