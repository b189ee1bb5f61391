//! What the agent knows about other processes: `/proc/PID` parsing (`procfs`), a
//! process's snapshot (`snapshot`), new processes as they start (`events`) and the
//! workload identity derived from a process's cgroup and names (`identity`), with the
//! Kubernetes names of its pod from the kubelet's pod log directories (`kubernetes`).

pub mod events;
pub mod identity;
pub mod kubernetes;
pub mod procfs;
pub mod snapshot;
