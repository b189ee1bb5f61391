//! Starting and ending each injection, and its ground truth: the times come from the
//! demo's acknowledgements (`ok VERB unix_ns=T`) or from just after the lab's own system
//! call took effect (blkio throttle, nftables rule), the object from what the lab set up.

use std::time::Duration;

use anyhow::Context as _;

use super::{
    HOG, Lab, SERVICE,
    protocol::{Command, ServiceStats, unix_now_ns},
    truth::{DemoPeer, Fault, Injection, Object},
};

/// An injection in progress: [`Lab::end_fault`] removes it.
#[derive(Debug)]
pub struct ActiveFault {
    fault: Fault,
    start_unix_ns: i64,
    object: Object,
    /// The service's measurements when it started (absent after a restart).
    stats_before: Option<ServiceStats>,
}

impl ActiveFault {
    pub fn fault(&self) -> &Fault {
        &self.fault
    }

    pub fn start_unix_ns(&self) -> i64 {
        self.start_unix_ns
    }
}

/// nftables table of the packet-loss injection, in the peers' namespace.
const LOSS_TABLE: &str = "stallscope_lab_loss";

impl Lab {
    fn service_role(&mut self) -> anyhow::Result<&mut super::Role> {
        self.service.as_mut().context("the service is not running")
    }

    fn peer_role(&mut self, peer: DemoPeer) -> anyhow::Result<&mut super::Role> {
        match peer {
            DemoPeer::Pricing => self.pricing.as_mut(),
            DemoPeer::Shipping => self.shipping.as_mut(),
        }
        .context("the peer is not running")
    }

    fn peer_object(&self, peer: DemoPeer) -> Object {
        Object::Peer {
            name: peer.name().to_owned(),
            address: self.peer_address(peer),
            caller_function: peer.caller_function().to_owned(),
        }
    }

    /// Starts `fault`; the returned value ends it.
    pub fn start_fault(&mut self, fault: Fault) -> anyhow::Result<ActiveFault> {
        let stats_before = Some(self.service_role()?.stats()?);
        let (start_unix_ns, object) = match &fault {
            Fault::Healthy => (unix_now_ns(), Object::None),
            Fault::LoadDoubling => {
                let rate = self.config.rate * 2.0;
                let load = self.load.as_mut().context("the load generator is gone")?;
                (load.command_at(&Command::Rate(rate))?, Object::None)
            }
            Fault::Lock {
                mutex,
                hold,
                period,
            } => {
                let service = self.service_role()?;
                let address = service
                    .ready_value(mutex.name())?
                    .parse()
                    .map_err(anyhow::Error::msg)?;
                let symbol = service
                    .ready_value(&format!("{}_symbol", mutex.name()))?
                    .to_owned();
                let at = service.command_at(&Command::LockHold {
                    mutex: *mutex,
                    hold: *hold,
                    period: *period,
                })?;
                let object = Object::Mutex {
                    name: mutex.name().to_owned(),
                    symbol,
                    address,
                    waiter_function: mutex.waiter_function().to_owned(),
                    holder_function: mutex.holder_function().to_owned(),
                };
                (at, object)
            }
            Fault::SlowPeer { peer, extra_delay } => {
                let delay = self.peer_delay(*peer) + *extra_delay;
                let at = self.peer_role(*peer)?.command_at(&Command::Delay(delay))?;
                (at, self.peer_object(*peer))
            }
            Fault::CpuHog { threads } => {
                let mut command = self.demo_command(&self.binaries.hog, None);
                command.args(["hog", "--threads", &threads.to_string()]);
                let hog = super::Role::start("hog", command, &self.log("hog"))?;
                let object = Object::Process {
                    name: HOG.to_owned(),
                    pid: hog.pid,
                };
                let at = hog.ready_unix_ns;
                self.hog = Some(hog);
                (at, object)
            }
            Fault::Disk { stall, period } => {
                let disk = self.disk.as_ref().context("the lab's disk is gone")?;
                let at = unix_now_ns();
                self.stalls = Some(disk.start_stalls(*stall, *period)?);
                let disk = self.disk.as_ref().context("the lab's disk is gone")?;
                let object = Object::Device {
                    device: disk.name.clone(),
                    major_minor: disk.major_minor.clone(),
                    syscall: "fdatasync".to_owned(),
                    function: "sync_journal".to_owned(),
                };
                (at, object)
            }
            Fault::Deploy { tax_table } => {
                let old_pid = self.service_pid().unwrap_or(0);
                self.restart_service(Some(*tax_table))?;
                let service = self.service_role()?;
                let (at, new_pid) = (service.ready_unix_ns, service.pid);
                let object = Object::Build {
                    executable: self.binaries.shop_v2.display().to_string(),
                    old_build_id: self.binaries.v1_build_id.clone(),
                    new_build_id: self.binaries.v2_build_id.clone(),
                    function: "format_line_items".to_owned(),
                    added_function: "recompute_tax_table".to_owned(),
                    old_pid,
                    new_pid,
                };
                (at, object)
            }
            Fault::PacketLoss { peer, percent } => {
                self.drop_packets(*peer, *percent)?;
                (unix_now_ns(), self.peer_object(*peer))
            }
        };
        let stats_before = if matches!(fault, Fault::Deploy { .. }) {
            None
        } else {
            stats_before
        };
        Ok(ActiveFault {
            fault,
            start_unix_ns,
            object,
            stats_before,
        })
    }

    /// Ends an injection and records its ground truth.
    pub fn end_fault(&mut self, active: ActiveFault) -> anyhow::Result<Injection> {
        let stats_end = self.service_role()?.stats()?;
        let end_unix_ns = match &active.fault {
            Fault::Healthy => unix_now_ns(),
            Fault::LoadDoubling => {
                let rate = self.config.rate;
                let load = self.load.as_mut().context("the load generator is gone")?;
                load.command_at(&Command::Rate(rate))?
            }
            Fault::Lock { .. } => self.service_role()?.command_at(&Command::LockRelease)?,
            Fault::SlowPeer { peer, .. } => {
                let delay = self.peer_delay(*peer);
                self.peer_role(*peer)?.command_at(&Command::Delay(delay))?
            }
            Fault::CpuHog { .. } => {
                let hog = self.hog.take().context("the hog is not running")?;
                hog.quit(Duration::from_secs(10))?
            }
            Fault::Disk { .. } => {
                self.stalls.take().context("no disk stalls running")?.end();
                unix_now_ns()
            }
            Fault::Deploy { .. } => {
                // Rolled back: the first build serves again.
                self.restart_service(None)?;
                self.service_role()?.ready_unix_ns
            }
            Fault::PacketLoss { .. } => {
                self.stop_dropping_packets()?;
                unix_now_ns()
            }
        };
        let service_stats = match &active.stats_before {
            Some(before) => stats_end.since(before),
            None => stats_end,
        };
        let injection = Injection {
            class: active.fault.class(),
            category: active.fault.class().category(),
            fault: active.fault,
            object: active.object,
            service: SERVICE.to_owned(),
            start_unix_ns: active.start_unix_ns,
            end_unix_ns,
            service_stats,
        };
        self.injections.push(injection.clone());
        self.phases.push(super::Phase {
            name: injection.class.name().to_owned(),
            start_unix_ns: injection.start_unix_ns,
            end_unix_ns: injection.end_unix_ns,
        });
        self.save_truth()?;
        Ok(injection)
    }

    /// Stops the service and starts the given build (`Some`: the second, slower one).
    fn restart_service(&mut self, v2: Option<Duration>) -> anyhow::Result<()> {
        if let Some(old) = self.service.take() {
            old.quit(Duration::from_secs(10))?;
        }
        self.service = Some(self.start_service(v2)?);
        self.service_is_v2 = v2.is_some();
        Ok(())
    }

    /// Drops `percent` of the TCP segments the service sends to `peer`, as they arrive in
    /// the peers' namespace (on the wire, as a lossy link would: the sender sees nothing
    /// and retransmits after its timeout).
    fn drop_packets(&mut self, peer: DemoPeer, percent: u32) -> anyhow::Result<()> {
        let net = self.net()?;
        let rules = format!(
            "table inet {LOSS_TABLE} {{\n  chain in {{\n    type filter hook input priority 0; policy accept;\n    iifname \"veth{}\" meta l4proto tcp numgen random mod 100 < {percent} drop\n  }}\n}}\n",
            peer.path()
        );
        let file = self.scratch.join("loss.nft");
        std::fs::write(&file, rules)?;
        crate::netlab::run(
            "ip",
            &[
                "netns",
                "exec",
                &net.server,
                "nft",
                "-f",
                &file.to_string_lossy(),
            ],
        )
    }

    fn stop_dropping_packets(&mut self) -> anyhow::Result<()> {
        let net = self.net()?;
        crate::netlab::run(
            "ip",
            &[
                "netns",
                "exec",
                &net.server,
                "nft",
                "delete",
                "table",
                "inet",
                LOSS_TABLE,
            ],
        )
    }
}
