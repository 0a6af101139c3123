//! Where transfers (and, for the local backend, accounts and tokens) live.
//!
//! The [`crate::core::Ledger`] core authenticates, validates and applies the rules that do not
//! depend on where money is kept; a [`TransferBackend`] performs the operation. Two backends:
//! [`LocalBackend`] keeps balances in the ledger's own database; `crate::hosted::Hosted` makes
//! the transfers on a remote Syft accounting service. Account and token management exist only
//! locally: the trait's default methods refuse them with `NOT_SUPPORTED`, so the core never asks
//! which backend it runs on.

use std::sync::Arc;

use syft_error::Reason;

use crate::domain::Micros;
use crate::error::{LedgerError, Result};
use crate::store::{
    now_micros, AccountRow, AnswerWrite, AuthorizeInput, CaptureAmount, DirectInput, IssuedToken,
    Keyset, Placed, RefundInput, RefundRow, Refunded, Resolution, ResolveInput, Store, TokenFilter,
    TokenGrant, TokenRow, TransferFilter, TransferRow, UsageInput,
};

/// Who resolves a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    /// The recipient (a router capturing or voiding its hold).
    Recipient,
    /// The sender of a direct transfer it created itself (REST API).
    Sender,
}

pub(crate) fn not_supported(what: &str) -> LedgerError {
    LedgerError::refused(
        Reason::NotSupported,
        format!(
            "{what} is managed by the hosted accounting service (this ledger runs backend = hosted)"
        ),
    )
}

/// An account to create (checked by the core); only the secret's hash is stored.
#[derive(Debug, Clone, Copy)]
pub struct NewAccountRow<'a> {
    pub email: &'a str,
    pub organization: &'a str,
    pub currency: &'a str,
    pub secret_hash: &'a str,
}

/// A capture the core checked: `recipient_id`'s pending hold `transfer_id`, with the usage row to
/// record and the answer to store for replay.
pub struct CaptureInput<'a> {
    pub recipient_id: i64,
    pub transfer_id: &'a str,
    pub amount: CaptureAmount,
    pub usage: Option<&'a UsageInput>,
    pub answer: Option<AnswerWrite>,
}

/// A void the core checked: `recipient_id`'s pending hold `transfer_id`, resolved by `by` for
/// `reason`, with the usage row to record.
pub struct VoidInput<'a> {
    pub recipient_id: i64,
    pub transfer_id: &'a str,
    pub reason: &'a str,
    pub by: Party,
    pub usage: Option<&'a UsageInput>,
}

#[tonic::async_trait]
pub trait TransferBackend: Send + Sync + 'static {
    /// Places a hold validated by the core (the recipient is the authenticated caller), or
    /// finds the one an earlier call with the same key placed.
    async fn authorize(&self, input: &AuthorizeInput<'_>) -> Result<Placed>;

    /// Captures a pending hold of `recipient_id` (the caller has checked it may), storing
    /// `answer` for replay so that it exists once the capture has committed.
    async fn capture(&self, c: CaptureInput<'_>) -> Result<TransferRow>;

    async fn void(&self, v: VoidInput<'_>) -> Result<TransferRow>;

    async fn transfer(&self, id: &str) -> Result<Option<TransferRow>>;

    /// Newest first, keyset-paged; the bool says whether there are more.
    async fn list(&self, filter: &TransferFilter) -> Result<(Vec<TransferRow>, bool)>;

    /// An account's balances as this backend knows them.
    async fn account(&self, email: &str) -> Result<AccountRow>;

    /// The clock this backend stamps and judges its holds by, in micros since the Unix epoch
    /// (the hosted journal's: this process's).
    fn now(&self) -> i64 {
        now_micros()
    }

    async fn create_account(&self, _new: &NewAccountRow<'_>) -> Result<AccountRow> {
        Err(not_supported("account creation"))
    }

    async fn deposit(&self, _email: &str, _amount: i64, _key: &str) -> Result<AccountRow> {
        Err(not_supported("depositing"))
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRow>> {
        Err(not_supported("listing accounts"))
    }

    /// Accounts with ids above `after_id`, oldest first; the bool says whether there are more.
    async fn list_accounts_page(
        &self,
        _after_id: Option<i64>,
        _limit: i64,
    ) -> Result<(Vec<AccountRow>, bool)> {
        Err(not_supported("listing accounts"))
    }

    async fn list_tokens(&self, _filter: &TokenFilter) -> Result<(Vec<TokenRow>, bool)> {
        Err(not_supported("listing tokens"))
    }

    async fn set_secret_hash(&self, _account_id: i64, _secret_hash: &str) -> Result<()> {
        Err(not_supported("changing a password"))
    }

    async fn secret_hash(&self, _email: &str) -> Result<Option<String>> {
        Err(not_supported("changing a password"))
    }

    async fn set_organization(&self, _account_id: i64, _organization: &str) -> Result<()> {
        Err(not_supported("changing an organization"))
    }

    async fn issue_token(&self, _grant: &TokenGrant<'_>) -> Result<IssuedToken> {
        Err(not_supported("issuing tokens"))
    }

    /// Revokes a token its sender or recipient (`by`) names; any token for the admin (`None`).
    async fn revoke_token(&self, _by: Option<i64>, _token: &str) -> Result<(String, i64)> {
        Err(not_supported("revoking tokens"))
    }

    /// The sender's email and the token's id, if the token is `recipient_id`'s to charge and
    /// neither revoked nor expired.
    async fn check_token(&self, _recipient_id: i64, _token: &str) -> Result<(String, String)> {
        Err(not_supported("checking tokens"))
    }

    /// Gives back up to what a completed transfer captured, from its recipient to its sender.
    async fn refund(&self, _input: &RefundInput<'_>) -> Result<Refunded> {
        Err(not_supported("refunds"))
    }

    /// A transfer's refunds, oldest first.
    async fn refunds_of(&self, _transfer_id: &str) -> Result<Vec<RefundRow>> {
        Err(not_supported("refunds"))
    }

    /// An account's refunds (`None`: everyone's), newest first, a keyset page.
    async fn refunds_page(
        &self,
        _account: Option<i64>,
        _page: &Keyset,
    ) -> Result<(Vec<RefundRow>, bool)> {
        Err(not_supported("refunds"))
    }

    /// A hold the sender places for the recipient itself, without a token (REST API).
    async fn authorize_direct(&self, _input: &DirectInput<'_>) -> Result<TransferRow> {
        Err(not_supported("a direct transfer"))
    }

    /// Moves a pending hold's expiry (see `Store::extend_hold`).
    async fn extend_hold(
        &self,
        _recipient_id: i64,
        _transfer_id: &str,
        _ttl_micros: i64,
        _max_life_micros: i64,
    ) -> Result<TransferRow> {
        Err(not_supported("extending a hold"))
    }

    /// Captures the full amount of a direct transfer on behalf of its sender (REST API).
    async fn capture_by_sender(&self, _recipient_id: i64, _id: &str) -> Result<TransferRow> {
        Err(not_supported("confirming a direct transfer"))
    }
}

/// Balances, tokens and transfers in the ledger's own database.
pub struct LocalBackend {
    store: Arc<Store>,
}

impl LocalBackend {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    async fn resolve(
        &self,
        recipient_id: i64,
        transfer_id: &str,
        resolution: Resolution,
        usage: Option<&UsageInput>,
        by_sender: bool,
    ) -> Result<TransferRow> {
        let input = ResolveInput {
            transfer_id,
            recipient_id: Some(recipient_id),
            resolution,
            usage,
            by_sender,
        };
        self.store.resolve(&input).await
    }
}

#[tonic::async_trait]
impl TransferBackend for LocalBackend {
    fn now(&self) -> i64 {
        self.store.now()
    }

    async fn authorize(&self, input: &AuthorizeInput<'_>) -> Result<Placed> {
        self.store.authorize_keyed(input).await
    }

    /// The answer is written in the capture's own transaction (`Store::resolve_answered`).
    async fn capture(&self, c: CaptureInput<'_>) -> Result<TransferRow> {
        let input = ResolveInput {
            transfer_id: c.transfer_id,
            recipient_id: Some(c.recipient_id),
            resolution: Resolution::Capture(c.amount),
            usage: c.usage,
            by_sender: false,
        };
        self.store.resolve_answered(&input, c.answer.as_ref()).await
    }

    async fn void(&self, v: VoidInput<'_>) -> Result<TransferRow> {
        let void = Resolution::Void {
            reason: v.reason.to_string(),
        };
        self.resolve(
            v.recipient_id,
            v.transfer_id,
            void,
            v.usage,
            v.by == Party::Sender,
        )
        .await
    }

    async fn transfer(&self, id: &str) -> Result<Option<TransferRow>> {
        self.store.transfer_by_id(id).await
    }

    async fn extend_hold(
        &self,
        recipient_id: i64,
        transfer_id: &str,
        ttl_micros: i64,
        max_life_micros: i64,
    ) -> Result<TransferRow> {
        self.store
            .extend_hold(transfer_id, recipient_id, ttl_micros, max_life_micros)
            .await
    }

    async fn list(&self, filter: &TransferFilter) -> Result<(Vec<TransferRow>, bool)> {
        self.store.list_transfers(filter).await
    }

    async fn account(&self, email: &str) -> Result<AccountRow> {
        self.store
            .account_by_email(email)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("account {email} not found")))
    }

    async fn create_account(&self, new: &NewAccountRow<'_>) -> Result<AccountRow> {
        self.store
            .create_account(new.email, new.organization, new.currency, new.secret_hash)
            .await
    }

    async fn deposit(&self, email: &str, amount: i64, key: &str) -> Result<AccountRow> {
        self.store.deposit(email, amount, key).await
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRow>> {
        self.store.list_accounts().await
    }

    async fn list_accounts_page(
        &self,
        after_id: Option<i64>,
        limit: i64,
    ) -> Result<(Vec<AccountRow>, bool)> {
        self.store.list_accounts_page(after_id, limit).await
    }

    async fn list_tokens(&self, filter: &TokenFilter) -> Result<(Vec<TokenRow>, bool)> {
        self.store.list_tokens(filter).await
    }

    async fn set_secret_hash(&self, account_id: i64, secret_hash: &str) -> Result<()> {
        self.store.update_secret_hash(account_id, secret_hash).await
    }

    async fn secret_hash(&self, email: &str) -> Result<Option<String>> {
        Ok(self
            .store
            .identity_and_secret_hash(email)
            .await?
            .map(|(_, hash)| hash))
    }

    async fn set_organization(&self, account_id: i64, organization: &str) -> Result<()> {
        self.store
            .update_organization(account_id, organization)
            .await
    }

    async fn issue_token(&self, grant: &TokenGrant<'_>) -> Result<IssuedToken> {
        self.store.issue_token(grant).await
    }

    async fn revoke_token(&self, by: Option<i64>, token: &str) -> Result<(String, i64)> {
        self.store.revoke_token(by, token).await
    }

    async fn refund(&self, input: &RefundInput<'_>) -> Result<Refunded> {
        self.store.refund(input).await
    }

    async fn refunds_of(&self, transfer_id: &str) -> Result<Vec<RefundRow>> {
        self.store.refunds_of(transfer_id).await
    }

    async fn refunds_page(
        &self,
        account: Option<i64>,
        page: &Keyset,
    ) -> Result<(Vec<RefundRow>, bool)> {
        self.store.refunds_page(account, page).await
    }

    async fn check_token(&self, recipient_id: i64, token: &str) -> Result<(String, String)> {
        // Another recipient's token is answered as an unknown one: nothing is learnt of it.
        let info = (self.store.token_info(token).await?)
            .filter(|t| t.recipient_id == recipient_id)
            .ok_or_else(|| LedgerError::refused(Reason::TokenInvalid, "unknown token"))?;
        // Revoked or expired, read fresh (the cached facts never change); an amount of 0 is
        // never over the token's limit.
        let now = self.store.now();
        if let Some(refusal) = (self.store)
            .token_rejection(&info.id, Micros::ZERO, now)
            .await?
        {
            return Err(refusal);
        }
        Ok((info.sender_email.clone(), info.id.clone()))
    }

    async fn authorize_direct(&self, input: &DirectInput<'_>) -> Result<TransferRow> {
        self.store.authorize_direct(input).await
    }

    async fn capture_by_sender(&self, recipient_id: i64, id: &str) -> Result<TransferRow> {
        let full = Resolution::Capture(CaptureAmount::Full);
        self.resolve(recipient_id, id, full, None, true).await
    }
}
