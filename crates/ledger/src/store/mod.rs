//! The ledger's database: one code path over Postgres and SQLite (sqlx `Any`), plus a single-statement
//! fast path for the hot Postgres operations (see `transfer.rs`).
//!
//! Every invariant is enforced inside a database transaction or a single atomic statement, never in
//! process memory, so several ledger processes can share one Postgres.

mod batch;
mod query;
mod transfer;
mod verify;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use crate::error::{is_retryable, is_unique_violation, LedgerError, Result};

pub use query::{TokenFilter, TokenRow, TransferFilter, UsageFilter, UsagePage, UsageTotals};
pub(crate) use transfer::{insert_usage, UsageLink};
pub use transfer::{AuthorizeInput, CaptureAmount, DirectInput, Resolution, ResolveInput};
pub use verify::VerifyReport;

static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How long an authenticated secret stays cached; secrets are never rotated in place, so this only
/// bounds memory staleness, not security.
const SECRET_CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX_ENTRIES: usize = 100_000;

pub const DEFAULT_BATCH_WORKERS: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub id: i64,
    pub email: String,
    pub organization: String,
    pub currency: String,
    /// Includes credits not yet rolled up.
    pub balance: i64,
    pub held: i64,
    pub created_at: i64,
}

impl AccountRow {
    pub fn available(&self) -> i64 {
        self.balance - self.held
    }
}

/// The immutable facts of a delegation token; revocation, expiry and limits are checked in the DB.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: String,
    pub sender_id: i64,
    pub recipient_id: i64,
    pub sender_email: String,
    pub currency: String,
}

#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub id: String,
    pub expires_at: Option<i64>,
    pub spend_limit: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub id: String,
    pub sender_id: i64,
    pub recipient_id: i64,
    pub sender_email: String,
    pub recipient_email: String,
    pub amount: i64,
    pub captured: i64,
    pub currency: String,
    pub status: String,
    pub created_by: String,
    pub resolved_by: Option<String>,
    pub app_name: String,
    pub app_ep_path: String,
    pub idempotency_key: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub resolved_at: Option<i64>,
    pub cancel_reason: String,
}

/// A usage row as written; `cost` and `transfer_id` are set by the ledger, not the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageInput {
    pub request_id: String,
    pub app_name: String,
    pub endpoint: String,
    pub user_email: String,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub status: String,
    pub latency_ms: i64,
    pub upstream_latency_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub id: String,
    pub recipient_email: String,
    pub transfer_id: Option<String>,
    pub cost: i64,
    pub created_at: i64,
    pub usage: UsageInput,
}

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub fn sha256_hex(data: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data.as_bytes()))
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    tokens: RwLock<HashMap<String, Arc<TokenInfo>>>,
    secrets: RwLock<HashMap<String, (Arc<AccountRow>, Instant)>>,
    emails: RwLock<HashMap<String, i64>>,
    /// Postgres only: the batched write path for holds, captures and voids.
    batcher: Option<batch::Batcher>,
}

pub(crate) const TRANSFER_COLUMNS: &str = "t.id, t.sender_id, t.recipient_id, sa.email, ra.email, \
     t.amount, t.captured, t.currency, t.status, t.created_by, t.resolved_by, t.app_name, \
     t.app_ep_path, t.idempotency_key, t.created_at, t.expires_at, t.resolved_at, t.cancel_reason";
pub(crate) const TRANSFER_JOINS: &str =
    "JOIN accounts sa ON sa.id = t.sender_id JOIN accounts ra ON ra.id = t.recipient_id";

pub(crate) fn transfer_from_row(row: &AnyRow) -> Result<TransferRow> {
    Ok(TransferRow {
        id: row.try_get(0)?,
        sender_id: row.try_get(1)?,
        recipient_id: row.try_get(2)?,
        sender_email: row.try_get(3)?,
        recipient_email: row.try_get(4)?,
        amount: row.try_get(5)?,
        captured: row.try_get(6)?,
        currency: row.try_get(7)?,
        status: row.try_get(8)?,
        created_by: row.try_get(9)?,
        resolved_by: row.try_get(10)?,
        app_name: row.try_get(11)?,
        app_ep_path: row.try_get(12)?,
        idempotency_key: row.try_get(13)?,
        created_at: row.try_get(14)?,
        expires_at: row.try_get(15)?,
        resolved_at: row.try_get(16)?,
        cancel_reason: row.try_get(17)?,
    })
}

const ACCOUNT_COLUMNS: &str = "a.id, a.email, a.organization, a.currency, \
     a.balance + COALESCE((SELECT CAST(SUM(j.amount) AS BIGINT) FROM journal j \
        WHERE j.account_id = a.id AND NOT j.rolled_up), 0), \
     a.held, a.created_at";

fn account_from_row(row: &AnyRow) -> Result<AccountRow> {
    Ok(AccountRow {
        id: row.try_get(0)?,
        email: row.try_get(1)?,
        organization: row.try_get(2)?,
        currency: row.try_get(3)?,
        balance: row.try_get(4)?,
        held: row.try_get(5)?,
        created_at: row.try_get(6)?,
    })
}

/// Runs `op` again when the database reports a serialization failure or deadlock; those are never
/// business errors (DESIGN.md §4).
pub(crate) async fn retry_transient<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Err(err) if is_retryable(&err) && attempt < 8 => {
                attempt += 1;
                tracing::debug!(attempt, error = %err, "retrying transient database error");
                tokio::time::sleep(Duration::from_millis(2u64 << attempt.min(6))).await;
            }
            other => return other.map_err(LedgerError::from),
        }
    }
}

impl Store {
    /// Connects, applies pragmas (SQLite) and runs migrations.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Self> {
        Self::connect_with(database_url, max_connections, DEFAULT_BATCH_WORKERS).await
    }

    /// Like [`Store::connect`], with the number of Postgres batch workers (see `batch.rs`).
    pub async fn connect_with(
        database_url: &str,
        max_connections: u32,
        batch_workers: usize,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend =
            if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
                Backend::Postgres
            } else if database_url.starts_with("sqlite:") {
                Backend::Sqlite
            } else {
                return Err(LedgerError::invalid(
                    "database url must start with postgres:// or sqlite:",
                ));
            };
        let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let pool = match backend {
            Backend::Postgres => options.max_connections(max_connections.max(1)),
            // One writer connection: SQLite serializes writers anyway, and a single connection
            // can never hit a lock-upgrade deadlock (SQLITE_BUSY) between two of our transactions.
            Backend::Sqlite => options.max_connections(1).after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                    )
                    .await?;
                    Ok(())
                })
            }),
        }
        .connect(database_url)
        .await
        .map_err(|e| LedgerError::Unavailable(format!("cannot connect to the database: {e}")))?;
        let migrator = match backend {
            Backend::Postgres => &PG_MIGRATOR,
            Backend::Sqlite => &SQLITE_MIGRATOR,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|e| LedgerError::Internal(format!("migration failed: {e}")))?;
        let batcher = (backend == Backend::Postgres)
            .then(|| batch::Batcher::start(pool.clone(), batch_workers));
        Ok(Self {
            batcher,
            pool,
            backend,
            tokens: RwLock::default(),
            secrets: RwLock::default(),
            emails: RwLock::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Holds not yet resolved, local and hosted.
    pub async fn pending_holds(&self) -> Result<i64> {
        let local: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM transfers WHERE status = 'PENDING'")
                .fetch_one(&self.pool)
                .await?;
        let hosted: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM hosted_transfers WHERE status = 'PENDING'")
                .fetch_one(&self.pool)
                .await?;
        Ok(local + hosted)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---------------------------------------------------------------- accounts

    pub async fn create_account(
        &self,
        email: &str,
        organization: &str,
        currency: &str,
        secret_hash: &str,
    ) -> Result<AccountRow> {
        let now = now_micros();
        let result = sqlx::query(
            "INSERT INTO accounts (email, organization, currency, secret_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(email)
        .bind(organization)
        .bind(currency)
        .bind(secret_hash)
        .bind(now)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(LedgerError::AlreadyExists(format!(
                    "account {email} already exists"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        self.account_by_email(email)
            .await?
            .ok_or_else(|| LedgerError::Internal("account vanished after insert".into()))
    }

    pub async fn account_by_email(&self, email: &str) -> Result<Option<AccountRow>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.email = $1");
        let row = sqlx::query(&sql)
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(account_from_row).transpose()
    }

    pub async fn list_accounts(&self) -> Result<Vec<AccountRow>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a ORDER BY a.id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(account_from_row).collect()
    }

    /// Replaces an account's secret. Cached Bearer lookups of the old secret are dropped here; other
    /// ledger replicas drop theirs within the cache TTL.
    pub async fn update_secret_hash(&self, account_id: i64, secret_hash: &str) -> Result<()> {
        sqlx::query("UPDATE accounts SET secret_hash = $1 WHERE id = $2")
            .bind(secret_hash)
            .bind(account_id)
            .execute(&self.pool)
            .await?;
        write_lock(&self.secrets).clear();
        Ok(())
    }

    pub async fn update_organization(&self, account_id: i64, organization: &str) -> Result<()> {
        sqlx::query("UPDATE accounts SET organization = $1 WHERE id = $2")
            .bind(organization)
            .bind(account_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Creates the account, or sets its secret if it exists (the hosted backend's local mirror of
    /// the router owner).
    pub async fn ensure_account(
        &self,
        email: &str,
        currency: &str,
        secret_hash: &str,
    ) -> Result<AccountRow> {
        match self.create_account(email, "", currency, secret_hash).await {
            Ok(account) => Ok(account),
            Err(LedgerError::AlreadyExists(_)) => {
                let account = self
                    .account_by_email(email)
                    .await?
                    .ok_or_else(|| LedgerError::Internal("account vanished".into()))?;
                self.update_secret_hash(account.id, secret_hash).await?;
                Ok(account)
            }
            Err(e) => Err(e),
        }
    }

    /// Account id for an email, cached: ids never change and accounts are never deleted.
    pub async fn account_id(&self, email: &str) -> Result<Option<i64>> {
        if let Some(id) = read_lock(&self.emails).get(email) {
            return Ok(Some(*id));
        }
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM accounts WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(id) = id {
            insert_bounded(&self.emails, email.to_string(), id);
        }
        Ok(id)
    }

    /// Looks up the one account owning a secret hash (Bearer auth); cached so verification stays
    /// off the hot path. Only identity fields of the cached row may be used: its balance is stale.
    /// Two accounts that chose the same password cannot use Bearer auth (they must use Basic).
    pub async fn account_by_secret_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<Arc<AccountRow>>> {
        if let Some((account, at)) = read_lock(&self.secrets).get(secret_hash) {
            if at.elapsed() < SECRET_CACHE_TTL {
                return Ok(Some(account.clone()));
            }
        }
        let sql =
            format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.secret_hash = $1 LIMIT 2");
        let rows = sqlx::query(&sql)
            .bind(secret_hash)
            .fetch_all(&self.pool)
            .await?;
        let [row] = rows.as_slice() else {
            return Ok(None);
        };
        let account = Arc::new(account_from_row(row)?);
        insert_bounded(
            &self.secrets,
            secret_hash.to_string(),
            (account.clone(), Instant::now()),
        );
        Ok(Some(account))
    }

    /// The secret hash stored for an account (Basic auth).
    pub async fn secret_hash_of(&self, email: &str) -> Result<Option<(i64, String)>> {
        let row = sqlx::query("SELECT id, secret_hash FROM accounts WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    /// Credits an account from the SYSTEM side. Replaying the key with the same email and amount
    /// returns the account without depositing again.
    pub async fn deposit(
        &self,
        email: &str,
        amount: i64,
        idempotency_key: &str,
    ) -> Result<AccountRow> {
        let account_id = self
            .account_id(email)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("account {email} not found")))?;
        let deposit_id = new_id();
        let outcome = retry_transient(|| async {
            let mut tx = self.pool.begin().await?;
            let now = now_micros();
            let inserted = sqlx::query(
                "INSERT INTO deposits (id, account_id, amount, idempotency_key, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(&deposit_id)
            .bind(account_id)
            .bind(amount)
            .bind(idempotency_key)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Ok(DepositOutcome::Replay);
            }
            let credited = sqlx::query(
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2 AND balance <= $3 - $1",
            )
            .bind(amount)
            .bind(account_id)
            .bind(i64::MAX / 2)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if credited == 0 {
                return Ok(DepositOutcome::Overflow);
            }
            sqlx::query(
                "INSERT INTO journal (account_id, amount, kind, ref_id, rolled_up, created_at) \
                 VALUES (NULL, $1, 'deposit', $2, TRUE, $3), ($4, $5, 'deposit', $2, TRUE, $3)",
            )
            .bind(-amount)
            .bind(&deposit_id)
            .bind(now)
            .bind(account_id)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(DepositOutcome::Done)
        })
        .await?;
        match outcome {
            DepositOutcome::Done => {}
            DepositOutcome::Overflow => {
                return Err(LedgerError::invalid("deposit would overflow the balance"))
            }
            DepositOutcome::Replay => {
                let row = sqlx::query(
                    "SELECT account_id, amount FROM deposits WHERE idempotency_key = $1",
                )
                .bind(idempotency_key)
                .fetch_one(&self.pool)
                .await?;
                let (prev_account, prev_amount): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                if prev_account != account_id || prev_amount != amount {
                    return Err(LedgerError::AlreadyExists(format!(
                        "idempotency key {idempotency_key:?} was used for a different deposit"
                    )));
                }
            }
        }
        self.account_by_email(email)
            .await?
            .ok_or_else(|| LedgerError::Internal("account vanished".into()))
    }

    // ---------------------------------------------------------------- tokens

    pub async fn issue_token(
        &self,
        sender: &AccountRow,
        recipient: &AccountRow,
        expires_at: Option<i64>,
        spend_limit: Option<i64>,
    ) -> Result<IssuedToken> {
        use base64::Engine;
        use rand::RngCore;
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let token = format!(
            "syft_tok_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let id = new_id();
        sqlx::query(
            "INSERT INTO tokens (id, token_hash, sender_id, recipient_id, expires_at, spend_limit, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(sha256_hex(&token))
        .bind(sender.id)
        .bind(recipient.id)
        .bind(expires_at)
        .bind(spend_limit)
        .bind(now_micros())
        .execute(&self.pool)
        .await?;
        Ok(IssuedToken {
            token,
            id,
            expires_at,
            spend_limit,
        })
    }

    /// Resolves a token string to its immutable facts (cached by hash).
    pub async fn token_info(&self, token: &str) -> Result<Option<Arc<TokenInfo>>> {
        let hash = sha256_hex(token);
        if let Some(info) = read_lock(&self.tokens).get(&hash) {
            return Ok(Some(info.clone()));
        }
        let row = sqlx::query(
            "SELECT k.id, k.sender_id, k.recipient_id, s.email, s.currency FROM tokens k \
             JOIN accounts s ON s.id = k.sender_id WHERE k.token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let info = Arc::new(TokenInfo {
            id: row.try_get(0)?,
            sender_id: row.try_get(1)?,
            recipient_id: row.try_get(2)?,
            sender_email: row.try_get(3)?,
            currency: row.try_get(4)?,
        });
        insert_bounded(&self.tokens, hash, info.clone());
        Ok(Some(info))
    }

    /// Revokes a token (by string or id) owned by `sender_id`; revoking twice keeps the first time.
    pub async fn revoke_token(&self, sender_id: i64, token_or_id: &str) -> Result<(String, i64)> {
        let hash = sha256_hex(token_or_id);
        let now = now_micros();
        sqlx::query(
            "UPDATE tokens SET revoked_at = $1 WHERE (token_hash = $2 OR id = $3) AND sender_id = $4 \
             AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(&hash)
        .bind(token_or_id)
        .bind(sender_id)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(
            "SELECT id, revoked_at FROM tokens WHERE (token_hash = $1 OR id = $2) AND sender_id = $3",
        )
        .bind(&hash)
        .bind(token_or_id)
        .bind(sender_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| LedgerError::NotFound("token not found".into()))?;
        let revoked_at: Option<i64> = row.try_get(1)?;
        Ok((row.try_get(0)?, revoked_at.unwrap_or(now)))
    }

    /// Why a token cannot pay `amount` now, if it cannot.
    pub(crate) async fn token_rejection(
        &self,
        token_id: &str,
        amount: i64,
        now: i64,
    ) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT revoked_at, expires_at, spend_limit, spent, held FROM tokens WHERE id = $1",
        )
        .bind(token_id)
        .fetch_one(&self.pool)
        .await?;
        let revoked_at: Option<i64> = row.try_get(0)?;
        let expires_at: Option<i64> = row.try_get(1)?;
        let spend_limit: Option<i64> = row.try_get(2)?;
        let spent: i64 = row.try_get(3)?;
        let held: i64 = row.try_get(4)?;
        if revoked_at.is_some() {
            return Ok(Some("token has been revoked".into()));
        }
        if expires_at.is_some_and(|e| e <= now) {
            return Ok(Some("token has expired".into()));
        }
        Ok(spend_limit.filter(|l| spent + held + amount > *l).map(|limit| {
            format!(
                "token spend limit exceeded: limit {limit}, spent {spent}, held {held}, requested {amount} micros"
            )
        }))
    }
}

enum DepositOutcome {
    Done,
    Replay,
    Overflow,
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn insert_bounded<V>(cache: &RwLock<HashMap<String, V>>, key: String, value: V) {
    let mut map = write_lock(cache);
    if map.len() >= CACHE_MAX_ENTRIES {
        map.clear();
    }
    map.insert(key, value);
}
