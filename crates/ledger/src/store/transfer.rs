//! Phase two of a two-phase transfer: capture or void, and the expiry sweep.
//! (Phase one, the hold, is `authorize.rs`.)
//!
//! Each transition is one atomic unit. On Postgres the hot operations go through the batcher
//! (`batch.rs`: set-based statements, one transaction per batch); on SQLite they are short
//! transactions on the single connection. Both paths are covered by the same store test suite.
//!
//! A capture debits the sender and credits the recipient in its own transaction, with the pair of
//! journal rows that records it (the journal is append-only). On Postgres captures are batched, so
//! a busy recipient's row is updated once per batch, not once per capture (`batch.rs`).

use super::batch::{ResolveJob, TimeGuard};
use super::usage::{insert_usage, UsageLink, UsageWrite};
use super::AnswerWrite;
use super::{
    new_id_at, retry_transient, Actor, Backend, Micros, Store, TransferRow, TransferStatus,
    UsageInput, REFUNDED, TRANSFER_COLUMNS, TRANSFER_JOINS, UNRESOLVED,
};
use crate::error::{LedgerError, Result};
use syft_error::{ErrorCode, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureAmount {
    Full,
    Micros(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Capture(CaptureAmount),
    Void { reason: String },
}

pub struct ResolveInput<'a> {
    pub transfer_id: &'a str,
    /// `None` for the ledger itself (expiry sweep), which may resolve any transfer.
    pub recipient_id: Option<i64>,
    pub resolution: Resolution,
    pub usage: Option<&'a UsageInput>,
    /// The sender resolves its own direct transfer (REST compat API); `recipient_id` must then
    /// be the transfer's recipient, checked by the caller.
    pub by_sender: bool,
}

pub(crate) const CANCEL_EXPIRED: &str = "hold expired";

/// Why a cancelled transfer cannot be captured: `HOLD_EXPIRED` for a hold its sweep cancelled at
/// expiry, as before the sweep came (a client branching on it saw it for a second at most, then
/// `TRANSFER_NOT_PENDING`, as for a hold a party voided), `TRANSFER_NOT_PENDING` otherwise.
pub(crate) fn cancelled_reason(cancel_reason: &str, resolved_by: Option<Actor>) -> Reason {
    if resolved_by == Some(Actor::System) && cancel_reason == CANCEL_EXPIRED {
        Reason::HoldExpired
    } else {
        Reason::TransferNotPending
    }
}

/// A capture is made by the party that created the transfer: the recipient captures the holds it
/// placed with the sender's token, and only the sender confirms a direct transfer it created (the
/// accounting API's rule), so a recipient can never take a direct transfer the sender has not
/// confirmed. As SQL over the resolution's `$2` (status) and `$4` (resolved by), and in
/// `RESOLVE_BATCH` (resolve_batch.rs) over the same two inputs.
const CREATOR_CAPTURES: &str = "$2 <> 'COMPLETED' OR t.created_by = $4";

/// Who a capture of `input` is made by ([`CREATOR_CAPTURES`]).
fn capturer(input: &ResolveInput<'_>) -> Actor {
    if input.by_sender {
        Actor::Sender
    } else {
        Actor::Recipient
    }
}

/// What one expiry sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired holds this sweep cancelled.
    pub cancelled: u64,
    /// Expired holds whose cancellation failed; they stay pending for the next sweep.
    pub failed: u64,
}

/// What a resolution changed, as `sqlite_resolve` reads it back to move the money.
#[derive(sqlx::FromRow)]
struct Resolved {
    sender_id: i64,
    recipient_id: i64,
    token_id: Option<String>,
    amount: Micros,
    captured: Micros,
    app_name: String,
    /// For the usage row, which names the transfer's payer: read by the update itself.
    sender_email: String,
}

impl Store {
    pub async fn transfer_by_id(&self, id: &str) -> Result<Option<TransferRow>> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS}{REFUNDED} FROM transfers t {TRANSFER_JOINS} WHERE t.id = $1"
        );
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Captures or voids a pending transfer exactly once. Repeating the same resolution returns the
    /// resolved transfer unchanged; a conflicting one is `FAILED_PRECONDITION`.
    pub async fn resolve(&self, input: &ResolveInput<'_>) -> Result<TransferRow> {
        self.resolve_answered(input, None).await
    }

    /// [`Store::resolve`], storing `answer` in the capture's own transaction when this call
    /// captures (nothing is stored by a void, a refused capture, or a repeat of a capture that
    /// already committed: that one stored its answer with it). One statement and one commit
    /// fewer per paid request than writing the answer before the capture (issue 16).
    pub async fn resolve_answered(
        &self,
        input: &ResolveInput<'_>,
        answer: Option<&AnswerWrite>,
    ) -> Result<TransferRow> {
        for _ in 0..3 {
            let now = self.now();
            if let Some(row) = retry_transient(|| self.try_resolve(input, answer, now)).await? {
                // This call's statement resolved it: counted here, once. (Judged by the row's
                // time, replays and other replicas' sweeps of one hold counted it again.)
                crate::metrics::resolved(&row);
                return Ok(row);
            }
            let not_found =
                || LedgerError::NotFound(format!("transfer {} not found", input.transfer_id));
            let current = self
                .transfer_by_id(input.transfer_id)
                .await?
                .ok_or_else(not_found)?;
            match input.recipient_id {
                Some(r) if r == current.recipient_id => {}
                // Its sender sees it (`GetTransfer`), so it is not told the transfer does not
                // exist (it was, `NOT_FOUND`), but that this is not its to do.
                Some(r) if r == current.sender_id => {
                    return Err(LedgerError::PermissionDenied(format!(
                        "transfer {} is resolved by its recipient, not its sender (a direct \
                         transfer its sender created is confirmed or cancelled through the \
                         accounting API)",
                        current.id
                    )))
                }
                Some(_) => return Err(not_found()),
                None => {}
            }
            // Before the status: the other party's capture must not read as an idempotent
            // repeat of the creator's.
            if matches!(input.resolution, Resolution::Capture(_))
                && current.created_by != capturer(input)
            {
                return Err(LedgerError::PermissionDenied(format!(
                    "transfer {} was created by its {}; only that party may capture it (a \
                     direct transfer is confirmed through the accounting API)",
                    current.id,
                    current.created_by.as_str().to_lowercase()
                )));
            }
            // Judged as the capture's guard judges it: by the later of this process's clock and
            // the database's. Reading only its own, a ledger whose clock is behind its database's
            // answered "busy, retry" to a refused capture for the hold's whole life (the router
            // asking all along) instead of "expired" (a time tester, 2026-12-06).
            let expired = match (&input.resolution, current.status) {
                (Resolution::Capture(_), TransferStatus::Pending) => {
                    let (own, database) = (self.now(), self.database_clock().await?);
                    current.expires_at <= database.map_or(own, |d| d.max(own))
                }
                _ => false,
            };
            match (&input.resolution, current.status) {
                (Resolution::Capture(amount), TransferStatus::Completed) => {
                    let same = match amount {
                        CaptureAmount::Full => current.captured == current.amount,
                        CaptureAmount::Micros(m) => current.captured.get() == *m,
                    };
                    if same {
                        return Ok(current);
                    }
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {} was already captured for {} micros",
                            current.id,
                            current.captured.get()
                        ),
                    ));
                }
                (Resolution::Capture(_), TransferStatus::Cancelled) => {
                    return Err(LedgerError::refused(
                        cancelled_reason(&current.cancel_reason, current.resolved_by),
                        format!(
                            "transfer {} is cancelled ({}), it cannot be captured",
                            current.id, current.cancel_reason
                        ),
                    ))
                }
                (Resolution::Void { .. }, TransferStatus::Cancelled) => {
                    if let Some(usage) = input.usage {
                        let link = UsageLink::Transfer(&current.id);
                        let row = (current.recipient_id, link, current.amount);
                        let usage = usage.of_transfer(&current.sender_email, &current.app_name);
                        super::late_void_row(self.pool(), row, &usage, self.now()).await?;
                    }
                    return Ok(current);
                }
                (Resolution::Void { .. }, TransferStatus::Completed) => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {} is already captured, it cannot be voided",
                            current.id
                        ),
                    ))
                }
                (Resolution::Capture(CaptureAmount::Micros(m)), TransferStatus::Pending)
                    if *m > current.amount.get() =>
                {
                    return Err(LedgerError::invalid(format!(
                        "capture amount {m} exceeds the authorized {} micros",
                        current.amount.get()
                    )))
                }
                (Resolution::Capture(_), TransferStatus::Pending) if expired => {
                    return Err(LedgerError::refused(
                        Reason::HoldExpired,
                        format!("hold {} expired, it can no longer be captured", current.id),
                    ))
                }
                // Still pending: a concurrent resolution lost its race; look again.
                _ => continue,
            }
        }
        Err(LedgerError::Unavailable("transfer is busy, retry".into()))
    }

    async fn try_resolve(
        &self,
        input: &ResolveInput<'_>,
        answer: Option<&AnswerWrite>,
        now: i64,
    ) -> std::result::Result<Option<TransferRow>, sqlx::Error> {
        use TransferStatus::{Cancelled, Completed};
        let (status, captured, reason, resolved_by) = match &input.resolution {
            Resolution::Capture(CaptureAmount::Full) => (Completed, -1, "", Actor::Recipient),
            Resolution::Capture(CaptureAmount::Micros(m)) => (Completed, *m, "", Actor::Recipient),
            Resolution::Void { reason } => (
                Cancelled,
                0,
                reason.as_str(),
                if input.recipient_id.is_some() {
                    Actor::Recipient
                } else {
                    Actor::System
                },
            ),
        };
        let resolved_by = if input.by_sender {
            Actor::Sender
        } else {
            resolved_by
        };
        // Captures must happen before expiry; the sweep may only cancel what has expired.
        let guard = match (status, input.recipient_id) {
            (Completed, _) => TimeGuard::BeforeExpiry,
            (_, None) => TimeGuard::AfterExpiry,
            _ => TimeGuard::Any,
        };
        let job = ResolveJob {
            transfer_id: input.transfer_id.to_string(),
            recipient_id: input.recipient_id.unwrap_or(-1),
            status,
            captured,
            resolved_by,
            reason: reason.to_string(),
            now,
            guard,
            usage_id: new_id_at(now),
            usage: input.usage.cloned(),
            answer: answer.filter(|_| status == Completed).cloned(),
        };
        match &self.batcher {
            Some(batcher) => batcher.resolve(job).await,
            None => self.sqlite_resolve(&job).await,
        }
    }

    async fn sqlite_resolve(
        &self,
        job: &ResolveJob,
    ) -> std::result::Result<Option<TransferRow>, sqlx::Error> {
        // A capture counts as made when it has the write lock: the clock read before may be
        // late by a lock wait (`Backend::clock_micros_sql`).
        let time_guard = match job.guard {
            TimeGuard::BeforeExpiry => format!(
                "t.expires_at > MAX($7, {})",
                Backend::Sqlite.clock_micros_sql()
            ),
            TimeGuard::AfterExpiry => "t.expires_at <= $7".to_string(),
            TimeGuard::Any => "TRUE".to_string(),
        };
        let mut tx = self.pool().begin().await?;
        let sql = format!(
            "UPDATE transfers AS t SET status = $2, \
                captured = CASE WHEN $3 < 0 THEN t.amount ELSE $3 END, \
                resolved_by = $4, resolved_at = $7, cancel_reason = $5 \
             WHERE t.id = $1 AND ($6 < 0 OR t.recipient_id = $6) AND t.{UNRESOLVED} \
               AND {time_guard} AND $3 <= t.amount AND ({CREATOR_CAPTURES}) \
             RETURNING sender_id, recipient_id, token_id, amount, captured, app_name, \
                 (SELECT a.email FROM accounts a WHERE a.id = sender_id) AS sender_email"
        );
        let resolved: Option<Resolved> = sqlx::query_as(&sql)
            .bind(&job.transfer_id)
            .bind(job.status)
            .bind(job.captured)
            .bind(job.resolved_by)
            .bind(&job.reason)
            .bind(job.recipient_id)
            .bind(job.now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(Resolved {
            sender_id,
            recipient_id,
            token_id,
            amount,
            captured,
            app_name,
            sender_email,
        }) = resolved
        else {
            return Ok(None);
        };
        if let Some(token_id) = &token_id {
            sqlx::query("UPDATE tokens SET held = held - $1, spent = spent + $2 WHERE id = $3")
                .bind(amount)
                .bind(captured)
                .bind(token_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE accounts SET balance = balance - $1, held = held - $2 WHERE id = $3")
            .bind(captured)
            .bind(amount)
            .bind(sender_id)
            .execute(&mut *tx)
            .await?;
        if captured.is_positive() {
            sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
                .bind(captured)
                .bind(recipient_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO journal (account_id, amount, kind, ref_id, created_at) \
                 VALUES ($1, $2, 'capture', $3, $4), ($5, $6, 'capture', $3, $4)",
            )
            .bind(sender_id)
            .bind(-captured.get())
            .bind(&job.transfer_id)
            .bind(job.now)
            .bind(recipient_id)
            .bind(captured)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(u) = &job.usage {
            let u = &u.of_transfer(&sender_email, &app_name);
            let write = UsageWrite {
                id: &job.usage_id,
                recipient_id,
                link: UsageLink::Transfer(&job.transfer_id),
                cost: captured,
                held: amount,
                usage: u,
                now: job.now,
            };
            insert_usage(&mut tx, &write).await?;
        }
        if let Some(a) = &job.answer {
            // The first answer written wins (see `Store::put_answer`).
            sqlx::query(
                "INSERT INTO answers (transfer_id, recipient_id, body, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (transfer_id) DO NOTHING",
            )
            .bind(&job.transfer_id)
            .bind(recipient_id)
            .bind(a.body.clone())
            .bind(job.now)
            .bind(a.expires_at)
            .execute(&mut *tx)
            .await?;
        }
        // Read in the transaction, before its commit: read after it (on the pool, whose one
        // SQLite connection may be busy past its acquire timeout) a committed capture could be
        // answered with an error that says it failed, and the router would not ask again.
        let sql =
            format!("SELECT {TRANSFER_COLUMNS} FROM transfers t {TRANSFER_JOINS} WHERE t.id = $1");
        let row: Option<TransferRow> = sqlx::query_as(&sql)
            .bind(&job.transfer_id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Cancels up to `limit` expired holds (resolved by SYSTEM). A hold whose cancellation fails
    /// is logged, counted (`syft_ledger_sweep_failures_total`) and skipped: it stays PENDING and
    /// expired, so the next sweep selects it again, and it never keeps the holds after it held.
    ///
    /// It reads the expiry index from where the last sweep left nothing behind (`floor.rs`), not
    /// from the index's beginning, which holds the dead entries of every hold resolved since the
    /// last VACUUM.
    pub async fn sweep_expired(&self, limit: i64) -> Result<SweepReport> {
        let start = self.sweep_floor.start();
        // Expired by every clock that judges holds: this process's and, on Postgres, the
        // database's, which every replica shares. A replica whose clock ran minutes ahead (or
        // stepped forward) cancelled the other replicas' live holds, their streams then given
        // away uncharged (a time tester, 2026-12-06); the capture's guard takes the later clock,
        // so a hold between the two can be neither captured nor swept until both agree.
        let own = self.now();
        let now = self.database_clock().await?.map_or(own, |d| d.min(own));
        let expired: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, expires_at FROM transfers WHERE status = 'PENDING' AND expires_at <= $1 \
             AND expires_at >= $3 ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .bind(start)
        .fetch_all(self.pool())
        .await?;
        // A full page may have more behind it, all expiring no earlier than its last row.
        let mut oldest_left = match expired.last() {
            Some((_, expires_at)) if expired.len() as i64 >= limit => Some(*expires_at),
            _ => None,
        };
        let mut report = SweepReport::default();
        for (id, expires_at) in expired {
            let input = ResolveInput {
                transfer_id: &id,
                recipient_id: None,
                resolution: Resolution::Void {
                    reason: CANCEL_EXPIRED.into(),
                },
                usage: None,
                by_sender: false,
            };
            match self.resolve(&input).await {
                Ok(t) if t.resolved_by == Some(Actor::System) => report.cancelled += 1,
                Ok(_) => {}
                // Another replica or the recipient got there first.
                Err(e) if e.error_code() == ErrorCode::FailedPrecondition => {}
                Err(e) => {
                    tracing::warn!(transfer_id = %id, error = %e,
                        "expired hold not cancelled, retried at the next sweep");
                    crate::metrics::sweep_failed();
                    report.failed += 1;
                    oldest_left = Some(oldest_left.map_or(expires_at, |o: i64| o.min(expires_at)));
                }
            }
        }
        self.sweep_floor.passed(start, now, oldest_left);
        Ok(report)
    }
}
