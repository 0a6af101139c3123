//! A row of the local journal (`hosted_transfers`) as the hosted backend reads it: the step it
//! stands at, and the transfer it describes (`journal.rs` holds the statements).

use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use crate::domain::{text_enum, Actor, Micros, TransferStatus};
use crate::error::LedgerError;
use crate::store::TransferRow;

text_enum! {
    /// Where a hosted transfer stands locally (`hosted_transfers.step`); each step is written
    /// before the remote call it leads to.
    pub(super) enum Step {
        /// The remote create is under way.
        Creating = "creating",
        /// The remote hold exists; nobody is resolving it.
        Held = "held",
        /// A driver is capturing (confirm, or charge + cancel for a partial capture).
        Capturing = "capturing",
        /// A driver is cancelling the remote hold (and any charge transaction).
        Voiding = "voiding",
        /// Resolved; `status` says how.
        Done = "done",
        /// The remote service refused the create: nothing is held.
        Failed = "failed",
        /// The create's outcome is unknown; recovery cancels a remote hold if one appears.
        Unknown = "unknown",
    }
}

/// What a remote transaction turned out to be after a confirm or cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Completed,
    Cancelled,
}

/// One row of `hosted_transfers`.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub id: String,
    pub idempotency_key: String,
    pub request_hash: String,
    pub sender_email: String,
    pub recipient_email: String,
    pub token: String,
    pub amount: Micros,
    pub captured: Micros,
    pub currency: String,
    pub status: TransferStatus,
    pub step: Step,
    pub remote_id: Option<String>,
    pub capture_amount: Option<Micros>,
    pub capture_remote_id: Option<String>,
    pub hold_released: bool,
    pub app_name: String,
    pub app_ep_path: String,
    pub resolved_by: Option<Actor>,
    pub cancel_reason: String,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub lease: i64,
    pub resolved_at: Option<i64>,
    /// The attempt that placed the hold (migration 0031); `None`: none named.
    pub attempt_id: Option<String>,
}

pub(super) const COLUMNS: &str =
    "id, idempotency_key, request_hash, sender_email, recipient_email, token, \
    amount, captured, currency, status, step, remote_id, capture_amount, capture_remote_id, \
    CAST(CASE WHEN hold_released THEN 1 ELSE 0 END AS BIGINT) AS hold_released, \
    app_name, app_ep_path, resolved_by, cancel_reason, error_kind, error_message, created_at, \
    expires_at, updated_at, resolved_at, attempt_id";

/// By column name; `hold_released` is read as an integer because SQLite returns booleans as
/// integers, which the `Any` driver will not decode as `bool`.
impl FromRow<'_, AnyRow> for Entry {
    fn from_row(r: &AnyRow) -> sqlx::Result<Self> {
        Ok(Entry {
            id: r.try_get("id")?,
            idempotency_key: r.try_get("idempotency_key")?,
            request_hash: r.try_get("request_hash")?,
            sender_email: r.try_get("sender_email")?,
            recipient_email: r.try_get("recipient_email")?,
            token: r.try_get("token")?,
            amount: r.try_get("amount")?,
            captured: r.try_get("captured")?,
            currency: r.try_get("currency")?,
            status: r.try_get("status")?,
            step: r.try_get("step")?,
            remote_id: r.try_get("remote_id")?,
            capture_amount: r.try_get("capture_amount")?,
            capture_remote_id: r.try_get("capture_remote_id")?,
            hold_released: r.try_get::<i64, _>("hold_released")? != 0,
            app_name: r.try_get("app_name")?,
            app_ep_path: r.try_get("app_ep_path")?,
            resolved_by: r.try_get("resolved_by")?,
            cancel_reason: r.try_get("cancel_reason")?,
            error_kind: r.try_get("error_kind")?,
            error_message: r.try_get("error_message")?,
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
            lease: r.try_get("updated_at")?,
            resolved_at: r.try_get("resolved_at")?,
            attempt_id: r.try_get("attempt_id")?,
        })
    }
}

impl Entry {
    pub fn transfer(&self) -> TransferRow {
        TransferRow {
            id: self.id.clone(),
            sender_id: 0,
            recipient_id: 0,
            sender_email: self.sender_email.clone(),
            recipient_email: self.recipient_email.clone(),
            amount: self.amount,
            captured: self.captured,
            currency: self.currency.clone(),
            status: self.status,
            created_by: Actor::Recipient,
            resolved_by: self.resolved_by.filter(|_| self.resolved_at.is_some()),
            app_name: self.app_name.clone(),
            app_ep_path: self.app_ep_path.clone(),
            idempotency_key: self.idempotency_key.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            resolved_at: self.resolved_at,
            cancel_reason: self.cancel_reason.clone(),
            token_id: None,
            refunded: Micros::ZERO,
        }
    }

    /// The error an authorization that never held money answered, for a replay of its key.
    pub fn recorded_error(&self) -> LedgerError {
        LedgerError::from_kind(
            self.error_kind.as_deref().unwrap_or("UNAVAILABLE"),
            self.error_message.clone().unwrap_or_default(),
        )
    }
}
