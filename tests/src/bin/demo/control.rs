//! The control loop every role runs on its main thread: one command per stdin line, one
//! reply line on stdout (`ok VERB unix_ns=T`, `stats {json}`, `error REASON`), until
//! `quit` or the end of stdin.

use std::{
    io::{BufRead as _, Write as _},
    os::fd::AsFd as _,
};

use crate::protocol::{Command, unix_now_ns};

/// The reply to a command that took effect now.
pub fn ok(verb: &str) -> String {
    format!("ok {verb} unix_ns={}", unix_now_ns())
}

/// Prints one line and flushes it (the lab waits for it).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the lab is gone; the role ends when stdin closes too.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs commands through `handle` until `quit` or the end of stdin. `handle` returns the
/// reply line, or the reason the command was refused.
///
/// The thread waits for stdin in polls of at most a second: agents report a wait when it
/// ends, so one read blocked from one command to the next (minutes, at the lab's pace)
/// would put all of it into the phase the next command opens, a lab artifact every
/// phase would differ by. Woken each second, this thread waits alike in every phase.
pub fn serve_commands(mut handle: impl FnMut(&Command) -> Result<String, String>) {
    // Our own buffer over a copy of fd 0, so that `poll` sees every byte not yet read.
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return;
    };
    let mut input = std::io::BufReader::new(std::fs::File::from(fd));
    loop {
        if input.buffer().is_empty() {
            wait_readable_stdin();
        }
        let mut line = String::new();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        match line.parse::<Command>() {
            Ok(Command::Quit) => {
                say(&ok("quit"));
                return;
            }
            Ok(command) => match handle(&command) {
                Ok(reply) => say(&reply),
                Err(reason) => say(&format!("error {reason}")),
            },
            Err(reason) => say(&format!("error {reason}")),
        }
    }
}

/// Returns once stdin is readable (or closed, or in error), polling a second at a time.
fn wait_readable_stdin() {
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `fd` is a valid pollfd for the duration of the call; nfds is 1.
        let ready = unsafe { libc::poll(&raw mut fd, 1, 1000) };
        if ready != 0 {
            return;
        }
    }
}

/// The refusal for a command this role does not take.
pub fn not_here(role: &str, command: &Command) -> String {
    format!("`{command}` is not a {role} command")
}
