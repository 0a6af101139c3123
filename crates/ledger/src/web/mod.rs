//! The ledger's web surface beside the accounting API: the analytics JSON API
//! (`GET /v1/usage/stats`, docs/analytics.md), the alerts API (`/v1/alerts/...`,
//! docs/alerts.md) and the dashboard (`/dashboard`, [`dashboard`], docs/analytics.md), always
//! served on the HTTP port.

pub mod alerts;
pub mod dashboard;

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::core::{parse_dimensions, Ledger, StatsQuery, StatsRole, UsageDimsQuery};
use crate::error::{LedgerError, Result};
use crate::rest::{Peer, RestError};
use crate::store::TimeRange;

/// `ready` turns false when the ledger shuts down: the dashboard's live streams end then.
pub fn router(ledger: Ledger, ready: tokio::sync::watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/v1/usage/stats", get(stats))
        .with_state(ledger.clone())
        .merge(alerts::router(ledger.clone()))
        .merge(dashboard::router(ledger, ready))
}

/// Every query parameter `GET /v1/usage/stats` takes; any other is refused (a typo must not
/// silently widen an answer).
const PARAMS: [&str; 11] = [
    "group_by",
    "since",
    "until",
    "role",
    "app",
    "endpoint",
    "user",
    "model",
    "status",
    "as",
    "sums_only",
];

/// Reads the analytics query from URL parameters: `group_by=day,app`, `since`/`until` as unix
/// micros, `role=owner|user`, the filters, and `sums_only=true` (no percentiles).
pub fn stats_query(params: &HashMap<String, String>) -> Result<StatsQuery> {
    if let Some(unknown) = params.keys().find(|k| !PARAMS.contains(&k.as_str())) {
        return Err(LedgerError::invalid(format!(
            "unknown parameter {unknown:?}: use {}",
            PARAMS.join(", ")
        )));
    }
    let text = |k: &str| params.get(k).cloned().unwrap_or_default();
    let micros = |k: &str| -> Result<Option<i64>> {
        params
            .get(k)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    LedgerError::invalid(format!("{k} must be unix microseconds, not {v:?}"))
                })
            })
            .transpose()
    };
    let role = params
        .get("role")
        .or_else(|| params.get("as"))
        .map(|r| StatsRole::parse(r))
        .transpose()?
        .unwrap_or_default();
    Ok(StatsQuery {
        group_by: parse_dimensions(text("group_by").split(','))?,
        range: TimeRange {
            since: micros("since")?,
            until: micros("until")?,
        },
        role,
        dims: UsageDimsQuery {
            app_name: text("app"),
            endpoint: text("endpoint"),
            user_email: text("user"),
            model: text("model"),
            status: text("status"),
        },
        sums_only: match text("sums_only").as_str() {
            "" | "false" | "0" => false,
            "true" | "1" => true,
            other => {
                return Err(LedgerError::invalid(format!(
                    "sums_only must be true or false, not {other:?}"
                )))
            }
        },
    })
}

async fn stats(
    State(ledger): State<Ledger>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> std::result::Result<Response, RestError> {
    let caller = crate::rest::caller(&ledger, &headers, peer).await?;
    let query = stats_query(&params)?;
    let stats = ledger.usage_stats(&caller, &query).await?;
    Ok(Json(stats).into_response())
}
