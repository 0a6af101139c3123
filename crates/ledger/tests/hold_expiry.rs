//! A capture after a hold's expiry is refused with reason `HOLD_EXPIRED` even before the sweep
//! cancelled it (no server runs here, so no sweeper interferes), and nothing moves. The sweep
//! reads its index from a floor after its first pass and still cancels every hold that expires.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyConnection, Connection, Executor};
use syft_error::Reason;
use syft_ledger::store::{
    AccountRow, AuthorizeInput, CaptureAmount, Resolution, ResolveInput, Store, TransferRow,
    UsageInput,
};
use syft_testkit::{assert_consistent, store_token, Db, USD};

/// An owner, alice with 1 USD and a token from alice to the owner.
async fn parties(store: &Store) -> (AccountRow, String) {
    let owner = store
        .create_account("owner@example.com", "", "USD", "h1")
        .await
        .expect("owner");
    let alice = store
        .create_account("alice@example.com", "", "USD", "h2")
        .await
        .expect("alice");
    store
        .deposit("alice@example.com", USD, "welcome")
        .await
        .expect("deposit");
    let token = store_token(store, &alice, &owner).await;
    (owner, token)
}

/// A hold of `amount` from alice that expires after `ttl_micros`.
async fn hold(
    store: &Store,
    owner: &AccountRow,
    token: &str,
    key: &str,
    amount: i64,
    ttl_micros: i64,
) -> TransferRow {
    store
        .authorize(&AuthorizeInput {
            recipient_id: owner.id,
            recipient_email: &owner.email,
            sender_email: "alice@example.com",
            amount,
            token,
            app_name: "app",
            app_ep_path: "/chat",
            idempotency_key: key,
            attempt_id: "",
            ttl_micros,
            budgets: Default::default(),
        })
        .await
        .expect("hold")
}

/// Alice has her 1 USD back with nothing held, and the ledger verifies.
async fn assert_alice_whole(store: &Store) {
    let alice = store
        .account_by_email("alice@example.com")
        .await
        .expect("read")
        .expect("alice");
    assert_eq!((alice.balance.get(), alice.held.get()), (USD, 0));
    assert_consistent(store).await;
}

/// The sweep cancels the `expired` holds left, alice is whole again, and the database goes.
async fn swept_and_whole(store: &Store, db: Db, expired: u64) {
    assert_eq!(
        store.sweep_expired(10).await.expect("sweep").cancelled,
        expired
    );
    assert_alice_whole(store).await;
    db.drop_postgres().await;
}

/// A store with [`parties`] and alice's hold of half her money under key `k1`, expired.
async fn expired_hold(db: &Db) -> (Arc<Store>, AccountRow, TransferRow) {
    let store = Arc::new(Store::connect(&db.url, 4).await.expect("store"));
    let (owner, token) = parties(&store).await;
    let hold = hold(&store, &owner, &token, "k1", USD / 2, 300_000).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    (store, owner, hold)
}

async fn capture_after_expiry_is_refused(db: Db) {
    let (store, owner, hold) = expired_hold(&db).await;
    let capture = ResolveInput {
        transfer_id: &hold.id,
        recipient_id: Some(owner.id),
        resolution: Resolution::Capture(CaptureAmount::Full),
        usage: None,
        by_sender: false,
    };
    let refused = store
        .resolve(&capture)
        .await
        .expect_err("a capture after expiry is refused");
    assert_eq!(refused.reason(), Some(Reason::HoldExpired), "{refused}");
    // And after the sweep cancelled it, for the same reason (it said TRANSFER_NOT_PENDING then,
    // as for a hold a party voided, from a second after the expiry on).
    assert_eq!(store.sweep_expired(10).await.expect("sweep").cancelled, 1);
    let refused = store
        .resolve(&capture)
        .await
        .expect_err("a capture of the swept hold is refused");
    assert_eq!(refused.reason(), Some(Reason::HoldExpired), "{refused}");
    let refused = store
        .extend_hold(&hold.id, owner.id, 60_000_000, 86_400_000_000)
        .await
        .expect_err("an extension of the swept hold is refused");
    assert_eq!(refused.reason(), Some(Reason::HoldExpired), "{refused}");
    swept_and_whole(&store, db, 0).await;
}

/// A usage row of alice's request `request_id` to the owner's `/chat`, ending in `status`.
fn alice_row(request_id: &str, status: &str) -> UsageInput {
    UsageInput {
        request_id: request_id.into(),
        app_name: "app".into(),
        endpoint: "/chat".into(),
        user_email: "alice@example.com".into(),
        status: status.into(),
        ..Default::default()
    }
}

/// The owner voids `hold`, sending `usage` as the request's row.
async fn void_with_row(
    store: &Store,
    owner: &AccountRow,
    hold: &TransferRow,
    usage: &UsageInput,
) -> syft_ledger::error::Result<TransferRow> {
    store
        .resolve(&ResolveInput {
            transfer_id: &hold.id,
            recipient_id: Some(owner.id),
            resolution: Resolution::Void {
                reason: "upstream failed".into(),
            },
            usage: Some(usage),
            by_sender: false,
        })
        .await
}

/// A void that arrives after the sweep cancelled its expired hold (the router's ledger was away
/// meanwhile) still leaves the request's row, once however often it is sent; nothing moves.
async fn void_after_the_sweep_leaves_its_row(db: Db) {
    let (store, owner, hold) = expired_hold(&db).await;
    assert_eq!(store.sweep_expired(10).await.expect("sweep").cancelled, 1);
    let usage = alice_row("k1", "timeout");
    for _ in 0..2 {
        let t = void_with_row(&store, &owner, &hold, &usage)
            .await
            .expect("a void of a cancelled hold is a repeat");
        assert_eq!(t.status.as_str(), "CANCELLED");
    }
    let rows: Vec<(String, Option<String>, i64)> =
        sqlx::query_as("SELECT status, transfer_id, cost FROM usage_records")
            .fetch_all(store.pool())
            .await
            .expect("rows");
    assert_eq!(
        rows,
        vec![("timeout".to_string(), Some(hold.id.clone()), 0)]
    );
    assert_alice_whole(&store).await;
    db.drop_postgres().await;
}

/// A void whose row carries a refusal status leaves the request id free, on both engines: a
/// later row under that id is recorded too. On Postgres the batched resolution did not mark
/// such a row as a refusal, so it took the id and the later row was dropped.
async fn a_refusal_row_of_a_void_leaves_its_request_id_free(db: Db) {
    let store = Arc::new(Store::connect(&db.url, 4).await.expect("store"));
    let (owner, token) = parties(&store).await;
    let hold = hold(&store, &owner, &token, "k2", USD / 2, 60_000_000).await;
    void_with_row(&store, &owner, &hold, &alice_row("k2", "unavailable"))
        .await
        .expect("void");
    store
        .record_usage(&owner.identity(), &alice_row("k2", "success"), None)
        .await
        .expect("free row");
    let mut statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM usage_records")
        .fetch_all(store.pool())
        .await
        .expect("rows");
    statuses.sort();
    assert_eq!(
        statuses,
        vec!["success".to_string(), "unavailable".to_string()]
    );
    assert_alice_whole(&store).await;
    db.drop_postgres().await;
}

/// A capture sent while its hold is live, then made to wait for a lock until the hold expired, is
/// refused: it is judged by the clock once it has its locks. Judged by the clock read before the
/// wait, it committed, though a budget check of the same sender meanwhile (the holder of the lock)
/// could have counted the hold as expired and freed its amount for another hold. An extension
/// that waited so is refused the same way. Another connection holds the lock here: on Postgres
/// alice's account row (a capture's) or the hold's row (an extension's), on SQLite the write lock.
async fn capture_that_waited_past_expiry_is_refused(db: Db) {
    let store = Arc::new(Store::connect(&db.url, 4).await.expect("store"));
    let (owner, token) = parties(&store).await;
    let owner_id = owner.id;

    let first = hold(&store, &owner, &token, "k1", USD / 2, 400_000).await;
    let lock = "SELECT id FROM accounts WHERE email = 'alice@example.com' FOR UPDATE".to_string();
    let (s, id) = (store.clone(), first.id.clone());
    let refused = after_a_wait_past_expiry(&db, &lock, async move {
        let capture = Resolution::Capture(CaptureAmount::Full);
        s.resolve(&ResolveInput {
            transfer_id: &id,
            recipient_id: Some(owner_id),
            resolution: capture,
            usage: None,
            by_sender: false,
        })
        .await
    })
    .await
    .expect_err("a capture that took effect after expiry is refused");
    assert_eq!(refused.reason(), Some(Reason::HoldExpired), "{refused}");

    let second = hold(&store, &owner, &token, "k2", USD / 2, 400_000).await;
    let lock = format!(
        "SELECT id FROM transfers WHERE id = '{}' FOR UPDATE",
        second.id
    );
    let refused = "an extension that took effect after expiry is refused";
    extension_refused_after(&db, &store, &lock, &second.id, owner_id, refused).await;
    swept_and_whole(&store, db, 2).await;
}

/// An extension is ordered against a budget check of its hold's sender: it waits for the
/// sender's row, which every budget check locks before it counts a pending hold past its expiry as
/// 0, and once it has it, finds the hold expired and is refused. It used to lock only the hold, so
/// it read its clock while the hold was live and could commit after a check that had already
/// counted the hold as expired: the budget (or the token's limit per 24 hours) was exceeded by the
/// hold. Another connection holds alice's row as a budget check does (`FOR NO KEY UPDATE`), on
/// SQLite the write lock.
async fn an_extension_waits_for_its_senders_budget_check(db: Db) {
    let store = Arc::new(Store::connect(&db.url, 4).await.expect("store"));
    let (owner, token) = parties(&store).await;
    let owner_id = owner.id;
    let held = hold(&store, &owner, &token, "k1", USD / 2, 400_000).await;
    let lock = "SELECT id FROM accounts WHERE email = 'alice@example.com' FOR NO KEY UPDATE";
    let refused = "an extension that took effect after a budget check is refused";
    extension_refused_after(&db, &store, lock, &held.id, owner_id, refused).await;
    swept_and_whole(&store, db, 1).await;
}

/// An extension of hold `id` asked while another connection holds `lock` past the hold's
/// expiry: refused as expired (`what` says after which wait).
async fn extension_refused_after(
    db: &Db,
    store: &Arc<Store>,
    lock: &str,
    id: &str,
    owner_id: i64,
    what: &str,
) {
    let (s, id) = (store.clone(), id.to_string());
    let refused = after_a_wait_past_expiry(db, lock, async move {
        s.extend_hold(&id, owner_id, 60_000_000, 3_600_000_000)
            .await
    })
    .await
    .expect_err(what);
    assert_eq!(
        refused.reason(),
        Some(Reason::HoldExpired),
        "{what}: {refused}"
    );
}

/// Runs `act` while another connection holds a lock (`pg_lock` on Postgres, the write lock on
/// SQLite) until well past the holds' expiry, then lets it go and returns what `act` answered.
async fn after_a_wait_past_expiry<T: Send + 'static>(
    db: &Db,
    pg_lock: &str,
    act: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let mut blocker = AnyConnection::connect(&db.url).await.expect("connect");
    let lock = if db.url.starts_with("postgres") {
        format!("BEGIN; {pg_lock}")
    } else {
        "BEGIN IMMEDIATE".to_string()
    };
    blocker.execute(lock.as_str()).await.expect("lock");
    let act = tokio::spawn(act);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!act.is_finished(), "it waits for the lock");
    blocker.execute("ROLLBACK").await.expect("unlock");
    act.await.expect("join")
}

/// After its first pass the sweep reads from a floor (a margin before its last pass) instead of the
/// whole expiry index: holds that expire later are cancelled, a page cut by the limit is finished
/// by the next pass, and a hold whose expiry lies below the floor (one committed long after it read
/// the clock) waits for the next full pass, here a restarted ledger's first.
async fn sweeps_read_from_a_floor_and_miss_no_hold(db: Db) {
    let store = Store::connect(&db.url, 4).await.expect("store");
    let (owner, token) = parties(&store).await;
    assert_eq!(
        cancelled(&store, 10).await,
        0,
        "the first pass reads everything"
    );
    hold(&store, &owner, &token, "later", USD / 10, 200_000).await;
    for key in ["page-1", "page-2", "page-3"] {
        hold(&store, &owner, &token, key, USD / 10, 250_000).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(cancelled(&store, 2).await, 2, "a full page");
    assert_eq!(
        cancelled(&store, 2).await,
        2,
        "the next pass goes on from the page's last"
    );
    assert_eq!(cancelled(&store, 2).await, 0);

    let late = hold(&store, &owner, &token, "late", USD / 10, 60_000_000).await;
    sqlx::query("UPDATE transfers SET expires_at = 1 WHERE id = $1")
        .bind(&late.id)
        .execute(store.pool())
        .await
        .expect("backdate");
    assert_eq!(cancelled(&store, 10).await, 0, "below the floor");
    let restarted = Store::connect(&db.url, 4).await.expect("store");
    assert_eq!(cancelled(&restarted, 10).await, 1, "a full pass finds it");
    assert_alice_whole(&restarted).await;
    restarted.close().await;
    store.close().await;
    db.drop_postgres().await;
}

async fn cancelled(store: &Store, limit: i64) -> u64 {
    store.sweep_expired(limit).await.expect("sweep").cancelled
}

// Each scenario as a test of its own on SQLite (`sqlite::…`) and on Postgres (`postgres::…`).
syft_testkit::db_suite!(
    capture_after_expiry_is_refused,
    void_after_the_sweep_leaves_its_row,
    a_refusal_row_of_a_void_leaves_its_request_id_free,
    capture_that_waited_past_expiry_is_refused,
    an_extension_waits_for_its_senders_budget_check,
    sweeps_read_from_a_floor_and_miss_no_hold,
);
