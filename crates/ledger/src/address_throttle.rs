//! Failed authentications per client address, over the whole API (gRPC, REST, the dashboard's
//! sign-in): after `max_failures` wrong credentials from one address in a window, every
//! authentication from that address is refused until the window ends, whatever it sends.
//!
//! Why per address. A Bearer password finds its account by the password's hash, so one guess is
//! tried against every account at once; accounts may choose their passwords (8 characters at
//! least), so an unthrottled API let a client spray common passwords at thousands per second.
//! The dashboard's own throttle counts per account, which does not slow a spray across accounts.
//! Why a lock and not a delay: a locked address gets the same refusal for a right and a wrong
//! secret, so a guess cannot be confirmed while locked. An attempt that was already being
//! checked when its address got locked (a burst of concurrent guesses) is refused too, whatever
//! its outcome, so a burst gets no more telling answers than the limit either.
//! The cost: clients that share an address (behind one proxy or NAT) share the count, and a
//! client sending a wrong secret over and over locks out its neighbours; the operator sets the
//! limit, or 0 to turn it off (docs/ledger.md, "Failed authentications"). A success does not
//! reset the count: an attacker holding one valid account could otherwise interleave it.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use syft_error::{QuotaDetails, Reason};

use crate::error::LedgerError;

/// The window in which failures are counted.
pub const WINDOW: Duration = Duration::from_secs(5 * 60);
/// Windows tracked at most. When full, ended windows go first, then the oldest unlocked ones;
/// a failure that finds only locks is not counted (a flood from that many blocks has outgrown
/// what a per-address count can stop, and refusing every new address would lock out every
/// client). Once a scan frees less than a tenth of the table, it is not scanned again (and new
/// keys are not counted) until its first window ends.
const MAX_TRACKED: usize = 100_000;
/// An IPv6 /48 (one site's allocation: 65,536 /64s) may fail this many times the limit of one
/// /64 before all of it is locked.
const SITE_FACTOR: u32 = 10;

/// What failures are counted by: an IPv4 address (also when mapped into IPv6), an IPv6 /64 (one
/// host or one LAN), and the /48 around it (one site), so that an attacker does not get a fresh
/// count for each of its 2^64 addresses, nor one for each of a site's 65,536 /64s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(Ipv4Addr),
    /// The first 64 bits.
    V6Net(u64),
    /// The first 48 bits.
    V6Site(u64),
}

impl Key {
    /// The keys `addr` is counted under: its own, and its site's for IPv6.
    fn of(addr: IpAddr) -> (Key, Option<Key>) {
        let v6 = match addr {
            IpAddr::V4(v4) => return (Key::V4(v4), None),
            IpAddr::V6(v6) => v6,
        };
        if let Some(v4) = v6.to_ipv4_mapped() {
            return (Key::V4(v4), None);
        }
        let net = (u128::from(v6) >> 64) as u64;
        (Key::V6Net(net), Some(Key::V6Site(net >> 16)))
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
    /// The failures that lock this window.
    limit: u32,
}

impl Window {
    fn ended(&self, now: Instant) -> bool {
        now >= self.start + WINDOW
    }

    fn locked(&self, now: Instant) -> bool {
        self.failures >= self.limit && !self.ended(now)
    }
}

#[derive(Debug, Default)]
struct Table {
    windows: HashMap<Key, Window>,
    /// Full of locks until then: new keys are not counted, without a scan.
    full_until: Option<Instant>,
}

/// Failed authentications per address (or, with [`AddressThrottle::counting`], other events an
/// address may cause only so often); `max_failures` 0 turns the throttle off.
#[derive(Debug)]
pub struct AddressThrottle {
    max_failures: u32,
    /// What is counted, for the logs.
    what: &'static str,
    table: Mutex<Table>,
}

impl AddressThrottle {
    pub fn new(max_failures: u32) -> Self {
        Self::counting(max_failures, "failed authentications")
    }

    /// A throttle of `what` (logged as "too many {what}"): `max` per address per window.
    pub fn counting(max: u32, what: &'static str) -> Self {
        Self {
            max_failures: max,
            what,
            table: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(wait)` while `addr` (or its IPv6 site) is locked out: how long until that ends.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.max_failures == 0 {
            return Ok(());
        }
        locked(&self.lock(), addr, now)
    }

    /// [`check`](Self::check) and, if `addr` is not locked out, count one event of it, under one
    /// lock: concurrent attempts cannot all pass the check before any is counted (open
    /// registration's per-address limit is exact).
    pub fn take(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.max_failures == 0 {
            return Ok(());
        }
        let mut table = self.lock();
        locked(&table, addr, now)?;
        self.count_in(&mut table, addr, now);
        Ok(())
    }

    /// Counts a wrong credential (or a chosen password set, which can test one) from `addr`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let mut table = self.lock();
        self.count_in(&mut table, addr, now);
    }

    fn count_in(&self, table: &mut Table, addr: IpAddr, now: Instant) {
        let (key, site) = Key::of(addr);
        count(table, key, self.max_failures, now, self.what);
        if let Some(site) = site {
            let limit = self.max_failures.saturating_mul(SITE_FACTOR);
            count(table, site, limit, now, self.what);
        }
    }
}

/// `Err(wait)` while `addr` (or its IPv6 site) is locked in `table`.
fn locked(table: &Table, addr: IpAddr, now: Instant) -> Result<(), Duration> {
    let (key, site) = Key::of(addr);
    let wait = [Some(key), site]
        .into_iter()
        .flatten()
        .filter_map(|k| table.windows.get(&k))
        .filter(|w| w.locked(now))
        .map(|w| w.start + WINDOW - now)
        .max();
    wait.map_or(Ok(()), Err)
}

/// One failure of `key`, whose window locks at `limit`.
fn count(table: &mut Table, key: Key, limit: u32, now: Instant, what: &'static str) {
    if !table.windows.contains_key(&key) && !room(table, now, what) {
        // Logged once per full table (in `room`), not per failure: this is an attack's rate.
        tracing::debug!(?key, what, "address table full; not counting this one");
        return;
    }
    let fresh = Window {
        start: now,
        failures: 0,
        limit,
    };
    let w = table.windows.entry(key).or_insert(fresh);
    if w.ended(now) {
        *w = fresh;
    }
    w.failures = w.failures.saturating_add(1);
    if w.failures == limit {
        tracing::warn!(
            ?key,
            "too many {what}: locked out for the rest of the window"
        );
    }
}

/// Room for one more window in `table`; remembers a table full of locks until the first ends.
fn room(table: &mut Table, now: Instant, what: &'static str) -> bool {
    if table.full_until.is_some_and(|until| now < until) {
        return false;
    }
    table.full_until = None;
    if table.windows.len() < MAX_TRACKED {
        return true;
    }
    let room = make_room(
        &mut table.windows,
        MAX_TRACKED,
        |w| w.ended(now),
        |_, w| (!w.locked(now)).then_some(w.start),
    );
    // A scan that freed less than a tenth of the table (it is nearly all locks) is not repeated
    // for each new key until something can end: each would scan 100,000 windows under the
    // mutex every authentication takes, and evict the window the last one made.
    if table.windows.len() >= MAX_TRACKED - MAX_TRACKED / 10 {
        table.full_until = table.windows.values().map(|w| w.start + WINDOW).min();
        tracing::warn!(
            windows = table.windows.len(),
            what,
            "address table nearly full of locks: new addresses are not counted \
             until its first window ends"
        );
    }
    room
}

/// The refusal of a locked-out address: `AUTH_LOCKED` with the wait rounded up to whole seconds
/// (`RetryInfo`, and `Retry-After` over HTTP: a client that waits as told is let in) and the
/// limit it went over.
pub fn locked_out(addr: IpAddr, wait: Duration, limit: u32) -> LedgerError {
    let secs = syft_error::retry_after_secs(wait);
    LedgerError::Quota {
        reason: Reason::AuthLocked,
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

/// The refusal of an address that created [`LedgerConfig::accounts_per_address`] accounts in the
/// window: `RATE_LIMITED` with the wait, like [`locked_out`].
///
/// [`LedgerConfig::accounts_per_address`]: crate::LedgerConfig::accounts_per_address
pub fn too_many_accounts(addr: IpAddr, wait: Duration, limit: u32) -> LedgerError {
    let secs = syft_error::retry_after_secs(wait);
    LedgerError::Quota {
        reason: Reason::RateLimited,
        message: format!("too many accounts created from this address; try again in {secs} s"),
        details: QuotaDetails {
            retry_after: Some(Duration::from_secs(secs)),
            violations: vec![(
                format!("address:{addr}"),
                format!("{limit} new accounts per {} minutes", WINDOW.as_secs() / 60),
            )],
        },
    }
}

/// Room for one more key in a table of at most `max` windows (both throttles' tables): the
/// windows `over` says have ended go first, then the least that `evictable` allows (it gives a
/// window's rank, e.g. its start, or `None` for one that must stay, such as a lock), down to half
/// the table so that a flood does not sort the table for every new key. `false` when nothing more
/// may go.
pub(crate) fn make_room<K: Clone + Eq + Hash, W, R: Ord>(
    table: &mut HashMap<K, W>,
    max: usize,
    over: impl Fn(&W) -> bool,
    evictable: impl Fn(&K, &W) -> Option<R>,
) -> bool {
    if table.len() < max {
        return true;
    }
    table.retain(|_, w| !over(w));
    if table.len() < max {
        return true;
    }
    let mut free: Vec<(R, K)> = table
        .iter()
        .filter_map(|(k, w)| evictable(k, w).map(|rank| (rank, k.clone())))
        .collect();
    free.sort_unstable_by(|a, b| a.0.cmp(&b.0));
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

    /// Eight threads take 100 events each from one address limited to 50: exactly 50 pass
    /// (checked and counted apart, two threads could both pass at 49).
    #[test]
    fn take_is_exact_under_concurrency() {
        let t = std::sync::Arc::new(AddressThrottle::counting(50, "test events"));
        let now = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let t = std::sync::Arc::clone(&t);
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| t.take(ip("192.0.2.9"), now).is_ok())
                        .count()
                })
            })
            .collect();
        let passed: usize = threads.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        assert_eq!(passed, 50);
        assert!(t.check(ip("192.0.2.9"), now).is_err());
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
        // One failure from each of 20 /64s of one /48 (2 × SITE_FACTOR) locks the whole site.
        for net in 0..2 * SITE_FACTOR {
            let addr = ip(&format!("2001:db8:7:{net:x}::1"));
            assert!(t.check(addr, now).is_ok(), "/64 number {net}");
            t.failed(addr, now);
        }
        assert!(t.check(ip("2001:db8:7:ffff::1"), now).is_err(), "same /48");
        assert!(t.check(ip("2001:db8:8::1"), now).is_ok(), "another /48");
    }

    #[test]
    fn the_wait_is_rounded_up() {
        let wait = Duration::from_millis(299_500);
        let e = locked_out(ip("192.0.2.1"), wait, 20);
        let LedgerError::Quota { details, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(details.retry_after, Some(Duration::from_secs(300)));
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
