//! stallscope-agent: loads the eBPF probes, drains their aggregated waits every interval,
//! symbolizes stacks and turns them into profiles.

pub mod bpf_sys;
pub mod btf;
pub mod probes;
pub mod tracefs;
