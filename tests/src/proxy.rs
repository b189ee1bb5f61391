//! A TCP forwarder on loopback between the collector and its ClickHouse: stopping it
//! makes ClickHouse unreachable for that collector alone (the shared test ClickHouse
//! keeps serving everyone else), starting it again on the same port brings it back.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
};

use anyhow::Context as _;

/// A running forwarder from `port` on 127.0.0.1 to `target`.
pub struct TcpProxy {
    pub port: u16,
    target: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: JoinHandle<()>,
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0_u8; 16 * 1024];
    while let Ok(read) = from.read(&mut buffer) {
        if read == 0 || to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl TcpProxy {
    /// Forwards a free loopback port to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let port = crate::collector::free_port()?;
        let mut proxy = Self {
            port,
            target,
            running: None,
        };
        proxy.resume()?;
        Ok(proxy)
    }

    /// (Re)starts forwarding on the same port.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .with_context(|| format!("binding 127.0.0.1:{}", self.port))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (flag, open, target) = (Arc::clone(&stop), Arc::clone(&connections), self.target);
        let acceptor = thread::spawn(move || {
            for client in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let (Ok(client_copy), Ok(server_copy)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                if let Ok(mut open) = open.lock() {
                    open.extend(client.try_clone().ok());
                    open.extend(server.try_clone().ok());
                }
                thread::spawn(move || pump(client, server_copy));
                thread::spawn(move || pump(server, client_copy));
            }
        });
        self.running = Some(Running {
            stop,
            connections,
            acceptor,
        });
        Ok(())
    }

    /// Stops forwarding: the port refuses connections and open ones are cut.
    pub fn pause(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag and drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = running.acceptor.join();
        if let Ok(open) = running.connections.lock() {
            for stream in open.iter() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.pause();
    }
}
