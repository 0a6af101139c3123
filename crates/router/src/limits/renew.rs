//! Keeps an admitted request's concurrency slots while it runs.
//!
//! A slot is an entry in a window as long as the limiter's lease: the request's end removes it,
//! and the slots of a router that died age out with the lease. Until 2026-12-06 nothing renewed a
//! slot, so the lease had to outlast the longest request (18 minutes with the defaults), and a
//! router killed with the router-wide slots taken refused every user on every replica that long;
//! restarting it freed nothing (each slot belongs to a request only the dead process knew). Now
//! a request in flight moves its entries to "now" every third of the lease, so a short lease (a
//! minute by default) bounds what a dead router holds, and a long stream keeps its slot.

use std::sync::Arc;
use std::time::Duration;

use super::settle::SETTLES;
use super::{window_now_ms, Limiter};

/// The renewing task of one request; dropping it stops the renewals (the release follows).
pub(super) struct Renewal(tokio::task::JoinHandle<()>);

impl Renewal {
    /// Renews `lease` in `windows` (each a concurrency window and its length) every third of
    /// the shortest; `None` without windows, or outside a runtime.
    pub(super) fn start(
        limiter: Arc<dyn Limiter>,
        lease: String,
        windows: Vec<(String, Duration)>,
    ) -> Option<Self> {
        let shortest = windows.iter().map(|(_, w)| *w).min()?;
        let every = (shortest / 3).max(Duration::from_millis(100));
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let backend = limiter.backend();
        Some(Renewal(rt.spawn(async move {
            let start = tokio::time::Instant::now() + every;
            let mut tick = tokio::time::interval_at(start, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = limiter.renew(window_now_ms(), &lease, &windows).await {
                    // Asked again at the next tick; a store away for the whole lease lets the
                    // slot age out while the request runs (one more request admitted then).
                    SETTLES.with_label_values(&[backend, "renew_failed"]).inc();
                    // Counted, and logged at debug: a store outage fails every running request's
                    // renewal each tick, and the checks' own failures already say so.
                    tracing::debug!(error = %e, "a request's concurrency slot was not renewed; retried at the next tick");
                }
            }
        })))
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}
