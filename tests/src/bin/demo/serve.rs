//! `stallscope-demo serve`: the shop service. An acceptor thread takes connections from
//! the load generator; one reader thread per connection reads requests
//! (`ID browse|checkout\n`) into a queue; a pool of workers, parked on a condition
//! variable while idle, serves them (`request.rs`) and replies `ID ok\n` (or
//! `ID error\n`). Two background threads hold the `inventory` or `sessions` mutex on
//! command (`lock-hold`), the lock-contention injection.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    control::{not_here, ok, say, serve_commands},
    cpu,
    protocol::{AddressRange, Command, DemoMutex},
    request::{
        self, INVENTORY, INVENTORY_SYMBOL, Journal, Kind, METRICS, PeerLink, SESSIONS,
        SESSIONS_SYMBOL, Work, Worker,
    },
};

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on for requests (port 0: any free port, printed in `ready`)
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker threads
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// The pricing peer (peer A)
    #[arg(long)]
    pricing: SocketAddr,
    /// The shipping peer (peer B)
    #[arg(long)]
    shipping: SocketAddr,
    /// Directory of the journal files (one per worker)
    #[arg(long)]
    journal_dir: PathBuf,
    /// CPU time of `render_template` per request, in microseconds
    #[arg(long, default_value_t = 300)]
    render_us: u64,
    /// CPU time of `format_line_items` per checkout, in microseconds
    #[arg(long, default_value_t = 40)]
    line_items_us: u64,
    /// The slower build's code path: `format_line_items` also runs
    /// `recompute_tax_table` for this long per checkout (0: not at all)
    #[arg(long, default_value_t = 0)]
    tax_table_us: u64,
}

/// A request waiting for a worker, with the connection its reply goes to.
struct Job {
    id: u64,
    kind: Kind,
    reply: Arc<Mutex<TcpStream>>,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

/// Which mutex the background holders hold, how long and how often.
#[derive(Clone, Copy, PartialEq)]
struct HoldPlan {
    mutex: DemoMutex,
    hold: Duration,
    period: Duration,
}

/// The lock-contention injection's shared state: the plan, and whether a holder is in
/// the middle of a hold (so `lock-release` answers only once nothing is held).
#[derive(Default)]
struct Holders {
    state: Mutex<(Option<HoldPlan>, bool)>,
    changed: Condvar,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    cpu::calibrate();
    std::fs::create_dir_all(&args.journal_dir)
        .with_context(|| format!("creating {}", args.journal_dir.display()))?;
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr()?;
    let queue = Arc::new(Queue::default());
    let work = Work {
        render: Duration::from_micros(args.render_us),
        line_items: Duration::from_micros(args.line_items_us),
        tax_table: Duration::from_micros(args.tax_table_us),
    };
    for index in 0..args.workers.max(1) {
        let mut worker = Worker {
            pricing: PeerLink::new("pricing", args.pricing),
            shipping: PeerLink::new("shipping", args.shipping),
            journal: Journal::open(&args.journal_dir, index).with_context(|| {
                format!("opening the journal in {}", args.journal_dir.display())
            })?,
            work,
        };
        let queue = Arc::clone(&queue);
        thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || worker_main(&queue, &mut worker))?;
    }
    let holders = Arc::new(Holders::default());
    for mutex in DemoMutex::ALL {
        let holders = Arc::clone(&holders);
        let name = match mutex {
            DemoMutex::Inventory => "inventory-audit",
            DemoMutex::Sessions => "session-expiry",
        };
        thread::Builder::new()
            .name(name.into())
            .spawn(move || holder_main(&holders, mutex))?;
    }
    {
        let queue = Arc::clone(&queue);
        thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || accept_main(&listener, &queue))?;
    }
    let range = |start: usize, size: usize| AddressRange {
        start: start as u64,
        size: size as u64,
    };
    say(&format!(
        "ready pid={} addr={address} inventory={} sessions={} inventory_symbol={INVENTORY_SYMBOL} sessions_symbol={SESSIONS_SYMBOL} workers={} tax_table_us={}",
        std::process::id(),
        range(
            std::ptr::from_ref(&INVENTORY) as usize,
            size_of_val(&INVENTORY)
        ),
        range(
            std::ptr::from_ref(&SESSIONS) as usize,
            size_of_val(&SESSIONS)
        ),
        args.workers,
        args.tax_table_us,
    ));
    serve_commands(|command| match command {
        Command::Stats => serde_json::to_string(&METRICS.snapshot())
            .map(|json| format!("stats {json}"))
            .map_err(|e| e.to_string()),
        Command::LockHold {
            mutex,
            hold,
            period,
        } => {
            set_plan(
                &holders,
                Some(HoldPlan {
                    mutex: *mutex,
                    hold: *hold,
                    period: *period,
                }),
            );
            Ok(ok("lock-hold"))
        }
        Command::LockRelease => {
            set_plan(&holders, None);
            Ok(ok("lock-release"))
        }
        other => Err(not_here("serve", other)),
    });
    Ok(())
}

/// Sets the holders' plan; with `None`, returns once no hold is in progress.
fn set_plan(holders: &Holders, plan: Option<HoldPlan>) {
    let mut state = holders.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.0 = plan;
    holders.changed.notify_all();
    while plan.is_none() && state.1 {
        state = holders
            .changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// A background holder of one mutex: parked until a plan names its mutex, then holds it
/// for `hold` out of every `period`, the first hold at once.
fn holder_main(holders: &Holders, mutex: DemoMutex) {
    let mut state = holders.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let Some(plan) = state.0.filter(|p| p.mutex == mutex) else {
            state = holders
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        state.1 = true;
        drop(state);
        let started = Instant::now();
        match mutex {
            DemoMutex::Inventory => request::audit_inventory(plan.hold),
            DemoMutex::Sessions => request::expire_sessions(plan.hold),
        }
        state = holders.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.1 = false;
        holders.changed.notify_all();
        // Until the next hold, unless the plan changes first.
        let next = started + plan.period;
        while state.0 == Some(plan) {
            let now = Instant::now();
            if now >= next {
                break;
            }
            state = holders
                .changed
                .wait_timeout(state, next - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn accept_main(listener: &TcpListener, queue: &Arc<Queue>) {
    for (index, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let queue = Arc::clone(queue);
        let spawned = thread::Builder::new()
            .name(format!("conn-{index}"))
            .spawn(move || {
                if let Err(err) = read_requests(stream, &queue) {
                    eprintln!("serve: connection {index}: {err}");
                }
            });
        if let Err(err) = spawned {
            eprintln!("serve: no thread for connection {index}: {err}");
        }
    }
}

/// Reads `ID KIND` lines from one client into the queue until it closes.
fn read_requests(stream: TcpStream, queue: &Queue) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let reply = Arc::new(Mutex::new(stream.try_clone()?));
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let id = words.next().and_then(|w| w.parse::<u64>().ok());
        let kind = match words.next() {
            Some("browse") => Some(Kind::Browse),
            Some("checkout") => Some(Kind::Checkout),
            _ => None,
        };
        let (Some(id), Some(kind)) = (id, kind) else {
            let mut out = reply.lock().unwrap_or_else(PoisonError::into_inner);
            out.write_all(b"0 error bad request: expected `ID browse|checkout`\n")?;
            continue;
        };
        let mut jobs = queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.push_back(Job {
            id,
            kind,
            reply: Arc::clone(&reply),
        });
        drop(jobs);
        queue.ready.notify_one();
    }
    Ok(())
}

/// Parks until a request is queued (idle waiting: a condition variable, not a lock).
#[inline(never)]
fn wait_for_job(queue: &Queue) -> Job {
    let mut jobs = queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(job) = jobs.pop_front() {
            return job;
        }
        jobs = queue
            .ready
            .wait(jobs)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

#[inline(never)]
fn worker_main(queue: &Queue, worker: &mut Worker) {
    loop {
        let job = wait_for_job(queue);
        let status = match request::serve_request(worker, job.kind, job.id) {
            Ok(()) => "ok",
            Err(_) => "error",
        };
        let mut out = job.reply.lock().unwrap_or_else(PoisonError::into_inner);
        // A client that went away just loses its reply.
        let _ = out.write_all(format!("{} {status}\n", job.id).as_bytes());
    }
}
