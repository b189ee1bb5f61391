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
    /// Whether the window has opened (the programs were attached in it).
    opened: bool,
    pub(super) attached_since: Option<Instant>,
    attached: Duration,
}

impl DutyCycle {
    /// A period starting at `start`, with the programs attached throughout.
    pub(super) fn new(start: Instant) -> Self {
        Self {
            start,
            window: None,
            opened: false,
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

    /// Whether to attach (`Some(true)`) or detach (`Some(false)`) the programs now: they
    /// are detached before the window, attached when it opens (when the loop first looks
    /// after that: a late look moves the window, which keeps its length, so a window
    /// shorter than the loop's turn is not skipped) and detached when it closes.
    pub(super) fn due(&mut self, now: Instant) -> Option<bool> {
        let (open, close) = self.window?;
        match self.attached_since {
            Some(since) if (!self.opened && now < open) || (self.opened && now >= close) => {
                self.attached += now.saturating_duration_since(since);
                self.attached_since = None;
                Some(false)
            }
            None if !self.opened && now >= open => {
                self.opened = true;
                self.window = Some((now, now + close.saturating_duration_since(open)));
                self.attached_since = Some(now);
                Some(true)
            }
            Some(_) if !self.opened && now >= open => {
                // Attached already when the window opened.
                self.opened = true;
                None
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

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);

    /// A cycle of 1/`duty` planned from attached programs, its window's open and close.
    fn planned(duty: u32) -> (DutyCycle, Instant, Instant) {
        let mut cycle = DutyCycle::new(Instant::now());
        cycle.plan(INTERVAL, duty, true);
        let (open, close) = cycle.window.expect("a window");
        (cycle, open, close)
    }

    #[test]
    fn the_programs_run_only_in_the_window_and_the_scale_is_their_share() {
        let (mut cycle, open, close) = planned(4);
        assert_eq!(close - open, INTERVAL / 4);
        assert!(close <= cycle.start + INTERVAL);
        if open > cycle.start {
            assert_eq!(
                cycle.due(cycle.start),
                Some(false),
                "detached before the window"
            );
            assert_eq!(cycle.due(open), Some(true));
        } else {
            assert_eq!(cycle.due(open), None, "attached when it opens");
        }
        assert_eq!(cycle.due(close), Some(false));
        assert_eq!(cycle.due(close + INTERVAL / 8), None);
        let scale = cycle.scale(cycle.start + INTERVAL);
        assert!((scale - 4.0).abs() < 0.01, "scale {scale}");
    }

    #[test]
    fn a_late_look_still_opens_a_window_of_full_length() {
        let (mut cycle, open, _) = planned(16);
        let _ = cycle.due(cycle.start);
        // The loop turns every 100 ms: it first looks after the 62.5 ms window closed.
        let late = open + Duration::from_millis(100);
        if cycle.attached_since.is_none() {
            assert_eq!(cycle.due(late), Some(true));
        }
        let (moved_open, moved_close) = cycle.window.expect("a window");
        assert!(moved_open >= open);
        assert_eq!(moved_close - moved_open, INTERVAL / 16);
        assert_eq!(cycle.due(moved_close), Some(false));
        assert!(cycle.scale(moved_close + INTERVAL / 2) > 1.0);
    }

    #[test]
    fn without_a_window_nothing_moves_and_nothing_scales() {
        let mut cycle = DutyCycle::new(Instant::now());
        assert_eq!(cycle.due(cycle.start + INTERVAL), None);
        assert!((cycle.scale(cycle.start + INTERVAL) - 1.0).abs() < f64::EPSILON);
    }
}
