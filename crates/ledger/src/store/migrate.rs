//! The schema's migrations: how a database compares with this binary's, and applying them
//! (docs/operations.md, "Upgrades").

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{AnyPool, Executor};

use super::db_error::{classify, DbErrorClass};
use super::{open_pool, sqlite_file, Backend};
use crate::error::{LedgerError, Result};

pub(super) static PG_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");
pub(super) static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How a database's migrations compare with this binary's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrations {
    /// This binary's migrations the database lacks (an upgrade applies them).
    pub missing: Vec<i64>,
    /// Migrations applied to the database that this binary does not know: a newer binary's.
    pub unknown: Vec<i64>,
}

/// How the database at `database_url` compares with this binary's migrations; `None` when it
/// holds no ledger (no migrations table). Read without migrating, unlike [`Store::connect`]:
/// `verify` must not give an empty database a schema, nor apply a migration that older replicas
/// still running on it cannot work with (0030, 0032: docs/operations.md).
pub async fn migration_state(database_url: &str) -> Result<Option<Migrations>> {
    sqlx::any::install_default_drivers();
    let sqlite = database_url.starts_with("sqlite:");
    // `mode=rwc` (the form the docs show) would create the file being looked for.
    if sqlite_file(database_url).is_some_and(|file| !file.exists()) {
        return Ok(None);
    }
    let options = AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10));
    let pool = open_pool(options, database_url).await?;
    let state = compare_migrations(&pool, sqlite).await;
    pool.close().await;
    state
}

/// [`migration_state`] of `pool`'s database.
async fn compare_migrations(pool: &AnyPool, sqlite: bool) -> Result<Option<Migrations>> {
    let table = if sqlite {
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
    } else {
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
    };
    if sqlx::query_scalar::<_, i64>(table).fetch_one(pool).await? == 0 {
        return Ok(None);
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?;
    let ours: Vec<i64> = if sqlite {
        SQLITE_MIGRATOR.iter().map(|m| m.version).collect()
    } else {
        PG_MIGRATOR.iter().map(|m| m.version).collect()
    };
    Ok(Some(Migrations {
        missing: ours
            .iter()
            .copied()
            .filter(|v| !applied.contains(v))
            .collect(),
        unknown: applied.into_iter().filter(|v| !ours.contains(v)).collect(),
    }))
}

/// The refusal of a database a newer binary migrated: a ledger cannot go back a version.
pub fn newer_database(unknown: &[i64]) -> LedgerError {
    LedgerError::FailedPrecondition(format!(
        "this database was migrated by a newer syft-router (migrations {unknown:?} are unknown \
         to this binary): a ledger cannot go back a version; run the newer binary, or restore \
         the backup taken before the upgrade (docs/operations.md, \"Upgrades\")"
    ))
}

/// Migrations edited after a build on the main line had applied them, with the `sha384` of that
/// earlier text, which sqlx stored. Each edit left the schema as the file now makes it (a lock
/// taken first, two statements swapped, a lock timeout, comments); 0001's first text, of the
/// project's first hour, also made an index (`journal_account`) and a function (`ledger_abort`)
/// that nothing uses. sqlx refuses a checksum that changed, so a database those builds migrated
/// could never be upgraded ("migration 34 was previously applied but has been modified"): its
/// record is brought up to date first. A released migration is never edited again; a change is a
/// new migration (`released_migrations_are_never_edited` pins every file).
const EDITED: [(Backend, i64, &str); 8] = [
    (Backend::Postgres, 1, "c94bc60505e6d8724f5b601531037891298b0db1b10e40876e422342ee81a191a523047e674f0a38b164c12213d66478"),
    (Backend::Sqlite, 1, "dfc166dba0d12474ca8b2335a578818ecb0bde29eee2569bd24533784a91995fdc0965c3bf5d108a85e05a196d667b92"),
    (Backend::Postgres, 22, "7c93d5eb9dc6c44cecc827fa921a0ae2e751c04df74bff408bfb8bf5342d020171b5fc08da87a45f81c91ba49748c1fc"),
    (Backend::Postgres, 28, "b738e678991c3921a41e3b4aac30421b7b3d465527f0f9598c60884a12e90f943a8b9ac8381a0a0b66358ee7df426075"),
    (Backend::Sqlite, 28, "b738e678991c3921a41e3b4aac30421b7b3d465527f0f9598c60884a12e90f943a8b9ac8381a0a0b66358ee7df426075"),
    (Backend::Postgres, 32, "6df96f3a34f106388e276e953b42647fbbc9d599fca512c18d689e592d64d17d3bdca10dfecbc1e962269529511a9124"),
    (Backend::Sqlite, 32, "6df96f3a34f106388e276e953b42647fbbc9d599fca512c18d689e592d64d17d3bdca10dfecbc1e962269529511a9124"),
    (Backend::Postgres, 34, "7d882911310bca1695fd7b593b84a67a08a392ea01361eb0c496a327a8227a5614dee3350dcd98f3f813a8439e0a4a9f"),
];

/// The longest a migration's statement waits for a table's lock on Postgres. An index rebuilt
/// or a column added waits for its table behind any long reader (an analytics scan), and every
/// write of the table, captures included, queues behind it meanwhile: 35 s in a reviewer's run,
/// and killing the ledger left its session queued. Past this the migration gives its turn back,
/// and is tried again a moment later.
const LOCK_WAIT: &str = "5s";
/// How many times migrations are tried on Postgres before the ledger gives up, each waiting up
/// to [`LOCK_WAIT`] and then up to 5 s: about half an hour, as long as another replica's
/// migrations (which hold the migration lock while they run) may take on a large ledger.
const PG_ATTEMPTS: u32 = 180;
/// On SQLite, which has no migration lock: another ledger starting on the same file at the same
/// moment may apply a migration first; the next run finds it applied. A migration that cannot
/// apply fails as many times, and is reported within seconds.
const SQLITE_ATTEMPTS: u32 = 3;

/// Applies this binary's migrations, saying which (an upgrade's changes were applied without a
/// word). A database migrated by a newer binary is refused by name: sqlx's "migration 24 was
/// previously applied but is missing" read as a fault of the ledger's.
pub(super) async fn migrate(pool: &AnyPool, backend: Backend) -> Result<()> {
    let (migrator, sqlite) = match backend {
        Backend::Postgres => (&PG_MIGRATOR, false),
        Backend::Sqlite => (&SQLITE_MIGRATOR, true),
    };
    let state = compare_migrations(pool, sqlite).await?;
    let pending = match &state {
        None => {
            tracing::info!("a new ledger database: creating its schema");
            false
        }
        Some(m) if !m.unknown.is_empty() => return Err(newer_database(&m.unknown)),
        Some(m) if !m.missing.is_empty() => {
            // Every replica starting says so; the first to take the migration lock applies them.
            tracing::info!(migrations = ?m.missing, "applying migrations unless another replica has (docs/operations.md, \"Upgrades\")");
            true
        }
        Some(_) => false,
    };
    if state.is_some() {
        accept_edited(pool, migrator, backend).await?;
    }
    let attempts = match backend {
        Backend::Postgres => PG_ATTEMPTS,
        Backend::Sqlite => SQLITE_ATTEMPTS,
    };
    let mut attempt = 1;
    loop {
        match apply(pool, migrator, backend).await {
            Ok(()) => break,
            // Applied by a newer replica meanwhile.
            Err(MigrateError::VersionMissing(v)) => return Err(newer_database(&[v])),
            Err(e) if attempt < attempts && worth_again(&e, backend) => {
                let why = match backend {
                    Backend::Postgres => "another replica applying them, or a long query holding a table: pg_stat_activity shows it",
                    Backend::Sqlite => "another ledger applying them to this file at the same moment?",
                };
                tracing::warn!(attempt, "migrations wait: {e} ({why})");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt.min(10)))).await;
                attempt += 1;
            }
            Err(e) => return Err(LedgerError::Internal(format!("migration failed: {e}"))),
        }
    }
    if pending {
        tracing::info!("migrations applied");
    }
    Ok(())
}

/// One run of the migrator on a connection of its own, its lock waits bounded on Postgres. A run
/// that failed closes its connection: sqlx returns on an error without releasing the migration
/// lock it took, and the pool would hand that session on still holding it.
async fn apply(
    pool: &AnyPool,
    migrator: &Migrator,
    backend: Backend,
) -> std::result::Result<(), MigrateError> {
    let mut conn = pool.acquire().await?;
    let postgres = backend == Backend::Postgres;
    if postgres {
        // No statement time limit: one set on the role or the database for the money paths
        // (operations.md, "Postgres settings") cancelled a migration that builds an index or
        // analyzes a large table, and every restart failed the same way, while the migrations
        // before it stayed applied and the older binary refused the database (an upgrades
        // reviewer's finding). The lock wait keeps its own bound.
        conn.execute("SET statement_timeout = 0").await?;
        conn.execute(format!("SET lock_timeout = '{LOCK_WAIT}'").as_str())
            .await?;
    }
    // `run_direct` is `run` on a connection in hand; `run(&mut *conn)` makes the future of every
    // caller not `Send` (sqlx's "implementation of `Acquire` is not general enough").
    match migrator.run_direct(&mut *conn).await {
        Ok(()) if postgres => {
            conn.execute("RESET lock_timeout; RESET statement_timeout")
                .await?;
            Ok(())
        }
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = conn.close().await;
            Err(e)
        }
    }
}

/// Whether a failed run of the migrator is tried again: a lock not granted in time on Postgres;
/// on SQLite any failure of a statement, which another ledger applying the same migration at the
/// same moment causes ("UNIQUE constraint failed: _sqlx_migrations.version", "table accounts
/// already exists"): the loser's migration rolled back, and the next run finds it applied. A
/// migration that cannot apply fails its [`SQLITE_ATTEMPTS`] runs within seconds.
fn worth_again(e: &MigrateError, backend: Backend) -> bool {
    let (MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) = e else {
        return false;
    };
    match backend {
        Backend::Postgres => classify(e) == DbErrorClass::LockNotGranted,
        Backend::Sqlite => matches!(e, sqlx::Error::Database(_)),
    }
}

/// Brings the record of each migration in [`EDITED`] that a database holds with its earlier
/// checksum up to the current one.
async fn accept_edited(pool: &AnyPool, migrator: &Migrator, backend: Backend) -> Result<()> {
    for (_, version, earlier) in EDITED.iter().filter(|e| e.0 == backend) {
        let Some(current) = migrator.iter().find(|m| m.version == *version) else {
            continue;
        };
        let stored: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = $1")
                .bind(version)
                .fetch_optional(pool)
                .await?;
        if stored.is_some_and(|s| hex::encode(s) == *earlier) {
            sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2")
                .bind(current.checksum.to_vec())
                .bind(version)
                .execute(pool)
                .await?;
            tracing::info!(
                version,
                "migration record brought up to date: it was applied from an earlier text of the same schema"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{apply, Migrator, EDITED, PG_MIGRATOR, SQLITE_MIGRATOR};
    use crate::store::Backend;
    use sqlx::Executor;

    /// A `statement_timeout` on the database (here 2 ms, which creating the first migration's
    /// tables outlasts) does not cancel the migrations, and is in force again afterwards.
    #[tokio::test]
    async fn migrations_run_past_the_databases_statement_timeout() {
        let Some(db) = syft_testkit::Db::postgres().await else {
            return;
        };
        let set = |pool: sqlx::AnyPool, sql: String| async move {
            pool.execute(sql.as_str()).await.expect("set");
        };
        sqlx::any::install_default_drivers();
        let options = sqlx::any::AnyPoolOptions::new().max_connections(1);
        let pool = options.connect(&db.url).await.expect("connect");
        let name: String = sqlx::query_scalar("SELECT CAST(current_database() AS TEXT)")
            .fetch_one(&pool)
            .await
            .expect("name");
        let limit = format!("ALTER DATABASE \"{name}\" SET statement_timeout = '2ms'");
        set(pool.clone(), limit).await;
        pool.close().await;
        let options = sqlx::any::AnyPoolOptions::new().max_connections(1);
        let pool = options.connect(&db.url).await.expect("connect");
        apply(&pool, &PG_MIGRATOR, Backend::Postgres)
            .await
            .expect("migrations under a 2 ms statement_timeout");
        let now: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&pool)
            .await
            .expect("show");
        assert_eq!(now, "2ms");
        pool.close().await;
        db.drop_postgres().await;
    }

    /// Every migration is released once it is on the main line: a database some build migrated
    /// keeps its checksum, and sqlx refuses to start on one whose file changed since. So each
    /// file's `sha384` is pinned in `migrations/released.sha384`; a new migration adds its line.
    #[test]
    fn released_migrations_are_never_edited() {
        let pinned = include_str!("../../../../migrations/released.sha384");
        for (engine, migrator) in [("postgres", &PG_MIGRATOR), ("sqlite", &SQLITE_MIGRATOR)] {
            let ours = |m: &Migrator| -> Vec<(i64, String)> {
                m.iter()
                    .map(|m| (m.version, hex::encode(&m.checksum)))
                    .collect()
            };
            let listed: Vec<(i64, String)> = (pinned.lines())
                .filter_map(|l| l.strip_prefix(engine)?.strip_prefix(' ')?.split_once(' '))
                .map(|(v, sum)| (v.parse().expect("a version"), sum.to_string()))
                .collect();
            for (version, sum) in ours(migrator) {
                let pin = listed.iter().find(|(v, _)| *v == version);
                assert_eq!(
                    pin.map(|p| &p.1),
                    Some(&sum),
                    "{engine} migration {version}: never edit a released migration, add a new \
                     one; a new migration adds its line to migrations/released.sha384 \
                     (`sha384sum`)"
                );
            }
            assert_eq!(
                listed.len(),
                migrator.iter().count(),
                "{engine}: a pin per file"
            );
        }
        // An earlier text is never the current one (it would then need no record brought up).
        for (backend, version, earlier) in EDITED {
            let m = match backend {
                super::Backend::Postgres => &PG_MIGRATOR,
                super::Backend::Sqlite => &SQLITE_MIGRATOR,
            };
            let current = m.iter().find(|m| m.version == version).expect("listed");
            assert_ne!(hex::encode(&current.checksum), earlier, "{version}");
        }
    }
}
