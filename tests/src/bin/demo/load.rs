//! `stallscope-demo load`: an open-loop load generator. Requests are scheduled at a fixed
//! rate whatever the service does (a slow service does not slow the arrivals, as with
//! real users), spread round-robin over persistent connections; each request's id is its
//! scheduled time, so its latency counts from when it should have been sent. Every
//! wall-clock second one JSON line (`LoadSecond`) goes to the report file: requests sent,
//! completed and failed, p50, p99, max and the latency histogram. `rate R` changes the
//! rate at runtime. Broken connections are reopened; the requests they carried count as
//! errors.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    control::{not_here, ok, say, serve_commands},
    protocol::{Command, LatencyHistogram, LoadSecond, unix_now_ns},
};

#[derive(clap::Args)]
pub struct Args {
    /// The service's address
    #[arg(long)]
    target: SocketAddr,
    /// Requests per second
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Persistent connections the requests are spread over
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Share of requests that are checkouts (the rest browse)
    #[arg(long, default_value_t = 0.25)]
    checkout_share: f64,
    /// Report file: one JSON line per second
    #[arg(long)]
    report: PathBuf,
}

/// What one second collected.
#[derive(Default)]
struct Second {
    sent: u64,
    completed: u64,
    errors: u64,
    max_us: u64,
    latency: LatencyHistogram,
}

struct Shared {
    origin: Instant,
    rate_bits: AtomicU64,
    second: Mutex<Second>,
}

impl Shared {
    fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Relaxed))
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn count(&self, update: impl FnOnce(&mut Second)) {
        update(&mut self.second.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// One connection: its writer while open, how many requests await a reply on it, and
/// whether its reader saw it close.
struct Connection {
    writer: Option<TcpStream>,
    outstanding: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        anyhow::bail!("--rate must be above 0");
    }
    let mut report = File::create(&args.report)
        .with_context(|| format!("creating the report {}", args.report.display()))?;
    let shared = Arc::new(Shared {
        origin: Instant::now(),
        rate_bits: AtomicU64::new(args.rate.to_bits()),
        second: Mutex::new(Second::default()),
    });
    let mut connections: Vec<Connection> = (0..args.connections.max(1))
        .map(|_| Connection {
            writer: None,
            outstanding: Arc::new(AtomicU64::new(0)),
            closed: Arc::new(AtomicBool::new(false)),
        })
        .collect();
    // The service may still be starting: wait for it (up to 30 s) before reporting ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    for connection in &mut connections {
        while let Err(err) = open(connection, args.target, &shared) {
            if Instant::now() > deadline {
                return Err(err).with_context(|| format!("connecting to {}", args.target));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("load-report".into())
            .spawn(move || report_main(&shared, &mut report))?;
    }
    {
        let shared = Arc::clone(&shared);
        let target = args.target;
        let checkout_share = args.checkout_share;
        thread::Builder::new()
            .name("load-send".into())
            .spawn(move || send_main(&shared, &mut connections, target, checkout_share))?;
    }
    say(&format!(
        "ready pid={} target={} rate={} connections={}",
        std::process::id(),
        args.target,
        args.rate,
        args.connections
    ));
    serve_commands(|command| match command {
        Command::Stats => Ok("stats {}".to_owned()),
        Command::Rate(rate) => {
            shared.rate_bits.store(rate.to_bits(), Relaxed);
            Ok(ok("rate"))
        }
        other => Err(not_here("load", other)),
    });
    Ok(())
}

/// Opens a connection and starts the thread that reads its replies.
fn open(
    connection: &mut Connection,
    target: SocketAddr,
    shared: &Arc<Shared>,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&target, Duration::from_millis(200))?;
    stream.set_nodelay(true)?;
    let reader = stream.try_clone()?;
    let outstanding = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    connection.outstanding = Arc::clone(&outstanding);
    connection.closed = Arc::clone(&closed);
    connection.writer = Some(stream);
    let shared = Arc::clone(shared);
    thread::Builder::new()
        .name("load-recv".into())
        .spawn(move || read_replies(reader, &shared, &outstanding, &closed))?;
    Ok(())
}

/// Records each reply's latency; at the end of the connection, what was still
/// outstanding failed.
fn read_replies(stream: TcpStream, shared: &Shared, outstanding: &AtomicU64, closed: &AtomicBool) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let scheduled = words.next().and_then(|w| w.parse::<u64>().ok());
        let succeeded = words.next() == Some("ok");
        let _ = outstanding.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        let latency_us = scheduled.map_or(0, |s| shared.now_ns().saturating_sub(s) / 1000);
        shared.count(|second| {
            if succeeded {
                second.completed += 1;
                second.latency.record(latency_us);
                second.max_us = second.max_us.max(latency_us);
            } else {
                second.errors += 1;
            }
        });
    }
    closed.store(true, Relaxed);
    let lost = outstanding.swap(0, Relaxed);
    shared.count(|second| second.errors += lost);
}

/// Sends requests at their scheduled times, round-robin over the connections.
fn send_main(
    shared: &Arc<Shared>,
    connections: &mut [Connection],
    target: SocketAddr,
    checkout_share: f64,
) {
    let mut next_ns = shared.now_ns();
    let mut sequence: u64 = 0;
    loop {
        let now = shared.now_ns();
        if next_ns > now {
            thread::sleep(Duration::from_nanos(next_ns - now));
            continue;
        }
        let index = (sequence % connections.len() as u64) as usize;
        // Checkouts spread evenly: a fixed pattern, the same in every run.
        let share_before = (sequence as f64 * checkout_share).floor();
        let share_after = ((sequence + 1) as f64 * checkout_share).floor();
        let kind = if share_after > share_before {
            "checkout"
        } else {
            "browse"
        };
        send_one(shared, &mut connections[index], target, next_ns, kind);
        sequence += 1;
        next_ns += (1e9 / shared.rate()) as u64;
    }
}

fn send_one(
    shared: &Arc<Shared>,
    connection: &mut Connection,
    target: SocketAddr,
    scheduled_ns: u64,
    kind: &str,
) {
    if connection.closed.load(Relaxed) {
        connection.writer = None;
    }
    if connection.writer.is_none() && open(connection, target, shared).is_err() {
        shared.count(|second| {
            second.sent += 1;
            second.errors += 1;
        });
        return;
    }
    let Some(writer) = connection.writer.as_mut() else {
        return;
    };
    connection.outstanding.fetch_add(1, Relaxed);
    shared.count(|second| second.sent += 1);
    if writer
        .write_all(format!("{scheduled_ns} {kind}\n").as_bytes())
        .is_err()
    {
        let _ = connection
            .outstanding
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        shared.count(|second| second.errors += 1);
        if let Some(writer) = connection.writer.take() {
            let _ = writer.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Writes one report line at every wall-clock second boundary.
fn report_main(shared: &Shared, out: &mut File) {
    loop {
        let now = unix_now_ns();
        let next_second = (now / 1_000_000_000 + 1) * 1_000_000_000;
        thread::sleep(Duration::from_nanos((next_second - now) as u64));
        let second =
            std::mem::take(&mut *shared.second.lock().unwrap_or_else(PoisonError::into_inner));
        let line = LoadSecond {
            unix_s: next_second / 1_000_000_000 - 1,
            rate: shared.rate(),
            sent: second.sent,
            completed: second.completed,
            errors: second.errors,
            p50_us: second.latency.quantile_us(0.5),
            p99_us: second.latency.quantile_us(0.99),
            max_us: second.max_us,
            latency: second.latency,
        };
        let Ok(json) = serde_json::to_string(&line) else {
            continue;
        };
        if writeln!(out, "{json}").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}
