//! The Postgres rollup queue (docs/analytics.md, "Rollups"; `store/rollup_fold.rs`): usage rows
//! are queued in their own transaction and folded into the rollups later, each exactly once,
//! whatever runs concurrently or dies half-way. Postgres only: SQLite writers upsert the rollups
//! in the row's transaction and the queue stays empty. Every scenario ends with `verify`.

use sqlx::Acquire;
use syft_proto::ledger as pb;
use syft_testkit::{req, Harness, USD};

const OWNER: &str = "owner@router.example";
const ALICE: &str = "alice@example.com";

/// One paid request captured with its usage row, and one free usage row.
async fn one_of_each(h: &Harness, owner: &str, token: &str, n: usize) {
    let mut c = h.client(owner);
    let t = c
        .authorize(pb::AuthorizeRequest {
            sender_email: ALICE.into(),
            amount_micros: 1_000,
            token: token.into(),
            app_name: "chat-app".into(),
            app_ep_path: "/chat".into(),
            idempotency_key: format!("paid-{n}"),
            ..Default::default()
        })
        .await
        .expect("authorize")
        .into_inner();
    c.capture(pb::CaptureRequest {
        transfer_id: t.id,
        amount: Some(pb::capture_request::Amount::AmountMicros(600)),
        usage: Some(req::usage(
            &format!("paid-{n}"),
            "chat-app",
            ALICE,
            "success",
        )),
        answer: None,
    })
    .await
    .expect("capture");
    c.record_usage(pb::RecordUsageRequest {
        usage: Some(req::usage(
            &format!("free-{n}"),
            "free-app",
            ALICE,
            "success",
        )),
    })
    .await
    .expect("record usage");
}

/// The owner's secret and Alice's token for it, Alice holding `micros`.
async fn owner_and_token(h: &Harness, micros: i64) -> (String, String) {
    let owner = h.account(OWNER, 0).await;
    let alice = h.account(ALICE, micros).await;
    let token = h.token(&alice, OWNER).await;
    (owner, token)
}

/// A Postgres ledger (`None`: skipped) where rows `0..n` of [`one_of_each`] were written by an
/// owner and Alice (10 USD), with the owner's secret and Alice's token.
async fn ledger_with_rows(n: usize) -> Option<(Harness, String, String)> {
    let h = Harness::new(true).await?;
    let (owner, token) = owner_and_token(&h, 10 * USD).await;
    for i in 0..n {
        one_of_each(&h, &owner, &token, i).await;
    }
    Some((h, owner, token))
}

/// (usage rows, rows the day rollups count, queued rows, revenue in the day rollups).
async fn counts(h: &Harness) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM usage_records), \
         (SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM usage_rollups WHERE grain = 2), \
         (SELECT CAST(COALESCE(SUM(row_count), 0) AS BIGINT) FROM usage_rollup_queue), \
         (SELECT CAST(COALESCE(SUM(revenue), 0) AS BIGINT) FROM usage_rollups WHERE grain = 2)",
    )
    .fetch_one(h.store.pool())
    .await
    .expect("counts")
}

/// Writers and folds at once (the background folder, and explicit folds from four tasks): at
/// every moment each row is either queued or counted, never both and never neither; after a last
/// fold every row is counted once, and folding again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_row_is_folded_once() {
    let Some(h) = Harness::new(true).await else {
        return;
    };
    let (owner, token) = owner_and_token(&h, 100 * USD).await;
    let h = std::sync::Arc::new(h);
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (h, owner, token) = (h.clone(), owner.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                one_of_each(&h, &owner, &token, w * 100 + i).await;
                if i % 3 == 0 {
                    h.store.fold_rollups().await.expect("fold");
                }
            }
        }));
    }
    for _ in 0..20 {
        // One snapshot: rows = counted + queued, whatever is in flight.
        let mut conn = h.store.pool().acquire().await.expect("conn");
        let mut tx = conn.begin().await.expect("begin");
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await
            .expect("isolation");
        let (rows, counted, queued): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM usage_records), \
             (SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM usage_rollups WHERE grain = 2), \
             (SELECT CAST(COALESCE(SUM(row_count), 0) AS BIGINT) FROM usage_rollup_queue)",
        )
        .fetch_one(&mut *tx)
        .await
        .expect("snapshot");
        tx.rollback().await.expect("rollback");
        assert_eq!(
            rows,
            counted + queued,
            "rows {rows}, counted {counted}, queued {queued}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.expect("writer");
    }
    h.store.fold_rollups().await.expect("fold");
    let (rows, counted, queued, revenue) = counts(&h).await;
    assert_eq!((rows, counted, queued), (120, 120, 0));
    assert_eq!(revenue, 60 * 600, "captured micros, once each");
    assert_eq!(h.store.fold_rollups().await.expect("fold again"), 0);
    assert_eq!(counts(&h).await, (120, 120, 0, 60 * 600));
    let h = std::sync::Arc::into_inner(h).expect("tasks done");
    h.finish().await;
}

/// A folder that dies after taking rows off the queue and before its commit (its connection
/// closes, as when its process is killed) loses nothing: the rows are queued again and the next
/// fold counts them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fold_that_dies_loses_nothing() {
    let Some((h, owner, token)) = ledger_with_rows(5).await else {
        return;
    };
    h.store.fold_rollups().await.expect("fold");
    for n in 5..8 {
        one_of_each(&h, &owner, &token, n).await;
    }
    let mut dying = h.store.pool().acquire().await.expect("conn").detach();
    sqlx::query("BEGIN")
        .execute(&mut dying)
        .await
        .expect("begin");
    let taken: Vec<String> = sqlx::query_scalar(
        "WITH d AS (DELETE FROM usage_rollup_queue RETURNING usage_ids) \
             SELECT unnest(usage_ids) FROM d",
    )
    .fetch_all(&mut dying)
    .await
    .expect("take the queue");
    // The background folder may have folded some of the last rows already.
    assert!(taken.len() <= 6, "{taken:?}");
    drop(dying);
    // `verify` folds first: it waits for the dead transaction's locks, then finds its rows queued.
    h.assert_consistent().await;
    assert_eq!(counts(&h).await, (16, 16, 0, 8 * 600));
    h.finish().await;
}

/// A rebuild with rows still queued counts each row once and empties the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_takes_the_queue_too() {
    let Some((h, _, _)) = ledger_with_rows(4).await else {
        return;
    };
    assert_eq!(h.store.rebuild_rollups().await.expect("rebuild"), 8);
    assert_eq!(counts(&h).await, (8, 8, 0, 4 * 600));
    h.finish().await;
}

/// Analytics answers cannot take every database connection: here each one waits on the fold lock
/// (held by another session, as a long fold would) holding a connection, and a free usage row,
/// which needs a connection of the same pool, is still recorded at once. With every connection
/// held by analytics the row waited for the pool's 10-s acquire timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn analytics_leave_connections_for_usage_rows() {
    let Some(h) = Harness::with(true, |c| c.max_connections = 8).await else {
        return;
    };
    let (owner, token) = owner_and_token(&h, 10 * USD).await;
    let mut lock = h.store.pool().begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(6005908906047392844)") // "SYFTROLL"
        .execute(&mut *lock)
        .await
        .expect("the fold lock");
    one_of_each(&h, &owner, &token, 0).await;
    let waiting: Vec<_> = (0..16)
        .map(|_| {
            let mut c = h.client(&owner);
            tokio::spawn(
                async move { c.get_usage_stats(pb::GetUsageStatsRequest::default()).await },
            )
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let mut c = h.client(&owner);
    c.record_usage(pb::RecordUsageRequest {
        usage: Some(req::usage("during", "free-app", ALICE, "success")),
    })
    .await
    .expect("a usage row while analytics wait");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the usage row waited {:?} for a connection",
        started.elapsed()
    );
    lock.rollback().await.expect("release the fold lock");
    for w in waiting {
        w.await
            .expect("task")
            .expect("analytics answer once the lock is free");
    }
    h.finish().await;
}

/// `ledger verify` opens the ledger with `Store::inspect`, which recomputes no rollup. A fresh
/// ledger whose rows are all still queued has empty rollups, which a serving start takes for an
/// upgrade from before the rollups: it rebuilt every rollup (and emptied the queue) under the
/// running ledger. Here the fold lock is held elsewhere, so the running ledger's folder leaves the
/// rows queued, and a rebuild would wait for the lock: inspecting returns at once and changes
/// nothing. Verify then folds the queue itself and counts every row once.
#[tokio::test]
async fn inspecting_a_ledger_recomputes_no_rollup() {
    use sqlx::Connection;
    let Some(h) = Harness::new(true).await else {
        return;
    };
    let url = h.config.database_url.clone();
    let mut folder_away = sqlx::AnyConnection::connect(&url).await.expect("connect");
    // The fold lock (`FOLD_LOCK` in `store/rollup_fold.rs`, "SYFTROLL").
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(0x5359_4654_524f_4c4c_i64)
        .execute(&mut folder_away)
        .await
        .expect("fold lock");
    let (owner, token) = owner_and_token(&h, 10 * USD).await;
    for i in 0..3 {
        one_of_each(&h, &owner, &token, i).await;
    }
    assert_eq!(counts(&h).await, (6, 0, 6, 0), "every row queued");
    let inspect = syft_ledger::Store::inspect(&url);
    let inspected = tokio::time::timeout(std::time::Duration::from_secs(10), inspect)
        .await
        .expect("no rebuild waiting for the fold lock")
        .expect("inspect");
    assert_eq!(counts(&h).await, (6, 0, 6, 0), "nothing recomputed");
    folder_away.close().await.expect("unlock");
    let report = inspected.verify().await.expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(counts(&h).await, (6, 6, 0, 3 * 600));
    inspected.close().await;
    h.finish().await;
}
