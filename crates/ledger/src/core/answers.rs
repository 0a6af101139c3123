//! Answers stored with captures (idempotent replay, docs/ledger.md "Stored answers").

use crate::auth::Caller;
use crate::domain::TransferStatus;
use crate::error::{LedgerError, Result};
use crate::store::{AnswerRow, AnswerWrite};
use crate::validate::{self, MAX_KEY};

use super::{AnswerInput, Ledger, MAX_ANSWER_BYTES, MAX_ANSWER_RETENTION_SECONDS};

impl Ledger {
    /// Checks an answer before anything is written and fixes its expiry: a capture with an
    /// unusable answer is refused whole (nothing captured), so a router never pays out an answer
    /// it could not replay. The backend stores it with the capture (the local one in the
    /// capture's transaction); it becomes visible (through [`Ledger::answer`]) only once the
    /// transfer is COMPLETED.
    pub(super) fn answer_write(&self, answer: AnswerInput) -> Result<AnswerWrite> {
        if answer.body.len() > MAX_ANSWER_BYTES {
            return Err(LedgerError::invalid(format!(
                "answer of {} bytes is above the ledger's limit of {MAX_ANSWER_BYTES}",
                answer.body.len()
            )));
        }
        if !(1..=MAX_ANSWER_RETENTION_SECONDS).contains(&answer.retention_seconds) {
            return Err(LedgerError::invalid(format!(
                "answer retention_seconds {} must be between 1 and {MAX_ANSWER_RETENTION_SECONDS}",
                answer.retention_seconds
            )));
        }
        let expires_at = self
            .store()
            .now()
            .saturating_add(answer.retention_seconds.saturating_mul(1_000_000));
        Ok(AnswerWrite {
            body: answer.body,
            expires_at,
        })
    }

    /// The stored answer of a captured transfer of the caller (its recipient). NOT_FOUND when
    /// none was stored, it is past its retention, or the transfer is not COMPLETED.
    pub async fn answer(&self, caller: &Caller, transfer_id: &str) -> Result<AnswerRow> {
        let recipient = caller.account()?;
        let transfer_id = validate::text("transfer_id", transfer_id, MAX_KEY, true)?;
        let not_found = || LedgerError::NotFound(format!("no stored answer for {transfer_id}"));
        let transfer = self
            .backend
            .transfer(transfer_id)
            .await?
            .filter(|t| t.recipient_email == recipient.email)
            .ok_or_else(not_found)?;
        if transfer.status != TransferStatus::Completed {
            return Err(not_found());
        }
        self.store
            .answer(transfer_id, recipient.id)
            .await?
            .ok_or_else(not_found)
    }
}
