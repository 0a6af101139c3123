//! Paid answers kept for idempotent replay (migration 0004). The body is opaque here: the router
//! encodes what it sent. With the local backend a row is written by its capture, in the capture's
//! transaction (`batch.rs`, `transfer.rs`: no statement, round trip or commit of its own, issue
//! 16); with hosted accounting it is written just before the remote capture ([`Store::put_answer`]).
//! Either way it is served only while its transfer is COMPLETED (checked by the core), so an
//! answer is replayable exactly when it was paid for; a row whose capture failed is never served
//! and is deleted at its expiry.

use super::{retry_transient, Store};
use crate::error::Result;

/// An answer as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AnswerRow {
    pub transfer_id: String,
    pub body: Vec<u8>,
    pub expires_at: i64,
}

/// An answer to store with its capture: the body and when it may be deleted (unix micros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerWrite {
    pub body: Vec<u8>,
    pub expires_at: i64,
}

impl Store {
    /// Stores the answer of `recipient_id`'s transfer; the first one written wins. A repeated
    /// capture (an unknown outcome asked again) carries the same answer; a conflicting capture
    /// (refused by the ledger) must not replace the answer that was paid for, and a row of
    /// another recipient under the same transfer id is never touched (that capture then fails
    /// with NOT_FOUND).
    pub async fn put_answer(
        &self,
        transfer_id: &str,
        recipient_id: i64,
        body: &[u8],
        expires_at: i64,
    ) -> Result<()> {
        retry_transient(|| async {
            sqlx::query(
                "INSERT INTO answers (transfer_id, recipient_id, body, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (transfer_id) DO NOTHING",
            )
            .bind(transfer_id)
            .bind(recipient_id)
            .bind(body.to_vec())
            .bind(self.now())
            .bind(expires_at)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await
    }

    /// The answer of `recipient_id`'s transfer, unless none was stored or it expired. Whether the
    /// transfer was captured is the caller's check.
    pub async fn answer(&self, transfer_id: &str, recipient_id: i64) -> Result<Option<AnswerRow>> {
        Ok(sqlx::query_as(
            "SELECT transfer_id, body, expires_at FROM answers \
             WHERE transfer_id = $1 AND recipient_id = $2 AND expires_at > $3",
        )
        .bind(transfer_id)
        .bind(recipient_id)
        .bind(self.now())
        .fetch_optional(self.pool())
        .await?)
    }

    /// Deletes up to `limit` answers past their retention; returns how many.
    pub async fn purge_answers(&self, limit: i64) -> Result<u64> {
        // From where the last purge left nothing behind, as the expiry sweep does (`floor.rs`).
        let start = self.answer_floor.start();
        let now = self.now();
        let done = sqlx::query(
            "DELETE FROM answers WHERE transfer_id IN \
             (SELECT transfer_id FROM answers WHERE expires_at <= $1 AND expires_at >= $3 LIMIT $2)",
        )
        .bind(now)
        .bind(limit)
        .bind(start)
        .execute(self.pool())
        .await?
        .rows_affected();
        // A full page may have left expired answers anywhere after `start`.
        let left = (done >= u64::try_from(limit).unwrap_or(0)).then_some(start);
        self.answer_floor.passed(start, now, left);
        Ok(done)
    }
}
