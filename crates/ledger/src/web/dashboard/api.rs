//! The dashboard's JSON reads (and the token revoke button): each one the ledger core's call with
//! the session's caller, so an account sees exactly what the gRPC and analytics APIs show it.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::session::{has_cookie, session, ForChange, Session};
use super::{json, Dash, Reply};
use crate::auth::Caller;
use crate::core::{Page, PageRequest, Role, TokenQuery, TransferQuery};
use crate::domain::TransferStatus;
use crate::error::{LedgerError, Result};
use crate::store::{now_micros, TokenRow, TransferRow, UsageRow};

/// `GET /dashboard/api/me`: who is signed in, their money (freshly read) and the CSRF token the
/// page sends back on changes (the cookie itself is out of the page's reach).
/// Without any cookie it answers `{"signed_in": false}` (the page's first question, which must not
/// log an error in the browser); a bad or expired cookie is 401 like everywhere else.
pub(super) async fn me(State(d): State<Dash>, headers: HeaderMap) -> Reply {
    if !has_cookie(&headers) {
        return json(json!({ "signed_in": false }));
    }
    let s = session(&d, &headers).await?;
    match &s.caller {
        Caller::Admin => json(json!({
            "signed_in": true,
            "admin": true,
            "email": "",
            "currency": d.ledger.config().currency,
            "csrf": s.csrf,
        })),
        Caller::Account(_) => {
            let a = d.ledger.me(&s.caller).await?;
            json(json!({
                "signed_in": true,
                "admin": false,
                "alerts": alerts_on(&d),
                "email": a.email,
                "currency": a.currency,
                "balance_micros": a.balance.get(),
                "held_micros": a.held.get(),
                "available_micros": a.available().get(),
                "csrf": s.csrf,
            }))
        }
    }
}

/// Whether the alerts panel can work here (the same conditions `alerts/api.rs` checks).
fn alerts_on(d: &Dash) -> bool {
    let config = d.ledger.config();
    config.alerts.key.is_some() && config.hosted.is_none()
}

/// `GET /dashboard/api/stats`: the analytics API (`GET /v1/usage/stats`, same parameters).
pub(super) async fn stats(State(d): State<Dash>, params: Params, s: Session) -> Reply {
    let query = crate::web::stats_query(&params.0)?;
    let stats = d.ledger.usage_stats(&s.caller, &query).await?;
    json(serde_json::to_value(stats).map_err(|e| LedgerError::Internal(e.to_string()))?)
}

/// A handler's query string (`?key=value&...`); a missing key reads as empty.
pub(super) struct Params(pub HashMap<String, String>);

impl FromRequestParts<Dash> for Params {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, d: &Dash) -> Result<Self, Response> {
        let Query(map) = Query::from_request_parts(parts, d)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self(map))
    }
}

impl Params {
    /// Refuses a parameter the handler does not read: a filter the caller believed applied (say
    /// `user=` on the usage rows) must not silently answer every row.
    pub(super) fn only(&self, known: &[&str]) -> Result<&Self> {
        let mut unknown: Vec<&str> = self
            .0
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        unknown.sort_unstable();
        match unknown.first() {
            None => Ok(self),
            Some(k) => Err(LedgerError::invalid(format!(
                "unknown parameter {k:?}: use {}",
                known.join(", ")
            ))),
        }
    }

    pub(super) fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or_default()
    }

    fn page_size(&self) -> Result<u32> {
        match self.get("page_size") {
            "" => Ok(0),
            n => n.parse().map_err(|_| {
                LedgerError::invalid(format!("page_size must be a number, not {n:?}"))
            }),
        }
    }

    /// `role`: `sender`, `recipient`, or both sides when absent.
    fn role(&self) -> Result<Role> {
        match self.get("role") {
            "" => Ok(Role::Any),
            "sender" => Ok(Role::Sender),
            "recipient" => Ok(Role::Recipient),
            other => Err(LedgerError::invalid(format!(
                "unknown role {other:?}: use sender or recipient"
            ))),
        }
    }

    /// `page_token` and `page_size`.
    fn page(&self) -> Result<PageRequest> {
        Ok(PageRequest::new(
            self.get("page_token").to_string(),
            self.page_size()?,
        ))
    }

    fn micros(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            "" => Ok(None),
            v => v.parse().map(Some).map_err(|_| {
                LedgerError::invalid(format!("{key} must be unix microseconds, not {v:?}"))
            }),
        }
    }
}

pub(crate) fn transfer_json(t: &TransferRow) -> Value {
    json!({
        "id": t.id,
        "sender_email": t.sender_email,
        "recipient_email": t.recipient_email,
        "amount_micros": t.amount.get(),
        "captured_micros": t.captured.get(),
        "refunded_micros": t.refunded.get(),
        "currency": t.currency,
        "status": t.status.as_str(),
        "app_name": t.app_name,
        "endpoint": t.app_ep_path,
        "created_at": t.created_at,
        "resolved_at": t.resolved_at,
        "token_id": t.token_id,
    })
}

pub(crate) fn usage_json(u: &UsageRow) -> Value {
    json!({
        "id": u.id,
        "request_id": u.usage.request_id,
        "created_at": u.created_at,
        "owner_email": u.recipient_email,
        "app_name": u.usage.app_name,
        "endpoint": u.usage.endpoint,
        "user_email": u.usage.user_email,
        "model": u.usage.model,
        "status": u.usage.status,
        "reason": u.usage.reason,
        "total_tokens": u.usage.total_tokens,
        "latency_ms": u.usage.latency_ms,
        "cost_micros": u.cost.get(),
        "currency": u.currency,
    })
}

fn token_json(t: &TokenRow) -> Value {
    json!({
        "id": t.id,
        "sender_email": t.sender_email,
        "recipient_email": t.recipient_email,
        "currency": t.currency,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "spend_limit_micros": t.spend_limit.map(|m| m.get()),
        // Any 24 hours (the page showed "none" for a token with only this limit).
        "limit_per_day_micros": t.limit_per_day,
        "held_micros": t.held.get(),
        "spent_micros": t.spent.get(),
        "revoked_at": t.revoked_at,
    })
}

/// `GET /dashboard/api/transfers?status=&role=sender|recipient&page_token=`: newest first.
pub(super) async fn transfers(State(d): State<Dash>, params: Params, s: Session) -> Reply {
    params.only(&["status", "role", "page_token", "page_size"])?;
    let status = match params.get("status") {
        "" => None,
        text => Some(text.parse::<TransferStatus>().map_err(|_| {
            LedgerError::invalid(format!(
                "unknown status {text:?}: use PENDING, COMPLETED or CANCELLED"
            ))
        })?),
    };
    let q = TransferQuery {
        role: params.role()?,
        status,
        page: params.page()?,
        ..Default::default()
    };
    let page = d.ledger.list_transfers(&s.caller, &q).await?;
    page_json("transfers", page, transfer_json)
}

/// `GET /dashboard/api/usage?since=&page_size=`: the newest usage rows the caller may see
/// (default: of the last 24 hours), by the id range the live tail reads too.
pub(super) async fn usage(State(d): State<Dash>, params: Params, s: Session) -> Reply {
    params.only(&["since", "page_size"])?;
    let since = params
        .micros("since")?
        .unwrap_or_else(|| now_micros() - 86_400_000_000);
    let rows = d
        .ledger
        .usage_since(&s.caller, since, params.page_size()?)
        .await?;
    json(json!({ "rows": rows.iter().map(usage_json).collect::<Vec<_>>() }))
}

/// `GET /dashboard/api/tokens?role=`: tokens the caller issued (`sender`), received
/// (`recipient`) or both, revoked and expired too.
pub(super) async fn tokens(State(d): State<Dash>, params: Params, s: Session) -> Reply {
    params.only(&["role", "page_token", "page_size"])?;
    let q = TokenQuery {
        role: params.role()?,
        include_inactive: true,
        page: params.page()?,
        ..Default::default()
    };
    let page = d.ledger.list_tokens(&s.caller, &q).await?;
    page_json("tokens", page, token_json)
}

/// A page as the dashboard reads it: its items under `key`, and `next_page_token`.
fn page_json<T>(key: &str, page: Page<Vec<T>>, item: impl FnMut(&T) -> Value) -> Reply {
    let (items, next_page_token) = page.convert(item);
    json(json!({ key: items, "next_page_token": next_page_token }))
}

#[derive(Deserialize)]
pub(super) struct ById {
    pub id: String,
}

pub(super) fn by_id(bytes: &Bytes) -> Result<String> {
    serde_json::from_slice::<ById>(bytes)
        .map(|b| b.id)
        .map_err(|e| LedgerError::invalid(format!("invalid JSON body: {e}")))
}

/// `POST /dashboard/api/tokens/revoke {"id"}`: by its sender, its recipient or the admin (as `RevokeToken`).
pub(super) async fn revoke_token(
    State(d): State<Dash>,
    ForChange(s): ForChange,
    bytes: Bytes,
) -> Reply {
    let id = by_id(&bytes)?;
    let (revoked, _) = d.ledger.revoke_token(&s.caller, &id).await?;
    json(json!({ "revoked": revoked }))
}
