//! A log line that every request may meet (an upstream refusing the router's key, a ledger
//! older than the call) written at most once a minute: each request still gets its error.

use std::sync::atomic::{AtomicU64, Ordering};

/// When its line was last written, in seconds since the epoch.
pub(crate) struct LogThrottle(AtomicU64);

impl LogThrottle {
    pub(crate) const fn new() -> Self {
        LogThrottle(AtomicU64::new(0))
    }

    /// Whether to write the line now: a minute has passed since it was last written (one caller
    /// of several at once wins).
    pub(crate) fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> bool {
        let seen = self.0.load(Ordering::Relaxed);
        now >= seen.saturating_add(60)
            && self
                .0
                .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::LogThrottle;

    /// Written at once, then not again within the minute.
    #[test]
    fn a_line_is_written_once_a_minute() {
        let line = LogThrottle::new();
        let t = 1_800_000_000;
        assert!(line.allow_at(t));
        assert!(!line.allow_at(t));
        assert!(!line.allow_at(t + 59));
        assert!(line.allow_at(t + 60));
    }
}
