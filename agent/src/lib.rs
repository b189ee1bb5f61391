//! stallscope-agent: loads the eBPF probes, drains their aggregated waits every interval,
//! symbolizes stacks and turns them into profiles.

pub mod accumulate;
pub mod batch;
pub mod bpf_sys;
pub mod btf;
pub mod calibrate;
pub mod check;
pub mod cli;
pub mod config;
pub mod logging;
pub mod output;
pub mod probes;
pub mod record;
pub mod run;
pub mod shutdown;
pub mod spool;
pub mod stream;
pub mod symbolize;
pub mod system;
pub mod tracefs;
