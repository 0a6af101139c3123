//! The router's own metrics (request counts and latencies come from `syft_telemetry`).

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};
use syft_telemetry::metrics::LATENCY_BUCKETS;

use crate::upstream::UpstreamError;

static UPSTREAM: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "syft_router_upstream_duration_seconds",
        "Time spent waiting for the upstream model (a stream: until its end), by provider and outcome",
        &["provider", "outcome"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("register syft_router_upstream_duration_seconds")
});

static ADDED: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "syft_router_added_latency_seconds",
        "The router's own share of a chat request: total time minus upstream time (pricing, \
         authorize, capture or void, usage)",
        &["mode", "outcome"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("register syft_router_added_latency_seconds")
});

static SPOOL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "syft_router_usage_spool_events_total",
        "Usage spool trouble: ship_failed (a call the ledger did not take; the rows stay \
         spooled and are retried), row_dropped (a row the ledger refuses as invalid), row_lost \
         (a row neither the spool nor the ledger took), row_unsynced (a row written to the spool \
         whose sync failed or stalled, and the ledger did not take), segment_quarantined (a spool file \
         unreadable inside, kept as .corrupt), segment_unreadable (a spool file that cannot be \
         read holds the rest back)",
        &["event"]
    )
    .expect("register syft_router_usage_spool_events_total")
});

/// Usage spool trouble, one series each (help text of `syft_router_usage_spool_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolEvent {
    /// A call the ledger did not take; the rows stay spooled and are retried. One that keeps
    /// rising means rows are piling up on disk (the ledger is down, or refuses the router).
    ShipFailed,
    RowDropped,
    RowLost,
    RowUnsynced,
    SegmentQuarantined,
    SegmentUnreadable,
}

impl SpoolEvent {
    const ALL: [SpoolEvent; 6] = [
        SpoolEvent::ShipFailed,
        SpoolEvent::RowDropped,
        SpoolEvent::RowLost,
        SpoolEvent::RowUnsynced,
        SpoolEvent::SegmentQuarantined,
        SpoolEvent::SegmentUnreadable,
    ];

    fn label(self) -> &'static str {
        match self {
            SpoolEvent::ShipFailed => "ship_failed",
            SpoolEvent::RowDropped => "row_dropped",
            SpoolEvent::RowLost => "row_lost",
            SpoolEvent::RowUnsynced => "row_unsynced",
            SpoolEvent::SegmentQuarantined => "segment_quarantined",
            SpoolEvent::SegmentUnreadable => "segment_unreadable",
        }
    }
}

pub fn spool_event(event: SpoolEvent) {
    SPOOL.with_label_values(&[event.label()]).inc();
}

/// Every spool event at zero, once a router has a spool: a rule on `increase()` sees nothing of
/// a series that does not exist yet, so the first `row_lost` would not raise an alert.
pub fn spool_opened() {
    for event in SpoolEvent::ALL {
        SPOOL.with_label_values(&[event.label()]);
    }
}

/// Records one finished chat request.
pub fn observe(provider: &str, mode: &str, outcome: &str, started: Instant, upstream: Duration) {
    let total = started.elapsed();
    UPSTREAM
        .with_label_values(&[provider, outcome])
        .observe(upstream.as_secs_f64());
    ADDED
        .with_label_values(&[mode, outcome])
        .observe(total.saturating_sub(upstream).as_secs_f64());
}

/// Records a request whose upstream call failed, under the failure's usage status.
pub fn observe_failure(
    provider: &str,
    mode: &str,
    e: &UpstreamError,
    started: Instant,
    upstream: Duration,
) {
    observe(provider, mode, e.usage_status().as_str(), started, upstream);
}
