//! The one place a database error is classified: by the driver's error kind, Postgres SQLSTATE and
//! SQLite result code, never by message text (messages change between versions and locales).

use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::postgres::PgDatabaseError;
use sqlx::sqlite::SqliteError;

/// Postgres SQLSTATE `40001`: the transaction lost a serialization race.
const PG_SERIALIZATION_FAILURE: &str = "40001";
/// Postgres SQLSTATE `40P01`: the transaction was chosen as a deadlock victim.
const PG_DEADLOCK_DETECTED: &str = "40P01";
/// Postgres SQLSTATE class `08`: connection exceptions.
const PG_CONNECTION_EXCEPTION_CLASS: &str = "08";
/// Postgres SQLSTATEs `57P01` (admin shutdown, also `pg_terminate_backend`), `57P02` (crash
/// shutdown) and `57P03` (cannot connect now): the server ended or refused the session.
const PG_SESSION_ENDED: [&str; 3] = ["57P01", "57P02", "57P03"];
/// Postgres SQLSTATEs of a server that refuses new sessions or writes for now: `55000` (the
/// database does not accept connections: `ALTER DATABASE … ALLOW_CONNECTIONS false`), `3D000` (it
/// does not exist: dropped or renamed under a running ledger), `25006` (a read-only transaction:
/// a standby behind the address after a failover). With the classes `53` (no room: too many
/// connections, disk full, out of memory) and `28` (our credentials refused).
const PG_REFUSED: [&str; 3] = ["55000", "3D000", "25006"];
const PG_REFUSED_CLASSES: [&str; 2] = ["53", "28"];
/// Postgres SQLSTATE `57014`: the statement was cancelled (its `statement_timeout`, or
/// `pg_cancel_backend`); its transaction rolled back.
const PG_QUERY_CANCELED: &str = "57014";
/// Postgres SQLSTATE `55P03`: a lock was not granted within the session's `lock_timeout` (a
/// DBA's setting on the role or database); the statement did not run and its transaction rolled
/// back, as a cancelled one's does. It was `INTERNAL`, which a router takes as final.
const PG_LOCK_NOT_AVAILABLE: &str = "55P03";
/// `duplicate_prepared_statement`: the ledger's prepared statements met another client's on one
/// server session, which only a pooler in transaction (or statement) mode does.
const PG_DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
/// SQLite primary result code `SQLITE_BUSY`: another connection holds the write lock.
const SQLITE_BUSY: i32 = 5;
/// SQLite primary result code `SQLITE_LOCKED`: a conflict inside this connection's shared cache.
const SQLITE_LOCKED: i32 = 6;
/// SQLite primary result codes of a database that cannot take writes for now: `SQLITE_NOMEM` (7),
/// `SQLITE_READONLY` (8: a file or directory the ledger may not write), `SQLITE_IOERR` (10),
/// `SQLITE_FULL` (13: the disk is full) and `SQLITE_CANTOPEN` (14: a directory taken away).
/// Nothing was written, and the call succeeds once the operator puts it right: `UNAVAILABLE`, as
/// Postgres' class `53` is. They were `INTERNAL`, which a router takes as final.
const SQLITE_REFUSED: [i32; 5] = [7, 8, 10, 13, 14];

/// What a database error means for the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbErrorClass {
    /// A unique index refused the row: an idempotency key or an email already taken.
    UniqueViolation,
    /// A CHECK constraint refused the row (`held_within_balance`, a token's bounds): a bug, or a
    /// statement that checked a row version older than the one it then updates (the hold batch,
    /// `batch.rs`, which runs again).
    CheckViolation,
    /// Lost a race that repeating the same statements can win (serialization failure, deadlock,
    /// a busy or locked SQLite database).
    Transient,
    /// The server ended the session (a restart, a terminated backend) or lost the connection:
    /// the transaction rolled back, or its commit's outcome is unknown. Not retried here; the
    /// caller is told `UNAVAILABLE` (outcome unknown) and repeats the call, which is idempotent.
    ConnectionLost,
    /// The server refuses sessions or writes for now ([`PG_REFUSED`]): the statement did nothing
    /// (a hosted step's remote call may have moved money before its journal write was refused;
    /// the steps are idempotent, so the repeat settles it), and the call succeeds once the
    /// operator puts it right. `UNAVAILABLE`, as a lost connection is:
    /// these were `INTERNAL`, which a router takes as final (a capture withheld its answer, a
    /// void was given up on and the hold left to expire, the request without a row).
    Refused,
    /// The statement was cancelled (a timeout or an operator); nothing it did was kept.
    Cancelled,
    /// A lock was not granted within the session's `lock_timeout` ([`PG_LOCK_NOT_AVAILABLE`]):
    /// the statement did not run; repeating it may find the lock free. Apart from
    /// [`DbErrorClass::Cancelled`], which analytics reads as "the query ran too long".
    LockNotGranted,
    /// The server session is shared with other clients (a pooler in transaction mode): a
    /// deployment the ledger does not support (docs/operations.md, "Postgres settings").
    SessionShared,
    /// Anything else.
    Other,
}

pub(crate) fn classify(err: &sqlx::Error) -> DbErrorClass {
    let sqlx::Error::Database(db) = err else {
        return DbErrorClass::Other;
    };
    match db.kind() {
        ErrorKind::UniqueViolation => return DbErrorClass::UniqueViolation,
        ErrorKind::CheckViolation => return DbErrorClass::CheckViolation,
        _ => {}
    }
    if is_transient(db.as_ref()) {
        return DbErrorClass::Transient;
    }
    if let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() {
        let code = pg.code();
        if code.starts_with(PG_CONNECTION_EXCEPTION_CLASS) || PG_SESSION_ENDED.contains(&code) {
            return DbErrorClass::ConnectionLost;
        }
        if code == PG_QUERY_CANCELED {
            return DbErrorClass::Cancelled;
        }
        if code == PG_LOCK_NOT_AVAILABLE {
            return DbErrorClass::LockNotGranted;
        }
        if code == PG_DUPLICATE_PREPARED_STATEMENT {
            return DbErrorClass::SessionShared;
        }
        if PG_REFUSED.contains(&code) || PG_REFUSED_CLASSES.iter().any(|c| code.starts_with(c)) {
            return DbErrorClass::Refused;
        }
    }
    if sqlite_primary_code(db.as_ref()).is_some_and(|c| SQLITE_REFUSED.contains(&c)) {
        return DbErrorClass::Refused;
    }
    DbErrorClass::Other
}

fn is_transient(db: &dyn DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() {
        return matches!(pg.code(), PG_SERIALIZATION_FAILURE | PG_DEADLOCK_DETECTED);
    }
    sqlite_primary_code(db).is_some_and(|c| matches!(c, SQLITE_BUSY | SQLITE_LOCKED))
}

/// A SQLite error's primary result code. `code()` is the extended result code; its low byte is
/// the primary code (`SQLITE_BUSY_SNAPSHOT` = 517 is `SQLITE_BUSY` too).
fn sqlite_primary_code(db: &dyn DatabaseError) -> Option<i32> {
    let sqlite = db.try_downcast_ref::<SqliteError>()?;
    let code = sqlite.code()?.parse::<i32>().ok()?;
    Some(code & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of one connection to `url`.
    async fn one_connection(url: &str) -> Result<sqlx::AnyPool, sqlx::Error> {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await
    }

    /// The error of `sql`, which must fail on `pool`.
    async fn error_of(sql: &str, pool: &sqlx::AnyPool) -> sqlx::Error {
        sqlx::query(sql).execute(pool).await.expect_err(sql)
    }

    #[test]
    fn non_database_errors_are_other() {
        assert_eq!(classify(&sqlx::Error::RowNotFound), DbErrorClass::Other);
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), DbErrorClass::Other);
    }

    /// A Postgres session the server ends (here the backend terminates itself, as
    /// `pg_terminate_backend` or a restart does) is a lost connection: `UNAVAILABLE`, outcome
    /// unknown, which a router repeats. It used to be `INTERNAL`, which a router takes as final.
    #[tokio::test]
    async fn a_session_postgres_ends_is_a_lost_connection() {
        let Ok(url) = std::env::var("DATABASE_URL") else {
            syft_testkit::skipped(syft_testkit::Need::Postgres, "no DATABASE_URL");
            return;
        };
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("postgres");
        let err = error_of("SELECT pg_terminate_backend(pg_backend_pid())", &pool).await;
        assert_eq!(classify(&err), DbErrorClass::ConnectionLost, "{err}");
        assert!(
            matches!(
                crate::error::LedgerError::from(err),
                crate::error::LedgerError::Unavailable(_)
            ),
            "UNAVAILABLE"
        );
        // A statement past its `statement_timeout` is cancelled and rolled back: `UNAVAILABLE`,
        // safe to repeat (it used to be `INTERNAL`).
        let err = past_a_timeout(&pool, "statement_timeout", "SELECT pg_sleep(1)").await;
        assert_eq!(classify(&err), DbErrorClass::Cancelled, "{err}");
        assert!(matches!(
            crate::error::LedgerError::from(err),
            crate::error::LedgerError::Unavailable(_)
        ));
        // So is a lock not granted within a `lock_timeout` (a DBA's setting): the statement did
        // not run (it was `INTERNAL`). Another session holds the lock.
        let key: i64 = rand_key();
        let holder = one_connection(&url).await.expect("postgres");
        sqlx::query(&format!("SELECT pg_advisory_lock({key})"))
            .execute(&holder)
            .await
            .expect("lock");
        let lock = format!("SELECT pg_advisory_lock({key})");
        let err = past_a_timeout(&pool, "lock_timeout", &lock).await;
        assert_eq!(classify(&err), DbErrorClass::LockNotGranted, "{err}");
        assert!(matches!(
            crate::error::LedgerError::from(err),
            crate::error::LedgerError::Unavailable(_)
        ));
        holder.close().await;
        pool.close().await;
    }

    /// The error of `statement` in a transaction whose `setting` is 50 ms.
    async fn past_a_timeout(pool: &sqlx::AnyPool, setting: &str, statement: &str) -> sqlx::Error {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query(&format!("SET LOCAL {setting} = 50"))
            .execute(&mut *tx)
            .await
            .expect(setting);
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .expect_err("past the timeout")
    }

    /// An advisory lock key no other test run uses.
    fn rand_key() -> i64 {
        let id = uuid::Uuid::now_v7().as_u128();
        (id as i64).wrapping_abs()
    }

    /// A database that stops taking sessions (`ALLOW_CONNECTIONS false`, then its sessions
    /// ended) or is dropped under the ledger: `UNAVAILABLE`, so a router repeats its capture or
    /// void until the operator puts it right. Both were `INTERNAL` (an operator's drill found it:
    /// holds left to expire, requests without a row).
    #[tokio::test]
    async fn a_database_that_refuses_sessions_is_unavailable() {
        let Ok(url) = std::env::var("DATABASE_URL") else {
            syft_testkit::skipped(syft_testkit::Need::Postgres, "no DATABASE_URL");
            return;
        };
        let connect = |url: String| async move { one_connection(&url).await };
        let admin = connect(url.clone()).await.expect("postgres");
        let name = format!("syft_dberr_{}", uuid::Uuid::now_v7().simple());
        let create = format!("CREATE DATABASE {name}");
        sqlx::query(&create).execute(&admin).await.expect("create");
        let (base, _) = url.rsplit_once('/').expect("a database url");
        let pool = connect(format!("{base}/{name}"))
            .await
            .expect("the new database");
        for sql in [
            format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            ),
        ] {
            sqlx::query(&sql).execute(&admin).await.expect(&sql);
        }
        // Each error's class and mapping, asserted once the database is dropped: a failed
        // assertion must not leave it behind.
        let seen = |err: sqlx::Error| {
            let class = classify(&err);
            let mapped = crate::error::LedgerError::from(err);
            (
                class,
                matches!(mapped, crate::error::LedgerError::Unavailable(_)),
            )
        };
        // The terminated session's error first, then the refused reconnection's.
        let mut errors = Vec::new();
        for _ in 0..2 {
            errors.push(("ended", seen(error_of("SELECT 1", &pool).await)));
        }
        let refused = connect(format!("{base}/{name}")).await.map(|_| ());
        errors.push((
            "refused",
            refused.map_or_else(seen, |()| (DbErrorClass::Other, false)),
        ));
        let drop = format!("DROP DATABASE {name} WITH (FORCE)");
        sqlx::query(&drop).execute(&admin).await.expect("drop");
        let missing = connect(format!("{base}/{name}")).await.map(|_| ());
        errors.push((
            "dropped",
            missing.map_or_else(seen, |()| (DbErrorClass::Other, false)),
        ));
        for (what, (class, unavailable)) in &errors {
            assert!(unavailable, "{what}: {class:?} is not UNAVAILABLE");
        }
        assert_eq!(errors[2].1 .0, DbErrorClass::Refused, "refused: {errors:?}");
        assert_eq!(errors[3].1 .0, DbErrorClass::Refused, "dropped: {errors:?}");
        pool.close().await;
        admin.close().await;
    }

    /// Real SQLite errors through the `Any` driver, as the store sees them.
    #[tokio::test]
    async fn sqlite_errors_are_classified_by_result_code() {
        sqlx::any::install_default_drivers();
        let path = std::env::temp_dir().join(format!("syft-db-error-{}.db", uuid::Uuid::now_v7()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = |url: String| async move { one_connection(&url).await.expect("sqlite") };
        let a = pool(url.clone()).await;
        sqlx::query("CREATE TABLE k (id TEXT PRIMARY KEY, v TEXT UNIQUE)")
            .execute(&a)
            .await
            .expect("create");
        sqlx::query("INSERT INTO k VALUES ('1', 'x')")
            .execute(&a)
            .await
            .expect("insert");
        for dup in [
            "INSERT INTO k VALUES ('2', 'x')",
            "INSERT INTO k VALUES ('1', 'y')",
        ] {
            let err = error_of(dup, &a).await;
            assert_eq!(classify(&err), DbErrorClass::UniqueViolation, "{err}");
        }
        let other = error_of("INSERT INTO missing VALUES (1)", &a).await;
        assert_eq!(classify(&other), DbErrorClass::Other, "{other}");

        // A second connection cannot write while the first holds the write lock: SQLITE_BUSY.
        let mut holder = a.begin().await.expect("begin");
        sqlx::query("INSERT INTO k VALUES ('3', 'z')")
            .execute(&mut *holder)
            .await
            .expect("insert");
        let b = pool(url).await;
        sqlx::query("PRAGMA busy_timeout = 0")
            .execute(&b)
            .await
            .expect("pragma");
        let busy = error_of("INSERT INTO k VALUES ('4', 'w')", &b).await;
        assert_eq!(classify(&busy), DbErrorClass::Transient, "{busy}");
        holder.rollback().await.expect("rollback");
        a.close().await;
        b.close().await;
        let _ = std::fs::remove_file(&path);
    }

    /// SQLite ends a transaction by itself on a full disk (also on an I/O error or out of
    /// memory); here a `ROLLBACK` sent inside the transaction does what SQLite does. Its commit
    /// fails, and so does sqlx's rollback, which left the connection counted "in a transaction":
    /// every later transaction became a savepoint, and once one of them failed (`ROLLBACK TO`
    /// keeps the transaction open) all later commits nested inside a transaction nobody commits.
    /// The ledger answered them as committed and lost them at its restart (an operator filled the
    /// disk under paid load: 6,462 answers charged, 5 left in the file). The pool now closes such
    /// a connection, and a later commit is in the file, seen by another connection.
    #[tokio::test]
    async fn a_transaction_sqlite_ended_by_itself_loses_no_later_commit() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("ledger.db").display()
        );
        let store = crate::store::Store::connect(&url, 1).await.expect("store");
        let pool = store.pool();
        sqlx::query("CREATE TABLE probe (x INTEGER PRIMARY KEY)")
            .execute(pool)
            .await
            .expect("table");
        let insert = |x: i64| sqlx::query("INSERT INTO probe (x) VALUES ($1)").bind(x);
        let mut ended = pool.begin().await.expect("begin");
        insert(1).execute(&mut *ended).await.expect("insert");
        sqlx::query("ROLLBACK")
            .execute(&mut *ended)
            .await
            .expect("SQLite's own rollback");
        assert!(ended.commit().await.is_err(), "nothing left to commit");
        let mut failed = pool.begin().await.expect("begin");
        insert(2).execute(&mut *failed).await.expect("insert");
        assert!(
            insert(2).execute(&mut *failed).await.is_err(),
            "a duplicate"
        );
        drop(failed);
        let mut committed = pool.begin().await.expect("begin");
        insert(3).execute(&mut *committed).await.expect("insert");
        committed.commit().await.expect("commit");
        let other = one_connection(&url).await.expect("another connection");
        let seen: Vec<i64> = sqlx::query_scalar("SELECT x FROM probe ORDER BY x")
            .fetch_all(&other)
            .await
            .expect("read");
        assert_eq!(seen, vec![3], "committed, and in the file");
        other.close().await;
        store.close().await;
    }

    /// A full disk (here the file's page cap) refuses the write for now: `UNAVAILABLE`, which a
    /// router repeats, not `INTERNAL`, which it takes as final.
    #[tokio::test]
    async fn a_full_sqlite_disk_is_unavailable() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("full.db").display());
        let pool = one_connection(&url).await.expect("sqlite");
        sqlx::query("CREATE TABLE blobs (b BLOB)")
            .execute(&pool)
            .await
            .expect("table");
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&pool)
            .await
            .expect("pages");
        sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 2))
            .execute(&pool)
            .await
            .expect("cap");
        let err = error_of("INSERT INTO blobs VALUES (zeroblob(1000000))", &pool).await;
        assert_eq!(classify(&err), DbErrorClass::Refused, "{err}");
        assert!(matches!(
            crate::error::LedgerError::from(err),
            crate::error::LedgerError::Unavailable(_)
        ));
        pool.close().await;
    }
}
