//! Starting a ledger on a database that earlier builds migrated, or that another ledger is
//! migrating at the same moment (docs/operations.md, "Upgrades"), on SQLite and Postgres.

use std::time::{Duration, Instant};

use syft_ledger::store::Store;
use syft_testkit::Db;

/// The `sha384` of `engine`'s migration `version` as released (`migrations/released.sha384`).
fn released(engine: &str, version: &str) -> String {
    let pinned = include_str!("../../../migrations/released.sha384");
    let line = pinned
        .lines()
        .find(|l| l.starts_with(&format!("{engine} {version} ")));
    line.and_then(|l| l.rsplit(' ').next())
        .expect("pinned")
        .to_string()
}

async fn checksum(store: &Store, version: i64) -> String {
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = $1")
            .bind(version)
            .fetch_one(store.pool())
            .await
            .expect("recorded");
    hex::encode(stored)
}

/// A new ledger at `db` whose migration `version` a restart applies again (its record removed).
async fn to_apply_again(db: &Db, version: i64) {
    let store = Store::connect(&db.url, 2).await.expect("a new ledger");
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(version)
        .execute(store.pool())
        .await
        .expect("its record removed");
    store.close().await;
}

/// Migration 0032's text was edited (comments) after a build had applied it, and sqlx refused to
/// start on a database that build migrated ("migration 32 was previously applied but has been
/// modified"), so it could never be upgraded. Its record, holding the earlier checksum, is
/// brought up to date and the ledger starts.
async fn a_database_migrated_before_an_edit_still_starts(db: &Db, engine: &str) {
    let store = Store::connect(&db.url, 2).await.expect("a new ledger");
    // What the build of 8e9d076 stored: the `sha384` of the file's text then.
    let earlier = "6df96f3a34f106388e276e953b42647fbbc9d599fca512c18d689e592d64d17d3bdca10dfecbc1e\
                   962269529511a9124";
    sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 32")
        .bind(hex::decode(earlier).expect("hex"))
        .execute(store.pool())
        .await
        .expect("the earlier record");
    store.close().await;
    let store = Store::connect(&db.url, 2)
        .await
        .expect("a database migrated before the edit starts");
    assert_eq!(checksum(&store, 32).await, released(engine, "0032"));
    store.close().await;
}

#[tokio::test]
async fn sqlite_a_database_migrated_before_an_edit_still_starts() {
    a_database_migrated_before_an_edit_still_starts(&Db::sqlite(), "sqlite").await;
}

#[tokio::test]
async fn postgres_a_database_migrated_before_an_edit_still_starts() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    a_database_migrated_before_an_edit_still_starts(&db, "postgres").await;
    db.drop_postgres().await;
}

/// Two ledgers starting at the same moment on one new SQLite file, which has no migration lock:
/// the one that lost the race for a migration ("table accounts already exists", "UNIQUE
/// constraint failed: _sqlx_migrations.version") failed to start. It tries again and starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ledgers_starting_together_on_one_sqlite_file_both_start() {
    for _ in 0..4 {
        let db = Db::sqlite();
        let (a, b) = tokio::join!(Store::connect(&db.url, 2), Store::connect(&db.url, 2));
        let (a, b) = (a.expect("the first"), b.expect("the second"));
        a.close().await;
        b.close().await;
    }
}

/// A migration that cannot apply is reported at once, not tried again for minutes as if another
/// ledger were applying it (a diff review of the retry: "duplicate column name" after 574 s).
#[tokio::test]
async fn a_migration_that_cannot_apply_is_reported_at_once() {
    let db = Db::sqlite();
    // 0034 adds a column: applied again, it fails.
    to_apply_again(&db, 34).await;
    let started = Instant::now();
    let failed = tokio::time::timeout(Duration::from_secs(20), Store::connect(&db.url, 2)).await;
    let Err(failed) = failed.expect("reported within 20 s") else {
        panic!("0034 applied again");
    };
    assert!(failed.to_string().contains("duplicate column"), "{failed}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A migration rebuilding an index of `usage_records` (0039) waits for the table behind a long
/// reader, and every read and write of it queued behind the migration for as long (35 s in a
/// reviewer's run). The migration now gives up its wait after 5 s and tries again later, so the
/// queue behind it moves; it is applied once the reader is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_behind_a_long_reader_does_not_stall_the_table() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    // 0039 drops and creates one index: applied again, it leaves the schema as it was.
    to_apply_again(&db, 39).await;
    let admin = sqlx::PgPool::connect(&db.url).await.expect("postgres");
    let mut reader = admin.begin().await.expect("a long reader");
    sqlx::query("LOCK TABLE usage_records IN ACCESS SHARE MODE")
        .execute(&mut *reader)
        .await
        .expect("the reader's lock");
    let url = db.url.clone();
    let upgrade = tokio::spawn(async move { Store::connect(&url, 2).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A write's read of the table, queued behind the migration's wait.
    let started = Instant::now();
    let count = tokio::time::timeout(
        Duration::from_secs(12),
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage_records").fetch_one(&admin),
    )
    .await;
    let waited = started.elapsed();
    reader.rollback().await.expect("the reader ends");
    assert!(
        matches!(count, Ok(Ok(0))),
        "queued behind the migration for {waited:?}: {count:?}"
    );
    let store = upgrade
        .await
        .expect("task")
        .expect("applied once the reader is done");
    assert_eq!(checksum(&store, 39).await, released("postgres", "0039"));
    store.close().await;
    admin.close().await;
    db.drop_postgres().await;
}
