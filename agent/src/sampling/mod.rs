//! The agent's commands: `record` (one file), `run` (the daemon streaming to a
//! collector), `check` (what this kernel offers), with the file writer of `record`
//! (`output`) and the SIGINT/SIGTERM handling they share (`shutdown`).

pub mod check;
pub mod output;
pub mod record;
pub mod run;
pub mod shutdown;
