//! The ledger's HTTP port: liveness and readiness probes, Prometheus `/metrics`, and the Syft
//! accounting REST API when enabled (`--accounting-api`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::core::Ledger;

/// `ready` is the gRPC health state: the database answers and the ledger is not shutting down.
pub fn router(
    ledger: Ledger,
    accounting_api: bool,
    metrics_token: syft_server::Secret,
    ready: watch::Receiver<bool>,
) -> Router {
    let probes = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(ready.clone());
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .with_state((ledger.clone(), metrics_token));
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

/// Prometheus' scrape, behind `--metrics-token` when one is set: anyone who reaches the port
/// (a tenant of the accounting API, a dashboard user) would read each app's captured money.
async fn metrics(
    State((ledger, token)): State<(Ledger, syft_server::Secret)>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !token.is_empty() && !crate::auth::bears(header, token.expose()) {
        let body = Json(serde_json::json!({
            "code": "UNAUTHENTICATED",
            "detail": "metrics need the ledger's metrics token: Authorization: Bearer <token>",
        }));
        let challenge = [(axum::http::header::WWW_AUTHENTICATE, "Bearer")];
        return (StatusCode::UNAUTHORIZED, challenge, body).into_response();
    }
    crate::metrics::render(ledger.store()).await.into_response()
}
