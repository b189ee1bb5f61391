//! The service's request path, one `#[inline(never)]` function per step so profiles name
//! each step (these names are what `stallscope why` must point at):
//!
//! ```text
//! worker_main -> serve_request -> handle_checkout -> reserve_inventory   (mutex `inventory`)
//!                                                 -> render_page -> render_template
//!                                                                -> format_line_items [-> recompute_tax_table]
//!                                                 -> quote_price    -> call_peer (pricing)
//!                                                 -> quote_shipping -> call_peer (shipping)
//!                                                 -> append_journal -> sync_journal (fdatasync)
//!                              -> handle_browse   -> load_session        (mutex `sessions`)
//!                                                 -> render_page, quote_price, quote_shipping, append_journal
//! ```
//!
//! `recompute_tax_table` runs only with `--tax-table-us` above 0: the "slower build" a
//! deploy injection starts (the same code with another build-id; see the lab).
//! Every step adds its wall time to [`METRICS`], the service's own measurements.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use crate::{
    cpu::{iterations_for, mix, thread_cpu_time},
    protocol::{ServiceStats, unix_now_ns},
};

/// Stock per item: what checkouts reserve.
pub static INVENTORY: Mutex<BTreeMap<u32, u32>> = Mutex::new(BTreeMap::new());
/// Last visit per session: what browsing updates.
pub static SESSIONS: Mutex<BTreeMap<u32, u64>> = Mutex::new(BTreeMap::new());

/// The statics' paths, as symbol tables name them.
pub const INVENTORY_SYMBOL: &str = concat!(module_path!(), "::INVENTORY");
pub const SESSIONS_SYMBOL: &str = concat!(module_path!(), "::SESSIONS");

/// Counters of the service's own measurements (nanoseconds of wall time per step).
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub browse: AtomicU64,
    pub checkout: AtomicU64,
    pub inventory_wait_ns: AtomicU64,
    pub sessions_wait_ns: AtomicU64,
    pub inventory_held_ns: AtomicU64,
    pub sessions_held_ns: AtomicU64,
    pub pricing_calls: AtomicU64,
    pub pricing_ns: AtomicU64,
    pub shipping_calls: AtomicU64,
    pub shipping_ns: AtomicU64,
    pub render_ns: AtomicU64,
    pub render_cpu_ns: AtomicU64,
    pub line_items_ns: AtomicU64,
    pub journal_appends: AtomicU64,
    pub journal_syncs: AtomicU64,
    pub journal_sync_ns: AtomicU64,
    pub errors: AtomicU64,
}

pub static METRICS: Metrics = Metrics {
    requests: AtomicU64::new(0),
    browse: AtomicU64::new(0),
    checkout: AtomicU64::new(0),
    inventory_wait_ns: AtomicU64::new(0),
    sessions_wait_ns: AtomicU64::new(0),
    inventory_held_ns: AtomicU64::new(0),
    sessions_held_ns: AtomicU64::new(0),
    pricing_calls: AtomicU64::new(0),
    pricing_ns: AtomicU64::new(0),
    shipping_calls: AtomicU64::new(0),
    shipping_ns: AtomicU64::new(0),
    render_ns: AtomicU64::new(0),
    render_cpu_ns: AtomicU64::new(0),
    line_items_ns: AtomicU64::new(0),
    journal_appends: AtomicU64::new(0),
    journal_syncs: AtomicU64::new(0),
    journal_sync_ns: AtomicU64::new(0),
    errors: AtomicU64::new(0),
};

fn add(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
}

impl Metrics {
    pub fn snapshot(&self) -> ServiceStats {
        let get = |c: &AtomicU64| c.load(Relaxed);
        let pair = |a: &AtomicU64, b: &AtomicU64, names: [&str; 2]| {
            BTreeMap::from([(names[0].to_owned(), get(a)), (names[1].to_owned(), get(b))])
        };
        ServiceStats {
            unix_ns: unix_now_ns(),
            requests: get(&self.requests),
            browse: get(&self.browse),
            checkout: get(&self.checkout),
            lock_wait_ns: pair(
                &self.inventory_wait_ns,
                &self.sessions_wait_ns,
                ["inventory", "sessions"],
            ),
            lock_held_ns: pair(
                &self.inventory_held_ns,
                &self.sessions_held_ns,
                ["inventory", "sessions"],
            ),
            peer_calls: pair(
                &self.pricing_calls,
                &self.shipping_calls,
                ["pricing", "shipping"],
            ),
            peer_ns: pair(&self.pricing_ns, &self.shipping_ns, ["pricing", "shipping"]),
            render_ns: get(&self.render_ns),
            render_cpu_ns: get(&self.render_cpu_ns),
            line_items_ns: get(&self.line_items_ns),
            journal_appends: get(&self.journal_appends),
            journal_syncs: get(&self.journal_syncs),
            journal_sync_ns: get(&self.journal_sync_ns),
            errors: get(&self.errors),
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Browse,
    Checkout,
}

/// How much CPU time each step takes.
#[derive(Debug, Clone, Copy)]
pub struct Work {
    pub render: Duration,
    pub line_items: Duration,
    /// Above 0 only in the "slower build": `format_line_items` also recomputes the tax
    /// table, this long, for every checkout.
    pub tax_table: Duration,
}

/// A persistent connection to one downstream peer, reconnected after a failure.
pub struct PeerLink {
    pub name: &'static str,
    pub address: SocketAddr,
    connection: Option<(BufReader<TcpStream>, TcpStream)>,
    line: String,
}

impl PeerLink {
    pub fn new(name: &'static str, address: SocketAddr) -> Self {
        Self {
            name,
            address,
            connection: None,
            line: String::new(),
        }
    }

    fn connected(&mut self) -> std::io::Result<&mut (BufReader<TcpStream>, TcpStream)> {
        if self.connection.is_none() {
            let stream = TcpStream::connect_timeout(&self.address, Duration::from_secs(2))?;
            stream.set_nodelay(true)?;
            // A lossy path recovers in seconds; a dead peer must not hang a worker.
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let reader = BufReader::new(stream.try_clone()?);
            self.connection = Some((reader, stream));
        }
        self.connection
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not connected"))
    }
}

/// One append-only journal file per worker (no lock shared between workers).
pub struct Journal {
    file: File,
    bytes: u64,
}

/// A journal file is truncated once it holds this much (a checkpoint).
const JOURNAL_ROTATE_BYTES: u64 = 8 << 20;

impl Journal {
    pub fn open(dir: &Path, worker: usize) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("journal-{worker}.log")))?;
        let bytes = file.metadata()?.len();
        Ok(Self { file, bytes })
    }
}

/// A worker's own resources.
pub struct Worker {
    pub pricing: PeerLink,
    pub shipping: PeerLink,
    pub journal: Journal,
    pub work: Work,
}

/// Serves one request; the error is what the client is told.
#[inline(never)]
pub fn serve_request(worker: &mut Worker, kind: Kind, id: u64) -> std::io::Result<()> {
    METRICS.requests.fetch_add(1, Relaxed);
    let result = match kind {
        Kind::Browse => handle_browse(worker, id),
        Kind::Checkout => handle_checkout(worker, id),
    };
    if result.is_err() {
        METRICS.errors.fetch_add(1, Relaxed);
    }
    result
}

#[inline(never)]
fn handle_checkout(worker: &mut Worker, id: u64) -> std::io::Result<()> {
    METRICS.checkout.fetch_add(1, Relaxed);
    let item = (id % 512) as u32;
    reserve_inventory(item);
    render_page(&worker.work, Kind::Checkout, id);
    quote_price(&mut worker.pricing, item)?;
    quote_shipping(&mut worker.shipping, item)?;
    append_journal(&mut worker.journal, "checkout", id)?;
    let synced = sync_journal(&mut worker.journal);
    // Used after the call, so the call is not a tail call: this frame stays on the stack.
    std::hint::black_box(&synced);
    synced
}

#[inline(never)]
fn handle_browse(worker: &mut Worker, id: u64) -> std::io::Result<()> {
    METRICS.browse.fetch_add(1, Relaxed);
    load_session((id % 4096) as u32);
    render_page(&worker.work, Kind::Browse, id);
    let item = (id % 512) as u32;
    quote_price(&mut worker.pricing, item)?;
    quote_shipping(&mut worker.shipping, item)?;
    let appended = append_journal(&mut worker.journal, "browse", id);
    std::hint::black_box(&appended);
    appended
}

/// Work done while holding a mutex: a short walk over the map.
#[expect(
    clippy::inline_always,
    reason = "the critical section belongs to the frame that holds the lock"
)]
#[inline(always)]
fn critical_section(map: &mut BTreeMap<u32, u64>, key: u32) {
    let entry = map.entry(key).or_insert(0);
    *entry = mix(*entry + 1);
    let mut x = *entry;
    for _ in 0..iterations_for(Duration::from_micros(15)) {
        x = mix(x);
    }
    *entry ^= x & 1;
}

/// Takes the `inventory` mutex for a short critical section.
#[inline(never)]
fn reserve_inventory(item: u32) {
    let waiting = Instant::now();
    let mut stock = INVENTORY.lock().unwrap_or_else(PoisonError::into_inner);
    add(&METRICS.inventory_wait_ns, waiting);
    let left = stock.entry(item).or_insert(1_000_000);
    *left = left.saturating_sub(1);
    let mut x = u64::from(*left);
    for _ in 0..iterations_for(Duration::from_micros(15)) {
        x = mix(x);
    }
    *left ^= (x & 1) as u32;
}

/// Takes the `sessions` mutex for a short critical section.
#[inline(never)]
fn load_session(session: u32) {
    let waiting = Instant::now();
    let mut sessions = SESSIONS.lock().unwrap_or_else(PoisonError::into_inner);
    add(&METRICS.sessions_wait_ns, waiting);
    critical_section(&mut sessions, session);
}

/// CPU work: the page template, then (checkouts) the line items.
#[inline(never)]
fn render_page(work: &Work, kind: Kind, id: u64) {
    let started = Instant::now();
    let cpu = thread_cpu_time();
    let mut x = render_template(work.render, id);
    if kind == Kind::Checkout {
        x = format_line_items(work, x);
    }
    std::hint::black_box(x);
    METRICS.render_cpu_ns.fetch_add(
        thread_cpu_time().saturating_sub(cpu).as_nanos() as u64,
        Relaxed,
    );
    add(&METRICS.render_ns, started);
}

#[inline(never)]
fn render_template(cpu: Duration, seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..iterations_for(cpu) {
        x = mix(x);
    }
    x
}

/// The function that grows in the slower build.
#[inline(never)]
fn format_line_items(work: &Work, seed: u64) -> u64 {
    let started = Instant::now();
    let mut x = seed;
    for _ in 0..iterations_for(work.line_items) {
        x = mix(x);
    }
    if !work.tax_table.is_zero() {
        x = recompute_tax_table(work.tax_table, x);
    }
    add(&METRICS.line_items_ns, started);
    x
}

/// Only in the slower build: recomputed for every checkout instead of once.
#[inline(never)]
fn recompute_tax_table(cpu: Duration, seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..iterations_for(cpu) {
        x = mix(x);
    }
    x
}

#[inline(never)]
fn quote_price(link: &mut PeerLink, item: u32) -> std::io::Result<()> {
    let started = Instant::now();
    let result = call_peer(link, item);
    METRICS.pricing_calls.fetch_add(1, Relaxed);
    add(&METRICS.pricing_ns, started);
    result
}

#[inline(never)]
fn quote_shipping(link: &mut PeerLink, item: u32) -> std::io::Result<()> {
    let started = Instant::now();
    let result = call_peer(link, item);
    METRICS.shipping_calls.fetch_add(1, Relaxed);
    add(&METRICS.shipping_ns, started);
    result
}

/// One request/response round trip to a peer: `ITEM quote\n` -> `ITEM ...\n`.
#[inline(never)]
fn call_peer(link: &mut PeerLink, item: u32) -> std::io::Result<()> {
    let name = link.name;
    let mut line = std::mem::take(&mut link.line);
    let outcome = (|| {
        let (reader, writer) = link.connected()?;
        // One write, so one segment: the peer answers a whole line.
        writer.write_all(format!("{item} quote\n").as_bytes())?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{name} closed the connection"),
            ));
        }
        Ok(())
    })();
    link.line = line;
    if outcome.is_err() {
        link.connection = None;
    }
    outcome
}

#[inline(never)]
fn append_journal(journal: &mut Journal, kind: &str, id: u64) -> std::io::Result<()> {
    if journal.bytes > JOURNAL_ROTATE_BYTES {
        journal.file.set_len(0)?;
        journal.bytes = 0;
    }
    let record = format!(
        "{} {kind} request={id} item={} status=accepted\n",
        unix_now_ns(),
        id % 512
    );
    journal.file.write_all(record.as_bytes())?;
    journal.bytes += record.len() as u64;
    METRICS.journal_appends.fetch_add(1, Relaxed);
    Ok(())
}

/// Makes the journal durable: `fdatasync(2)`.
#[inline(never)]
fn sync_journal(journal: &mut Journal) -> std::io::Result<()> {
    let started = Instant::now();
    let result = fdatasync_file(&journal.file);
    METRICS.journal_syncs.fetch_add(1, Relaxed);
    add(&METRICS.journal_sync_ns, started);
    result
}

/// `fdatasync(2)` in a frame of its own. The C library's wrapper keeps no frame pointer,
/// so a frame-pointer stack walk from inside it skips its caller: that is this frame, and
/// `sync_journal` stays visible.
#[inline(never)]
fn fdatasync_file(file: &File) -> std::io::Result<()> {
    let result = file.sync_data();
    std::hint::black_box(&result);
    result
}

/// The lock-contention injection's holder of `inventory`: holds it for `hold`.
#[inline(never)]
pub fn audit_inventory(hold: Duration) {
    let mut stock = INVENTORY.lock().unwrap_or_else(PoisonError::into_inner);
    let held = Instant::now();
    // Waiting on something slow while holding the lock: the bug being injected.
    wait_holding(hold);
    stock.entry(0).or_insert(1_000_000);
    drop(stock);
    add(&METRICS.inventory_held_ns, held);
}

/// How a holder waits while it holds its mutex: parked, like the holder thread between
/// holds, so that the injection changes the lock waits of the service's requests and
/// nothing else (a `sleep` would add the holder's own sleeping, another cause category,
/// to the degradation).
fn wait_holding(hold: Duration) {
    let until = Instant::now() + hold;
    loop {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::park_timeout(until - now);
    }
}

/// The lock-contention injection's holder of `sessions`: holds it for `hold`.
#[inline(never)]
pub fn expire_sessions(hold: Duration) {
    let mut sessions = SESSIONS.lock().unwrap_or_else(PoisonError::into_inner);
    let held = Instant::now();
    wait_holding(hold);
    sessions.retain(|_, last| *last != u64::MAX);
    drop(sessions);
    add(&METRICS.sessions_held_ns, held);
}
