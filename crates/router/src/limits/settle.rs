//! Changes to a request's windows after its admission: a slot's release, the token settlement,
//! the take-back of a check whose answer was lost, the withdrawal of a refused request. Each runs
//! in a task of its own (a client leaving does not cancel it) and is retried until the store has
//! it, within [`SETTLE_RETRY_FOR`].

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{register_int_counter_vec, IntCounterVec};

use super::{Limiter, LimiterError};
use crate::drain::DrainGuard;

pub(super) static SETTLES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "syft_router_limit_settles_total",
        "Changes to rate windows after admission (slot releases, token settlements, take-backs, \
         withdrawals, slot renewals) the store did not take: retried (an attempt failed, another \
         follows), given_up (the slot or reservation stays until it ages out of its window; a \
         slot: its lease) or renew_failed (a slot in use not renewed; asked again a third of \
         the lease later)",
        &["backend", "outcome"]
    )
    .expect("register syft_router_limit_settles_total")
});

/// Every outcome of `backend` at zero (a router with limits lists them before their first event).
pub(super) fn at_zero(backend: &str) {
    for outcome in ["retried", "given_up", "renew_failed"] {
        SETTLES.with_label_values(&[backend, outcome]);
    }
}

/// How long a change the store did not take is retried. A lost release kept its slot for the
/// whole lease (18 minutes then: a user allowed one request in flight could send nothing
/// meanwhile). Each change names its own request's lease and the cost it ends at, so a retry that
/// finds its work done changes nothing. The bound keeps a graceful shutdown with the store down
/// from waiting longer on releases.
const SETTLE_RETRY_FOR: Duration = Duration::from_secs(10);

/// Which change a settle task makes (its call to the store, and its log line).
#[derive(Debug, Clone, Copy)]
pub(super) enum Change {
    /// A finished request's slots (and its token reservation, if never settled).
    Release,
    /// The token reservation replaced by what the answer used.
    SettleTokens,
    /// A check whose answer was lost, which may still be on its way to the store.
    TakeBack,
    /// A request the ledger refused for its token, taken out of every window.
    Withdraw,
}

impl Change {
    fn failed(self) -> &'static str {
        match self {
            Change::Release => {
                "release a request's limiter slots; they free when their lease ages out"
            }
            Change::SettleTokens => "settle the token reservation; the reservation stands",
            Change::TakeBack => "take back an unanswered limiter check",
            Change::Withdraw => "withdraw a refused request from its windows",
        }
    }
}

/// Settles `lease` in a task on `rt`, retrying with backoff within [`SETTLE_RETRY_FOR`] (each
/// attempt waits as long as its backend's settle allows, `redis.rs`). `work` (a graceful
/// shutdown waits for it) is held until the store has the change or the retries gave up.
pub(super) fn spawn_settle(
    rt: &tokio::runtime::Handle,
    limiter: Arc<dyn Limiter>,
    lease: String,
    updates: Vec<(String, u64)>,
    work: Option<DrainGuard>,
    change: Change,
) -> tokio::task::JoinHandle<()> {
    rt.spawn(async move {
        let _work = work;
        let start = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            // No try outlives the bound (a try waits up to 5 s on Redis).
            let left = SETTLE_RETRY_FOR.saturating_sub(start.elapsed());
            let call = match change {
                Change::TakeBack => limiter.take_back(&lease, &updates),
                _ => limiter.settle(&lease, &updates),
            };
            let attempt = tokio::time::timeout(left, call).await;
            let attempt = attempt.unwrap_or_else(|_| {
                Err(LimiterError::unknown(format!(
                    "not taken within {SETTLE_RETRY_FOR:?}"
                )))
            });
            match attempt {
                Ok(()) => return,
                Err(e) if start.elapsed() + backoff >= SETTLE_RETRY_FOR => {
                    SETTLES
                        .with_label_values(&[limiter.backend(), "given_up"])
                        .inc();
                    tracing::warn!(error = %e, "could not {}", change.failed());
                    return;
                }
                Err(e) => {
                    SETTLES
                        .with_label_values(&[limiter.backend(), "retried"])
                        .inc();
                    tracing::debug!(error = %e, retry_in = ?backoff, "could not {}; retrying", change.failed());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    })
}
