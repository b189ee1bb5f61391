//! Synthetic batches for the storage test suite and the ingest benchmark: realistic shape
//! (services, threads, deep stacks shared between batches), deterministic content.

use stallscope_proto::v1;

/// The shape of a synthetic batch.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub services: u32,
    pub threads_per_service: u32,
    pub stacks_per_thread: u32,
    pub frames_per_stack: u32,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            services: 2,
            threads_per_service: 2,
            stacks_per_thread: 3,
            frames_per_stack: 8,
        }
    }
}

impl Shape {
    /// Samples per signal in one batch.
    pub fn samples_per_signal(&self) -> u64 {
        u64::from(self.services * self.threads_per_service * self.stacks_per_thread)
    }
}

/// Value of every off-CPU sample (ns) and on-CPU sample (ns); counts are 1 and 2.
pub const OFF_CPU_NS: i64 = 1_000_000;
pub const ON_CPU_NS: i64 = 20_408_163;

fn signal(name: &str, value: &str, count: &str) -> v1::SignalType {
    v1::SignalType {
        name: name.to_owned(),
        value_kind: value.to_owned(),
        value_unit: "nanoseconds".to_owned(),
        count_kind: count.to_owned(),
        count_unit: "count".to_owned(),
    }
}

/// A batch from `agent` on `host` with sequence `sequence`, starting at `start_unix_ns`
/// and lasting `duration_ns`: every (service, thread, stack) gets one off-CPU sample of
/// [`OFF_CPU_NS`] and one on-CPU sample of [`ON_CPU_NS`]. Services are named `svc-N`.
pub fn batch(
    agent: &str,
    host: &str,
    sequence: u64,
    start_unix_ns: i64,
    duration_ns: i64,
    shape: Shape,
) -> v1::Batch {
    let mut strings = vec![String::new()];
    let mut intern = |text: String| -> u32 {
        if let Some(index) = strings.iter().position(|s| *s == text) {
            return index as u32;
        }
        strings.push(text);
        (strings.len() - 1) as u32
    };
    let mut frames = Vec::new();
    let mut stacks = Vec::new();
    let mut samples = Vec::new();
    let keys = [
        intern("process".into()),
        intern("pid".into()),
        intern("tid".into()),
        intern("state".into()),
    ];
    let state = intern("interruptible".into());
    for service in 0..shape.services {
        let process = intern(format!("svc-{service}"));
        let pid = intern(format!("{}", 1000 + service));
        for thread in 0..shape.threads_per_service {
            let tid = intern(format!("{}", 100_000 + service * 1000 + thread));
            for stack in 0..shape.stacks_per_thread {
                let mut ids = Vec::new();
                for depth in 0..shape.frames_per_stack {
                    frames.push(v1::Frame {
                        function: format!("svc{service}::f{stack}_{depth}"),
                        module: format!("/usr/bin/svc-{service}"),
                        file: String::new(),
                        line: 0,
                        address: u64::from(depth) * 16,
                        kind: if depth == 0 {
                            v1::FrameKind::Kernel as i32
                        } else {
                            v1::FrameKind::User as i32
                        },
                    });
                    ids.push((frames.len() - 1) as u32);
                }
                stacks.push(v1::Stack { frames: ids });
                let stack_index = (stacks.len() - 1) as u32;
                samples.push(v1::Sample {
                    stack: stack_index,
                    signal: 0,
                    labels: vec![keys[0], process, keys[1], pid, keys[2], tid, keys[3], state],
                    value: OFF_CPU_NS,
                    count: 1,
                });
                samples.push(v1::Sample {
                    stack: stack_index,
                    signal: 1,
                    labels: vec![keys[0], process, keys[1], pid, keys[2], tid],
                    value: ON_CPU_NS,
                    count: 2,
                });
            }
        }
    }
    v1::Batch {
        agent_id: agent.to_owned(),
        host: host.to_owned(),
        sequence,
        start_unix_ns,
        duration_ns,
        signals: vec![
            signal("off-cpu", "off_cpu", "off_cpu_events"),
            signal("on-cpu", "on_cpu", "on_cpu_samples"),
        ],
        frames,
        stacks,
        strings,
        samples,
        losses: vec![v1::Loss {
            reason: "map_full".to_owned(),
            count: 1,
        }],
        notes: Vec::new(),
        spool_dropped_total: 0,
        events: Vec::new(),
        binaries: Vec::new(),
    }
}
