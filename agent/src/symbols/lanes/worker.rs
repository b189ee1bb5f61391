//! The lanes' threads: a worker per lane runs its jobs in order, and takes over jobs
//! queued behind a sibling's long one when idle; a supervisor fails jobs past their
//! deadline and replaces their workers.

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::{Failure, Job, Lane, Lanes, Running};

pub(super) fn supervise<L: Default + 'static>(lanes: &Weak<Lanes<L>>) {
    const TICK: Duration = Duration::from_millis(20);
    loop {
        thread::sleep(TICK);
        let Some(lanes) = lanes.upgrade() else {
            return;
        };
        lanes.check_deadlines();
    }
}

/// Starts the worker of lane `index` for `epoch`; false if no thread could be created.
pub(super) fn spawn_worker<L: Default + 'static>(
    name: &str,
    nice: i32,
    index: usize,
    lanes: &Arc<[Arc<Lane<L>>]>,
    epoch: u64,
    stuck: &Arc<AtomicUsize>,
) -> bool {
    let stuck = Arc::clone(stuck);
    let lanes = Arc::clone(lanes);
    thread::Builder::new()
        .name(format!("{name}-{index}"))
        .spawn(move || {
            if nice != 0 {
                // Linux applies PRIO_PROCESS to one thread when given its id. Failure
                // (not permitted) leaves the thread at the agent's priority.
                // SAFETY: plain syscalls on the calling thread.
                let _ = unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice)
                };
            }
            work(&lanes, index, epoch, &stuck);
        })
        .is_ok()
}

/// How often an idle worker looks for jobs stuck behind a long one.
const STEAL_TICK: Duration = Duration::from_millis(50);
/// A job running this long makes the jobs queued behind it fair game for idle lanes.
const STEAL_AFTER: Duration = Duration::from_millis(100);

/// Takes the first queued job of a sibling lane whose running job has run long.
fn steal<L>(lanes: &[Arc<Lane<L>>], own: usize) -> Option<Job<L>> {
    let now = Instant::now();
    lanes
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != own)
        .find_map(|(_, lane)| {
            let mut state = lane.lock();
            let long = state
                .running
                .as_ref()
                .is_some_and(|r| now.duration_since(r.started) > STEAL_AFTER);
            if long { state.jobs.pop_front() } else { None }
        })
}

fn work<L: Default>(lanes: &[Arc<Lane<L>>], index: usize, epoch: u64, stuck: &AtomicUsize) {
    let lane = &lanes[index];
    let mut local = L::default();
    loop {
        let job = loop {
            let state = lane.lock();
            if state.shutdown || state.epoch != epoch {
                return;
            }
            let mut state = state;
            if let Some(job) = state.jobs.pop_front() {
                break job;
            }
            let (state, _) = lane
                .wake
                .wait_timeout(state, STEAL_TICK)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let idle = state.jobs.is_empty();
            drop(state);
            if idle && let Some(job) = steal(lanes, index) {
                break job;
            }
        };
        let mut state = lane.lock();
        if state.shutdown || state.epoch != epoch {
            drop(state);
            (job.fail)(Failure::Refused);
            return;
        }
        let Job {
            source,
            deadline,
            run,
            fail,
            ..
        } = job;
        state.running = Some(Running {
            source,
            started: Instant::now(),
            deadline,
            fail: Some(fail),
        });
        drop(state);
        run(&mut local);
        let mut state = lane.lock();
        if state.epoch != epoch {
            // Abandoned while running: the lane has a new worker already.
            stuck.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        state.running = None;
    }
}
