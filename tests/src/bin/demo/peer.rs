//! `stallscope-demo peer`: a downstream service (pricing or shipping). Each connection
//! gets a thread that answers every request line (`ITEM quote`) after the current delay,
//! which `delay US` changes at runtime (the slow-peer injection).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    control::{not_here, ok, say, serve_commands},
    protocol::Command,
};

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on
    #[arg(long)]
    listen: SocketAddr,
    /// Delay before each answer, in microseconds
    #[arg(long, default_value_t = 1000)]
    delay_us: u64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr()?;
    let delay_us = Arc::new(AtomicU64::new(args.delay_us));
    {
        let delay_us = Arc::clone(&delay_us);
        thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || {
                for (index, stream) in listener.incoming().enumerate() {
                    let Ok(stream) = stream else { continue };
                    let delay_us = Arc::clone(&delay_us);
                    let _ = thread::Builder::new()
                        .name(format!("peer-conn-{index}"))
                        .spawn(move || {
                            let _ = answer_requests(stream, &delay_us);
                        });
                }
            })?;
    }
    say(&format!(
        "ready pid={} addr={address} delay_us={}",
        std::process::id(),
        args.delay_us
    ));
    serve_commands(|command| match command {
        Command::Stats => Ok("stats {}".to_owned()),
        Command::Delay(delay) => {
            delay_us.store(delay.as_micros() as u64, Relaxed);
            Ok(ok("delay"))
        }
        other => Err(not_here("peer", other)),
    });
    Ok(())
}

fn answer_requests(stream: TcpStream, delay_us: &AtomicU64) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let item = line.split_whitespace().next().unwrap_or("0");
        let answer = answer_after_delay(item, delay_us.load(Relaxed));
        writer.write_all(answer.as_bytes())?;
    }
    Ok(())
}

/// The peer's work: waiting `delay_us`, then answering.
#[inline(never)]
fn answer_after_delay(item: &str, delay_us: u64) -> String {
    thread::sleep(Duration::from_micros(delay_us));
    format!("{item} 1999\n")
}
