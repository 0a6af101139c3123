//! Phase two: capture or void a remote hold. A caller first claims the transfer (taking its
//! lease), then drives the resolution's remote steps to the end.

use super::entry::{Entry, Outcome, Step};
use super::journal::{Claim, Lease};
use super::remote::{RemoteError, RemoteTx};
use super::Hosted;
use crate::domain::{Actor, Micros, TransferStatus};
use crate::error::{LedgerError, Result};
use crate::store::{now_micros, CaptureAmount, TransferRow, UsageInput};
use syft_error::Reason;

/// Keys a partial capture's charge may take ([`Hosted::remote_charge`]): past as many cancelled
/// charges, the capture is refused rather than create more.
const CHARGE_KEYS: u32 = 4;

impl Hosted {
    pub async fn capture(
        &self,
        id: &str,
        amount: CaptureAmount,
        usage: Option<&UsageInput>,
    ) -> Result<TransferRow> {
        for _ in 0..3 {
            let e = self.journal.must_entry(id).await?;
            let target = match amount {
                CaptureAmount::Full => e.amount,
                CaptureAmount::Micros(m) if m > e.amount.get() => {
                    return Err(LedgerError::invalid(format!(
                        "capture amount {m} exceeds the authorized {} micros",
                        e.amount.get()
                    )))
                }
                CaptureAmount::Micros(m) => Micros::new(m),
            };
            match (e.status, e.step) {
                (TransferStatus::Completed, _) if e.captured == target => return Ok(e.transfer()),
                (TransferStatus::Completed, _) => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!(
                            "transfer {id} was already captured for {} micros",
                            e.captured.get()
                        ),
                    ))
                }
                (TransferStatus::Cancelled, _) => {
                    return Err(LedgerError::refused(
                        crate::store::cancelled_reason(&e.cancel_reason, e.resolved_by),
                        format!(
                            "transfer {id} is cancelled ({}), it cannot be captured",
                            e.cancel_reason
                        ),
                    ))
                }
                (_, Step::Held) => {
                    if e.expires_at <= now_micros() {
                        return Err(LedgerError::refused(
                            Reason::HoldExpired,
                            format!("hold {id} expired, it can no longer be captured"),
                        ));
                    }
                    let claim = Claim {
                        from: Step::Held,
                        to: Step::Capturing,
                        capture_amount: Some(target),
                        usage,
                        reason: "",
                        resolved_by: Actor::Recipient,
                        only_unexpired: true,
                    };
                    if let Some(lease) = self.journal.claim(id, &claim).await? {
                        return self.drive(lease).await;
                    }
                }
                (_, Step::Capturing) => {
                    if e.capture_amount != Some(target) {
                        return Err(LedgerError::FailedPrecondition(format!(
                            "transfer {id} is being captured for {} micros",
                            e.capture_amount.unwrap_or(e.amount).get()
                        )));
                    }
                    return match self.journal.take_over(&e).await? {
                        Some(lease) => self.drive(lease).await,
                        None => Err(LedgerError::Unavailable(
                            "this transfer's capture is in progress, retry".into(),
                        )),
                    };
                }
                (_, Step::Voiding) => {
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
        let resolved_by: Actor = resolved_by
            .parse()
            .map_err(|e: crate::domain::UnknownText| LedgerError::Internal(e.to_string()))?;
        for _ in 0..3 {
            let e = self.journal.must_entry(id).await?;
            match (e.status, e.step) {
                (TransferStatus::Cancelled, _) => {
                    // As the local backend does (`store::late_void_row`): a void after the
                    // expiry sweep's still leaves its request's row.
                    if let Some(usage) = usage {
                        self.journal.late_void_row(&e, usage).await?;
                    }
                    return Ok(e.transfer());
                }
                (TransferStatus::Completed, _) => {
                    return Err(LedgerError::refused(
                        Reason::TransferNotPending,
                        format!("transfer {id} is already captured, it cannot be voided"),
                    ))
                }
                // A capture that is not being driven right now may still be rolled back: the void
                // discovers whether the remote service completed it meanwhile.
                (_, from @ (Step::Held | Step::Capturing)) => {
                    let claim = Claim {
                        from,
                        to: Step::Voiding,
                        capture_amount: None,
                        usage,
                        reason,
                        resolved_by,
                        only_unexpired: false,
                    };
                    if let Some(lease) = self.journal.claim(id, &claim).await? {
                        return self.drive(lease).await;
                    }
                    if from == Step::Capturing {
                        return Err(LedgerError::FailedPrecondition(format!(
                            "transfer {id} is being captured, it cannot be voided"
                        )));
                    }
                }
                (_, Step::Voiding) => {
                    return match self.journal.take_over(&e).await? {
                        Some(lease) => self.drive(lease).await,
                        None => {
                            // Another driver (recovery, retrying a void that keeps failing once
                            // a lease) holds it: the caller's row is kept for its end, in case
                            // the caller gives up first.
                            if let Some(usage) = usage {
                                self.journal.keep_usage(id, usage).await?;
                            }
                            Err(LedgerError::Unavailable(
                                "this transfer's void is in progress, retry".into(),
                            ))
                        }
                    };
                }
                _ => return Ok(e.transfer()),
            }
        }
        Err(LedgerError::Unavailable("transfer is busy, retry".into()))
    }

    /// Runs the claimed resolution to its end; on a failure gives the lease back (a no-op once
    /// the transfer is resolved), so a void that follows a refused capture claims it at once
    /// rather than after the lease, or, now that recovery leaves captures to their callers,
    /// after the hold's whole life.
    pub(super) async fn drive(&self, lease: Lease) -> Result<TransferRow> {
        self.drive_then(lease, true).await
    }

    /// Recovery's [`Hosted::drive`]: a failure keeps the lease's stamp, so the transfer is
    /// tried again a lease later, not at the next sweep. Given back at once, 200 voids that
    /// cannot finish (a transaction the listing no longer shows) came first in every sweep's page
    /// of abandoned transfers, and no expired hold behind them was ever released.
    pub(super) async fn drive_kept(&self, lease: Lease) -> Result<TransferRow> {
        self.drive_then(lease, false).await
    }

    async fn drive_then(&self, mut lease: Lease, give_back: bool) -> Result<TransferRow> {
        let e = self.journal.must_entry(&lease.id).await?;
        let result = match e.step {
            Step::Capturing => self.drive_capture(e, &mut lease).await,
            Step::Voiding => self.drive_void(e).await,
            _ => Ok(e.transfer()),
        };
        if result.is_err() && give_back {
            self.journal.release(&lease).await;
        }
        result
    }

    async fn drive_capture(&self, mut e: Entry, lease: &mut Lease) -> Result<TransferRow> {
        let target = e.capture_amount.unwrap_or(e.amount);
        let hold = e
            .remote_id
            .clone()
            .ok_or_else(|| LedgerError::Internal(format!("transfer {} has no remote id", e.id)))?;
        if target == e.amount {
            return match self.confirm_remote(&hold).await? {
                Outcome::Completed => self.journal.finish(&e, Outcome::Completed, target).await,
                Outcome::Cancelled => {
                    self.journal
                        .finish(&e, Outcome::Cancelled, Micros::ZERO)
                        .await?;
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
                let created = self.create_charge(&mut e, lease, target).await?;
                if let Err(err) = self.journal.set_charge(lease, &created).await {
                    self.superseded_charge(&e.id, &created).await;
                    return Err(err);
                }
                e.capture_remote_id = Some(created.clone());
                created
            }
        };
        // Confirming moves the money: only while this driver still holds the transfer.
        self.journal.renew(lease).await?;
        match self.confirm_remote(&charge).await? {
            Outcome::Completed => {}
            Outcome::Cancelled => {
                // Someone cancelled the charge transaction; forget it so a retry creates another.
                self.journal.clear_charge(&e.id).await?;
                return Err(LedgerError::Unavailable(
                    "the accounting service cancelled the charge transaction, retry".into(),
                ));
            }
        }
        if !e.hold_released {
            self.release_hold(&mut e, lease).await?;
        }
        self.journal.finish(&e, Outcome::Completed, target).await
    }

    /// Our lease lapsed while `charge` was created (a stalled process) and another driver owns
    /// the capture now: confirming this charge too could charge twice on a service that ignores
    /// idempotency keys, so it is never confirmed. It is cancelled once that is safe: the
    /// transfer is resolved (the other driver's charge, if it was this same transaction, is
    /// completed and the cancel is refused), or the other driver recorded a different charge.
    /// The same id, still pending, means a service that honours keys gave both drivers one
    /// transaction, which must stay; nothing recorded yet, the orphan sweep decides later.
    async fn superseded_charge(&self, id: &str, charge: &str) {
        let Ok(Some(now)) = self.journal.entry(id).await else {
            return;
        };
        let other = now.capture_remote_id.as_deref();
        if now.status != TransferStatus::Pending || other.is_some_and(|c| c != charge) {
            if let Err(e) = self.cancel_remote(charge).await {
                tracing::warn!(%charge, error = %e, "superseded charge not cancelled; the orphan sweep will");
            }
        }
    }

    /// Creates the transaction that charges a partial capture's `target`; returns its remote id.
    async fn create_charge(
        &self,
        e: &mut Entry,
        lease: &mut Lease,
        target: Micros,
    ) -> Result<String> {
        if !e.hold_released {
            self.journal.renew(lease).await?;
            match self.remote_charge(e, target, "capture").await {
                Ok(tx) => return self.accept_charge(e, tx, target).await,
                // Not enough room beside the hold (funds, or the token's limits, which count the
                // hold too): release the hold, then charge.
                Err(err) if err.may_be_the_hold() => self.release_hold(e, lease).await?,
                Err(err) => return Err(err.into_ledger()),
            }
        }
        // The hold is gone (just now, or in an earlier attempt of this capture): a key of its
        // own, because a service honouring keys would replay the refusal the first one got.
        self.journal.renew(lease).await?;
        match self.remote_charge(e, target, "capture-after-release").await {
            Ok(tx) => self.accept_charge(e, tx, target).await,
            Err(err) if err.refuses_the_payer() => {
                let err = err.into_ledger();
                tracing::error!(transfer = %e.id, error = %err, "actual amount could not be charged after releasing the hold");
                // Still ours to close: a stalled driver must not cancel a capture another one
                // has since taken over (and perhaps charged).
                self.journal.renew(lease).await?;
                self.journal
                    .finish(e, Outcome::Cancelled, Micros::ZERO)
                    .await?;
                Err(err)
            }
            // Throttled, this ledger's credentials, the service's trouble: the capture stays
            // open with its hold released, and a retry charges under the same key.
            Err(err) => Err(err.into_ledger()),
        }
    }

    /// The charge the service created, if it is the one asked: another amount or payer (a
    /// service that rounds, a bug) is cancelled, never confirmed, and the capture refused; the
    /// router then voids, and the user pays nothing rather than what it did not agree to.
    async fn accept_charge(&self, e: &Entry, tx: RemoteTx, target: Micros) -> Result<String> {
        if tx.amount == target.get()
            && tx.sender_email.eq_ignore_ascii_case(&e.sender_email)
            && !self.foreign(&tx)
            && tx.status != Some(TransferStatus::Cancelled)
        {
            return Ok(tx.id);
        }
        tracing::error!(transfer = %e.id, remote = %tx.id, asked = target.get(), created = tx.amount,
            "the accounting service created another charge than asked; cancelling it");
        if let Err(err) = self.cancel_remote(&tx.id).await {
            tracing::error!(transfer = %e.id, remote = %tx.id, error = %err,
                "the wrong charge could not be cancelled; cancel it on the accounting service");
        }
        Err(LedgerError::FailedPrecondition(format!(
            "the accounting service created another charge than asked ({} micros from {}, not {} \
             from {}); it is cancelled and the capture refused",
            tx.amount,
            tx.sender_email,
            target.get(),
            e.sender_email
        )))
    }

    /// Creates `target` as a transaction of the entry's sender and token, under the idempotency
    /// key `<transfer id>-<suffix>`. A key whose charge was cancelled before its confirm (the
    /// orphan sweep racing a retry, the service expiring it, an operator) is spent: a service
    /// honouring keys answers that cancelled transaction for good, and the capture could never
    /// charge (each retry got it back until the hold expired). The next key, `<suffix>-2`, `-3`,
    /// … is then tried, the same sequence on every retry.
    async fn remote_charge(
        &self,
        e: &Entry,
        target: Micros,
        suffix: &str,
    ) -> std::result::Result<RemoteTx, RemoteError> {
        let mut n = 1;
        loop {
            let key = match n {
                1 => format!("{}-{suffix}", e.id),
                n => format!("{}-{suffix}-{n}", e.id),
            };
            let tx = self
                .retry(false, || {
                    self.remote.create(
                        &e.sender_email,
                        target.get(),
                        &e.token,
                        &e.app_name,
                        &e.app_ep_path,
                        &key,
                    )
                })
                .await?;
            if tx.status != Some(TransferStatus::Cancelled) || n == CHARGE_KEYS {
                return Ok(tx);
            }
            n += 1;
        }
    }

    /// Cancels the remote hold of a partial capture and records that it is gone.
    async fn release_hold(&self, e: &mut Entry, lease: &Lease) -> Result<()> {
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
        self.journal.mark_hold_released(lease).await?;
        e.hold_released = true;
        Ok(())
    }

    async fn drive_void(&self, e: Entry) -> Result<TransferRow> {
        let already = |captured: Micros| {
            LedgerError::refused(
                Reason::TransferNotPending,
                format!(
                    "transfer {} was already captured for {} micros, it cannot be voided",
                    e.id,
                    captured.get()
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
                self.journal.finish(&e, Outcome::Completed, target).await?;
                return Err(already(target));
            }
        }
        if !e.hold_released {
            if let Some(hold) = &e.remote_id {
                if self.cancel_remote(hold).await? == Outcome::Completed {
                    self.journal
                        .finish(&e, Outcome::Completed, e.amount)
                        .await?;
                    return Err(already(e.amount));
                }
            }
        }
        self.journal
            .finish(&e, Outcome::Cancelled, Micros::ZERO)
            .await
    }

    async fn confirm_remote(&self, remote_id: &str) -> Result<Outcome> {
        match self.retry(true, || self.remote.confirm(remote_id)).await {
            Ok(tx) => outcome(&tx).ok_or_else(|| {
                LedgerError::Unavailable(
                    "the accounting service did not complete the transaction, retry".into(),
                )
            }),
            Err(err) => self.reconcile(remote_id, err).await,
        }
    }

    pub(super) async fn cancel_remote(&self, remote_id: &str) -> Result<Outcome> {
        match self.retry(true, || self.remote.cancel(remote_id)).await {
            Ok(tx) => outcome(&tx).ok_or_else(|| {
                LedgerError::Unavailable(
                    "the accounting service did not cancel the transaction, retry".into(),
                )
            }),
            Err(err) => self.reconcile(remote_id, err).await,
        }
    }

    /// After a refused or unanswered confirm/cancel: the transaction's actual state decides.
    async fn reconcile(&self, remote_id: &str, err: RemoteError) -> Result<Outcome> {
        if matches!(err, RemoteError::Unreachable(_)) || throttled(&err) {
            return Err(resolution_error(err));
        }
        // The listing's own failure says nothing about the transaction: a refused listing (a
        // service capping `limit`, a gateway's 403) was the capture's refusal, and the router
        // voided and withheld an answer the service had charged for.
        let listed = self
            .retry(true, || self.remote.transactions(None))
            .await
            .map_err(|listing| {
                tracing::error!(remote = %remote_id, error = ?err, listing = ?listing,
                    "a refused confirm or cancel whose transaction cannot be listed; its outcome is unknown until it can be read");
                LedgerError::Unavailable(format!(
                    "the accounting service refused the call and its transactions cannot be listed ({}); the outcome of {remote_id} is unknown, retry",
                    listing.into_ledger()
                ))
            })?;
        match listed.iter().find(|t| t.id == remote_id) {
            Some(tx) => match outcome(tx) {
                Some(outcome) => Ok(outcome),
                // Still pending: the refusal is real (nothing moved), and its caller sees it.
                None => Err(resolution_error(err)),
            },
            // Not in the listing (a service that lists a recent page only, or ignores `limit`):
            // a repeated confirm's "not pending" may mean it went through, so the outcome is
            // unknown, never a refusal: a capture answered "refused" while the service charged
            // the user withheld the answer they paid for.
            None => {
                tracing::error!(remote = %remote_id, error = ?err,
                    "a refused confirm or cancel of a transaction the listing does not show; its outcome is unknown until it can be read");
                Err(LedgerError::Unavailable(format!(
                    "the accounting service refused the call and does not list transaction {remote_id}; its outcome is unknown, retry"
                )))
            }
        }
    }
}

/// A remote transaction that is resolved, and how; `None` while it is pending (or unreadable).
fn outcome(tx: &RemoteTx) -> Option<Outcome> {
    match tx.status? {
        TransferStatus::Completed => Some(Outcome::Completed),
        TransferStatus::Cancelled => Some(Outcome::Cancelled),
        TransferStatus::Pending => None,
    }
}

/// Whether the service answered 429: to a confirm, a cancel or the listing that reconciles them,
/// that is the service throttling this ledger (its address locked, a rate limit), never an answer
/// about the transfer (they spend no limit).
fn throttled(err: &RemoteError) -> bool {
    matches!(err, RemoteError::Rejected { status, .. } if *status == reqwest::StatusCode::TOO_MANY_REQUESTS)
}

/// A resolution's failure as its caller sees it. A throttled one is `UNAVAILABLE`: the lease is
/// given back and the caller retries. Taken as a refusal, the router voided, the void waited for
/// the lease, and recovery then voided a hold whose answer had been served.
fn resolution_error(err: RemoteError) -> LedgerError {
    match err {
        RemoteError::Rejected {
            status, message, ..
        } if status == reqwest::StatusCode::TOO_MANY_REQUESTS => LedgerError::Unavailable(format!(
            "the accounting service is throttling this ledger ({message}); retry"
        )),
        other => other.into_ledger(),
    }
}
