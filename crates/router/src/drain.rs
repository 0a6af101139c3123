//! Graceful shutdown of in-flight requests.
//!
//! Every request holds a [`DrainGuard`] from the moment it is admitted until it is fully settled
//! (its hold captured or voided, its usage row written), and so does every unresolved hold, even
//! one whose request future was dropped and whose void runs in the background, and so does every
//! change to the rate windows after an admission (a slot's release, a token settlement, the
//! take-back of an unanswered check: `limits/settle.rs`), until the store has it. When the grace
//! period is over, [`Drain::abort`] makes the running requests give up on the upstream and void
//! their holds; [`Drain::idle`] resolves once every guard is gone, so the process exits only
//! after the voids reached the ledger.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::service::RouterService;

#[derive(Debug)]
pub(crate) struct Drain {
    active: AtomicUsize,
    idle: Notify,
    abort: watch::Sender<bool>,
}

impl Drain {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Drain {
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            abort: watch::channel(false).0,
        })
    }

    /// Counts one unit of in-flight work until the guard is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> DrainGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        DrainGuard(self.clone())
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Tells in-flight requests to stop waiting for the upstream and settle now.
    pub(crate) fn abort(&self) {
        self.abort.send_replace(true);
    }

    pub(crate) fn is_aborting(&self) -> bool {
        *self.abort.borrow()
    }

    /// Resolves once [`Drain::abort`] was called.
    pub(crate) async fn aborted(&self) {
        let mut rx = self.abort.subscribe();
        // The sender lives as long as `self`, so this only returns once aborting.
        let _ = rx.wait_for(|a| *a).await;
    }

    /// Resolves when no work is in flight.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One unit of in-flight work; see [`Drain`].
#[derive(Debug)]
pub(crate) struct DrainGuard(Arc<Drain>);

impl DrainGuard {
    /// One more unit of work on the same drain (a task the guarded work hands on).
    pub(crate) fn another(&self) -> DrainGuard {
        self.0.enter()
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Longest wait, after the grace period, for cancelled requests to void their holds.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
/// Longest wait, after that, for connections to deliver the last responses.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// Drives `servers` (which stop accepting when `shutdown` resolves and then drain gracefully).
/// If they have not drained `grace` after `shutdown`, in-flight requests are cancelled (their
/// holds voided, awaited here), connections get a moment to deliver the errors, and this returns.
///
/// Servers that drained in time are not the end either: work outlives its connection (a stream
/// whose client left is still settling in its own task, a dropped request's void runs in the
/// background), so this also waits, within the same grace, until nothing is in flight.
pub(crate) async fn run_with_grace<E>(
    service: &RouterService,
    servers: impl Future<Output = Result<(), E>>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), E> {
    tokio::pin!(servers);
    let deadline = async {
        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            in_flight = service.in_flight(),
            "shutting down: no new connections, draining in-flight requests"
        );
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(deadline);
    let mut served = tokio::select! {
        result = &mut servers => Some(result),
        _ = &mut deadline => None,
    };
    if served.is_some() {
        // Without a shutdown (the servers failed) the work still gets one grace to settle.
        let settled = tokio::select! {
            _ = service.wait_idle() => true,
            _ = &mut deadline => false,
            _ = tokio::time::sleep(grace) => false,
        };
        if settled {
            tracing::info!("router stopped");
            return served.unwrap_or(Ok(()));
        }
    }
    tracing::warn!(
        in_flight = service.in_flight(),
        "grace period over: cancelling in-flight requests and voiding their holds"
    );
    service.cancel_in_flight();
    let settle = service
        .config()
        .ledger
        .timeout
        .saturating_mul(2)
        .min(SETTLE_LIMIT);
    if tokio::time::timeout(settle, service.wait_idle())
        .await
        .is_err()
    {
        tracing::error!(
            in_flight = service.in_flight(),
            "work still unsettled at exit: holds expire on the ledger, limiter slots and \
             reservations age out of their windows"
        );
    }
    if served.is_none() {
        match tokio::time::timeout(CLOSE_LIMIT, &mut servers).await {
            Ok(result) => served = Some(result),
            Err(_) => tracing::warn!("closing connections that are still open"),
        }
    }
    tracing::info!("router stopped");
    served.unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_every_guard() {
        let drain = Drain::new();
        drain.idle().await;
        let a = drain.enter();
        let b = drain.enter();
        assert_eq!(drain.active(), 2);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one guard is still alive");
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("idle after the last guard")
            .expect("join");
    }

    #[tokio::test]
    async fn abort_wakes_waiters() {
        let drain = Drain::new();
        assert!(!drain.is_aborting());
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.aborted().await }
        });
        drain.abort();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("aborted")
            .expect("join");
        assert!(drain.is_aborting());
    }
}
