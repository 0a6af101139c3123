//! Refunds (docs/ledger.md, "Refunds"): who may give back what a transfer captured, and who may
//! see it. The money moves in the store (`store/refund.rs`).

use crate::auth::Caller;
use crate::domain::Micros;
use crate::error::Result;
use crate::money::check_positive;
use crate::store::{RefundInput, RefundRow, Refunded};
use crate::validate::{self, MAX_KEY, MAX_REASON};

use super::Ledger;

/// A refund asked for, not yet validated.
#[derive(Debug, Clone, Default)]
pub struct RefundRequest {
    pub transfer_id: String,
    pub amount: i64,
    pub reason: String,
    pub idempotency_key: String,
}

impl Ledger {
    /// Refunds part or all of a completed transfer to its sender. Its recipient may (the money
    /// is taken from it), and the admin; anyone else is told the transfer is not found, as for
    /// an unknown one.
    pub async fn refund(&self, caller: &Caller, req: &RefundRequest) -> Result<Refunded> {
        let recipient_id = match caller {
            Caller::Admin => None,
            Caller::Account(a) => Some(a.id),
        };
        let input = RefundInput {
            transfer_id: validate::text("transfer_id", &req.transfer_id, MAX_KEY, true)?,
            recipient_id,
            amount: Micros::new(check_positive(
                "amount_micros",
                req.amount,
                self.config().max_amount_micros,
            )?),
            reason: validate::text("reason", &req.reason, MAX_REASON, false)?,
            idempotency_key: validate::idempotency_key(&req.idempotency_key)?,
        };
        self.backend.refund(&input).await
    }

    /// A transfer's refunds, oldest first, for whoever may see the transfer.
    pub async fn refunds(&self, caller: &Caller, transfer_id: &str) -> Result<Vec<RefundRow>> {
        let transfer = self.transfer(caller, transfer_id).await?;
        self.backend.refunds_of(&transfer.id).await
    }
}
