//! Recovery: what the ledger does on start and every sweep so that no remote hold outlives the
//! journal's knowledge of it. It voids, never captures (docs/hosted.md).

use std::sync::Arc;
use std::time::Duration;
use syft_error::ErrorCode;

use super::entry::Step;
use super::journal::Claim;
use super::remote::RemoteTx;
use super::Hosted;
use crate::domain::{Actor, TransferStatus};
use crate::error::Result;
use crate::store::now_micros;

impl Hosted {
    /// One recovery pass: expired holds and abandoned resolutions are voided, stale creates are
    /// closed, and remote holds this ledger lost track of are cancelled.
    pub async fn recover(&self) -> Result<()> {
        let now = now_micros();
        let stale = now - self.journal.lease_micros();
        for e in self.journal.abandoned(now, stale).await? {
            let reason = if e.step == Step::Voiding && !e.cancel_reason.is_empty() {
                e.cancel_reason.clone()
            } else if e.step == Step::Held {
                crate::store::CANCEL_EXPIRED.to_string()
            } else {
                "abandoned by its driver".to_string()
            };
            let claim = Claim {
                from: e.step,
                to: Step::Voiding,
                capture_amount: None,
                usage: None,
                reason: &reason,
                resolved_by: Actor::System,
                only_unexpired: false,
            };
            if let Some(lease) = self.journal.claim(&e.id, &claim).await? {
                match self.drive_kept(lease).await {
                    Ok(t) => {
                        tracing::info!(transfer = %t.id, status = %t.status, "recovered hosted transfer");
                    }
                    Err(m) if m.error_code() == ErrorCode::FailedPrecondition => {
                        tracing::info!(transfer = %e.id, detail = %m, "recovered hosted transfer")
                    }
                    Err(err) => {
                        tracing::warn!(transfer = %e.id, error = %err, "recovery will retry")
                    }
                }
            }
        }
        // A create whose process died before the answer: its remote hold, if any, is an orphan.
        self.journal.close_interrupted_creates(now, stale).await?;
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
        let window = self.journal.lease_micros();
        // Only worth a remote listing while a doubtful create is recent enough to have left one.
        if self
            .journal
            .doubtful_since(older_than - 10 * window)
            .await?
            == 0
        {
            return Ok(());
        }
        let pending = match self
            .remote
            .transactions(Some(TransferStatus::Pending.as_str()))
            .await
        {
            Ok(list) => list,
            Err(e) => return Err(e.into_ledger()),
        };
        let candidates: Vec<RemoteTx> = pending
            .into_iter()
            .filter(|t| {
                t.status == Some(TransferStatus::Pending)
                    && t.recipient_email == self.config.email
                    && t.created_by == Some(Actor::Recipient)
                    && t.created_at.is_some_and(|c| c < older_than)
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let tracked = self.journal.tracked_remote_ids().await?;
        for tx in candidates.iter().filter(|t| !tracked.contains(&t.id)) {
            let created = tx.created_at.unwrap_or_default();
            if !self
                .journal
                .charged_between(&tx.sender_email, created - window, created + window)
                .await?
            {
                continue;
            }
            // An open capture's charge whose answer was lost: cancelled, the capture's retry
            // would get it back cancelled under the same key, and the answer go uncharged. The
            // capture's own end (or recovery's void once its hold expired) settles it.
            if self
                .journal
                .open_capture_of(&tx.sender_email, tx.amount, created)
                .await?
            {
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
