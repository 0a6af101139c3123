//! Extending a pending hold's life (a router keeping the hold of a long stream alive).

use super::{retry_transient, Actor, Backend, Store, TransferRow, TransferStatus, UNRESOLVED};
use crate::error::{LedgerError, Result};
use syft_error::Reason;

impl Store {
    /// Moves the expiry of `recipient_id`'s pending, unexpired hold to `now + ttl_micros`, never
    /// earlier than it was and never past `created_at + max_life_micros`. Idempotent (asking again
    /// only moves the expiry forward); refused with `TRANSFER_NOT_PENDING` once the transfer is
    /// resolved and `HOLD_EXPIRED` once it has expired (then it can only be swept). "Expired" is
    /// judged by the database's clock too, read after the row's lock (`Backend::clock_micros_sql`).
    pub async fn extend_hold(
        &self,
        transfer_id: &str,
        recipient_id: i64,
        ttl_micros: i64,
        max_life_micros: i64,
    ) -> Result<TransferRow> {
        let now = self.now();
        let wanted = now.saturating_add(ttl_micros);
        // Judged by the database's clock once the row is locked (`Backend::clock_micros_sql`).
        // Postgres evaluates an UPDATE's conditions before it waits for the row, and does not
        // evaluate them again when the holder of the lock rolled back: the row is locked first.
        // On Postgres the sender's account row is locked too, after the transfer's (the global
        // order: transfers, tokens, accounts) and before the clock is read. A budget check
        // (`budget_batch.rs`) locks the sender, then counts a pending hold past its expiry as 0;
        // an extension that locked only the hold could read its clock before that check and
        // commit after it, reviving a hold the check had freed the amount of, so the budget or
        // the token's limit per 24 hours was exceeded by it. Now the two take turns: an extension
        // after the check reads a clock past the expiry and is refused; a check after the
        // extension sees the new expiry. (The sender's row suffices: every check that counts a
        // hold's expiry locks it; the token's row would only add a wait on a hot row.) SQLite
        // has one writer, and the clock is read after its write lock.
        let clock = self.backend().clock_micros_sql();
        let (lock, row, clock) = match self.backend() {
            Backend::Postgres => (
                "WITH l AS (SELECT id, sender_id FROM transfers WHERE id = $1 FOR UPDATE), \
                 s AS (SELECT id FROM accounts WHERE id = (SELECT sender_id FROM l) \
                 FOR NO KEY UPDATE) ",
                "(SELECT id FROM l)",
                format!("(SELECT {clock} WHERE (SELECT COUNT(*) FROM s) >= 0)"),
            ),
            Backend::Sqlite => ("", "$1", clock.to_string()),
        };
        let sql = format!(
            "{lock}UPDATE transfers SET expires_at = CASE \
                WHEN $3 > created_at + $4 THEN \
                    CASE WHEN created_at + $4 > expires_at THEN created_at + $4 ELSE expires_at END \
                WHEN $3 > expires_at THEN $3 ELSE expires_at END \
             WHERE id = {row} AND recipient_id = $2 AND {UNRESOLVED} AND expires_at > $5 \
               AND created_by = 'RECIPIENT' AND expires_at > {clock}"
        );
        let updated = retry_transient(|| async {
            sqlx::query(&sql)
                .bind(transfer_id)
                .bind(recipient_id)
                .bind(wanted)
                .bind(max_life_micros)
                .bind(now)
                .execute(self.pool())
                .await
                .map(|r| r.rows_affected())
        })
        .await?;
        let row = self
            .transfer_by_id(transfer_id)
            .await?
            .filter(|t| t.recipient_id == recipient_id)
            .ok_or_else(|| LedgerError::NotFound(format!("transfer {transfer_id} not found")))?;
        // Extended, and still pending when read back: a capture or void that committed in
        // between makes the answer its refusal, as the contract says for a resolved transfer
        // (it was OK with the resolved transfer).
        if updated == 1 && row.status == TransferStatus::Pending {
            return Ok(row);
        }
        // A direct transfer is the sender's to confirm: its recipient cannot keep it pending.
        if row.created_by != Actor::Recipient {
            return Err(LedgerError::PermissionDenied(format!(
                "transfer {transfer_id} was created by its sender; only a hold its recipient \
                 placed can be extended"
            )));
        }
        // Still pending here is expired; cancelled by the sweep at expiry is expired too.
        let reason = match row.status {
            TransferStatus::Pending => Reason::HoldExpired,
            TransferStatus::Cancelled => {
                super::cancelled_reason(&row.cancel_reason, row.resolved_by)
            }
            TransferStatus::Completed => Reason::TransferNotPending,
        };
        Err(match reason {
            Reason::HoldExpired => LedgerError::refused(
                reason,
                format!("hold {transfer_id} expired, it can no longer be extended"),
            ),
            _ => LedgerError::refused(
                reason,
                format!(
                    "transfer {transfer_id} is {}, only a pending hold can be extended",
                    row.status.as_str().to_lowercase()
                ),
            ),
        })
    }
}
