//! The router's own metrics (request counts and latencies come from `syft_telemetry`).

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGauge, IntGaugeVec,
};
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

static WAITING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "syft_router_upstream_waiting",
        "Requests waiting for the upstream's answer now (a stream: for its start), by provider",
        &["provider"]
    )
    .expect("register syft_router_upstream_waiting")
});

/// A request waiting for its upstream, counted in `syft_router_upstream_waiting` until dropped.
/// The durations are recorded when a call ends: an upstream that hangs showed nowhere until its
/// timeout (two minutes by default), and with a concurrency limit its users were refused as
/// over their limit meanwhile.
pub struct UpstreamWait(IntGauge);

impl UpstreamWait {
    pub fn start(provider: &str) -> Self {
        let gauge = WAITING.with_label_values(&[provider]);
        gauge.inc();
        UpstreamWait(gauge)
    }
}

impl Drop for UpstreamWait {
    fn drop(&mut self) {
        self.0.dec();
    }
}

static UNCONFIRMED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "syft_router_usage_rows_unconfirmed_total",
        "Usage rows the ledger did not confirm, by row (free, refusal): lost, unless the \
         ledger committed one after the router stopped waiting for it (a slow database: compare \
         with the ledger's rows); also those not sent while the ledger refuses this router's \
         secret. A usage spool keeps free rows instead (syft_router_usage_spool_events_total)",
        &["row"]
    )
    .expect("register syft_router_usage_rows_unconfirmed_total")
});

/// The kind of row [`row_unconfirmed`] counts.
#[derive(Debug, Clone, Copy)]
pub enum UnconfirmedRow {
    Free,
    Refusal,
}

/// A usage row the ledger did not confirm: the one count of rows that may be lost (the log line
/// beside it cannot tell a lost row from a late one).
pub fn row_unconfirmed(row: UnconfirmedRow) {
    let label = match row {
        UnconfirmedRow::Free => "free",
        UnconfirmedRow::Refusal => "refusal",
    };
    UNCONFIRMED.with_label_values(&[label]).inc();
}

/// The router's own counters at zero, listed before their first event (an `increase()` rule
/// sees nothing of a series that does not exist yet).
pub fn at_zero() {
    for label in ["free", "refusal"] {
        UNCONFIRMED.with_label_values(&[label]);
    }
}

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

/// Records one finished chat request. A replay called no upstream: only the router's share is
/// recorded (it counted as a 0-s upstream call).
pub fn observe(provider: &str, mode: &str, outcome: &str, started: Instant, upstream: Duration) {
    let total = started.elapsed();
    if outcome != "replay" {
        UPSTREAM
            .with_label_values(&[provider, outcome])
            .observe(upstream.as_secs_f64());
    }
    ADDED
        .with_label_values(&[mode, outcome])
        .observe(total.saturating_sub(upstream).as_secs_f64());
}

/// Records a request whose upstream call failed, under the failure's usage status; an upstream's
/// 429 apart (`upstream_rate_limited`): the owner's quota there, not an upstream fault, which the
/// usage rows' one `upstream_error` mixed.
pub fn observe_failure(
    provider: &str,
    mode: &str,
    e: &UpstreamError,
    started: Instant,
    upstream: Duration,
) {
    let outcome = match e {
        UpstreamError::Status { status: 429, .. } => "upstream_rate_limited",
        e => e.usage_status().as_str(),
    };
    observe(provider, mode, outcome, started, upstream);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream's 429 is labelled apart from its faults, and a replay, which called no
    /// upstream, records no upstream time.
    #[test]
    fn a_429_and_a_replay_are_told_apart() {
        let provider = "metrics-test-provider";
        let limited = UpstreamError::Status {
            status: 429,
            message: String::new(),
            retry_after: None,
        };
        let failed = UpstreamError::Status {
            status: 500,
            message: String::new(),
            retry_after: None,
        };
        let now = Instant::now();
        observe_failure(provider, "unary", &limited, now, Duration::ZERO);
        observe_failure(provider, "unary", &failed, now, Duration::ZERO);
        observe(provider, "unary", "replay", now, Duration::ZERO);
        let count = |outcome: &str| {
            UPSTREAM
                .with_label_values(&[provider, outcome])
                .get_sample_count()
        };
        assert_eq!(count("upstream_rate_limited"), 1);
        assert_eq!(count("upstream_error"), 1);
        assert_eq!(count("replay"), 0);
    }
}
