//! The control loop every role runs on its main thread: one command per stdin line, one
//! reply line on stdout (`ok VERB unix_ns=T`, `stats {json}`, `error REASON`), until
//! `quit` or the end of stdin.

use std::io::{BufRead as _, Write as _};

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
pub fn serve_commands(mut handle: impl FnMut(&Command) -> Result<String, String>) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
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

/// The refusal for a command this role does not take.
pub fn not_here(role: &str, command: &Command) -> String {
    format!("`{command}` is not a {role} command")
}
