//! The agent's commands: `record` (one file) and `run` (the daemon streaming to a
//! collector), both the one sampling loop of `sampler` with a different sink; `check`
//! (what this kernel offers); the file writer of `record` (`output`) and the
//! SIGINT/SIGTERM handling of the loop (`shutdown`); `run`'s journal of drained
//! generations not yet spooled (`journal`).

pub mod check;
pub mod guard;
pub mod journal;
pub mod output;
pub mod record;
pub mod run;
pub mod sampler;
pub mod shutdown;
