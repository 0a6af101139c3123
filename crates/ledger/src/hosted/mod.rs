//! `backend = hosted`: two-phase transfers on a remote service that speaks the Syft accounting REST
//! API, made crash-safe by a local journal (`hosted_transfers`). docs/hosted.md explains the design.
//!
//! Every transfer moves through `step`s, each persisted before the remote call it leads to:
//! `creating` → `held` → `capturing` | `voiding` → `done`, or `failed` / `unknown` when the remote
//! create was refused / may or may not have happened. A resolution in progress is owned by one
//! driver at a time through a lease (`updated_at` is the lease stamp): only the holder of the
//! current stamp may take the next remote step, so two drivers can never both charge.
//!
//! Recovery (on start and every sweep) voids expired holds and any resolution whose driver died,
//! and cancels remote holds this ledger created but lost track of (an unknown create outcome).
//! Recovery never completes a capture on its own: if the router dies mid-way the user pays nothing,
//! unless the remote service had already completed the charge, which is then recorded.

pub mod backend;
pub mod remote;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::error::{is_unique_violation, LedgerError, Result};
use crate::store::{new_id, now_micros, sha256_hex, CaptureAmount, Store, TransferRow, UsageInput};
use remote::{RemoteClient, RemoteError, RemoteTx};
use syft_error::{ErrorCode, Reason};

#[derive(Clone)]
pub struct HostedConfig {
    /// Base URL of the accounting service.
    pub url: String,
    /// The router owner's account there.
    pub email: String,
    pub password: String,
    /// Per remote call.
    pub timeout: Duration,
    /// Extra attempts for a remote call that is safe to repeat.
    pub retries: u32,
    /// How long a driver owns a resolution in progress before recovery may take it over; also how
    /// old an untracked remote hold must be before it is cancelled as an orphan.
    pub lease: Duration,
}

impl std::fmt::Debug for HostedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedConfig")
            .field("url", &self.url)
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("lease", &self.lease)
            .finish()
    }
}

impl HostedConfig {
    pub fn new(url: &str, email: &str, password: &str) -> Self {
        Self {
            url: url.to_string(),
            email: email.to_ascii_lowercase(),
            password: password.to_string(),
            timeout: Duration::from_secs(10),
            retries: 3,
            lease: Duration::from_secs(120),
        }
    }
}

/// What a remote transaction turned out to be after a confirm or cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Cancelled,
}

/// One row of `hosted_transfers`.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    idempotency_key: String,
    request_hash: String,
    sender_email: String,
    recipient_email: String,
    token: String,
    amount: i64,
    captured: i64,
    currency: String,
    status: String,
    step: String,
    remote_id: Option<String>,
    capture_amount: Option<i64>,
    capture_remote_id: Option<String>,
    hold_released: bool,
    pending_usage: Option<String>,
    app_name: String,
    app_ep_path: String,
    resolved_by: Option<String>,
    cancel_reason: String,
    error_kind: Option<String>,
    error_message: Option<String>,
    created_at: i64,
    expires_at: i64,
    lease: i64,
    resolved_at: Option<i64>,
}

const COLUMNS: &str = "id, idempotency_key, request_hash, sender_email, recipient_email, token, \
    amount, captured, currency, status, step, remote_id, capture_amount, capture_remote_id, \
    CAST(CASE WHEN hold_released THEN 1 ELSE 0 END AS BIGINT), pending_usage, app_name, app_ep_path, \
    resolved_by, cancel_reason, error_kind, error_message, created_at, expires_at, updated_at, \
    resolved_at";

fn entry_from_row(r: &AnyRow) -> Result<Entry> {
    let released: i64 = r.try_get(14)?;
    Ok(Entry {
        id: r.try_get(0)?,
        idempotency_key: r.try_get(1)?,
        request_hash: r.try_get(2)?,
        sender_email: r.try_get(3)?,
        recipient_email: r.try_get(4)?,
        token: r.try_get(5)?,
        amount: r.try_get(6)?,
        captured: r.try_get(7)?,
        currency: r.try_get(8)?,
        status: r.try_get(9)?,
        step: r.try_get(10)?,
        remote_id: r.try_get(11)?,
        capture_amount: r.try_get(12)?,
        capture_remote_id: r.try_get(13)?,
        hold_released: released != 0,
        pending_usage: r.try_get(15)?,
        app_name: r.try_get(16)?,
        app_ep_path: r.try_get(17)?,
        resolved_by: r.try_get(18)?,
        cancel_reason: r.try_get(19)?,
        error_kind: r.try_get(20)?,
        error_message: r.try_get(21)?,
        created_at: r.try_get(22)?,
        expires_at: r.try_get(23)?,
        lease: r.try_get(24)?,
        resolved_at: r.try_get(25)?,
    })
}

impl Entry {
    fn transfer(&self) -> TransferRow {
        TransferRow {
            id: self.id.clone(),
            sender_id: 0,
            recipient_id: 0,
            sender_email: self.sender_email.clone(),
            recipient_email: self.recipient_email.clone(),
            amount: self.amount,
            captured: self.captured,
            currency: self.currency.clone(),
            status: self.status.clone(),
            created_by: "RECIPIENT".into(),
            resolved_by: self
                .resolved_by
                .clone()
                .filter(|_| self.resolved_at.is_some()),
            app_name: self.app_name.clone(),
            app_ep_path: self.app_ep_path.clone(),
            idempotency_key: self.idempotency_key.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            resolved_at: self.resolved_at,
            cancel_reason: self.cancel_reason.clone(),
        }
    }

    fn recorded_error(&self) -> LedgerError {
        LedgerError::from_kind(
            self.error_kind.as_deref().unwrap_or("UNAVAILABLE"),
            self.error_message.clone().unwrap_or_default(),
        )
    }
}

pub struct HostedAuthorize<'a> {
    pub sender_email: &'a str,
    pub amount: i64,
    pub token: &'a str,
    pub app_name: &'a str,
    pub app_ep_path: &'a str,
    pub idempotency_key: &'a str,
    pub ttl_micros: i64,
}

pub struct Hosted {
    store: Arc<Store>,
    remote: RemoteClient,
    config: HostedConfig,
    owner_id: i64,
    currency: String,
    /// When the remote history was last listed for orphans; the listing can be large.
    orphans_listed: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Hosted {
    /// Mirrors the owner as a local account (so the router authenticates with the owner's
    /// password and usage rows have an owner) and runs recovery once.
    pub async fn start(store: Arc<Store>, config: HostedConfig, currency: &str) -> Result<Self> {
        if config.url.is_empty() || config.email.is_empty() || config.password.is_empty() {
            return Err(LedgerError::invalid(
                "backend hosted needs SYFT_ACCOUNTING_URL, SYFT_ACCOUNTING_EMAIL and SYFT_ACCOUNTING_PASSWORD",
            ));
        }
        let remote =
            RemoteClient::new(&config.url, &config.email, &config.password, config.timeout)?;
        let owner = store
            .ensure_account(&config.email, currency, &sha256_hex(&config.password))
            .await?;
        let hosted = Self {
            store,
            remote,
            config,
            owner_id: owner.id,
            currency: currency.to_string(),
            orphans_listed: std::sync::Mutex::new(None),
        };
        if let Err(e) = hosted.recover().await {
            tracing::warn!(error = %e, "hosted recovery at start did not finish; it runs again periodically");
        }
        Ok(hosted)
    }

    pub fn owner_email(&self) -> &str {
        &self.config.email
    }

    fn lease_micros(&self) -> i64 {
        self.config.lease.as_micros() as i64
    }

    /// Repeats `op` while the remote is unreachable, and after an unknown outcome when `idempotent`.
    async fn retry<T, F, Fut>(&self, idempotent: bool, mut op: F) -> Result<T, RemoteError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RemoteError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) => {
                    let again = match &e {
                        RemoteError::Unreachable(_) => true,
                        RemoteError::Unknown(_) => idempotent,
                        RemoteError::Rejected { .. } => false,
                    };
                    if !again || attempt >= self.config.retries {
                        return Err(e);
                    }
                    attempt += 1;
                    tracing::debug!(attempt, error = ?e, "retrying accounting service call");
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
                }
                ok => return ok,
            }
        }
    }

    pub async fn account(&self) -> Result<syft_proto::ledger::Account> {
        let user = self
            .retry(true, || self.remote.my_info())
            .await
            .map_err(RemoteError::into_ledger)?;
        Ok(syft_proto::ledger::Account {
            email: user.email,
            organization: user.organization,
            currency: self.currency.clone(),
            balance_micros: user.balance,
            held_micros: 0,
            available_micros: user.balance,
            created_at_unix_micros: 0,
        })
    }

    // ---------------------------------------------------------------- journal

    async fn entry(&self, id: &str) -> Result<Option<Entry>> {
        let sql = format!("SELECT {COLUMNS} FROM hosted_transfers WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.store.pool())
            .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    async fn entry_by_key(&self, key: &str) -> Result<Option<Entry>> {
        let sql = format!("SELECT {COLUMNS} FROM hosted_transfers WHERE idempotency_key = $1");
        let row = sqlx::query(&sql)
            .bind(key)
            .fetch_optional(self.store.pool())
            .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    async fn must_entry(&self, id: &str) -> Result<Entry> {
        self.entry(id)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("transfer {id} not found")))
    }

    pub async fn transfer(&self, id: &str) -> Result<Option<TransferRow>> {
        Ok(self.entry(id).await?.map(|e| e.transfer()))
    }

    /// Newest first, like the local store's listing.
    pub async fn list(
        &self,
        status: Option<&str>,
        before_id: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<TransferRow>, bool)> {
        let sql = format!(
            "SELECT {COLUMNS} FROM hosted_transfers WHERE step NOT IN ('failed', 'unknown') \
             AND ($1 = '' OR status = $1) AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(status.unwrap_or(""))
            .bind(before_id.unwrap_or(""))
            .bind(limit + 1)
            .fetch_all(self.store.pool())
            .await?;
        let mut transfers = rows
            .iter()
            .map(|r| entry_from_row(r).map(|e| e.transfer()))
            .collect::<Result<Vec<_>>>()?;
        let more = transfers.len() as i64 > limit;
        transfers.truncate(limit as usize);
        Ok((transfers, more))
    }

    /// Moves `id` from step `from` to `to`, taking the lease; false if someone else moved it.
    #[allow(clippy::too_many_arguments)]
    async fn claim(
        &self,
        id: &str,
        from: &str,
        to: &str,
        capture_amount: Option<i64>,
        usage: Option<&UsageInput>,
        reason: &str,
        resolved_by: &str,
        only_unexpired: bool,
    ) -> Result<Option<i64>> {
        let now = now_micros();
        let usage = usage
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| LedgerError::Internal(e.to_string()))?;
        let done = sqlx::query(
            "UPDATE hosted_transfers SET step = $3, capture_amount = COALESCE($4, capture_amount), \
             pending_usage = COALESCE($5, pending_usage), cancel_reason = $6, resolved_by = $7, \
             updated_at = $8 \
             WHERE id = $1 AND step = $2 AND status = 'PENDING' AND updated_at < $9 \
               AND ($10 = 0 OR expires_at > $8)",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(capture_amount)
        .bind(usage)
        .bind(reason)
        .bind(resolved_by)
        .bind(now)
        .bind(self.free_before(from, now))
        .bind(i64::from(only_unexpired))
        .execute(self.store.pool())
        .await?;
        Ok((done.rows_affected() == 1).then_some(now))
    }

    /// Lease stamps older than this are free. A `held` entry has no driver, so any stamp is free.
    fn free_before(&self, step: &str, now: i64) -> i64 {
        if step == "held" {
            i64::MAX
        } else {
            now - self.lease_micros()
        }
    }

    /// Takes over an in-progress resolution whose driver is gone or gave up; returns the new stamp.
    async fn take_over(&self, e: &Entry) -> Result<Option<i64>> {
        let now = now_micros();
        let done = sqlx::query(
            "UPDATE hosted_transfers SET updated_at = $3 WHERE id = $1 AND step = $2 \
             AND status = 'PENDING' AND updated_at = $5 AND updated_at < $4",
        )
        .bind(&e.id)
        .bind(&e.step)
        .bind(now)
        .bind(now - self.lease_micros())
        .bind(e.lease)
        .execute(self.store.pool())
        .await?;
        Ok((done.rows_affected() == 1).then_some(now))
    }

    /// Renews the lease before an irreversible remote step; an error if another driver took over.
    async fn renew(&self, id: &str, stamp: i64) -> Result<i64> {
        let now = now_micros().max(stamp + 1);
        let done = sqlx::query(
            "UPDATE hosted_transfers SET updated_at = $3 WHERE id = $1 AND updated_at = $2 \
             AND status = 'PENDING'",
        )
        .bind(id)
        .bind(stamp)
        .bind(now)
        .execute(self.store.pool())
        .await?;
        if done.rows_affected() == 1 {
            Ok(now)
        } else {
            Err(LedgerError::Unavailable(
                "another ledger process took over this transfer, retry".into(),
            ))
        }
    }

    /// Gives up the lease after a transient failure, so a retry (or recovery) may continue at once.
    async fn release(&self, id: &str, stamp: i64) {
        let result = sqlx::query(
            "UPDATE hosted_transfers SET updated_at = 0 WHERE id = $1 AND updated_at = $2",
        )
        .bind(id)
        .bind(stamp)
        .execute(self.store.pool())
        .await;
        if let Err(e) = result {
            tracing::warn!(transfer = id, error = %e, "could not release the lease; it expires by itself");
        }
    }

    // ---------------------------------------------------------------- two phases

    pub async fn authorize(&self, input: &HostedAuthorize<'_>) -> Result<TransferRow> {
        let request_hash = sha256_hex(&format!(
            "{}\n{}\n{}\n{}\n{}",
            input.sender_email,
            input.amount,
            sha256_hex(input.token),
            input.app_name,
            input.app_ep_path
        ));
        let id = new_id();
        let now = now_micros();
        let inserted = sqlx::query(
            "INSERT INTO hosted_transfers (id, idempotency_key, request_hash, sender_email, \
             recipient_email, token, amount, currency, status, step, app_name, app_ep_path, \
             created_at, expires_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'PENDING', 'creating', $9, $10, $11, $12, $11)",
        )
        .bind(&id)
        .bind(input.idempotency_key)
        .bind(&request_hash)
        .bind(input.sender_email)
        .bind(&self.config.email)
        .bind(input.token)
        .bind(input.amount)
        .bind(&self.currency)
        .bind(input.app_name)
        .bind(input.app_ep_path)
        .bind(now)
        .bind(now.saturating_add(input.ttl_micros))
        .execute(self.store.pool())
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return self.replay(input.idempotency_key, &request_hash).await
            }
            Err(e) => return Err(e.into()),
        }
        let created = self
            .retry(false, || {
                self.remote.create(
                    input.sender_email,
                    input.amount,
                    input.token,
                    input.app_name,
                    input.app_ep_path,
                    &id,
                )
            })
            .await;
        let pool = self.store.pool();
        match created {
            Ok(tx) => {
                if tx.amount != input.amount || tx.sender_email != input.sender_email {
                    tracing::error!(transfer = %id, remote = %tx.id, "accounting service created a different transaction");
                }
                sqlx::query(
                    "UPDATE hosted_transfers SET step = 'held', remote_id = $2, updated_at = $3 \
                     WHERE id = $1 AND step = 'creating'",
                )
                .bind(&id)
                .bind(&tx.id)
                .bind(now_micros())
                .execute(pool)
                .await?;
                tracing::debug!(transfer = %id, remote = %tx.id, sender = input.sender_email, amount = input.amount, "hosted hold placed");
                Ok(self.must_entry(&id).await?.transfer())
            }
            Err(RemoteError::Rejected { status, message })
                if status.as_u16() == 401 || status.as_u16() == 429 =>
            {
                // Not an answer about this transfer: forget the attempt so the key can be retried.
                sqlx::query("DELETE FROM hosted_transfers WHERE id = $1 AND step = 'creating'")
                    .bind(&id)
                    .execute(pool)
                    .await?;
                Err(RemoteError::Rejected { status, message }.into_ledger())
            }
            Err(e @ RemoteError::Rejected { .. }) => {
                let err = e.into_ledger();
                self.mark_not_held(&id, "failed", "refused by the accounting service", &err)
                    .await?;
                Err(err)
            }
            Err(RemoteError::Unreachable(m)) => {
                sqlx::query("DELETE FROM hosted_transfers WHERE id = $1 AND step = 'creating'")
                    .bind(&id)
                    .execute(pool)
                    .await?;
                Err(RemoteError::Unreachable(m).into_ledger())
            }
            Err(e @ RemoteError::Unknown(_)) => {
                let err = e.into_ledger();
                self.mark_not_held(
                    &id,
                    "unknown",
                    "outcome unknown; a remote hold, if placed, is cancelled by recovery",
                    &err,
                )
                .await?;
                Err(err)
            }
        }
    }

    async fn mark_not_held(
        &self,
        id: &str,
        step: &str,
        reason: &str,
        err: &LedgerError,
    ) -> Result<()> {
        let now = now_micros();
        sqlx::query(
            "UPDATE hosted_transfers SET step = $2, status = 'CANCELLED', token = '', \
             cancel_reason = $3, error_kind = $4, error_message = $5, resolved_by = 'SYSTEM', \
             resolved_at = $6, updated_at = $6 WHERE id = $1 AND step = 'creating'",
        )
        .bind(id)
        .bind(step)
        .bind(reason)
        .bind(err.kind())
        .bind(err.to_string())
        .bind(now)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    async fn replay(&self, key: &str, request_hash: &str) -> Result<TransferRow> {
        let e = self
            .entry_by_key(key)
            .await?
            .ok_or_else(|| LedgerError::Unavailable("concurrent authorization, retry".into()))?;
        if e.request_hash != request_hash {
            return Err(LedgerError::refused(
                Reason::IdempotencyConflict,
                format!("idempotency key {key:?} was already used with different parameters"),
            ));
        }
        match e.step.as_str() {
            "failed" | "unknown" => Err(e.recorded_error()),
            "creating" => Err(LedgerError::Unavailable(
                "an authorization with this key is in progress, retry".into(),
            )),
            _ => Ok(e.transfer()),
        }
    }

    pub async fn capture(
        &self,
        id: &str,
        amount: CaptureAmount,
        usage: Option<&UsageInput>,
    ) -> Result<TransferRow> {
        for _ in 0..3 {
            let e = self.must_entry(id).await?;
            let target = match amount {
                CaptureAmount::Full => e.amount,
                CaptureAmount::Micros(m) if m > e.amount => {
                    return Err(LedgerError::invalid(format!(
                        "capture amount {m} exceeds the authorized {} micros",
                        e.amount
                    )))
                }
                CaptureAmount::Micros(m) => m,
            };
            match (e.status.as_str(), e.step.as_str()) {
                ("COMPLETED", _) if e.captured == target => return Ok(e.transfer()),
                ("COMPLETED", _) => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {id} was already captured for {} micros",
                            e.captured
                        ),
                    ))
                }
                ("CANCELLED", _) => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {id} is cancelled ({}), it cannot be captured",
                            e.cancel_reason
                        ),
                    ))
                }
                (_, "held") => {
                    if e.expires_at <= now_micros() {
                        return Err(LedgerError::refused(
                            Reason::HoldExpired,
                            format!("hold {id} expired, it can no longer be captured"),
                        ));
                    }
                    let claimed = self
                        .claim(
                            id,
                            "held",
                            "capturing",
                            Some(target),
                            usage,
                            "",
                            "RECIPIENT",
                            true,
                        )
                        .await?;
                    if let Some(stamp) = claimed {
                        return self.drive(id, stamp).await;
                    }
                }
                (_, "capturing") => {
                    if e.capture_amount != Some(target) {
                        return Err(LedgerError::FailedPrecondition(format!(
                            "transfer {id} is being captured for {} micros",
                            e.capture_amount.unwrap_or(e.amount)
                        )));
                    }
                    return match self.take_over(&e).await? {
                        Some(stamp) => self.drive(id, stamp).await,
                        None => Err(LedgerError::Unavailable(
                            "this transfer's capture is in progress, retry".into(),
                        )),
                    };
                }
                (_, "voiding") => {
                    return Err(LedgerError::FailedPrecondition(format!(
                        "transfer {id} is being voided, it cannot be captured"
                    )))
                }
                _ => {
                    return Err(LedgerError::FailedPrecondition(format!(
                        "transfer {id} holds no money"
                    )))
                }
            }
        }
        Err(LedgerError::Unavailable("transfer is busy, retry".into()))
    }

    pub async fn void(
        &self,
        id: &str,
        reason: &str,
        resolved_by: &str,
        usage: Option<&UsageInput>,
    ) -> Result<TransferRow> {
        for _ in 0..3 {
            let e = self.must_entry(id).await?;
            match (e.status.as_str(), e.step.as_str()) {
                ("CANCELLED", _) => return Ok(e.transfer()),
                ("COMPLETED", _) => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!("transfer {id} is already captured, it cannot be voided"),
                    ))
                }
                // A capture that is not being driven right now may still be rolled back: the void
                // discovers whether the remote service completed it meanwhile.
                (_, from @ ("held" | "capturing")) => {
                    let claimed = self
                        .claim(id, from, "voiding", None, usage, reason, resolved_by, false)
                        .await?;
                    if let Some(stamp) = claimed {
                        return self.drive(id, stamp).await;
                    }
                    if from == "capturing" {
                        return Err(LedgerError::FailedPrecondition(format!(
                            "transfer {id} is being captured, it cannot be voided"
                        )));
                    }
                }
                (_, "voiding") => {
                    return match self.take_over(&e).await? {
                        Some(stamp) => self.drive(id, stamp).await,
                        None => Err(LedgerError::Unavailable(
                            "this transfer's void is in progress, retry".into(),
                        )),
                    };
                }
                _ => return Ok(e.transfer()),
            }
        }
        Err(LedgerError::Unavailable("transfer is busy, retry".into()))
    }

    /// Runs the claimed resolution to its end; on a transient failure gives the lease back.
    async fn drive(&self, id: &str, stamp: i64) -> Result<TransferRow> {
        let e = self.must_entry(id).await?;
        let result = match e.step.as_str() {
            "capturing" => self.drive_capture(e, stamp).await,
            "voiding" => self.drive_void(e, stamp).await,
            _ => Ok(e.transfer()),
        };
        if let Err(err) = &result {
            if matches!(err, LedgerError::Unavailable(_)) {
                self.release(id, stamp).await;
            }
        }
        result
    }

    async fn drive_capture(&self, mut e: Entry, mut stamp: i64) -> Result<TransferRow> {
        let target = e.capture_amount.unwrap_or(e.amount);
        let hold = e
            .remote_id
            .clone()
            .ok_or_else(|| LedgerError::Internal(format!("transfer {} has no remote id", e.id)))?;
        if target == e.amount {
            return match self.confirm_remote(&hold).await? {
                Outcome::Completed => self.finish(&e, Outcome::Completed, target).await,
                Outcome::Cancelled => {
                    self.finish(&e, Outcome::Cancelled, 0).await?;
                    Err(LedgerError::FailedPrecondition(format!(
                        "the accounting service cancelled hold {} (expired?); nothing was charged",
                        e.id
                    )))
                }
            };
        }
        // Partial capture: the remote API confirms only whole transactions, so the actual amount
        // is charged by a second transaction and the hold is cancelled (docs/hosted.md).
        let charge = match e.capture_remote_id.clone() {
            Some(charge) => charge,
            None => {
                stamp = self.renew(&e.id, stamp).await?;
                let key = format!("{}-capture", e.id);
                let (sender, token) = (e.sender_email.clone(), e.token.clone());
                let (app_name, app_ep_path) = (e.app_name.clone(), e.app_ep_path.clone());
                let create = || {
                    self.remote
                        .create(&sender, target, &token, &app_name, &app_ep_path, &key)
                };
                let created = match self.retry(false, create).await {
                    Ok(tx) => tx,
                    Err(err) if err.is_conflict() && !e.hold_released => {
                        // Not enough funds beside the hold: release the hold, then charge.
                        self.release_hold(&mut e, stamp).await?;
                        stamp = self.renew(&e.id, stamp).await?;
                        // A new key: a service honouring keys would replay the refusal.
                        let key = format!("{}-capture-after-release", e.id);
                        let create = || {
                            self.remote.create(
                                &sender,
                                target,
                                &token,
                                &app_name,
                                &app_ep_path,
                                &key,
                            )
                        };
                        match self.retry(false, create).await {
                            Ok(tx) => tx,
                            Err(err @ RemoteError::Rejected { .. }) => {
                                let err = err.into_ledger();
                                tracing::error!(transfer = %e.id, error = %err, "actual amount could not be charged after releasing the hold");
                                self.finish(&e, Outcome::Cancelled, 0).await?;
                                return Err(err);
                            }
                            Err(err) => return Err(err.into_ledger()),
                        }
                    }
                    Err(err) => return Err(err.into_ledger()),
                };
                sqlx::query(
                    "UPDATE hosted_transfers SET capture_remote_id = $2 WHERE id = $1 AND updated_at = $3",
                )
                .bind(&e.id)
                .bind(&created.id)
                .bind(stamp)
                .execute(self.store.pool())
                .await?;
                e.capture_remote_id = Some(created.id.clone());
                created.id
            }
        };
        match self.confirm_remote(&charge).await? {
            Outcome::Completed => {}
            Outcome::Cancelled => {
                // Someone cancelled the charge transaction; forget it so a retry creates another.
                sqlx::query("UPDATE hosted_transfers SET capture_remote_id = NULL WHERE id = $1")
                    .bind(&e.id)
                    .execute(self.store.pool())
                    .await?;
                return Err(LedgerError::Unavailable(
                    "the accounting service cancelled the charge transaction, retry".into(),
                ));
            }
        }
        if !e.hold_released {
            self.release_hold(&mut e, stamp).await?;
        }
        self.finish(&e, Outcome::Completed, target).await
    }

    /// Cancels the remote hold of a partial capture and records that it is gone.
    async fn release_hold(&self, e: &mut Entry, stamp: i64) -> Result<()> {
        let hold = e.remote_id.clone().unwrap_or_default();
        match self.cancel_remote(&hold).await? {
            Outcome::Cancelled => {}
            Outcome::Completed => {
                return Err(LedgerError::Internal(format!(
                    "hold {hold} of transfer {} was completed by someone else",
                    e.id
                )))
            }
        }
        sqlx::query(
            "UPDATE hosted_transfers SET hold_released = TRUE WHERE id = $1 AND updated_at = $2",
        )
        .bind(&e.id)
        .bind(stamp)
        .execute(self.store.pool())
        .await?;
        e.hold_released = true;
        Ok(())
    }

    async fn drive_void(&self, e: Entry, _stamp: i64) -> Result<TransferRow> {
        let already = |captured: i64| {
            LedgerError::refused(
                Reason::TransferNotPending,
                format!(
                    "transfer {} was already captured for {captured} micros, it cannot be voided",
                    e.id
                ),
            )
        };
        if let Some(charge) = &e.capture_remote_id {
            if self.cancel_remote(charge).await? == Outcome::Completed {
                // The partial capture went through before the void: finish it.
                let target = e.capture_amount.unwrap_or(e.amount);
                if !e.hold_released {
                    let hold = e.remote_id.clone().unwrap_or_default();
                    self.cancel_remote(&hold).await?;
                }
                self.finish(&e, Outcome::Completed, target).await?;
                return Err(already(target));
            }
        }
        if !e.hold_released {
            if let Some(hold) = &e.remote_id {
                if self.cancel_remote(hold).await? == Outcome::Completed {
                    self.finish(&e, Outcome::Completed, e.amount).await?;
                    return Err(already(e.amount));
                }
            }
        }
        self.finish(&e, Outcome::Cancelled, 0).await
    }

    async fn confirm_remote(&self, remote_id: &str) -> Result<Outcome> {
        match self.retry(true, || self.remote.confirm(remote_id)).await {
            Ok(tx) if tx.status == "COMPLETED" => Ok(Outcome::Completed),
            Ok(tx) if tx.status == "CANCELLED" => Ok(Outcome::Cancelled),
            Ok(_) => Err(LedgerError::Unavailable(
                "the accounting service did not complete the transaction, retry".into(),
            )),
            Err(err) => self.reconcile(remote_id, err).await,
        }
    }

    async fn cancel_remote(&self, remote_id: &str) -> Result<Outcome> {
        match self.retry(true, || self.remote.cancel(remote_id)).await {
            Ok(tx) if tx.status == "COMPLETED" => Ok(Outcome::Completed),
            Ok(tx) if tx.status == "CANCELLED" => Ok(Outcome::Cancelled),
            Ok(_) => Err(LedgerError::Unavailable(
                "the accounting service did not cancel the transaction, retry".into(),
            )),
            Err(err) => self.reconcile(remote_id, err).await,
        }
    }

    /// After a refused or unanswered confirm/cancel: the transaction's actual state decides.
    async fn reconcile(&self, remote_id: &str, err: RemoteError) -> Result<Outcome> {
        if matches!(err, RemoteError::Unreachable(_)) {
            return Err(err.into_ledger());
        }
        let listed = self
            .retry(true, || self.remote.transactions(None))
            .await
            .map_err(RemoteError::into_ledger)?;
        match listed
            .iter()
            .find(|t| t.id == remote_id)
            .map(|t| t.status.as_str())
        {
            Some("COMPLETED") => Ok(Outcome::Completed),
            Some("CANCELLED") => Ok(Outcome::Cancelled),
            _ => Err(err.into_ledger()),
        }
    }

    /// Records the final state and the usage row in one local transaction.
    async fn finish(&self, e: &Entry, outcome: Outcome, captured: i64) -> Result<TransferRow> {
        let now = now_micros();
        let (status, resolved_by) = match outcome {
            Outcome::Completed => ("COMPLETED", "RECIPIENT"),
            Outcome::Cancelled => ("CANCELLED", e.resolved_by.as_deref().unwrap_or("RECIPIENT")),
        };
        let reason = if outcome == Outcome::Cancelled {
            if e.cancel_reason.is_empty() {
                "voided"
            } else {
                e.cancel_reason.as_str()
            }
        } else {
            ""
        };
        let usage: Option<UsageInput> = e
            .pending_usage
            .as_deref()
            .and_then(|u| serde_json::from_str(u).ok());
        let mut tx = self.store.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE hosted_transfers SET status = $2, captured = $3, step = 'done', token = '', \
             resolved_by = $4, resolved_at = $5, cancel_reason = $6, pending_usage = NULL, \
             updated_at = $5 WHERE id = $1 AND status = 'PENDING'",
        )
        .bind(&e.id)
        .bind(status)
        .bind(captured)
        .bind(resolved_by)
        .bind(now)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            if let Some(u) = &usage {
                crate::store::insert_usage(
                    &mut tx,
                    &new_id(),
                    self.owner_id,
                    crate::store::UsageLink::Hosted(&e.id),
                    captured,
                    u,
                    now,
                )
                .await?;
            }
        }
        tx.commit().await?;
        tracing::info!(transfer = %e.id, status, captured, "hosted transfer resolved");
        Ok(self.must_entry(&e.id).await?.transfer())
    }

    // ---------------------------------------------------------------- recovery

    /// One recovery pass: expired holds and abandoned resolutions are voided, stale creates are
    /// closed, and remote holds this ledger lost track of are cancelled.
    pub async fn recover(&self) -> Result<()> {
        let now = now_micros();
        let stale = now - self.lease_micros();
        let sql = format!(
            "SELECT {COLUMNS} FROM hosted_transfers WHERE status = 'PENDING' AND \
             ((step = 'held' AND expires_at <= $1) OR (step IN ('capturing', 'voiding') AND updated_at < $2)) \
             ORDER BY expires_at LIMIT 200"
        );
        let rows = sqlx::query(&sql)
            .bind(now)
            .bind(stale)
            .fetch_all(self.store.pool())
            .await?;
        for row in &rows {
            let e = entry_from_row(row)?;
            let (reason, by) = if e.step == "held" {
                ("hold expired", "SYSTEM")
            } else {
                ("abandoned by its driver", "SYSTEM")
            };
            let reason = if e.step == "voiding" && !e.cancel_reason.is_empty() {
                e.cancel_reason.clone()
            } else {
                reason.to_string()
            };
            let claimed = self
                .claim(&e.id, &e.step, "voiding", None, None, &reason, by, false)
                .await?;
            if let Some(stamp) = claimed {
                match self.drive(&e.id, stamp).await {
                    Ok(t) => {
                        crate::metrics::resolved(&t, now);
                        tracing::info!(transfer = %t.id, status = %t.status, "recovered hosted transfer");
                    }
                    Err(err) if err.error_code() == ErrorCode::FailedPrecondition => {
                        tracing::info!(transfer = %e.id, detail = %err, "recovered hosted transfer")
                    }
                    Err(err) => {
                        tracing::warn!(transfer = %e.id, error = %err, "recovery will retry")
                    }
                }
            }
        }
        // A create whose process died before the answer: its remote hold, if any, is an orphan.
        sqlx::query(
            "UPDATE hosted_transfers SET step = 'unknown', status = 'CANCELLED', token = '', \
             cancel_reason = 'interrupted while creating', error_kind = 'UNAVAILABLE', \
             error_message = 'the authorization was interrupted; retry with a new request id', \
             resolved_by = 'SYSTEM', resolved_at = $1 WHERE step = 'creating' AND created_at < $2",
        )
        .bind(now)
        .bind(stale)
        .execute(self.store.pool())
        .await?;
        // At most a few listings per lease: an orphan only becomes eligible after a lease anyway.
        let due = {
            let mut last = self
                .orphans_listed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last.is_none_or(|at| at.elapsed() >= self.config.lease / 4);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            self.sweep_orphans(stale).await?;
        }
        Ok(())
    }

    /// Cancels remote holds this ledger created but does not track (a create whose answer was
    /// lost, or a superseded charge transaction). A remote hold counts as ours only if it was
    /// created by the owner as recipient, for a sender this ledger was charging at that time, and
    /// is older than the lease; holds the owner creates by other means for other senders, or
    /// recently, are left alone.
    async fn sweep_orphans(&self, older_than: i64) -> Result<()> {
        // Only worth a remote listing while a doubtful create is recent enough to have left one.
        let doubtful: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM hosted_transfers WHERE created_at > $1 AND (step = 'unknown' OR \
             (capture_amount IS NOT NULL AND capture_amount < amount))",
        )
        .bind(older_than - 10 * self.lease_micros())
        .fetch_one(self.store.pool())
        .await?;
        if doubtful == 0 {
            return Ok(());
        }
        let pending = match self.remote.transactions(Some("PENDING")).await {
            Ok(list) => list,
            Err(e) => return Err(e.into_ledger()),
        };
        let candidates: Vec<RemoteTx> = pending
            .into_iter()
            .filter(|t| {
                t.status == "PENDING"
                    && t.recipient_email == self.config.email
                    && t.created_by == "RECIPIENT"
                    && t.created_at.is_some_and(|c| c < older_than)
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let tracked: HashSet<String> = sqlx::query(
            "SELECT remote_id, capture_remote_id FROM hosted_transfers WHERE status = 'PENDING'",
        )
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .flat_map(|r| {
            [
                r.try_get::<Option<String>, _>(0),
                r.try_get::<Option<String>, _>(1),
            ]
            .into_iter()
            .filter_map(|v| v.ok().flatten())
        })
        .collect();
        let window = self.lease_micros();
        for tx in candidates.iter().filter(|t| !tracked.contains(&t.id)) {
            let created = tx.created_at.unwrap_or_default();
            let ours: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM hosted_transfers WHERE sender_email = $1 \
                 AND created_at BETWEEN $2 AND $3",
            )
            .bind(&tx.sender_email)
            .bind(created - window)
            .bind(created + window)
            .fetch_one(self.store.pool())
            .await?;
            if ours == 0 {
                continue;
            }
            match self.cancel_remote(&tx.id).await {
                Ok(_) => {
                    tracing::info!(remote = %tx.id, sender = %tx.sender_email, "orphan remote hold cancelled")
                }
                Err(e) => {
                    tracing::warn!(remote = %tx.id, error = %e, "orphan remote hold not cancelled yet")
                }
            }
        }
        Ok(())
    }
}

/// Runs [`Hosted::recover`] forever.
pub async fn run_recovery(hosted: Arc<Hosted>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = hosted.recover().await {
            tracing::warn!(error = %e, "hosted recovery pass failed");
        }
    }
}
