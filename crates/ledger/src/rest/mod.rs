//! The Syft accounting REST API (what `syft-accounting-sdk` clients speak): a thin adapter over
//! the same [`Ledger`] core as gRPC, so whatever is created through one interface is visible and
//! usable through the other under the same rules. See docs/accounting-api.md for the contract and
//! the choices made where the API is silent.

use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use syft_error::ErrorCode;

use crate::auth::Caller;
use crate::core::{HoldRequest, Ledger, PartyAction};
use crate::domain::TransferStatus;
use crate::error::{LedgerError, Result};
use crate::money::check_positive;
use crate::store::new_id;
use crate::validate::{self, MAX_KEY};

mod replies;
use replies::{
    transaction_json, transaction_reply, user_json, user_reply, RegisteredReply, TransactionsReply,
    UsersReply,
};

/// Most transactions `GET /transactions` returns (newest first) unless `limit` asks for fewer.
const DEFAULT_HISTORY: i64 = 1000;
const MAX_HISTORY: i64 = 10_000;

pub fn router(ledger: Ledger) -> Router {
    Router::new()
        .route("/user/create", post(create_user))
        .route("/user/add-balance", post(add_balance))
        .route("/user/my-info", get(my_info))
        .route("/user/update-password", put(update_password))
        .route("/user/update-organization", put(update_organization))
        .route("/user/{email}", get(get_user))
        .route("/users", get(list_users))
        .route("/token/create", post(create_token))
        .route("/transaction/create", post(create_transaction))
        .route("/transaction/confirm", post(confirm_transaction))
        .route("/transaction/cancel", post(cancel_transaction))
        .route("/transactions", get(list_transactions))
        .fallback(|| async { RestError(LedgerError::NotFound("no such endpoint".into())) })
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn(crate::web::refuse_cross_site))
        .with_state(ledger)
}

/// Keeps every error of this API JSON (`{"detail", "code"}`), also the ones axum answers before a
/// handler runs: a query or path that does not parse (400), a method the path does not take
/// (405), a body over the size limit (413). Clients parse a failed response's body as JSON, and a
/// plain-text one made the SDK fail on decoding instead of showing the API's error.
pub(crate) async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let detail = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error"),
        text => text,
    };
    let code = match status.as_u16() {
        405 | 413 | 415 => ErrorCode::InvalidArgument,
        other => ErrorCode::from_http(other),
    };
    let body = serde_json::json!({"detail": detail, "code": code.as_str()});
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// A ledger error as an HTTP response: the status of its error code and always a JSON body
/// `{"detail", "code"}` (`code` is the machine-readable reason), because clients parse the body
/// of a failed response as JSON.
pub struct RestError(pub LedgerError);

impl From<LedgerError> for RestError {
    fn from(e: LedgerError) -> Self {
        Self(e)
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let status = self.0.error_code().http();
        let message = self.0.public_message();
        let body = serde_json::json!({"detail": message, "code": self.0.kind()});
        let mut response = (status, Json(body)).into_response();
        if let LedgerError::Quota { details, .. } = &self.0 {
            if let Some(wait) = details.retry_after {
                let secs = syft_error::retry_after_secs(wait);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"syft-ledger\""),
            );
        }
        response
    }
}

type Reply = std::result::Result<Response, RestError>;

/// Serialized as it is: amounts are exact decimal text ([`units`]), which a `serde_json::Value`
/// in between would have read back as a float (`90000000000.000001` answered `90000000000.0`).
fn ok(status: StatusCode, body: impl Serialize) -> Reply {
    Ok((status, Json(body)).into_response())
}

/// Parses a JSON body with a JSON error on failure (axum's own rejection is plain text).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| LedgerError::invalid(format!("invalid JSON body: {e}")))
}

pub(crate) async fn caller(
    ledger: &Ledger,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<Caller> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| {
            v.to_str()
                .map_err(|_| LedgerError::Unauthenticated("invalid authorization header".into()))
        })
        .transpose()?;
    ledger.authenticate(header, peer).await
}

/// The client's address, as the server recorded it for the connection (`None` when the router
/// is served without it, e.g. in-process): failed authentications are counted per address.
pub(crate) struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        Ok(Self(peer(parts)))
    }
}

fn peer(parts: &Parts) -> Option<IpAddr> {
    syft_server::client_addr(&parts.extensions).map(|a| a.ip())
}

/// The authenticated caller as an extractor, so each handler starts from who is asking (the
/// same check as [`caller`]; a failure is the usual JSON error).
pub(crate) struct Authed(pub Caller);

impl FromRequestParts<Ledger> for Authed {
    type Rejection = RestError;

    async fn from_request_parts(
        parts: &mut Parts,
        ledger: &Ledger,
    ) -> std::result::Result<Self, RestError> {
        Ok(Self(caller(ledger, &parts.headers, peer(parts)).await?))
    }
}

/// The client's `Idempotency-Key` header (an extension of the API), or a fresh key.
fn idempotency_key(headers: &HeaderMap, prefix: &str) -> Result<String> {
    match headers.get("idempotency-key") {
        Some(v) => {
            let key = v
                .to_str()
                .map_err(|_| LedgerError::invalid("Idempotency-Key must be ASCII"))?;
            Ok(validate::text("Idempotency-Key", key, MAX_KEY, true)?.to_string())
        }
        None => Ok(format!("{prefix}-{}", new_id())),
    }
}

/// An amount in currency units as the API sends it: a JSON number (or a numeric string), parsed
/// from its decimal text so `0.1` is exactly 100,000 micros.
fn amount_micros(field: &str, raw: &RawValue, max: i64) -> Result<i64> {
    let text = raw.get().trim();
    let text = match serde_json::from_str::<String>(text) {
        // A numeric string must spell a JSON number, as a number would (no "+1", "2." or ".5").
        Ok(s) if is_json_number(&s) => s,
        Ok(s) => {
            return Err(LedgerError::invalid(format!(
                "{field}: {s:?} is not a decimal number"
            )))
        }
        Err(_) => text.to_string(),
    };
    let micros = syft_money::parse_decimal_micros(&text, max)
        .map_err(|e| LedgerError::invalid(format!("{field}: {e}")))?;
    check_positive(field, micros, max)
}

/// Whether `s` is, as it stands, a JSON number (read without converting it).
fn is_json_number(s: &str) -> bool {
    s.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && serde_json::from_str::<&RawValue>(s).is_ok_and(|v| v.get() == s)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateUser {
    email: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    organization: Option<String>,
}

async fn create_user(
    State(ledger): State<Ledger>,
    Peer(peer): Peer,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let req: CreateUser = body(&bytes)?;
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    ledger
        .count_signup(peer, authorization, req.password.is_some())
        .await?;
    let (account, password) = ledger
        .register(
            req.email,
            req.password,
            req.organization.unwrap_or_default(),
        )
        .await?;
    ok(
        StatusCode::CREATED,
        RegisteredReply {
            user: user_json(&account),
            password,
        },
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddBalance {
    recipient_email: String,
    amount: Box<RawValue>,
}

async fn add_balance(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    if !caller.is_admin() {
        return Err(LedgerError::PermissionDenied("admin only".into()).into());
    }
    let req: AddBalance = body(&bytes)?;
    let amount = amount_micros("amount", &req.amount, ledger.config().max_amount_micros)?;
    let key = idempotency_key(&headers, "rest-deposit")?;
    let account = ledger
        .deposit(&caller, &req.recipient_email, amount, &key)
        .await?;
    user_reply(StatusCode::OK, &account)
}

async fn get_user(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Path(email): Path<String>,
) -> Reply {
    let email = validate::email("email", &email)?;
    if !caller.may_see(&email) {
        return Err(LedgerError::PermissionDenied("admin only".into()).into());
    }
    user_reply(StatusCode::OK, &ledger.account(&caller, &email).await?)
}

/// `limit` (1 to `MAX_PAGE`, 500) or `pageToken` asks for a page, in creation order, with the next page's token
/// (`nextPageToken`, empty on the last). Without either, every account, as the SDK expects.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsersQuery {
    limit: Option<u32>,
    page_token: Option<String>,
}

async fn list_users(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Query(query): Query<UsersQuery>,
) -> Reply {
    if query.limit.is_none() && query.page_token.is_none() {
        let accounts = ledger.list_accounts(&caller).await?;
        let users: Vec<_> = accounts.iter().map(user_json).collect();
        let next_page_token = None;
        return ok(
            StatusCode::OK,
            UsersReply {
                users,
                next_page_token,
            },
        );
    }
    let limit = match query.limit {
        None => 0,
        // 0 would be the core's "default size": refused here, as `limit` has no such meaning.
        Some(n) if (1..=crate::core::MAX_PAGE).contains(&n) => n,
        Some(n) => {
            let max = crate::core::MAX_PAGE;
            return Err(
                LedgerError::invalid(format!("limit {n} must be between 1 and {max}")).into(),
            );
        }
    };
    let page = ledger
        .list_accounts_page(&caller, query.page_token.as_deref().unwrap_or(""), limit)
        .await?;
    let (users, next) = page.convert(user_json);
    ok(
        StatusCode::OK,
        UsersReply {
            users,
            next_page_token: Some(next),
        },
    )
}

async fn my_info(State(ledger): State<Ledger>, Authed(caller): Authed) -> Reply {
    user_reply(StatusCode::OK, &ledger.me(&caller).await?)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdatePassword {
    old_password: String,
    new_password: String,
}

async fn update_password(
    State(ledger): State<Ledger>,
    Peer(peer): Peer,
    Authed(caller): Authed,
    bytes: Bytes,
) -> Reply {
    let req: UpdatePassword = body(&bytes)?;
    ledger.count_guess(peer)?;
    let account = ledger
        .change_secret(&caller, &req.old_password, &req.new_password)
        .await?;
    user_reply(StatusCode::OK, &account)
}

#[derive(Deserialize)]
struct UpdateOrganization {
    organization: String,
}

async fn update_organization(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    bytes: Bytes,
) -> Reply {
    let req: UpdateOrganization = body(&bytes)?;
    let account = ledger.set_organization(&caller, &req.organization).await?;
    user_reply(StatusCode::OK, &account)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateToken {
    recipient_email: String,
}

async fn create_token(State(ledger): State<Ledger>, Authed(caller): Authed, bytes: Bytes) -> Reply {
    let req: CreateToken = body(&bytes)?;
    // Checked here to name the field as this API spells it (the core says `recipient_email`).
    let recipient_email = validate::email("recipientEmail", &req.recipient_email)?;
    let (issued, _) = ledger
        .issue_token(
            &caller,
            crate::core::NewToken {
                recipient_email,
                ..Default::default()
            },
        )
        .await?;
    ok(
        StatusCode::CREATED,
        serde_json::json!({ "token": issued.token, "tokenId": issued.id }),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateTransaction {
    sender_email: String,
    recipient_email: String,
    amount: Box<RawValue>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    app_name: Option<String>,
    #[serde(default)]
    app_ep_path: Option<String>,
    /// Optional; when given it must be the transfer's currency (the caller's, as both parties
    /// share one): a hold asked in euros was placed in dollars.
    #[serde(default)]
    currency: Option<String>,
}

/// With a token: a delegated hold created by the recipient (the caller), exactly gRPC `Authorize`.
/// Without: a hold the sender (the caller) places for the recipient.
async fn create_transaction(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let account = caller.account()?;
    let req: CreateTransaction = body(&bytes)?;
    let amount = amount_micros("amount", &req.amount, ledger.config().max_amount_micros)?;
    let sender_email = validate::email("senderEmail", &req.sender_email)?;
    let recipient_email = validate::email("recipientEmail", &req.recipient_email)?;
    let app_name = req.app_name.unwrap_or_default();
    let app_ep_path = req.app_ep_path.unwrap_or_default();
    if sender_email == recipient_email {
        return Err(LedgerError::invalid("sender and recipient must differ").into());
    }
    if let Some(currency) = &req.currency {
        if !currency.eq_ignore_ascii_case(&account.currency) {
            return Err(LedgerError::invalid(format!(
                "currency {:?}: this transaction is in {} (both parties' currency)",
                currency.chars().take(16).collect::<String>(),
                account.currency
            ))
            .into());
        }
    }
    let transfer = match req.token {
        Some(token) if !token.is_empty() => {
            if account.email != recipient_email {
                return Err(LedgerError::PermissionDenied(
                    "a delegated transaction is created by its recipient".into(),
                )
                .into());
            }
            let hold = HoldRequest {
                sender_email,
                amount,
                token,
                app_name,
                app_ep_path,
                idempotency_key: idempotency_key(&headers, "rest")?,
                attempt_id: String::new(),
                hold_ttl_seconds: None,
                // The Syft accounting REST API has no budget fields (docs/limits.md).
                budgets: Default::default(),
            };
            ledger.authorize(&caller, &hold).await?
        }
        _ => {
            if account.email != sender_email {
                return Err(LedgerError::PermissionDenied(
                    "without a token, only the sender may create a transaction".into(),
                )
                .into());
            }
            let key = idempotency_key(&headers, "rest-direct")?;
            ledger
                .send(
                    &caller,
                    &recipient_email,
                    amount,
                    &app_name,
                    &app_ep_path,
                    &key,
                )
                .await?
        }
    };
    transaction_reply(StatusCode::CREATED, &transfer)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TransactionId {
    transaction_id: String,
}

async fn party_action(
    ledger: &Ledger,
    caller: Caller,
    bytes: &Bytes,
    action: PartyAction,
) -> Reply {
    caller.account()?;
    let req: TransactionId = body(bytes)?;
    let resolved = ledger
        .resolve_as_party(&caller, &req.transaction_id, action)
        .await?;
    transaction_reply(StatusCode::OK, &resolved)
}

async fn confirm_transaction(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    bytes: Bytes,
) -> Reply {
    party_action(&ledger, caller, &bytes, PartyAction::Confirm).await
}

async fn cancel_transaction(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    bytes: Bytes,
) -> Reply {
    party_action(&ledger, caller, &bytes, PartyAction::Cancel).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryQuery {
    status: Option<String>,
    limit: Option<i64>,
    /// Not read: this listing does not page, and a token was ignored without a word (the first
    /// page came back again, as if it were the next).
    page_token: Option<String>,
}

async fn list_transactions(
    State(ledger): State<Ledger>,
    Authed(caller): Authed,
    Query(query): Query<HistoryQuery>,
) -> Reply {
    caller.account()?;
    if query.page_token.is_some() {
        return Err(LedgerError::invalid(format!(
            "GET /transactions does not page: it answers the newest {MAX_HISTORY} at most \
             (limit)"
        ))
        .into());
    }
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(other) => match other.parse::<TransferStatus>() {
            Ok(status) => Some(status),
            Err(_) => return Err(LedgerError::invalid(format!("unknown status {other:?}")).into()),
        },
    };
    let limit = match query.limit {
        None => DEFAULT_HISTORY,
        Some(n) if (1..=MAX_HISTORY).contains(&n) => n,
        Some(n) => {
            return Err(LedgerError::invalid(format!(
                "limit {n} must be between 1 and {MAX_HISTORY}"
            ))
            .into())
        }
    };
    let rows = ledger.history(&caller, status, limit).await?;
    let transactions: Vec<_> = rows.iter().map(transaction_json).collect();
    ok(StatusCode::OK, TransactionsReply { transactions })
}
