//! A capture after a hold's expiry is refused with reason `HOLD_EXPIRED` even before the sweep
//! cancelled it (no server runs here, so no sweeper interferes), and nothing moves.

use std::sync::Arc;
use std::time::Duration;

use syft_error::Reason;
use syft_ledger::store::{
    AuthorizeInput, CaptureAmount, Resolution, ResolveInput, Store, TokenGrant,
};
use syft_testkit::{assert_consistent, Db, USD};

async fn capture_after_expiry_is_refused(db: Db) {
    let store = Arc::new(Store::connect(&db.url, 4).await.expect("store"));
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
    let grant = TokenGrant {
        sender: &alice.identity(),
        recipient: &owner,
        expires_at: None,
        spend_limit: None,
        limit_per_day: None,
    };
    let token = store.issue_token(&grant).await.expect("token");
    let hold = store
        .authorize(&AuthorizeInput {
            recipient_id: owner.id,
            recipient_email: &owner.email,
            sender_email: &alice.email,
            amount: USD / 2,
            token: &token.token,
            app_name: "app",
            app_ep_path: "/chat",
            idempotency_key: "k1",
            ttl_micros: 300_000,
            budgets: Default::default(),
        })
        .await
        .expect("hold");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refused = store
        .resolve(&ResolveInput {
            transfer_id: &hold.id,
            recipient_id: Some(owner.id),
            resolution: Resolution::Capture(CaptureAmount::Full),
            usage: None,
            by_sender: false,
        })
        .await
        .expect_err("a capture after expiry is refused");
    assert_eq!(refused.reason(), Some(Reason::HoldExpired), "{refused}");
    assert_eq!(store.sweep_expired(10).await.expect("sweep").cancelled, 1);
    let alice = store
        .account_by_email("alice@example.com")
        .await
        .expect("read")
        .expect("alice");
    assert_eq!((alice.balance.get(), alice.held.get()), (USD, 0));
    assert_consistent(&store).await;
    db.drop_postgres().await;
}

#[tokio::test]
async fn capture_after_expiry_is_refused_sqlite() {
    capture_after_expiry_is_refused(Db::sqlite()).await;
}

#[tokio::test]
async fn capture_after_expiry_is_refused_postgres() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    capture_after_expiry_is_refused(db).await;
}
