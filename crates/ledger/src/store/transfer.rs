//! Two-phase transfers: authorize (hold), capture, void, expiry sweep and credit roll-up.
//!
//! Each transition is one atomic unit. On Postgres the hot operations go through the batcher
//! (`batch.rs`: set-based statements, one transaction per batch); on SQLite they are short
//! transactions on the single connection. Both paths are covered by the same store test suite.
//!
//! The recipient of a capture is credited through an append-only journal row (`rolled_up = FALSE`)
//! instead of an update of its account row, so captures for one hot recipient never queue on a
//! single row lock; `roll_up` later folds those rows into `accounts.balance`.

use sqlx::{AnyConnection, Row};

use super::batch::{AuthJob, AuthResult, ResolveJob, TimeGuard};
use super::{
    new_id, now_micros, retry_transient, sha256_hex, transfer_from_row, Store, TokenInfo,
    TransferRow, UsageInput, TRANSFER_COLUMNS, TRANSFER_JOINS,
};
use crate::error::{is_unique_violation, LedgerError, Result};
use syft_error::{ErrorCode, Reason};

pub struct AuthorizeInput<'a> {
    pub recipient_id: i64,
    pub recipient_email: &'a str,
    pub sender_email: &'a str,
    pub amount: i64,
    pub token: &'a str,
    pub app_name: &'a str,
    pub app_ep_path: &'a str,
    pub idempotency_key: &'a str,
    pub ttl_micros: i64,
}

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

/// A hold placed by the sender itself, without a delegation token (REST compat API).
pub struct DirectInput<'a> {
    pub sender_id: i64,
    pub recipient_id: i64,
    pub amount: i64,
    pub app_name: &'a str,
    pub app_ep_path: &'a str,
    pub ttl_micros: i64,
    /// The sender's key: the same key with the same parameters returns the original transfer.
    pub idempotency_key: &'a str,
}

enum AuthorizeOutcome {
    Created(Box<TransferRow>),
    TokenRejected,
    InsufficientFunds,
    DuplicateKey,
}

const CANCEL_EXPIRED: &str = "hold expired";

impl Store {
    /// Places a hold for `amount` on the sender's funds, keyed by `(recipient, idempotency_key)`.
    pub async fn authorize(&self, input: &AuthorizeInput<'_>) -> Result<TransferRow> {
        let Some(token) = self.token_info(input.token).await? else {
            return self
                .fail_authorize(
                    input,
                    "",
                    LedgerError::refused(Reason::TokenInvalid, "unknown token"),
                )
                .await;
        };
        let request_hash = sha256_hex(&format!(
            "{}\n{}\n{}\n{}\n{}",
            input.sender_email, input.amount, token.id, input.app_name, input.app_ep_path
        ));
        // Replays are found without a read on the hot path: a reused key makes the insert
        // conflict, and a recorded failure makes the token step refuse (see `try_authorize`).
        if token.recipient_id != input.recipient_id {
            let err = LedgerError::refused(
                Reason::TokenInvalid,
                "token was not issued to this recipient",
            );
            return self.fail_authorize(input, &request_hash, err).await;
        }
        if token.sender_email != input.sender_email {
            let err =
                LedgerError::refused(Reason::TokenInvalid, "token does not belong to this sender");
            return self.fail_authorize(input, &request_hash, err).await;
        }

        let mut rolled_up = false;
        loop {
            let now = now_micros();
            let outcome =
                retry_transient(|| self.try_authorize(input, &token, &request_hash, now)).await?;
            match outcome {
                AuthorizeOutcome::Created(row) => return Ok(*row),
                AuthorizeOutcome::DuplicateKey => {
                    if let Some(replayed) = self.replay_authorize(input, &request_hash).await? {
                        return replayed;
                    }
                    return Err(LedgerError::Unavailable(
                        "concurrent authorization, retry".into(),
                    ));
                }
                AuthorizeOutcome::TokenRejected => {
                    if let Some(replayed) = self.replay_authorize(input, &request_hash).await? {
                        return replayed;
                    }
                    let err = self
                        .token_rejection(&token.id, input.amount, now)
                        .await?
                        .unwrap_or_else(|| {
                            LedgerError::refused(Reason::TokenInvalid, "token cannot be used")
                        });
                    return self.fail_authorize(input, &request_hash, err).await;
                }
                AuthorizeOutcome::InsufficientFunds => {
                    if let Some(replayed) = self.replay_authorize(input, &request_hash).await? {
                        return replayed;
                    }
                    // Credits from captures may still sit in the journal; fold them in once and
                    // retry. Retry even when this roll-up found nothing: the sweeper may have
                    // folded them in since the check above.
                    if !rolled_up {
                        self.roll_up(token.sender_id).await?;
                        rolled_up = true;
                        continue;
                    }
                    let err = LedgerError::refused(
                        Reason::InsufficientFunds,
                        format!("insufficient funds: {} micros requested", input.amount),
                    );
                    return self.fail_authorize(input, &request_hash, err).await;
                }
            }
        }
    }

    /// The original outcome of an earlier authorization with the same key, if there was one.
    async fn replay_authorize(
        &self,
        input: &AuthorizeInput<'_>,
        request_hash: &str,
    ) -> Result<Option<Result<TransferRow>>> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS}, t.request_hash FROM transfers t {TRANSFER_JOINS} \
             WHERE t.recipient_id = $1 AND t.idempotency_key = $2"
        );
        let row = sqlx::query(&sql)
            .bind(input.recipient_id)
            .bind(input.idempotency_key)
            .fetch_optional(self.pool())
            .await?;
        if let Some(row) = row {
            let original_hash: String = row.try_get(18)?;
            if original_hash != request_hash {
                return Ok(Some(Err(key_reused(input.idempotency_key))));
            }
            return Ok(Some(Ok(transfer_from_row(&row)?)));
        }
        let row = sqlx::query(
            "SELECT request_hash, error_kind, error_message FROM authorize_failures \
             WHERE recipient_id = $1 AND idempotency_key = $2",
        )
        .bind(input.recipient_id)
        .bind(input.idempotency_key)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let original_hash: String = row.try_get(0)?;
        if original_hash != request_hash {
            return Ok(Some(Err(key_reused(input.idempotency_key))));
        }
        let kind: String = row.try_get(1)?;
        Ok(Some(Err(LedgerError::from_kind(&kind, row.try_get(2)?))))
    }

    /// Records a business failure so that a replay of the same key returns it, then returns it.
    async fn fail_authorize(
        &self,
        input: &AuthorizeInput<'_>,
        request_hash: &str,
        err: LedgerError,
    ) -> Result<TransferRow> {
        let hash = if request_hash.is_empty() {
            // An unknown token has no id; hash its text so a replay with another token differs.
            sha256_hex(&format!("unknown-token\n{}", input.token))
        } else {
            request_hash.to_string()
        };
        sqlx::query(
            "INSERT INTO authorize_failures (recipient_id, idempotency_key, request_hash, error_kind, \
             error_message, created_at) SELECT $1, $2, $3, $4, $5, $6 \
             WHERE NOT EXISTS (SELECT 1 FROM transfers WHERE recipient_id = $1 AND idempotency_key = $2) \
             ON CONFLICT (recipient_id, idempotency_key) DO NOTHING",
        )
        .bind(input.recipient_id)
        .bind(input.idempotency_key)
        .bind(&hash)
        .bind(err.kind())
        .bind(err.to_string())
        .bind(now_micros())
        .execute(self.pool())
        .await?;
        // A concurrent replay may have recorded a different outcome first; return that one.
        match self.replay_authorize(input, &hash).await? {
            Some(outcome) => outcome,
            None => Err(err),
        }
    }

    async fn try_authorize(
        &self,
        input: &AuthorizeInput<'_>,
        token: &TokenInfo,
        request_hash: &str,
        now: i64,
    ) -> std::result::Result<AuthorizeOutcome, sqlx::Error> {
        let job = AuthJob {
            id: new_id(),
            sender_id: token.sender_id,
            recipient_id: input.recipient_id,
            sender_email: token.sender_email.clone(),
            recipient_email: input.recipient_email.to_string(),
            token_id: token.id.clone(),
            amount: input.amount,
            currency: token.currency.clone(),
            app_name: input.app_name.to_string(),
            app_ep_path: input.app_ep_path.to_string(),
            idempotency_key: input.idempotency_key.to_string(),
            request_hash: request_hash.to_string(),
            now,
            expires_at: now.saturating_add(input.ttl_micros),
        };
        let result = match &self.batcher {
            Some(batcher) => batcher.authorize(job.clone()).await,
            None => {
                let mut tx = self.pool().begin().await?;
                match sqlite_authorize(&mut tx, &job).await {
                    Ok(AuthResult::Created) => tx.commit().await.map(|_| AuthResult::Created),
                    other => other,
                }
            }
        };
        match result {
            Ok(AuthResult::Created) => Ok(AuthorizeOutcome::Created(Box::new(job.pending_row()))),
            Ok(AuthResult::TokenRejected) => Ok(AuthorizeOutcome::TokenRejected),
            Ok(AuthResult::InsufficientFunds) => Ok(AuthorizeOutcome::InsufficientFunds),
            Err(e) if is_unique_violation(&e) => Ok(AuthorizeOutcome::DuplicateKey),
            Err(e) => Err(e),
        }
    }

    /// Places a hold the sender asked for itself (no token, created by SENDER). Not on the hot
    /// path, so it is one short transaction on both backends.
    pub async fn authorize_direct(&self, input: &DirectInput<'_>) -> Result<TransferRow> {
        // Namespaced per sender, so a sender's key never meets the recipient's own keys.
        let key = format!("direct:{}:{}", input.sender_id, input.idempotency_key);
        let request_hash = sha256_hex(&format!(
            "direct\n{}\n{}\n{}\n{}",
            input.recipient_id, input.amount, input.app_name, input.app_ep_path
        ));
        if let Some(replayed) = self.replay_direct(input, &key, &request_hash).await? {
            return replayed;
        }
        let id = new_id();
        let mut rolled_up = false;
        loop {
            let now = now_micros();
            let placed = retry_transient(|| async {
                let mut tx = self.pool().begin().await?;
                let funds = sqlx::query(
                    "UPDATE accounts SET held = held + $1 WHERE id = $2 AND balance - held >= $1 \
                     RETURNING currency",
                )
                .bind(input.amount)
                .bind(input.sender_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(funds) = funds else { return Ok(Some(false)) };
                let currency: String = funds.try_get(0)?;
                let inserted = sqlx::query(
                    "INSERT INTO transfers (id, sender_id, recipient_id, token_id, amount, currency, \
                     status, created_by, app_name, app_ep_path, idempotency_key, request_hash, \
                     created_at, expires_at) \
                     VALUES ($1, $2, $3, NULL, $4, $5, 'PENDING', 'SENDER', $6, $7, $8, $9, $10, $11)",
                )
                .bind(&id)
                .bind(input.sender_id)
                .bind(input.recipient_id)
                .bind(input.amount)
                .bind(&currency)
                .bind(input.app_name)
                .bind(input.app_ep_path)
                .bind(&key)
                .bind(&request_hash)
                .bind(now)
                .bind(now.saturating_add(input.ttl_micros))
                .execute(&mut *tx)
                .await;
                match inserted {
                    Ok(_) => {}
                    // A concurrent request with the same key won; the hold rolls back with `tx`.
                    Err(e) if is_unique_violation(&e) => return Ok(None),
                    Err(e) => return Err(e),
                }
                tx.commit().await?;
                Ok(Some(true))
            })
            .await?;
            match placed {
                Some(true) => {
                    return self
                        .transfer_by_id(&id)
                        .await?
                        .ok_or_else(|| LedgerError::Internal("transfer vanished".into()))
                }
                None => {
                    return match self.replay_direct(input, &key, &request_hash).await? {
                        Some(replayed) => replayed,
                        None => Err(LedgerError::Unavailable(
                            "concurrent transfer, retry".into(),
                        )),
                    }
                }
                Some(false) => {}
            }
            // As in `authorize`: retry once after a roll-up, whoever did it.
            if !rolled_up {
                self.roll_up(input.sender_id).await?;
                rolled_up = true;
                continue;
            }
            return Err(LedgerError::refused(
                Reason::InsufficientFunds,
                format!("insufficient funds: {} micros requested", input.amount),
            ));
        }
    }

    /// The transfer an earlier direct request with this key created, if any.
    async fn replay_direct(
        &self,
        input: &DirectInput<'_>,
        key: &str,
        request_hash: &str,
    ) -> Result<Option<Result<TransferRow>>> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS}, t.request_hash FROM transfers t {TRANSFER_JOINS} \
             WHERE t.recipient_id = $1 AND t.idempotency_key = $2"
        );
        let row = sqlx::query(&sql)
            .bind(input.recipient_id)
            .bind(key)
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let original_hash: String = row.try_get(18)?;
        if original_hash != request_hash {
            return Ok(Some(Err(key_reused(input.idempotency_key))));
        }
        Ok(Some(Ok(transfer_from_row(&row)?)))
    }

    pub async fn transfer_by_id(&self, id: &str) -> Result<Option<TransferRow>> {
        let sql =
            format!("SELECT {TRANSFER_COLUMNS} FROM transfers t {TRANSFER_JOINS} WHERE t.id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(transfer_from_row).transpose()
    }

    /// Captures or voids a pending transfer exactly once. Repeating the same resolution returns the
    /// resolved transfer unchanged; a conflicting one is `FAILED_PRECONDITION`.
    pub async fn resolve(&self, input: &ResolveInput<'_>) -> Result<TransferRow> {
        for _ in 0..3 {
            let now = now_micros();
            if let Some(row) = retry_transient(|| self.try_resolve(input, now)).await? {
                return Ok(row);
            }
            let current = self
                .transfer_by_id(input.transfer_id)
                .await?
                .filter(|t| input.recipient_id.is_none_or(|r| r == t.recipient_id))
                .ok_or_else(|| {
                    LedgerError::NotFound(format!("transfer {} not found", input.transfer_id))
                })?;
            match (&input.resolution, current.status.as_str()) {
                (Resolution::Capture(amount), "COMPLETED") => {
                    let same = match amount {
                        CaptureAmount::Full => current.captured == current.amount,
                        CaptureAmount::Micros(m) => current.captured == *m,
                    };
                    if same {
                        return Ok(current);
                    }
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {} was already captured for {} micros",
                            current.id, current.captured
                        ),
                    ));
                }
                (Resolution::Capture(_), "CANCELLED") => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {} is cancelled ({}), it cannot be captured",
                            current.id, current.cancel_reason
                        ),
                    ))
                }
                (Resolution::Void { .. }, "CANCELLED") => return Ok(current),
                (Resolution::Void { .. }, "COMPLETED") => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {} is already captured, it cannot be voided",
                            current.id
                        ),
                    ))
                }
                (Resolution::Capture(CaptureAmount::Micros(m)), "PENDING")
                    if *m > current.amount =>
                {
                    return Err(LedgerError::invalid(format!(
                        "capture amount {m} exceeds the authorized {} micros",
                        current.amount
                    )))
                }
                (Resolution::Capture(_), "PENDING") if current.expires_at <= now_micros() => {
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
        now: i64,
    ) -> std::result::Result<Option<TransferRow>, sqlx::Error> {
        let (status, captured, reason, resolved_by) = match &input.resolution {
            Resolution::Capture(CaptureAmount::Full) => ("COMPLETED", -1, "", "RECIPIENT"),
            Resolution::Capture(CaptureAmount::Micros(m)) => ("COMPLETED", *m, "", "RECIPIENT"),
            Resolution::Void { reason } => (
                "CANCELLED",
                0,
                reason.as_str(),
                if input.recipient_id.is_some() {
                    "RECIPIENT"
                } else {
                    "SYSTEM"
                },
            ),
        };
        let resolved_by = if input.by_sender {
            "SENDER"
        } else {
            resolved_by
        };
        // Captures must happen before expiry; the sweep may only cancel what has expired.
        let guard = match (status, input.recipient_id) {
            ("COMPLETED", _) => TimeGuard::BeforeExpiry,
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
            usage_id: new_id(),
            usage: input.usage.cloned(),
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
        let time_guard = match job.guard {
            TimeGuard::BeforeExpiry => "t.expires_at > $7",
            TimeGuard::AfterExpiry => "t.expires_at <= $7",
            TimeGuard::Any => "TRUE",
        };
        let mut tx = self.pool().begin().await?;
        let sql = format!(
            "UPDATE transfers AS t SET status = $2, \
                captured = CASE WHEN $3 < 0 THEN t.amount ELSE $3 END, \
                resolved_by = $4, resolved_at = $7, cancel_reason = $5 \
             WHERE t.id = $1 AND ($6 < 0 OR t.recipient_id = $6) AND t.status = 'PENDING' \
               AND {time_guard} AND $3 <= t.amount \
             RETURNING sender_id, recipient_id, token_id, amount, captured"
        );
        let row = sqlx::query(&sql)
            .bind(&job.transfer_id)
            .bind(job.status)
            .bind(job.captured)
            .bind(job.resolved_by)
            .bind(&job.reason)
            .bind(job.recipient_id)
            .bind(job.now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let sender_id: i64 = row.try_get(0)?;
        let recipient_id: i64 = row.try_get(1)?;
        let token_id: Option<String> = row.try_get(2)?;
        let amount: i64 = row.try_get(3)?;
        let captured: i64 = row.try_get(4)?;
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
        if captured > 0 {
            sqlx::query(
                "INSERT INTO journal (account_id, amount, kind, ref_id, rolled_up, created_at) \
                 VALUES ($1, $2, 'capture', $3, TRUE, $4), ($5, $6, 'capture', $3, FALSE, $4)",
            )
            .bind(sender_id)
            .bind(-captured)
            .bind(&job.transfer_id)
            .bind(job.now)
            .bind(recipient_id)
            .bind(captured)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(u) = &job.usage {
            insert_usage(
                &mut tx,
                &job.usage_id,
                recipient_id,
                UsageLink::Transfer(&job.transfer_id),
                captured,
                u,
                job.now,
            )
            .await?;
        }
        tx.commit().await?;
        self.transfer_by_id(&job.transfer_id).await.map_err(to_sqlx)
    }

    /// Cancels up to `limit` expired holds (resolved by SYSTEM); returns how many it cancelled.
    pub async fn sweep_expired(&self, limit: i64) -> Result<u64> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM transfers WHERE status = 'PENDING' AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now_micros())
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut cancelled = 0;
        for id in ids {
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
                Ok(t) if t.resolved_by.as_deref() == Some("SYSTEM") => cancelled += 1,
                Ok(_) => {}
                // Another replica or the recipient got there first.
                Err(e) if e.error_code() == ErrorCode::FailedPrecondition => {}
                Err(e) => return Err(e),
            }
        }
        Ok(cancelled)
    }

    /// Folds an account's unrolled journal credits into its balance; returns the amount folded.
    pub async fn roll_up(&self, account_id: i64) -> Result<i64> {
        retry_transient(|| async {
            let mut tx = self.pool().begin().await?;
            let amounts: Vec<i64> = sqlx::query_scalar(
                "UPDATE journal SET rolled_up = TRUE WHERE account_id = $1 AND NOT rolled_up RETURNING amount",
            )
            .bind(account_id)
            .fetch_all(&mut *tx)
            .await?;
            let total: i64 = amounts.iter().sum();
            if total != 0 {
                sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
                    .bind(total)
                    .bind(account_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(total)
        })
        .await
    }

    /// Rolls up every account with unrolled credits.
    pub async fn roll_up_all(&self) -> Result<i64> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT account_id FROM journal WHERE NOT rolled_up AND account_id IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?;
        let mut total = 0;
        for id in ids {
            total += self.roll_up(id).await?;
        }
        Ok(total)
    }

    /// A usage row without money. A request id already recorded returns the existing row.
    pub async fn record_usage(
        &self,
        recipient_id: i64,
        usage: &UsageInput,
    ) -> Result<super::UsageRow> {
        let id = new_id();
        let now = now_micros();
        retry_transient(|| async {
            let mut conn = self.pool().acquire().await?;
            insert_usage(&mut conn, &id, recipient_id, UsageLink::None, 0, usage, now).await
        })
        .await?;
        self.usage_by_request(recipient_id, &usage.request_id)
            .await?
            .ok_or_else(|| LedgerError::Internal("usage row vanished".into()))
    }
}

/// Places one hold inside the caller's transaction; anything but `Created` must be rolled back.
async fn sqlite_authorize(
    conn: &mut AnyConnection,
    job: &AuthJob,
) -> std::result::Result<AuthResult, sqlx::Error> {
    let tok = sqlx::query(
        "UPDATE tokens SET held = held + $1 WHERE id = $2 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $3) \
         AND (spend_limit IS NULL OR spent + held + $1 <= spend_limit) \
         AND NOT EXISTS (SELECT 1 FROM authorize_failures WHERE recipient_id = $4 AND idempotency_key = $5)",
    )
    .bind(job.amount)
    .bind(&job.token_id)
    .bind(job.now)
    .bind(job.recipient_id)
    .bind(&job.idempotency_key)
    .execute(&mut *conn)
    .await?;
    if tok.rows_affected() == 0 {
        return Ok(AuthResult::TokenRejected);
    }
    let funds =
        sqlx::query("UPDATE accounts SET held = held + $1 WHERE id = $2 AND balance - held >= $1")
            .bind(job.amount)
            .bind(job.sender_id)
            .execute(&mut *conn)
            .await?;
    if funds.rows_affected() == 0 {
        return Ok(AuthResult::InsufficientFunds);
    }
    sqlx::query(
        "INSERT INTO transfers (id, sender_id, recipient_id, token_id, amount, currency, status, \
         created_by, app_name, app_ep_path, idempotency_key, request_hash, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'PENDING', 'RECIPIENT', $7, $8, $9, $10, $11, $12)",
    )
    .bind(&job.id)
    .bind(job.sender_id)
    .bind(job.recipient_id)
    .bind(&job.token_id)
    .bind(job.amount)
    .bind(&job.currency)
    .bind(&job.app_name)
    .bind(&job.app_ep_path)
    .bind(&job.idempotency_key)
    .bind(&job.request_hash)
    .bind(job.now)
    .bind(job.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(AuthResult::Created)
}

/// The transfer a usage row belongs to.
#[derive(Clone, Copy)]
pub(crate) enum UsageLink<'a> {
    /// A free request.
    None,
    /// A local transfer (`transfers`).
    Transfer(&'a str),
    /// A transfer of the hosted backend (`hosted_transfers`).
    Hosted(&'a str),
}

/// Writes a usage row; a request id already recorded for this recipient is left as it is.
pub(crate) async fn insert_usage(
    conn: &mut AnyConnection,
    id: &str,
    recipient_id: i64,
    link: UsageLink<'_>,
    cost: i64,
    u: &UsageInput,
    now: i64,
) -> std::result::Result<(), sqlx::Error> {
    let (transfer_id, hosted_transfer_id) = match link {
        UsageLink::None => (None, None),
        UsageLink::Transfer(t) => (Some(t), None),
        UsageLink::Hosted(t) => (None, Some(t)),
    };
    sqlx::query(
        "INSERT INTO usage_records (id, recipient_id, request_id, transfer_id, app_name, endpoint, \
         user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, \
         upstream_latency_ms, created_at, hosted_transfer_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         ON CONFLICT (recipient_id, request_id) DO NOTHING",
    )
    .bind(id)
    .bind(recipient_id)
    .bind(&u.request_id)
    .bind(transfer_id)
    .bind(&u.app_name)
    .bind(&u.endpoint)
    .bind(&u.user_email)
    .bind(&u.model)
    .bind(u.prompt_tokens)
    .bind(u.completion_tokens)
    .bind(u.total_tokens)
    .bind(cost)
    .bind(&u.status)
    .bind(u.latency_ms)
    .bind(u.upstream_latency_ms)
    .bind(now)
    .bind(hosted_transfer_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn key_reused(key: &str) -> LedgerError {
    LedgerError::refused(
        Reason::IdempotencyConflict,
        format!("idempotency key {key:?} was already used with different parameters"),
    )
}

fn to_sqlx(err: LedgerError) -> sqlx::Error {
    sqlx::Error::Protocol(err.to_string())
}
