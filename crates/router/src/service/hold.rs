//! Guards that keep a request's bookkeeping right however it ends: the in-flight claim on its
//! request id, and the hold that must be captured or voided exactly once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use syft_error::UsageStatus;
use syft_proto::ledger::{AnswerToStore, Usage};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::Inner;
use crate::drain::DrainGuard;
use crate::error::RouterError;
use crate::ledger::Ledger;

/// Removes a (user, request id) from the in-flight set when the request ends, however it ends.
/// A free request's claim also keeps its usage row until the request recorded its own: every
/// request leaves a row, and a free one dropped before (the client went away) is recorded as
/// `cancelled` in the background, as a paid one is by its [`HoldGuard`].
pub(super) struct Claim {
    pub(super) inner: Arc<Inner>,
    pub(super) key: (String, String),
    /// Counts the request as in flight for graceful shutdown.
    pub(super) _work: DrainGuard,
    /// A free request's `cancelled` row, until [`Claim::recorded`].
    pub(super) unrecorded: Option<Usage>,
    /// When the request started (its ticket's): a `cancelled` row is given its latency at drop.
    pub(super) admitted: Instant,
}

impl Claim {
    /// The request recorded its row (or holds a hold that will): nothing to record on drop.
    pub(super) fn recorded(&mut self) {
        self.unrecorded = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut set) = self.inner.in_flight.lock() {
            set.remove(&self.key);
        }
        let Some(mut usage) = self.unrecorded.take() else {
            return;
        };
        lasted_until_now(&mut usage, self.admitted);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ledger = self.inner.ledger.clone();
        let work = self.inner.drain.enter();
        tracing::info!(request_id = %usage.request_id, "free request dropped before its row; recording it as cancelled");
        rt.spawn(async move {
            let _work = work;
            if let Err(e) = ledger.record_free_usage(usage).await {
                if !ledger.has_spool() {
                    crate::metrics::row_unconfirmed(crate::metrics::UnconfirmedRow::Free);
                }
                tracing::warn!(error = %e, "the cancelled request's usage row not confirmed by the ledger: lost unless it committed late");
            }
        });
    }
}

/// A request's admission, run in the request's task while the request waits for it, and finished
/// in a task of its own if the request is dropped first: what the ledger decided meanwhile (a
/// hold, a refusal) must still reach its guard or its row. Polled in place, it costs a request
/// no task and no hand-over between tasks.
pub(super) struct Unfinished<F: Future + Send + 'static> {
    run: Option<Pin<Box<F>>>,
    /// The request's end of [`super::admission::Presence`]: dropped first, so the admission sees
    /// its request gone.
    waiting: Option<tokio::sync::watch::Receiver<()>>,
    /// Counts the admission as work in flight until it ends.
    work: Option<DrainGuard>,
    /// The request's span, for the task that finishes a dropped admission (in the request's task
    /// the admission runs inside it already).
    span: tracing::Span,
}

impl<F: Future + Send + 'static> Unfinished<F> {
    pub(super) fn new(run: F, waiting: tokio::sync::watch::Receiver<()>, work: DrainGuard) -> Self {
        Unfinished {
            run: Some(Box::pin(run)),
            waiting: Some(waiting),
            work: Some(work),
            span: tracing::Span::current(),
        }
    }
}

impl<F: Future + Send + 'static> Future for Unfinished<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(run) = self.run.as_mut() else {
            // Polled after it ended (a contract violation of the caller): never ready again.
            return Poll::Pending;
        };
        let output = std::task::ready!(run.as_mut().poll(cx));
        self.run = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for Unfinished<F> {
    fn drop(&mut self) {
        let Some(run) = self.run.take() else {
            return;
        };
        drop(self.waiting.take());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let work = self.work.take();
        // The boxed future moves as it is (pinned on the heap), and is polled on by the task.
        let span = std::mem::replace(&mut self.span, tracing::Span::none());
        rt.spawn(
            async move {
                let _work = work;
                drop(run.await);
            }
            .instrument(span),
        );
    }
}

/// An authorized hold. Resolved by [`HoldGuard::capture`] or [`HoldGuard::void`]; if dropped
/// unresolved (the client went away and the request future was dropped), it voids the hold in
/// the background.
pub(super) struct HoldGuard {
    /// Keeps shutdown waiting until the hold is resolved, including by the background void.
    pub(super) work: Option<DrainGuard>,
    pub(super) ledger: Ledger,
    pub(super) transfer_id: String,
    /// When the hold expires (on this process's clock), as last known.
    pub(super) expires_at: Instant,
    /// The hold's time to live (what each extension asks for).
    pub(super) ttl: Duration,
    /// Present while the hold is unresolved.
    pub(super) cancel_usage: Option<Usage>,
    /// Set while a void of the router's own runs (a failure's): `cancel_usage` is then that
    /// void's row, which a drop keeps as it is, with this reason.
    pub(super) void_reason: Option<String>,
    /// The slowest ledger round trip seen for this hold (authorize, extensions): a loaded ledger
    /// needs that long again to commit the capture, so streams end that much earlier.
    pub(super) slowest_call: Duration,
    /// When the request started (its ticket's): the `cancelled` row is given its latency at drop.
    pub(super) admitted: Instant,
}

impl HoldGuard {
    pub(super) async fn capture(
        mut self,
        cost: i64,
        usage: Usage,
        answer: Option<AnswerToStore>,
    ) -> Result<(), RouterError> {
        let refused_row = Usage {
            status: UsageStatus::CaptureRefused.as_str().into(),
            ..usage.clone()
        };
        let result = self
            .ledger
            .capture(&self.transfer_id, cost, usage, answer, self.settle_until())
            .await;
        match &result {
            Ok(_) => self.cancel_usage = None,
            // Unavailable: the outcome is unknown; leave the guard armed so a void is attempted
            // (whichever resolution commits first wins, exactly once).
            Err(RouterError::Unavailable(_)) => {}
            // A definite refusal (the hold expired meanwhile): nothing was captured. Void it now
            // with the request's row rather than leave it to the sweep, which frees the money
            // only at its next pass and writes no row.
            Err(e) => {
                let reason = format!("capture refused: {e}");
                self.void(&reason, refused_row).await;
            }
        }
        result.map(|_| ())
    }

    pub(super) async fn void(mut self, reason: &str, usage: Usage) {
        // The guard stays armed with this void's own row until the ledger answered: if the
        // request future is dropped meanwhile (the client's deadline), `Drop` voids again in the
        // background. Resolutions are idempotent, so a void that did commit is not repeated.
        self.cancel_usage = Some(usage.clone());
        self.void_reason = Some(reason.to_string());
        let until = self.settle_until();
        let result = self
            .ledger
            .void(&self.transfer_id, reason, Some(usage), until)
            .await;
        self.cancel_usage = None;
        if let Err(e) = result {
            // The hold expires on its own; the user is not charged either way.
            tracing::warn!(transfer_id = %self.transfer_id, error = %e, "void failed; the hold will expire");
        }
    }
}

/// A row made when the request was admitted, recorded as it ends (dropped): its latency is the
/// request's whole life (it said 0 ms of a request cancelled after seconds). A row made later
/// (a void's) keeps its own, measured from the request's start.
fn lasted_until_now(usage: &mut Usage, admitted: Instant) {
    let lasted = i64::try_from(admitted.elapsed().as_millis()).unwrap_or(i64::MAX);
    usage.latency_ms = usage.latency_ms.max(lasted);
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let Some(mut usage) = self.cancel_usage.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // A void of the router's own cut short (its client's deadline, while the ledger was slow)
        // keeps its row: the failure's status, not `cancelled`, which took it out of the
        // owner's error rates during exactly such an incident.
        let reason = match self.void_reason.take() {
            Some(reason) => reason,
            None => {
                usage.status = UsageStatus::Cancelled.as_str().into();
                lasted_until_now(&mut usage, self.admitted);
                "request cancelled".to_string()
            }
        };
        let ledger = self.ledger.clone();
        let transfer_id = std::mem::take(&mut self.transfer_id);
        let work = self.work.take();
        let until = self.settle_until();
        tracing::info!(transfer_id = %transfer_id, "request dropped before resolution; voiding");
        rt.spawn(async move {
            let _work = work;
            if let Err(e) = ledger.void(&transfer_id, &reason, Some(usage), until).await {
                tracing::warn!(transfer_id = %transfer_id, error = %e, "void after cancel failed: the hold expires uncharged, unless a capture in flight when the request was dropped committed (its answer is then kept for the id's retry)");
            }
        });
    }
}

/// Margin past a hold's expiry during which an unknown resolution is still asked about: once the
/// hold has expired the ledger's answer is definite (captured, or no longer capturable).
pub(super) const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// The ledger's default hold life (its `--hold-ttl`), for a router that asks for none.
pub(super) const LEDGER_DEFAULT_TTL: Duration = Duration::from_secs(300);

/// How long an authorization whose outcome is unknown (a timeout, a ledger answering
/// `UNAVAILABLE`) is asked again before the request fails. Long enough for a ledger restart or a
/// database failover, when the repeat finds the hold and the request goes on; short enough that a
/// ledger that stays away does not hold every paid request for a hold's life. A hold placed by an
/// attempt given up on stays until it expires (docs/design.md, known gaps).
pub(super) const AUTHORIZE_SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// A ledger timestamp as an instant of this process's clock (a day ahead at most, whatever the
/// ledger says).
fn local_instant(unix_micros: i64) -> Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let remaining = u64::try_from(unix_micros.saturating_sub(now)).unwrap_or(0);
    Instant::now() + Duration::from_micros(remaining).min(Duration::from_secs(86_400))
}

/// When a hold expires, on this process's clock, erring early.
///
/// A ledger that says the hold's time left (`expires_in_micros`, by the one clock it stamps and
/// judges holds with) is taken at its word, counted from `sent` (when the call left: the answer
/// was made later): no wall clock enters, so a router clock ahead of the ledger's no longer ends
/// streams early (a time tester, 2026-12-06). A ledger of an earlier version stamps by its own
/// clock and may judge by its database's: then `sent` + the time to live, or its expiry read on
/// this process's clock where that is earlier (a router in step with the database catches a
/// ledger behind it).
pub(super) fn expiry_estimate(sent: Instant, t: &syft_proto::ledger::Transfer) -> Instant {
    said_expiry(sent, t).unwrap_or_else(|| {
        let by_ttl = sent + hold_ttl(t.created_at_unix_micros, t.expires_at_unix_micros);
        by_ttl.min(local_instant(t.expires_at_unix_micros))
    })
}

/// How long a duplicate waits for another request's pending hold `t` to be resolved: its expiry
/// plus [`SETTLE_MARGIN`], erring late (a bound on waiting, not on the hold), read again from
/// each answer (a stream's hold is extended while it runs).
pub(super) fn wait_bound(t: &syft_proto::ledger::Transfer) -> Instant {
    let expiry =
        said_expiry(Instant::now(), t).unwrap_or_else(|| local_instant(t.expires_at_unix_micros));
    expiry + SETTLE_MARGIN
}

/// The expiry a ledger's `expires_in_micros` gives, counted from `at` (a day at most).
fn said_expiry(at: Instant, t: &syft_proto::ledger::Transfer) -> Option<Instant> {
    let left = u64::try_from(t.expires_in_micros?).unwrap_or(0);
    Some(at + Duration::from_micros(left).min(Duration::from_secs(86_400)))
}

/// A hold's time to live, from its creation and expiry (at least a second).
pub(super) fn hold_ttl(created_at_unix_micros: i64, expires_at_unix_micros: i64) -> Duration {
    let micros = expires_at_unix_micros.saturating_sub(created_at_unix_micros);
    Duration::from_micros(u64::try_from(micros).unwrap_or(0)).max(Duration::from_secs(1))
}

impl HoldGuard {
    /// Until when an unknown capture or void outcome is asked again: the hold's remaining life
    /// plus [`SETTLE_MARGIN`] (past its expiry the ledger's answer is definite).
    pub(super) fn settle_until(&self) -> Instant {
        self.expires_at + SETTLE_MARGIN
    }

    /// How often a stream's hold is extended: three times per time to live.
    pub(super) fn keep_alive_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }

    /// When a stream must end so that its capture commits before the hold expires: a quarter of
    /// the time to live (5 s at most) before the expiry.
    /// Under load a capture takes longer: the margin is at least twice the slowest ledger call
    /// seen for this hold (never more than half the time to live, so a stream still runs).
    pub(super) fn capture_by(&self) -> Instant {
        let margin = (self.ttl / 4)
            .min(Duration::from_secs(5))
            .max((self.slowest_call * 2).min(self.ttl / 2));
        self.expires_at - margin
    }

    /// Extends the hold by its time to live. `false` when the ledger refused for good (resolved,
    /// expired, not supported): stop asking. A ledger that does not answer is asked again at the
    /// next tick; meanwhile [`HoldGuard::capture_by`] bounds the stream.
    pub(super) async fn extend(&mut self) -> bool {
        let ttl = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let result = self.ledger.extend_hold(&self.transfer_id, ttl).await;
        self.slowest_call = self.slowest_call.max(sent.elapsed());
        match result {
            Ok(t) => {
                // The extension moved the expiry to (ledger's now + ttl), capped by the hold's
                // maximum life. The time left the ledger says covers both; from an older
                // ledger, `sent` + ttl errs early and its expiry catches the cap.
                self.expires_at = said_expiry(sent, &t).unwrap_or_else(|| {
                    let by_ttl = sent + Duration::from_secs(u64::try_from(ttl).unwrap_or(0));
                    by_ttl.min(local_instant(t.expires_at_unix_micros))
                });
                true
            }
            Err(RouterError::Unavailable(e)) => {
                tracing::warn!(transfer_id = %self.transfer_id, error = %e, "hold not extended; retrying");
                true
            }
            Err(e) => {
                tracing::info!(transfer_id = %self.transfer_id, error = %e, "hold cannot be extended");
                false
            }
        }
    }
}

/// Runs `work` (a unary upstream call or a search) while extending `hold` every third of its
/// time to live, as a stream's is: an upstream slower than the hold's TTL still finds the hold
/// alive to capture. Without a hold (a free request), just `work`.
pub(super) async fn keeping_alive<T>(
    hold: &mut Option<HoldGuard>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let Some(h) = hold.as_mut() else {
        return work.await;
    };
    let every = h.keep_alive_every();
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    let mut extending = true;
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick(), if extending => extending = h.extend().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syft_proto::ledger::Transfer;

    fn unix_micros_in(d: Duration, ahead: bool) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|n| n.as_micros() as i64)
            .unwrap_or(0);
        let d = d.as_micros() as i64;
        if ahead {
            now + d
        } else {
            now - d
        }
    }

    /// A 3-s hold created `skew` ahead of (or behind) this clock, saying `said` time left.
    fn three_second_hold(skew: Duration, ahead: bool, said: Option<i64>) -> Transfer {
        let created = unix_micros_in(skew, ahead);
        Transfer {
            created_at_unix_micros: created,
            expires_at_unix_micros: created + 3_000_000,
            expires_in_micros: said,
            ..Default::default()
        }
    }

    /// Time left until `at`.
    fn left(at: Instant) -> Duration {
        at.saturating_duration_since(Instant::now())
    }

    /// A slow answer (the call left 2 s ago) from a ledger whose clock runs 5 s ahead: the
    /// ledger's figure alone would place the expiry 8 s away, but the hold was placed after the
    /// call left, so it expires at most `sent + ttl`: 1 s away.
    #[tokio::test]
    async fn expiry_estimate_errs_early() {
        let sent = Instant::now() - Duration::from_secs(2);
        let t = three_second_hold(Duration::from_secs(5), true, None);
        let left_then = left(expiry_estimate(sent, &t));
        assert!(left_then <= Duration::from_secs(1), "{left_then:?}");
        assert!(left_then >= Duration::from_millis(900), "{left_then:?}");
        // A ledger clock behind: its own figure is the earlier one and wins.
        let t = three_second_hold(Duration::from_secs(2), false, None);
        let left_now = left(expiry_estimate(Instant::now(), &t));
        assert!(left_now <= Duration::from_secs(1), "{left_now:?}");
    }

    /// A ledger that says the time left is taken at its word, counted from when the call left,
    /// whatever its timestamps read as on this clock: here they read 10 minutes past (a router
    /// clock ahead), which ended every stream at once.
    #[tokio::test]
    async fn the_time_left_a_ledger_says_decides() {
        let sent = Instant::now() - Duration::from_secs(1);
        let t = three_second_hold(Duration::from_secs(600), false, Some(3_000_000));
        let said = left(expiry_estimate(sent, &t));
        assert!(said <= Duration::from_secs(2), "{said:?}");
        assert!(said >= Duration::from_millis(1_900), "{said:?}");
        // Said expired: expired.
        let t = Transfer {
            expires_in_micros: Some(-5),
            ..t
        };
        assert!(expiry_estimate(sent, &t) <= Instant::now());
    }

    /// Under load the stream ends earlier: twice the slowest ledger call before the expiry (at
    /// most half the time to live).
    #[tokio::test]
    async fn capture_margin_grows_with_slow_calls() {
        let ledger = crate::ledger::Ledger::connect(&crate::config::LedgerSettings::default(), "")
            .expect("lazy ledger");
        let expires_at = Instant::now() + Duration::from_secs(60);
        let mut g = HoldGuard {
            work: None,
            ledger,
            transfer_id: String::new(),
            expires_at,
            ttl: Duration::from_secs(60),
            cancel_usage: None,
            void_reason: None,
            slowest_call: Duration::from_millis(10),
            admitted: Instant::now(),
        };
        assert_eq!(g.capture_by(), expires_at - Duration::from_secs(5));
        g.slowest_call = Duration::from_secs(4);
        assert_eq!(g.capture_by(), expires_at - Duration::from_secs(8));
        g.slowest_call = Duration::from_secs(40);
        assert_eq!(g.capture_by(), expires_at - Duration::from_secs(30));
    }
}
