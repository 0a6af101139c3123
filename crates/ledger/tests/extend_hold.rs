//! `ExtendHold` (issue 15, holds that outlive long streams), on SQLite and Postgres: an extended
//! hold outlives its first expiry and can still be captured; extension is idempotent, bounded by
//! the maximum hold TTL from the hold's creation, refused with a reason once the hold is resolved
//! or expired, and invisible to other recipients.

use std::time::Duration;
use syft_testkit::req::capture_full;

use syft_proto::ledger as pb;
use syft_testkit::{code, ok, reason, req, store_suite, Harness, USD};
use tonic::Code;

const OWNER: &str = "owner@router.example";
const OTHER: &str = "other@router.example";
const ALICE: &str = "alice@example.com";

fn hold(key: &str, ttl: i64, token: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        hold_ttl_seconds: Some(ttl),
        ..syft_testkit::req::hold(ALICE, USD, token, key)
    }
}

fn extend(id: &str, ttl_seconds: i64) -> pb::ExtendHoldRequest {
    pb::ExtendHoldRequest {
        transfer_id: id.into(),
        ttl_seconds,
    }
}

async fn extended_holds_outlive_their_first_expiry(h: Harness) -> Harness {
    let other = h.account(OTHER, 0).await;
    let (owner, _alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let t = ok(router.authorize(hold("k1", 1, &token)).await);
    let e1 = ok(router.extend_hold(extend(&t.id, 3)).await);
    assert!(e1.expires_at_unix_micros >= t.expires_at_unix_micros + 1_500_000);
    // Idempotent: asking again never moves the expiry back.
    let e2 = ok(router.extend_hold(extend(&t.id, 1)).await);
    assert_eq!(e2.expires_at_unix_micros, e1.expires_at_unix_micros);
    assert_eq!(e2.status(), pb::TransferStatus::Pending);
    // Nobody else may extend it, and bad input is refused.
    let stranger = h.client(&other).extend_hold(extend(&t.id, 3)).await;
    assert_eq!(code(stranger), Code::NotFound);
    for bad in [0, -1, 86_400 * 365] {
        assert_eq!(
            code(router.extend_hold(extend(&t.id, bad)).await),
            Code::InvalidArgument
        );
    }
    // Past the first expiry (and a sweep), still pending and capturable.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let done = router.capture(capture_full(&t.id)).await.expect("capture");
    assert_eq!(done.into_inner().status(), pb::TransferStatus::Completed);
    let late = router
        .extend_hold(extend(&t.id, 3))
        .await
        .expect_err("resolved");
    assert_eq!(reason(&late).as_deref(), Some("TRANSFER_NOT_PENDING"));

    // Bounded by the maximum hold TTL counted from the hold's creation.
    let max = h.config.max_hold_ttl.as_secs() as i64;
    let t2 = ok(router.authorize(hold("k2", 1, &token)).await);
    let e = ok(router.extend_hold(extend(&t2.id, max)).await);
    assert_eq!(
        e.expires_at_unix_micros,
        t2.created_at_unix_micros + max * 1_000_000
    );
    // Its answer says the time left by the ledger's clock: the cap, less what has passed.
    let left = e
        .expires_in_micros
        .expect("an extended hold says its time left");
    assert!(
        (max - 60) * 1_000_000 < left && left <= max * 1_000_000,
        "{left}"
    );
    ok(router.void(req::void(&t2.id)).await);
    h
}

async fn expired_holds_cannot_be_extended(h: Harness) -> Harness {
    let (owner, _alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let t = ok(router.authorize(hold("k1", 1, &token)).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = router
        .extend_hold(extend(&t.id, 60))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Expired, whether or not the sweep cancelled it yet (swept, it was TRANSFER_NOT_PENDING).
    assert_eq!(reason(&err).as_deref(), Some("HOLD_EXPIRED"));
    assert_eq!(
        code(router.capture(capture_full(&t.id)).await),
        Code::FailedPrecondition
    );
    h
}

/// Capture, void and two extensions of each hold, all at once: every hold settles exactly once
/// (one of capture and void wins, the other is refused as not pending), an extension racing them
/// never loses the winner's outcome, and the money adds up. On Postgres this runs the batched
/// resolve, whose lock step finds rows by primary key and keeps those still pending after locking
/// (`store/batch.rs`), against `ExtendHold` updating the same rows.
async fn resolutions_racing_extensions_settle_once(h: Harness) -> Harness {
    const HOLDS: usize = 20;
    let (owner, _alice, token) = h.payer(OWNER, ALICE, 30 * USD).await;
    let mut router = h.client(&owner);
    let mut holds = Vec::new();
    for i in 0..HOLDS {
        holds.push(ok(router
            .authorize(hold(&format!("r{i}"), 60, &token))
            .await));
    }
    let mut tasks = Vec::new();
    for t in &holds {
        let (mut a, mut b, mut c, mut d) = (
            router.clone(),
            router.clone(),
            router.clone(),
            router.clone(),
        );
        let id = t.id.clone();
        tasks.push(tokio::spawn(async move {
            tokio::join!(
                a.extend_hold(extend(&id, 120)),
                b.capture(capture_full(&id)),
                c.void(req::void(&id)),
                d.extend_hold(extend(&id, 90)),
            )
        }));
    }
    let mut captured = 0;
    for (task, t) in tasks.into_iter().zip(&holds) {
        let (e1, cap, void, e2) = task.await.expect("task");
        for e in [e1, e2] {
            if let Err(err) = e {
                assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            }
        }
        let now = ok(router.get_transfer(req::get_transfer(&t.id)).await);
        match (cap, void) {
            (Ok(c), Err(v)) => {
                assert_eq!(v.code(), Code::FailedPrecondition, "{v:?}");
                assert_eq!(c.into_inner().status(), pb::TransferStatus::Completed);
                assert_eq!(now.status(), pb::TransferStatus::Completed);
                assert_eq!(now.captured_micros, USD);
                captured += 1;
            }
            (Err(c), Ok(v)) => {
                assert_eq!(c.code(), Code::FailedPrecondition, "{c:?}");
                assert_eq!(v.into_inner().status(), pb::TransferStatus::Cancelled);
                assert_eq!(now.status(), pb::TransferStatus::Cancelled);
            }
            other => panic!("exactly one of capture and void must win: {other:?}"),
        }
    }
    let a = h.balance(ALICE).await;
    assert_eq!(
        (a.balance_micros, a.held_micros),
        (30 * USD - captured * USD, 0)
    );
    assert_eq!(h.balance(OWNER).await.balance_micros, captured * USD);
    h
}

store_suite!(
    extended_holds_outlive_their_first_expiry,
    expired_holds_cannot_be_extended,
    resolutions_racing_extensions_settle_once,
);

/// Postgres: a capture that has to wait for a row lock held by a concurrent change of the same
/// pending hold (an extension, as `ExtendHold` writes it) captures the hold once that change
/// commits. The batched resolve's statement took its snapshot before it waited, and the row it
/// gets is a newer version than that snapshot saw (`store/resolve_batch.rs`, `RESOLVE_BATCH`); however the
/// statement handles that, the store resolves again while the hold is still pending
/// (`Store::resolve_answered`), and the capture must win, once.
#[tokio::test]
async fn a_capture_waiting_on_an_extension_still_captures() {
    let Some(h) = Harness::new(true).await else {
        return;
    };
    let (owner, _alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let t = ok(router.authorize(hold("k1", 60, &token)).await);
    let mut tx = h.store.pool().begin().await.expect("begin");
    sqlx::query("UPDATE transfers SET expires_at = expires_at + 1000000 WHERE id = $1")
        .bind(&t.id)
        .execute(&mut *tx)
        .await
        .expect("extend");
    let mut c = router.clone();
    let id = t.id.clone();
    let capture = tokio::spawn(async move { c.capture(capture_full(&id)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!capture.is_finished(), "the capture waits for the row lock");
    tx.commit().await.expect("commit");
    let done = ok(capture.await.expect("task"));
    assert_eq!(done.status(), pb::TransferStatus::Completed);
    assert_eq!(done.captured_micros, USD);
    assert_eq!(h.balance(OWNER).await.balance_micros, USD);
    h.finish().await;
}
