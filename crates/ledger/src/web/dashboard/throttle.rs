//! Failed dashboard sign-ins, counted per account (the email; the admin key counts as one account)
//! in fixed windows: after `MAX_FAILURES` wrong secrets in a window, that account's sign-ins are
//! refused with 429 until the window ends, whatever secret is sent, so a guess cannot be confirmed
//! while locked.
//!
//! Why per account and in memory. What this guards is a chosen secret (the operator's admin
//! key, or an account's own password: generated secrets are 256-bit random, but accounts may
//! choose one of 8 characters or more) and a flood of wrong guesses. Counting per account (not per client address) works behind a proxy,
//! where every browser has the proxy's address. The cost is that a stranger can keep an account
//! out of the dashboard (never out of the API) for a window; `MAX_FAILURES` per 15 minutes keeps
//! guessing at 40 tries an hour per replica while letting the owner retry a typo nine times.
//! Counts are per ledger process: N replicas allow N times the tries (docs/analytics.md,
//! "Sign-in and sessions").

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::address_throttle::make_room;

/// Wrong secrets allowed per account and window.
pub(crate) const MAX_FAILURES: u32 = 10;
/// The window's length.
pub(crate) const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Accounts tracked at most (a flood of made-up emails must not grow memory without bound).
/// When full, expired windows go first, then those with the fewest failures (the oldest of
/// them first) that are not locked; a locked window, and the admin key's, is never dropped to
/// make room (a flood of made-up emails used to push the admin's lock out, and then its count of
/// nine: oldest first, ten thousand one-guess emails bought nine more admin-key guesses, and
/// fewest first, five thousand nine-guess ones), and while every tracked window is locked,
/// accounts not tracked are refused too.
const MAX_TRACKED: usize = 10_000;
/// How long a sign-in waits when the account's other attempts in flight fill its window.
const BUSY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
    /// Attempts checked and not yet decided: they count against the window, so a thousand
    /// concurrent guesses are not all let through before the first failure is counted.
    pending: u32,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            failures: 0,
            pending: 0,
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.failures >= MAX_FAILURES && now < self.start + WINDOW
    }
}

/// Failed sign-ins per account.
#[derive(Debug, Default)]
pub(crate) struct SignInThrottle {
    windows: Mutex<HashMap<String, Window>>,
}

/// A sign-in attempt let through [`SignInThrottle::check`]: say how it ended. Dropped undecided
/// (an error that is not a wrong secret), it gives its place back.
pub(crate) struct Attempt<'a> {
    throttle: &'a SignInThrottle,
    key: String,
    decided: bool,
}

impl Attempt<'_> {
    /// A wrong secret: counted against the account's window.
    pub fn failed(mut self, now: Instant) {
        self.decided = true;
        self.throttle.settle(&self.key, Some(now));
    }

    /// A successful sign-in clears the account's count.
    pub fn succeeded(mut self) {
        self.decided = true;
        let mut windows = self.throttle.lock();
        windows.remove(&self.key);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.decided {
            self.throttle.settle(&self.key, None);
        }
    }
}

impl SignInThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Window>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An attempt for the account, or `Err(wait)` while it is locked out (how long until its
    /// window ends) or its window is full of attempts still in flight.
    pub fn check(&self, account: &str, now: Instant) -> Result<Attempt<'_>, Duration> {
        let key = key(account);
        let mut windows = self.lock();
        // Windows with attempts in flight stay; so do locks (they are what the table is for).
        let room = windows.contains_key(&key)
            || make_room(
                &mut windows,
                MAX_TRACKED,
                |w| w.pending == 0 && now >= w.start + WINDOW,
                |k, w| {
                    let keep = w.locked(now) || w.pending > 0 || k.is_empty();
                    (!keep).then_some((w.failures, w.start))
                },
            );
        if !room {
            return Err(WINDOW);
        }
        let w = windows.entry(key.clone()).or_insert(Window::new(now));
        if now >= w.start + WINDOW {
            *w = Window {
                pending: w.pending,
                ..Window::new(now)
            };
        }
        if w.locked(now) {
            return Err(w.start + WINDOW - now);
        }
        if w.failures.saturating_add(w.pending) >= MAX_FAILURES {
            return Err(BUSY);
        }
        w.pending += 1;
        Ok(Attempt {
            throttle: self,
            key,
            decided: false,
        })
    }

    /// Ends an attempt in flight: a failure (`Some(now)`) or nothing to count (`None`).
    fn settle(&self, key: &str, failed_at: Option<Instant>) {
        let mut windows = self.lock();
        let Some(w) = windows.get_mut(key) else {
            return;
        };
        w.pending = w.pending.saturating_sub(1);
        if let Some(now) = failed_at {
            if now >= w.start + WINDOW {
                *w = Window {
                    pending: w.pending,
                    ..Window::new(now)
                };
            }
            w.failures = w.failures.saturating_add(1);
        }
    }
}

/// Emails compare case-insensitively, as the ledger's accounts do.
fn key(account: &str) -> String {
    account.trim().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` wrong secrets for `account` at `now`.
    fn fail(t: &SignInThrottle, account: &str, now: Instant, n: u32) {
        for _ in 0..n {
            t.check(account, now).expect("not locked yet").failed(now);
        }
    }

    #[test]
    fn locks_after_max_failures_until_the_window_ends() {
        let t = SignInThrottle::default();
        let t0 = Instant::now();
        fail(&t, "a@x.io", t0, MAX_FAILURES);
        let wait = t
            .check("A@X.io ", t0 + Duration::from_secs(60))
            .err()
            .expect("locked");
        assert_eq!(wait, WINDOW - Duration::from_secs(60));
        assert!(
            t.check("b@x.io", t0).is_ok(),
            "other accounts are not locked"
        );
        t.check("a@x.io", t0 + WINDOW)
            .expect("the window ended")
            .failed(t0 + WINDOW);
        assert!(
            t.check("a@x.io", t0 + WINDOW).is_ok(),
            "a new window counts from one"
        );
    }

    #[test]
    fn attempts_in_flight_count_and_undecided_ones_give_their_place_back() {
        let t = SignInThrottle::default();
        let t0 = Instant::now();
        let racing: Vec<_> = (0..MAX_FAILURES)
            .map(|_| t.check("a@x.io", t0).expect("room"))
            .collect();
        assert!(t.check("a@x.io", t0).is_err(), "all places are in flight");
        drop(racing);
        let attempt = t.check("a@x.io", t0).expect("the places came back");
        attempt.succeeded();
    }

    #[test]
    fn success_clears_and_memory_stays_bounded_without_dropping_locks() {
        let t = SignInThrottle::default();
        let t0 = Instant::now();
        fail(&t, "a@x.io", t0, MAX_FAILURES - 1);
        t.check("a@x.io", t0).expect("room").succeeded();
        fail(&t, "a@x.io", t0, 1);
        assert!(t.check("a@x.io", t0).is_ok());
        fail(&t, "", t0, MAX_FAILURES);
        for i in 0..3 * MAX_TRACKED {
            let at = t0 + Duration::from_millis(1 + i as u64);
            if let Ok(a) = t.check(&format!("u{i}@x.io"), at) {
                a.failed(at);
            }
        }
        let n = t.lock().len();
        assert!(n <= MAX_TRACKED, "{n}");
        assert!(
            t.check("", t0 + Duration::from_secs(60)).is_err(),
            "the admin's lock outlives a flood of made-up emails"
        );
    }

    /// A flood of made-up emails with one wrong guess each, or nine, does not push out the
    /// admin's window one short of its lock (a web reviewer's finding: oldest first, it did, and
    /// the admin key got nine more guesses per flood; the diff review's: fewest failures first,
    /// nine-guess emails still did); an account's window with more failures than the flood's
    /// outlives it too.
    #[test]
    fn a_flood_of_guesses_does_not_reset_an_almost_locked_window() {
        for per_email in [1, MAX_FAILURES - 1] {
            let t = SignInThrottle::default();
            let t0 = Instant::now();
            fail(&t, "", t0, MAX_FAILURES - 1);
            fail(&t, "a@x.io", t0, MAX_FAILURES - 1);
            for i in 0..3 * MAX_TRACKED {
                let at = t0 + Duration::from_millis(1 + i as u64);
                for _ in 0..per_email {
                    if let Ok(a) = t.check(&format!("u{i}@x.io"), at) {
                        a.failed(at);
                    }
                }
            }
            let at = t0 + Duration::from_secs(60);
            t.check("", at).expect("its last guess").failed(at);
            assert!(
                t.check("", at).is_err(),
                "{per_email}: the admin's tenth guess"
            );
            if per_email == 1 {
                t.check("a@x.io", at).expect("its last").failed(at);
                assert!(t.check("a@x.io", at).is_err(), "the account's tenth guess");
            }
        }
    }

    #[test]
    fn a_table_full_of_locks_refuses_accounts_it_does_not_track() {
        let t = SignInThrottle::default();
        let t0 = Instant::now();
        {
            let mut windows = t.lock();
            for i in 0..MAX_TRACKED {
                let locked = Window {
                    failures: MAX_FAILURES,
                    ..Window::new(t0)
                };
                windows.insert(format!("u{i}@x.io"), locked);
            }
        }
        assert!(t.check("new@x.io", t0).is_err());
        assert!(t.check("new@x.io", t0 + WINDOW).is_ok(), "once they expire");
    }
}
