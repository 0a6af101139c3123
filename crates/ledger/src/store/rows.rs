//! What the store reads and returns: one `FromRow` type per kind of row, read by column name, with
//! money as [`Micros`] and statuses and actors as enums.

use crate::domain::{Actor, Micros, TransferStatus};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AccountRow {
    pub id: i64,
    pub email: String,
    pub organization: String,
    pub currency: String,
    pub balance: Micros,
    pub held: Micros,
    pub created_at: i64,
}

/// Who an account is: the facts of its row that never change (accounts are never deleted, and
/// neither their email nor their currency is ever updated). What authentication yields and the
/// secret cache holds. It has no balance on purpose: a cached balance would be stale, so code that
/// needs one reads it fresh (`Store::account_by_email`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Identity {
    pub id: i64,
    pub email: String,
    pub currency: String,
}

impl AccountRow {
    pub fn identity(&self) -> Identity {
        Identity {
            id: self.id,
            email: self.email.clone(),
            currency: self.currency.clone(),
        }
    }

    pub fn available(&self) -> Micros {
        self.balance.saturating_sub(self.held)
    }
}

/// `SELECT {ACCOUNT_COLUMNS} FROM accounts a`.
pub(crate) const ACCOUNT_COLUMNS: &str =
    "a.id, a.email, a.organization, a.currency, a.balance, a.held, a.created_at";

/// The immutable facts of a delegation token; revocation, expiry and limits are checked in the DB.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenInfo {
    pub id: String,
    pub sender_id: i64,
    pub recipient_id: i64,
    pub sender_email: String,
    pub currency: String,
    /// At most this many micros in any 24 hours (`token issue --limit-per-day`).
    pub limit_per_day: Option<i64>,
}

/// What may stop a token from paying: read when the database refused a hold, to say why.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct TokenLimits {
    pub revoked_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub spend_limit: Option<Micros>,
    pub spent: Micros,
    pub held: Micros,
}

#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub id: String,
    pub expires_at: Option<i64>,
    pub spend_limit: Option<Micros>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TransferRow {
    pub id: String,
    pub sender_id: i64,
    pub recipient_id: i64,
    pub sender_email: String,
    pub recipient_email: String,
    pub amount: Micros,
    pub captured: Micros,
    pub currency: String,
    pub status: TransferStatus,
    pub created_by: Actor,
    pub resolved_by: Option<Actor>,
    pub app_name: String,
    pub app_ep_path: String,
    pub idempotency_key: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub resolved_at: Option<i64>,
    pub cancel_reason: String,
    /// The delegation token that paid it (`None`: a hold its sender placed itself, or a hosted
    /// transfer, whose token the accounting service keeps).
    pub token_id: Option<String>,
    /// Refunded from it so far (docs/ledger.md "Refunds"): read with [`REFUNDED`] where a
    /// transfer is shown (get, list), 0 elsewhere (a hold or a capture being made has none).
    #[sqlx(default)]
    pub refunded: Micros,
}

/// `SELECT {TRANSFER_COLUMNS} FROM transfers t {TRANSFER_JOINS}` reads a [`TransferRow`].
pub(crate) const TRANSFER_COLUMNS: &str = "t.id, t.sender_id, t.recipient_id, \
     sa.email AS sender_email, ra.email AS recipient_email, t.amount, t.captured, t.currency, \
     t.status, t.created_by, t.resolved_by, t.app_name, t.app_ep_path, t.idempotency_key, \
     t.created_at, t.expires_at, t.resolved_at, t.cancel_reason, t.token_id";
/// Appended to [`TRANSFER_COLUMNS`]: the transfer's refunds in all (an index probe of
/// `refunds (transfer_id, …)`; a refund leaves the transfer's own row as it was charged).
pub(crate) const REFUNDED: &str = ", CAST(COALESCE((SELECT SUM(r.amount) FROM refunds r \
     WHERE r.transfer_id = t.id), 0) AS BIGINT) AS refunded";
pub(crate) const TRANSFER_JOINS: &str =
    "JOIN accounts sa ON sa.id = t.sender_id JOIN accounts ra ON ra.id = t.recipient_id";

impl UsageInput {
    /// The row of a transfer's request, named as the transfer is: its payer (the sender the
    /// ledger checked when it placed the hold) and its app, whatever the recording account
    /// reported. A recipient could otherwise put its charges in another user's statistics.
    pub(crate) fn of_transfer(&self, sender_email: &str, app_name: &str) -> UsageInput {
        UsageInput {
            user_email: sender_email.to_string(),
            app_name: app_name.to_string(),
            ..self.clone()
        }
    }
}

/// A usage row as written; `cost` and `transfer_id` are set by the ledger, not the caller.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, sqlx::FromRow,
)]
pub struct UsageInput {
    pub request_id: String,
    pub app_name: String,
    pub endpoint: String,
    pub user_email: String,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub status: String,
    pub latency_ms: i64,
    pub upstream_latency_ms: i64,
    /// Time to first token of a streamed request (ms); `None` for unary requests.
    #[serde(default)]
    pub ttft_ms: Option<i64>,
    /// The recorder's key for this row (empty: none): a row sent again with it is recorded once
    /// (migration 0024). Read only where a query selects it (`USAGE_COLUMNS`); the rollups'
    /// readers do without.
    #[serde(default)]
    #[sqlx(default)]
    pub row_key: String,
    /// A refusal's machine-readable reason (migration 0034); empty elsewhere. Read only where a
    /// query selects it (`USAGE_COLUMNS`).
    #[serde(default)]
    #[sqlx(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageRow {
    pub id: String,
    pub recipient_email: String,
    /// The recipient's currency, the cost's (a transfer's parties keep one currency).
    pub currency: String,
    pub transfer_id: Option<String>,
    pub cost: Micros,
    pub created_at: i64,
    #[sqlx(flatten)]
    pub usage: UsageInput,
}

/// `SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id` reads a
/// [`UsageRow`].
pub(crate) const USAGE_COLUMNS: &str = "u.id, r.email AS recipient_email, r.currency, \
     COALESCE(u.transfer_id, u.hosted_transfer_id) AS transfer_id, u.cost, u.created_at, \
     u.request_id, u.app_name, u.endpoint, u.user_email, u.model, u.prompt_tokens, \
     u.completion_tokens, u.total_tokens, u.status, u.latency_ms, u.upstream_latency_ms, u.ttft_ms, \
     COALESCE(u.row_key, '') AS row_key, u.reason";
