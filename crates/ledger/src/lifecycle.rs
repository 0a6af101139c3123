//! Graceful shutdown with a deadline.

use std::future::Future;
use std::time::Duration;

/// Default [`crate::LedgerConfig::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Splits `shutdown` into the signal handed to the server (it stops accepting and drains) and a
/// deadline that resolves `grace` after it: in-flight calls still running then are dropped
/// (their database transactions roll back; a caller retries with the same idempotency key).
pub fn with_grace(
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> (
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: no new connections, draining in-flight calls"
        );
        let _ = tx.send(true);
    };
    let deadline = async move {
        if rx.wait_for(|stop| *stop).await.is_err() {
            // The server ended before any signal: no deadline.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
        tracing::warn!("grace period over: dropping in-flight calls");
    };
    (signal, deadline)
}
