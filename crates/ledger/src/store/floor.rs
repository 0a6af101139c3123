//! Where the expiry sweep and the answer purge start reading their indexes.
//!
//! Both find "expired by now" rows through an index on an expiry time (`transfers_pending_expiry`,
//! `answers_expires_at`) from its old end. Every hold resolved and every answer purged leaves a
//! dead entry there until VACUUM removes it, and nothing else ever cleans that end of the index
//! (inserts arrive at the new end). So a scan from the very beginning reads every dead entry since
//! the last vacuum, once a second: 11 ms per sweep after 90,000 captures with autovacuum off, and
//! growing with the history (docs/benchmarks.md, "Credits in the capture").
//!
//! A [`ScanFloor`] remembers how far back a scan needs to look. After a pass, nothing older than
//! the oldest row the pass left behind (a hold whose cancellation failed), or than the pass's
//! own `now` minus [`MARGIN`], can still be expired and unprocessed, so the next pass starts there.
//! The margin covers a hold committed after the pass although its expiry is earlier: that takes an
//! authorization that commits more than its whole TTL plus the margin after it read the clock, or a
//! replica's clock that far behind. Even then the hold is only late, never lost: every
//! [`FULL_PASS_EVERY`] (and at start) a pass reads the whole index again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far behind the last pass's `now` the next pass still looks.
pub(crate) const MARGIN: Duration = Duration::from_secs(30);
/// How often a pass reads the whole index anyway.
pub(crate) const FULL_PASS_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
pub(crate) struct ScanFloor(Mutex<Option<(i64, Instant)>>);

impl ScanFloor {
    /// The lowest expiry time (unix micros) the next pass must read from; `i64::MIN` when a full
    /// pass is due.
    pub(crate) fn start(&self) -> i64 {
        self.start_at(Instant::now())
    }

    fn start_at(&self, at: Instant) -> i64 {
        match *self.lock() {
            Some((floor, since)) if at.saturating_duration_since(since) < FULL_PASS_EVERY => floor,
            _ => i64::MIN,
        }
    }

    /// Records a pass that started at `start` (from [`ScanFloor::start`]), read the clock at `now`
    /// and left `oldest_left` (the oldest expiry it saw but did not process, if any).
    pub(crate) fn passed(&self, start: i64, now: i64, oldest_left: Option<i64>) {
        let margin = i64::try_from(MARGIN.as_micros()).unwrap_or(i64::MAX);
        let mut floor = now.saturating_sub(margin);
        if let Some(oldest) = oldest_left {
            floor = floor.min(oldest);
        }
        let mut state = self.lock();
        // A full pass restarts the clock for the next one; a partial pass keeps it.
        let since = match *state {
            Some((_, since)) if start != i64::MIN => since,
            _ => Instant::now(),
        };
        *state = Some((floor, since));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(i64, Instant)>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn the_first_pass_reads_everything_and_the_next_starts_a_margin_back() {
        let floor = ScanFloor::default();
        assert_eq!(floor.start(), i64::MIN);
        floor.passed(i64::MIN, 1_000 * S, None);
        assert_eq!(floor.start(), 1_000 * S - 30 * S);
    }

    #[test]
    fn a_row_left_behind_keeps_the_floor_at_it() {
        let floor = ScanFloor::default();
        floor.passed(i64::MIN, 1_000 * S, Some(5 * S));
        assert_eq!(floor.start(), 5 * S);
        // The next pass finds it processed: the floor moves up to the margin.
        floor.passed(5 * S, 1_001 * S, None);
        assert_eq!(floor.start(), 1_001 * S - 30 * S);
    }

    #[test]
    fn a_full_pass_is_due_again_after_its_interval() {
        let floor = ScanFloor::default();
        floor.passed(i64::MIN, 1_000 * S, None);
        floor.passed(1_000 * S - 30 * S, 1_001 * S, None);
        let later = Instant::now() + FULL_PASS_EVERY;
        assert_eq!(floor.start_at(later), i64::MIN);
        // A partial pass in between does not postpone the full one.
        assert_eq!(floor.start(), 1_001 * S - 30 * S);
    }
}
