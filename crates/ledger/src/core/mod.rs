//! The ledger core: authentication, validation and the transfer rules, over a
//! [`TransferBackend`]. It takes domain inputs and returns store rows; `grpc.rs` (tonic) and
//! `rest/` (the Syft accounting REST API) are thin adapters that translate their protocol to
//! these calls, so both interfaces follow one set of rules.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::address_throttle::{locked_out, AddressThrottle};
use crate::auth::{authenticate, constant_time_eq, generate_secret, Caller};
use crate::backend::{NewAccountRow, TransferBackend};
use crate::domain::TransferStatus;
use crate::error::{LedgerError, Result};
use crate::money::check_positive;
use crate::store::{
    sha256_hex, AccountRow, HoldBudgets, Identity, Store, TimeRange, UsageDims, UsageFilter,
    UsageInput, UsagePage, UsageRow,
};
use crate::validate::{self, MAX_KEY, MAX_NAME, MAX_PATH};
use crate::LedgerConfig;

mod answers;
mod listing;
mod open_holds;
mod paging;
mod refunds;
mod stats;
mod tokens;
mod transfers;

pub use listing::TokenQuery;
pub use open_holds::OpenHolds;
use paging::{encode_page_token, keyset_page, page_size};
pub use paging::{Page, PageRequest, MAX_PAGE};
pub use refunds::{RefundQuery, RefundRequest};
pub use stats::{parse_dimensions, Stats, StatsQuery, StatsRole, MAX_GROUPS};

/// Rows per `RecordUsageBatch` call (the usage writer batches up to 4,000 rows).
pub const MAX_USAGE_BATCH: usize = 1_000;

/// A new account. `secret: None` generates one.
#[derive(Debug, Clone, Default)]
pub struct NewAccount {
    pub email: String,
    pub organization: String,
    pub currency: Option<String>,
    pub secret: Option<String>,
}

/// A delegation token to issue to `recipient_email`.
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    pub recipient_email: String,
    pub expires_at: Option<i64>,
    pub spend_limit: Option<i64>,
    /// At most this much through the token in any 24 hours.
    pub limit_per_day: Option<i64>,
}

/// A hold to place, as a caller asks for it (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct HoldRequest {
    pub sender_email: String,
    pub amount: i64,
    pub token: String,
    pub app_name: String,
    pub app_ep_path: String,
    pub idempotency_key: String,
    /// The caller's id of this attempt (empty: none): stored with the hold it places, and
    /// returned with the key's hold, so a caller that asked again tells its own hold from
    /// another attempt's.
    pub attempt_id: String,
    pub hold_ttl_seconds: Option<i64>,
    /// The recipient's budgets for this sender (`None`: no budget); checked by the core.
    pub budgets: HoldBudgets,
}

/// The answer a capture pays for, kept for idempotent replay (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct AnswerInput {
    /// Opaque to the ledger (the router's encoding of what it sent).
    pub body: Vec<u8>,
    /// How long to keep it: 1 ..= [`MAX_ANSWER_RETENTION_SECONDS`].
    pub retention_seconds: i64,
}

/// Largest stored answer (shared with the router, which refuses a larger `--answer-max-bytes`).
pub use syft_error::MAX_ANSWER_BYTES;
/// Longest answer retention a router may ask for (30 days).
pub const MAX_ANSWER_RETENTION_SECONDS: i64 = 30 * 86_400;

/// Which side of a transfer the caller lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Any,
    Sender,
    Recipient,
}

/// A page of transfers to list (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct TransferQuery {
    /// Empty: the caller's own (admin: every account's).
    pub account_email: String,
    pub role: Role,
    pub status: Option<TransferStatus>,
    pub range: TimeRange,
    pub app_name: String,
    /// Only the transfers this delegation token paid (its id); empty: any.
    pub token_id: String,
    pub page: PageRequest,
}

/// A page of usage rows to read (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub dims: UsageDimsQuery,
    /// Empty: any. Not a dimension: the analytics' rollups do not keep it.
    pub request_id: String,
    pub range: TimeRange,
    pub page: PageRequest,
}

/// Filters on usage rows' dimensions as a caller gives them (empty: any value; not yet
/// validated), for the usage listing and the analytics.
#[derive(Debug, Clone, Default)]
pub struct UsageDimsQuery {
    pub app_name: String,
    pub endpoint: String,
    pub user_email: String,
    pub model: String,
    pub status: String,
}

impl UsageDimsQuery {
    fn validate(&self) -> Result<UsageDims> {
        Ok(UsageDims {
            user_email: validate::optional_email("user_email", &self.user_email)?,
            app_name: non_empty(validate::text("app_name", &self.app_name, MAX_NAME, false)?),
            endpoint: non_empty(validate::text("endpoint", &self.endpoint, MAX_PATH, false)?),
            model: non_empty(validate::text("model", &self.model, MAX_NAME, false)?),
            status: non_empty(validate::text("status", &self.status, 64, false)?),
        })
    }
}

/// How the party of a transaction resolves it (REST `confirm` / `cancel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartyAction {
    Confirm,
    Cancel,
}

#[derive(Clone)]
pub struct Ledger {
    store: Arc<Store>,
    backend: Arc<dyn TransferBackend>,
    config: Arc<LedgerConfig>,
    /// Failed authentications per client address (`address_throttle.rs`).
    throttle: Arc<AddressThrottle>,
    /// Accounts created per client address (open registration, `/user/create`).
    signups: Arc<AddressThrottle>,
    open_holds: OpenHolds,
}

impl Ledger {
    pub fn new(
        store: Arc<Store>,
        backend: Arc<dyn TransferBackend>,
        config: Arc<LedgerConfig>,
    ) -> Self {
        let throttle = Arc::new(AddressThrottle::new(config.auth_failures_per_address));
        let signups = Arc::new(AddressThrottle::counting(
            config.accounts_per_address,
            "accounts created",
        ));
        Self {
            store,
            backend,
            config,
            throttle,
            signups,
            open_holds: OpenHolds::default(),
        }
    }

    /// The holds this process placed and has not seen resolved (a stopping ledger waits for them).
    pub fn open_holds(&self) -> &OpenHolds {
        &self.open_holds
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Resolves an `authorization` header value (Bearer secret, Basic email:secret, admin key)
    /// sent from `peer` (the client's address; `None` where the transport has none, in-process).
    /// A wrong credential counts against its address, and an address over its limit is refused
    /// whatever it sends (`address_throttle.rs`).
    pub async fn authenticate(&self, header: Option<&str>, peer: Option<IpAddr>) -> Result<Caller> {
        let admin_key = self.config.admin_key.expose();
        let Some(addr) = peer else {
            return authenticate(&self.store, admin_key, header).await;
        };
        self.unlocked(addr)?;
        let result = authenticate(&self.store, admin_key, header).await;
        // Only a credential that was sent and is wrong counts (not a missing header, nor an
        // empty `Bearer`).
        let failed = crate::auth::names_credentials(header)
            && matches!(result, Err(LedgerError::Unauthenticated(_)));
        if failed {
            crate::metrics::auth_refused("failed");
            self.throttle.failed(addr, Instant::now());
        }
        // Whatever the outcome, an attempt that finished after its address got locked (a burst
        // of concurrent guesses, or the failure that reached the limit) is refused like the rest,
        // so a burst gets no more telling answers than the limit. Counted once: a failure that
        // reached the limit is `failed` only (it was `locked` too, one attempt in both series).
        if let Err(wait) = self.throttle.check(addr, Instant::now()) {
            if !failed {
                crate::metrics::auth_refused("locked");
            }
            return Err(locked_out(
                addr,
                wait,
                self.config.auth_failures_per_address,
            ));
        }
        result
    }

    /// Counts a chosen password being set from `peer` as one guess (refused while the address
    /// is locked): an attacker can set its own password to a guess and see by a Bearer sign-in
    /// whether another account has it (a password two accounts share finds neither), so each
    /// set costs what a wrong credential does.
    pub(crate) fn count_guess(&self, peer: Option<IpAddr>) -> Result<()> {
        let Some(addr) = peer else {
            return Ok(());
        };
        self.unlocked(addr)?;
        self.throttle.failed(addr, Instant::now());
        Ok(())
    }

    /// Open registration (`/user/create`) from `peer`: refused once the address made
    /// `accounts_per_address` attempts in the window, else counted as one (at once, under one
    /// lock), then, with a chosen `password`, counted as a guess (`count_guess`). Anyone may
    /// register, and nothing else bounded how many accounts (rows, and entries of every `/users`
    /// answer) one client could add, nor how many emails it could test for an account (`409`). A request that sends
    /// credentials is authenticated like any other (a wrong one is refused and counts as a
    /// failure, so this is no faster way to test an admin key than the rest of the API), and one
    /// signed in with the admin key (the SDK's `AdminClient.create_user`, a bulk import) is not
    /// counted: the operator's.
    pub(crate) async fn count_signup(
        &self,
        peer: Option<IpAddr>,
        authorization: Option<&str>,
        password: bool,
    ) -> Result<()> {
        if authorization.is_some() && self.authenticate(authorization, peer).await?.is_admin() {
            return Ok(());
        }
        let Some(addr) = peer else {
            return Ok(());
        };
        // Checked and counted at once, so a burst cannot pass the check before any is counted.
        if let Err(wait) = self.signups.take(addr, Instant::now()) {
            return Err(crate::address_throttle::too_many_accounts(
                addr,
                wait,
                self.config.accounts_per_address,
            ));
        }
        if password {
            self.count_guess(peer)?;
        }
        Ok(())
    }

    /// Refused while `addr` is locked out for failed authentications.
    fn unlocked(&self, addr: IpAddr) -> Result<()> {
        self.throttle.check(addr, Instant::now()).map_err(|wait| {
            crate::metrics::auth_refused("locked");
            locked_out(addr, wait, self.config.auth_failures_per_address)
        })
    }

    fn require_admin(caller: &Caller) -> Result<()> {
        if caller.is_admin() {
            Ok(())
        } else {
            Err(LedgerError::PermissionDenied("admin only".into()))
        }
    }

    /// The account with this email, freshly read, if the caller may see it.
    pub async fn account(&self, caller: &Caller, email: &str) -> Result<AccountRow> {
        let email = validate::email("email", email)?;
        if !caller.may_see(&email) {
            return Err(LedgerError::PermissionDenied(
                "you may read only your own account".into(),
            ));
        }
        self.backend.account(&email).await
    }

    /// The caller's own account, freshly read (the authenticated row may come from a cache).
    pub async fn me(&self, caller: &Caller) -> Result<AccountRow> {
        let email = caller.account()?.email.clone();
        self.backend.account(&email).await
    }

    /// Creates an account (admin); returns it with its secret (generated when not given).
    pub async fn create_account(
        &self,
        caller: &Caller,
        req: NewAccount,
    ) -> Result<(AccountRow, String)> {
        Self::require_admin(caller)?;
        let email = validate::new_account_email("email", &req.email)?;
        let organization = validate::text("organization", &req.organization, MAX_NAME, false)?;
        let currency = match &req.currency {
            Some(c) => validate_currency(c)?,
            None => self.config.currency.clone(),
        };
        let secret = match req.secret {
            Some(s) => {
                validate::secret("secret", &s)?;
                s
            }
            None => generate_secret(),
        };
        let new = NewAccountRow {
            email: &email,
            organization,
            currency: &currency,
            secret_hash: &sha256_hex(&secret),
        };
        let account = self.backend.create_account(&new).await?;
        tracing::info!(account = %account.email, "account created");
        Ok((account, secret))
    }

    /// Open registration (REST `POST /user/create`): a new account starts with nothing, so it
    /// needs no credentials.
    pub async fn register(
        &self,
        email: String,
        password: Option<String>,
        organization: String,
    ) -> Result<(AccountRow, String)> {
        if let Some(p) = &password {
            validate::secret("password", p)?;
        }
        let req = NewAccount {
            email,
            organization,
            currency: None,
            secret: password,
        };
        self.create_account(&Caller::Admin, req).await
    }

    pub async fn list_accounts(&self, caller: &Caller) -> Result<Vec<AccountRow>> {
        Self::require_admin(caller)?;
        self.backend.list_accounts().await
    }

    pub async fn deposit(
        &self,
        caller: &Caller,
        email: &str,
        amount: i64,
        idempotency_key: &str,
    ) -> Result<AccountRow> {
        Self::require_admin(caller)?;
        let email = validate::email("email", email)?;
        let amount = check_positive("amount_micros", amount, self.config.max_amount_micros)?;
        let key = validate::idempotency_key(idempotency_key)?;
        let account = self.backend.deposit(&email, amount, key).await?;
        tracing::info!(account = %email, amount, "deposit");
        Ok(account)
    }

    /// Changes the caller's secret, given the current one.
    pub async fn change_secret(&self, caller: &Caller, old: &str, new: &str) -> Result<AccountRow> {
        let account = self.me(caller).await?;
        validate::secret("newPassword", new)?;
        let stored = self
            .backend
            .secret_hash(&account.email)
            .await?
            .ok_or_else(|| LedgerError::NotFound("account not found".into()))?;
        if !constant_time_eq(stored.as_bytes(), sha256_hex(old).as_bytes()) {
            return Err(LedgerError::PermissionDenied(
                "oldPassword is not the current password".into(),
            ));
        }
        self.backend
            .set_secret_hash(account.id, &sha256_hex(new))
            .await?;
        tracing::info!(account = %account.email, "password changed");
        Ok(account)
    }

    pub async fn set_organization(
        &self,
        caller: &Caller,
        organization: &str,
    ) -> Result<AccountRow> {
        let account = self.me(caller).await?;
        let organization = validate::text("organization", organization, MAX_NAME, false)?;
        self.backend
            .set_organization(account.id, organization)
            .await?;
        self.backend.account(&account.email).await
    }

    /// A usage row without money (free services, refused requests), dated `answered_at` if recent.
    pub async fn record_usage(
        &self,
        caller: &Caller,
        usage: UsageInput,
        answered_at: Option<i64>,
    ) -> Result<UsageRow> {
        let (recipient, usage) = (caller.account()?, validate_usage(usage)?);
        (self.store)
            .record_usage(recipient, &usage, answered_at)
            .await
    }

    /// Several free usage rows of one caller, as [`Ledger::record_usage`] writes each; they are
    /// queued together, so the group commit writes them in one batch. All are validated first: one
    /// invalid row refuses the call (the caller sends the rows alone to find it).
    pub async fn record_usage_batch(
        &self,
        caller: &Caller,
        usages: Vec<(Option<i64>, UsageInput)>,
    ) -> Result<Vec<UsageRow>> {
        let recipient = caller.account()?;
        if usages.len() > MAX_USAGE_BATCH {
            return Err(LedgerError::invalid(format!(
                "at most {MAX_USAGE_BATCH} usage rows per call"
            )));
        }
        let usages = (usages.into_iter())
            .map(|(at, u)| Ok((at, validate_usage(u)?)))
            .collect::<Result<Vec<_>>>()?;
        futures::future::try_join_all(
            (usages.iter()).map(|(at, u)| (self.store).record_usage(recipient, u, *at)),
        )
        .await
    }

    pub async fn query_usage(&self, caller: &Caller, q: &UsageQuery) -> Result<Page<UsagePage>> {
        let page = q.page.keyset()?;
        let currency = &self.config.currency;
        let mixed =
            matches!(caller, Caller::Admin) && self.store.other_currencies_than(currency).await?;
        let filter = UsageFilter {
            account: usage_scope(caller),
            range: q.range,
            dims: q.dims.validate()?,
            request_id: non_empty(validate::text("request_id", &q.request_id, MAX_KEY, false)?),
            page,
            totals_currency: mixed.then(|| currency.clone()),
        };
        let items = self.store.query_usage(&filter).await?;
        let next_page_token = match (items.has_more, items.rows.last()) {
            (true, Some(last)) => encode_page_token(&last.id),
            _ => String::new(),
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    /// The newest usage rows (at most `limit`, ≤ the page maximum) written from `since` on, by
    /// the rule of [`Ledger::query_usage`]; read by id range (UUIDv7 ids start with their
    /// millisecond), for live tails.
    pub async fn usage_since(
        &self,
        caller: &Caller,
        since: i64,
        limit: u32,
    ) -> Result<Vec<UsageRow>> {
        let limit = page_size(limit)?;
        self.store
            .usage_after(&usage_scope(caller), &v7_floor(since), limit, false)
            .await
    }

    /// A live tail's next page: the oldest rows (at most `limit`) written from `since` on with an
    /// id above `after_id` (the last one the tail read, if any), by the same rule.
    pub async fn usage_tail(
        &self,
        caller: &Caller,
        since: i64,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRow>> {
        let limit = page_size(limit)?;
        let floor = v7_floor(since);
        let after = after_id.filter(|a| *a > floor.as_str()).unwrap_or(&floor);
        self.store
            .usage_after(&usage_scope(caller), after, limit, true)
            .await
    }
}

/// Whose usage rows a caller reads: an account its apps' rows and its own requests, the admin all.
fn usage_scope(caller: &Caller) -> Option<(i64, String)> {
    match caller {
        Caller::Admin => None,
        Caller::Account(a) => Some((a.id, a.email.clone())),
    }
}

/// The smallest UUIDv7 text of the millisecond `micros` falls in (ids are compared as text).
fn v7_floor(micros: i64) -> String {
    let ms = micros.max(0) / 1000;
    format!(
        "{:08x}-{:04x}-0000-0000-000000000000",
        ms >> 16,
        ms & 0xffff
    )
}

/// Checks the fields of a usage row a caller reports.
pub fn validate_usage(usage: UsageInput) -> Result<UsageInput> {
    let user_email = if usage.user_email.is_empty() {
        String::new()
    } else {
        validate::email("usage.user_email", &usage.user_email)?
    };
    let prompt = validate::count("usage.prompt_tokens", usage.prompt_tokens)?;
    let completion = validate::count("usage.completion_tokens", usage.completion_tokens)?;
    let total = if usage.total_tokens == 0 {
        prompt + completion
    } else {
        validate::count("usage.total_tokens", usage.total_tokens)?
    };
    Ok(UsageInput {
        request_id: validate::text("usage.request_id", &usage.request_id, MAX_KEY, true)?
            .to_string(),
        app_name: validate::text("usage.app_name", &usage.app_name, MAX_NAME, false)?.to_string(),
        endpoint: validate::text("usage.endpoint", &usage.endpoint, MAX_PATH, false)?.to_string(),
        user_email,
        model: validate::text("usage.model", &usage.model, MAX_NAME, false)?.to_string(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
        status: usage_status(&usage.status)?.as_str().to_string(),
        latency_ms: validate::count("usage.latency_ms", usage.latency_ms)?,
        upstream_latency_ms: validate::count(
            "usage.upstream_latency_ms",
            usage.upstream_latency_ms,
        )?,
        ttft_ms: usage
            .ttft_ms
            .map(|t| validate::count("usage.ttft_ms", t))
            .transpose()?,
        row_key: validate::text("usage.row_key", &usage.row_key, MAX_KEY, false)?.to_string(),
        // Kept on refusals only: a reason on an answered row would show as its refusal.
        reason: match usage_status(&usage.status)?.is_refusal() {
            true => usage_reason(&usage.reason)?,
            false => String::new(),
        },
    })
}

/// A refusal's reason: a machine-readable code (`TOKEN_REVOKED`), never free text.
fn usage_reason(reason: &str) -> Result<String> {
    let code = reason.len() <= 64
        && reason
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    match code {
        true => Ok(reason.to_string()),
        false => Err(LedgerError::invalid(format!(
            "usage.reason {:?} is not a reason code (at most 64 of A-Z, 0-9 and _)",
            reason.chars().take(64).collect::<String>()
        ))),
    }
}

/// A row's status is one of the statuses the analytics know: any other text was kept as it was
/// sent, a status no filter or chart could show.
fn usage_status(status: &str) -> Result<syft_error::UsageStatus> {
    syft_error::UsageStatus::parse(status).ok_or_else(|| {
        let known: Vec<&str> = syft_error::UsageStatus::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        LedgerError::invalid(format!(
            "usage.status {:?} is not one of: {}",
            status.chars().take(64).collect::<String>(),
            known.join(", ")
        ))
    })
}

fn same_currency(sender: &Identity, recipient: &AccountRow) -> Result<()> {
    if recipient.currency != sender.currency {
        return Err(LedgerError::FailedPrecondition(format!(
            "currencies differ: {} pays in {}, {} is paid in {}",
            sender.email, sender.currency, recipient.email, recipient.currency
        )));
    }
    Ok(())
}

fn validate_currency(c: &str) -> Result<String> {
    syft_money::currency_code(c).ok_or_else(|| {
        LedgerError::invalid(format!(
            "currency {c:?} must be a 3-letter code such as USD"
        ))
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn v7_floor_orders_ids_by_time() {
        let at = |micros: i64| {
            let ts = uuid::Timestamp::from_unix(
                uuid::NoContext,
                (micros / 1_000_000) as u64,
                ((micros % 1_000_000) * 1000) as u32,
            );
            uuid::Uuid::new_v7(ts).to_string()
        };
        let t = 1_796_189_618_076_218;
        assert!(at(t) >= super::v7_floor(t));
        assert!(at(t - 1_000) < super::v7_floor(t));
        assert!(at(t + 5_000_000) > super::v7_floor(t));
    }
}
