//! Graceful shutdown: requests that finish within the grace period are served and charged;
//! requests still running at its end are cancelled and their holds voided before `serve`
//! returns; nothing new is accepted meanwhile.

use std::time::{Duration, Instant};

use futures::StreamExt;
use syft_proto::ledger::TransferStatus;
use syft_proto::router::{chat_stream_event, ChatRequest};
use syft_router_svc::{Pricing, UpstreamConfig};
use syft_testkit::*;

/// Twice what the short requests need (B's 100 chunks take 0.8 s at the least), so that a loaded
/// machine still finishes them inside it.
const GRACE: Duration = Duration::from_secs(3);

async fn wait_hits(up: &FakeUpstream, n: usize) {
    for _ in 0..200 {
        if up.hits() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("upstream saw {} requests, want {n}", up.hits());
}

fn request(alice: &Account, token: &str, id: &str) -> ChatRequest {
    ChatRequest {
        model: "test-model".into(),
        request_id: id.into(),
        ..chat_request(&alice.email, token, &format!("request {id}"))
    }
}

/// Final event's cost, or the error status, of a streamed chat.
async fn collect_stream(
    mut client: syft_proto::router::router_client::RouterClient<tonic::transport::Channel>,
    req: ChatRequest,
) -> (usize, Result<i64, tonic::Status>) {
    let mut events = match client.chat_stream(req).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return (0, Err(status)),
    };
    let mut deltas = 0;
    while let Some(event) = events.next().await {
        match event.map(|e| e.event) {
            Ok(Some(chat_stream_event::Event::Delta(_))) => deltas += 1,
            Ok(Some(chat_stream_event::Event::Final(f))) => return (deltas, Ok(f.cost_micros)),
            Ok(None) => {}
            Err(status) => return (deltas, Err(status)),
        }
    }
    (
        deltas,
        Err(tonic::Status::unknown("stream ended without a final event")),
    )
}

/// A router with `grace` for its shutdown, over a funded ledger and an upstream whose requests
/// only the shutdown may end.
async fn stack(grace: Duration) -> (RouterHandle, FakeUpstream, LedgerServer, Account, String) {
    let db = Db::sqlite();
    let funded = Funded::start(&db, Duration::from_secs(300)).await;
    let upstream = FakeUpstream::start().await;
    let mut config = funded.router_config(
        "shutdown-router",
        Pricing::per_request(PRICE),
        Some(&upstream.base_url),
    );
    if let UpstreamConfig::OpenAi(o) = &mut config.upstream {
        o.request_timeout = Duration::from_secs(120);
        o.idle_timeout = Duration::from_secs(120);
    }
    config.shutdown_grace = grace;
    let router = RouterHandle::start(config).await;
    (router, upstream, funded.ledger, funded.alice, funded.token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_short_requests_and_voids_the_rest() {
    let (mut router, upstream, ledger, alice, token) = stack(GRACE).await;
    let client = router.client().await;

    // A: unary, answers after 700 ms (inside the grace period).
    upstream.set_mode(Mode::Delay(Duration::from_millis(700)));
    let a = tokio::spawn({
        let mut c = client.clone();
        let req = request(&alice, &token, "short-unary");
        async move { c.chat(req).await }
    });
    wait_hits(&upstream, 1).await;
    // B: a stream of 100 chunks, 8 ms apart (inside the grace period).
    upstream.set_mode(Mode::SlowStream(Duration::from_millis(8)));
    let b = tokio::spawn(collect_stream(
        client.clone(),
        request(&alice, &token, "short-stream"),
    ));
    wait_hits(&upstream, 2).await;
    // C: unary, the upstream never answers.
    upstream.set_mode(Mode::Stall);
    let c = tokio::spawn({
        let mut c = client.clone();
        let req = request(&alice, &token, "stalled-unary");
        async move { c.chat(req).await }
    });
    wait_hits(&upstream, 3).await;
    // D: a stream that sends one chunk, then stalls.
    upstream.set_mode(Mode::StreamStall);
    let d = tokio::spawn(collect_stream(
        client.clone(),
        request(&alice, &token, "stalled-stream"),
    ));
    wait_hits(&upstream, 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    router.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Nothing new is served once shutting down.
    upstream.set_mode(Mode::Ok);
    let late = tokio::time::timeout(Duration::from_millis(800), async {
        let mut c = tonic::transport::Endpoint::from_shared(router.grpc_url.clone())
            .expect("url")
            .connect()
            .await
            .map(syft_proto::router::router_client::RouterClient::new)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        c.chat(request(&alice, &token, "late")).await
    })
    .await;
    assert!(
        !matches!(late, Ok(Ok(_))),
        "a request after the shutdown signal was served"
    );

    router
        .join()
        .await
        .expect("serve returns Ok after a graceful shutdown");
    let took = started.elapsed();
    assert!(
        took >= GRACE,
        "serve returned after {took:?}, before the grace period ended, with requests running"
    );
    assert!(took < GRACE + Duration::from_secs(6), "took {took:?}");

    // The voids happened before serve returned: no waiting here.
    let transfers = transfers_of(&ledger.url, &alice.email).await;
    let status_of = |id: &str| {
        transfers
            .iter()
            .find(|t| t.idempotency_key == id)
            .map(|t| t.status())
            .unwrap_or_else(|| panic!("no transfer for {id}: {transfers:?}"))
    };
    assert_eq!(status_of("short-unary"), TransferStatus::Completed);
    assert_eq!(status_of("short-stream"), TransferStatus::Completed);
    assert_eq!(status_of("stalled-unary"), TransferStatus::Cancelled);
    assert_eq!(status_of("stalled-stream"), TransferStatus::Cancelled);
    let money = account(&ledger.url, &alice.email).await;
    assert_eq!(money.balance_micros, FUNDS - 2 * PRICE);
    assert_eq!(money.held_micros, 0);

    // What the clients saw.
    let a = a.await.expect("join").expect("short unary served");
    assert_eq!(a.into_inner().cost_micros, PRICE);
    let (deltas, b) = b.await.expect("join");
    assert_eq!(b.expect("short stream finished"), PRICE);
    assert_eq!(deltas, 100);
    let c = c.await.expect("join").expect_err("stalled unary cancelled");
    assert_eq!(c.code(), tonic::Code::Unavailable, "{c:?}");
    let (deltas, d) = d.await.expect("join");
    assert!(deltas >= 1);
    let d = d.expect_err("stalled stream cancelled");
    assert_eq!(d.code(), tonic::Code::Unavailable, "{d:?}");

    assert_consistent(&ledger.store).await;
    let usage = usage_of(&ledger.url, &alice.email).await;
    assert_eq!(usage.len(), 4, "one usage row per request: {usage:?}");
}

/// A paid stream whose upstream finished while its client (a 64-byte flow-control window) had
/// stopped reading, 20 deltas and the final event short: the router waits for the client to read
/// its answer before charging it, and when the shutdown's grace period ends first the hold is
/// voided, not captured (the client never gets the end). Before, the abort charged it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_unread_at_the_shutdown_is_voided() {
    let grace = Duration::from_secs(1);
    let (mut router, upstream, ledger, alice, token) = stack(grace).await;
    upstream.set_mode(Mode::GatedStream(Duration::from_millis(5), 80));
    let mut client = router.slow_link_client().await;
    let mut events = ok(client.chat_stream(request(&alice, &token, "unread")).await);
    for read in 0..80 {
        let event = events.next().await;
        assert!(matches!(&event, Some(Ok(_))), "event {read}: {event:?}");
    }
    // Only now the upstream sends its last 20 chunks, into the router's queue.
    upstream.open_gate();
    upstream.wait_streams_sent(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = account(&ledger.url, &alice.email).await;
    assert_eq!(held.held_micros, PRICE, "waiting for its reader");
    router.shutdown();
    router.join().await.expect("serve returns Ok");
    drop(events);
    let transfers = transfers_of(&ledger.url, &alice.email).await;
    assert_eq!(transfers.len(), 1);
    assert_eq!(
        transfers[0].status(),
        TransferStatus::Cancelled,
        "{transfers:?}"
    );
    let money = account(&ledger.url, &alice.email).await;
    assert_eq!((money.balance_micros, money.held_micros), (FUNDS, 0));
    assert_consistent(&ledger.store).await;
}

/// A stream whose reader fell a full queue behind (a 64-byte window, nothing read after the
/// first events) when the shutdown's grace ends: its hold is voided, and the reader, reading on
/// while the connection drains, gets every queued delta and then the error, not an end that looks
/// complete. Before, the error was dropped for want of room in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_behind_at_the_shutdown_gets_the_error() {
    let grace = Duration::from_secs(1);
    let (mut router, upstream, ledger, alice, token) = stack(grace).await;
    upstream.set_mode(Mode::SlowStream(Duration::from_millis(1)));
    let mut client = router.slow_link_client().await;
    let mut events = ok(client.chat_stream(request(&alice, &token, "behind")).await);
    let first = events.next().await;
    assert!(matches!(&first, Some(Ok(_))), "{first:?}");
    // The router's queue fills (100 chunks, 1 ms apart) while nothing is read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    router.shutdown();
    // Past the grace: the stream was aborted; read on while the connections drain.
    tokio::time::sleep(grace + Duration::from_millis(300)).await;
    let mut last = None;
    while let Some(event) = events.next().await {
        last = Some(event);
    }
    match last {
        Some(Err(status)) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("shutting down"), "{status:?}");
        }
        other => panic!("the stream ended without its error: {other:?}"),
    }
    router.join().await.expect("serve returns Ok");
    let transfers = transfers_of(&ledger.url, &alice.email).await;
    assert_eq!(transfers[0].status(), TransferStatus::Cancelled);
    assert_consistent(&ledger.store).await;
}

/// A ledger signalled while a router's paid request waits for its upstream still takes the
/// router's capture when the answer arrives 1 s later: a stopping ledger takes calls while they
/// come (until none came for a second, within half its grace), so routers stopping beside it
/// capture and void (README, "Shutdown"). It took no new call once signalled: the capture was
/// refused, the answer withheld, and the hold kept until it expired (an ops reviewer's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_in_its_grace_still_takes_the_captures_of_requests_in_flight() {
    let db = Db::sqlite();
    let mut funded = Funded::start_tweaked(&db, Duration::from_secs(300), |c| {
        c.shutdown_grace = Duration::from_secs(30);
    })
    .await;
    let upstream = FakeUpstream::start().await;
    let config = funded.router_config(
        "grace-router",
        Pricing::per_request(PRICE),
        Some(&upstream.base_url),
    );
    let mut router = RouterHandle::start(config).await;
    let client = router.client().await;
    upstream.set_mode(Mode::Delay(Duration::from_millis(1000)));
    let a = tokio::spawn({
        let mut c = client.clone();
        let req = request(&funded.alice, &funded.token, "in-flight-at-ledger-stop");
        async move { c.chat(req).await }
    });
    wait_hits(&upstream, 1).await;
    let signalled = Instant::now();
    funded.ledger.signal_stop();
    let mut ledger_gone_after = None;
    let mut a = a;
    let answer = loop {
        if ledger_gone_after.is_none() && funded.ledger.has_exited() {
            ledger_gone_after = Some(signalled.elapsed());
        }
        if signalled.elapsed() > Duration::from_secs(25) {
            break None;
        }
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(10), &mut a).await {
            break Some(done.expect("join"));
        }
    };
    let answer = answer.ok_or("no answer within 25 s");
    router.shutdown();
    let _ = router.join().await;
    assert!(
        matches!(answer, Ok(Ok(_))),
        "the ledger was {:?} into its 30 s grace (its serve returned after {ledger_gone_after:?}); \
         the router's capture was refused and the answer withheld: {answer:?}",
        signalled.elapsed()
    );
}
