//! The syscall programs' duty cycle: attached for a window of each drain period, at a
//! random offset, and the share of the period they were attached (what their totals are
//! scaled by).

use std::time::{Duration, Instant};

/// The syscall programs' attachment over one drain period: attached from `window.0` to
/// `window.1` (the whole period without a duty cycle), and for how long they were.
#[derive(Debug, Clone, Copy)]
pub(super) struct DutyCycle {
    pub(super) start: Instant,
    /// The window of a duty cycle; `None`: attached all the period.
    window: Option<(Instant, Instant)>,
    pub(super) attached_since: Option<Instant>,
    attached: Duration,
}

impl DutyCycle {
    /// A period starting at `start`, with the programs attached throughout.
    pub(super) fn new(start: Instant) -> Self {
        Self {
            start,
            window: None,
            attached_since: Some(start),
            attached: Duration::ZERO,
        }
    }

    /// Plans a window of 1/`duty` of `interval` at a random offset; `attached`: whether
    /// the programs are attached now.
    pub(super) fn plan(&mut self, interval: Duration, duty: u32, attached: bool) {
        let length = interval / duty;
        let slack = interval.saturating_sub(length);
        let draw = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), self.start);
        let offset = slack.mul_f64((draw % 1024) as f64 / 1024.0);
        let open = self.start + offset;
        self.window = Some((open, open + length));
        self.attached_since = attached.then_some(self.start);
    }

    /// Whether to attach (`Some(true)`) or detach (`Some(false)`) the programs now.
    pub(super) fn due(&mut self, now: Instant) -> Option<bool> {
        let (open, close) = self.window?;
        let inside = now >= open && now < close;
        match (inside, self.attached_since) {
            (true, None) => {
                self.attached_since = Some(now);
                Some(true)
            }
            (false, Some(since)) => {
                self.attached += now.saturating_duration_since(since);
                self.attached_since = None;
                Some(false)
            }
            _ => None,
        }
    }

    /// The period up to `drained_at` over the time the programs were attached in it.
    pub(super) fn scale(&self, drained_at: Instant) -> f64 {
        if self.window.is_none() {
            return 1.0;
        }
        let attached = self.attached
            + self.attached_since.map_or(Duration::ZERO, |since| {
                drained_at.saturating_duration_since(since)
            });
        let period = drained_at.saturating_duration_since(self.start);
        if attached.is_zero() {
            // The window never opened (a short period): nothing was seen to scale.
            return 1.0;
        }
        period.as_secs_f64() / attached.as_secs_f64()
    }
}
