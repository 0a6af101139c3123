//! Alert metrics on the ledger's `/metrics` (docs/alerts.md, "Metrics"). Counters are this
//! process's (each replica counts what it wrote and sent); the queue and disabled-endpoint gauges
//! are read from the database at each scrape, so every replica reports the shared truth.

use std::sync::LazyLock;

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge};

use super::rules::EventKind;
use super::store::Outcome;
use crate::error::Result;
use crate::metrics::metrics;
use crate::store::{now_micros, Store};

metrics! {
    /// Alert events committed to the outbox, by type
    static EVENTS: IntCounterVec["type"] = "syft_ledger_alert_events_total";
    /// Webhook delivery attempts by outcome: delivered, retry (failed, retried later), gave_up
    static DELIVERIES: IntCounterVec["outcome"] = "syft_ledger_alert_deliveries_total";
    /// Webhook delivery attempts that were retries (not an event's first attempt)
    static RETRIES: IntCounter = "syft_ledger_alert_retries_total";
    /// Alert events not written: their endpoint had `MAX_PENDING_EVENTS` waiting (evaluate.rs)
    static DROPPED: IntCounter = "syft_ledger_alert_events_dropped_total";
    /// Sends put off by an endpoint's per-minute cap (no attempt spent)
    static RATE_CAPPED: IntCounter = "syft_ledger_alert_rate_capped_total";
    /// Endpoints this process disabled after persistent failure
    static DISABLED_TOTAL: IntCounter = "syft_ledger_alert_endpoints_disabled_total";
    /// Endpoints disabled now (not removed): their events wait until they are enabled
    static DISABLED: IntGauge = "syft_ledger_alert_endpoints_disabled";
    /// Alert events of enabled endpoints not yet delivered nor given up
    static QUEUE: IntGauge = "syft_ledger_alert_queue_depth";
    /// Age of the oldest alert event still waiting for delivery (0 when none)
    static OLDEST: Gauge = "syft_ledger_alert_oldest_pending_seconds";
}

/// Events committed (call after the transaction that wrote them commits).
pub(crate) fn written(kind: EventKind, n: usize) {
    EVENTS.with_label_values(&[kind.as_str()]).inc_by(n as u64);
}

/// Events a rule fired that were not written (their endpoint's queue was full).
pub(crate) fn dropped(n: usize) {
    DROPPED.inc_by(n as u64);
}

/// One recorded attempt; `attempt` counts from 1.
pub(crate) fn attempted(outcome: Outcome, attempt: i64) {
    let label = match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry => "retry",
        Outcome::GaveUp => "gave_up",
    };
    DELIVERIES.with_label_values(&[label]).inc();
    if attempt > 1 {
        RETRIES.inc();
    }
}

pub(crate) fn rate_capped() {
    RATE_CAPPED.inc();
}

/// Events of a capped endpoint's backlog put off together (see `within_rate_caps`).
pub(crate) fn rate_capped_by(events: u64) {
    RATE_CAPPED.inc_by(events);
}

pub(crate) fn disabled() {
    DISABLED_TOTAL.inc();
}

/// Lists the alert counters and gauges before any event (a rule on `increase()` sees nothing of
/// a series that does not exist yet), whether or not the database answers the scrape.
pub fn at_zero() {
    for kind in EventKind::ALL {
        EVENTS.with_label_values(&[kind.as_str()]);
    }
    for label in ["delivered", "retry", "gave_up"] {
        DELIVERIES.with_label_values(&[label]);
    }
    LazyLock::force(&RETRIES);
    LazyLock::force(&DROPPED);
    LazyLock::force(&RATE_CAPPED);
    LazyLock::force(&DISABLED_TOTAL);
    LazyLock::force(&QUEUE);
    LazyLock::force(&OLDEST);
    LazyLock::force(&DISABLED);
}

/// Refreshes the gauges read from the database (called by the `/metrics` handler).
pub async fn refresh(store: &Store) -> Result<()> {
    let (depth, oldest): (i64, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), MIN(e.created_at) FROM alert_events e \
         JOIN alert_endpoints p ON p.id = e.endpoint_id WHERE e.status = 'PENDING' \
         AND p.disabled_at IS NULL AND p.removed_at IS NULL",
    )
    .fetch_one(store.pool())
    .await?;
    let disabled: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM alert_endpoints WHERE disabled_at IS NOT NULL AND removed_at IS NULL",
    )
    .fetch_one(store.pool())
    .await?;
    QUEUE.set(depth);
    OLDEST.set(oldest.map_or(0.0, |at| {
        (now_micros().saturating_sub(at)).max(0) as f64 / 1e6
    }));
    DISABLED.set(disabled);
    Ok(())
}
