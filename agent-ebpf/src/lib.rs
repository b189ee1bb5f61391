//! Host-side library target of the probe crate. The probes themselves are the `stallscope`
//! binary target, built for the BPF target by `agent/build.rs`; this empty library lets the
//! agent depend on the crate so cargo rebuilds the agent when a probe changes.
#![no_std]
