//! The dashboard's alerts panel (issue 13): the signed-in account's webhook endpoints, add and
//! remove, "send test event" and the delivery log, through the alerts calls of the ledger core
//! (`alerts/api.rs`), so the rules are those of gRPC and the CLI, in the JSON shapes of the alerts
//! REST API (`web/alerts.rs`).

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{by_id, Params};
use super::session::{ForChange, Session};
use super::{json, Dash, Reply};
use crate::alerts::{Format, NewEndpoint};
use crate::error::LedgerError;
use crate::web::alerts::{delivery_json, endpoint_json, rules_from_json};

/// `GET /dashboard/api/alerts`: the caller's endpoints (never their secrets).
pub(super) async fn list(State(d): State<Dash>, s: Session) -> Reply {
    let endpoints = d.ledger.list_alert_endpoints(&s.caller, "").await?;
    json(json!({ "endpoints": endpoints.iter().map(endpoint_json).collect::<Vec<_>>() }))
}

/// Unknown fields are refused, as the REST API's add refuses them: a misspelt one was dropped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    url: String,
    #[serde(default)]
    format: String,
    rules: Vec<Value>,
}

/// `POST /dashboard/api/alerts {"url", "format", "rules"}`: the new endpoint and its signing
/// secret, shown this once (the page displays it until reload, as the CLI prints it once).
pub(super) async fn add(State(d): State<Dash>, ForChange(s): ForChange, bytes: Bytes) -> Reply {
    let body: Add = serde_json::from_slice(&bytes)
        .map_err(|e| LedgerError::invalid(format!("invalid alert endpoint: {e}")))?;
    let req = NewEndpoint {
        url: body.url,
        format: Format::parse(&body.format)?,
        rules: rules_from_json(&body.rules)?,
        ..Default::default()
    };
    let (endpoint, secret) = d.ledger.add_alert_endpoint(&s.caller, req).await?;
    json(json!({ "endpoint": endpoint_json(&endpoint), "secret": secret }))
}

/// `POST /dashboard/api/alerts/remove {"id"}`.
pub(super) async fn remove(State(d): State<Dash>, ForChange(s): ForChange, bytes: Bytes) -> Reply {
    let id = by_id(&bytes)?;
    d.ledger.remove_alert_endpoint(&s.caller, &id).await?;
    json(json!({ "removed": id }))
}

/// `POST /dashboard/api/alerts/enable {"id"}`: an endpoint disabled after failing, back on.
pub(super) async fn enable(State(d): State<Dash>, ForChange(s): ForChange, bytes: Bytes) -> Reply {
    let id = by_id(&bytes)?;
    let endpoint = d.ledger.enable_alert_endpoint(&s.caller, &id).await?;
    json(json!({ "endpoint": endpoint_json(&endpoint) }))
}

/// `POST /dashboard/api/alerts/test {"id"}`: queues a `test` event; returns its id.
pub(super) async fn test(State(d): State<Dash>, ForChange(s): ForChange, bytes: Bytes) -> Reply {
    let id = by_id(&bytes)?;
    let event = d.ledger.send_test_alert(&s.caller, &id).await?;
    json(json!({ "event_id": event }))
}

/// `GET /dashboard/api/alerts/deliveries?id=`: the endpoint's last attempts, newest first.
pub(super) async fn deliveries(State(d): State<Dash>, params: Params, s: Session) -> Reply {
    params.only(&["id"])?;
    let id = params.get("id");
    let rows = d.ledger.alert_deliveries(&s.caller, id, 50).await?;
    let rows: Vec<Value> = rows.iter().map(delivery_json).collect();
    json(json!({ "deliveries": rows }))
}
