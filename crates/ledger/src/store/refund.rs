//! Refunds: money a completed transfer's recipient gives back to its sender, in all at most what
//! the transfer captured (migration 0036, docs/ledger.md "Refunds").
//!
//! One transaction per refund. Its locks follow the capture batch's global order (the transfer,
//! then the accounts by id: `resolve_batch.rs`), so a refund and a batch never deadlock. The
//! transfer's row lock is what keeps two refunds of one transfer from both passing the "at most
//! what was captured" check: each sums the others' after taking it (Postgres; SQLite has one
//! writer, and a write from another process since this transaction read fails it, to be retried).
//! The transfer row itself is never changed: what it captured stays what was charged (what was
//! refunded is read from the refunds where a transfer is shown, `REFUNDED`).

use sqlx::Row;
use syft_error::Reason;

use super::analytics::{StatsFilter, StatsScope};
use super::query::Where;
use super::{
    new_id, retry_transient, Backend, Keyset, Micros, Store, TransferRow, TRANSFER_COLUMNS,
    TRANSFER_JOINS,
};
use crate::domain::{Refunder, TransferStatus};
use crate::error::{LedgerError, Result};

pub struct RefundInput<'a> {
    pub transfer_id: &'a str,
    /// `None`: the admin, any transfer; else only a transfer this account received.
    pub recipient_id: Option<i64>,
    pub amount: Micros,
    pub reason: &'a str,
    pub idempotency_key: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RefundRow {
    pub id: String,
    pub transfer_id: String,
    pub amount: Micros,
    pub reason: String,
    pub refunded_by: Refunder,
    pub idempotency_key: String,
    pub created_at: i64,
    /// The transfer's parties and currency (read with the refund).
    pub sender_email: String,
    pub recipient_email: String,
    pub currency: String,
}

/// A refund as answered: the row, its transfer, and all refunded from that transfer so far, read
/// in the refund's transaction.
#[derive(Debug, Clone)]
pub struct Refunded {
    pub refund: RefundRow,
    /// The key's refund was made before this call (nothing moved now).
    pub existing: bool,
    pub transfer: TransferRow,
    pub refunded: Micros,
}

/// The most refunds one transfer may have: its listing is one answer (a gRPC message has a
/// bounded number of entries), and a transfer refunded in a hundred parts is a mistake.
pub const MAX_REFUNDS_PER_TRANSFER: i64 = 100;

/// A refund made (or found made), or why not; the outer error is the database's (retried).
type Outcome = Result<Refunded>;

/// Written with a refund: its row, and its transfer's parties (migration 0037: read by index for
/// an account's refunds in a time range).
const REFUND_COLUMNS: &str = "id, transfer_id, amount, reason, refunded_by, idempotency_key, \
     created_at, recipient_id, sender_id";

/// `SELECT {REFUND_READ} WHERE …` reads a [`RefundRow`] with its transfer's parties.
const REFUND_READ: &str = "r.id, r.transfer_id, r.amount, r.reason, r.refunded_by, \
     r.idempotency_key, r.created_at, sa.email AS sender_email, ra.email AS recipient_email, \
     t.currency FROM refunds r JOIN transfers t ON t.id = r.transfer_id \
     JOIN accounts sa ON sa.id = t.sender_id JOIN accounts ra ON ra.id = t.recipient_id";

impl Store {
    /// Refunds `amount` of a completed transfer to its sender. The same key again (for the same
    /// amount and reason) answers the refund it made; with another amount or reason,
    /// `IDEMPOTENCY_CONFLICT`. The key is per transfer, the recipient's and the admin's alike.
    pub async fn refund(&self, input: &RefundInput<'_>) -> Result<Refunded> {
        retry_transient(|| self.try_refund(input)).await?
    }

    async fn try_refund(
        &self,
        input: &RefundInput<'_>,
    ) -> std::result::Result<Outcome, sqlx::Error> {
        let (lock_transfer, lock_accounts) = match self.backend() {
            Backend::Postgres => (" FOR UPDATE OF t", " FOR NO KEY UPDATE"),
            Backend::Sqlite => ("", ""),
        };
        let mut tx = self.pool().begin().await?;
        // Read under its lock: the answer says the transfer as it is, not as it was before a
        // capture that held the lock.
        let transfer: Option<TransferRow> = sqlx::query_as(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers t {TRANSFER_JOINS} WHERE t.id = $1\
             {lock_transfer}"
        ))
        .bind(input.transfer_id)
        .fetch_optional(&mut *tx)
        .await?;
        let t = match (transfer, input.recipient_id) {
            (Some(t), None) => t,
            (Some(t), Some(caller)) if caller == t.recipient_id => t,
            // Its sender sees the transfer (and its refunds): told why, not "not found".
            (Some(t), Some(caller)) if caller == t.sender_id => {
                return Ok(Err(LedgerError::PermissionDenied(format!(
                    "only the recipient of transfer {} (or the admin) may refund it",
                    t.id
                ))))
            }
            _ => {
                return Ok(Err(LedgerError::NotFound(format!(
                    "transfer {} not found",
                    input.transfer_id
                ))))
            }
        };
        let (count, refunded): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM refunds \
             WHERE transfer_id = $1",
        )
        .bind(&t.id)
        .fetch_one(&mut *tx)
        .await?;
        let before: Option<RefundRow> = sqlx::query_as(&format!(
            "SELECT {REFUND_READ} WHERE r.transfer_id = $1 AND r.idempotency_key = $2"
        ))
        .bind(&t.id)
        .bind(input.idempotency_key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(refund) = before {
            if refund.amount != input.amount || refund.reason != input.reason {
                return Ok(Err(LedgerError::refused(
                    Reason::IdempotencyConflict,
                    format!(
                        "idempotency key {:?} refunded {} micros of transfer {} ({:?}), not {} \
                         ({:?})",
                        input.idempotency_key,
                        refund.amount.get(),
                        t.id,
                        refund.reason,
                        input.amount.get(),
                        input.reason
                    ),
                )));
            }
            let refunded = Micros::new(refunded);
            return Ok(Ok(Refunded {
                refund,
                existing: true,
                transfer: TransferRow { refunded, ..t },
                refunded,
            }));
        }
        if t.status != TransferStatus::Completed {
            return Ok(Err(LedgerError::FailedPrecondition(format!(
                "transfer {} is {}: only a captured transfer can be refunded",
                t.id,
                t.status.as_str().to_lowercase()
            ))));
        }
        if count >= MAX_REFUNDS_PER_TRANSFER {
            return Ok(Err(LedgerError::FailedPrecondition(format!(
                "transfer {} has {count} refunds, the most one may have",
                t.id
            ))));
        }
        let captured = t.captured.get();
        let amount = input.amount.get();
        let left = captured - refunded;
        if amount > left {
            return Ok(Err(LedgerError::FailedPrecondition(format!(
                "transfer {} captured {captured} micros and {refunded} are refunded: at most \
                 {left} more can be, not {amount}",
                t.id
            ))));
        }
        // Both parties' rows, in id order as every batch takes them.
        let _: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM accounts WHERE id = $1 OR id = $2 ORDER BY id{lock_accounts}"
        ))
        .bind(t.sender_id)
        .bind(t.recipient_id)
        .fetch_all(&mut *tx)
        .await?;
        // The recipient must still have the money free (not spent, not held for its own holds).
        let debited = sqlx::query(
            "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance - held >= $1",
        )
        .bind(amount)
        .bind(t.recipient_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if debited == 0 {
            return Ok(Err(LedgerError::refused(
                Reason::InsufficientFunds,
                format!(
                    "{} has less than {amount} micros available to refund",
                    t.recipient_email
                ),
            )));
        }
        sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
            .bind(amount)
            .bind(t.sender_id)
            .execute(&mut *tx)
            .await?;
        let row = RefundRow {
            id: new_id(),
            transfer_id: t.id.clone(),
            amount: input.amount,
            reason: input.reason.to_string(),
            refunded_by: match input.recipient_id {
                Some(_) => Refunder::Recipient,
                None => Refunder::Admin,
            },
            idempotency_key: input.idempotency_key.to_string(),
            created_at: self.now(),
            sender_email: t.sender_email.clone(),
            recipient_email: t.recipient_email.clone(),
            currency: t.currency.clone(),
        };
        sqlx::query(&format!(
            "INSERT INTO refunds ({REFUND_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(&row.id)
        .bind(&row.transfer_id)
        .bind(amount)
        .bind(&row.reason)
        .bind(row.refunded_by)
        .bind(&row.idempotency_key)
        .bind(row.created_at)
        .bind(t.recipient_id)
        .bind(t.sender_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO journal (account_id, amount, kind, ref_id, created_at) \
             VALUES ($1, $2, 'refund', $3, $4), ($5, $6, 'refund', $3, $4)",
        )
        .bind(t.recipient_id)
        .bind(-amount)
        .bind(&row.id)
        .bind(row.created_at)
        .bind(t.sender_id)
        .bind(amount)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let refunded = Micros::new(refunded + amount);
        Ok(Ok(Refunded {
            refund: row,
            existing: false,
            transfer: TransferRow { refunded, ..t },
            refunded,
        }))
    }

    /// Refunds made in `[since, until)` by a statistics query's scope (an owner's as recipient,
    /// a user's as sender; of any transfer, with a usage row or not) and filters (app and user by
    /// the transfer; endpoint, model and status by its usage row): `refunded_micros`,
    /// docs/analytics.md. Refunds are few: summed from their rows, not from rollups.
    pub async fn refunded_in(&self, f: &StatsFilter) -> Result<i64> {
        // By the refund's own parties, time and amount (an index per scope, migration 0037); the
        // transfer is joined only for an app filter (20,000 refunds joined to their transfers
        // took 350 – 415 ms on Postgres, the index alone a few).
        let mut w = Where::default();
        match &f.scope {
            StatsScope::All => {}
            StatsScope::Currency(c) => w.text(
                &format!("r.recipient_id IN {}", super::analytics::OWNERS_IN),
                c,
            ),
            StatsScope::Owner(id) => w.int("r.recipient_id = ?", *id),
            StatsScope::User(email) => w.text(SENDER_IS, email),
        }
        w.int("r.created_at >= ?", f.since);
        w.int("r.created_at < ?", f.until);
        let d = &f.dims;
        for (template, value) in [
            ("t.app_name = ?".to_string(), &d.app_name),
            (SENDER_IS.to_string(), &d.user_email),
            (paid_row_says("endpoint"), &d.endpoint),
            (paid_row_says("model"), &d.model),
            (paid_row_says("status"), &d.status),
        ] {
            if let Some(v) = value {
                w.text(&template, v);
            }
        }
        let join = match d.app_name {
            Some(_) => "JOIN transfers t ON t.id = r.transfer_id",
            None => "",
        };
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(r.amount), 0) AS BIGINT) FROM refunds r {join} {}",
            w.sql()
        );
        // In the analytics' turn and time limit, as every statistics read (analytics.md).
        let _turn = self.analytics_turn(f.scope.caller()).await?;
        let rows = self.fetch_stats(&w, &sql, false).await?;
        let sum = rows.first().map(|r| r.try_get::<i64, _>(0)).transpose()?;
        Ok(sum.unwrap_or(0))
    }

    /// The refunds of a transfer, oldest first.
    pub async fn refunds_of(&self, transfer_id: &str) -> Result<Vec<RefundRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {REFUND_READ} WHERE r.transfer_id = $1 ORDER BY r.created_at, r.id"
        ))
        .bind(transfer_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Refunds of `account`'s transfers, as sender or recipient (`None`: everyone's), newest
    /// first by id (time-ordered), a page after `page.before_id`; the bool says whether there
    /// are more.
    pub async fn refunds_page(
        &self,
        account: Option<i64>,
        page: &Keyset,
    ) -> Result<(Vec<RefundRow>, bool)> {
        // Two statements, not `$1 IS NULL OR …`: a cached generic plan of that reads every refund
        // for one account's; by its parties, an account's are read by index (migration 0037).
        let whose = match account {
            Some(_) => "(r.sender_id = $1 OR r.recipient_id = $1)",
            None => "$1 IS NULL",
        };
        let mut rows: Vec<RefundRow> = sqlx::query_as(&format!(
            "SELECT {REFUND_READ} WHERE {whose} AND ($2 IS NULL OR r.id < $2) \
             ORDER BY r.id DESC LIMIT $3"
        ))
        .bind(account)
        .bind(page.before_id.as_deref())
        .bind(page.limit + 1)
        .fetch_all(self.pool())
        .await?;
        let more = rows.len() as i64 > page.limit;
        rows.truncate(page.limit as usize);
        Ok((rows, more))
    }
}

/// The refund paid back the account with this email.
const SENDER_IS: &str = "r.sender_id = (SELECT a.id FROM accounts a WHERE a.email = ?)";

/// `{column} = ?` of the transfer's usage row (its paid row: one per transfer).
fn paid_row_says(column: &str) -> String {
    format!("EXISTS (SELECT 1 FROM usage_records u WHERE u.transfer_id = r.transfer_id AND u.{column} = ?)")
}
