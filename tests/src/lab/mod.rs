//! The scenario lab: the whole product and the demo service on this machine, with real
//! faults injected on a timeline and their ground truth recorded.
//!
//! [`Lab::start`] takes the machine-wide lab lock, then starts a collector (SQLite in a
//! scratch directory, or ClickHouse), `stallscope-agent run` on the whole host, two
//! network namespaces (the service and the load generator in one, the two peers in the
//! other, one veth path per peer), the journal's block device and cgroup, the peers
//! (`demo-pricing`, `demo-shipping`), the service (`demo-shop`) and the load generator
//! (`demo-load`), and waits until the collector holds a batch of them. Then the caller
//! runs phases: [`Lab::healthy`], [`Lab::inject`] (or [`Lab::start_fault`] /
//! [`Lab::end_fault`]), [`Lab::recover`], or the whole standard sequence with
//! [`Lab::run_scenarios`]. Each injection returns its [`Injection`]: class, category,
//! object, start and end (from the demo's own replies), and what the service measured
//! itself meanwhile. Dropping the lab removes everything it created, also on panic.
//!
//! The roles run from copies of `stallscope-demo` named after them (the agent names a
//! service after its executable), at niceness 0 unless configured otherwise: the
//! machine's other work runs niced, and a production service would not. The lab's own
//! collector runs in the background ([`CpuPolicy::Background`]), out of the way of the
//! service's wakeups. The roles and the agent get SIGKILL when the thread that started the
//! lab exits (so a killed test leaves no hog or whole-host agent behind): keep a lab on the
//! thread that started it.

pub mod disk;
pub mod elf;
pub mod guard;
pub mod measure;
pub mod protocol;
pub mod random;
pub mod role;
pub mod scale;
pub mod score;
pub mod truth;

mod faults;

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

pub use self::{
    faults::ActiveFault,
    measure::{Query, Window},
    protocol::{DemoMutex, LoadSecond, LoadSummary, ServiceStats, unix_now_ns},
    random::{Rng, random_fault},
    scale::Scale,
    truth::{Category, DemoPeer, Fault, FaultClass, Injection, Object, Phase},
};
use crate::{
    AgentRun, binary,
    collector::{CollectorProcess, CpuPolicy, TEST_TOKEN, free_port},
    lab::{disk::JournalDisk, guard::LabLock, role::Role},
    netlab::NetLab,
};

/// The service's name (its executable's file name, which becomes its `service` label).
pub const SERVICE: &str = "demo-shop";
pub const HOG: &str = "demo-hog";
/// The share of the load generator's requests that are checkouts (the rest browse):
/// checkouts take `inventory` and `fdatasync` the journal, browsing takes `sessions`.
pub const CHECKOUT_SHARE: f64 = 0.25;
/// The port the service listens on, inside the front namespace.
const SERVICE_PORT: u16 = 7000;

/// The agent's signals in the lab: off-CPU time by cause and on-CPU samples (every
/// category's time), run-queue latency (CPU contention per wakeup), futex and kernel
/// lock waits with the lock's address (which lock), block I/O by device (which disk),
/// connect, socket waits, RTT and retransmits per peer (which peer), and syscall latency
/// (which syscall waited, e.g. `fdatasync`).
pub const SIGNALS: &str = "offcpu,oncpu,runqueue,lock,disk,network,syscall";

/// Where the lab keeps its data.
#[derive(Debug, Clone)]
pub enum Storage {
    Sqlite,
    /// ClickHouse at `url`, in `database` (created by the collector).
    ClickHouse {
        url: String,
        database: String,
    },
}

/// How a lab runs. [`LabConfig::new`] gives the defaults; change fields as needed.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub scale: Scale,
    /// Seeds every random choice: fault parameters and onset jitter.
    pub seed: u64,
    /// Where `stallscope-agent`, `stallscope-collector` and `stallscope-demo` are
    /// (default: `$STALLSCOPE_LAB_BIN_DIR`, else the directory of the running tests'
    /// own build, e.g. `target/debug`).
    pub bin_dir: PathBuf,
    /// Scratch directory (default: `$TMPDIR/stallscope-lab-PID`).
    pub scratch: Option<PathBuf>,
    /// Requests per second of the load generator, over `connections` connections.
    pub rate: f64,
    pub connections: usize,
    /// Worker threads of the service.
    pub workers: usize,
    /// The peers' normal answer delays.
    pub pricing_delay: Duration,
    pub shipping_delay: Duration,
    /// The agent's `--signals`.
    pub signals: String,
    /// The agent's on-CPU sampling frequency.
    pub frequency_hz: u32,
    /// More agent and collector arguments (e.g. detection settings).
    pub agent_args: Vec<String>,
    pub collector_args: Vec<String>,
    /// The collector's TOML file (e.g. [`Scale::detect_toml`]), written into the scratch
    /// directory and passed as `--config`.
    pub collector_config: Option<String>,
    pub storage: Storage,
    /// How long to wait for another lab on this machine to finish before refusing.
    pub lock_wait: Duration,
    /// Niceness of the demo's processes and of the agent (`None`: inherit the caller's).
    pub demo_nice: Option<i32>,
    pub agent_nice: Option<i32>,
}

impl LabConfig {
    pub fn new(scale: Scale, seed: u64) -> Self {
        Self {
            scale,
            seed,
            bin_dir: std::env::var_os("STALLSCOPE_LAB_BIN_DIR")
                .map_or_else(crate::binary_dir, PathBuf::from),
            scratch: None,
            rate: 200.0,
            connections: 8,
            workers: 32,
            pricing_delay: Duration::from_millis(2),
            shipping_delay: Duration::from_millis(1),
            signals: SIGNALS.to_owned(),
            frequency_hz: 99,
            agent_args: Vec::new(),
            collector_args: Vec::new(),
            collector_config: None,
            storage: Storage::Sqlite,
            lock_wait: Duration::from_secs(30 * 60),
            demo_nice: Some(0),
            agent_nice: Some(0),
        }
    }
}

/// The demo binaries the lab runs, copied into its scratch directory.
struct Binaries {
    /// The service's first build and the deploy's second (same file name).
    shop_v1: PathBuf,
    shop_v2: PathBuf,
    v1_build_id: String,
    v2_build_id: String,
    pricing: PathBuf,
    shipping: PathBuf,
    load: PathBuf,
    hog: PathBuf,
}

impl Binaries {
    fn install(demo: &Path, dir: &Path, salt: u64) -> anyhow::Result<Self> {
        let copy = |relative: &str| -> anyhow::Result<PathBuf> {
            let to = dir.join(relative);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(demo, &to)
                .with_context(|| format!("copying {} to {}", demo.display(), to.display()))?;
            elf::make_executable(&to)?;
            Ok(to)
        };
        let shop_v1 = copy(&format!("v1/{SERVICE}"))?;
        let shop_v2 = dir.join(format!("v2/{SERVICE}"));
        std::fs::create_dir_all(dir.join("v2"))?;
        let v2_build_id = elf::copy_with_new_build_id(demo, &shop_v2, salt)?;
        Ok(Self {
            v1_build_id: elf::build_id(&shop_v1)?,
            v2_build_id,
            shop_v1,
            shop_v2,
            pricing: copy("demo-pricing")?,
            shipping: copy("demo-shipping")?,
            load: copy("demo-load")?,
            hog: copy(HOG)?,
        })
    }
}

/// A running lab. See the module documentation.
pub struct Lab {
    config: LabConfig,
    scratch: PathBuf,
    rng: Rng,
    binaries: Binaries,
    service: Option<Role>,
    /// Whether the running service is the deploy's second build.
    service_is_v2: bool,
    load: Option<Role>,
    pricing: Option<Role>,
    shipping: Option<Role>,
    hog: Option<Role>,
    agent: Option<AgentRun>,
    disk: Option<JournalDisk>,
    net: Option<NetLab>,
    collector: Option<CollectorProcess>,
    injections: Vec<Injection>,
    phases: Vec<Phase>,
    /// The disk stalls while that injection runs.
    stalls: Option<disk::Stalls>,
    _lock: LabLock,
}

impl Lab {
    /// Starts everything and waits until the collector stores batches of the running
    /// service. Needs root.
    pub fn start(config: LabConfig) -> anyhow::Result<Self> {
        if !crate::is_root() {
            bail!("the lab needs root (eBPF probes, namespaces, loop devices, cgroups)");
        }
        let lock = LabLock::acquire(config.lock_wait)?;
        let scratch = config.scratch.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("stallscope-lab-{}", std::process::id()))
        });
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(scratch.join("logs"))
            .with_context(|| format!("creating {}", scratch.display()))?;
        let mut rng = Rng::new(config.seed);
        let demo = binary(&config.bin_dir, "stallscope-demo")?;
        let binaries = Binaries::install(&demo, &scratch.join("bin"), rng.next_u64())?;
        let mut lab = Self {
            rng,
            binaries,
            service: None,
            service_is_v2: false,
            load: None,
            pricing: None,
            shipping: None,
            hog: None,
            agent: None,
            disk: None,
            net: None,
            collector: None,
            injections: Vec::new(),
            phases: Vec::new(),
            stalls: None,
            _lock: lock,
            scratch,
            config,
        };
        // Each part goes into `lab` as soon as it exists, so `Drop` removes it if a
        // later part fails.
        lab.collector = Some(lab.start_collector()?);
        lab.net = Some(NetLab::create("lab", 2)?);
        lab.disk = Some(JournalDisk::create()?);
        lab.agent = Some(lab.start_agent()?);
        lab.pricing = Some(lab.start_peer(DemoPeer::Pricing)?);
        lab.shipping = Some(lab.start_peer(DemoPeer::Shipping)?);
        lab.service = Some(lab.start_service(None)?);
        lab.load = Some(lab.start_load()?);
        // The first batches carry the agent's start-up (symbolizing the whole host); the
        // lab's timeline starts once a batch that began after everything ran is stored.
        let running = unix_now_ns();
        lab.wait_ingested(running + lab.batch_ns())?;
        Ok(lab)
    }

    fn batch_ns(&self) -> i64 {
        self.config.scale.batch_interval().as_nanos() as i64
    }

    fn log(&self, name: &str) -> PathBuf {
        self.scratch.join("logs").join(format!("{name}.log"))
    }

    fn start_collector(&self) -> anyhow::Result<CollectorProcess> {
        let data = self.scratch.join("data").to_string_lossy().into_owned();
        let retention = self.config.scale.retention();
        let mut args: Vec<String> = vec![
            "--plaintext".into(),
            "--query-tokens".into(),
            TEST_TOKEN.into(),
            "--retention".into(),
            retention,
        ];
        match &self.config.storage {
            Storage::Sqlite => args.extend(["--data-dir".into(), data]),
            Storage::ClickHouse { url, database } => args.extend([
                "--storage".into(),
                "clickhouse".into(),
                "--clickhouse-url".into(),
                url.clone(),
                "--clickhouse-database".into(),
                database.clone(),
            ]),
        }
        if let Some(toml) = &self.config.collector_config {
            let path = self.scratch.join("collector.toml");
            std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
            args.extend(["--config".into(), path.to_string_lossy().into_owned()]);
        }
        args.extend(self.config.collector_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The collector shares the service's CPUs. Scheduled as the service is, its
        // ingestion and `why` delay the service's wakeups, and `why` rightly names it as
        // the CPU contention instead of the injected cause; in the background it yields
        // to every wakeup yet keeps its share, so it keeps up while a hog spins.
        CollectorProcess::start_with_policy(
            &self.config.bin_dir,
            free_port()?,
            &args,
            &[],
            CpuPolicy::Background,
        )
    }

    fn start_agent(&self) -> anyhow::Result<AgentRun> {
        let url = self.collector_url();
        let spool = self.scratch.join("spool").to_string_lossy().into_owned();
        let batch = format!("{}s", self.config.scale.batch_interval().as_secs());
        let frequency = self.config.frequency_hz.to_string();
        let mut args: Vec<&str> = vec![
            "run",
            "--collector",
            &url,
            "--agent-id",
            "lab",
            "--spool-dir",
            &spool,
            "--batch-interval",
            &batch,
            "--signals",
            &self.config.signals,
            "--frequency",
            &frequency,
            "--max-backoff",
            "2s",
            "--flush-timeout",
            "30s",
        ];
        args.extend(self.config.agent_args.iter().map(String::as_str));
        let mut command = Command::new(binary(&self.config.bin_dir, "stallscope-agent")?);
        command.args(&args);
        if let Some(nice) = self.config.agent_nice {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: the closure runs in the child between fork and exec and only makes
            // one system call (setpriority), which is async-signal-safe; it allocates
            // nothing and takes no lock.
            unsafe {
                command.pre_exec(move || {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        {
            use std::os::unix::process::CommandExt as _;
            // A whole-host agent must not outlive a lab whose process was killed (its
            // `Drop` never ran): it gets SIGKILL when the thread that started it exits.
            // SAFETY: as above, one async-signal-safe system call (prctl).
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut agent = AgentRun::spawn(command)?;
        agent.wait_ready(Duration::from_secs(120))?;
        Ok(agent)
    }

    /// `stallscope-demo` with the lab's common options: namespace, niceness, safety net.
    fn demo_command(&self, executable: &Path, netns: Option<&str>) -> Command {
        let mut command = Command::new(executable);
        command.arg("--die-with-parent");
        if let Some(ns) = netns {
            command.args(["--netns", ns]);
        }
        if let Some(nice) = self.config.demo_nice {
            command.arg(format!("--nice={nice}"));
        }
        command
    }

    fn net(&self) -> anyhow::Result<&NetLab> {
        self.net.as_ref().context("the lab's network is gone")
    }

    /// A peer's address as the agent labels it (`address:port`, client side).
    pub fn peer_address(&self, peer: DemoPeer) -> String {
        let port = 7001 + peer.path();
        format!("10.99.{}.2:{port}", peer.path())
    }

    fn peer_delay(&self, peer: DemoPeer) -> Duration {
        match peer {
            DemoPeer::Pricing => self.config.pricing_delay,
            DemoPeer::Shipping => self.config.shipping_delay,
        }
    }

    fn start_peer(&self, peer: DemoPeer) -> anyhow::Result<Role> {
        let executable = match peer {
            DemoPeer::Pricing => &self.binaries.pricing,
            DemoPeer::Shipping => &self.binaries.shipping,
        };
        let mut command = self.demo_command(executable, Some(&self.net()?.server));
        command.args([
            "peer",
            "--listen",
            &self.peer_address(peer),
            "--delay-us",
            &self.peer_delay(peer).as_micros().to_string(),
        ]);
        Role::start(peer.name(), command, &self.log(peer.name()))
    }

    fn start_service(&self, v2: Option<Duration>) -> anyhow::Result<Role> {
        let disk = self.disk.as_ref().context("the lab's disk is gone")?;
        let executable = if v2.is_some() {
            &self.binaries.shop_v2
        } else {
            &self.binaries.shop_v1
        };
        let mut command = self.demo_command(executable, Some(&self.net()?.client));
        command.arg("--cgroup").arg(&disk.cgroup);
        command.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{SERVICE_PORT}"),
            "--pricing",
            &self.peer_address(DemoPeer::Pricing),
            "--shipping",
            &self.peer_address(DemoPeer::Shipping),
            "--workers",
            &self.config.workers.to_string(),
        ]);
        command.arg("--journal-dir").arg(disk.mount.join("journal"));
        if let Some(tax_table) = v2 {
            command.args(["--tax-table-us", &tax_table.as_micros().to_string()]);
        }
        let name = if v2.is_some() { "serve-v2" } else { "serve" };
        Role::start(name, command, &self.log(name))
    }

    fn start_load(&self) -> anyhow::Result<Role> {
        let mut command = self.demo_command(&self.binaries.load, Some(&self.net()?.client));
        command.args([
            "load",
            "--target",
            &format!("127.0.0.1:{SERVICE_PORT}"),
            "--rate",
            &self.config.rate.to_string(),
            "--connections",
            &self.config.connections.to_string(),
            "--checkout-share",
            &CHECKOUT_SHARE.to_string(),
        ]);
        command.arg("--report").arg(self.load_report_path());
        Role::start("load", command, &self.log("load"))
    }

    /// The collector's address (plaintext, loopback) and the query token it accepts.
    pub fn collector_url(&self) -> String {
        self.collector
            .as_ref()
            .map(CollectorProcess::plaintext_url)
            .unwrap_or_default()
    }

    pub fn token(&self) -> &'static str {
        TEST_TOKEN
    }

    /// The collector, e.g. to restart it.
    pub fn collector_mut(&mut self) -> Option<&mut CollectorProcess> {
        self.collector.as_mut()
    }

    /// A query client for the lab's collector.
    pub fn query(&self) -> anyhow::Result<Query> {
        Query::connect(&self.collector_url(), TEST_TOKEN)
    }

    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    pub fn scale(&self) -> Scale {
        self.config.scale
    }

    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// The seeded random source (draw fault parameters with [`random_fault`]).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Every injection (and control) so far, in order.
    pub fn injections(&self) -> &[Injection] {
        &self.injections
    }

    /// Every phase so far, in order.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// The build-id of the service's running binary (the second build's during a deploy).
    pub fn service_build_id(&self) -> &str {
        if self.service_is_v2 {
            &self.binaries.v2_build_id
        } else {
            &self.binaries.v1_build_id
        }
    }

    /// The current service process's pid.
    pub fn service_pid(&self) -> Option<u32> {
        self.service.as_ref().map(|s| s.pid)
    }

    pub fn load_report_path(&self) -> PathBuf {
        self.scratch.join("load.jsonl")
    }

    /// The load generator's per-second lines so far.
    pub fn load_report(&self) -> anyhow::Result<Vec<LoadSecond>> {
        let path = self.load_report_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        // The last line may be half-written.
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    }

    /// The load generator's numbers over `[from, until)`.
    pub fn load_summary(
        &self,
        from_unix_ns: i64,
        until_unix_ns: i64,
    ) -> anyhow::Result<LoadSummary> {
        Ok(LoadSummary::of(
            &self.load_report()?,
            from_unix_ns,
            until_unix_ns,
        ))
    }

    /// Waits until the collector stored the batch covering `unix_ns` (the agent sends a
    /// batch after its interval ends, so this waits at least that long).
    pub fn wait_ingested(&mut self, unix_ns: i64) -> anyhow::Result<()> {
        let mut query = self.query()?;
        let batch = self.batch_ns();
        let deadline = std::time::Instant::now()
            + Duration::from_secs(120)
            + self.config.scale.batch_interval() * 3;
        loop {
            if query
                .last_batch_unix_ns()?
                .is_some_and(|start| start + batch >= unix_ns)
            {
                return Ok(());
            }
            if let Some(agent) = self.agent.as_mut()
                && !agent.is_running()
            {
                bail!("the agent exited: {}", agent.log_text());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the collector has no batch covering {unix_ns} yet; agent log: {}",
                    self.agent
                        .as_ref()
                        .map(AgentRun::log_text)
                        .unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Lets `duration` pass with nothing changed, recorded as phase `name`.
    pub fn phase(&mut self, name: &str, duration: Duration) -> anyhow::Result<Phase> {
        let start = unix_now_ns();
        self.sleep_checking(duration)?;
        let phase = Phase {
            name: name.to_owned(),
            start_unix_ns: start,
            end_unix_ns: unix_now_ns(),
        };
        self.phases.push(phase.clone());
        Ok(phase)
    }

    /// A healthy stretch (no injection; not a control either: see [`Fault::Healthy`]).
    pub fn healthy(&mut self, duration: Duration) -> anyhow::Result<Phase> {
        self.phase("healthy", duration)
    }

    /// The stretch after an injection ended.
    pub fn recover(&mut self, duration: Duration) -> anyhow::Result<Phase> {
        self.phase("recover", duration)
    }

    /// Sleeps, failing early if a role died.
    fn sleep_checking(&mut self, duration: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + duration;
        loop {
            for role in [
                &mut self.service,
                &mut self.load,
                &mut self.pricing,
                &mut self.shipping,
            ]
            .into_iter()
            .flatten()
            {
                if !role.is_running() {
                    bail!(
                        "{} exited during the run; its log: {}",
                        role.name,
                        role.log.display()
                    );
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(());
            }
            thread::sleep((deadline - now).min(Duration::from_millis(250)));
        }
    }

    /// Injects `fault` for `duration`, then removes it; returns its ground truth.
    pub fn inject(&mut self, fault: Fault, duration: Duration) -> anyhow::Result<Injection> {
        let active = self.start_fault(fault)?;
        self.sleep_checking(duration)?;
        self.end_fault(active)
    }

    /// The standard sequence: healthy for the scale's healthy time, then for each class
    /// a fault drawn from the seed ([`random_fault`]), the
    /// scale's injection time and recovery time. Each onset is delayed by a seeded jitter
    /// of up to two batch intervals, so onsets do not line up with batches.
    pub fn run_scenarios(&mut self, classes: &[FaultClass]) -> anyhow::Result<Vec<Injection>> {
        let scale = self.config.scale;
        let jitter_max = scale.batch_interval() * 2;
        let jitter = self.rng.duration(Duration::ZERO, jitter_max);
        self.healthy(scale.healthy() + jitter)?;
        let mut done = Vec::new();
        for class in classes {
            let fault = random_fault(*class, &mut self.rng);
            done.push(self.inject(fault, scale.inject())?);
            let jitter = self.rng.duration(Duration::ZERO, jitter_max);
            self.recover(scale.recover() + jitter)?;
        }
        Ok(done)
    }

    /// Writes the ground truth so far to `ground-truth.json` in the scratch directory.
    fn save_truth(&self) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(&serde_json::json!({
            "seed": self.config.seed,
            "scale": self.config.scale.factor(),
            "service": SERVICE,
            "phases": self.phases,
            "injections": self.injections,
        }))?;
        std::fs::write(self.scratch.join("ground-truth.json"), json)?;
        Ok(())
    }

    /// Stops the agent (SIGTERM: its last batch is sent, within its flush timeout), so
    /// everything up to now is stored.
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(agent) = self.agent.take() {
            agent.terminate();
            let exit = agent.wait(Duration::from_secs(90))?;
            let _ = std::fs::write(self.log("agent"), &exit.stderr);
            if !exit.status.success() {
                bail!("the agent failed ({}): {}", exit.status, exit.stderr);
            }
        }
        Ok(())
    }

    /// Stops the load, the service, the peers and the agent; the collector keeps
    /// answering queries until the lab is dropped.
    pub fn stop_workload(&mut self) -> anyhow::Result<()> {
        for role in [
            self.load.take(),
            self.hog.take(),
            self.service.take(),
            self.pricing.take(),
            self.shipping.take(),
        ]
        .into_iter()
        .flatten()
        {
            role.quit(Duration::from_secs(10))?;
        }
        self.stop_agent()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.save_truth();
        // Processes first (they hold the mount, the cgroup and the namespaces), then what
        // they used, then the collector; the lock goes last.
        for role in [
            self.load.take(),
            self.hog.take(),
            self.service.take(),
            self.pricing.take(),
            self.shipping.take(),
        ]
        .into_iter()
        .flatten()
        {
            drop(role);
        }
        drop(self.stalls.take());
        if let Some(agent) = self.agent.take() {
            let _ = std::fs::write(self.log("agent"), agent.log_text());
            // Dropped, not `kill()`ed: its pinned probes are removed with it.
            drop(agent);
        }
        if let Some(collector) = &self.collector {
            let _ = std::fs::write(self.log("collector"), collector.log());
        }
        drop(self.disk.take());
        drop(self.net.take());
        drop(self.collector.take());
        let _ = std::fs::remove_dir_all(self.scratch.join("bin"));
        let _ = std::fs::remove_dir_all(self.scratch.join("spool"));
    }
}
