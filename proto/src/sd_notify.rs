//! The service manager's notification protocol (`sd_notify(3)`), shared by agent and
//! collector: one datagram per state change (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) to
//! the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace). Without that variable (not started by systemd with `Type=notify`) every
//! call does nothing.

use std::{
    io,
    os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram},
    time::{Duration, Instant},
};

/// Where `sd_notify` messages go, from `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct ServiceNotifier {
    socket: UnixDatagram,
    target: std::os::unix::net::SocketAddr,
    /// Half of `$WATCHDOG_USEC` when the watchdog is on for this process.
    watchdog_every: Option<Duration>,
}

impl ServiceNotifier {
    /// The notifier of this process's service manager, or `None` when there is none
    /// (`$NOTIFY_SOCKET` unset or empty). A socket name that cannot be used is an error.
    pub fn from_env() -> io::Result<Option<Self>> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET").filter(|name| !name.is_empty()) else {
            return Ok(None);
        };
        let name = name.to_string_lossy().into_owned();
        let target = match name.strip_prefix('@') {
            Some(abstract_name) => {
                std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None if name.starts_with('/') => std::os::unix::net::SocketAddr::from_pathname(&name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET `{name}` is neither a path nor an @abstract name"),
                ));
            }
        };
        Ok(Some(Self {
            socket: UnixDatagram::unbound()?,
            target,
            watchdog_every: watchdog_interval(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            ),
        }))
    }

    /// Sends one message (`KEY=VALUE` lines).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.target)
            .map(|_| ())
    }

    /// `READY=1`: start-up is complete.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={status}"))
    }

    /// `STOPPING=1`: shutting down.
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// How often to send `WATCHDOG=1` (half the manager's timeout), if it watches us.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// A heartbeat for the watchdog, `None` when the watchdog is off.
    pub fn heartbeat(&self) -> Option<Heartbeat<'_>> {
        self.watchdog_every.map(|every| Heartbeat {
            notifier: self,
            every,
            last: None,
        })
    }
}

/// Half of `$WATCHDOG_USEC` if the watchdog is meant for process `pid` (`$WATCHDOG_PID`
/// unset or equal to it).
fn watchdog_interval(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    if for_pid.is_some_and(|target| target.trim().parse::<u32>().ok() != Some(pid)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|usec| *usec > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` when [`Heartbeat::beat`] is called and the last one is at least
/// half the watchdog timeout old: called from a loop's every turn, it keeps the
/// service alive exactly as long as the loop turns.
#[derive(Debug)]
pub struct Heartbeat<'a> {
    notifier: &'a ServiceNotifier,
    every: Duration,
    last: Option<Instant>,
}

impl Heartbeat<'_> {
    /// The loop made progress: tell the manager if it is time to.
    pub fn beat(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.every) {
            return Ok(());
        }
        self.last = Some(now);
        self.notifier.notify("WATCHDOG=1")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    #[test]
    fn watchdog_interval_is_half_the_timeout_and_only_for_us() {
        assert_eq!(
            watchdog_interval(Some("10000000"), None, 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval(Some("10000000"), Some("7"), 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(watchdog_interval(Some("10000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn messages_reach_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("sd-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind path");
        let name = format!("stallscope-sd-notify-test-{}", std::process::id());
        let abstract_addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let abstract_receiver = UnixDatagram::bind_addr(&abstract_addr).expect("bind abstract");
        for (target, receiver) in [
            (
                std::os::unix::net::SocketAddr::from_pathname(&path).expect("path address"),
                &receiver,
            ),
            (abstract_addr, &abstract_receiver),
        ] {
            let notifier = ServiceNotifier {
                socket: UnixDatagram::unbound().expect("socket"),
                target,
                watchdog_every: Some(Duration::from_secs(3600)),
            };
            notifier.ready("up").expect("send");
            let mut heartbeat = notifier.heartbeat().expect("watchdog on");
            heartbeat.beat().expect("first beat");
            heartbeat.beat().expect("too early: not sent");
            notifier.stopping().expect("send");
            let mut buffer = [0u8; 256];
            let mut got = Vec::new();
            receiver
                .set_nonblocking(true)
                .expect("nonblocking receiver");
            while let Ok(len) = receiver.recv(&mut buffer) {
                got.push(String::from_utf8_lossy(&buffer[..len]).into_owned());
            }
            assert_eq!(got, ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
