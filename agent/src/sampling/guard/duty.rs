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
    /// A period starting at `start` (the drain that began it: what the programs see from
    /// then on is in this period), with the programs attached from then on or not.
    pub(super) fn new(start: Instant, attached: bool) -> Self {
        Self {
            start,
            window: None,
            opened: false,
            attached_since: attached.then_some(start),
            attached: Duration::ZERO,
        }
    }

    /// Plans, at `now`, a window of 1/`duty` of `interval` at a random offset in what is
    /// left of the period (the drain that started it took a while to ingest).
    pub(super) fn plan(&mut self, interval: Duration, duty: u32, now: Instant) {
        let length = interval / duty;
        let slack = interval.saturating_sub(now.saturating_duration_since(self.start) + length);
        let draw = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), self.start);
        let offset = slack.mul_f64((draw % 1024) as f64 / 1024.0);
        let open = now + offset;
        self.window = Some((open, open + length));
    }

    /// The programs were attached (again) at `now`, for the rest of the period.
    pub(super) fn attached_at(&mut self, now: Instant) {
        if self.attached_since.is_none() {
            self.attached_since = Some(now);
        }
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

    /// The period up to `drained_at` and the time the programs were attached in it.
    pub(super) fn span(&self, drained_at: Instant) -> (Duration, Duration) {
        let attached = self.attached
            + self.attached_since.map_or(Duration::ZERO, |since| {
                drained_at.saturating_duration_since(since)
            });
        (drained_at.saturating_duration_since(self.start), attached)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);

    /// A cycle of 1/`duty` planned from attached programs, its window's open and close.
    fn planned(duty: u32) -> (DutyCycle, Instant, Instant) {
        let mut cycle = DutyCycle::new(Instant::now(), true);
        cycle.plan(INTERVAL, duty, cycle.start);
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
        let (period, attached) = cycle.span(cycle.start + INTERVAL);
        let scale = period.as_secs_f64() / attached.as_secs_f64();
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
        let (period, attached) = cycle.span(moved_close + INTERVAL / 2);
        assert!(attached < period);
    }

    #[test]
    fn without_a_window_nothing_moves_and_nothing_scales() {
        let mut cycle = DutyCycle::new(Instant::now(), true);
        assert_eq!(cycle.due(cycle.start + INTERVAL), None);
        let (period, attached) = cycle.span(cycle.start + INTERVAL);
        assert_eq!(period, attached);
    }
}
