//! stallscope-agent: loads the eBPF probes, drains their aggregated waits every interval,
//! symbolizes stacks and turns them into profiles. One folder per concern; ARCHITECTURE.md
//! maps them.

pub mod aggregate;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod naming;
pub mod privilege;
pub mod probes;
pub mod process;
pub mod sampling;
pub mod stream;
pub mod symbols;
pub mod system;
pub mod unwind;
