//! Rate limits and concurrency limits: the [`Limiter`] trait (a store of sliding windows shared by
//! the router's replicas) and its backends, chosen by config (docs/limits.md).
//!
//! Every limit is one sliding window of weighted entries: an entry (a request's lease id, its
//! cost, its time) counts for `window` after it was added, and a window admits a new entry only if
//! the entries still in it plus the new cost fit under `limit`. Request rates are windows of cost
//! 1, token rates windows of the reserved tokens (settled to the actual count later), concurrency a
//! window as long as the lease whose entry is removed when the request ends. One `acquire` checks
//! all of a request's windows and records it in all of them or in none, atomically, so replicas
//! sharing the store admit exactly `limit`.

use std::time::Duration;

use futures::future::BoxFuture;
use thiserror::Error;

mod gate;
mod headers;
mod memory;
mod redis;
mod redis_conn;
mod refusal;
mod renew;
mod settle;

pub use gate::{Gate, Pass, ROUTER_SCOPE};
pub use headers::{format_reset, RateHeaders};
pub use memory::MemoryLimiter;
pub use redis::RedisLimiter;

/// What a window counts (decides the refusal reason and the response headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleKind {
    Requests,
    Tokens,
    /// Requests of one user in flight.
    Concurrency,
    /// Requests of all users in flight on the router.
    RouterConcurrency,
}

/// One window a request must fit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The store key: who (user, scope) and what (kind, window).
    pub key: String,
    pub kind: RuleKind,
    /// `router` (every service of the router) or the service's type.
    pub scope: &'static str,
    pub limit: u64,
    pub window: Duration,
    /// What this request adds (1 request, the reserved tokens, one slot).
    pub cost: u64,
    /// Human description for refusals (`"10 requests per minute"`).
    pub describe: String,
}

impl Rule {
    /// Whether this limit counts requests in flight (a slot is held while a request runs).
    pub const fn is_concurrency(&self) -> bool {
        matches!(
            self.kind,
            RuleKind::Concurrency | RuleKind::RouterConcurrency
        )
    }

    /// The window's length as the API shows it: none for a concurrency limit, whose stored
    /// window is only the slots' crash lease.
    pub fn window_shown(&self) -> Duration {
        if self.is_concurrency() {
            Duration::ZERO
        } else {
            self.window
        }
    }

    /// When `state` resets, as the API shows it: a concurrency slot frees when its request
    /// ends, not at its crash lease (which read as a quarter of an hour's wait).
    pub fn reset_shown(&self, state: &WindowState) -> Duration {
        if self.is_concurrency() {
            Duration::ZERO
        } else {
            state.reset
        }
    }
}

/// A window after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowState {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window is empty again (every entry in it has aged out).
    pub reset: Duration,
}

/// The outcome of [`Limiter::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Recorded in every window; states in rule order.
    Admitted(Vec<WindowState>),
    /// Recorded nowhere. `rule` is the index of the window that refuses longest; `retry_after`
    /// is when enough of it ages out (`None`: the cost can never fit, or a slot frees when
    /// another request ends).
    Refused {
        rule: usize,
        retry_after: Option<Duration>,
        /// The refusing window is a token window that would admit the request once the requests
        /// still running in it are settled: they reserved the most they may use and are settled
        /// to their real count when they end, so the wait is for one to end, not for `retry_after`
        /// (which may be the whole window).
        awaits_running: bool,
        states: Vec<WindowState>,
    },
}

impl Rule {
    /// Whether this window's entries are reservations settled when their request ends (a token
    /// window) rather than exact from the start (requests) or slots (concurrency).
    pub const fn reserves(&self) -> bool {
        matches!(self.kind, RuleKind::Tokens)
    }
}

/// How long after its admission a token reservation not settled yet counts as running (the
/// limiter's lease by default, `limiter.lease_seconds`): a replica that died mid-request never
/// settles its reservations, and they were told "retry when one ends" for the whole window; a
/// request running longer is told as settled at its reservation (the window's wait).
pub const DEFAULT_RUNNING_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a refusal by `rule` makes a client wait, to pick the longest of several: a window the
/// cost never fits beats any time, and a wait for a request to end (a slot, or a reservation still
/// running) only counts when nothing else refuses.
pub(crate) fn refusal_rank(rule: &Rule, retry: Option<Duration>, awaits_running: bool) -> u128 {
    match (rule.is_concurrency() || awaits_running, retry) {
        (true, _) => 0,
        (false, None) => u128::MAX,
        (false, Some(after)) => after.as_millis().saturating_add(1),
    }
}

/// The shared store could not answer (down, timed out, bad reply).
#[derive(Debug, Clone, Error)]
#[error("rate limiter store unavailable: {message}")]
pub struct LimiterError {
    pub message: String,
    /// Whether the call may have reached the store and been applied (it was not answered in
    /// time, or its connection broke), rather than surely not (no connection to send it on).
    pub maybe_applied: bool,
}

impl LimiterError {
    /// A failure after which the call may have been applied.
    pub fn unknown(message: impl Into<String>) -> Self {
        LimiterError {
            message: message.into(),
            maybe_applied: true,
        }
    }

    /// A failure that applied nothing.
    pub fn not_applied(message: impl Into<String>) -> Self {
        LimiterError {
            message: message.into(),
            maybe_applied: false,
        }
    }
}

/// A request's concurrency windows: each one's key and length.
pub type Slots<'a> = &'a [(String, Duration)];

/// What a [`Limiter`] answers: boxed so the trait stays object-safe (`Arc<dyn Limiter>`).
pub type Reply<'a, T> = BoxFuture<'a, Result<T, LimiterError>>;

/// A store of sliding windows. Times are milliseconds on the caller's clock (the routers' clocks;
/// a skew between replicas shifts a window's edge by that skew, it never admits more).
pub trait Limiter: Send + Sync {
    /// `memory` or `redis` (metrics and logs).
    fn backend(&self) -> &'static str;

    /// Checks `rules` and, if every one fits, records `lease` with each rule's cost in all of
    /// them, atomically.
    fn acquire<'a>(&'a self, now_ms: u64, lease: &'a str, rules: &'a [Rule]) -> Reply<'a, Verdict>;

    /// Changes the cost of `lease` in each `(key, cost)` window; cost 0 removes it (a finished
    /// request's slot, a refund). A lease that aged out already is left alone.
    fn settle<'a>(&'a self, lease: &'a str, updates: &'a [(String, u64)]) -> Reply<'a, ()>;

    /// Takes `lease` out of each `(key, 0)` window, for a check whose answer was lost. That check
    /// may still be on its way (on Redis, queued on a connection since replaced), so a store
    /// whose calls can overtake each other also keeps it from recording when it arrives. The
    /// router never acquires a lease again, least of all one it took back.
    fn take_back<'a>(&'a self, lease: &'a str, updates: &'a [(String, u64)]) -> Reply<'a, ()> {
        // One process, one lock: a check always lands before its take-back.
        self.settle(lease, updates)
    }

    /// The windows' states without recording anything.
    fn peek<'a>(&'a self, now_ms: u64, rules: &'a [Rule]) -> Reply<'a, Vec<WindowState>>;

    /// Moves `lease`'s entry in each of `slots` to `now_ms` (by a request still in flight:
    /// `renew.rs`); a lease no longer there is left alone.
    fn renew<'a>(&'a self, now_ms: u64, lease: &'a str, slots: Slots<'a>) -> Reply<'a, ()>;

    /// Whether the store answers (the router's readiness); an in-process one always does.
    fn ping(&self) -> Reply<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

impl RuleKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            RuleKind::Requests => "requests",
            RuleKind::Tokens => "tokens",
            RuleKind::Concurrency => "concurrent",
            RuleKind::RouterConcurrency => "router_concurrent",
        }
    }
}

/// `GET /v1/limits` and `syft-router limits`: what is left of each window.
pub fn remaining_json(user: &str, windows: &[(Rule, WindowState)]) -> serde_json::Value {
    let limits: Vec<_> = windows
        .iter()
        .map(|(r, s)| {
            serde_json::json!({
                "kind": r.kind.as_str(),
                "scope": r.scope,
                "limit": s.limit,
                "remaining": s.remaining,
                "window_seconds": r.window_shown().as_secs(),
                "reset": format_reset(r.reset_shown(s)),
                "reset_ms": u64::try_from(r.reset_shown(s).as_millis()).unwrap_or(u64::MAX),
                "description": r.describe,
            })
        })
        .collect();
    serde_json::json!({"user": user, "limits": limits})
}

/// A spend budget's entry of `GetLimits` as `GET /v1/limits` and `syft-router limits --json`
/// show it (money in micros); `None` for an entry without its limit.
pub fn budget_left_json(b: &syft_proto::router::LimitLeft) -> Option<serde_json::Value> {
    let l = b.limit.as_ref()?;
    Some(serde_json::json!({
        "kind": l.kind,
        "limit_micros": l.limit,
        "remaining_micros": b.remaining,
        "reset_ms": b.reset_ms,
        "description": l.description,
    }))
}

/// The clock of the in-process windows: milliseconds since the Unix epoch as read at the first
/// call, advanced by the monotonic clock since. A step of the wall clock (NTP correcting a wrong
/// clock) does not move it: stepped back 10 minutes, a "3 per minute" user was held for 11
/// (a time tester, 2026-12-06); stepped forward, every window emptied at once. Redis windows use
/// Redis' clock (`redis.rs`).
pub fn window_now_ms() -> u64 {
    static ANCHOR: std::sync::LazyLock<(u64, std::time::Instant)> =
        std::sync::LazyLock::new(|| (now_ms(), std::time::Instant::now()));
    let (at, since) = *ANCHOR;
    at.saturating_add(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How long until `total - freed` plus `cost` fits under `limit`, walking entries oldest first
/// (`(added_ms, cost)`); `None` if it never can.
pub(crate) fn retry_after(
    entries: impl Iterator<Item = (u64, u64)>,
    total: u64,
    cost: u64,
    limit: u64,
    window_ms: u64,
    now_ms: u64,
) -> Option<Duration> {
    if cost > limit {
        return None;
    }
    let mut left = total;
    for (at, c) in entries {
        left = left.saturating_sub(c);
        if left.saturating_add(cost) <= limit {
            return Some(Duration::from_millis(
                at.saturating_add(window_ms).saturating_sub(now_ms).max(1),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_waits_for_enough_to_age_out() {
        let entries = [(1_000u64, 4u64), (2_000, 4), (3_000, 2)];
        // 10 used of 10: a cost of 3 needs the first entry (4) gone, at 1000 + 60000.
        let r = retry_after(entries.into_iter(), 10, 3, 10, 60_000, 5_000);
        assert_eq!(r, Some(Duration::from_millis(56_000)));
        // A cost of 5 needs the first two gone.
        let r = retry_after(entries.into_iter(), 10, 5, 10, 60_000, 5_000);
        assert_eq!(r, Some(Duration::from_millis(57_000)));
        assert_eq!(
            retry_after(entries.into_iter(), 10, 11, 10, 60_000, 5_000),
            None
        );
    }
}
