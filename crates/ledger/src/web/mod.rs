//! The ledger's web surface beside the accounting API: the analytics JSON API
//! (`GET /v1/usage/stats`, docs/analytics.md), the alerts API (`/v1/alerts/...`,
//! docs/alerts.md) and the dashboard (`/dashboard`, [`dashboard`], docs/analytics.md), always
//! served on the HTTP port.

pub mod alerts;
pub mod dashboard;

use std::collections::HashMap;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::core::{parse_dimensions, Ledger, StatsQuery, StatsRole, UsageDimsQuery};
use crate::error::{LedgerError, Result};
use crate::rest::{Peer, RestError};
use crate::store::{TimeRange, TopBy};

/// `ready` turns false when the ledger shuts down: the dashboard's live streams end then.
pub fn router(ledger: Ledger, ready: tokio::sync::watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/v1/usage/stats", get(stats))
        .with_state(ledger.clone())
        .merge(alerts::router(ledger.clone()))
        // axum's own refusals (a body over the limit, a method the path does not take, a query
        // that does not parse) in these APIs' JSON too, as the accounting API's: the alerts API
        // answered a 9.6 MB body in plain text.
        .layer(axum::middleware::map_response(crate::rest::json_errors))
        .layer(axum::middleware::from_fn(refuse_cross_site))
        .merge(dashboard::router(ledger, ready))
}

/// The APIs (`/v1/...`, the accounting API) are for programs: SDKs, curl and routers send no
/// `Origin` and no `Sec-Fetch-Site`. A browser does, and a page of another site can make a
/// browser call these APIs with credentials it keeps for this host (Basic ones saved at the
/// prompt a 401 brings up) and a JSON body posted as a `text/plain` form. So a request a browser
/// marks as sent from another site is refused before authentication: no prompt, nothing done.
/// (The dashboard has its own, stricter check: `Origin` required, and a CSRF token.)
pub(crate) async fn refuse_cross_site(req: Request, next: Next) -> Response {
    let site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok());
    let why = match site {
        Some(s) if s.eq_ignore_ascii_case("cross-site") || s.eq_ignore_ascii_case("same-site") => {
            Some("Sec-Fetch-Site is another site")
        }
        _ if req.headers().contains_key(header::ORIGIN) => {
            foreign_origin(req.headers(), req.uri().authority().map(|a| a.as_str()))
        }
        _ => None,
    };
    match why {
        Some(why) => RestError(LedgerError::PermissionDenied(format!(
            "cross-site browser request refused: {why}"
        )))
        .into_response(),
        None => next.run(req).await,
    }
}

/// Why the request's `Origin` is not the host it was sent to (`Host`, or the URI's authority
/// under HTTP/2), if it is not; a missing `Origin` is the caller's to judge.
pub(crate) fn foreign_origin(headers: &HeaderMap, authority: Option<&str>) -> Option<&'static str> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let origin = text(header::ORIGIN)?;
    let Some(host) = text(header::HOST).or(authority) else {
        return Some("no Host header");
    };
    let Some(origin_host) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return Some("Origin is not http(s)");
    };
    (!origin_host.eq_ignore_ascii_case(host)).then_some("Origin is another site")
}

/// Every query parameter `GET /v1/usage/stats` takes; any other is refused (a typo must not
/// silently widen an answer).
const PARAMS: [&str; 13] = [
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
    "top",
    "top_by",
];

/// Reads the analytics query from URL parameters: `group_by=day,app`, `since`/`until` as unix
/// micros, `role=owner|user`, the filters, `sums_only=true` (no percentiles), and `top=10` with
/// `top_by=revenue|requests` (only the largest groups).
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
        range: TimeRange::new(micros("since")?, micros("until")?),
        role,
        dims: UsageDimsQuery {
            app_name: text("app"),
            endpoint: text("endpoint"),
            user_email: text("user"),
            model: text("model"),
            status: text("status"),
        },
        top: match text("top").as_str() {
            "" => 0,
            n => n
                .parse()
                .map_err(|_| LedgerError::invalid(format!("top must be a number, not {n:?}")))?,
        },
        top_by: match text("top_by").as_str() {
            "" => None,
            by => Some(TopBy::parse(by)?),
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
