//! `backend = hosted` as a [`TransferBackend`]: transfers are made on the remote accounting
//! service through [`Hosted`]'s journal; accounts and tokens stay the remote's (the trait's
//! defaults refuse them).

use std::sync::Arc;

use super::Hosted;
use crate::backend::{CaptureInput, Party, TransferBackend, VoidInput};
use crate::error::{LedgerError, Result};
use crate::store::{
    AccountRow, AuthorizeInput, HoldBudgets, Placed, Store, TransferFilter, TransferRow,
};
use syft_error::Reason;
use tokio_util::task::TaskTracker;

pub struct HostedBackend {
    hosted: Arc<Hosted>,
    /// The local mirror of the owner's account (its id and creation time).
    store: Arc<Store>,
    /// Captures and voids, each in a task of its own ([`Self::run_to_its_end`]); a stopping
    /// ledger waits for them within its grace (`serve_store`).
    resolutions: TaskTracker,
}

impl HostedBackend {
    pub fn new(hosted: Arc<Hosted>, store: Arc<Store>, resolutions: TaskTracker) -> Self {
        Self {
            hosted,
            store,
            resolutions,
        }
    }

    /// Runs an authorization or a resolution in a task of its own. Its remote steps take a lease
    /// on the transfer (an authorization, on its key); a caller that gave up (a router's deadline
    /// cancelling its gRPC call while the accounting service was slow) dropped them half-way
    /// with the lease kept, so every retry was told "in progress" until the lease ran out (12
    /// accounting timeouts, 2 minutes by default), while the service had charged or held. The
    /// task is tracked so that a graceful shutdown does not cut it the same way.
    async fn run_to_its_end<T: Send + 'static>(
        &self,
        resolution: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.resolutions
            .spawn(resolution)
            .await
            .map_err(|e| LedgerError::Internal(format!("hosted resolution task failed: {e}")))?
    }

    /// Whether `account_id` is the owner's, the one account a hosted ledger serves: every
    /// transfer is the owner's (the users' accounts live on the accounting service). Another
    /// local account (a former owner's after the ledger was handed to a new one, one left from a
    /// local ledger on the same database) was taken for the owner: it listed the owner's
    /// transfers and captured or voided them on the service with the owner's credentials.
    fn owners(&self, account_id: i64) -> bool {
        account_id == self.hosted.owner_id()
    }

    /// The answer to another account about a transfer of the owner's: as a local ledger's to a
    /// transfer not the caller's, it does not exist.
    fn not_theirs(transfer_id: &str) -> LedgerError {
        LedgerError::NotFound(format!("transaction {transfer_id} not found"))
    }
}

#[tonic::async_trait]
impl TransferBackend for HostedBackend {
    async fn authorize(&self, input: &AuthorizeInput<'_>) -> Result<Placed> {
        // The remote service keeps the money, so no local transaction can decide a budget
        // exactly: refuse rather than overspend (docs/limits.md).
        if !input.budgets.is_empty() {
            return Err(LedgerError::refused(
                Reason::NotSupported,
                "spend budgets need a local ledger; this ledger uses hosted accounting",
            ));
        }
        if !self.owners(input.recipient_id) {
            return Err(LedgerError::PermissionDenied(format!(
                "this ledger uses hosted accounting for {} only",
                self.hosted.owner_email()
            )));
        }
        // In a task of its own, as a resolution: a caller that gave up (a router's 5 s deadline,
        // shorter than the accounting timeout) cut the create after it was sent, the hold landed
        // on the service, and every retry of the key was told "in progress" for a lease while the
        // payer's money was held.
        let hosted = self.hosted.clone();
        let (recipient_id, amount, ttl_micros) =
            (input.recipient_id, input.amount, input.ttl_micros);
        let [recipient_email, sender_email, token, app_name, app_ep_path, key, attempt_id] = [
            input.recipient_email,
            input.sender_email,
            input.token,
            input.app_name,
            input.app_ep_path,
            input.idempotency_key,
            input.attempt_id,
        ]
        .map(str::to_owned);
        self.run_to_its_end(async move {
            let input = AuthorizeInput {
                recipient_id,
                recipient_email: &recipient_email,
                sender_email: &sender_email,
                amount,
                token: &token,
                app_name: &app_name,
                app_ep_path: &app_ep_path,
                idempotency_key: &key,
                attempt_id: &attempt_id,
                ttl_micros,
                budgets: HoldBudgets::default(),
            };
            hosted.authorize(&input).await
        })
        .await
    }

    async fn capture(&self, c: CaptureInput<'_>) -> Result<TransferRow> {
        if !self.owners(c.recipient_id) {
            return Err(Self::not_theirs(c.transfer_id));
        }
        // The money lives remotely, so the answer cannot share the capture's transaction: it is
        // written (synchronously) first, and served only once the transfer is COMPLETED.
        if let Some(a) = &c.answer {
            self.store
                .put_answer(c.transfer_id, c.recipient_id, &a.body, a.expires_at)
                .await?;
        }
        let (hosted, id, amount) = (self.hosted.clone(), c.transfer_id.to_string(), c.amount);
        let usage = c.usage.cloned();
        self.run_to_its_end(async move { hosted.capture(&id, amount, usage.as_ref()).await })
            .await
    }

    /// Every transfer of a hosted ledger is its one owner's: another account's void finds none.
    async fn void(&self, v: VoidInput<'_>) -> Result<TransferRow> {
        if !self.owners(v.recipient_id) {
            return Err(Self::not_theirs(v.transfer_id));
        }
        let actor = match v.by {
            Party::Recipient => "RECIPIENT",
            Party::Sender => "SENDER",
        };
        let (hosted, id, reason) = (
            self.hosted.clone(),
            v.transfer_id.to_string(),
            v.reason.to_string(),
        );
        let usage = v.usage.cloned();
        self.run_to_its_end(async move { hosted.void(&id, &reason, actor, usage.as_ref()).await })
            .await
    }

    async fn transfer(&self, id: &str) -> Result<Option<TransferRow>> {
        self.hosted.transfer(id).await
    }

    async fn list(&self, filter: &TransferFilter) -> Result<(Vec<TransferRow>, bool)> {
        // The accounting service keeps the tokens: no local transfer names one. Refused, not an
        // empty list, which a support lookup would read as "that token spent nothing".
        if filter.token_id.is_some() {
            return Err(crate::backend::not_supported("which token paid a transfer"));
        }
        // Another account is party to none of them (admin: `None`, every transfer).
        if filter.parties.account_id.is_some_and(|id| !self.owners(id)) {
            return Ok((Vec::new(), false));
        }
        self.hosted.list(filter).await
    }

    async fn account(&self, email: &str) -> Result<AccountRow> {
        let not_known = || {
            LedgerError::NotFound(format!(
                "account {email} is not known to this hosted ledger"
            ))
        };
        if email != self.hosted.owner_email() {
            return Err(not_known());
        }
        let mirror = self
            .store
            .account_by_email(email)
            .await?
            .ok_or_else(not_known)?;
        let remote = self.hosted.account().await?;
        Ok(AccountRow {
            organization: remote.organization,
            balance: remote.balance_micros.into(),
            held: remote.held_micros.into(),
            ..mirror
        })
    }
}
