//! Phase one: a hold on the remote service, journalled before the remote create.

use super::entry::{Outcome, Step};
use super::journal::{Inserted, NewEntry};
use super::remote::{RemoteError, RemoteTx};
use super::Hosted;
use crate::domain::TransferStatus;
use crate::error::{LedgerError, Result};
use crate::store::{new_id, now_micros, sha256_hex, AuthorizeInput, Placed};

impl Hosted {
    /// `input.recipient_*` are not used: every transfer of a hosted ledger is its owner's. The
    /// journal says whether this call placed the hold (its entry inserted here) or an earlier one
    /// under the key did, and which attempt that was, as the local backends do.
    pub async fn authorize(&self, input: &AuthorizeInput<'_>) -> Result<Placed> {
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
        let entry = NewEntry {
            id: &id,
            hold: input,
            request_hash: &request_hash,
            recipient_email: &self.config.email,
            currency: &self.currency,
            now,
            expires_at: now.saturating_add(input.ttl_micros),
        };
        if let Inserted::DuplicateKey = self.journal.insert(&entry).await? {
            return self.replay(input, &request_hash).await;
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
        match created {
            Ok(tx) => {
                // Not what was asked: another amount (a service that rounds), another payer or
                // recipient, or one already cancelled. (One completed on create has moved the
                // money, which no cancel gives back: it is kept as a hold, as it always was.)
                if tx.amount != input.amount
                    || !tx.sender_email.eq_ignore_ascii_case(input.sender_email)
                    || !tx.recipient_email.eq_ignore_ascii_case(&self.config.email)
                    || tx.status == Some(TransferStatus::Cancelled)
                    || self.foreign(&tx)
                {
                    return self.refuse_different(&id, &tx, input).await;
                }
                if tx.status == Some(TransferStatus::Completed) {
                    // The money moved at create: kept as the hold (no cancel gives it back), but
                    // a partial capture would charge beside it. Such a service is not supported.
                    tracing::error!(transfer = %id, remote = %tx.id,
                        "the accounting service completed a hold when creating it; this ledger does not support such a service (a partial capture would charge beside it)");
                }
                if !self.journal.mark_held(&id, &tx.id).await? {
                    // Recovery closed the attempt while the create was out (this process stalled
                    // past its lease): the hold it made is nobody's. Cancel it rather than answer
                    // with a transfer that is already cancelled.
                    self.cancel_unowned(&tx.id).await;
                    return Err(LedgerError::Unavailable(
                        "the hold was not recorded in time and is cancelled; retry".into(),
                    ));
                }
                tracing::debug!(transfer = %id, remote = %tx.id, sender = input.sender_email, amount = input.amount, "hosted hold placed");
                let row = self.journal.must_entry(&id).await?.transfer();
                Ok(Placed::by_this_call(row, input))
            }
            Err(e @ RemoteError::Rejected { status, .. })
                if status.as_u16() == 401 || status.as_u16() == 429 =>
            {
                // Not an answer about this transfer: forget the attempt so the key can be retried.
                self.journal.forget(&id).await?;
                Err(e.into_ledger())
            }
            Err(e @ RemoteError::Rejected { .. }) => {
                let err = e.into_ledger();
                if !proves_the_sender(&err) {
                    // The token did not prove the sender (unknown, another's) or the service did
                    // not say: the sender is only the caller's claim, so the refusal is not the
                    // key's outcome. Kept, it spent the named user's key for a stranger (as the
                    // local backends no longer let it, `store/authorize.rs`).
                    self.journal.forget(&id).await?;
                    return Err(err);
                }
                self.journal
                    .mark_not_held(&id, Step::Failed, "refused by the accounting service", &err)
                    .await?;
                Err(err)
            }
            Err(RemoteError::Unreachable(m)) => {
                self.journal.forget(&id).await?;
                Err(RemoteError::Unreachable(m).into_ledger())
            }
            Err(e @ RemoteError::Unknown(_)) => {
                let err = e.into_ledger();
                self.journal
                    .mark_not_held(
                        &id,
                        Step::Unknown,
                        "outcome unknown; a remote hold, if placed, is cancelled by recovery",
                        &err,
                    )
                    .await?;
                Err(err)
            }
        }
    }

    /// The outcome of an earlier authorization by the same sender with the same key.
    async fn replay(&self, input: &AuthorizeInput<'_>, request_hash: &str) -> Result<Placed> {
        let key = input.idempotency_key;
        let e = self
            .journal
            .entry_by_key(&self.config.email, input.sender_email, key)
            .await?
            .ok_or_else(|| LedgerError::Unavailable("concurrent authorization, retry".into()))?;
        if e.request_hash != request_hash {
            return Err(crate::store::key_reused(key));
        }
        match e.step {
            // A refusal of the service's: the same refusal again.
            Step::Failed => Err(e.recorded_error()),
            Step::Creating => Err(LedgerError::Unavailable(
                "an authorization with this key is in progress, retry".into(),
            )),
            // Done, held or resolving; or closed after a create whose outcome was unknown: that
            // entry is cancelled here for good (a remote hold it left is an orphan the recovery
            // sweep cancels), so a replay answers with the cancelled transfer and its caller
            // learns at once that nothing was charged. It used to answer the first call's
            // `UNAVAILABLE` for good, which a router takes for an unknown outcome and asks again
            // about for 30 s on every retry of the request id.
            _ => Ok(Placed::earlier(e.transfer(), e.attempt_id.clone())),
        }
    }
}

impl Hosted {
    /// The service created another transaction than the one asked for (another amount: a service
    /// that rounds to cents; another payer): a capture would confirm it as it is, charging the
    /// user what was never authorized here. It is cancelled and the attempt fails for good (a
    /// replay of the key gets the same refusal); a cancel that does not go through leaves it to
    /// the orphan sweep. Before 2026-12-04 it was only logged, and held.
    async fn refuse_different(
        &self,
        id: &str,
        tx: &RemoteTx,
        input: &AuthorizeInput<'_>,
    ) -> Result<Placed> {
        tracing::error!(transfer = %id, remote = %tx.id, asked = input.amount, created = tx.amount,
            "the accounting service created a different transaction; cancelling it");
        let err = LedgerError::FailedPrecondition(format!(
            "the accounting service created another transaction than asked ({} micros from {} to \
             {}, {}, {}; not {} {} from {}, pending); it is cancelled",
            tx.amount,
            tx.sender_email,
            tx.recipient_email,
            tx.currency.as_deref().unwrap_or("currency unnamed"),
            tx.status.map_or("status unknown", |s| s.as_str()),
            input.amount,
            self.currency,
            input.sender_email
        ));
        // Named on the entry first: the sweep lists the service only while a doubtful entry is
        // recent, and one naming this transaction is (a cancel that fails below, or a crash
        // before the entry is closed, left it held and nothing listing for it).
        self.journal.note_remote(id, &tx.id).await?;
        self.cancel_unowned(&tx.id).await;
        let reason = "the accounting service created another transaction";
        self.journal
            .mark_not_held(id, Step::Failed, reason, &err)
            .await?;
        Err(err)
    }

    /// Cancels a remote hold no journal entry owns; one that does not go through is left to the
    /// orphan sweep.
    async fn cancel_unowned(&self, remote_id: &str) {
        match self.cancel_remote(remote_id).await {
            Ok(Outcome::Cancelled) => {}
            // The money moved and no cancel gives it back: an operator must look.
            Ok(Outcome::Completed) => {
                tracing::error!(remote = %remote_id, "a transaction this ledger did not keep was completed on the accounting service; it cannot be cancelled")
            }
            Err(e) => {
                tracing::warn!(remote = %remote_id, error = %e, "not cancelled; the orphan sweep will")
            }
        }
    }
}

/// Whether the service's refusal of a create says the token was the sender's own, live or once,
/// and is one a local ledger keeps as the key's outcome (a replay answers it again). A daily
/// limit's or a budget's is not kept there either: it may pass once the window has room.
fn proves_the_sender(err: &LedgerError) -> bool {
    use syft_error::Reason;
    matches!(
        err.reason(),
        Some(
            Reason::InsufficientFunds
                | Reason::TokenLimitExceeded
                | Reason::TokenRevoked
                | Reason::TokenExpired
        )
    )
}
