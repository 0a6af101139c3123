//! Prometheus metrics in the process-wide default registry, served at `/metrics` by each service.
//! Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, Encoder, HistogramVec, IntCounterVec,
    TextEncoder,
};

/// Latency buckets from half a millisecond (a ledger call) to a minute (a long generation).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub static GRPC_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "syft_grpc_server_requests_total",
        "gRPC requests handled, by service, method and status code",
        &["grpc_service", "grpc_method", "grpc_code"]
    )
    .expect("register syft_grpc_server_requests_total")
});

pub static GRPC_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "syft_grpc_server_request_duration_seconds",
        "Time to the response headers of a gRPC request (a stream's first message)",
        &["grpc_service", "grpc_method"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("register syft_grpc_server_request_duration_seconds")
});

pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "syft_http_server_requests_total",
        "HTTP requests handled, by server, method, route and status",
        &["server", "method", "route", "status"]
    )
    .expect("register syft_http_server_requests_total")
});

pub static HTTP_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "syft_http_server_request_duration_seconds",
        "Time to the response headers of an HTTP request",
        &["server", "method", "route"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("register syft_http_server_request_duration_seconds")
});

/// Every registered metric in the Prometheus text format.
pub fn render() -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&prometheus::gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// An axum response with [`render`]'s text.
pub fn response() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
        .into_response()
}
