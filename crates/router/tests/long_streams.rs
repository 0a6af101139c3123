//! Holds that outlive long streams (issue 15): the router extends a running stream's hold, so a
//! stream longer than the hold's TTL is still captured; `max_stream_duration` ends any stream,
//! charging what was delivered. Either way no answer is delivered uncharged.

use std::time::Duration;

use futures::StreamExt;
use syft_proto::ledger::TransferStatus;
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::{chat_stream_event, ChatFinal, ChatStreamEvent};
use syft_router_svc::{Pricing, RouterConfig, UpstreamConfig};
use syft_testkit::*;
use tonic::transport::Channel;

async fn slow_stream(
    hold_ttl: Duration,
    tweak: impl FnOnce(&mut RouterConfig),
) -> (Stack, String, ChatFinal) {
    let s = Stack::start_with(Db::sqlite(), Pricing::per_request(PRICE), hold_ttl, tweak).await;
    // 100 chunks, one per 40 ms: 4 s, past a 2 s hold.
    s.upstream
        .set_mode(Mode::SlowStream(Duration::from_millis(40)));
    let mut c = s.client().await;
    let mut events = ok(c.chat_stream(s.request("tell me a long story")).await);
    let mut text = String::new();
    let mut last = None;
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => panic!("{e:?}: {:?}", s.transfers().await),
        };
        match ev.event {
            Some(chat_stream_event::Event::Delta(d)) => text.push_str(&d.content),
            Some(chat_stream_event::Event::Final(f)) => last = Some(f),
            None => {}
        }
    }
    (s, text, last.expect("final event"))
}

async fn assert_charged_once(s: &Stack, last: &ChatFinal) {
    assert_eq!(s.transfers().await[0].id, last.transfer_id);
    s.assert_captured_once(PRICE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_its_hold_is_kept_alive_and_captured() {
    let (s, text, last) = slow_stream(Duration::from_secs(2), |_| {}).await;
    assert_eq!(text, "tick ".repeat(100), "the whole answer");
    assert_eq!(last.finish_reason, "stop");
    assert_eq!(last.cost_micros, PRICE);
    let t = s.transfers().await;
    assert!(
        t[0].expires_at_unix_micros - t[0].created_at_unix_micros > 2_500_000,
        "the hold was extended: {t:?}"
    );
    assert_charged_once(&s, &last).await;
}

/// A paid stream (holds living `hold_ttl`) from an upstream in `mode` to a client behind a slow
/// link (`RouterHandle::slow_link_client`), and the client.
async fn slow_reader(
    hold_ttl: Duration,
    mode: Mode,
    tweak: impl FnOnce(&mut RouterConfig),
) -> (
    Stack,
    RouterClient<Channel>,
    tonic::Streaming<ChatStreamEvent>,
) {
    let s = Stack::start_with(Db::sqlite(), Pricing::per_request(PRICE), hold_ttl, tweak).await;
    s.upstream.set_mode(mode);
    let mut c = s.router.slow_link_client().await;
    let events = ok(c.chat_stream(s.request("tell me a long story")).await);
    (s, c, events)
}

/// A client that stops reading a paid stream (its flow-control window full) for twice the
/// hold's life, then reads on: the router kept the hold extended while the client's queue was
/// full, so the whole answer arrives and is charged once. Before, the router waited in `send`,
/// where the hold was not extended: it expired, and the text the client then read was free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_stream_is_still_charged() {
    // 3 s, extended every second: with 2 s a CI run under load once let the hold expire.
    let hold_ttl = Duration::from_secs(3);
    let (s, _c, mut events) = slow_reader(
        hold_ttl,
        Mode::SlowStream(Duration::from_millis(10)),
        |_| {},
    )
    .await;
    tokio::time::sleep(hold_ttl * 2).await;
    let (text, last) = read_answer(&mut events).await;
    assert_eq!(text, "tick ".repeat(100), "the whole answer");
    let last = last.expect("final event");
    assert_eq!(last.finish_reason, "stop");
    assert_charged_once(&s, &last).await;
}

/// A client behind a slow link (a 64-byte flow-control window) reads 80 of the answer's 100
/// deltas (the upstream waits there for the test, so the reader is never behind: a reader far
/// behind gets the router's whole queue handed to HTTP/2 at its next window update, which
/// counts as read),
/// stops while the upstream finishes (the last 20 wait in the router's queue for it), then
/// leaves. It never had the end of its answer, so it is not charged: the capture waits until
/// the client has taken every delta. Before, the capture ran when the upstream ended, and the
/// client paid for an answer it did not get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_reading_the_end_is_not_charged() {
    let mode = Mode::GatedStream(Duration::from_millis(5), 80);
    let (s, c, mut events) = slow_reader(Duration::from_secs(60), mode, |_| {}).await;
    for read in 0..80 {
        match events.next().await {
            Some(Ok(ev)) => assert!(
                matches!(ev.event, Some(chat_stream_event::Event::Delta(_))),
                "event {read}: {ev:?}"
            ),
            other => panic!("event {read}: {other:?}"),
        }
    }
    // Only now the upstream sends its last 20 chunks; they wait in the router's queue.
    s.upstream.open_gate();
    s.upstream.wait_streams_sent(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.alice_money().await.1,
        PRICE,
        "still held: {:?}",
        s.transfers().await
    );
    drop(events);
    drop(c);
    s.assert_voided_once(Duration::from_secs(5)).await;
    s.assert_one_usage("cancelled").await;
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_duration_ends_a_stream_and_charges_what_was_delivered() {
    let (s, text, last) = slow_stream(Duration::from_secs(300), |c| {
        c.max_stream_duration = Duration::from_millis(400);
    })
    .await;
    assert!(
        !text.is_empty() && text.len() < "tick ".len() * 100,
        "{text:?}"
    );
    assert_eq!(last.finish_reason, "length");
    assert_eq!(last.cost_micros, PRICE);
    assert_charged_once(&s, &last).await;
}

/// A stack whose holds live 2 s and whose upstream answers after 3 s (within its 10-s timeout).
async fn slower_than_its_hold() -> Stack {
    let s = Stack::start_with(
        Db::sqlite(),
        Pricing::per_request(PRICE),
        Duration::from_secs(2),
        |c| {
            if let UpstreamConfig::OpenAi(o) = &mut c.upstream {
                o.request_timeout = Duration::from_secs(10);
            }
        },
    )
    .await;
    s.upstream
        .set_mode(Mode::Delay(Duration::from_millis(3000)));
    s
}

/// A unary answer slower than the hold's time to live (3 s against 2 s): the router extends the
/// hold while it waits for the upstream, as it does for streams, so the answer is captured and
/// returned. Before, the capture found the hold expired: the answer was withheld and the
/// upstream's work thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_answer_slower_than_its_hold_is_captured() {
    let s = slower_than_its_hold().await;
    let mut c = s.client().await;
    let answer = match c.chat(s.request("take your time")).await {
        Ok(a) => a.into_inner(),
        Err(e) => panic!("{e:?}: {:?}", s.transfers().await),
    };
    assert_eq!(answer.cost_micros, PRICE);
    s.assert_captured_once(PRICE).await;
}

/// The same for a stream whose upstream takes longer than the hold's life to start answering:
/// the hold is extended while the router waits for the stream to open, so the whole answer is
/// delivered and charged once (the hold used to run out meanwhile: the stream was cut at once and
/// its answer voided, or captured too late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_slower_to_start_than_its_hold_is_captured() {
    let s = slower_than_its_hold().await;
    let mut c = s.client().await;
    let mut events = ok(c.chat_stream(s.request("take your time")).await);
    let (text, last) = read_answer(&mut events).await;
    let last = last.expect("a final event");
    assert!(!text.is_empty());
    assert_eq!(last.finish_reason, "stop", "{last:?}");
    assert_eq!(last.cost_micros, PRICE);
    s.assert_captured_once(PRICE).await;
}

/// A capture the ledger refuses for good (here the hold expired while the upstream worked, its
/// expiry moved back behind the router's back) is voided at once with the request's usage row
/// (`capture_refused`), rather than left pending for the sweep, which writes no row. The ledger's
/// own sweep is slowed so that it cannot cancel the hold first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_capture_is_voided_with_its_row() {
    let s = Stack::start_with_ledger(Pricing::per_request(PRICE), |l| {
        l.sweep_interval = Duration::from_secs(3600);
    })
    .await;
    s.upstream
        .set_mode(Mode::Delay(Duration::from_millis(1000)));
    let (mut c, req) = (s.client().await, s.request("hi"));
    let (mut again, retry) = (c.clone(), req.clone());
    let chat = tokio::spawn(async move { c.chat(req).await });
    // The upstream is called once the hold is committed (a fixed wait missed a slow authorize).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.upstream.hits() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream was never called"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default();
    let moved = sqlx::query("UPDATE transfers SET expires_at = $1 WHERE status = 'PENDING'")
        .bind(now)
        .execute(s.ledger.store.pool())
        .await
        .expect("expire the hold");
    assert_eq!(moved.rows_affected(), 1);
    let refused = chat
        .await
        .expect("join")
        .expect_err("the capture is refused");
    // Said as an outage the client may retry (it was a 409 about the user's state, which the
    // SDKs do not retry, for a request that had failed).
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("nothing was charged"),
        "{refused:?}"
    );
    let t = s.transfers().await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].status(), TransferStatus::Cancelled, "{t:?}");
    assert_eq!(s.usage_statuses().await, ["capture_refused"]);
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    // The same request again, id and all, is answered and charged once.
    let answered = again.chat(retry).await.expect("the retry is answered");
    assert_eq!(answered.into_inner().cost_micros, PRICE);
    let mut statuses: Vec<_> = s.transfers().await.iter().map(|t| t.status()).collect();
    statuses.sort();
    let tried = [TransferStatus::Completed, TransferStatus::Cancelled];
    assert_eq!(statuses, tried);
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    s.check_invariants().await;
}

/// A reader that stops once the upstream has finished is waited for only within the stream's
/// bounds: at `max_stream_duration` the finished answer is charged as it is (the hold must be
/// resolved before it expires), not left waiting for a reader that may never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_answer_waits_for_its_reader_only_within_the_bounds() {
    let mode = Mode::GatedStream(Duration::from_millis(5), 80);
    let (s, _c, mut events) = slow_reader(Duration::from_secs(60), mode, |c| {
        c.max_stream_duration = Duration::from_secs(2);
    })
    .await;
    for read in 0..80 {
        let event = events.next().await;
        assert!(matches!(&event, Some(Ok(_))), "event {read}: {event:?}");
    }
    s.upstream.open_gate();
    s.upstream.wait_streams_sent(1).await;
    // Nothing more is read; the bound ends the wait about 2 s after the start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while s.transfers().await[0].status() == TransferStatus::Pending {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting for its reader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.assert_captured_once(PRICE).await;
}
