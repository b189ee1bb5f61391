//! Reads of other processes' files and memory, each with a deadline. A read of
//! `/proc/PID/maps`, of a binary on a hung FUSE mount or of a page of a slow network file
//! can block in the kernel forever and cannot be cancelled; the agent must not stall
//! behind it. Such work runs as jobs on a few worker threads ("lanes"); nobody waits on a
//! job, its result arrives as a message.
//!
//! A job is routed to a lane by its key (a pid, a device, a binary), so a stuck read only
//! holds up its own lane. A supervisor thread watches the running job of every lane: past
//! its deadline the job is declared failed (its `fail` callback runs), its key is refused
//! for a cool-down period, and the lane gets a fresh worker thread that takes over the
//! queued jobs; the stuck thread is abandoned and exits if it ever returns. Stuck threads
//! are bounded: past `max_stuck` a lane is not replaced and refuses its jobs at once.
//! Jobs queued behind a job that has run for a while are taken over by idle lanes, so a
//! hung read holds up nothing but itself.

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

mod worker;

use worker::{spawn_worker, supervise};

/// Why a job did not run to completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It ran past its deadline (its thread is presumably blocked in the kernel).
    TimedOut,
    /// Its key timed out recently, or its lane has no thread left: refused without trying.
    Refused,
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Self::TimedOut => "read timed out",
            Self::Refused => "skipped: an earlier read of the same source timed out",
        }
    }
}

type Run<L> = Box<dyn FnOnce(&mut L) + Send>;
type Fail = Box<dyn FnOnce(Failure) + Send>;

/// A unit of work: `run` does it; `fail` is called instead when it times out or is refused.
/// `key` picks the lane; `source` names what a timeout condemns for the cool-down (a pid,
/// a filesystem), and is the key itself unless [`Job::source`] says otherwise.
pub struct Job<L> {
    key: u64,
    source: u64,
    /// Queued ahead of the lane's other jobs ([`Job::urgent`]).
    urgent: bool,
    deadline: Duration,
    run: Run<L>,
    fail: Fail,
}

impl<L> Job<L> {
    pub fn new(
        key: u64,
        deadline: Duration,
        run: impl FnOnce(&mut L) + Send + 'static,
        fail: impl FnOnce(Failure) + Send + 'static,
    ) -> Self {
        Self {
            key,
            source: key,
            urgent: false,
            deadline,
            run: Box::new(run),
            fail: Box::new(fail),
        }
    }

    /// Sets what a timeout of this job refuses for the cool-down.
    #[must_use]
    pub fn source(mut self, source: u64) -> Self {
        self.source = source;
        self
    }

    /// Queues the job ahead of the lane's queued jobs: work that loses its object if it
    /// waits (the read of a process that may exit soon), behind a backlog that does not
    /// (the reads of every process at start-up).
    #[must_use]
    pub fn urgent(mut self) -> Self {
        self.urgent = true;
        self
    }
}

/// Hashes anything into a job key.
pub fn key_of(value: &impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

struct Running {
    source: u64,
    started: Instant,
    deadline: Duration,
    fail: Option<Fail>,
}

struct LaneState<L> {
    jobs: VecDeque<Job<L>>,
    running: Option<Running>,
    /// Incremented when the lane's worker is abandoned; a worker whose epoch is stale
    /// exits as soon as it gets control back.
    epoch: u64,
    /// No thread left: jobs are refused.
    dead: bool,
    shutdown: bool,
}

struct Lane<L> {
    state: Mutex<LaneState<L>>,
    wake: Condvar,
}

impl<L> Lane<L> {
    fn lock(&self) -> MutexGuard<'_, LaneState<L>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Counters for self-metrics and profile metadata.
#[derive(Debug, Default)]
pub struct LaneStats {
    pub timed_out: AtomicU64,
    pub refused: AtomicU64,
    pub completed: AtomicU64,
}

/// A fixed set of lanes whose workers keep a thread-local `L` (a symbolizer cache, say).
pub struct Lanes<L: Default + 'static> {
    name: &'static str,
    #[expect(
        clippy::struct_field_names,
        reason = "the set of lanes is what `Lanes` is made of"
    )]
    lanes: Arc<[Arc<Lane<L>>]>,
    /// Keys refused until the instant they map to.
    cooling: Mutex<HashMap<u64, Instant>>,
    cool_down: Duration,
    stuck_threads: Arc<AtomicUsize>,
    max_stuck: usize,
    /// Niceness of the worker threads (0: the agent's own priority).
    nice: i32,
    pub stats: Arc<LaneStats>,
}

impl<L: Default + 'static> Lanes<L> {
    /// `count` lanes (at least one); a key that timed out is refused for `cool_down`.
    pub fn new(
        name: &'static str,
        count: usize,
        max_stuck: usize,
        cool_down: Duration,
    ) -> Arc<Self> {
        Self::with_nice(name, count, max_stuck, cool_down, 0)
    }

    /// Like [`Lanes::new`], with worker threads at (absolute) niceness `nice`: background
    /// work that should yield the CPU to the host's workloads when they want it.
    pub fn with_nice(
        name: &'static str,
        count: usize,
        max_stuck: usize,
        cool_down: Duration,
        nice: i32,
    ) -> Arc<Self> {
        let lanes: Arc<[Arc<Lane<L>>]> = (0..count.max(1))
            .map(|_| {
                Arc::new(Lane {
                    state: Mutex::new(LaneState {
                        jobs: VecDeque::new(),
                        running: None,
                        epoch: 0,
                        dead: false,
                        shutdown: false,
                    }),
                    wake: Condvar::new(),
                })
            })
            .collect();
        let stuck_threads = Arc::new(AtomicUsize::new(0));
        let this = Arc::new(Self {
            name,
            lanes,
            cooling: Mutex::new(HashMap::new()),
            cool_down,
            stuck_threads,
            max_stuck,
            nice,
            stats: Arc::new(LaneStats::default()),
        });
        for (index, lane) in this.lanes.iter().enumerate() {
            if !spawn_worker(name, nice, index, &this.lanes, 0, &this.stuck_threads) {
                lane.lock().dead = true;
            }
        }
        let weak = Arc::downgrade(&this);
        let _ = thread::Builder::new()
            .name(format!("{name}-watch"))
            .spawn(move || supervise(&weak));
        this
    }

    /// Queues `job` on its key's lane, or fails it at once if the key is cooling down or
    /// the lane is dead. Never blocks.
    pub fn submit(&self, job: Job<L>) {
        if self.is_cooling(job.source) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            (job.fail)(Failure::Refused);
            return;
        }
        let lane = &self.lanes[(job.key % self.lanes.len() as u64) as usize];
        let mut state = lane.lock();
        if state.dead || state.shutdown {
            drop(state);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            (job.fail)(Failure::Refused);
            return;
        }
        if job.urgent {
            state.jobs.push_front(job);
        } else {
            state.jobs.push_back(job);
        }
        drop(state);
        lane.wake.notify_one();
    }

    fn is_cooling(&self, key: u64) -> bool {
        let mut cooling = self
            .cooling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match cooling.get(&key) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                cooling.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Threads abandoned in a read that never returned, so far.
    pub fn stuck_threads(&self) -> usize {
        self.stuck_threads.load(Ordering::Relaxed)
    }

    /// Jobs queued or running, over all lanes.
    pub fn outstanding(&self) -> usize {
        self.lanes
            .iter()
            .map(|lane| {
                let state = lane.lock();
                state.jobs.len() + usize::from(state.running.is_some())
            })
            .sum()
    }

    /// One supervisor pass: fails jobs past their deadline and replaces their threads.
    fn check_deadlines(&self) {
        let now = Instant::now();
        for (index, lane) in self.lanes.iter().enumerate() {
            let mut state = lane.lock();
            let overdue = state
                .running
                .as_ref()
                .is_some_and(|r| now.duration_since(r.started) > r.deadline);
            if !overdue {
                continue;
            }
            let Some(mut running) = state.running.take() else {
                continue;
            };
            state.epoch += 1;
            let epoch = state.epoch;
            self.stuck_threads.fetch_add(1, Ordering::Relaxed);
            let mut refused = Vec::new();
            let replaced = self.stuck_threads.load(Ordering::Relaxed) <= self.max_stuck
                && spawn_worker(
                    self.name,
                    self.nice,
                    index,
                    &self.lanes,
                    epoch,
                    &self.stuck_threads,
                );
            if !replaced {
                state.dead = true;
                refused.extend(state.jobs.drain(..));
            }
            drop(state);
            self.cooling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(running.source, now + self.cool_down);
            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "{} lane {index}: a read ran past its {:?} deadline; abandoned its thread{}",
                self.name,
                running.deadline,
                if replaced {
                    ""
                } else {
                    " (too many stuck threads: the lane stops)"
                }
            );
            if let Some(fail) = running.fail.take() {
                fail(Failure::TimedOut);
            }
            for job in refused {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                (job.fail)(Failure::Refused);
            }
        }
    }
}

impl<L: Default + 'static> Drop for Lanes<L> {
    fn drop(&mut self) {
        for lane in self.lanes.iter() {
            lane.lock().shutdown = true;
            lane.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn background_lanes_run_their_jobs_at_their_niceness() {
        let niceness_of_job = |lanes: &Arc<Lanes<()>>| {
            let (tx, rx) = mpsc::channel::<i32>();
            lanes.submit(Job::new(
                7,
                Duration::from_secs(10),
                move |()| {
                    // SAFETY: plain syscalls about the calling thread.
                    let nice = unsafe {
                        libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
                    };
                    let _ = tx.send(nice);
                },
                |_| {},
            ));
            rx.recv_timeout(Duration::from_secs(10))
                .expect("the job ran")
        };
        // SAFETY: as above.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let plain = Lanes::<()>::new("plain", 1, 1, Duration::from_secs(60));
        assert_eq!(niceness_of_job(&plain), own);
        let background = Lanes::<()>::with_nice("nice", 1, 1, Duration::from_secs(60), 5);
        // Niceness is absolute: 5, unless the test itself runs nicer than that and may not
        // raise its priority.
        let nice = niceness_of_job(&background);
        assert!(
            nice == 5 || (own > 5 && nice == own),
            "niceness {nice}, own {own}"
        );
    }

    #[test]
    fn jobs_run_and_a_stuck_job_does_not_hold_up_other_keys() {
        let lanes = Lanes::<()>::new("test", 1, 4, Duration::from_secs(60));
        let (tx, rx) = mpsc::channel::<(u64, Result<(), Failure>)>();
        let (release, blocked) = mpsc::channel::<()>();
        let blocked = Arc::new(Mutex::new(blocked));
        // Key 1 blocks until released; key 2 is queued behind it on the only lane.
        let (ok, failed) = (tx.clone(), tx.clone());
        lanes.submit(Job::new(
            1,
            Duration::from_millis(100),
            move |()| {
                let _ = blocked.lock().map(|rx| rx.recv());
                let _ = ok.send((1, Ok(())));
            },
            move |failure| {
                let _ = failed.send((1, Err(failure)));
            },
        ));
        let (ok, failed) = (tx.clone(), tx.clone());
        lanes.submit(Job::new(
            2,
            Duration::from_secs(10),
            move |()| {
                let _ = ok.send((2, Ok(())));
            },
            move |failure| {
                let _ = failed.send((2, Err(failure)));
            },
        ));
        let mut seen = vec![
            rx.recv_timeout(Duration::from_secs(10)).expect("first"),
            rx.recv_timeout(Duration::from_secs(10)).expect("second"),
        ];
        seen.sort_by_key(|(key, _)| *key);
        assert_eq!(seen, vec![(1, Err(Failure::TimedOut)), (2, Ok(()))]);
        assert_eq!(lanes.stuck_threads(), 1);

        // The key that timed out is refused while it cools down.
        let failed = tx.clone();
        lanes.submit(Job::new(
            1,
            Duration::from_secs(1),
            |()| {},
            move |failure| {
                let _ = failed.send((1, Err(failure)));
            },
        ));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).expect("refusal"),
            (1, Err(Failure::Refused))
        );
        // The abandoned thread exits once its read returns.
        let _ = release.send(());
        let deadline = Instant::now() + Duration::from_secs(10);
        while lanes.stuck_threads() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lanes.stuck_threads(), 0);
    }

    #[test]
    fn an_urgent_job_runs_before_the_jobs_queued_ahead_of_it() {
        let lanes = Lanes::<()>::new("urgent", 1, 4, Duration::from_secs(60));
        let (tx, rx) = mpsc::channel::<u64>();
        let (release, blocked) = mpsc::channel::<()>();
        let blocked = Arc::new(Mutex::new(blocked));
        // The only lane is busy; a backlog of three queues, then an urgent job.
        let (first, (started, running)) = (tx.clone(), mpsc::channel::<()>());
        lanes.submit(Job::new(
            0,
            Duration::from_secs(60),
            move |()| {
                let _ = started.send(());
                let _ = blocked.lock().map(|rx| rx.recv());
                let _ = first.send(0);
            },
            |_| {},
        ));
        running
            .recv_timeout(Duration::from_secs(10))
            .expect("the first job runs");
        for key in 1..=3 {
            let done = tx.clone();
            lanes.submit(Job::new(
                key,
                Duration::from_secs(60),
                move |()| {
                    let _ = done.send(key);
                },
                |_| {},
            ));
        }
        let done = tx.clone();
        lanes.submit(
            Job::new(
                9,
                Duration::from_secs(60),
                move |()| {
                    let _ = done.send(9);
                },
                |_| {},
            )
            .urgent(),
        );
        let _ = release.send(());
        let order: Vec<u64> = (0..5)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("ran"))
            .collect();
        assert_eq!(order, vec![0, 9, 1, 2, 3]);
    }

    #[test]
    fn an_idle_lane_takes_over_jobs_queued_behind_a_long_one() {
        let lanes = Lanes::<()>::new("steal", 2, 4, Duration::from_secs(60));
        let (tx, rx) = mpsc::channel::<u64>();
        let (release, blocked) = mpsc::channel::<()>();
        let blocked = Arc::new(Mutex::new(blocked));
        // Both jobs go to lane 0; the first blocks far past any steal delay.
        let first = tx.clone();
        lanes.submit(Job::new(
            0,
            Duration::from_secs(60),
            move |()| {
                let _ = blocked.lock().map(|rx| rx.recv());
                let _ = first.send(0);
            },
            |_| {},
        ));
        let second = tx.clone();
        lanes.submit(Job::new(
            2,
            Duration::from_secs(60),
            move |()| {
                let _ = second.send(2);
            },
            |_| {},
        ));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(2));
        let _ = release.send(());
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert_eq!(lanes.stuck_threads(), 0);
    }
}
