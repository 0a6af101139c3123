//! Accounts and deposits.

use std::sync::Arc;
use std::time::Instant;

use super::{
    insert_bounded, new_id, read_lock, retry_transient, write_lock, AccountRow, Identity, Store,
    ACCOUNT_COLUMNS, SECRET_CACHE_TTL,
};
use crate::error::{is_unique_violation, LedgerError, Result};
use syft_error::Reason;

/// How long "every account keeps the ledger's currency" is taken as still true.
const CURRENCIES_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

impl Store {
    pub async fn create_account(
        &self,
        email: &str,
        organization: &str,
        currency: &str,
        secret_hash: &str,
    ) -> Result<AccountRow> {
        let now = self.now();
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
            Ok(_) => *write_lock(&self.currencies) = None,
            Err(e) if is_unique_violation(&e) => {
                return Err(LedgerError::refused(
                    Reason::AccountExists,
                    format!("account {email} already exists"),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        self.account_by_email(email)
            .await?
            .ok_or_else(|| LedgerError::Internal("account vanished after insert".into()))
    }

    pub async fn account_by_email(&self, email: &str) -> Result<Option<AccountRow>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.email = $1");
        Ok(sqlx::query_as(&sql)
            .bind(email)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn list_accounts(&self) -> Result<Vec<AccountRow>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a ORDER BY a.id");
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// Replaces an account's secret. Cached Bearer lookups of the old secret are dropped here; other
    /// ledger replicas drop theirs within the cache TTL.
    pub async fn update_secret_hash(&self, account_id: i64, secret_hash: &str) -> Result<()> {
        // Cleared however this call ends: a caller that gives up while the UPDATE waits on a
        // lock drops this future, the statement commits all the same, and the old secret was
        // served from the cache for its whole minute.
        struct ClearOnDrop<'a>(&'a Store);
        impl Drop for ClearOnDrop<'_> {
            fn drop(&mut self) {
                write_lock(&self.0.secrets).clear();
            }
        }
        let _clear = ClearOnDrop(self);
        self.update_text(
            "UPDATE accounts SET secret_hash = $1 WHERE id = $2",
            account_id,
            secret_hash,
        )
        .await
    }

    pub async fn update_organization(&self, account_id: i64, organization: &str) -> Result<()> {
        self.update_text(
            "UPDATE accounts SET organization = $1 WHERE id = $2",
            account_id,
            organization,
        )
        .await
    }

    /// One text column of one account (`sql` binds the value as $1, the id as $2).
    async fn update_text(&self, sql: &'static str, account_id: i64, value: &str) -> Result<()> {
        sqlx::query(sql)
            .bind(value)
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
            Err(e) if e.reason() == Some(Reason::AccountExists) => {
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
    /// Whether some account keeps another currency than `currency` (the ledger's, always the
    /// same one). Once seen, for good (an account keeps its currency); not seen, asked again
    /// after [`CURRENCIES_RECHECK`] or once this process creates an account: the question reads
    /// every account of a ledger of one currency (130 – 294 ms for a million), and every admin
    /// analytics answer asks it.
    pub async fn other_currencies_than(&self, currency: &str) -> Result<bool> {
        if let Some((seen, at)) = *read_lock(&self.currencies) {
            if seen || at.elapsed() < CURRENCIES_RECHECK {
                return Ok(seen);
            }
        }
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM accounts WHERE currency <> $1 LIMIT 1) x",
        )
        .bind(currency)
        .fetch_one(&self.pool)
        .await?;
        *write_lock(&self.currencies) = Some((n > 0, Instant::now()));
        Ok(n > 0)
    }

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
    /// off the hot path. Two accounts that chose the same password cannot use Bearer auth (they
    /// must use Basic).
    pub async fn identity_by_secret_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<Arc<Identity>>> {
        if let Some((identity, at)) = read_lock(&self.secrets).get(secret_hash) {
            if at.elapsed() < SECRET_CACHE_TTL {
                return Ok(Some(identity.clone()));
            }
        }
        // Identity columns only: every request of a router arrives here at once when its entry
        // expires, so this must stay one key lookup (it once read the owner's balance, which
        // then summed its unrolled credits: 215 ms under load, docs/benchmarks.md).
        let mut rows: Vec<Identity> = sqlx::query_as(
            "SELECT id, email, currency FROM accounts WHERE secret_hash = $1 LIMIT 2",
        )
        .bind(secret_hash)
        .fetch_all(&self.pool)
        .await?;
        if rows.len() != 1 {
            return Ok(None);
        }
        let Some(identity) = rows.pop().map(Arc::new) else {
            return Ok(None);
        };
        insert_bounded(
            &self.secrets,
            secret_hash.to_string(),
            (identity.clone(), Instant::now()),
        );
        Ok(Some(identity))
    }

    /// An account's identity by email (a dashboard session's account).
    pub async fn identity_by_email(&self, email: &str) -> Result<Option<Identity>> {
        Ok(
            sqlx::query_as("SELECT id, email, currency FROM accounts WHERE email = $1")
                .bind(email)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// An account's identity and stored secret hash (Basic auth), in one read.
    pub async fn identity_and_secret_hash(
        &self,
        email: &str,
    ) -> Result<Option<(Identity, String)>> {
        #[derive(sqlx::FromRow)]
        struct WithHash {
            #[sqlx(flatten)]
            identity: Identity,
            secret_hash: String,
        }
        let row: Option<WithHash> = sqlx::query_as(
            "SELECT id, email, currency, secret_hash FROM accounts WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.identity, r.secret_hash)))
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
            let now = self.now();
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
                "INSERT INTO journal (account_id, amount, kind, ref_id, created_at) \
                 VALUES (NULL, $1, 'deposit', $2, $3), ($4, $5, 'deposit', $2, $3)",
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
                let (prev_account, prev_amount): (i64, i64) = sqlx::query_as(
                    "SELECT account_id, amount FROM deposits WHERE idempotency_key = $1",
                )
                .bind(idempotency_key)
                .fetch_one(&self.pool)
                .await?;
                if prev_account != account_id || prev_amount != amount {
                    return Err(LedgerError::refused(
                        Reason::IdempotencyConflict,
                        format!(
                            "idempotency key {idempotency_key:?} was used for a different deposit"
                        ),
                    ));
                }
            }
        }
        self.account_by_email(email)
            .await?
            .ok_or_else(|| LedgerError::Internal("account vanished".into()))
    }
}

enum DepositOutcome {
    Done,
    Replay,
    Overflow,
}
