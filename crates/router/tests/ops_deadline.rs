//! Per-RPC deadlines: a client's `grpc-timeout` ends the call on the router, and a paid call cut
//! short this way is never charged: its hold is voided.

use std::time::{Duration, Instant};

use syft_router_svc::Pricing;
use syft_testkit::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_deadline_ends_the_call_and_voids_the_hold() {
    let s = Stack::start(Pricing::per_request(10_000)).await;
    // Slower than the client will wait, faster than the router's own upstream timeout.
    s.upstream
        .set_mode(Mode::Delay(Duration::from_millis(1200)));
    let mut client = s.client().await;
    let mut req = tonic::Request::new(s.request("take your time"));
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = client.chat(req).await.expect_err("deadline");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the deadline was not honoured"
    );
    s.assert_voided_once(Duration::from_secs(5)).await;

    // Without a deadline the same request completes and is charged once.
    let answer = client
        .chat(s.request("take your time"))
        .await
        .expect("chat");
    assert_eq!(answer.into_inner().cost_micros, 10_000);
    assert_eq!(s.alice_money().await, (FUNDS - 10_000, 0, FUNDS - 10_000));
    s.check_invariants().await;
}
