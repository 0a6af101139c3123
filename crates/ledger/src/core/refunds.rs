//! Refunds (docs/ledger.md, "Refunds"): who may give back what a transfer captured, and who may
//! see it. The money moves in the store (`store/refund.rs`).

use crate::auth::Caller;
use crate::domain::Micros;
use crate::error::Result;
use crate::money::check_positive;
use crate::store::{RefundInput, RefundRow, Refunded};
use crate::validate::{self, MAX_KEY, MAX_REASON};

use super::{keyset_page, Ledger, Page, PageRequest};

/// Which refunds to list: a transfer's, or (empty id) the caller's, a page at a time.
#[derive(Debug, Clone, Default)]
pub struct RefundQuery {
    pub transfer_id: String,
    pub page: PageRequest,
}

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

    /// A transfer's refunds, oldest first, for whoever may see the transfer (one page); without
    /// a transfer, the caller's refunds as sender or recipient (the admin's: all), newest first.
    pub async fn refunds(&self, caller: &Caller, q: &RefundQuery) -> Result<Page<Vec<RefundRow>>> {
        if q.transfer_id.is_empty() {
            let account = match caller {
                Caller::Admin => None,
                Caller::Account(a) => Some(a.id),
            };
            let (rows, more) = self
                .backend
                .refunds_page(account, &q.page.keyset()?)
                .await?;
            return Ok(keyset_page(rows, more, |r| r.id.clone()));
        }
        let transfer = self.transfer(caller, &q.transfer_id).await?;
        Ok(Page {
            items: self.backend.refunds_of(&transfer.id).await?,
            next_page_token: String::new(),
        })
    }
}
