//! Several ledger endpoints and duplicates across routers (issue 15): a router given two ledgers
//! of one database keeps selling when one dies (no 503, still ready) and is not ready only when
//! both are down; a duplicate request arriving at two routers at once calls the upstream once
//! and is charged once (the second router waits for the first's outcome and replays it).

use std::time::Duration;

use futures::future::join_all;
use serde_json::Value;
use syft_proto::ledger::TransferStatus;
use syft_proto::router::ChatRequest;
use syft_router_svc::Pricing;
use syft_testkit::*;

/// Polls `/readyz` until its status code is `want` (10 s at most).
async fn wait_ready_code(http_url: &str, want: u16) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = readyz(http_url).await;
        if code == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {code}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two ledgers on one Postgres database behind one router (`url` lists both). Paid traffic
/// runs while the first ledger is killed: every request is answered (none gets 503), readiness
/// stays ready; with both down the router is not ready. Every answer was charged once.
#[tokio::test]
async fn one_ledger_down_traffic_continues() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let funded = Funded::start(&db, Duration::from_secs(300)).await;
    let mut first = funded.ledger;
    let mut second = LedgerServer::start(ledger_config(&db.url)).await;
    let upstream = FakeUpstream::start().await;
    let mut config = router_config(
        "failover",
        &funded.owner.email,
        &funded.owner.secret,
        &format!("{},{}", first.url, second.url),
        Pricing::per_request(PRICE),
        Some(&upstream.base_url),
    );
    config.ledger.timeout = Duration::from_secs(10);
    let router = RouterHandle::start(config).await;
    let body = wait_ready_code(&router.http_url, 200).await;
    assert_eq!(body["ledgers"].as_array().map(Vec::len), Some(2), "{body}");

    let client = router.client().await;
    let send = |i: usize| {
        let mut c = client.clone();
        let mut req = chat_request(&funded.alice.email, &funded.token, "hi");
        req.model = "test-model".into();
        req.request_id = format!("failover-{i}");
        async move { c.chat(req).await.map(tonic::Response::into_inner) }
    };
    // Traffic before, during and after the kill, four at a time.
    let mut answered = 0;
    for round in 0..10 {
        if round == 3 {
            first.stop_now().await;
        }
        let results = join_all((0..4).map(|j| send(round * 4 + j))).await;
        for r in results {
            let r = r.unwrap_or_else(|s| panic!("request failed in round {round}: {s:?}"));
            assert_eq!(r.cost_micros, PRICE);
            answered += 1;
        }
        let (code, body) = readyz(&router.http_url).await;
        assert_eq!(code, 200, "not ready with one ledger serving: {body}");
    }
    // The health probe runs on its own interval: wait for it to see the stopped ledger, while
    // the router stays ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = wait_ready_code(&router.http_url, 200).await;
        let states: Vec<&str> = body["ledgers"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["state"].as_str()).collect())
            .unwrap_or_default();
        if states.contains(&"unreachable") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The money: every answer charged once, at the price.
    let transfers = transfers_of(&second.url, &funded.alice.email).await;
    let captured: Vec<_> = transfers
        .iter()
        .filter(|t| t.status() == TransferStatus::Completed)
        .collect();
    assert_eq!(captured.len(), answered);
    assert!(captured.iter().all(|t| t.captured_micros == PRICE));
    assert_eq!(
        account(&second.url, &funded.alice.email)
            .await
            .balance_micros,
        FUNDS - PRICE * answered as i64
    );
    assert_consistent(&second.store).await;

    // Both down: not ready, and a paid request is refused as unavailable (not hung).
    second.stop_now().await;
    let body = wait_ready_code(&router.http_url, 503).await;
    assert_eq!(body["ledger"], "unreachable", "{body}");
    let refused = send(1000).await.expect_err("no ledger");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    db.drop_postgres().await;
}

/// `--ledger-url` lists: a dead endpoint first in the list costs nothing once it is backed off,
/// and a list in the config file (array) reads like the comma-separated flag.
#[tokio::test]
async fn dead_endpoint_in_list_is_skipped() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.ledger.url = format!("{}, {}", closed_url(), c.ledger.url);
    })
    .await;
    let mut c = s.client().await;
    for i in 0..6 {
        let mut req = s.request("hi");
        req.request_id = format!("dead-first-{i}");
        let r = c.chat(req).await.expect("answered").into_inner();
        assert_eq!(r.cost_micros, PRICE);
    }
    wait_ready_code(&s.router.http_url, 200).await;
    s.check_invariants().await;
}

/// The same request (same user, same request id) sent to two routers at once: one upstream
/// call, one charge, and both clients get the answer (the second as a replay of the first's).
/// A paid stack whose upstream answers in `mode`, and `n` more routers like its own (same owner,
/// ledger and upstream): replicas behind one load balancer.
async fn replicas(mode: Mode, n: usize) -> (Stack, Vec<RouterHandle>) {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let mut others = Vec::new();
    for _ in 0..n {
        others.push(RouterHandle::start(s.router_config(Pricing::per_request(PRICE))).await);
    }
    s.upstream.set_mode(mode);
    (s, others)
}

#[tokio::test]
async fn duplicate_at_two_routers_calls_upstream_once() {
    let (s, others) = replicas(Mode::Delay(Duration::from_millis(600)), 1).await;
    let (mut a, mut b) = (s.client().await, others[0].client().await);
    for round in 0..3 {
        let mut req: ChatRequest = s.request("same question");
        req.request_id = format!("dup-{round}");
        let hits = s.upstream.hits();
        let (ra, rb) = tokio::join!(a.chat(req.clone()), b.chat(req));
        let ra = ra.expect("first router answers").into_inner();
        let rb = rb.expect("second router answers").into_inner();
        assert_eq!(
            s.upstream.hits() - hits,
            1,
            "round {round}: upstream called twice"
        );
        assert_eq!(ra.transfer_id, rb.transfer_id);
        assert_eq!(ra.message, rb.message);
        assert_eq!((ra.cost_micros, rb.cost_micros), (PRICE, PRICE));
        assert!(
            ra.replay != rb.replay,
            "exactly one of the two is the replay"
        );
    }
    let captured = s
        .transfers()
        .await
        .into_iter()
        .filter(|t| t.status() == TransferStatus::Completed)
        .count();
    assert_eq!(captured, 3);
    assert_eq!(s.alice_money().await.0, FUNDS - 3 * PRICE);
    s.check_invariants().await;
}

/// A duplicate whose client leaves while it waits at the second router for the original's
/// outcome stops waiting, with an `abandoned` row of its own: that router frees the request id
/// at once, so the client's retry there waits for the outcome again and gets the replay. (The
/// wait runs in the request's admission task, which outlives its client; had it gone on, the id
/// stayed "already in progress" at that router until the original's outcome.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_whose_client_left_frees_its_request_id() {
    let patient = |c: &mut syft_router_svc::RouterConfig| {
        if let syft_router_svc::UpstreamConfig::OpenAi(o) = &mut c.upstream {
            o.request_timeout = Duration::from_secs(10);
        }
    };
    let s = Stack::start_with(
        Db::sqlite(),
        Pricing::per_request(PRICE),
        Duration::from_secs(300),
        patient,
    )
    .await;
    let mut config = s.router_config(Pricing::per_request(PRICE));
    patient(&mut config);
    let other = RouterHandle::start(config).await;
    s.upstream.set_mode(Mode::Delay(Duration::from_secs(4)));
    let mut b = other.client().await;
    let mut req: ChatRequest = s.request("same question");
    req.request_id = "left-waiting".into();
    let original = tokio::spawn({
        let (mut a, req) = (s.client().await, req.clone());
        async move { a.chat(req).await }
    });
    // The original holds the key and is in its upstream call.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while s.upstream.hits() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no upstream call");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    chat_given_up(&mut b, req.clone(), Duration::from_millis(200)).await;
    // Asked again until the id is free at b: at once with the fix; not before the original's
    // outcome (4 s) without it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let retry = loop {
        match b.chat(req.clone()).await {
            Err(e) if e.code() == tonic::Code::AlreadyExists => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the id stayed in progress: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answer => break ok(answer),
        }
    };
    let original = original.await.expect("joined");
    let original = original.expect("the original answers").into_inner();
    assert!(retry.replay && !original.replay);
    assert_eq!(retry.transfer_id, original.transfer_id);
    assert_eq!(s.upstream.hits(), 1, "upstream called once");
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    // Besides the refusals of retries that came before b noticed (`duplicate`).
    let mut statuses = s.usage_statuses().await;
    statuses.retain(|s| s != "duplicate");
    statuses.sort();
    assert_eq!(statuses, ["abandoned", "success"]);
    s.check_invariants().await;
}

/// The same request at two routers whose first Authorize both timed out (the ledger's writes wait
/// on a table lock three times the routers' 500 ms ledger timeout) and were asked again: each
/// may have placed the key's hold, and only the attempt id the ledger names tells whose it is.
/// One upstream call, one charge, the other router replays. Before, both took the hold for their
/// own ("an unknown first attempt may have placed it") and both called their upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_whose_first_attempts_timed_out_call_upstream_once() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let impatient = |c: &mut syft_router_svc::RouterConfig| {
        c.ledger.timeout = Duration::from_millis(500);
    };
    let pricing = Pricing::per_request(PRICE);
    let s = Stack::start_with(db, pricing.clone(), Duration::from_secs(300), impatient).await;
    let mut config = s.router_config(pricing);
    impatient(&mut config);
    let other = RouterHandle::start(config).await;
    let (mut a, mut b) = (s.client().await, other.client().await);
    ok(a.chat(s.request("before")).await);
    let mut req: ChatRequest = s.request("same question");
    req.request_id = "both-timed-out".into();
    let unlock = lock_transfers_for(&s.ledger.store, Duration::from_millis(1500)).await;
    let (ra, rb) = tokio::join!(a.chat(req.clone()), b.chat(req));
    unlock.await.expect("unlocked");
    let (ra, rb) = (ok(ra), ok(rb));
    assert_eq!(s.upstream.hits(), 2, "upstream called once for the request");
    assert!(
        ra.replay != rb.replay,
        "exactly one of the two is the replay"
    );
    assert_eq!(
        (&ra.transfer_id, ra.cost_micros),
        (&rb.transfer_id, rb.cost_micros)
    );
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);
    s.finish().await;
}

/// A retry at another router with a *fresh* token of the same user while the original is still
/// in flight (the client gave up on the first router and asked for a new token): the ledger
/// takes the hold as the same request, the second router waits for the original's outcome and
/// replays its answer. One upstream call, one charge; a made-up token in the same race gets no
/// answer and changes nothing.
#[tokio::test]
async fn a_fresh_token_retry_racing_its_original_is_charged_once() {
    // A third router for the forged one: a router refuses a request id it has in flight itself.
    let (s, others) = replicas(Mode::Delay(Duration::from_millis(600)), 2).await;
    let (mut a, mut b) = (s.client().await, others[0].client().await);
    let mut c = others[1].client().await;
    let fresh = issue_token(&s.ledger.url, &s.alice, &s.owner.email).await;
    let mut req: ChatRequest = s.request("same question");
    req.request_id = "fresh-race".into();
    let retry = ChatRequest {
        transaction_token: fresh,
        ..req.clone()
    };
    let forged = ChatRequest {
        transaction_token: "made-up-token".into(),
        ..req.clone()
    };
    let late = |c: &mut syft_proto::router::router_client::RouterClient<_>, r: ChatRequest| {
        let mut c = c.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.chat(r).await
        }
    };
    let (ra, rb, rf) = tokio::join!(a.chat(req), late(&mut b, retry), late(&mut c, forged));
    let ra = ra.expect("the original answers").into_inner();
    let rb = rb.expect("the fresh-token retry answers").into_inner();
    assert!(!ra.replay && rb.replay, "the retry is the replay");
    assert_eq!(
        (&ra.transfer_id, &ra.message),
        (&rb.transfer_id, &rb.message)
    );
    let refused = rf.expect_err("a made-up token gets no answer");
    let codes = [tonic::Code::AlreadyExists, tonic::Code::PermissionDenied];
    assert!(codes.contains(&refused.code()), "{refused:?}");
    assert_eq!(s.upstream.hits(), 1, "upstream called once");
    let captured: Vec<_> = s
        .transfers()
        .await
        .into_iter()
        .filter(|t| t.status() == TransferStatus::Completed)
        .collect();
    assert_eq!(captured.len(), 1);
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    s.check_invariants().await;
}

/// A duplicate whose first attempt fails upstream: the hold is voided, and the waiting router,
/// which did not call its upstream meanwhile, then tries the request itself under the id's next
/// key (a failed request's id is tried again, docs/router.md): the upstream is called once per
/// try, one after the other; both fail, both holds are voided, nothing is charged.
/// Each transfer's ledger key (a request id's tries) and status, by key, once none is pending.
async fn tries(s: &Stack) -> Vec<(String, TransferStatus)> {
    let mut keys: Vec<_> = s
        .wait_no_pending(Duration::from_secs(5))
        .await
        .into_iter()
        .map(|t| (t.idempotency_key.clone(), t.status()))
        .collect();
    keys.sort_by(|x, y| x.0.cmp(&y.0));
    keys
}

#[tokio::test]
async fn duplicate_of_a_failed_request_is_not_charged() {
    let (s, others) = replicas(Mode::Status(400), 1).await;
    let (mut a, mut b) = (s.client().await, others[0].client().await);
    let mut req = s.request("fails");
    req.request_id = "dup-failed".into();
    let (ra, rb) = tokio::join!(a.chat(req.clone()), b.chat(req));
    let codes = [ra.map(|_| ()), rb.map(|_| ())];
    assert!(codes.iter().all(Result::is_err), "{codes:?}");
    assert_eq!(s.upstream.hits(), 2, "one upstream call per try");
    let cancelled = TransferStatus::Cancelled;
    assert_eq!(
        tries(&s).await,
        [
            ("dup-failed".to_string(), cancelled),
            ("dup-failed (attempt 2)".to_string(), cancelled)
        ]
    );
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

/// The retry of a failed request reaches two routers at once: both read the first try as
/// cancelled and go for the same next key, `<id> (attempt 2)`. The ledger places that key once,
/// so one router calls the upstream and the other waits for its outcome and replays it: two
/// upstream calls in all (the failed try and one answer), one charge, the same answer to both.
#[tokio::test]
async fn a_retry_racing_at_two_routers_is_answered_once_and_charged_once() {
    let (s, others) = replicas(Mode::Status(500), 1).await;
    let (mut a, mut b) = (s.client().await, others[0].client().await);
    let mut req = s.request("retried");
    req.request_id = "race-retry".into();
    a.chat(req.clone()).await.expect_err("the first try fails");
    assert_eq!(s.upstream.hits(), 1);

    s.upstream.set_mode(Mode::Delay(Duration::from_millis(600)));
    let (ra, rb) = tokio::join!(a.chat(req.clone()), b.chat(req));
    let ra = ra.expect("first router answers").into_inner();
    let rb = rb.expect("second router answers").into_inner();
    assert_eq!(s.upstream.hits(), 2, "the retry called the upstream twice");
    assert_eq!(ra.transfer_id, rb.transfer_id);
    assert_eq!(ra.message, rb.message);
    assert_eq!((ra.cost_micros, rb.cost_micros), (PRICE, PRICE));
    assert!(ra.replay != rb.replay, "exactly one is the replay");
    assert_eq!(
        tries(&s).await,
        [
            ("race-retry".to_string(), TransferStatus::Cancelled),
            (
                "race-retry (attempt 2)".to_string(),
                TransferStatus::Completed
            )
        ]
    );
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);
    s.check_invariants().await;
}

/// A neighbour behind the router's address sends `limit` wrong secrets: the ledger locks it.
async fn lock_the_address(s: &Stack, limit: usize) {
    for i in 0..limit {
        let mut neighbour = syft_ledger::client::connect_lazy(&s.ledger.url, &format!("wrong-{i}"))
            .expect("client");
        let req = syft_proto::ledger::GetAccountRequest {
            email: s.alice.email.clone(),
        };
        assert!(neighbour.get_account(req).await.is_err());
    }
}

/// A ledger that locks the router's own address (another client behind it sent wrong secrets):
/// the router answers `UNAVAILABLE`, a deployment problem as a refused credential is, and never
/// passes the lock on as the user's quota. Nothing is held or charged.
#[tokio::test]
async fn a_router_whose_address_the_ledger_locked_is_unavailable() {
    let s = locking_after(2).await;
    let mut c = s.client().await;
    ok(c.chat(s.request("before")).await);
    lock_the_address(&s, 2).await;
    let err = c.chat(s.request("after")).await.expect_err("locked");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Read from the database: the test's own clients share the locked address.
    let alice = s.ledger.store.account_by_email(&s.alice.email).await;
    let alice = alice.expect("read").expect("alice");
    assert_eq!((alice.balance.get(), alice.held.get()), (FUNDS - PRICE, 0));
    assert_consistent(&s.ledger.store).await;
}

/// A router asking longer holds than its ledger grants (`ledger.hold_ttl_seconds` above the
/// ledger's `--max-hold-ttl`) failed every paid request as the user's invalid request (400). The
/// ledger's refusal says its longest (`HOLD_TTL_OUT_OF_RANGE`), and the router places holds that
/// long, from the first request on: both are served, each charged once.
#[tokio::test]
async fn a_router_asking_longer_holds_than_its_ledger_grants_places_the_longest() {
    let s = Stack::start_with_configs(
        Pricing::per_request(PRICE),
        |l| {
            l.hold_ttl = Duration::from_secs(60);
            l.max_hold_ttl = Duration::from_secs(120);
        },
        |r| r.ledger.hold_ttl_seconds = Some(3_600),
    )
    .await;
    let mut c = s.client().await;
    ok(c.chat(s.request("first")).await);
    ok(c.chat(s.request("second")).await);
    let transfers = s.transfers().await;
    assert_eq!(transfers.len(), 2, "{transfers:?}");
    for t in &transfers {
        assert_eq!(t.status(), TransferStatus::Completed, "{t:?}");
        let life = t.expires_at_unix_micros - t.created_at_unix_micros;
        assert_eq!(life, 120_000_000, "{t:?}");
    }
    s.assert_spent(2 * PRICE).await;
    assert_consistent(&s.ledger.store).await;
}

/// The lock starts between a request's hold and its capture (the upstream is still answering):
/// the capture is refused, so the answer is withheld and the user gets `UNAVAILABLE`; the router
/// cannot void either, and the hold runs out at its expiry. The user is charged nothing for it.
#[tokio::test]
async fn a_lock_between_hold_and_capture_withholds_the_answer_and_charges_nothing() {
    let s = Stack::start_with_ledger(Pricing::per_request(PRICE), |c| {
        c.auth_failures_per_address = 2;
        c.hold_ttl = Duration::from_secs(2);
        c.sweep_interval = Duration::from_millis(100);
    })
    .await;
    let mut c = s.client().await;
    ok(c.chat(s.request("before")).await);
    // Long enough to lock the address meanwhile on a loaded machine, inside the kit's 1.5 s
    // upstream timeout.
    s.upstream
        .set_mode(Mode::Delay(Duration::from_millis(1200)));
    let mut racing = c.clone();
    let request = s.request("during");
    let call = tokio::spawn(async move { racing.chat(request).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.upstream.hits() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream not called"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The hold is placed and the upstream is answering: lock the router's address now.
    let held = s.ledger.store.account_by_email(&s.alice.email).await;
    assert_eq!(held.expect("read").expect("alice").held.get(), PRICE);
    lock_the_address(&s, 2).await;
    let err = call.await.expect("task").expect_err("capture refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(s.upstream.hits(), 2, "the upstream answered once");
    // The hold expires and the sweep releases it: only the first request was charged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let alice = s.ledger.store.account_by_email(&s.alice.email).await;
        let alice = alice.expect("read").expect("alice");
        assert_eq!(
            alice.balance.get(),
            FUNDS - PRICE,
            "charged for a withheld answer"
        );
        if alice.held.get() == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hold never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_consistent(&s.ledger.store).await;
}

/// A second router on this machine started with a wrong secret (the ledger's lock counts per
/// address, and both routers share 127.0.0.1): once its check finds the secret rejected, it
/// sends the ledger nothing on its users' behalf and tries the secret again only every 30 s.
/// It used to send every paid request's Authorize (and every refusal's row), each a wrong
/// credential: a few of them locked the address, and the healthy router beside it failed every
/// paid request for five minutes while saying it was ready.
#[tokio::test]
async fn a_router_with_a_rejected_secret_does_not_lock_out_its_neighbours() {
    let s = locking_after(3).await;
    let bad = another_router(&s, "not-the-secret-0123456789").await;
    wait_readyz(&bad.http_url, "owner", "secret_rejected").await;
    let unconfirmed_before = refusal_rows_unconfirmed(&bad.http_url).await;
    let mut refused = bad.client().await;
    for i in 0..10 {
        unavailable(&mut refused, s.request(&format!("bad {i}"))).await;
        // Nor does asking what a user has left look the token up with the rejected secret.
        let ask = syft_proto::router::GetLimitsRequest {
            user_email: s.alice.email.clone(),
            service: String::new(),
            transaction_token: s.token.clone(),
        };
        let err = refused.get_limits(ask).await.expect_err("not ready");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }
    // The refusals' rows, not sent, are counted as rows not confirmed (the count operators watch
    // for lost rows stayed 0 while none was recorded).
    let unconfirmed = refusal_rows_unconfirmed(&bad.http_url).await;
    assert!(
        unconfirmed >= unconfirmed_before + 10,
        "{unconfirmed_before} -> {unconfirmed}"
    );
    // Past the probe's next ticks too: it does not try the rejected secret every second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = s.client().await;
    ok(c.chat(s.request("the healthy router")).await);
    s.assert_captured_once(PRICE).await;
}

/// The router's count of refusal rows the ledger did not confirm (process-wide).
async fn refusal_rows_unconfirmed(http_url: &str) -> u64 {
    let text = syft_testkit::get_text(&format!("{http_url}/metrics")).await;
    let series = r#"syft_router_usage_rows_unconfirmed_total{row="refusal"} "#;
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A router started while the ledger locks its address is not ready, and says why (it said
/// ready, and failed every paid request).
#[tokio::test]
async fn a_router_whose_address_is_locked_says_so_in_its_readiness() {
    let s = locking_after(2).await;
    lock_the_address(&s, 2).await;
    let router = another_router(&s, &s.owner.secret).await;
    let (code, body) = wait_readyz(&router.http_url, "owner", "address_locked").await;
    assert_eq!(code, 503, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("refuses this router's address"), "{body}");
}

/// The owner changes their password (the router's secret) while the router runs. The first
/// request the ledger refuses for it makes the router stop sending it at once, and say so in its
/// readiness: it used to send every paid request until its owner check a minute later, each a
/// wrong credential counted against the machine's address, and locked its neighbours out.
#[tokio::test]
async fn a_secret_changed_while_the_router_runs_stops_its_calls_at_once() {
    let s = locking_after(5).await;
    wait_readyz(&s.router.http_url, "owner", "verified").await;
    let new_secret = "the-owner-changed-it-0123456789";
    // From another address: setting a chosen password counts against its address.
    let changer = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 9]))
        .build()
        .expect("client");
    let changed = changer
        .put(format!("{}/user/update-password", s.ledger.http_url))
        .basic_auth(&s.owner.email, Some(&s.owner.secret))
        .json(&serde_json::json!({"oldPassword": s.owner.secret, "newPassword": new_secret}))
        .send()
        .await
        .expect("update-password");
    assert_eq!(changed.status(), 200);
    let mut c = s.client().await;
    for i in 0..10 {
        unavailable(&mut c, s.request(&format!("after {i}"))).await;
    }
    let neighbour = another_router(&s, new_secret).await;
    wait_readyz(&neighbour.http_url, "owner", "verified").await;
    let mut n = neighbour.client().await;
    ok(n.chat(s.request("the neighbour")).await);
    s.assert_captured_once(PRICE).await;
    // And its readiness says why, without waiting for the minute's check.
    let (code, _) = wait_readyz(&s.router.http_url, "owner", "secret_rejected").await;
    assert_eq!(code, 503);
    // The old password back: the next check (30 s on) accepts it, and calls go out again.
    let restored = changer
        .put(format!("{}/user/update-password", s.ledger.http_url))
        .basic_auth(&s.owner.email, Some(new_secret))
        .json(&serde_json::json!({"oldPassword": new_secret, "newPassword": s.owner.secret}))
        .send()
        .await
        .expect("update-password");
    assert_eq!(restored.status(), 200);
    let deadline = tokio::time::Instant::now() + syft_router_svc::health::REJECTED_RECHECK * 2;
    while readyz(&s.router.http_url).await.1["owner"] != "verified" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never accepted again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ok(c.chat(s.request("accepted again")).await);
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);
}

/// Sends `req`, which the router must refuse `UNAVAILABLE`.
async fn unavailable(
    c: &mut syft_proto::router::router_client::RouterClient<tonic::transport::Channel>,
    req: ChatRequest,
) {
    let err = c.chat(req).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// Another router of the stack's owner on its ledger and upstream, with `secret`.
async fn another_router(s: &Stack, secret: &str) -> RouterHandle {
    let config = router_config(
        "another",
        &s.owner.email,
        secret,
        &s.ledger.url,
        Pricing::per_request(PRICE),
        Some(&s.upstream.base_url),
    );
    RouterHandle::start(config).await
}

/// `n` paid chats of Funded's Alice, one after another: what each refusal said.
async fn paid_chats(router: &RouterHandle, funded: &Funded, tag: &str, n: usize) -> Vec<String> {
    let mut c = router.client().await;
    let mut failures = Vec::new();
    for i in 0..n {
        let mut req = chat_request(&funded.alice.email, &funded.token, "hi");
        req.model = "test-model".into();
        req.request_id = format!("{tag}-{i}");
        if let Err(s) = c.chat(req).await {
            failures.push(format!("#{i}: {:?} {}", s.code(), s.message()));
        }
    }
    failures
}

/// A funded ledger on `db`, and a second replica of it that has locked this machine's address
/// (a neighbour sent it five wrong secrets; it locks after three).
/// A paid router `name` (its configuration as `tweak` changes it) over `funded`'s ledger and a
/// replica that locked this machine's address ([`with_a_replica_that_locked_this_address`]), and
/// ready.
async fn past_a_locked_replica(
    db: &Db,
    name: &str,
    tweak: impl FnOnce(&mut syft_router_svc::RouterConfig),
) -> (Funded, LedgerServer, FakeUpstream, RouterHandle) {
    let (funded, second) = with_a_replica_that_locked_this_address(db).await;
    let upstream = FakeUpstream::start().await;
    let mut config = over_two(name, &funded, &second.url, &upstream);
    tweak(&mut config);
    let router = RouterHandle::start(config).await;
    wait_ready_code(&router.http_url, 200).await;
    (funded, second, upstream, router)
}

async fn with_a_replica_that_locked_this_address(db: &Db) -> (Funded, LedgerServer) {
    let funded = Funded::start(db, Duration::from_secs(300)).await;
    let mut locking = ledger_config(&db.url);
    locking.auth_failures_per_address = 3;
    let second = LedgerServer::start(locking).await;
    for _ in 0..5 {
        let mut neighbour =
            syft_ledger::client::connect_lazy(&second.url, "a-wrong-secret-0123456789")
                .expect("client");
        let _ = neighbour
            .get_account(syft_proto::ledger::GetAccountRequest {
                email: funded.owner.email.clone(),
            })
            .await;
    }
    (funded, second)
}

/// One replica locked this machine's address (a neighbour sent it wrong secrets; the count is
/// per ledger process): the other takes the router's calls. The lock was answered to the user at
/// once (a failover reviewer's finding: 18 of 20 paid requests refused, upstreams already called,
/// a hold left pending until it expired); it is refused before anything runs, so the call goes
/// on to the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_locked_the_routers_address_is_failed_over() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let (funded, _second, _upstream, router) = past_a_locked_replica(&db, "locked", |_| {}).await;
    let mut failures = paid_chats(&router, &funded, "locked", 8).await;
    let c = router.client().await;
    let results = join_all((0..4).map(|j| {
        let mut c = c.clone();
        let mut req = chat_request(&funded.alice.email, &funded.token, "hi");
        req.model = "test-model".into();
        req.request_id = format!("locked-at-once-{j}");
        async move { c.chat(req).await }
    }))
    .await;
    failures.extend(
        results
            .into_iter()
            .filter_map(|r| r.err())
            .map(|s| s.to_string()),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let transfers = transfers_of(&funded.ledger.url, &funded.alice.email).await;
    assert_eq!(transfers.len(), 12);
    assert!(
        transfers
            .iter()
            .all(|t| t.status() == TransferStatus::Completed),
        "{transfers:?}"
    );
    assert_consistent(&funded.ledger.store).await;
    db.drop_postgres().await;
}

/// `--ledger-url` lists, by mistake, a ledger on another database (where the router's owner is
/// unknown): its refusal of the router's credential was the user's answer, and every request
/// whose call reached it failed. The call goes on to the endpoints that know the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_on_another_database_does_not_refuse_the_routers_requests() {
    let db = Db::sqlite();
    let funded = Funded::start(&db, Duration::from_secs(300)).await;
    let other_db = Db::sqlite();
    let other = LedgerServer::start(ledger_config(&other_db.url)).await;
    let upstream = FakeUpstream::start().await;
    let config = over_two("misconfigured", &funded, &other.url, &upstream);
    let router = RouterHandle::start(config).await;
    wait_ready_code(&router.http_url, 200).await;
    let failures = paid_chats(&router, &funded, "misconfigured", 8).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_consistent(&funded.ledger.store).await;
}

/// A router with a rejected secret and a second ledger endpoint that is down (a replica in
/// maintenance): the refusal must stay the call's answer, not the down endpoint's `UNAVAILABLE`
/// tried after it (a review of the failover fix: the router then went on sending the wrong
/// secret, and the ledger locked the machine's address for its neighbours).
#[tokio::test]
async fn a_rejected_secret_with_one_replica_down_is_still_seen_as_rejected() {
    let s = locking_after(3).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let config = router_config(
        "another",
        &s.owner.email,
        "not-the-secret-0123456789",
        &format!("{},http://{dead}", s.ledger.url),
        Pricing::per_request(PRICE),
        Some(&s.upstream.base_url),
    );
    let bad = RouterHandle::start(config).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let readyz = reqwest::get(format!("{}/readyz", bad.http_url))
        .await
        .expect("readyz");
    let readyz = readyz.text().await.unwrap_or_default();
    let mut refused = bad.client().await;
    let mut answers = Vec::new();
    for i in 0..10 {
        let r = refused.chat(s.request(&format!("bad {i}"))).await;
        answers.push(format!(
            "{:?}",
            r.err().map(|e| (e.code(), e.message().to_string()))
        ));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = s.client().await;
    let healthy = c.chat(s.request("the healthy router")).await;
    assert!(
        healthy.is_ok(),
        "healthy router refused: {:?}\nbad router's readyz: {readyz}\nits answers: {}",
        healthy.err(),
        answers.join("\n")
    );
}

/// A capture's attempt at one replica times out (it waits on a lock, then commits) and the next
/// replica refuses the router (its address locked): the round must end on the unknown outcome,
/// settled by asking again, not on the refusal (a review of the failover fix: the answer was
/// withheld and the user charged all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_that_timed_out_at_one_replica_is_settled_past_a_locked_one() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let (funded, _second, upstream, router) =
        past_a_locked_replica(&db, "capture-slow-then-locked", |c| {
            c.ledger.timeout = Duration::from_millis(500);
        })
        .await;
    let warm = paid_chats(&router, &funded, "warm", 4).await;
    assert!(warm.is_empty(), "{}", warm.join("\n"));
    let mut seen = Vec::new();
    for i in 0..4 {
        let hits = upstream.hits();
        upstream.set_mode(Mode::Delay(Duration::from_millis(1000)));
        let mut c = router.client().await;
        let mut req = chat_request(&funded.alice.email, &funded.token, "hi");
        req.model = "test-model".into();
        req.request_id = format!("capture-slow-{i}");
        let call = tokio::spawn(async move { c.chat(req).await });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while upstream.hits() <= hits {
            assert!(
                tokio::time::Instant::now() < deadline,
                "upstream not called"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The hold is placed and the upstream is answering: the capture will wait on the lock.
        let unlock = lock_transfers_for(&funded.ledger.store, Duration::from_millis(2500)).await;
        let r = call.await.expect("task");
        unlock.await.expect("unlocked");
        upstream.set_mode(Mode::Ok);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let all = transfers_of(&funded.ledger.url, &funded.alice.email).await;
        let key = format!("capture-slow-{i}");
        let mine: Vec<_> = all
            .iter()
            .filter(|t| t.idempotency_key.contains(&key))
            .map(|t| {
                (
                    t.id.clone(),
                    t.idempotency_key.clone(),
                    t.status(),
                    t.captured_micros,
                )
            })
            .collect();
        let alice = funded
            .ledger
            .store
            .account_by_email(&funded.alice.email)
            .await;
        let alice = alice.expect("read").expect("alice");
        seen.push(format!(
            "alice balance {} held {} (FUNDS {FUNDS}, price {PRICE})",
            alice.balance.get(),
            alice.held.get()
        ));
        seen.push(format!(
            "#{i}: {:?} -> {mine:?}",
            r.as_ref().err().map(|e| e.message().to_string())
        ));
        let charged = mine
            .iter()
            .any(|(_, _, s, _)| *s == TransferStatus::Completed);
        assert!(
            r.is_ok() || !charged,
            "the answer was withheld ({:?}) and the user charged: {mine:?}\n{}",
            r.err(),
            seen.join("\n")
        );
    }
}

/// A paid stack whose ledger locks an address out after `failures` wrong credentials.
async fn locking_after(failures: u32) -> Stack {
    Stack::start_with_ledger(Pricing::per_request(PRICE), |c| {
        c.auth_failures_per_address = failures;
    })
    .await
}

/// The configuration of a paid router of `funded`'s owner over two ledger endpoints, `funded`'s
/// own first, and `upstream`.
fn over_two(
    name: &str,
    funded: &Funded,
    second_url: &str,
    upstream: &FakeUpstream,
) -> syft_router_svc::RouterConfig {
    router_config(
        name,
        &funded.owner.email,
        &funded.owner.secret,
        &format!("{},{second_url}", funded.ledger.url),
        Pricing::per_request(PRICE),
        Some(&upstream.base_url),
    )
}
