//! `backend = hosted`: two-phase transfers on a remote service that speaks the Syft accounting REST
//! API, made crash-safe by a local journal (`hosted_transfers`). docs/hosted.md explains the design.
//!
//! Every transfer moves through `step`s, each persisted before the remote call it leads to:
//! `creating` → `held` → `capturing` | `voiding` → `done`, or `failed` / `unknown` when the remote
//! create was refused / may or may not have happened. A resolution in progress is owned by one
//! driver at a time through a lease (`updated_at` is the lease stamp): only the holder of the
//! current stamp may take the next remote step, so two drivers can never both charge.
//!
//! Recovery (on start and every sweep) voids expired holds, voids whose driver died, and captures
//! whose driver died once their hold expired (until then the caller's retry takes it over), and
//! cancels remote holds this ledger created but lost track of (an unknown create outcome).
//! Recovery never completes a capture on its own: if the router dies mid-way the user pays nothing,
//! unless the remote service had already completed the charge, which is then recorded.
//!
//! The files follow those seams: `config.rs` (how to reach the service), `remote.rs` (the REST
//! client), `journal.rs` (the local journal and its lease), `authorize.rs` (phase one: the hold),
//! `resolve.rs` (phase two: capture or void) and `recovery.rs`.

mod authorize;
pub mod backend;
mod config;
mod entry;
mod journal;
mod recovery;
pub mod remote;
mod resolve;

use std::sync::Arc;
use std::time::Duration;

use crate::error::{LedgerError, Result};
use crate::store::{sha256_hex, Store, TransferFilter, TransferRow};
pub use config::HostedConfig;
use journal::Journal;
pub use recovery::run_recovery;
use remote::{RemoteClient, RemoteError};

pub struct Hosted {
    journal: Journal,
    remote: RemoteClient,
    config: HostedConfig,
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
        let remote = RemoteClient::new(
            &config.url,
            &config.email,
            config.password.expose(),
            config.timeout,
        )?;
        let owner = store
            .ensure_account(
                &config.email,
                currency,
                &sha256_hex(config.password.expose()),
            )
            .await?;
        // A service that keeps its accounts in another currency would take a hold of 1 USD as
        // 1 EUR: refused at start when the service says so (unreachable now, the first
        // `GetAccount` and every created transaction are checked).
        if let Ok(user) = remote.my_info().await {
            check_currency(user.currency.as_deref(), currency)?;
        }
        let hosted = Self {
            journal: Journal::new(store, config.lease, owner.id),
            remote,
            config,
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

    /// The owner's local account (the one account this ledger serves).
    pub fn owner_id(&self) -> i64 {
        self.journal.owner_id()
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

    /// Whether the service names another currency than this ledger's for `tx`.
    fn foreign(&self, tx: &remote::RemoteTx) -> bool {
        check_currency(tx.currency.as_deref(), &self.currency).is_err()
    }

    pub async fn account(&self) -> Result<syft_proto::ledger::Account> {
        let user = self
            .retry(true, || self.remote.my_info())
            .await
            .map_err(RemoteError::into_ledger)?;
        check_currency(user.currency.as_deref(), &self.currency)?;
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

    pub async fn transfer(&self, id: &str) -> Result<Option<TransferRow>> {
        Ok(self.journal.entry(id).await?.map(|e| e.transfer()))
    }

    /// Newest first, like the local store's listing.
    pub async fn list(&self, filter: &TransferFilter) -> Result<(Vec<TransferRow>, bool)> {
        self.journal.list(filter).await
    }
}

/// The service's currency, where it names one, must be this ledger's (`--currency`).
fn check_currency(service: Option<&str>, ours: &str) -> Result<()> {
    match service {
        Some(theirs) if !theirs.eq_ignore_ascii_case(ours) => {
            Err(LedgerError::FailedPrecondition(format!(
                "the accounting service keeps its accounts in {theirs}, and this ledger's \
                 currency is {ours}: start it with --currency {theirs}"
            )))
        }
        _ => Ok(()),
    }
}
