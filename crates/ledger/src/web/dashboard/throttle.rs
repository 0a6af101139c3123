//! Failed dashboard sign-ins, counted per account (the email; the admin key counts as one account)
//! in fixed windows: after `MAX_FAILURES` wrong secrets in a window, that account's sign-ins are
//! refused with 429 until the window ends, whatever secret is sent, so a guess cannot be confirmed
//! while locked.
//!
//! Why per account and in memory. Account secrets are 256-bit random values the ledger generates,
//! so guessing one is hopeless anyway; what this guards is an operator-chosen admin key and a
//! flood of wrong guesses. Counting per account (not per client address) works behind a proxy,
//! where every browser has the proxy's address. The cost is that a stranger can keep an account
//! out of the dashboard (never out of the API) for a window; `MAX_FAILURES` per 15 minutes keeps
//! guessing at 40 tries an hour per replica while letting the owner retry a typo nine times.
//! Counts are per ledger process: N replicas allow N times the tries, which is still nothing
//! against a random secret (docs/analytics.md, "Sign-in and sessions").

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong secrets allowed per account and window.
pub(crate) const MAX_FAILURES: u32 = 10;
/// The window's length.
pub(crate) const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Accounts tracked before expired windows are swept (a flood of made-up emails must not grow
/// memory without bound; past this, the oldest windows go first).
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

/// Failed sign-ins per account.
#[derive(Debug, Default)]
pub(crate) struct SignInThrottle {
    windows: Mutex<HashMap<String, Window>>,
}

impl SignInThrottle {
    /// `Err(wait)` when the account is locked out: how long until its window ends.
    pub fn check(&self, account: &str, now: Instant) -> Result<(), Duration> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        match windows.get(&key(account)) {
            Some(w) if w.failures >= MAX_FAILURES && now < w.start + WINDOW => {
                Err(w.start + WINDOW - now)
            }
            _ => Ok(()),
        }
    }

    /// Counts one wrong secret for the account.
    pub fn failed(&self, account: &str, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, w| now < w.start + WINDOW);
        }
        if windows.len() >= MAX_TRACKED {
            // Still full of live windows: drop the oldest half rather than refuse to count.
            let mut starts: Vec<Instant> = windows.values().map(|w| w.start).collect();
            starts.sort_unstable();
            let cut = starts[starts.len() / 2];
            windows.retain(|_, w| w.start > cut);
        }
        let w = windows.entry(key(account)).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now >= w.start + WINDOW {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }

    /// A successful sign-in clears the account's count.
    pub fn succeeded(&self, account: &str) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.remove(&key(account));
    }
}

/// Emails compare case-insensitively, as the ledger's accounts do.
fn key(account: &str) -> String {
    account.trim().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_until_the_window_ends() {
        let t = SignInThrottle::default();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(t.check("a@x.io", t0).is_ok());
            t.failed("a@x.io", t0);
        }
        let wait = t
            .check("A@X.io ", t0 + Duration::from_secs(60))
            .unwrap_err();
        assert_eq!(wait, WINDOW - Duration::from_secs(60));
        assert!(
            t.check("b@x.io", t0).is_ok(),
            "other accounts are not locked"
        );
        assert!(t.check("a@x.io", t0 + WINDOW).is_ok(), "the window ended");
        t.failed("a@x.io", t0 + WINDOW);
        assert!(
            t.check("a@x.io", t0 + WINDOW).is_ok(),
            "a new window counts from one"
        );
    }

    #[test]
    fn success_clears_and_memory_stays_bounded() {
        let t = SignInThrottle::default();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES - 1 {
            t.failed("a@x.io", t0);
        }
        t.succeeded("a@x.io");
        t.failed("a@x.io", t0);
        assert!(t.check("a@x.io", t0).is_ok());
        for i in 0..3 * MAX_TRACKED {
            t.failed(&format!("u{i}@x.io"), t0 + Duration::from_millis(i as u64));
        }
        let n = t.windows.lock().unwrap_or_else(|e| e.into_inner()).len();
        assert!(n <= MAX_TRACKED, "{n}");
    }
}
