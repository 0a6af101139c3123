//! HTTP client for a remote service speaking the Syft accounting REST API, as the router owner.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::{Actor, TransferStatus};
use crate::error::LedgerError;
use crate::money::format_micros;
use syft_error::{ErrorCode, Reason};

/// How a remote call failed; the difference decides whether a retry is safe.
#[derive(Debug)]
pub enum RemoteError {
    /// The service answered with an error: nothing happened there. `reason`: the body's `code`,
    /// when it is a reason this ledger knows (`INSUFFICIENT_FUNDS`, `IDEMPOTENCY_CONFLICT`, …;
    /// a ledger of this code answers one), which says more than the status.
    Rejected {
        status: StatusCode,
        message: String,
        reason: Option<Reason>,
    },
    /// The request never reached the service (connection refused, DNS): nothing happened there.
    Unreachable(String),
    /// Timeout, 5xx or a broken answer: the operation may or may not have happened.
    Unknown(String),
}

impl RemoteError {
    /// The ledger error a caller sees (docs/design.md, "Errors"), with the remote's message.
    pub fn into_ledger(self) -> LedgerError {
        match self {
            RemoteError::Rejected {
                status,
                message,
                reason,
            } => {
                let message = format!("accounting service: {message}");
                match reason {
                    // The service throttles this ledger (its address, its rate): this ledger's
                    // own state, not the caller's, and a router told so would blame its own
                    // address. Its caller retries.
                    Some(Reason::AuthLocked | Reason::RateLimited) => {
                        return LedgerError::Unavailable(format!("{message}; retry"));
                    }
                    // The remote's reason, passed on as it is: a router tells its user
                    // "insufficient funds" or "token revoked" by it (a bare status used to reach
                    // it as FAILED_PRECONDITION without one). Not for 401: this ledger's own.
                    Some(reason) if status != StatusCode::UNAUTHORIZED => {
                        return LedgerError::refused(reason, message);
                    }
                    _ => {}
                }
                match ErrorCode::from_http(status.as_u16()) {
                    // Without a code, a 402 can only be the payer's funds (hosted.md): said so,
                    // so a router tells its user "insufficient funds" (it was a reason in no
                    // table, `LEDGER_REJECTED`, with the service's text).
                    _ if status == StatusCode::PAYMENT_REQUIRED => {
                        LedgerError::refused(Reason::InsufficientFunds, message)
                    }
                    // A proxy's request timeout: nothing ran there, and a retry may pass (it was
                    // a final refusal, `x-should-retry: false`).
                    _ if status == StatusCode::REQUEST_TIMEOUT => {
                        LedgerError::Unavailable(format!("{message}; retry"))
                    }
                    // The remote refused this ledger's own credentials: a deployment problem,
                    // not the caller's.
                    ErrorCode::Unauthenticated => LedgerError::Unavailable(
                        "the accounting service rejected this ledger's credentials \
                         (SYFT_ACCOUNTING_EMAIL / SYFT_ACCOUNTING_PASSWORD)"
                            .into(),
                    ),
                    // Any other answered refusal: nothing happened there; the state refuses it.
                    ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::Cancelled => {
                        LedgerError::FailedPrecondition(message)
                    }
                    code => LedgerError::with_code(code, message),
                }
            }
            RemoteError::Unreachable(m) | RemoteError::Unknown(m) => {
                LedgerError::Unavailable(format!("accounting service unavailable: {m}"))
            }
        }
    }

    /// A refusal that the hold itself may cause when a second transaction is created beside it:
    /// the funds (409, 402), the token's spend limit (403) or its daily limit (429), all of which
    /// count what the hold reserves. Not the service throttling this ledger (429 with
    /// `AUTH_LOCKED` or `RATE_LIMITED`): releasing the hold for that, then meeting the same
    /// throttle, gave a delivered answer away.
    pub fn may_be_the_hold(&self) -> bool {
        self.refuses_the_payer()
            || matches!(self, RemoteError::Rejected { status, reason, .. }
                if *status == StatusCode::TOO_MANY_REQUESTS && !throttles_this_ledger(*reason))
    }

    /// A refusal that says the payer cannot pay (funds, the token's limits, a revoked or expired
    /// token): the only one that may close a capture whose hold is already released. Anything
    /// else (this ledger throttled, its credentials, the service's own trouble) may pass on a
    /// retry, which the capture's journal row allows.
    pub fn refuses_the_payer(&self) -> bool {
        let RemoteError::Rejected { status, reason, .. } = self else {
            return false;
        };
        match reason {
            Some(
                Reason::InsufficientFunds
                | Reason::TokenLimitExceeded
                | Reason::TokenDailyLimitExceeded
                | Reason::TokenRevoked
                | Reason::TokenExpired,
            ) => true,
            Some(r) if throttles_this_ledger(Some(*r)) => false,
            _ => [
                StatusCode::CONFLICT,
                StatusCode::PAYMENT_REQUIRED,
                StatusCode::FORBIDDEN,
            ]
            .contains(status),
        }
    }
}

/// The service's reason says it throttles this ledger (its address, its rate), not the payer.
fn throttles_this_ledger(reason: Option<Reason>) -> bool {
    matches!(reason, Some(Reason::AuthLocked | Reason::RateLimited))
}

/// A remote transaction, amounts converted exactly to micros.
#[derive(Debug, Clone)]
pub struct RemoteTx {
    pub id: String,
    pub sender_email: String,
    pub recipient_email: String,
    /// `None`: the service did not say, or said something this ledger does not know.
    pub created_by: Option<Actor>,
    /// `None`: a status this ledger does not know, treated as not resolved.
    pub status: Option<TransferStatus>,
    pub amount: i64,
    pub created_at: Option<i64>,
    /// `None`: the service did not say (the Syft API's transactions need not).
    pub currency: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TxJson {
    id: String,
    sender_email: String,
    recipient_email: String,
    #[serde(default)]
    created_by: String,
    status: String,
    amount: Box<RawValue>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    currency: serde_json::Value,
}

impl TxJson {
    fn into_tx(self) -> Result<RemoteTx, RemoteError> {
        Ok(RemoteTx {
            amount: units_to_micros(&self.amount)?,
            created_at: self.created_at.as_deref().and_then(parse_time),
            id: self.id,
            sender_email: self.sender_email.to_ascii_lowercase(),
            recipient_email: self.recipient_email.to_ascii_lowercase(),
            created_by: self.created_by.parse().ok(),
            status: self.status.parse().ok(),
            currency: named(&self.currency),
        })
    }
}

#[derive(Deserialize)]
struct TxAnswer {
    transaction: TxJson,
}

/// Each transaction is read on its own, so that one this ledger cannot read is left out alone.
#[derive(Deserialize)]
struct TxListAnswer {
    transactions: Vec<Box<RawValue>>,
}

#[derive(Deserialize)]
struct UserAnswer {
    user: UserJson,
}

/// Only the balance must be readable; a name field of another type is taken as missing, as the
/// service's other fields are not this ledger's concern.
#[derive(Deserialize)]
struct UserJson {
    #[serde(default)]
    email: serde_json::Value,
    #[serde(default)]
    organization: serde_json::Value,
    #[serde(default)]
    currency: serde_json::Value,
    balance: Box<RawValue>,
}

/// The remote's user record.
#[derive(Debug, Clone)]
pub struct RemoteUser {
    pub email: String,
    pub organization: String,
    pub balance: i64,
    /// `None`: the service did not say.
    pub currency: Option<String>,
}

/// A currency the service names (a non-empty string), upper-cased; `None` otherwise.
fn named(currency: &serde_json::Value) -> Option<String> {
    let code = currency.as_str()?.trim();
    (!code.is_empty()).then(|| code.to_ascii_uppercase())
}

fn units_to_micros(raw: &RawValue) -> Result<i64, RemoteError> {
    let text = raw.get().trim().trim_matches('"');
    syft_money::parse_decimal_micros(text, i64::MAX).map_err(|e| {
        RemoteError::Unknown(format!(
            "unreadable amount from the accounting service: {e}"
        ))
    })
}

/// ISO-8601 with or without an offset (naive times are taken as UTC).
fn parse_time(text: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_micros());
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_micros())
}

#[derive(Clone)]
pub struct RemoteClient {
    http: reqwest::Client,
    base: String,
    email: String,
    password: String,
}

impl RemoteClient {
    pub fn new(
        base: &str,
        email: &str,
        password: &str,
        timeout: Duration,
    ) -> Result<Self, LedgerError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| LedgerError::Internal(format!("http client: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            email: email.to_string(),
            password: password.to_string(),
        })
    }

    /// Sends one request and reads its answer straight into `T`. Amounts are read from the
    /// answer's own text (`RawValue`): through a `serde_json::Value` they became `f64`s first,
    /// exact only below 2^53 micros.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        idempotency_key: Option<&str>,
    ) -> Result<T, RemoteError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.email, Some(&self.password));
        let mut trace = reqwest::header::HeaderMap::new();
        syft_telemetry::inject_http(&mut trace);
        request = request.headers(trace);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                RemoteError::Unreachable(e.to_string())
            } else {
                RemoteError::Unknown(e.to_string())
            }
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| RemoteError::Unknown(format!("reading the answer: {e}")))?;
        if status.is_server_error() {
            return Err(RemoteError::Unknown(format!(
                "{status}: {}",
                error_body(&text).0
            )));
        }
        if !status.is_success() {
            let (message, reason) = error_body(&text);
            return Err(RemoteError::Rejected {
                status,
                message,
                reason,
            });
        }
        serde_json::from_str(&text)
            .map_err(|e| RemoteError::Unknown(format!("unreadable answer: {e}")))
    }

    /// A `{transaction}` answer.
    async fn transaction(
        &self,
        path: &str,
        body: String,
        idempotency_key: Option<&str>,
    ) -> Result<RemoteTx, RemoteError> {
        let answer: TxAnswer = self
            .call(Method::POST, path, Some(body), idempotency_key)
            .await?;
        answer.transaction.into_tx()
    }

    /// A delegated transaction created by the owner (the recipient). `idempotency_key` is sent as
    /// a header: a service that honours it makes retries safe, one that ignores it is still
    /// handled (see `Hosted::sweep_orphans`).
    pub async fn create(
        &self,
        sender_email: &str,
        amount: i64,
        token: &str,
        app_name: &str,
        app_ep_path: &str,
        idempotency_key: &str,
    ) -> Result<RemoteTx, RemoteError> {
        let body = format!(
            r#"{{"senderEmail":{},"recipientEmail":{},"amount":{},"token":{},"appName":{},"appEpPath":{}}}"#,
            json_str(sender_email),
            json_str(&self.email),
            format_micros(amount),
            json_str(token),
            json_opt(app_name),
            json_opt(app_ep_path),
        );
        self.transaction("/transaction/create", body, Some(idempotency_key))
            .await
    }

    pub async fn confirm(&self, id: &str) -> Result<RemoteTx, RemoteError> {
        let body = serde_json::json!({ "transactionId": id }).to_string();
        self.transaction("/transaction/confirm", body, None).await
    }

    pub async fn cancel(&self, id: &str) -> Result<RemoteTx, RemoteError> {
        let body = serde_json::json!({ "transactionId": id }).to_string();
        self.transaction("/transaction/cancel", body, None).await
    }

    /// The owner's transactions. `status` and `limit` are understood by this ledger's own REST API;
    /// other services may ignore them, so callers filter the answer themselves.
    pub async fn transactions(&self, status: Option<&str>) -> Result<Vec<RemoteTx>, RemoteError> {
        let path = match status {
            Some(s) => format!("/transactions?status={s}&limit=10000"),
            None => "/transactions?limit=10000".into(),
        };
        let answer: TxListAnswer = self.call(Method::GET, &path, None, None).await?;
        let items = answer.transactions;
        // One transaction this ledger cannot read (an amount with more than six decimals, a
        // field missing) is left out, not the whole list: the callers only act on transactions
        // they find (reconciling one id, cancelling orphans), so a missing one means "not known",
        // which both already handle, while failing would stall reconciliation for good.
        let read = |item: Box<RawValue>| -> Result<RemoteTx, RemoteError> {
            serde_json::from_str::<TxJson>(item.get())
                .map_err(|e| RemoteError::Unknown(format!("unreadable transaction: {e}")))?
                .into_tx()
        };
        Ok(items
            .into_iter()
            .filter_map(|item| {
                read(item)
                    .inspect_err(
                        |e| tracing::warn!(error = ?e, "transaction left out of the listing"),
                    )
                    .ok()
            })
            .collect())
    }

    pub async fn my_info(&self) -> Result<RemoteUser, RemoteError> {
        let answer: UserAnswer = self.call(Method::GET, "/user/my-info", None, None).await?;
        let user = answer.user;
        Ok(RemoteUser {
            email: user.email.as_str().unwrap_or(&self.email).to_string(),
            organization: user.organization.as_str().unwrap_or_default().to_string(),
            balance: units_to_micros(&user.balance)?,
            currency: named(&user.currency),
        })
    }
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn json_opt(s: &str) -> String {
    if s.is_empty() {
        "null".into()
    } else {
        json_str(s)
    }
}

/// The message of an error body (FastAPI's `detail`, or `message` / `error`, or the raw text) and
/// the reason of its `code` (this API's `{"detail", "code"}`), if this ledger knows it.
fn error_body(text: &str) -> (String, Option<Reason>) {
    let json = serde_json::from_str::<serde_json::Value>(text).ok();
    let reason = json
        .as_ref()
        .and_then(|v| v.get("code")?.as_str()?.parse().ok());
    let from_json = json.and_then(|v| {
        ["detail", "message", "error"]
            .iter()
            .find_map(|k| match v.get(*k) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(other) if !other.is_null() => Some(other.to_string()),
                _ => None,
            })
    });
    let mut message = from_json.unwrap_or_else(|| text.trim().to_string());
    if message.chars().count() > 300 {
        message = message.chars().take(300).collect();
    }
    if message.is_empty() {
        message = "no details".into();
    }
    (message, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2^53 + 1 micros, the first amount an `f64` cannot hold (it reads 2^53).
    const BIG: &str = "9007199254.740993";

    /// An accounting service (not this ledger, whose amounts stop at 10^12 micros) that answers
    /// with amounts past 2^53 micros: they are read to the micro. Through a `serde_json::Value`
    /// both came back one micro short.
    #[tokio::test]
    async fn amounts_past_two_to_the_53_micros_are_exact() {
        let user = format!(r#"{{"user": {{"email": 7, "balance": {BIG}, "organization": null}}}}"#);
        let txs = format!(
            r#"{{"transactions": [{{"id": "t1", "senderEmail": "a@x.io", "recipientEmail": "o@x.io",
                 "status": "COMPLETED", "amount": {BIG}}}]}}"#
        );
        let app = axum::Router::new()
            .route(
                "/user/my-info",
                axum::routing::get(move || async move { user }),
            )
            .route(
                "/transactions",
                axum::routing::get(move || async move { txs }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = RemoteClient::new(
            &format!("http://{addr}"),
            "o@x.io",
            "pw",
            Duration::from_secs(5),
        )
        .expect("client");
        let me = client.my_info().await.expect("my info");
        assert_eq!(me.balance, (1 << 53) + 1);
        assert_eq!(
            (me.email.as_str(), me.organization.as_str()),
            ("o@x.io", "")
        );
        let txs = client.transactions(None).await.expect("transactions");
        assert_eq!(txs.len(), 1);
        assert_eq!(txs[0].amount, (1 << 53) + 1);
    }
}
