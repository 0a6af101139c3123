//! Failed authentications per client address, over the whole API (gRPC, REST, the dashboard's
//! sign-in): after `max_failures` wrong credentials from one address in a window, every
//! authentication from that address is refused until the window ends, whatever it sends.
//!
//! Why per address. A Bearer password finds its account by the password's hash, so one guess is
//! tried against every account at once; accounts may choose their passwords (8 characters at
//! least), so an unthrottled API let a client spray common passwords at thousands per second.
//! The dashboard's own throttle counts per account, which does not slow a spray across accounts.
//! Why a lock and not a delay: a locked address gets the same refusal for a right and a wrong
//! secret, so a guess cannot be confirmed while locked. An attempt that was already checking when
//! its address got locked (a burst of concurrent guesses) is refused too if it succeeded, so a
//! burst gains no more than `max_failures` answers either.
//! The cost: clients that share an address (behind one proxy or NAT) share the count, and a
//! client sending a wrong secret over and over locks out its neighbours; the operator sets the
//! limit, or 0 to turn it off (docs/ledger.md, "Failed authentications"). A success does not
//! reset the count: an attacker holding one valid account could otherwise interleave it.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use syft_error::{QuotaDetails, Reason};

use crate::error::LedgerError;

/// The window in which failures are counted.
pub const WINDOW: Duration = Duration::from_secs(5 * 60);
/// Addresses tracked at most. When full, expired windows go first, then the oldest unlocked
/// ones; an address that finds only locked windows is let through untracked (a flood from that
/// many addresses has outgrown what a per-address count can stop, and refusing every new
/// address would lock out every client).
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

/// Failed authentications per address; `max_failures` 0 turns the throttle off.
#[derive(Debug)]
pub struct AddressThrottle {
    max_failures: u32,
    windows: Mutex<HashMap<IpAddr, Window>>,
}

impl AddressThrottle {
    pub fn new(max_failures: u32) -> Self {
        Self {
            max_failures,
            windows: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(wait)` while `addr` is locked out: how long until its window ends.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.max_failures == 0 {
            return Ok(());
        }
        let windows = self.lock();
        match windows.get(&group(addr)) {
            Some(w) if w.failures >= self.max_failures && now < w.start + WINDOW => {
                Err(w.start + WINDOW - now)
            }
            _ => Ok(()),
        }
    }

    /// Counts a wrong credential from `addr`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let key = group(addr);
        let mut windows = self.lock();
        let max = self.max_failures;
        let room = windows.contains_key(&key)
            || make_room(
                &mut windows,
                MAX_TRACKED,
                |w| now >= w.start + WINDOW,
                |w| (w.failures < max).then_some(w.start),
            );
        if !room {
            tracing::warn!(address = %key, "failed-authentication table full of locked addresses; not counting this one");
            return;
        }
        let w = windows.entry(key).or_insert(Window {
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
        if w.failures == self.max_failures {
            tracing::warn!(address = %key, "too many failed authentications: address locked out for the rest of the window");
        }
    }
}

/// The refusal of a locked-out address: `RATE_LIMITED` with the wait (`RetryInfo`, and
/// `Retry-After` over HTTP) and the limit it went over.
pub fn locked_out(addr: IpAddr, wait: Duration, limit: u32) -> LedgerError {
    let secs = wait.as_secs().max(1);
    LedgerError::Quota {
        reason: Reason::RateLimited,
        message: format!(
            "too many failed authentications from this address; try again in {secs} s"
        ),
        details: QuotaDetails {
            retry_after: Some(Duration::from_secs(secs)),
            violations: vec![(
                format!("address:{addr}"),
                format!(
                    "{limit} failed authentications per {} minutes",
                    WINDOW.as_secs() / 60
                ),
            )],
        },
    }
}

/// The unit an address is counted by: an IPv4 address (also when mapped into IPv6), or an IPv6
/// /64, the block one host or one customer is usually given, so that an attacker does not get a
/// fresh count for each of its 2^64 addresses.
fn group(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Room for one more key in a table of at most `max` windows (both throttles' tables): the
/// windows `over` says have ended go first, then the oldest that `evictable` allows (it gives a
/// window's start, or `None` for one that must stay, such as a lock), down to half the table so
/// that a flood does not sort the table for every new key. `false` when nothing more may go.
pub(crate) fn make_room<K: Clone + Eq + Hash, W>(
    table: &mut HashMap<K, W>,
    max: usize,
    over: impl Fn(&W) -> bool,
    evictable: impl Fn(&W) -> Option<Instant>,
) -> bool {
    if table.len() < max {
        return true;
    }
    table.retain(|_, w| !over(w));
    if table.len() < max {
        return true;
    }
    let mut free: Vec<(Instant, K)> = table
        .iter()
        .filter_map(|(k, w)| evictable(w).map(|start| (start, k.clone())))
        .collect();
    free.sort_unstable_by_key(|(start, _)| *start);
    let excess = table.len().saturating_sub(max / 2);
    for (_, k) in free.into_iter().take(excess) {
        table.remove(&k);
    }
    table.len() < max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn locks_an_address_after_its_failures_until_the_window_ends() {
        let t = AddressThrottle::new(3);
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for _ in 0..2 {
            t.failed(a, t0);
        }
        assert!(t.check(a, t0).is_ok(), "two failures of three");
        t.failed(a, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(t.check(a, later), Err(WINDOW - Duration::from_secs(60)));
        assert!(t.check(ip("192.0.2.8"), later).is_ok(), "another address");
        assert!(t.check(a, t0 + WINDOW).is_ok(), "the window ended");
        // A new window starts from nothing.
        t.failed(a, t0 + WINDOW);
        assert!(t.check(a, t0 + WINDOW).is_ok());
        // 0 turns the throttle off.
        let off = AddressThrottle::new(0);
        (0..1_000).for_each(|_| off.failed(a, t0));
        assert!(off.check(a, t0).is_ok());
    }

    #[test]
    fn an_ipv6_block_counts_as_one_and_mapped_ipv4_as_its_ipv4() {
        let t = AddressThrottle::new(2);
        let now = Instant::now();
        t.failed(ip("2001:db8:1:2::1"), now);
        t.failed(ip("2001:db8:1:2:ffff::9"), now);
        assert!(t.check(ip("2001:db8:1:2::42"), now).is_err(), "same /64");
        assert!(t.check(ip("2001:db8:1:3::1"), now).is_ok(), "another /64");
        t.failed(ip("::ffff:198.51.100.1"), now);
        t.failed(ip("198.51.100.1"), now);
        assert!(t.check(ip("198.51.100.1"), now).is_err());
    }

    #[test]
    fn a_full_table_keeps_its_locks() {
        let t = AddressThrottle::new(1);
        let now = Instant::now();
        let locked = ip("192.0.2.1");
        t.failed(locked, now);
        // Fill the table: with a limit of one, every address that fails once is locked.
        for i in 0..MAX_TRACKED as u32 {
            t.failed(IpAddr::V4((0x0a00_0000 + i).into()), now);
        }
        assert!(t.check(locked, now).is_err(), "a lock is never evicted");
        // Every window is locked: a new address is let through, not tracked.
        let fresh = ip("203.0.113.5");
        t.failed(fresh, now);
        assert!(t.check(fresh, now).is_ok());
        // Once the windows expire they make room again.
        let later = now + WINDOW;
        t.failed(fresh, later);
        assert!(t.check(fresh, later).is_err());
    }
}
