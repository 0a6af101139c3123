//! The ledger's HTTP port: liveness and readiness probes, and the Syft accounting REST API when
//! enabled (`--accounting-api`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::service::LedgerService;

pub fn router(service: LedgerService, accounting_api: bool) -> Router {
    let probes = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(service.clone());
    if accounting_api {
        probes.merge(crate::rest::router(service))
    } else {
        probes
    }
}

/// Ready when the database answers.
async fn readyz(State(service): State<LedgerService>) -> (StatusCode, Json<serde_json::Value>) {
    match service.store().ping().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "detail": e.to_string()})),
        ),
    }
}
