//! Alert delivery: retries (timeouts, dropped connections, 429 with Retry-After, 5xx), no retry
//! after other 4xx, disabling after persistent failure, a ledger killed before delivery, two
//! replicas, refused endpoint configs, secrets sealed at rest, and the signature checked by the
//! `standardwebhooks` Python package. SQLite and Postgres.

mod alerts_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alerts_support::*;
use syft_ledger::alerts::deliver::Worker;
use syft_proto::ledger as pb;
use syft_testkit::{
    code, ok, signature_matches, Harness, LedgerServer, Reply, WebhookReceiver, ADMIN_KEY, USD,
};
use tonic::Code;

alerts_suite!(
    delivery,
    crate::alerts_support::alerts_on;
    retries_until_delivered_with_one_id,
    an_answer_with_control_characters_is_logged_once,
    an_account_whose_endpoint_hangs_leaves_others_their_slots,
    finished_events_past_their_retention_are_purged,
    killed_ledger_delivers_after_restart_with_the_same_id,
    bad_endpoint_configs_are_refused,
    secrets_are_sealed_and_rotate_with_overlap,
    a_second_rotation_keeps_the_first_rotations_promise,
    a_rotated_secret_signs_after_a_key_change,
    test_events_of_an_endpoint_are_bounded,
    rate_cap_holds_events_back_and_metrics_count_them,
);

alerts_suite!(patient, crate::alerts_patient;
    client_errors_are_not_retried, two_replicas_never_send_one_event_in_parallel,
    a_send_in_flight_counts_against_the_cap);

/// [`alerts_on`], and a receiver gets 5 s to answer: for the tests that count attempts, where a
/// slow answer timing out on a loaded machine would be sent again and counted twice.
fn alerts_patient(c: &mut syft_ledger::LedgerConfig) {
    alerts_support::alerts_on(c);
    c.alerts.request_timeout = Duration::from_secs(5);
}

alerts_suite!(
    by_hand,
    crate::alerts_support::alerts_delivered_by_hand;
    a_capped_backlog_waits_for_its_window_out_of_others_way,
    a_fast_backlog_leaves_other_accounts_their_turn,
    a_failure_long_after_the_last_attempt_starts_the_clock_again,
);

alerts_suite!(
    rebinding,
    crate::alerts_support::alerts_allow_localhost;
    address_is_checked_again_when_sending,
    a_secret_the_key_cannot_open_fails_attempts_that_are_logged,
);

alerts_suite!(
    disabling,
    crate::alerts_support::alerts_disable_fast;
    failing_endpoint_is_disabled_and_the_owner_told,
    a_disabled_endpoint_enabled_again_gets_its_pending_events,
);

async fn test_event(h: &Harness, secret: &str, endpoint: &str) -> String {
    alerts(h, secret)
        .send_test_alert(pb::SendTestAlertRequest {
            endpoint_id: endpoint.into(),
        })
        .await
        .expect("test event")
        .into_inner()
        .event_id
}

async fn retries_until_delivered_with_one_id(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    rx.script(&[
        Reply::RetryAfter(429, 1),
        Reply::Hang,
        Reply::Drop,
        Reply::Status(503),
    ]);
    let id = test_event(&h, &alice, &ep).await;
    let got = rx
        .wait_until(WAIT, "five attempts", |r| {
            r.iter().any(|x| x.reply == Reply::Ok)
        })
        .await;
    let attempts: Vec<_> = got.iter().filter(|r| r.id == id).collect();
    assert_eq!(attempts.len(), 5, "{got:#?}");
    assert!(attempts
        .iter()
        .all(|a| a.valid && a.body == attempts[0].body));
    // Retry-After: 1 wins over the 200 ms schedule.
    let waited = attempts[1].at - attempts[0].at;
    assert!(waited >= Duration::from_millis(950), "{waited:?}");
    // The log, newest first: what each attempt got, the same event id throughout. The worker
    // writes an attempt's entry after the receiver answered it: wait for the last one.
    let log = deliveries_once(&h, &alice, &ep, |log| {
        log.first().map(|d| d.outcome.as_str()) == Some("DELIVERED")
    })
    .await;
    let seen: Vec<_> = log
        .iter()
        .map(|d| (d.outcome.as_str(), d.status_code))
        .collect();
    assert_eq!(
        seen,
        [
            ("DELIVERED", Some(200)),
            ("RETRY", Some(503)),
            ("RETRY", None),
            ("RETRY", None),
            ("RETRY", Some(429)),
        ]
    );
    assert!(log.iter().all(|d| d.event_id == id));
    assert!(
        log[2].error.contains("dropped") || log[2].error.contains("connection"),
        "{:?}",
        log[2]
    );
    assert!(log[3].error.contains("timed out"), "{:?}", log[3]);
    assert!(log[1].next_attempt_at_unix_micros.is_some());
    h
}

async fn client_errors_are_not_retried(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    rx.set_default(Reply::Status(400));
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    test_event(&h, &alice, &ep).await;
    rx.wait_until(WAIT, "one attempt", |r| !r.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.received().len(), 1, "a 400 is final");
    let log = deliveries(&h, &alice, &ep).await;
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].outcome.as_str(), log[0].status_code),
        ("GAVE_UP", Some(400))
    );
    assert!(log[0].error.starts_with("HTTP 400"));
    // A 500 forever: the schedule (five retries) ends, then the event is given up.
    let rx2 = WebhookReceiver::start().await;
    rx2.set_default(Reply::Status(500));
    let ep2 = add_rule(&h, &alice, &rx2, balance_low(USD)).await;
    test_event(&h, &alice, &ep2).await;
    rx2.wait_until(WAIT, "six attempts", |r| r.len() >= 6).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx2.received().len(), 6);
    let log = deliveries(&h, &alice, &ep2).await;
    assert_eq!(log[0].outcome, "GAVE_UP");
    h
}

/// An endpoint's answer is kept in the log as printable text: a NUL in it (which Postgres refuses
/// in text) failed the attempt's whole record, so the event was sent again at every lease, first
/// in every claim, and the log showed nothing.
async fn an_answer_with_control_characters_is_logged_once(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    rx.set_default(Reply::Body(400, "bad\0input\x07"));
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    test_event(&h, &alice, &ep).await;
    let log = deliveries_once(&h, &alice, &ep, |log| !log.is_empty()).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(
        (log[0].outcome.as_str(), log[0].error.as_str()),
        ("GAVE_UP", "HTTP 400: bad input ")
    );
    assert_eq!(rx.received().len(), 1, "a 400 is final");
    h
}

/// Alice's endpoint hangs and she sends 20 test events; Bob's one alert still goes out at once,
/// while at most two of hers are in flight (an account holds two of the send slots at most, and
/// each send holds its own slot). Claimed in due order and sent in batches, her events held every
/// slot, and Bob's waited for the whole burst to time out, batch by batch.
async fn an_account_whose_endpoint_hangs_leaves_others_their_slots(h: Harness) -> Harness {
    let (slow, fast) = (
        WebhookReceiver::start().await,
        WebhookReceiver::start().await,
    );
    slow.set_default(Reply::Hang);
    let alice = h.account(ALICE, 10 * USD).await;
    let bob = h.account(BOB, 10 * USD).await;
    let hangs = add_rule(&h, &alice, &slow, balance_low(USD)).await;
    for _ in 0..20 {
        test_event(&h, &alice, &hangs).await;
    }
    slow.wait_until(WAIT, "her first attempts", |r| !r.is_empty())
        .await;
    let answers = add_rule(&h, &bob, &fast, balance_low(USD)).await;
    test_event(&h, &bob, &answers).await;
    fast.wait_until(WAIT, "bob's alert", |r| !r.is_empty())
        .await;
    let hers = slow.received().len();
    assert!(hers <= 4, "{hers} of her events were sent before bob's one");
    h
}

/// Events finished more than 30 days ago are deleted with their attempts; newer ones stay (they
/// were all kept for ever, and the rate cap read every attempt an endpoint ever made).
async fn finished_events_past_their_retention_are_purged(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    let old = test_event(&h, &alice, &ep).await;
    let new = test_event(&h, &alice, &ep).await;
    let delivered =
        |log: &[pb::AlertDelivery]| log.iter().filter(|d| d.outcome == "DELIVERED").count();
    let log = deliveries_once(&h, &alice, &ep, |log| delivered(log) == 2).await;
    assert_eq!(delivered(&log), 2, "{log:?}");
    let month_ago = syft_ledger::store::now_micros() - 31 * 86_400_000_000;
    sqlx::query("UPDATE alert_events SET finished_at = $1 WHERE id = $2")
        .bind(month_ago)
        .bind(&old)
        .execute(h.store.pool())
        .await
        .expect("age the event");
    let worker = Worker::new(h.store.clone(), Arc::new(h.config.alerts.clone()));
    assert_eq!(worker.purge_finished().await.expect("purge"), 1);
    let log = deliveries(&h, &alice, &ep).await;
    let ids: Vec<&str> = log.iter().map(|d| d.event_id.as_str()).collect();
    assert_eq!(ids, [new.as_str()]);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM alert_events WHERE id = $1")
        .bind(&old)
        .fetch_one(h.store.pool())
        .await
        .expect("count");
    assert_eq!(left, 0);
    assert_eq!(worker.purge_finished().await.expect("purge again"), 0);

    // An event written as its endpoint was being removed (the removal did not see it) is given
    // up by the next purge; it stayed pending for ever, never claimed.
    alerts(&h, &alice)
        .remove_alert_endpoint(pb::RemoveAlertEndpointRequest {
            endpoint_id: ep.clone(),
        })
        .await
        .expect("removed");
    sqlx::query(
        "INSERT INTO alert_events (id, endpoint_id, kind, payload, status, next_attempt_at, \
         created_at) VALUES ('late-event', $1, 'test', '{}', 'PENDING', 0, 0)",
    )
    .bind(&ep)
    .execute(h.store.pool())
    .await
    .expect("a late event");
    worker.purge_finished().await.expect("purge");
    let status: String =
        sqlx::query_scalar("SELECT status FROM alert_events WHERE id = 'late-event'")
            .fetch_one(h.store.pool())
            .await
            .expect("status");
    assert_eq!(status, "FAILED");
    h
}

async fn failing_endpoint_is_disabled_and_the_owner_told(h: Harness) -> Harness {
    let (bad, good) = (
        WebhookReceiver::start().await,
        WebhookReceiver::start().await,
    );
    bad.set_default(Reply::Status(500));
    let alice = h.account(ALICE, 10 * USD).await;
    let ep_bad = add_rule(&h, &alice, &bad, balance_low(USD)).await;
    add_rule(&h, &alice, &good, balance_low(USD)).await;
    test_event(&h, &alice, &ep_bad).await;
    let got = good
        .wait_until(WAIT, "endpoint.disabled", |r| {
            !of_type(r, "endpoint.disabled").is_empty()
        })
        .await;
    let notice = &of_type(&got, "endpoint.disabled")[0];
    assert_eq!(notice.json()["data"]["endpoint_id"], ep_bad);
    // Its scheme and host, not its path (an incoming-webhook URL's path is its credential).
    let host = bad.url.split('/').take(3).collect::<Vec<_>>().join("/");
    assert_ne!(host, bad.url, "the receiver's URL has a path");
    assert_eq!(notice.json()["data"]["url"], host);
    assert!(notice.valid);
    let listed = endpoints(&h, &alice).await;
    let bad_row = listed.iter().find(|e| e.id == ep_bad).expect("listed");
    assert!(
        bad_row.disabled_at_unix_micros.is_some() && bad_row.failing_since_unix_micros.is_some()
    );
    // Disabled: no more attempts; /metrics shows it.
    let attempts = bad.received().len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(bad.received().len(), attempts);
    wait_metric(&h, "syft_ledger_alert_endpoints_disabled", |v| v == 1.0).await;
    assert!(metric(&h, "syft_ledger_alert_endpoints_disabled_total").await >= 1.0);
    let notices = "syft_ledger_alert_events_total{type=\"endpoint.disabled\"}";
    assert!(metric(&h, notices).await >= 1.0);
    // A test event to it is refused: it would never be delivered.
    let refused = alerts(&h, &alice)
        .send_test_alert(pb::SendTestAlertRequest {
            endpoint_id: ep_bad.clone(),
        })
        .await;
    assert_eq!(code(refused), Code::FailedPrecondition);
    h
}

/// An endpoint disabled after failing is enabled again once its receiver works, and the events
/// pending since are delivered. Nothing could enable one: the only way back was to remove it,
/// which gave those events up (a receiver down past `--alerts-disable-after` lost its alerts).
async fn a_disabled_endpoint_enabled_again_gets_its_pending_events(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    rx.set_default(Reply::Status(500));
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    let event = test_event(&h, &alice, &ep).await;
    for _ in 0..100 {
        let listed = endpoints(&h, &alice).await;
        if listed
            .iter()
            .any(|e| e.id == ep && e.disabled_at_unix_micros.is_some())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let disabled = endpoints(&h, &alice).await;
    assert!(
        disabled[0].disabled_at_unix_micros.is_some(),
        "{disabled:?}"
    );
    assert_eq!(disabled[0].pending_events, 1, "the test event waits");
    rx.set_default(Reply::Ok);
    let enabled = ok(enable(&h, &alice, &ep).await)
        .endpoint
        .expect("endpoint");
    assert_eq!(
        (
            enabled.disabled_at_unix_micros,
            enabled.failing_since_unix_micros
        ),
        (None, None)
    );
    let got = rx
        .wait_until(WAIT, "the pending event", |r| {
            r.iter()
                .any(|d| d.id == event && matches!(d.reply, Reply::Ok))
        })
        .await;
    assert!(got.iter().any(|d| d.id == event && d.valid));
    for _ in 0..100 {
        if endpoints(&h, &alice).await[0].pending_events == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(endpoints(&h, &alice).await[0].pending_events, 0);
    // Another's endpoint is not found, enabled or not.
    let bob = h.account("bob@example.com", 0).await;
    assert_eq!(code(enable(&h, &bob, &ep).await), Code::NotFound);
    h
}

/// `EnableAlertEndpoint` of `endpoint` as `secret`.
async fn enable(
    h: &Harness,
    secret: &str,
    endpoint: &str,
) -> Result<tonic::Response<pb::EnableAlertEndpointResponse>, tonic::Status> {
    let request = pb::EnableAlertEndpointRequest {
        endpoint_id: endpoint.into(),
    };
    alerts(h, secret).enable_alert_endpoint(request).await
}

async fn killed_ledger_delivers_after_restart_with_the_same_id(mut h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    rx.set_default(Reply::Drop);
    let (alice, bob, token) = alice_and_bob(&h, 10 * USD).await;
    add_rule(&h, &alice, &rx, balance_low(5 * USD)).await;
    spend(&h, &bob, &token, 6 * USD, "k1").await;
    let got = rx
        .wait_until(WAIT, "a failed attempt", |r| !r.is_empty())
        .await;
    let id = got[0].id.clone();
    // Killed (no graceful stop) with the event committed but undelivered.
    h.server.take().expect("server").kill();
    rx.set_default(Reply::Ok);
    h.server = Some(LedgerServer::start(h.config.clone()).await);
    let got = rx
        .wait_until(WAIT, "delivery after restart", |r| {
            r.iter().any(|x| x.reply == Reply::Ok)
        })
        .await;
    let delivered: Vec<_> = got.iter().filter(|x| x.reply == Reply::Ok).collect();
    assert_eq!(delivered[0].id, id, "the same event, the same id");
    assert!(delivered[0].valid);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ids: std::collections::HashSet<_> = rx.received().iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), 1, "the restart fired no second event");
    h
}

async fn two_replicas_never_send_one_event_in_parallel(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    rx.set_delay(Duration::from_millis(150));
    let second = LedgerServer::start(h.config.clone()).await;
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(test_event(&h, &alice, &ep).await);
    }
    rx.wait_until(WAIT, "20 deliveries", |r| r.len() >= 20)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = rx.received();
    assert_eq!(received.len(), 20, "each event once, none twice");
    let mut got: Vec<_> = received.iter().map(|r| r.id.clone()).collect();
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    assert_eq!(rx.max_parallel_same_id(), 1);
    second.stop().await;
    h
}

async fn bad_endpoint_configs_are_refused(h: Harness) -> Harness {
    let alice = h.account(ALICE, 10 * USD).await;
    let bob = h.account(BOB, 0).await;
    let mut client = alerts(&h, &alice);
    let good_url = WebhookReceiver::start().await.url;
    let request = |url: &str, rules: Vec<pb::AlertRule>| pb::AddAlertEndpointRequest {
        url: url.into(),
        rules,
        ..Default::default()
    };
    let rule = |event: i32, threshold: i64| pb::AlertRule {
        event,
        threshold_micros: threshold,
        ..Default::default()
    };
    let balance = pb::AlertEvent::BalanceLow as i32;
    let cases = [
        ("not a url", request("not a url", vec![balance_low(USD)])),
        (
            "http to a host not allowed",
            request("http://hooks.example.com/x", vec![balance_low(USD)]),
        ),
        (
            "private address",
            request("https://192.168.1.10/x", vec![balance_low(USD)]),
        ),
        (
            "metadata address",
            request("https://169.254.169.254/x", vec![balance_low(USD)]),
        ),
        (
            "loopback by name",
            request("https://localhost:9/x", vec![balance_low(USD)]),
        ),
        (
            "huge threshold",
            request(&good_url, vec![rule(balance, i64::MAX)]),
        ),
        (
            "negative threshold",
            request(&good_url, vec![rule(balance, -5)]),
        ),
        (
            // 1,421 bytes as sent, 4,221 once each "é" is percent-encoded as stored: it was
            // accepted, then every event to it was given up ("url is longer than 2048").
            "a url past the cap once encoded",
            request(
                &format!("{good_url}/{}", "é".repeat(700)),
                vec![balance_low(USD)],
            ),
        ),
        ("unknown event", request(&good_url, vec![rule(99, USD)])),
        ("no event", request(&good_url, vec![rule(0, USD)])),
        ("no rules", request(&good_url, vec![])),
        (
            "steps not increasing",
            request(
                &good_url,
                vec![pb::AlertRule {
                    event: pb::AlertEvent::BudgetThreshold as i32,
                    steps: vec![80, 50],
                    ..Default::default()
                }],
            ),
        ),
    ];
    for (what, req) in cases {
        let result = client.add_alert_endpoint(req).await;
        assert_eq!(code(result), Code::InvalidArgument, "{what}");
    }
    assert!(
        endpoints(&h, &alice).await.is_empty(),
        "nothing half-written"
    );
    // Someone else's endpoint does not exist for you; the admin must name an account.
    let rx = WebhookReceiver::start().await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    let removed = alerts(&h, &bob)
        .remove_alert_endpoint(pb::RemoveAlertEndpointRequest {
            endpoint_id: ep.clone(),
        })
        .await;
    assert_eq!(code(removed), Code::NotFound);
    let admin_add = alerts(&h, ADMIN_KEY)
        .add_alert_endpoint(request(&good_url, vec![balance_low(USD)]))
        .await;
    // A missing field, named (it was PERMISSION_DENIED, "needs an account's credentials").
    assert_eq!(code(admin_add), Code::InvalidArgument);
    let mut for_bob = request(&good_url, vec![balance_low(USD)]);
    for_bob.account_email = BOB.into();
    let added = alerts(&h, ADMIN_KEY)
        .add_alert_endpoint(for_bob)
        .await
        .expect("admin adds");
    assert_eq!(
        added.into_inner().endpoint.expect("endpoint").account_email,
        BOB
    );
    h
}

async fn secrets_are_sealed_and_rotate_with_overlap(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let (ep, old) = add_balance_low(&h, &alice, &rx.url).await;
    // A dump of the table does not contain the secret, nor its base64 key.
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT secret_sealed, url FROM alert_endpoints")
            .fetch_all(h.store.pool())
            .await
            .expect("dump");
    let key_part = old.trim_start_matches("whsec_");
    assert!(rows.iter().all(|(s, _)| !s.contains(key_part)));
    // Rotation: during the overlap both secrets sign; a receiver knowing either verifies.
    let rotated = rotate(&h, &alice, &ep, 3600).await;
    assert_ne!(rotated.secret, old);
    rx.set_secrets(&[&old]);
    test_event(&h, &alice, &ep).await;
    let got = rx
        .wait_until(WAIT, "signed with both", |r| !r.is_empty())
        .await;
    assert!(
        got[0].valid,
        "the old secret still verifies during the overlap"
    );
    assert_eq!(got[0].signature.split(' ').count(), 2);
    rx.set_secrets(&[&rotated.secret]);
    test_event(&h, &alice, &ep).await;
    let got = rx.wait_until(WAIT, "second", |r| r.len() >= 2).await;
    assert!(got[1].valid, "the new secret verifies");
    // Overlap 0: the old secret stops at once.
    rotate(&h, &alice, &ep, 0).await;
    test_event(&h, &alice, &ep).await;
    let got = rx.wait_until(WAIT, "third", |r| r.len() >= 3).await;
    assert!(!got[2].valid, "a rotated-out secret no longer verifies");
    assert_eq!(got[2].signature.split(' ').count(), 1);
    let _ = Instant::now();
    h
}

/// A rotation answers that the previous secret signs until the end of its overlap. A second
/// rotation within it (a retry, a second operator) used to replace that secret at once: receivers
/// still on it, as promised, refused every event. It is refused now, naming the overlap's end;
/// the older secret still signs; an overlap of 0 ends every earlier secret, as asked.
async fn a_second_rotation_keeps_the_first_rotations_promise(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let (ep, first) = add_balance_low(&h, &alice, &rx.url).await;
    let rotated = rotate(&h, &alice, &ep, 3600).await;
    let again = pb::RotateAlertSecretRequest {
        endpoint_id: ep.clone(),
        overlap_seconds: 3600,
    };
    let refused = alerts(&h, &alice).rotate_alert_secret(again).await;
    let refused = refused.expect_err("a rotation within an overlap");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("signs until"), "{refused:?}");
    rx.set_secrets(&[&first]);
    test_event(&h, &alice, &ep).await;
    let got = rx.wait_until(WAIT, "a delivery", |r| !r.is_empty()).await;
    let r = &got[0];
    let signs =
        |s: &str| signature_matches(&[s.to_string()], &r.id, &r.timestamp, &r.body, &r.signature);
    assert!(signs(&first) && signs(&rotated.secret), "{r:?}");
    let last = rotate(&h, &alice, &ep, 0).await;
    rx.set_secrets(&[&first, &rotated.secret]);
    test_event(&h, &alice, &ep).await;
    let got = rx
        .wait_until(WAIT, "a second delivery", |r| r.len() >= 2)
        .await;
    assert!(
        !got[1].valid,
        "an overlap of 0 ends every earlier secret: {:?}",
        got[1]
    );
    assert!(
        signature_matches(
            &[last.secret],
            &got[1].id,
            &got[1].timestamp,
            &got[1].body,
            &got[1].signature
        ),
        "{:?}",
        got[1]
    );
    h
}

/// After `--alerts-key` changed, the secret cannot be opened; rotating it (what docs/alerts.md
/// says to do) answered a fresh secret, but the unreadable one was kept for the overlap and made
/// every attempt fail ("cannot sign the delivery") until its end, 24 h by default. It is not
/// kept: the new secret signs at once. An overlap running from a rotation before the change
/// does not hold it back (that secret cannot sign either: a diff review's finding).
async fn a_rotated_secret_signs_after_a_key_change(mut h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let (ep, _) = add_balance_low(&h, &alice, &rx.url).await;
    rotate(&h, &alice, &ep, 3600).await;
    h.server.take().expect("server").stop().await;
    let other = syft_ledger::alerts::SealKey::from_passphrase("another-alerts-key-987654321");
    h.config.alerts.key = Some(std::sync::Arc::new(other.expect("key")));
    h.server = Some(LedgerServer::start(h.config.clone()).await);
    let rotated = rotate(&h, &alice, &ep, 3600).await;
    rx.set_secrets(&[&rotated.secret]);
    test_event(&h, &alice, &ep).await;
    let got = rx.wait_until(WAIT, "a delivery", |r| !r.is_empty()).await;
    assert!(got[0].valid, "{:?}", got[0]);
    assert_eq!(got[0].signature.split(' ').count(), 1, "{:?}", got[0]);
    let log = deliveries(&h, &alice, &ep).await;
    assert!(log.iter().all(|d| d.outcome == "DELIVERED"), "{log:#?}");
    h
}

/// Test events check a receiver; each one is an outbox row delivered and retried later, and
/// 2,000 calls in a row from one account were all queued. At most `max_pending_tests` wait at
/// once per endpoint (10 by default; the tests' ledgers allow 1,000 for their backlogs, 3 here):
/// the next is refused (`RESOURCE_EXHAUSTED`) with nothing written.
async fn test_events_of_an_endpoint_are_bounded(mut h: Harness) -> Harness {
    h.server.take().expect("server").stop().await;
    h.config.alerts.max_pending_tests = 3;
    h.server = Some(LedgerServer::start(h.config.clone()).await);
    let rx = WebhookReceiver::start().await;
    // A receiver that answers nothing in time: each event stays pending, to be retried.
    rx.set_delay(Duration::from_secs(30));
    let alice = h.account(ALICE, 10 * USD).await;
    let (ep, _) = add_balance_low(&h, &alice, &rx.url).await;
    for _ in 0..3 {
        test_event(&h, &alice, &ep).await;
    }
    let more = pb::SendTestAlertRequest {
        endpoint_id: ep.clone(),
    };
    let refused = alerts(&h, &alice).send_test_alert(more).await;
    assert_eq!(code(refused), Code::ResourceExhausted);
    let pending = endpoints(&h, &alice).await[0].pending_events;
    assert_eq!(pending, 3);
    h
}

/// Two rotations of one endpoint at once (both read the current secret, then wait on the row's
/// lock to write): one gets a secret, which signs with the first one during the overlap; the
/// other is refused with nothing changed. Before, both succeeded keeping the first secret as the
/// previous one, and the secret the first writer returned signed nothing. Postgres only: there a
/// row lock makes the interleaving certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rotations_keep_a_chain() {
    let Some(h) = Harness::with(true, alerts_on).await else {
        return;
    };
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let (ep, first) = add_balance_low(&h, &alice, &rx.url).await;
    let mut lock = h.store.pool().begin().await.expect("begin");
    sqlx::query("SELECT id FROM alert_endpoints WHERE id = $1 FOR UPDATE")
        .bind(&ep)
        .execute(&mut *lock)
        .await
        .expect("lock the endpoint's row");
    let rotations: Vec<_> = (0..2)
        .map(|_| {
            let mut c = alerts(&h, &alice);
            let rotate = pb::RotateAlertSecretRequest {
                endpoint_id: ep.clone(),
                overlap_seconds: 3600,
            };
            tokio::spawn(async move { c.rotate_alert_secret(rotate).await })
        })
        .collect();
    // This test's database only: other tests' lock waits on the shared server must not count.
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                   AND datname = current_database() AND query LIKE 'UPDATE alert_endpoints%'";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar(waiting)
            .fetch_one(h.store.pool())
            .await
            .expect("activity");
        if n == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} rotations wait on the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.rollback().await.expect("unlock");
    let mut rotated = Vec::new();
    for r in rotations {
        match r.await.expect("task") {
            Ok(r) => rotated.push(r.into_inner().secret),
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        }
    }
    assert_eq!(rotated.len(), 1, "one rotation wins, the other is refused");
    test_event(&h, &alice, &ep).await;
    let got = rx.wait_until(WAIT, "a delivery", |r| !r.is_empty()).await;
    let r = &got[0];
    let signs =
        |s: &str| signature_matches(&[s.to_string()], &r.id, &r.timestamp, &r.body, &r.signature);
    assert!(signs(&rotated[0]) && signs(&first), "{r:?}");
    h.finish().await;
}

/// An endpoint of the account of `secret` on a receiver of its own, capped at `per_minute`
/// attempts a minute: the receiver and the endpoint's id.
async fn capped_endpoint(h: &Harness, secret: &str, per_minute: u32) -> (WebhookReceiver, String) {
    let receiver = WebhookReceiver::start().await;
    let added = alerts(h, secret)
        .add_alert_endpoint(pb::AddAlertEndpointRequest {
            url: receiver.url.clone(),
            rules: vec![balance_low(USD)],
            rate_per_minute: Some(per_minute),
            ..Default::default()
        })
        .await
        .expect("add")
        .into_inner();
    receiver.set_secrets(&[&added.secret]);
    (receiver, added.endpoint.expect("endpoint").id)
}

/// An endpoint capped at 2 attempts a minute gets 2 of 5 events now; the other 3 wait (no attempt
/// spent, nothing given up) and `/metrics` shows the queue, the cap, the attempts and the retries.
async fn rate_cap_holds_events_back_and_metrics_count_them(h: Harness) -> Harness {
    let alice = h.account(ALICE, 10 * USD).await;
    let (capped, ep) = capped_endpoint(&h, &alice, 2).await;
    let flaky = WebhookReceiver::start().await;
    let series = |name: &str, label: &str| format!("syft_ledger_alert_{name}{{{label}}}");
    let tests = series("events_total", "type=\"test\"");
    let retried = series("deliveries_total", "outcome=\"retry\"");
    let delivered = series("deliveries_total", "outcome=\"delivered\"");
    let before = [
        metric(&h, &tests).await,
        metric(&h, &retried).await,
        metric(&h, &delivered).await,
        metric(&h, "syft_ledger_alert_retries_total").await,
        metric(&h, "syft_ledger_alert_rate_capped_total").await,
    ];

    for _ in 0..5 {
        test_event(&h, &alice, &ep).await;
    }
    capped
        .wait_until(WAIT, "two deliveries", |r| r.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(capped.received().len(), 2, "the cap holds the rest back");
    assert!(capped.received().iter().all(|r| r.valid));
    assert_eq!(
        deliveries(&h, &alice, &ep).await.len(),
        2,
        "no attempt spent"
    );
    let listed = endpoints(&h, &alice).await;
    assert_eq!(listed[0].pending_events, 3);
    wait_metric(&h, "syft_ledger_alert_queue_depth", |v| v == 3.0).await;
    wait_metric(&h, "syft_ledger_alert_oldest_pending_seconds", |v| v >= 1.0).await;
    assert!(metric(&h, "syft_ledger_alert_rate_capped_total").await > before[4]);

    // One failure then success on another endpoint: a retry, counted as such.
    flaky.script(&[Reply::Status(503)]);
    let ep2 = add_rule(&h, &alice, &flaky, balance_low(USD)).await;
    test_event(&h, &alice, &ep2).await;
    flaky
        .wait_until(WAIT, "retried", |r| r.iter().any(|x| x.reply == Reply::Ok))
        .await;
    wait_metric(&h, &delivered, |v| v >= before[2] + 3.0).await;
    assert!(metric(&h, &tests).await >= before[0] + 6.0);
    assert!(metric(&h, &retried).await >= before[1] + 1.0);
    assert!(metric(&h, "syft_ledger_alert_retries_total").await >= before[3] + 1.0);
    h
}

/// An endpoint capped at one attempt a minute whose first send is still waiting for its answer
/// gets no second one: the send in flight counts against the cap. It counted for nothing until
/// its attempt was recorded, so the next claim sent the next event at once.
async fn a_send_in_flight_counts_against_the_cap(h: Harness) -> Harness {
    let alice = h.account(ALICE, 10 * USD).await;
    let (capped, ep) = capped_endpoint(&h, &alice, 1).await;
    capped.set_default(Reply::Hang);
    test_event(&h, &alice, &ep).await;
    capped
        .wait_until(WAIT, "the first send", |r| !r.is_empty())
        .await;
    test_event(&h, &alice, &ep).await;
    // Many claims meanwhile (one every 50 ms), the first answer still awaited (5 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(capped.received().len(), 1, "one attempt a minute");
    h
}

/// A backlog of events for an endpoint over its cap is put off, all of it at once, to when the
/// endpoint's window has room again (its first attempt a minute old). It used to be put off a
/// second at a time and a claim at a time: every claim filled with events that could not be sent,
/// each written again every second, while other accounts' events waited their turn. Deliveries
/// are run by hand here (`deliver_due`, one claim each) so that each claim can be looked at.
async fn a_capped_backlog_waits_for_its_window_out_of_others_way(h: Harness) -> Harness {
    let worker = Worker::new(h.store.clone(), Arc::new(h.config.alerts.clone()));
    let alice = h.account(ALICE, 10 * USD).await;
    let bob = h.account(BOB, 10 * USD).await;
    let (capped, ep) = capped_endpoint(&h, &alice, 1).await;
    let other = WebhookReceiver::start().await;
    for _ in 0..30 {
        test_event(&h, &alice, &ep).await;
    }
    assert_eq!(
        worker.deliver_due().await.expect("deliver"),
        2,
        "a claim takes an account's share of the slots (store::ACCOUNT_IN_FLIGHT)"
    );
    assert_eq!(capped.received().len(), 1, "one within the cap");
    let first = deliveries(&h, &alice, &ep).await;
    assert_eq!(first.len(), 1);
    // The claim's clock, read just before the attempt started, a minute on (not a second).
    let window_ends = first[0].started_at_unix_micros + 59_000_000;
    let due: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT next_attempt_at, attempts FROM alert_events \
         WHERE endpoint_id = $1 AND status = 'PENDING'",
    )
    .bind(&ep)
    .fetch_all(h.store.pool())
    .await
    .expect("events");
    assert_eq!(due.len(), 29);
    assert!(
        due.iter()
            .all(|(at, attempts)| *at > window_ends && *attempts == 0),
        "every waiting event is due after the window ({window_ends}): {due:?}"
    );

    let bobs = add_rule(&h, &bob, &other, balance_low(USD)).await;
    test_event(&h, &bob, &bobs).await;
    assert_eq!(
        worker.deliver_due().await.expect("deliver"),
        1,
        "the next claim holds bob's event alone"
    );
    assert_eq!(other.received().len(), 1);
    assert_eq!(capped.received().len(), 1);
    h
}

/// An endpoint whose last attempt failed four days ago, not tried since, and failing once more
/// now is not disabled: nothing says it kept failing in between (no events came). Its failure
/// clock starts again. It used to be disabled at once, the old failure starting its clock. One
/// whose attempts kept failing those four days (the last an hour ago) is disabled.
async fn a_failure_long_after_the_last_attempt_starts_the_clock_again(h: Harness) -> Harness {
    let worker = Worker::new(h.store.clone(), Arc::new(h.config.alerts.clone()));
    let bad = WebhookReceiver::start().await;
    bad.set_default(Reply::Status(500));
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &bad, balance_low(USD)).await;
    let hours = |n: i64| n * 3_600_000_000;
    for (last_attempt_hours_ago, disabled) in [(96, false), (1, true)] {
        test_event(&h, &alice, &ep).await;
        worker.deliver_due().await.expect("deliver");
        // Four days of failure behind the endpoint, its attempts moved back, its events due now.
        let shift = [
            "UPDATE alert_endpoints SET failing_since = failing_since - $1 WHERE id = $2",
            "UPDATE alert_deliveries SET started_at = started_at - $1 WHERE endpoint_id = $2",
            "UPDATE alert_events SET next_attempt_at = next_attempt_at - $1 WHERE endpoint_id = $2",
        ];
        for (sql, by) in shift.into_iter().zip([96, last_attempt_hours_ago, 96]) {
            sqlx::query(sql)
                .bind(hours(by))
                .bind(&ep)
                .execute(h.store.pool())
                .await
                .expect("move back");
        }
        worker.deliver_due().await.expect("deliver");
        let listed = endpoints(&h, &alice).await;
        assert_eq!(
            listed[0].disabled_at_unix_micros.is_some(),
            disabled,
            "last attempt {last_attempt_hours_ago} h ago: {listed:?}"
        );
    }
    h
}

/// One account's backlog of 300 test events at a receiver that answers at once, with the highest
/// cap: bob's one alert, due after all of them, goes out in the next claim. A claim read the 256
/// oldest due events, all alice's, took her share of 2 and found no one else's: bob waited until
/// her backlog drained (at 2 events a second, 10,000 of them silenced every account for 80
/// minutes).
async fn a_fast_backlog_leaves_other_accounts_their_turn(h: Harness) -> Harness {
    let worker = Worker::new(h.store.clone(), Arc::new(h.config.alerts.clone()));
    let alice = h.account(ALICE, 10 * USD).await;
    let bob = h.account(BOB, 10 * USD).await;
    let (hers, ep) = capped_endpoint(&h, &alice, 600).await;
    for _ in 0..300 {
        test_event(&h, &alice, &ep).await;
    }
    let (his, bobs) = capped_endpoint(&h, &bob, 600).await;
    test_event(&h, &bob, &bobs).await;
    assert_eq!(
        worker.deliver_due().await.expect("deliver"),
        3,
        "two of hers, his"
    );
    his.wait_until(WAIT, "bob's alert", |r| r.len() == 1).await;
    assert!(hers.received().len() <= 2);
    h
}

/// DNS rebinding: a name checked when the endpoint was added is resolved and checked again at
/// every send, and the connection goes to the address checked. Here `localhost` was allowed when
/// the endpoint was added; the ledger restarted without it refuses to send to it, though it
/// resolves to 127.0.0.1, an address allowed by IP: what counts is the name the URL gives.
async fn address_is_checked_again_when_sending(mut h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let port = rx.url.rsplit(':').next().unwrap_or_default().to_string();
    let url = format!("https://localhost:{port}");
    let added = alerts(&h, &alice)
        .add_alert_endpoint(pb::AddAlertEndpointRequest {
            url: url.clone(),
            rules: vec![balance_low(USD)],
            ..Default::default()
        })
        .await
        .expect("localhost is allowed when added")
        .into_inner();
    let ep = added.endpoint.expect("endpoint").id;

    h.server.take().expect("server").stop().await;
    h.config.alerts.allowed_hosts = vec!["127.0.0.1".into()];
    h.server = Some(LedgerServer::start(h.config.clone()).await);
    test_event(&h, &alice, &ep).await;
    let log = deliveries_once(&h, &alice, &ep, |log| !log.is_empty()).await;
    assert_eq!(log.len(), 1, "refused once, not retried: {log:#?}");
    assert_eq!(
        (log[0].outcome.as_str(), log[0].status_code),
        ("GAVE_UP", None)
    );
    assert!(
        log[0].error.contains("localhost resolves to")
            && log[0].error.contains("private, loopback or reserved")
            && !log[0].error.contains("127.0.0.1"),
        "refused for its address, before connecting: {:?}",
        log[0].error
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.received().is_empty());
    // The same name is refused when adding on this ledger.
    let again = alerts(&h, &alice)
        .add_alert_endpoint(pb::AddAlertEndpointRequest {
            url,
            rules: vec![balance_low(USD)],
            ..Default::default()
        })
        .await;
    assert_eq!(code(again), Code::InvalidArgument);
    h
}

/// The ledger restarts with another `--alerts-key`, which cannot open the endpoint's sealed
/// signing secret: each delivery attempt fails and is logged, on the retry schedule, until the
/// event is given up; nothing unsigned is sent. (The error used to abort the attempt before it
/// was recorded: the event was claimed again every lease, for ever, and the log stayed empty.)
async fn a_secret_the_key_cannot_open_fails_attempts_that_are_logged(mut h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    h.server.take().expect("server").stop().await;
    let other = syft_ledger::alerts::SealKey::from_passphrase("another-alerts-key-987654321");
    h.config.alerts.key = Some(std::sync::Arc::new(other.expect("key")));
    h.server = Some(LedgerServer::start(h.config.clone()).await);
    test_event(&h, &alice, &ep).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut log = deliveries(&h, &alice, &ep).await;
    while log.iter().all(|d| d.outcome != "GAVE_UP") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        log = deliveries(&h, &alice, &ep).await;
    }
    assert_eq!(log.len(), 6, "the first attempt and five retries: {log:#?}");
    assert!(
        log.iter().all(|d| d.error.contains("cannot sign")),
        "{log:#?}"
    );
    assert!(rx.received().is_empty(), "nothing unsigned is sent");
    h
}
