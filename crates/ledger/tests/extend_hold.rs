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
    let why = reason(&err);
    // Expired but not yet swept, or already swept (cancelled).
    assert!(
        matches!(
            why.as_deref(),
            Some("HOLD_EXPIRED" | "TRANSFER_NOT_PENDING")
        ),
        "{why:?}"
    );
    assert_eq!(
        code(router.capture(capture_full(&t.id)).await),
        Code::FailedPrecondition
    );
    h
}

store_suite!(
    extended_holds_outlive_their_first_expiry,
    expired_holds_cannot_be_extended,
);
