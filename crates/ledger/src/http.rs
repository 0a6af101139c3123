//! The ledger's HTTP port: liveness and readiness probes, Prometheus `/metrics`, and the Syft
//! accounting REST API when enabled (`--accounting-api`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::core::Ledger;

/// `ready` is the gRPC health state: the database answers and the ledger is not shutting down.
pub fn router(ledger: Ledger, accounting_api: bool, ready: watch::Receiver<bool>) -> Router {
    let probes = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(ready.clone());
    let metrics = Router::new()
        .route(
            "/metrics",
            get(|State(ledger): State<Ledger>| async move {
                crate::metrics::render(ledger.store()).await
            }),
        )
        .with_state(ledger.clone());
    let app = probes
        .merge(metrics)
        .merge(crate::web::router(ledger.clone(), ready));
    let app = if accounting_api {
        app.merge(crate::rest::router(ledger))
    } else {
        // An unknown path answers in the REST API's error shape, and says how to turn the API on
        // when the path is one of its (it was an empty 404).
        app.fallback(|uri: axum::http::Uri| async move {
            let rest = [
                "/user/",
                "/users",
                "/token/",
                "/transaction/",
                "/transactions",
            ]
            .iter()
            .any(|p| uri.path().starts_with(p));
            let detail = if rest {
                "no such endpoint: the Syft accounting REST API is served only with \
                 --accounting-api"
            } else {
                "no such endpoint"
            };
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"code": "NOT_FOUND", "detail": detail})),
            )
        })
    };
    app.layer(syft_telemetry::RequestLayer(syft_telemetry::Server::Http(
        "ledger",
    )))
}

async fn readyz(
    State(ready): State<watch::Receiver<bool>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let ready = *ready.borrow();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(serde_json::json!({ "ready": ready })))
}
