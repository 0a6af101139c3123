//! Answers stored with captures (idempotent replay, migration 0004), on SQLite and Postgres: served
//! only to the transfer's recipient and only once it is COMPLETED, bounded in size and retention,
//! refused whole when unusable (nothing captured), deleted after their retention.

use syft_proto::ledger as pb;
use syft_testkit::{code, ok, req, store_suite, Harness, USD};
use tonic::Code;

const OWNER: &str = "owner@router.example";
const OTHER: &str = "other@router.example";
const ALICE: &str = "alice@example.com";

fn hold(amount: i64, token: &str, key: &str) -> pb::AuthorizeRequest {
    req::hold(ALICE, amount, token, key)
}

fn capture(id: &str, body: &[u8], retention_seconds: i64) -> pb::CaptureRequest {
    let answer = pb::AnswerToStore {
        body: body.to_vec(),
        retention_seconds,
    };
    pb::CaptureRequest {
        amount: Some(pb::capture_request::Amount::AmountMicros(USD / 2)),
        answer: Some(answer),
        ..req::capture_full(id)
    }
}

async fn answers_are_served_once_captured_to_the_recipient_only(h: Harness) -> Harness {
    let other = h.account(OTHER, 0).await;
    let (owner, alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let t = ok(router.authorize(hold(USD, &token, "k1")).await);
    // Nothing stored yet, and a pending transfer has no answer.
    assert_eq!(
        code(router.get_answer(req::get_answer(&t.id)).await),
        Code::NotFound
    );

    let done = ok(router.capture(capture(&t.id, b"the answer", 3600)).await);
    assert_eq!(done.status(), pb::TransferStatus::Completed);
    let a = ok(router.get_answer(req::get_answer(&t.id)).await);
    assert_eq!(a.body, b"the answer");
    assert_eq!(a.transfer_id, t.id);
    assert!(a.expires_at_unix_micros > done.resolved_at_unix_micros.unwrap_or(0));

    // The retry of the capture (an unknown outcome asked again) is idempotent, answer included.
    let again = ok(router.capture(capture(&t.id, b"the answer", 3600)).await);
    assert_eq!(again, done);

    // Another recipient neither sees nor overwrites it; the sender does not see it either.
    let mut stranger = h.client(&other);
    assert_eq!(
        code(stranger.get_answer(req::get_answer(&t.id)).await),
        Code::NotFound
    );
    let overwrite = stranger.capture(capture(&t.id, b"forged", 3600)).await;
    assert_eq!(code(overwrite), Code::NotFound);
    assert_eq!(
        code(h.client(&alice).get_answer(req::get_answer(&t.id)).await),
        Code::NotFound
    );
    let a = router
        .get_answer(req::get_answer(&t.id))
        .await
        .expect("answer");
    assert_eq!(a.into_inner().body, b"the answer");
    h
}

async fn unusable_answers_refuse_the_capture_whole(h: Harness) -> Harness {
    let (owner, _alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let t = ok(router.authorize(hold(USD, &token, "k1")).await);
    let too_big = vec![b'x'; syft_ledger::MAX_ANSWER_BYTES + 1];
    for bad in [
        capture(&t.id, &too_big, 60),
        capture(&t.id, b"a", 0),
        capture(&t.id, b"a", syft_ledger::MAX_ANSWER_RETENTION_SECONDS + 1),
    ] {
        assert_eq!(code(router.capture(bad).await), Code::InvalidArgument);
    }
    // Nothing was captured and nothing stored: the hold is intact.
    let still = ok(router.get_transfer(req::get_transfer(&t.id)).await);
    assert_eq!(still.status(), pb::TransferStatus::Pending);
    assert_eq!(h.balance(ALICE).await.held_micros, USD);

    // A voided transfer's answer (written before a capture that then failed) is never served.
    ok(router.void(req::void(&t.id)).await);
    let late = router.capture(capture(&t.id, b"never paid", 60)).await;
    assert_eq!(code(late), Code::FailedPrecondition);
    assert_eq!(
        code(router.get_answer(req::get_answer(&t.id)).await),
        Code::NotFound
    );
    h
}

async fn answers_expire_and_are_purged(h: Harness) -> Harness {
    let (owner, _alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let t = ok(router.authorize(hold(USD, &token, "k1")).await);
    router
        .capture(capture(&t.id, b"short-lived", 1))
        .await
        .expect("capture");
    assert!(router.get_answer(req::get_answer(&t.id)).await.is_ok());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        code(router.get_answer(req::get_answer(&t.id)).await),
        Code::NotFound
    );
    // The sweeper (every 200 ms in tests) or this purge deletes the row.
    h.store.purge_answers(100).await.expect("purge");
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM answers")
        .fetch_one(h.store.pool())
        .await
        .expect("count");
    assert_eq!(left, 0);
    h
}

store_suite!(
    answers_are_served_once_captured_to_the_recipient_only,
    unusable_answers_refuse_the_capture_whole,
    answers_expire_and_are_purged,
);
