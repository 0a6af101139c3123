//! Idempotent replay of paid answers and settlement of unknown capture outcomes (issue 15): a
//! retry with the same request id after the capture gets the stored answer, marked as a replay,
//! over every front, with no upstream call and no second charge; a capture whose outcome was
//! unknown is settled, and the client gets the answer exactly when it was charged.

use std::time::Duration;

use serde_json::{json, Value};
use syft_proto::ledger::TransferStatus;
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::{ChatFinal, ChatRequest};
use syft_router_svc::{Pricing, ReplaySettings};
use syft_testkit::*;
use tonic::transport::Channel;
use tonic::Code;

fn keyed(s: &Stack, content: &str, key: &str) -> ChatRequest {
    let mut req = s.request(content);
    req.request_id = key.into();
    req
}

/// Streams `req`; returns the concatenated deltas, the final event and the replay metadata.
async fn stream(c: &mut RouterClient<Channel>, req: ChatRequest) -> (String, ChatFinal, bool) {
    let resp = c.chat_stream(req).await.expect("stream");
    let marked = resp.metadata().get("x-syft-replay").is_some();
    let (text, last) = read_answer(&mut resp.into_inner()).await;
    (text, last.expect("final event"), marked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_retries_after_the_capture_get_the_stored_answer() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let mut c = s.client().await;

    // Unary, then its unary and streamed retries.
    let first = ok(c.chat(keyed(&s, "hi", "unary-1")).await);
    assert!(!first.replay);
    let again = c.chat(keyed(&s, "hi", "unary-1")).await.expect("retry");
    assert_eq!(
        again.metadata().get("x-syft-replay").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let again = again.into_inner();
    assert!(again.replay);
    assert_eq!(
        (
            &again.transfer_id,
            again.cost_micros,
            &again.message,
            &again.usage
        ),
        (
            &first.transfer_id,
            first.cost_micros,
            &first.message,
            &first.usage
        )
    );
    let (text, last, marked) = stream(&mut c, keyed(&s, "hi", "unary-1")).await;
    assert!(marked && last.replay);
    assert_eq!(text, CONTENT);
    assert_eq!(
        (last.transfer_id.as_str(), last.cost_micros),
        (first.transfer_id.as_str(), PRICE)
    );

    // Streamed, then its streamed and unary retries.
    let (text, first, marked) = stream(&mut c, keyed(&s, "hello", "stream-1")).await;
    assert!(!marked && !first.replay);
    let (again_text, again, marked) = stream(&mut c, keyed(&s, "hello", "stream-1")).await;
    assert!(marked && again.replay);
    assert_eq!(again_text, text);
    assert_eq!(
        (
            &again.transfer_id,
            again.cost_micros,
            &again.usage,
            &again.finish_reason
        ),
        (
            &first.transfer_id,
            first.cost_micros,
            &first.usage,
            &first.finish_reason
        )
    );
    let unary = ok(c.chat(keyed(&s, "hello", "stream-1")).await);
    assert!(unary.replay);
    assert_eq!(unary.message.map(|m| m.content), Some(text));

    // Two paid requests, each charged once, each called upstream once.
    assert_eq!(s.upstream.hits(), 2);
    assert_eq!(
        s.alice_money().await,
        (FUNDS - 2 * PRICE, 0, FUNDS - 2 * PRICE)
    );
    assert_eq!(s.usage().await.len(), 2);
    s.check_invariants().await;
}

/// A retry with a fresh token of the same user (the first answer lost after its capture) gets
/// the stored answer: the ledger takes a hold that differs only by its live token as the same
/// request. A made-up token, or one the user revoked, gets no answer and moves no money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_a_fresh_token_gets_the_stored_answer() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let mut c = s.client().await;
    let first = ok(c.chat(keyed(&s, "hi", "fresh-1")).await);
    let fresh = issue_token(&s.ledger.url, &s.alice, &s.owner.email).await;
    let retry = ChatRequest {
        transaction_token: fresh.clone(),
        ..keyed(&s, "hi", "fresh-1")
    };
    let again = ok(c.chat(retry).await);
    assert!(again.replay);
    assert_eq!(
        (&again.transfer_id, &again.message),
        (&first.transfer_id, &first.message)
    );
    let forged = ChatRequest {
        transaction_token: "made-up-token".into(),
        ..keyed(&s, "hi", "fresh-1")
    };
    // Refused (the key is taken by a request this token cannot claim), no answer given.
    let refused = c.chat(forged).await.expect_err("a made-up token");
    let codes = [tonic::Code::AlreadyExists, tonic::Code::PermissionDenied];
    assert!(codes.contains(&refused.code()), "{refused:?}");
    revoke_token(&s.ledger.url, &s.alice, &fresh).await;
    let revoked = ChatRequest {
        transaction_token: fresh,
        ..keyed(&s, "hi", "fresh-1")
    };
    let refused = c.chat(revoked).await.expect_err("a revoked token");
    assert!(codes.contains(&refused.code()), "{refused:?}");
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_retries_get_the_stored_answer_with_the_replay_header() {
    let (s, http, url) = Stack::start_http(Pricing::per_request(PRICE)).await;
    let send = |key: &'static str, stream: bool| {
        http.post(&url)
            .bearer_auth(&s.token)
            .header("Idempotency-Key", key)
            .json(
                &json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                          "user": s.alice.email, "max_tokens": 50, "stream": stream}),
            )
            .send()
    };
    let replay_header = |r: &reqwest::Response| {
        r.headers()
            .get("x-syft-replay")
            .map(|v| v.as_bytes().to_vec())
    };

    let first = send("http-1", false).await.expect("http");
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(replay_header(&first), None);
    let first: Value = first.json().await.expect("json");
    let again = send("http-1", false).await.expect("http");
    assert_eq!(again.status().as_u16(), 200);
    assert_eq!(replay_header(&again), Some(b"true".to_vec()));
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["syft"]["replay"], true);
    assert_eq!(again["syft"]["transfer_id"], first["syft"]["transfer_id"]);
    assert_eq!(again["syft"]["cost_micros"], PRICE);
    assert_eq!(again["choices"][0]["message"]["content"], CONTENT);

    // SSE retry of the same key.
    let sse = send("http-1", true).await.expect("sse");
    assert_eq!(sse.status().as_u16(), 200);
    assert_eq!(replay_header(&sse), Some(b"true".to_vec()));
    let body = sse.text().await.expect("body");
    assert!(body.contains("\"replay\":true"), "{body}");
    assert!(body.contains(CONTENT) && body.contains("[DONE]"), "{body}");

    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_request_under_a_used_key_is_refused_without_an_upstream_call() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let mut c = s.client().await;
    c.chat(keyed(&s, "hi", "k")).await.expect("first");
    let err = c
        .chat(keyed(&s, "something else", "k"))
        .await
        .expect_err("other request, same key");
    assert_conflict_charged_once(&s, &err, "different request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_storage_or_above_the_size_cap_a_retry_gets_409() {
    for replay in [
        ReplaySettings {
            retention: Duration::ZERO,
            ..ReplaySettings::default()
        },
        ReplaySettings {
            max_bytes: 16,
            ..ReplaySettings::default()
        },
    ] {
        let s =
            Stack::start_tweaked(Pricing::per_request(PRICE), |c| c.replay = replay.clone()).await;
        let mut c = s.client().await;
        c.chat(keyed(&s, "hi", "k")).await.expect("first");
        let err = c.chat(keyed(&s, "hi", "k")).await.expect_err("retry");
        assert_conflict_charged_once(&s, &err, "already charged").await;
    }
}

/// The ledger goes away after the hold and comes back while the router is still settling the
/// capture: the capture commits then, and the client gets its answer (never "failed" while
/// charged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_during_a_ledger_outage_is_settled_when_it_returns() {
    let mut s = Stack::start(Pricing::per_request(PRICE)).await;
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(400)));
    let mut c = s.client().await;
    let req = keyed(&s, "hi", "outage-1");
    let call = tokio::spawn(async move { c.chat(req).await });
    s.wait_pending(Duration::from_secs(2)).await;
    let addr = s.ledger.url.clone();
    s.ledger.stop_now().await;
    // Down for longer than the old retry budget (3 tries within ~300 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.ledger = LedgerServer::start_at(ledger_config(&s.db.url), &addr).await;
    let resp = call
        .await
        .expect("join")
        .expect("answered once charged")
        .into_inner();
    assert_eq!(resp.cost_micros, PRICE);
    let t = s.transfers().await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].status(), TransferStatus::Completed);
    assert_eq!(t[0].id, resp.transfer_id);
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);
    assert_eq!(s.upstream.hits(), 1);
    s.check_invariants().await;
}

/// A retry refused with 409 (`ALREADY_EXISTS`) saying `why`, after one charged call that reached
/// the upstream once.
async fn assert_conflict_charged_once(s: &Stack, err: &tonic::Status, why: &str) {
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(why), "{}", err.message());
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);
    s.check_invariants().await;
}

/// A replay calls no upstream and charges nothing, so it spends none of the user's rate-limit
/// windows: with 2 requests a minute, one request replayed three times still leaves room for a
/// second request (each replay used to spend a request's room, and the second replay was
/// refused `RATE_LIMITED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_spend_no_rate_limit_room() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        let rate = syft_router_svc::config::Rate::parse("2/minute").expect("rate");
        c.rate_limits.requests = vec![rate];
    })
    .await;
    let mut c = s.client().await;
    assert!(!ok(c.chat(keyed(&s, "hi", "once")).await).replay);
    for _ in 0..3 {
        assert!(ok(c.chat(keyed(&s, "hi", "once")).await).replay);
    }
    assert!(!ok(c.chat(keyed(&s, "hi", "twice")).await).replay);
    let err = c
        .chat(keyed(&s, "hi", "thrice"))
        .await
        .expect_err("the third request");
    assert_eq!(reason(&err).as_deref(), Some("RATE_LIMITED"), "{err:?}");
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);
    s.check_invariants().await;
}

/// The Syft `/chat` front marks a replay as the OpenAI front does (`"replay": true` and
/// `x-syft-replay: true`); it used to return the stored answer with its cost and nothing saying it
/// was not charged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_syft_chat_front_marks_a_replay() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let http = reqwest::Client::new();
    let body = json!({"userEmail": s.alice.email, "model": "test-model", "requestId": "syft-1",
        "messages": [{"role": "user", "content": "hi"}], "transactionToken": s.token});
    let mut seen = Vec::new();
    for _ in 0..2 {
        let resp = http
            .post(format!("{}/chat", s.router.http_url))
            .json(&body)
            .send()
            .await
            .expect("http");
        assert_eq!(resp.status(), 200);
        let header = resp.headers().get("x-syft-replay").is_some();
        let v: Value = resp.json().await.expect("json");
        seen.push((
            v["replay"].as_bool(),
            header,
            v["cost"]["amountMicros"].clone(),
        ));
    }
    assert_eq!(seen[0].0, Some(false));
    assert!(!seen[0].1);
    assert_eq!((seen[1].0, seen[1].1), (Some(true), true));
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);
    s.check_invariants().await;
}

/// A retry that reaches a router whose price changed since the answer was charged (a new config,
/// or another replica during a rolling deploy) asks the ledger for a hold of another amount under
/// the same key. The ledger refuses that as `IDEMPOTENCY_CONFLICT` and names the key's transfer,
/// so the retry still gets the stored answer, at the first attempt's cost; it used to get a 409
/// although the user had been charged. Another request under that id is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_price_change_gets_the_stored_answer() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let first = ok(s.client().await.chat(keyed(&s, "hi", "priced-1")).await);
    let repriced = RouterHandle::start(s.router_config(Pricing::per_request(2 * PRICE))).await;
    let mut c = repriced.client().await;
    let again = ok(c.chat(keyed(&s, "hi", "priced-1")).await);
    assert!(again.replay);
    assert_eq!(
        (&again.transfer_id, again.cost_micros, &again.message),
        (&first.transfer_id, PRICE, &first.message)
    );
    let other = c.chat(keyed(&s, "something else", "priced-1")).await;
    assert_eq!(code(other), Code::AlreadyExists);
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    s.check_invariants().await;
}

/// A request id is the owner's and the payer's, not one service's: the same search sent under one
/// id to another router of the same owner (another name, corpus or price) is refused as processed
/// by that service, not answered with the first router's stored answer marked as a replay (which
/// served another service's results, and left the second router no row of the request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_answered_by_another_service_of_the_owner_is_not_replayed() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    let first = ok(c.chat(keyed(&s, "hi", "shared-1")).await);
    assert!(!first.replay);
    let mut config = s.router_config(Pricing::per_request(PRICE));
    config.name = "another-service".into();
    let other = RouterHandle::start(config).await;
    let err = other
        .client()
        .await
        .chat(keyed(&s, "hi", "shared-1"))
        .await
        .expect_err("another service's answer");
    assert_conflict_charged_once(&s, &err, "another service of this owner").await;
    assert!(
        err.message().contains(&first.transfer_id),
        "{}",
        err.message()
    );
    // Its own router still replays it.
    assert!(ok(c.chat(keyed(&s, "hi", "shared-1")).await).replay);
    assert_eq!(s.upstream.hits(), 1);
}
