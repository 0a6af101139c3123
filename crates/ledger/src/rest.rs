//! The Syft accounting REST API (what `syft-accounting-sdk` clients speak), served over the same
//! store and the same rules as gRPC: every handler goes through [`LedgerService`]'s methods or the
//! store calls they use. See docs/accounting-api.md for the contract and the choices made where the
//! API is silent.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use syft_proto::ledger as pb;

use crate::auth::{authenticate, constant_time_eq, Caller};
use crate::domain::{Actor, TransferStatus};
use crate::error::{LedgerError, Result};
use crate::money::{check_positive, format_micros};
use crate::service::LedgerService;
use crate::store::{
    new_id, sha256_hex, AccountRow, CaptureAmount, DirectInput, Resolution, ResolveInput,
    TransferFilter, TransferRow,
};
use crate::validate::{self, MAX_KEY, MAX_NAME, MAX_PATH};

/// Most transactions `GET /transactions` returns (newest first) unless `limit` asks for fewer.
const DEFAULT_HISTORY: i64 = 1000;
const MAX_HISTORY: i64 = 10_000;

pub fn router(service: LedgerService) -> Router {
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
        .with_state(service)
}

/// A ledger error as an HTTP response: status per DESIGN.md §6 and always a JSON body, because
/// clients parse the body of a failed response as JSON.
pub struct RestError(pub LedgerError);

impl From<LedgerError> for RestError {
    fn from(e: LedgerError) -> Self {
        Self(e)
    }
}

pub fn http_status(err: &LedgerError) -> StatusCode {
    match err {
        LedgerError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        LedgerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        LedgerError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        LedgerError::FailedPrecondition(_) | LedgerError::AlreadyExists(_) => StatusCode::CONFLICT,
        LedgerError::NotFound(_) => StatusCode::NOT_FOUND,
        LedgerError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        LedgerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        LedgerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let status = http_status(&self.0);
        let message = match &self.0 {
            LedgerError::Internal(detail) => {
                tracing::error!(error = %detail, "internal ledger error (REST)");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({"detail": message, "code": self.0.kind()});
        let mut response = (status, Json(body)).into_response();
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

fn ok(status: StatusCode, body: serde_json::Value) -> Reply {
    Ok((status, Json(body)).into_response())
}

/// Parses a JSON body with a JSON error on failure (axum's own rejection is plain text).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| LedgerError::invalid(format!("invalid JSON body: {e}")))
}

async fn caller(service: &LedgerService, headers: &HeaderMap) -> Result<Caller> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| {
            v.to_str()
                .map_err(|_| LedgerError::Unauthenticated("invalid authorization header".into()))
        })
        .transpose()?;
    authenticate(service.store(), &service.config().admin_key, header).await
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
        Ok(s) => s,
        Err(_) => text.to_string(),
    };
    let micros = syft_money::parse_decimal_micros(&text, max)
        .map_err(|e| LedgerError::invalid(format!("{field}: {e}")))?;
    check_positive(field, micros, max)
}

/// Currency units as an exact JSON number (`12.5`, not `12.500000000000002`).
fn units(micros: i64) -> Box<RawValue> {
    RawValue::from_string(format_micros(micros))
        .unwrap_or_else(|_| RawValue::from_string("0".into()).expect("literal zero is valid JSON"))
}

fn iso(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserJson {
    id: String,
    email: String,
    /// What the account can spend now: its balance minus pending holds.
    balance: Box<RawValue>,
    organization: String,
    currency: String,
    held: Box<RawValue>,
}

fn user_json(a: &AccountRow) -> UserJson {
    UserJson {
        id: a.id.to_string(),
        email: a.email.clone(),
        balance: units(a.available().get().max(0)),
        organization: a.organization.clone(),
        currency: a.currency.clone(),
        held: units(a.held.get()),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TransactionJson {
    id: String,
    sender_email: String,
    recipient_email: String,
    created_by: String,
    resolved_by: Option<String>,
    /// The held amount, or once completed the amount that moved.
    amount: Box<RawValue>,
    status: String,
    created_at: String,
    resolved_at: Option<String>,
    app_name: Option<String>,
    app_ep_path: Option<String>,
    currency: String,
    expires_at: String,
}

fn transaction_json(t: &TransferRow) -> TransactionJson {
    let amount = if t.status == TransferStatus::Completed {
        t.captured.get()
    } else {
        t.amount.get()
    };
    TransactionJson {
        id: t.id.clone(),
        sender_email: t.sender_email.clone(),
        recipient_email: t.recipient_email.clone(),
        created_by: t.created_by.to_string(),
        resolved_by: t.resolved_by.map(|a| a.to_string()),
        amount: units(amount),
        status: t.status.to_string(),
        created_at: iso(t.created_at),
        resolved_at: t.resolved_at.map(iso),
        app_name: (!t.app_name.is_empty()).then(|| t.app_name.clone()),
        app_ep_path: (!t.app_ep_path.is_empty()).then(|| t.app_ep_path.clone()),
        currency: t.currency.clone(),
        expires_at: iso(t.expires_at),
    }
}

fn user_reply(status: StatusCode, a: &AccountRow) -> Reply {
    ok(status, serde_json::json!({ "user": user_json(a) }))
}

fn transaction_reply(status: StatusCode, t: &TransferRow) -> Reply {
    ok(
        status,
        serde_json::json!({ "transaction": transaction_json(t) }),
    )
}

fn check_password(field: &str, password: &str) -> Result<()> {
    if password.len() < 8 || password.len() > 256 || password.chars().any(char::is_control) {
        return Err(LedgerError::invalid(format!(
            "{field} must be 8 to 256 printable characters"
        )));
    }
    Ok(())
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

/// Open registration, as in the hosted service: a new account starts with nothing, so creating one
/// needs no credentials.
async fn create_user(State(service): State<LedgerService>, bytes: Bytes) -> Reply {
    let req: CreateUser = body(&bytes)?;
    if let Some(p) = &req.password {
        check_password("password", p)?;
    }
    let created = service
        .create_account(
            &Caller::Admin,
            pb::CreateAccountRequest {
                email: req.email,
                organization: req.organization.unwrap_or_default(),
                secret: req.password,
                currency: None,
            },
        )
        .await?;
    let email = created.account.map(|a| a.email).unwrap_or_default();
    let account = service.account(&email).await?;
    ok(
        StatusCode::CREATED,
        serde_json::json!({ "user": user_json(&account), "password": created.secret }),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddBalance {
    recipient_email: String,
    amount: Box<RawValue>,
}

async fn add_balance(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let caller = caller(&service, &headers).await?;
    LedgerService::require_admin(&caller)?;
    let req: AddBalance = body(&bytes)?;
    let amount = amount_micros("amount", &req.amount, service.config().max_amount_micros)?;
    let account = service
        .deposit(
            &caller,
            pb::DepositRequest {
                email: req.recipient_email,
                amount_micros: amount,
                idempotency_key: idempotency_key(&headers, "rest-deposit")?,
            },
        )
        .await?;
    user_reply(StatusCode::OK, &account)
}

async fn get_user(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    Path(email): Path<String>,
) -> Reply {
    let caller = caller(&service, &headers).await?;
    let email = validate::email("email", &email)?;
    if !caller.may_see(&email) {
        return Err(LedgerError::PermissionDenied("admin only".into()).into());
    }
    user_reply(StatusCode::OK, &service.account(&email).await?)
}

async fn list_users(State(service): State<LedgerService>, headers: HeaderMap) -> Reply {
    let caller = caller(&service, &headers).await?;
    LedgerService::require_admin(&caller)?;
    let accounts = service.store().list_accounts().await?;
    let users: Vec<_> = accounts.iter().map(user_json).collect();
    ok(StatusCode::OK, serde_json::json!({ "users": users }))
}

/// The caller's account, freshly read (the authenticated row may come from a cache).
async fn me(service: &LedgerService, headers: &HeaderMap) -> Result<AccountRow> {
    let caller = caller(service, headers).await?;
    let email = caller.account()?.email.clone();
    service.account(&email).await
}

async fn my_info(State(service): State<LedgerService>, headers: HeaderMap) -> Reply {
    user_reply(StatusCode::OK, &me(&service, &headers).await?)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdatePassword {
    old_password: String,
    new_password: String,
}

async fn update_password(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let account = me(&service, &headers).await?;
    let req: UpdatePassword = body(&bytes)?;
    check_password("newPassword", &req.new_password)?;
    let (_, stored) = service
        .store()
        .secret_hash_of(&account.email)
        .await?
        .ok_or_else(|| LedgerError::NotFound("account not found".into()))?;
    if !constant_time_eq(stored.as_bytes(), sha256_hex(&req.old_password).as_bytes()) {
        return Err(LedgerError::PermissionDenied(
            "oldPassword is not the current password".into(),
        )
        .into());
    }
    service
        .store()
        .update_secret_hash(account.id, &sha256_hex(&req.new_password))
        .await?;
    tracing::info!(account = %account.email, "password changed");
    user_reply(StatusCode::OK, &account)
}

#[derive(Deserialize)]
struct UpdateOrganization {
    organization: String,
}

async fn update_organization(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let account = me(&service, &headers).await?;
    let req: UpdateOrganization = body(&bytes)?;
    let organization = validate::text("organization", &req.organization, MAX_NAME, false)?;
    service
        .store()
        .update_organization(account.id, organization)
        .await?;
    user_reply(StatusCode::OK, &service.account(&account.email).await?)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateToken {
    recipient_email: String,
}

async fn create_token(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let caller = caller(&service, &headers).await?;
    let req: CreateToken = body(&bytes)?;
    let issued = service
        .issue_token(
            &caller,
            pb::IssueTokenRequest {
                recipient_email: req.recipient_email,
                expires_at_unix_micros: None,
                spend_limit_micros: None,
            },
        )
        .await?;
    ok(
        StatusCode::CREATED,
        serde_json::json!({ "token": issued.token, "tokenId": issued.token_id }),
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
}

/// With a token: a delegated hold created by the recipient (the caller), exactly gRPC `Authorize`.
/// Without: a hold the sender (the caller) places for the recipient.
async fn create_transaction(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let caller = caller(&service, &headers).await?;
    let account = caller.account()?;
    let req: CreateTransaction = body(&bytes)?;
    let max = service.config().max_amount_micros;
    let amount = amount_micros("amount", &req.amount, max)?;
    let sender_email = validate::email("senderEmail", &req.sender_email)?;
    let recipient_email = validate::email("recipientEmail", &req.recipient_email)?;
    let app_name = req.app_name.unwrap_or_default();
    let app_ep_path = req.app_ep_path.unwrap_or_default();
    let app_name = validate::text("appName", &app_name, MAX_NAME, false)?;
    let app_ep_path = validate::text("appEpPath", &app_ep_path, MAX_PATH, false)?;
    if sender_email == recipient_email {
        return Err(LedgerError::invalid("sender and recipient must differ").into());
    }
    let transfer = match req.token {
        Some(token) if !token.is_empty() => {
            if account.email != recipient_email {
                return Err(LedgerError::PermissionDenied(
                    "a delegated transaction is created by its recipient".into(),
                )
                .into());
            }
            service
                .authorize(
                    &caller,
                    pb::AuthorizeRequest {
                        sender_email,
                        amount_micros: amount,
                        token,
                        app_name: app_name.to_string(),
                        app_ep_path: app_ep_path.to_string(),
                        idempotency_key: idempotency_key(&headers, "rest")?,
                        hold_ttl_seconds: None,
                    },
                )
                .await?
        }
        _ => {
            if account.email != sender_email {
                return Err(LedgerError::PermissionDenied(
                    "without a token, only the sender may create a transaction".into(),
                )
                .into());
            }
            let recipient = service.account(&recipient_email).await?;
            if recipient.currency != account.currency {
                return Err(LedgerError::FailedPrecondition(format!(
                    "currencies differ: {} pays in {}, {} is paid in {}",
                    account.email, account.currency, recipient.email, recipient.currency
                ))
                .into());
            }
            let started = crate::metrics::now();
            let transfer = service
                .store()
                .authorize_direct(&DirectInput {
                    sender_id: account.id,
                    recipient_id: recipient.id,
                    amount,
                    app_name,
                    app_ep_path,
                    ttl_micros: service.config().hold_ttl.as_micros() as i64,
                    idempotency_key: &idempotency_key(&headers, "rest-direct")?,
                })
                .await?;
            crate::metrics::authorized(&transfer, started);
            transfer
        }
    };
    transaction_reply(StatusCode::CREATED, &transfer)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TransactionId {
    transaction_id: String,
}

/// The authenticated account and the transfer named in the body, if the account is a party to
/// it (otherwise the transfer does not exist for it).
async fn party_transfer(
    service: &LedgerService,
    headers: &HeaderMap,
    bytes: &Bytes,
) -> Result<(String, TransferRow)> {
    let caller = caller(service, headers).await?;
    let email = caller.account()?.email.clone();
    let req: TransactionId = body(bytes)?;
    let id = validate::text("transactionId", &req.transaction_id, MAX_KEY, true)?;
    service
        .store()
        .transfer_by_id(id)
        .await?
        .filter(|t| t.sender_email == email || t.recipient_email == email)
        .map(|t| (email, t))
        .ok_or_else(|| LedgerError::NotFound(format!("transaction {id} not found")))
}

/// The party that created a transaction confirms it: the recipient a delegated one, the sender a
/// direct one.
async fn confirm_transaction(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let (email, transfer) = party_transfer(&service, &headers, &bytes).await?;
    let by_sender = transfer.created_by == Actor::Sender;
    let creator = if by_sender {
        &transfer.sender_email
    } else {
        &transfer.recipient_email
    };
    if &email != creator {
        return Err(LedgerError::PermissionDenied(format!(
            "only the party that created transaction {} may confirm it",
            transfer.id
        ))
        .into());
    }
    resolve(
        &service,
        &transfer,
        Resolution::Capture(CaptureAmount::Full),
        by_sender,
    )
    .await
}

/// The recipient may always cancel (it gives up the money); the sender only a direct transfer it
/// created itself, never a hold a service placed for work it is doing.
async fn cancel_transaction(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    let (email, transfer) = party_transfer(&service, &headers, &bytes).await?;
    let by_sender = email == transfer.sender_email;
    if by_sender && transfer.created_by != Actor::Sender {
        return Err(LedgerError::PermissionDenied(format!(
            "transaction {} was created by its recipient; only the recipient may cancel it",
            transfer.id
        ))
        .into());
    }
    let reason = if by_sender {
        "cancelled by sender"
    } else {
        "cancelled by recipient"
    };
    let reason = reason.to_string();
    resolve(&service, &transfer, Resolution::Void { reason }, by_sender).await
}

/// Resolves a transfer the caller was found entitled to resolve, counting it in the metrics.
async fn resolve(
    service: &LedgerService,
    transfer: &TransferRow,
    resolution: Resolution,
    by_sender: bool,
) -> Reply {
    let started = crate::metrics::now();
    let resolved = service
        .store()
        .resolve(&ResolveInput {
            transfer_id: &transfer.id,
            recipient_id: Some(transfer.recipient_id),
            resolution,
            usage: None,
            by_sender,
        })
        .await?;
    crate::metrics::resolved(&resolved, started);
    transaction_reply(StatusCode::OK, &resolved)
}

#[derive(Deserialize)]
struct HistoryQuery {
    status: Option<String>,
    limit: Option<i64>,
}

async fn list_transactions(
    State(service): State<LedgerService>,
    headers: HeaderMap,
    Query(query): Query<HistoryQuery>,
) -> Reply {
    let caller = caller(&service, &headers).await?;
    let account = caller.account()?;
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
    let (rows, _) = service
        .store()
        .list_transfers(&TransferFilter {
            account_id: Some(account.id),
            status,
            limit,
            ..Default::default()
        })
        .await?;
    let transactions: Vec<_> = rows.iter().map(transaction_json).collect();
    ok(
        StatusCode::OK,
        serde_json::json!({ "transactions": transactions }),
    )
}
