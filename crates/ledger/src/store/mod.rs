//! The ledger's database: one code path over Postgres and SQLite (sqlx `Any`), plus a single-statement
//! fast path for the hot Postgres operations (see `transfer.rs`).
//!
//! Every invariant is enforced inside a database transaction or a single atomic statement, never in
//! process memory, so several ledger processes can share one Postgres.

mod account;
mod analytics;
mod analytics_keys;
mod analytics_user;
mod answer;
mod authorize;
mod batch;
mod budget;
mod budget_batch;
mod budget_days;
mod clock;
pub(crate) mod db_error;
mod extend;
mod floor;
pub mod hll;
mod migrate;
mod query;
mod refund;
mod resolve_batch;
pub mod rollup;
mod rollup_fold;
mod rollup_upsert;
mod rows;
mod token;
mod transfer;
mod turns;
mod usage;
mod usage_batch;
mod verify;
mod verify_rollups;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool, Connection, Executor};

use crate::error::{is_retryable, LedgerError, Result};

pub use crate::domain::{Actor, Micros, TransferStatus};
pub use analytics::{
    Dimension, KeyValue, Measures, Percentiles, StatsFilter, StatsGroup, StatsScope, Top, TopBy,
};
pub use answer::{AnswerRow, AnswerWrite};
pub(crate) use authorize::key_reused;
pub use authorize::{AuthorizeInput, DirectInput};
pub use budget::budget_use;
pub(crate) use budget::windowed_use;
pub use budget::{BudgetRefusal, BudgetUse, BudgetWindow, HoldBudgets, WindowUse};
pub use migrate::{migration_state, newer_database, Migrations};
pub use query::{
    Keyset, Parties, TimeRange, TokenFilter, TokenRow, TransferFilter, UsageDims, UsageFilter,
    UsagePage, UsageTotals,
};
pub use refund::{RefundInput, RefundRow, Refunded};
pub use rows::{AccountRow, Identity, IssuedToken, TokenInfo, TransferRow, UsageInput, UsageRow};
// An Authorize's transfer and whether it was placed by an earlier call (issue 15).
pub use authorize::Placed;
pub(crate) use rows::{
    TokenLimits, ACCOUNT_COLUMNS, REFUNDED, TRANSFER_COLUMNS, TRANSFER_JOINS, USAGE_COLUMNS,
};
pub use token::{TokenGrant, TOKEN_PREFIX};
pub(crate) use transfer::{cancelled_reason, CANCEL_EXPIRED};
pub use transfer::{CaptureAmount, Resolution, ResolveInput, SweepReport};
pub(crate) use usage::{insert_usage, late_void_row, UsageLink, UsageWrite};
pub use verify::VerifyReport;

/// A JSON text of `value`: the list parameter of the set-based statements, which the `Any`
/// driver binds on every engine.
pub(crate) fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Whether `conn` talks to Postgres (the `Any` driver's backend name), for the steps whose SQL
/// differs by engine.
pub(crate) fn is_postgres(conn: &AnyConnection) -> bool {
    conn.backend_name() == "PostgreSQL"
}

/// Whether a SQLite connection given back to the pool may be used again. SQLite ends a
/// transaction by itself on some errors (`SQLITE_FULL` on a full disk, `SQLITE_IOERR`,
/// `SQLITE_NOMEM`): sqlx's `ROLLBACK` then fails and its count of open transactions stays at one,
/// so every later transaction on the connection became a savepoint, and after the first failed
/// one (`ROLLBACK TO`, which leaves the transaction open) all of them nested inside a transaction
/// nobody commits: the ledger answered every capture as committed and lost them all at its
/// restart. Such a connection is closed (SQLite rolls back what it held, which no caller was told
/// was committed) and the pool opens a fresh one.
async fn sqlite_connection_is_clean(conn: &mut AnyConnection) -> Result<bool, sqlx::Error> {
    // The dropped transaction's rollback is queued on the connection's worker; the ping runs
    // after it, so the count read next is settled.
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::error!(
            "SQLite ended a transaction by itself (disk full, I/O error or out of memory): \
             closing its connection"
        );
        return Ok(false);
    }
    Ok(true)
}

/// Opens a pool on `database_url`. sqlx keeps trying a refused connection until the acquire
/// timeout (a database still starting), then reports only "pool timed out while waiting for an
/// open connection": an operator with a wrong port or host learnt nothing. After that wait one
/// direct connection is tried, and its error (refused, unknown host, no such database) is the
/// one returned.
pub(crate) async fn open_pool(
    options: AnyPoolOptions,
    database_url: &str,
) -> Result<AnyPool, sqlx::Error> {
    let database_url = &*plaintext_on_loopback(database_url);
    match options.connect(database_url).await {
        // Not for SQLite: `mode=rwc` would create the file. Bounded: a host that drops packets
        // would otherwise add the system's connect timeout (minutes) to the wait.
        Err(sqlx::Error::PoolTimedOut) if !database_url.starts_with("sqlite:") => {
            let direct = AnyConnection::connect(database_url);
            match tokio::time::timeout(Duration::from_secs(5), direct).await {
                Ok(Err(why)) => Err(why),
                _ => Err(sqlx::Error::PoolTimedOut),
            }
        }
        other => other,
    }
}

/// A Postgres URL that names no `sslmode`, for a server on this host, with `sslmode=disable`.
/// With TLS built in, the driver's default (`prefer`, libpq's) encrypts loopback connections too:
/// that protects nothing from anyone who could read them (they are on the host already) and cost
/// 8 – 15 % of paid throughput (docs/benchmarks.md, 2026-12-06). Any other host keeps `prefer`
/// (TLS when the server offers it), and so does a URL that names a mode, a server by `host=` or
/// `hostaddr=` (the driver connects there, not to the URL's host), or runs with `PGSSLMODE` set.
fn plaintext_on_loopback(database_url: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let Ok(url) = url::Url::parse(database_url) else {
        return Cow::Borrowed(database_url);
    };
    let named = std::env::var_os("PGSSLMODE").is_some()
        || url.query_pairs().any(|(k, _)| {
            ["sslmode", "ssl-mode", "host", "hostaddr"].contains(&k.to_ascii_lowercase().as_str())
        });
    let loopback = match url.host() {
        // A `postgres:` URL's host is opaque to the parser: an IPv4 address comes as a name.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        }
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        // A Unix socket (`host=` in the query): Postgres speaks no TLS there anyway.
        None => false,
    };
    if !matches!(url.scheme(), "postgres" | "postgresql") || named || !loopback {
        return Cow::Borrowed(database_url);
    }
    let sep = if url.query().is_some() { '&' } else { '?' };
    Cow::Owned(format!("{database_url}{sep}sslmode=disable"))
}

/// The file of a `sqlite:` URL (`sqlite://ledger.db?mode=rwc`, `sqlite:ledger.db`); `None` for
/// other URLs and an in-memory database.
fn sqlite_file(database_url: &str) -> Option<&std::path::Path> {
    let rest = database_url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| std::path::Path::new(path))
}

/// Creates a new SQLite database file readable by its owner only (0600 on Unix; SQLite gives its
/// `-wal` and `-shm` the same mode): it holds stored answers, rows naming users and secret
/// hashes, and the umask made it 0644 wherever the directory was not the ledger's own. An
/// existing file keeps its mode: the operator's choice.
fn create_private_file(database_url: &str) {
    let Some(file) = sqlite_file(database_url) else {
        return;
    };
    // A file that exists keeps its mode; any other failure is left to SQLite, whose error names
    // the file and what it could not do.
    let _ = syft_server::private_file()
        .write(true)
        .create_new(true)
        .open(file);
}

/// How long an authenticated secret stays cached; secrets are never rotated in place, so this only
/// bounds memory staleness, not security.
pub(super) const SECRET_CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX_ENTRIES: usize = 100_000;

pub const DEFAULT_BATCH_WORKERS: usize = 1;

/// "The transfer is still pending", for statements that find a transfer by id. Never written
/// `status = 'PENDING'` there: that matches the predicate of the partial index
/// `transfers_pending_expiry`, and the planner then reads every pending hold's entry instead of
/// probing the primary key (see `RESOLVE_BATCH` in resolve_batch.rs). The `CHECK` on `status` makes this
/// the same rows. Prefix it with the table's alias where there is one (`t.{UNRESOLVED}`).
pub(crate) const UNRESOLVED: &str = "status NOT IN ('COMPLETED', 'CANCELLED')";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// SQL for the database's own clock in micros, read when the statement evaluates it. A guard
    /// that must hold when the statement has its locks (a hold not yet expired when its capture
    /// or extension takes effect) reads this rather than only a clock read before the statement
    /// was sent: that one is late by every lock wait, and a budget check that meanwhile saw the
    /// hold expired would have freed its amount for another hold (docs/design.md, "A capture is
    /// judged by the clock after its lock waits"). Postgres' `clock_timestamp()` is the time of
    /// the call; SQLite's `'now'` is read once per step, after the write lock was taken.
    pub(crate) fn clock_micros_sql(self) -> &'static str {
        match self {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
        }
    }
}

impl Store {
    /// The database's clock (Postgres; `None` on SQLite, whose clock is this process's): the one
    /// clock every replica shares, read where a hold's expiry is judged.
    pub(crate) async fn database_clock(&self) -> Result<Option<i64>> {
        if self.backend() != Backend::Postgres {
            return Ok(None);
        }
        let sql = format!("SELECT {}", Backend::Postgres.clock_micros_sql());
        Ok(Some(sqlx::query_scalar(&sql).fetch_one(self.pool()).await?))
    }
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

/// A new id dated `micros` (unix) rather than by this host's clock: a usage row's id is dated by
/// the ledger's clock (its database's on Postgres), as its `created_at` is, so that a replica
/// whose own clock is behind its database's does not write rows that [`first_id_at`] bounds
/// leave out (a diff reviewer's finding).
pub(crate) fn new_id_at(micros: i64) -> String {
    let (secs, nanos) = (
        micros.div_euclid(1_000_000),
        micros.rem_euclid(1_000_000) * 1_000,
    );
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        u64::try_from(secs).unwrap_or(0),
        u32::try_from(nanos).unwrap_or(0),
    );
    uuid::Uuid::new_v7(ts).to_string()
}

/// The smallest id [`new_id`] gives at `micros` (unix) or later: ids are UUIDv7, whose text sorts
/// by their millisecond first. A usage query of a recent window adds `id >= first_id_at(since -
/// margin)` to be read through `usage_recipient (recipient_id, id)` as a range, not the owner's
/// whole history (alerts). Usage rows' ids are dated by the clock of their `created_at` or later
/// ([`new_id_at`]); the margin covers a row the ledger's clock, refreshed every few seconds,
/// dated a little early.
pub(crate) fn first_id_at(micros: i64) -> String {
    let ms = u64::try_from(micros / 1000).unwrap_or(0);
    format!(
        "{:08x}-{:04x}-0000-0000-000000000000",
        (ms >> 16) & 0xffff_ffff,
        ms & 0xffff
    )
}

pub fn sha256_hex(data: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data.as_bytes()))
}

pub struct Store {
    pool: AnyPool,
    /// SQLite: a read-only connection of its own for analytics (WAL lets it read beside the
    /// writer), so a long answer does not hold the one connection every hold, capture and row
    /// waits for (one over 400,000 rows held it 25 s, and holds failed "database unavailable").
    /// `None` on Postgres and for an in-memory database.
    reader: Option<AnyPool>,
    backend: Backend,
    tokens: RwLock<HashMap<String, Arc<TokenInfo>>>,
    secrets: RwLock<HashMap<String, (Arc<Identity>, Instant)>>,
    emails: RwLock<HashMap<String, i64>>,
    /// [`Store::other_currencies_than`]'s last answer, and when it was read.
    currencies: RwLock<Option<(bool, Instant)>>,
    /// Postgres only: the batched write path for holds, captures and voids.
    batcher: Option<batch::Batcher>,
    /// Group commit for usage rows without money (both backends).
    usage_writer: usage_batch::UsageWriter,
    /// Budgeted holds, decided together per sender (`budget_batch.rs`).
    budgeted: budget_batch::BudgetedHolds,
    /// Postgres only: folds queued usage rows into the rollups (`rollup_fold.rs`).
    _folder: Option<rollup_fold::Folder>,
    /// Where the expiry sweep and the answer purge start reading (`floor.rs`).
    sweep_floor: floor::ScanFloor,
    answer_floor: floor::ScanFloor,
    /// Turns for analytics answers (`analytics.rs`): a quarter of the pool's connections, shared
    /// out round robin among the callers that wait (`turns.rs`).
    analytics: turns::FairTurns,
    /// What "now" is for every decision the store makes (`clock.rs`).
    clock: clock::Clock,
}

/// Runs `op` again when the database reports a serialization failure or deadlock; those are never
/// business errors (docs/design.md §3).
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
        Self::open(database_url, max_connections, Some(batch_workers)).await
    }

    /// Opens an existing ledger to read it (`ledger verify`), writing nothing of its own: no
    /// migrations (the caller checked that none is missing, [`migration_state`]), no rebuild
    /// of empty rollups (a fresh ledger's rows all queued looked like an upgrade from before the
    /// rollups, and verify recomputed every rollup under the running ledger), no batch workers
    /// and no rollup folder (Verify folds the queue itself, as the folder would). One batch
    /// worker runs on Postgres all the same, idle unless called: the money paths there go
    /// through it, and without it a store used beyond `verify` would take SQLite's.
    pub async fn inspect(database_url: &str) -> Result<Self> {
        Self::open(database_url, 2, None).await
    }

    /// `batch_workers`: `Some` to serve (migrate, backfill rollups, start the Postgres batch
    /// workers and the rollup folder), `None` to [`inspect`](Store::inspect) (one idle worker).
    async fn open(
        database_url: &str,
        max_connections: u32,
        batch_workers: Option<usize>,
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
        // No idle timeout and no lifetime, so sqlx (0.8) starts no pool maintenance task: that
        // task can race with a connection being given back, wrap the pool's idle count below
        // zero and then spin a core for good; on SQLite's one-connection pool it also left every
        // acquire waiting (a test run hung so). Connections are still checked before each use
        // (`test_before_acquire`), and a broken one is replaced on demand.
        let options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(None)
            .max_lifetime(None);
        let unreachable = |e: sqlx::Error| {
            LedgerError::Unavailable(format!("cannot connect to the database: {e}"))
        };
        let pool_options = match backend {
            Backend::Postgres => options.clone().max_connections(max_connections.max(1)),
            // One writer connection: SQLite serializes writers anyway, and a single connection
            // can never hit a lock-upgrade deadlock (SQLITE_BUSY) between two of our transactions.
            Backend::Sqlite => options
                .clone()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // busy_timeout first: switching to WAL takes a lock another process (a CLI
                        // reading the same file) may hold; without the timeout that fails at once.
                        conn.execute(
                            "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
                         PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                        Ok(())
                    })
                })
                .after_release(|conn, _| Box::pin(sqlite_connection_is_clean(conn))),
        };
        if backend == Backend::Sqlite && database_url.contains("mode=rwc") {
            create_private_file(database_url);
        }
        let pool = open_pool(pool_options, database_url)
            .await
            .map_err(unreachable)?;
        let clock = match backend {
            Backend::Postgres => clock::Clock::database(pool.clone())
                .await
                .map_err(unreachable)?,
            Backend::Sqlite => clock::Clock::system(),
        };
        let serving = batch_workers.is_some();
        if serving {
            migrate::migrate(&pool, backend).await?;
            if backend == Backend::Sqlite {
                // A file (or directory) the ledger may not write migrates without writing once
                // it is up to date, and then served reads while refusing every hold: refuse it
                // here. An update of no row still takes the write lock, and writes nothing. A
                // lock another process holds past the busy timeout (an old ledger still
                // draining) says nothing of permissions: that one starts.
                let probe = sqlx::query("UPDATE _sqlx_migrations SET version = version WHERE 0")
                    .execute(&pool)
                    .await;
                match probe {
                    Ok(_) => {}
                    Err(e) if db_error::classify(&e) == db_error::DbErrorClass::Transient => {
                        tracing::warn!(error = %e, "another process holds the SQLite write lock");
                    }
                    Err(e) => {
                        return Err(LedgerError::Unavailable(format!(
                            "the SQLite database cannot be written ({e}): check the permissions \
                             of the file and of its directory"
                        )))
                    }
                }
            }
        }
        let reader = match backend {
            Backend::Sqlite if !database_url.contains("memory") => {
                let read_only = options.clone().max_connections(1).after_connect(|conn, _| {
                    Box::pin(async move {
                        // A read now opens the WAL files, as the writer's connection has: a
                        // file removed under a running ledger (tests' temporary folders) is
                        // still read by both, as it was by the one.
                        conn.execute(
                            "PRAGMA busy_timeout = 5000; PRAGMA query_only = ON; \
                             SELECT COUNT(*) FROM sqlite_master;",
                        )
                        .await?;
                        Ok(())
                    })
                });
                Some(
                    open_pool(read_only, database_url)
                        .await
                        .map_err(unreachable)?,
                )
            }
            _ => None,
        };
        let batcher = match backend {
            Backend::Postgres => {
                let workers = batch_workers.unwrap_or(1);
                Some(batch::Batcher::start(
                    batch::connect(options, database_url, workers)
                        .await
                        .map_err(unreachable)?,
                    workers,
                ))
            }
            Backend::Sqlite => None,
        };
        let usage_writer = usage_batch::UsageWriter::start(pool.clone(), backend);
        let folder = (backend == Backend::Postgres && serving)
            .then(|| rollup_fold::start_folder(pool.clone()));
        let store = Self {
            _folder: folder,
            budgeted: budget_batch::BudgetedHolds::new(pool.clone()),
            batcher,
            usage_writer,
            pool,
            reader,
            backend,
            tokens: RwLock::default(),
            secrets: RwLock::default(),
            emails: RwLock::default(),
            currencies: RwLock::default(),
            clock,
            sweep_floor: floor::ScanFloor::default(),
            answer_floor: floor::ScanFloor::default(),
            analytics: turns::FairTurns::new(match backend {
                Backend::Postgres => usize::try_from(max_connections / 4).unwrap_or(1).max(1),
                Backend::Sqlite => 1,
            }),
        };
        if serving {
            store.backfill_rollups().await?;
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Where analytics read: SQLite's read-only connection, or the pool.
    pub(super) fn reader(&self) -> &AnyPool {
        self.reader.as_ref().unwrap_or(&self.pool)
    }

    /// The ledger's clock in micros since the Unix epoch: on Postgres the database's, which every
    /// replica shares; on SQLite this process's (`clock.rs`).
    pub fn now(&self) -> i64 {
        self.clock.now()
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

    /// Closes every connection: on SQLite the last one to close folds the write-ahead log into
    /// the database file and removes it (`serve`), so the analytics reader is closed too.
    pub async fn close(&self) {
        if let Some(batcher) = &self.batcher {
            batcher.close().await;
        }
        if let Some(reader) = &self.reader {
            reader.close().await;
        }
        self.pool.close().await;
    }
}

pub(super) fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn insert_bounded<V>(cache: &RwLock<HashMap<String, V>>, key: String, value: V) {
    let mut map = write_lock(cache);
    if map.len() >= CACHE_MAX_ENTRIES {
        map.clear();
    }
    map.insert(key, value);
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_sort_after_the_first_id_of_their_time() {
        let now = super::now_micros();
        let id = super::new_id();
        assert!(super::first_id_at(now - 1_000) <= id, "{id}");
        assert!(super::first_id_at(now + 1_000_000) > id, "{id}");
        assert_eq!(
            super::first_id_at(-5),
            "00000000-0000-0000-0000-000000000000"
        );
        // Dated by the clock given, not this host's: two hours back sorts two hours back.
        let early = super::new_id_at(now - 7_200_000_000);
        assert!(early >= super::first_id_at(now - 7_200_000_000), "{early}");
        assert!(early < super::first_id_at(now - 7_199_000_000), "{early}");
    }

    /// A SQLite database the ledger may not write is refused at start-up: it used to start,
    /// report SERVING, and refuse every hold (an operator's copy of a ledger, read-only).
    #[tokio::test]
    async fn a_sqlite_database_it_cannot_write_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("ledger.db");
        let store = super::Store::connect(&format!("sqlite://{}?mode=rwc", file.display()), 1)
            .await
            .expect("a new ledger");
        store.close().await;
        // A new file is its owner's only, whatever the directory's mode (it was 0644; SQLite
        // gives its `-wal` and `-shm` the file's mode).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(&file).expect("ledger.db");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        let read_only = format!("sqlite://{}?mode=ro", file.display());
        let refused = super::Store::connect(&read_only, 1).await.err();
        let message = refused.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("cannot be written"), "{message:?}");
    }

    /// TLS to a database on this host is off unless the URL asks for it; any other host, or a
    /// mode the URL names, is left to the driver (`prefer`: TLS when offered).
    #[test]
    fn loopback_databases_are_plaintext_unless_asked() {
        for (url, want) in [
            (
                "postgres://u@127.0.0.1:5432/db",
                "postgres://u@127.0.0.1:5432/db?sslmode=disable",
            ),
            (
                "postgres://u@localhost/db?x=1",
                "postgres://u@localhost/db?x=1&sslmode=disable",
            ),
            (
                "postgresql://u@[::1]/db",
                "postgresql://u@[::1]/db?sslmode=disable",
            ),
            (
                "postgres://u@127.0.0.1/db?sslmode=require",
                "postgres://u@127.0.0.1/db?sslmode=require",
            ),
            (
                "postgres://u@db.example.com/db",
                "postgres://u@db.example.com/db",
            ),
            ("postgres://u@10.0.0.5/db", "postgres://u@10.0.0.5/db"),
            // The driver connects to `hostaddr=`, not to the URL's host.
            (
                "postgres://u@localhost/db?hostaddr=10.0.0.5",
                "postgres://u@localhost/db?hostaddr=10.0.0.5",
            ),
            (
                "postgres://u@/db?host=/run/postgresql",
                "postgres://u@/db?host=/run/postgresql",
            ),
            ("sqlite://ledger.db?mode=rwc", "sqlite://ledger.db?mode=rwc"),
        ] {
            assert_eq!(super::plaintext_on_loopback(url), want, "{url}");
        }
    }

    /// A database a newer binary migrated is refused by name (a downgrade): it was "internal
    /// error: migration failed: migration 24 was previously applied but is missing".
    #[tokio::test]
    async fn a_database_of_a_newer_version_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("ledger.db").display()
        );
        let store = super::Store::connect(&url, 1).await.expect("a new ledger");
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (9999, 'a later version', TRUE, X'00', 0)",
        )
        .execute(store.pool())
        .await
        .expect("a migration of a later version");
        store.close().await;
        let refused = super::Store::connect(&url, 1).await.err();
        let message = refused.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("migrated by a newer syft-router (migrations [9999]"),
            "{message:?}"
        );
    }

    use sqlx::migrate::Migrator;

    use super::migrate::{PG_MIGRATOR, SQLITE_MIGRATOR};

    /// Version and checksum of each migration, so an edited file counts as well as a new one.
    fn listed(m: &Migrator) -> Vec<(i64, Vec<u8>)> {
        m.iter().map(|m| (m.version, m.checksum.to_vec())).collect()
    }

    /// The directory as sqlx itself reads it at run time (its own file-name rules).
    async fn on_disk(dir: &str) -> Vec<(i64, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let m = Migrator::new(dir.as_path())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        listed(&m)
    }

    /// Every migration file is in the binary as it is on disk (build.rs makes Cargo notice a new
    /// one), and each Postgres migration has its SQLite counterpart of the same number (a no-op
    /// where SQLite needs nothing), so both backends report the same schema version.
    #[tokio::test]
    async fn the_binary_embeds_every_migration_of_both_backends() {
        assert_eq!(
            listed(&PG_MIGRATOR),
            on_disk("../../migrations/postgres").await
        );
        assert_eq!(
            listed(&SQLITE_MIGRATOR),
            on_disk("../../migrations/sqlite").await
        );
        let versions = |m: &Migrator| m.iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(versions(&PG_MIGRATOR), versions(&SQLITE_MIGRATOR));
    }

    /// A database port nobody listens on is reported as refused, after the pool's wait, not as
    /// sqlx's "pool timed out while waiting for an open connection", which said nothing of why.
    #[tokio::test]
    async fn a_closed_database_port_is_reported_as_refused() {
        sqlx::any::install_default_drivers();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let options = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_millis(300));
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let e = super::open_pool(options, &url)
            .await
            .expect_err("nothing listens there");
        let refused =
            matches!(&e, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
        assert!(refused, "{e:?}");
    }
}
