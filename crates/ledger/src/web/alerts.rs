//! The alerts REST API on the ledger's HTTP port (docs/alerts.md, "REST API"): the same core calls
//! as gRPC `syft.ledger.v1.Alerts` (`alerts/api.rs`), so both refuse the same inputs with the same
//! error codes. JSON in and out; `Authorization: Bearer <secret or admin key>` (or Basic), like
//! the rest of the ledger's HTTP API. Errors are `{"detail", "code"}` with the code's HTTP status.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::alerts::{AlertEndpoint, Delivery, EventKind, Format, NewEndpoint, Rule};
use crate::core::Ledger;
use crate::error::{LedgerError, Result};
use crate::rest::{Authed, RestError};

type Reply = std::result::Result<Response, RestError>;

/// A rotation's overlap when the body names none: the CLI's default.
const DEFAULT_OVERLAP_SECONDS: u64 = 86_400;

pub fn router(ledger: Ledger) -> Router {
    Router::new()
        .route("/v1/alerts/endpoints", get(list).post(add))
        .route("/v1/alerts/endpoints/{id}", delete(remove))
        .route("/v1/alerts/endpoints/{id}/enable", post(enable))
        .route("/v1/alerts/endpoints/{id}/rotate", post(rotate))
        .route("/v1/alerts/endpoints/{id}/test", post(send_test))
        .route("/v1/alerts/endpoints/{id}/deliveries", get(deliveries))
        .with_state(ledger)
}

fn reply(status: StatusCode, body: Value) -> Reply {
    Ok((status, Json(body)).into_response())
}

/// A JSON body, refused with a JSON error (axum's own rejection is plain text).
fn parse_body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T> {
    if bytes.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| LedgerError::invalid(format!("a JSON body is required: {e}")));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| LedgerError::invalid(format!("invalid JSON body: {e}")))
}

/// Query parameters, refusing any not in `known` (a typo must not be silently ignored).
fn params<'a>(
    query: &'a HashMap<String, String>,
    known: &[&str],
) -> Result<impl Fn(&str) -> Option<&'a str>> {
    if let Some(unknown) = query.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(LedgerError::invalid(format!(
            "unknown parameter {unknown:?}; this call takes {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    Ok(move |k: &str| query.get(k).map(String::as_str))
}

/// A rule from its documented JSON shape, with errors that name the rule and the field (serde's
/// own messages about internally tagged enums are not ones a user can act on).
pub fn rule_from_json(index: usize, value: &Value) -> Result<Rule> {
    let at = |msg: String| LedgerError::invalid(format!("rules[{index}]: {msg}"));
    let event = value
        .get("event")
        .ok_or_else(|| at("needs an \"event\"".into()))?
        .as_str()
        .ok_or_else(|| at("\"event\" must be a string".into()))?;
    let kind = EventKind::parse(event).map_err(|e| at(e.to_string()))?;
    if matches!(kind, EventKind::EndpointDisabled | EventKind::Test) {
        return Err(at(format!(
            "{event} is sent by the ledger itself, not chosen by a rule"
        )));
    }
    let rule: Rule =
        serde_json::from_value(value.clone()).map_err(|e| at(format!("{event}: {e}")))?;
    // Refuse fields the event does not take (a misspelt threshold must not be dropped).
    let known = serde_json::to_value(&rule).map_err(|e| LedgerError::Internal(e.to_string()))?;
    if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
        if let Some(extra) = given.keys().find(|k| !known.contains_key(*k)) {
            let fields: Vec<_> = known.keys().filter(|k| *k != "event").cloned().collect();
            return Err(at(format!(
                "{event} has no field {extra:?}; it takes {}",
                fields.join(", ")
            )));
        }
    }
    Ok(rule)
}

/// Every rule of a request, each by [`rule_from_json`].
pub fn rules_from_json(values: &[Value]) -> Result<Vec<Rule>> {
    values
        .iter()
        .enumerate()
        .map(|(i, r)| rule_from_json(i, r))
        .collect()
}

pub fn endpoint_json(e: &AlertEndpoint) -> Value {
    json!({
        "id": e.id,
        "account_email": e.account_email,
        "url": e.url,
        "format": e.format.as_str(),
        "rules": e.rules,
        "rate_per_minute": e.rate_per_minute,
        "disabled": e.disabled_at.is_some(),
        "failing_since_unix_micros": e.failing_since,
        "disabled_at_unix_micros": e.disabled_at,
        "previous_secret_until_unix_micros": e.previous_secret_until,
        "pending_events": e.pending_events,
        "created_at_unix_micros": e.created_at,
    })
}

pub fn delivery_json(d: &Delivery) -> Value {
    json!({
        "event_id": d.event_id,
        "event_type": d.kind,
        "attempt": d.attempt,
        "worker": d.worker,
        "started_at_unix_micros": d.started_at,
        "latency_ms": d.latency_ms,
        "status_code": d.status_code,
        "outcome": d.outcome,
        "error": d.error,
        "next_attempt_at_unix_micros": d.next_attempt_at,
    })
}

async fn list(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    let get = params(&query, &["account"])?;
    let endpoints = ledger
        .list_alert_endpoints(&caller, get("account").unwrap_or_default())
        .await?;
    let endpoints: Vec<_> = endpoints.iter().map(endpoint_json).collect();
    reply(StatusCode::OK, json!({ "endpoints": endpoints }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    url: String,
    #[serde(default)]
    format: String,
    rules: Vec<Value>,
    /// Signed, so a negative cap is refused by name rather than as a JSON type error.
    #[serde(default)]
    rate_per_minute: Option<i64>,
    #[serde(default)]
    account_email: String,
}

async fn add(State(ledger): State<Ledger>, Authed(caller): Authed, bytes: Bytes) -> Reply {
    let body: AddBody = parse_body(&bytes)?;
    let new = NewEndpoint {
        account_email: body.account_email,
        url: body.url,
        format: Format::parse(&body.format)?,
        rules: rules_from_json(&body.rules)?,
        rate_per_minute: body
            .rate_per_minute
            .map(|r| {
                u32::try_from(r).map_err(|_| {
                    LedgerError::invalid(format!("rate_per_minute {r} must be between 1 and 600"))
                })
            })
            .transpose()?,
    };
    let (endpoint, secret) = ledger.add_alert_endpoint(&caller, new).await?;
    reply(
        StatusCode::CREATED,
        json!({ "endpoint": endpoint_json(&endpoint), "secret": secret }),
    )
}

async fn remove(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Reply {
    ledger.remove_alert_endpoint(&caller, &id).await?;
    reply(StatusCode::OK, json!({ "removed": id }))
}

async fn enable(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Reply {
    let endpoint = ledger.enable_alert_endpoint(&caller, &id).await?;
    reply(
        StatusCode::OK,
        json!({ "endpoint": endpoint_json(&endpoint) }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    overlap_seconds: Option<u64>,
}

async fn rotate(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Reply {
    let body: RotateBody = parse_body(&bytes)?;
    let overlap = Duration::from_secs(body.overlap_seconds.unwrap_or(DEFAULT_OVERLAP_SECONDS));
    let (secret, until) = ledger.rotate_alert_secret(&caller, &id, overlap).await?;
    reply(
        StatusCode::OK,
        json!({ "secret": secret, "previous_secret_until_unix_micros": until }),
    )
}

async fn send_test(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Reply {
    let event_id = ledger.send_test_alert(&caller, &id).await?;
    // Queued, not yet delivered: the delivery log shows what happens to it.
    reply(StatusCode::ACCEPTED, json!({ "event_id": event_id }))
}

async fn deliveries(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    let get = params(&query, &["limit"])?;
    // 0 means "the default" over gRPC (an unset field); here it is a number out of range.
    let limit = match get("limit") {
        None | Some("") => 0,
        Some(text) => text.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
            LedgerError::invalid(format!(
                "limit must be a whole number from 1 to 500, not {text:?}"
            ))
        })?,
    };
    let log = ledger.alert_deliveries(&caller, &id, limit).await?;
    let log: Vec<_> = log.iter().map(delivery_json).collect();
    reply(StatusCode::OK, json!({ "deliveries": log }))
}
