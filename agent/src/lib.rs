//! stallscope-agent: loads the eBPF probes, drains their aggregated waits every interval,
//! symbolizes stacks and turns them into profiles.

pub mod accumulate;
pub mod assemble;
pub mod attach;
pub mod batch;
pub mod binaries;
pub mod bpf_sys;
pub mod btf;
pub mod calibrate;
pub mod cause;
pub mod check;
pub mod cli;
pub mod config;
pub mod elf;
pub mod identity;
pub mod lanes;
pub mod logging;
pub mod naming;
pub mod output;
pub mod probes;
pub mod proc_events;
pub mod procfs;
pub mod procs;
pub mod record;
pub mod resolver;
pub mod run;
pub mod shutdown;
pub mod spool;
pub mod stream;
pub mod symbolize;
mod syscall_table;
pub mod syscalls;
pub mod system;
pub mod tracefs;
