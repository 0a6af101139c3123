//! An upstream's own rate limit (429 with `Retry-After`): a short wait is waited for and the
//! request retried within its time; a longer one is passed on to the client (gRPC `RetryInfo`,
//! HTTP `Retry-After`, reason `UPSTREAM_RATE_LIMITED`) at once instead of ending in a timeout.
//! Either way the user pays only for an answer, once. A 5xx's `Retry-After` (a 503 in
//! maintenance) is passed on the same way, as `UNAVAILABLE`.

use std::time::{Duration, Instant};

use serde_json::json;
use syft_proto::ledger::TransferStatus;
use syft_router_svc::{Pricing, UpstreamConfig};
use syft_testkit::*;
use tonic::Code;

/// A stack whose upstream requests may take `time`.
async fn with_request_time(time: Duration) -> Stack {
    Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        if let UpstreamConfig::OpenAi(o) = &mut c.upstream {
            o.request_timeout = time;
        }
    })
    .await
}

/// `err` is `code` with `reason`, and passes on a wait of `secs` (`RetryInfo`).
fn told_to_wait(err: &tonic::Status, code: Code, why: &str, secs: u64) {
    assert_eq!(err.code(), code, "{err:?}");
    assert_eq!(reason(err).as_deref(), Some(why));
    assert_eq!(
        syft_error::retry_after_of(err),
        Some(Duration::from_secs(secs)),
        "{err:?}"
    );
}

/// Every transfer of the stack was voided and its row says the upstream failed.
async fn all_voided(s: &Stack, n: usize) {
    let t = s.transfers().await;
    assert_eq!(t.len(), n, "{t:?}");
    assert!(t
        .iter()
        .all(|t| t.status() == TransferStatus::Cancelled && t.captured_micros == 0));
    assert_eq!(s.usage_statuses().await, vec!["upstream_error"; n]);
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

/// The upstream asks for 30 s, more than the request's 1.5 s: the router does not retry (a retry
/// then could only end in a timeout) and tells the client when to come back, on both fronts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_is_passed_on_at_once() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    s.upstream
        .set_mode(Mode::RateLimited("30".into(), u32::MAX));
    let started = Instant::now();
    let err = c.chat(s.request("hi")).await.expect_err("rate limited");
    // Not the 30 s asked, nor the request's 1.5 s (the ledger's void is in this too).
    assert!(started.elapsed() < Duration::from_millis(1400), "no wait");
    told_to_wait(&err, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED", 30);
    assert_eq!(s.upstream.hits(), 1, "not retried");
    // A stream is refused the same way, before its first event.
    let err = c
        .chat_stream(s.request("hi"))
        .await
        .expect_err("stream rate limited");
    assert_eq!(reason(&err).as_deref(), Some("UPSTREAM_RATE_LIMITED"));
    assert_eq!(
        syft_error::retry_after_of(&err),
        Some(Duration::from_secs(30))
    );
    assert_eq!(s.upstream.hits(), 2, "not retried");

    let refused = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "30");
    // A rate clears by itself: the OpenAI SDKs may retry (after the header's wait).
    assert!(!refused.headers().contains_key("x-should-retry"));
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "upstream_rate_limited", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(s.upstream.hits(), 3);
    all_voided(&s, 3).await;
}

/// OpenAI's "out of credit" (a 429 whose code is `insufficient_quota`: the router's account, not
/// a rate) and a 402 are not retried, and are told as the operator's outage with a wait past the
/// SDKs' patience: the router retried it three times and told it as a rate limit the SDKs
/// retried, nine upstream calls and three holds for one request (an errors reviewer's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_out_of_credit_is_not_retried() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    let quota = json!({"error": {"message": "You exceeded your current quota",
        "type": "insufficient_quota", "code": "insufficient_quota"}});
    s.upstream
        .set_mode(Mode::StatusBody(429, quota.to_string()));
    let err = c.chat(s.request("hi")).await.expect_err("out of credit");
    told_to_wait(&err, Code::Unavailable, "UNAVAILABLE", 300);
    assert_eq!(s.upstream.hits(), 1, "not retried");
    let refused = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["x-should-retry"], "false");
    assert_eq!(refused.headers()["retry-after"], "300");
    assert_eq!(s.upstream.hits(), 2, "not retried");
    s.upstream.set_mode(Mode::Status(402));
    let err = c
        .chat(s.request("hi"))
        .await
        .expect_err("payment required upstream");
    told_to_wait(&err, Code::Unavailable, "UNAVAILABLE", 300);
    assert_eq!(s.upstream.hits(), 3, "not retried");
    all_voided(&s, 3).await;
}

/// The upstream asks for 1 s once: the router waits that long (not its 20-ms backoff), retries
/// within the request's time and the answer is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retry_after_is_waited_for() {
    let s = with_request_time(Duration::from_secs(5)).await;
    s.upstream.set_mode(Mode::RateLimited("1".into(), 1));
    let mut c = s.client().await;
    let started = Instant::now();
    let answer = ok(c.chat(s.request("hi")).await);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited as asked: {:?}",
        started.elapsed()
    );
    assert_eq!(s.upstream.hits(), 2);
    assert_eq!(answer.cost_micros, PRICE);
    s.assert_captured_once(PRICE).await;
}

/// The same 1-s wait with only 0.5 s of the request's time: not taken, so the client hears of the
/// rate limit (and when to retry) instead of a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_the_requests_time_is_not_taken() {
    let s = with_request_time(Duration::from_millis(500)).await;
    s.upstream.set_mode(Mode::RateLimited("1".into(), 1));
    let mut c = s.client().await;
    let err = c.chat(s.request("hi")).await.expect_err("rate limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        syft_error::retry_after_of(&err),
        Some(Duration::from_secs(1))
    );
    assert_eq!(s.upstream.hits(), 1);
    all_voided(&s, 1).await;
}

/// The upstream is down for maintenance (503) and says to come back in 2 minutes: the router
/// does not retry into it and passes the wait on, as `UNAVAILABLE` with `RetryInfo` over gRPC
/// and 503 with `Retry-After` over both HTTP fronts (it used to be dropped, so clients retried
/// at once into the same refusal). Nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_upstreams_retry_after_is_passed_on() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    s.upstream.set_mode(Mode::Unavailable("120".into()));
    let err = c.chat(s.request("hi")).await.expect_err("unavailable");
    told_to_wait(&err, Code::Unavailable, "UNAVAILABLE", 120);
    assert!(err.message().contains("retry in 120 s"), "{err:?}");
    assert_eq!(s.upstream.hits(), 1, "not retried");

    let refused = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "120");
    // Longer than the OpenAI SDKs honour (60 s): they would retry at once into the same 503.
    assert_eq!(refused.headers()["x-should-retry"], "false");
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["type"], "service_unavailable", "{body}");

    let syft = s.syft_chat(json!({"requestId": "syft-1"})).send().await;
    let refused = syft.expect("http");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "120");
    assert_eq!(s.upstream.hits(), 3);
    all_voided(&s, 3).await;
}

/// A 503 without `Retry-After` is retried with the router's backoff and, still down, answered
/// `UNAVAILABLE` with no wait to pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_upstream_without_a_wait_has_none_passed_on() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    s.upstream.set_mode(Mode::Status(503));
    let err = c.chat(s.request("hi")).await.expect_err("unavailable");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(syft_error::retry_after_of(&err), None, "{err:?}");
    assert!(s.upstream.hits() > 1, "retried");
    let refused = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(refused.status(), 503);
    assert!(!refused.headers().contains_key("retry-after"));
    let n = s.transfers().await.len();
    all_voided(&s, n).await;
}

/// An address whose connections time out: a listener with a backlog of one that never accepts,
/// its queue filled, so the kernel drops further connection requests unanswered. (`None` when
/// this machine answers them anyway.)
async fn never_connects() -> Option<(tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String)> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut queued = Vec::new();
    for _ in 0..8 {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(_)) => return None,
            Err(_) => return Some((listener, queued, format!("http://{addr}/v1"))),
        }
    }
    None
}

/// An upstream that cannot be connected to within `connect_timeout_ms` is a connect error,
/// retried as docs/router.md says (the request never reached it), then answered `UNAVAILABLE`,
/// nothing charged. It was taken for the upstream's timeout: not retried, `DEADLINE_EXCEEDED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connect_timeout_is_retried_as_a_connect_error() {
    let Some((_listener, _queued, url)) = never_connects().await else {
        syft_testkit::skipped(
            syft_testkit::Need::Backlog,
            "this machine answers connections past a listener's backlog",
        );
        return;
    };
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        if let UpstreamConfig::OpenAi(o) = &mut c.upstream {
            o.base_url = url;
            o.connect_timeout = Duration::from_millis(200);
            o.request_timeout = Duration::from_secs(10);
            o.max_retries = 2;
            o.retry_backoff = Duration::from_millis(50);
        }
    })
    .await;
    let mut c = s.client().await;
    let started = Instant::now();
    let err = c.chat(s.request("hi")).await.expect_err("no upstream");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Three tries of 200 ms each, and the backoff between them.
    assert!(started.elapsed() >= Duration::from_millis(600), "retried");
    let t = s.transfers().await;
    assert!(t
        .iter()
        .all(|t| t.status() == TransferStatus::Cancelled && t.captured_micros == 0));
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}
