//! The local journal of remote steps (`hosted_transfers`): every statement the hosted backend runs
//! on that table, and the lease that lets one driver at a time take a transfer's next remote step.
//!
//! `updated_at` is the lease stamp. Only the holder of the current stamp may move an entry on, so
//! two drivers can never both charge; a `held` entry has no driver, so any stamp on it is free.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::Any;

use super::entry::{Entry, Outcome, Step, COLUMNS};
use crate::domain::{Actor, Micros, TransferStatus};
use crate::error::{is_unique_violation, LedgerError, Result};
use crate::store::{
    new_id, now_micros, AuthorizeInput, Store, TransferFilter, TransferRow, UsageInput,
};
use syft_error::UsageStatus;

/// A new entry in step `creating`, written before the remote create: the hold as the core
/// validated it, for this ledger's owner.
pub(super) struct NewEntry<'a> {
    pub id: &'a str,
    /// Its sender, token, amount, app, endpoint and idempotency key are recorded.
    pub hold: &'a AuthorizeInput<'a>,
    pub request_hash: &'a str,
    /// The owner's (every transfer of a hosted ledger is its owner's), not the hold's.
    pub recipient_email: &'a str,
    pub currency: &'a str,
    pub now: i64,
    pub expires_at: i64,
}

/// A driver taking a transfer into a resolution: from step `from` to step `to`, with what the
/// resolution needs recorded before any remote call.
pub(super) struct Claim<'a> {
    pub from: Step,
    pub to: Step,
    /// A capture's target amount; `None` keeps what is recorded.
    pub capture_amount: Option<Micros>,
    /// The usage row written when the transfer is resolved; `None` keeps what is recorded.
    pub usage: Option<&'a UsageInput>,
    pub reason: &'a str,
    pub resolved_by: Actor,
    /// Refuse the claim once the hold has expired (captures).
    pub only_unexpired: bool,
}

/// Proof that this driver owns an entry's resolution: the stamp it last wrote into `updated_at`.
/// Renewed before every irreversible remote step; given back after a transient failure.
#[derive(Debug)]
pub(super) struct Lease {
    pub id: String,
    stamp: i64,
}

/// Whether a new entry was written or its key was already taken.
pub(super) enum Inserted {
    New,
    DuplicateKey,
}

pub(super) struct Journal {
    store: Arc<Store>,
    lease: Duration,
    /// The router owner's local account: usage rows of hosted transfers belong to it.
    owner_id: i64,
}

impl Journal {
    pub fn new(store: Arc<Store>, lease: Duration, owner_id: i64) -> Self {
        Self {
            store,
            lease,
            owner_id,
        }
    }

    pub fn owner_id(&self) -> i64 {
        self.owner_id
    }

    pub fn lease_micros(&self) -> i64 {
        self.lease.as_micros() as i64
    }

    fn pool(&self) -> &sqlx::AnyPool {
        self.store.pool()
    }

    /// Runs one write whose row count no caller reads.
    async fn run<'q>(&self, write: Query<'q, Any, AnyArguments<'q>>) -> Result<()> {
        write.execute(self.pool()).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- reads

    pub async fn entry(&self, id: &str) -> Result<Option<Entry>> {
        let sql = format!("SELECT {COLUMNS} FROM hosted_transfers WHERE id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The entry of an idempotency key, which is scoped per (recipient, sender).
    pub async fn entry_by_key(
        &self,
        recipient_email: &str,
        sender_email: &str,
        key: &str,
    ) -> Result<Option<Entry>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM hosted_transfers \
             WHERE recipient_email = $1 AND sender_email = $2 AND idempotency_key = $3"
        );
        Ok(sqlx::query_as(&sql)
            .bind(recipient_email)
            .bind(sender_email)
            .bind(key)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn must_entry(&self, id: &str) -> Result<Entry> {
        self.entry(id)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("transfer {id} not found")))
    }

    /// Transfers that held money, newest first, and whether more exist, by status, app and
    /// creation time. One owner: the account and role filters select every transfer of this
    /// ledger.
    pub async fn list(&self, filter: &TransferFilter) -> Result<(Vec<TransferRow>, bool)> {
        let limit = filter.page.limit;
        let sql = format!(
            "SELECT {COLUMNS} FROM hosted_transfers WHERE step NOT IN ('failed', 'unknown') \
             AND ($1 = '' OR status = $1) AND ($2 = '' OR id < $2) AND ($4 = '' OR app_name = $4) \
             AND created_at >= $5 AND created_at < $6 ORDER BY id DESC LIMIT $3"
        );
        let entries: Vec<Entry> = sqlx::query_as(&sql)
            .bind(filter.status.map_or("", |s| s.as_str()))
            .bind(filter.page.before_id.as_deref().unwrap_or(""))
            .bind(limit + 1)
            .bind(filter.app_name.as_deref().unwrap_or(""))
            .bind(filter.range.since.unwrap_or(i64::MIN))
            .bind(filter.range.until.unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await?;
        let mut transfers: Vec<TransferRow> = entries.iter().map(Entry::transfer).collect();
        let more = transfers.len() as i64 > limit;
        transfers.truncate(limit as usize);
        Ok((transfers, more))
    }

    // ---------------------------------------------------------------- authorize

    pub async fn insert(&self, e: &NewEntry<'_>) -> Result<Inserted> {
        let inserted = sqlx::query(
            "INSERT INTO hosted_transfers (id, idempotency_key, request_hash, sender_email, \
             recipient_email, token, amount, currency, status, step, app_name, app_ep_path, \
             created_at, expires_at, updated_at, attempt_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'PENDING', 'creating', $9, $10, $11, $12, $11, \
                     $13)",
        )
        .bind(e.id)
        .bind(e.hold.idempotency_key)
        .bind(e.request_hash)
        .bind(e.hold.sender_email)
        .bind(e.recipient_email)
        .bind(e.hold.token)
        .bind(e.hold.amount)
        .bind(e.currency)
        .bind(e.hold.app_name)
        .bind(e.hold.app_ep_path)
        .bind(e.now)
        .bind(e.expires_at)
        .bind(Some(e.hold.attempt_id).filter(|a| !a.is_empty()))
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => Ok(Inserted::New),
            Err(e) if is_unique_violation(&e) => Ok(Inserted::DuplicateKey),
            Err(e) => Err(e.into()),
        }
    }

    /// The remote create succeeded: the entry now holds money there. `false` when the entry was
    /// no longer creating (recovery closed it meanwhile: this process stalled past its lease).
    pub async fn mark_held(&self, id: &str, remote_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE hosted_transfers SET step = 'held', remote_id = $2, updated_at = $3 \
             WHERE id = $1 AND step = 'creating'",
        )
        .bind(id)
        .bind(remote_id)
        .bind(now_micros())
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets a create that certainly did not happen, so its key may be used again.
    pub async fn forget(&self, id: &str) -> Result<()> {
        let forget = "DELETE FROM hosted_transfers WHERE id = $1 AND step = 'creating'";
        self.run(sqlx::query(forget).bind(id)).await
    }

    /// Closes a create that holds no money (`failed`, or `unknown` when the remote may have
    /// created a hold that recovery then cancels), recording the error a replay returns.
    pub async fn mark_not_held(
        &self,
        id: &str,
        step: Step,
        reason: &str,
        err: &LedgerError,
    ) -> Result<()> {
        let now = now_micros();
        self.run(
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
            .bind(now),
        )
        .await
    }

    /// An entry still creating whose service created `remote_id`, another transaction than
    /// asked, which it is about to cancel and fail: once failed, it keeps the orphan sweep
    /// listing the service while it is recent ([`Journal::doubtful_since`]), in case the cancel
    /// did not go through.
    pub async fn note_remote(&self, id: &str, remote_id: &str) -> Result<()> {
        self.run(
            sqlx::query(
                "UPDATE hosted_transfers SET remote_id = $2 WHERE id = $1 AND step = 'creating'",
            )
            .bind(id)
            .bind(remote_id),
        )
        .await
    }

    // ---------------------------------------------------------------- the lease

    /// Moves a pending entry from `claim.from` to `claim.to`, taking the lease; `None` if someone
    /// else moved it or holds it.
    pub async fn claim(&self, id: &str, claim: &Claim<'_>) -> Result<Option<Lease>> {
        let now = now_micros();
        let usage = claim
            .usage
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
        .bind(claim.from)
        .bind(claim.to)
        .bind(claim.capture_amount)
        .bind(usage)
        .bind(claim.reason)
        .bind(claim.resolved_by)
        .bind(now)
        .bind(self.free_before(claim.from, now))
        .bind(i64::from(claim.only_unexpired))
        .execute(self.pool())
        .await?;
        Ok(self.leased(id, now, done.rows_affected()))
    }

    /// Keeps `usage` as the row a pending transfer's resolution writes, unless one is kept.
    pub async fn keep_usage(&self, id: &str, usage: &UsageInput) -> Result<()> {
        let usage =
            serde_json::to_string(usage).map_err(|e| LedgerError::Internal(e.to_string()))?;
        sqlx::query(
            "UPDATE hosted_transfers SET pending_usage = COALESCE(pending_usage, $2) \
             WHERE id = $1 AND status = 'PENDING'",
        )
        .bind(id)
        .bind(usage)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Lease stamps older than this are free. A `held` entry has no driver, so any stamp is free.
    fn free_before(&self, step: Step, now: i64) -> i64 {
        if step == Step::Held {
            i64::MAX
        } else {
            now - self.lease_micros()
        }
    }

    fn leased(&self, id: &str, stamp: i64, rows: u64) -> Option<Lease> {
        (rows == 1).then(|| Lease {
            id: id.to_string(),
            stamp,
        })
    }

    /// Takes over an in-progress resolution whose driver is gone or gave up.
    pub async fn take_over(&self, e: &Entry) -> Result<Option<Lease>> {
        let now = now_micros();
        let done = sqlx::query(
            "UPDATE hosted_transfers SET updated_at = $3 WHERE id = $1 AND step = $2 \
             AND status = 'PENDING' AND updated_at = $5 AND updated_at < $4",
        )
        .bind(&e.id)
        .bind(e.step)
        .bind(now)
        .bind(now - self.lease_micros())
        .bind(e.lease)
        .execute(self.pool())
        .await?;
        Ok(self.leased(&e.id, now, done.rows_affected()))
    }

    /// Renews the lease before an irreversible remote step; an error if another driver took over.
    pub async fn renew(&self, lease: &mut Lease) -> Result<()> {
        let now = now_micros().max(lease.stamp + 1);
        let done = sqlx::query(
            "UPDATE hosted_transfers SET updated_at = $3 WHERE id = $1 AND updated_at = $2 \
             AND status = 'PENDING'",
        )
        .bind(&lease.id)
        .bind(lease.stamp)
        .bind(now)
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 1 {
            lease.stamp = now;
            Ok(())
        } else {
            Err(taken_over())
        }
    }

    /// Gives up the lease after a transient failure, so a retry may continue at once
    /// ([`RELEASED`]).
    pub async fn release(&self, lease: &Lease) {
        let result = sqlx::query(
            "UPDATE hosted_transfers SET updated_at = $3 WHERE id = $1 AND updated_at = $2",
        )
        .bind(&lease.id)
        .bind(lease.stamp)
        .bind(RELEASED)
        .execute(self.pool())
        .await;
        if let Err(e) = result {
            tracing::warn!(transfer = %lease.id, error = %e, "could not release the lease; it expires by itself");
        }
    }

    // ---------------------------------------------------------------- resolution steps

    /// Records the charge transaction of a partial capture, only while `lease` is current: an
    /// error if another driver took the transfer over meanwhile (it has created, or will create,
    /// a charge of its own, so this one must never be confirmed).
    pub async fn set_charge(&self, lease: &Lease, remote_id: &str) -> Result<()> {
        let done = sqlx::query(
            "UPDATE hosted_transfers SET capture_remote_id = $2 WHERE id = $1 AND updated_at = $3",
        )
        .bind(&lease.id)
        .bind(remote_id)
        .bind(lease.stamp)
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(taken_over())
        }
    }

    /// Forgets a charge transaction someone cancelled, so a retry creates another.
    pub async fn clear_charge(&self, id: &str) -> Result<()> {
        let clear = "UPDATE hosted_transfers SET capture_remote_id = NULL WHERE id = $1";
        self.run(sqlx::query(clear).bind(id)).await
    }

    /// Records that the remote hold of a partial capture is cancelled.
    pub async fn mark_hold_released(&self, lease: &Lease) -> Result<()> {
        self.run(sqlx::query(
            "UPDATE hosted_transfers SET hold_released = TRUE WHERE id = $1 AND updated_at = $2",
        )
        .bind(&lease.id)
        .bind(lease.stamp))
        .await
    }

    /// The row of a void that found its transfer already cancelled (`store::late_void_row`).
    pub async fn late_void_row(&self, e: &Entry, usage: &UsageInput) -> Result<()> {
        let row = (
            self.owner_id,
            crate::store::UsageLink::Hosted(&e.id),
            e.amount,
        );
        let usage = usage.of_transfer(&e.sender_email, &e.app_name);
        crate::store::late_void_row(self.pool(), row, &usage, now_micros()).await
    }

    /// Records the final state and the usage row in one local transaction.
    pub async fn finish(
        &self,
        e: &Entry,
        outcome: Outcome,
        captured: Micros,
    ) -> Result<TransferRow> {
        let now = now_micros();
        let (status, resolved_by) = match outcome {
            Outcome::Completed => (TransferStatus::Completed, Actor::Recipient),
            Outcome::Cancelled => (
                TransferStatus::Cancelled,
                e.resolved_by.unwrap_or(Actor::Recipient),
            ),
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
        let failed_capture = outcome == Outcome::Cancelled
            && (e.step == Step::Capturing
                || (e.step == Step::Voiding
                    && e.resolved_by == Some(Actor::System)
                    && e.capture_amount.is_some()));
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE hosted_transfers SET status = $2, captured = $3, step = 'done', token = '', \
             resolved_by = $4, resolved_at = $5, cancel_reason = $6, updated_at = $5 \
             WHERE id = $1 AND status = 'PENDING'",
        )
        .bind(&e.id)
        .bind(status)
        .bind(captured)
        .bind(resolved_by)
        .bind(now)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        // The row to write is read now, under this transaction's lock, not from `e`: a caller
        // told "in progress" may have kept one while this driver's remote steps ran
        // (`keep_usage`), and the copy read before them wiped it.
        let pending: Option<String> = match done.rows_affected() {
            1 => {
                let kept =
                    sqlx::query_scalar("SELECT pending_usage FROM hosted_transfers WHERE id = $1")
                        .bind(&e.id)
                        .fetch_one(&mut *tx)
                        .await?;
                sqlx::query("UPDATE hosted_transfers SET pending_usage = NULL WHERE id = $1")
                    .bind(&e.id)
                    .execute(&mut *tx)
                    .await?;
                kept
            }
            _ => None,
        };
        let usage: Option<UsageInput> = pending
            .as_deref()
            .and_then(|u| serde_json::from_str::<UsageInput>(u).ok())
            .map(|u| u.of_transfer(&e.sender_email, &e.app_name))
            .map(|mut u| {
                // A capture's row on a transfer that ended cancelled (its capture failed for
                // good, or recovery voided it): its request was not answered as paid, and the
                // router's own `capture_refused` row would meet this one and be dropped. A row a
                // void brought is its own, and kept.
                if failed_capture {
                    u.status = UsageStatus::CaptureRefused.as_str().into();
                }
                u
            });
        if let Some(u) = &usage {
            let id = new_id();
            let write = crate::store::UsageWrite {
                id: &id,
                recipient_id: self.owner_id,
                link: crate::store::UsageLink::Hosted(&e.id),
                cost: captured,
                held: e.amount,
                usage: u,
                now,
            };
            crate::store::insert_usage(&mut tx, &write).await?;
        }
        tx.commit().await?;
        tracing::info!(transfer = %e.id, %status, captured = captured.get(), "hosted transfer resolved");
        let row = self.must_entry(&e.id).await?.transfer();
        // Counted by the statement that resolved it, as local transfers are (metrics.rs).
        if done.rows_affected() == 1 {
            crate::metrics::resolved(&row);
        }
        Ok(row)
    }

    // ---------------------------------------------------------------- recovery

    /// Pending entries recovery must void: expired holds, voids whose lease is older than
    /// `stale`, and captures whose lease is older than `stale` once their hold expired. Until
    /// then a capture waits for its caller's retry (which takes the lapsed lease over): a ledger
    /// killed mid-capture and back at once voided it after one lease, while its router was still
    /// retrying, and a streamed answer went uncharged.
    ///
    /// Expired holds are read apart, first, and resolutions least recently tried first:
    /// resolutions that keep failing (a void of a transaction the listing no longer shows) have
    /// the oldest expiries, and hundreds of them filled every page of one query ordered by
    /// expiry and kept the holds and abandoned captures behind them held.
    pub async fn abandoned(&self, now: i64, stale: i64) -> Result<Vec<Entry>> {
        let held = format!(
            "SELECT {COLUMNS} FROM hosted_transfers WHERE status = 'PENDING' AND step = 'held' \
             AND expires_at <= $1 ORDER BY expires_at LIMIT 200"
        );
        let mut entries: Vec<Entry> = sqlx::query_as(&held)
            .bind(now)
            .fetch_all(self.pool())
            .await?;
        let resolutions = format!(
            "SELECT {COLUMNS} FROM hosted_transfers WHERE status = 'PENDING' AND \
             ((step = 'voiding' AND updated_at < $2) \
              OR (step = 'capturing' AND updated_at < $2 AND expires_at <= $1)) \
             ORDER BY updated_at, expires_at LIMIT 200"
        );
        entries.extend(
            sqlx::query_as::<_, Entry>(&resolutions)
                .bind(now)
                .bind(stale)
                .fetch_all(self.pool())
                .await?,
        );
        Ok(entries)
    }

    /// Closes creates whose process died before the answer: a remote hold, if any, is an orphan.
    pub async fn close_interrupted_creates(&self, now: i64, created_before: i64) -> Result<()> {
        self.run(
            sqlx::query(
                "UPDATE hosted_transfers SET step = 'unknown', status = 'CANCELLED', token = '', \
             cancel_reason = 'interrupted while creating', error_kind = 'UNAVAILABLE', \
             error_message = 'the authorization was interrupted; send the request again', \
             resolved_by = 'SYSTEM', resolved_at = $1 WHERE step = 'creating' AND created_at < $2",
            )
            .bind(now)
            .bind(created_before),
        )
        .await
    }

    /// How many entries created or resolved after `since` may have left an untracked remote
    /// hold: an unknown create, a partial capture (its charge transaction, made at capture
    /// time, which may be long after the hold was created), or a different transaction that may be left held
    /// ([`Journal::note_remote`]).
    pub async fn doubtful_since(&self, since: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM hosted_transfers WHERE (created_at > $1 OR resolved_at > $1 \
             OR status = 'PENDING') AND (step = 'unknown' OR \
             (capture_amount IS NOT NULL AND capture_amount < amount) OR \
             (step = 'failed' AND remote_id IS NOT NULL))",
        )
        .bind(since)
        .fetch_one(self.pool())
        .await?)
    }

    /// Remote ids (holds and charges) of pending entries.
    pub async fn tracked_remote_ids(&self) -> Result<HashSet<String>> {
        let ids: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT remote_id, capture_remote_id FROM hosted_transfers WHERE status = 'PENDING'",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(ids
            .into_iter()
            .flat_map(|(hold, charge)| [hold, charge])
            .flatten()
            .collect())
    }

    /// Whether a capture of `sender` for `amount` is still open without a recorded charge: an
    /// untracked charge of that amount may be its own (its create's answer was lost, or the
    /// process stalled before recording it), which its retry takes up under the same key.
    /// Only a partial capture makes a charge, and only after its transfer was created.
    pub async fn open_capture_of(
        &self,
        sender: &str,
        amount: i64,
        created_at: i64,
    ) -> Result<bool> {
        let open = "status = 'PENDING' AND step = 'capturing' AND capture_amount = $2 \
             AND capture_amount < amount AND capture_remote_id IS NULL AND created_at <= $3";
        self.sender_has(sender, open, amount, created_at).await
    }

    /// Whether this ledger was charging `sender` between `from` and `to`: a transfer of theirs
    /// was pending then (from its create to its resolution, or its expiry while pending). A
    /// partial capture's charge is created at capture time, any time in the hold's life: only
    /// creates within a lease of the hold's counted, and a charge whose answer was lost late in a
    /// long stream stayed held on the service, untouched by the sweep.
    pub async fn charged_between(&self, sender: &str, from: i64, to: i64) -> Result<bool> {
        let pending = "created_at <= $3 AND COALESCE(resolved_at, expires_at) >= $2";
        self.sender_has(sender, pending, from, to).await
    }

    /// Whether a transfer of `sender` meets `condition` (over `$2` and `$3`).
    async fn sender_has(&self, sender: &str, condition: &str, a: i64, b: i64) -> Result<bool> {
        let sql = format!(
            "SELECT COUNT(*) FROM hosted_transfers WHERE sender_email = $1 AND {condition}"
        );
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(sender)
            .bind(a)
            .bind(b)
            .fetch_one(self.pool())
            .await?;
        Ok(n > 0)
    }
}

/// `updated_at` of a lease its driver gave back after a failure: older than any lease, so the
/// caller's retry (or its void) takes it over at once. Recovery leaves a capture alone until its
/// hold expires, given back or not (a driver that died keeps its last stamp): the router retries
/// a capture whose outcome it does not know until then, and a void from the sweep in between
/// would leave a delivered stream uncharged.
pub const RELEASED: i64 = 1;

/// A leased step found that another driver took the transfer over (its lease had lapsed).
fn taken_over() -> LedgerError {
    LedgerError::Unavailable("another ledger process took over this transfer, retry".into())
}
