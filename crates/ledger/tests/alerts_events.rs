//! Alerts fire exactly at their thresholds, once per crossing, and re-arm after recovery; every
//! request a real receiver gets is signed (Standard Webhooks). SQLite and Postgres.

mod alerts_support;

use std::time::Duration;

use alerts_support::*;
use syft_ledger::alerts::evaluate::evaluate_all;
use syft_ledger::store::now_micros;
use syft_proto::ledger as pb;
use syft_testkit::{Harness, WebhookReceiver, USD};

alerts_suite!(
    events,
    crate::alerts_support::alerts_on;
    balance_low_fires_once_per_crossing_and_rearms,
    budget_burst_sends_one_event_per_step,
    spend_errors_expiry_and_digest_fire_at_their_thresholds,
);

alerts_suite!(
    windows,
    crate::alerts_support::alerts_evaluated_by_hand;
    windowed_budgets_fire_once_per_step_and_rearm_each_window,
    an_errors_spike_fires_once_while_its_count_wobbles,
    a_full_endpoint_gets_no_more_events,
);

/// Several evaluations (100 ms apart) pass: time for any duplicate to show up.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

/// The rules evaluated once now, then [`settle`].
async fn evaluated_now(h: &Harness) {
    evaluate_all(&h.store, now_micros())
        .await
        .expect("evaluate");
    settle().await;
}

async fn balance_low_fires_once_per_crossing_and_rearms(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let (alice, bob, token) = alice_and_bob(&h, 10 * USD).await;
    add_rule(&h, &alice, &rx, balance_low(5 * USD)).await;

    // 10 -> 5: exactly at the threshold is not below it.
    spend(&h, &bob, &token, 5 * USD, "k1").await;
    settle().await;
    assert!(of_type(&rx.received(), "balance.low").is_empty());
    // 5 -> 4: below; one event, and staying below (4 -> 3) sends no other.
    spend(&h, &bob, &token, USD, "k2").await;
    let got = rx
        .wait_until(WAIT, "balance.low", |r| {
            !of_type(r, "balance.low").is_empty()
        })
        .await;
    let first = &of_type(&got, "balance.low")[0];
    assert!(first.valid, "signature must verify");
    assert_eq!(first.json()["data"]["available_micros"], 4 * USD);
    assert_eq!(first.json()["data"]["threshold_micros"], 5 * USD);
    assert_eq!(first.json()["data"]["account"], ALICE);
    spend(&h, &bob, &token, USD, "k3").await;
    settle().await;
    assert_eq!(of_type(&rx.received(), "balance.low").len(), 1);

    // 3 -> 5.4: back over the threshold but inside the 10 % hysteresis: not re-armed.
    syft_testkit::deposit(&h.url(), ALICE, 2_400_000).await;
    // Evaluated here as well as by the ledger's own timer: a dip between two of the timer's
    // evaluations is not seen (by design), so on a slow machine the balance could be taken back
    // down before any evaluation saw it up, and the rule was never re-armed.
    evaluated_now(&h).await;
    spend(&h, &bob, &token, 1_000_000, "k4").await;
    settle().await;
    assert_eq!(of_type(&rx.received(), "balance.low").len(), 1);
    // 4.4 -> 6.4 re-arms; 6.4 -> 4.4 fires a second, distinct event.
    syft_testkit::deposit(&h.url(), ALICE, 2 * USD).await;
    evaluated_now(&h).await;
    spend(&h, &bob, &token, 2 * USD, "k5").await;
    let got = rx
        .wait_until(WAIT, "second balance.low", |r| {
            of_type(r, "balance.low").len() == 2
        })
        .await;
    let events = of_type(&got, "balance.low");
    assert_ne!(events[0].id, events[1].id);
    assert!(events.iter().all(|e| e.valid));
    settle().await;
    assert_eq!(of_type(&rx.received(), "balance.low").len(), 2);
    h
}

async fn budget_burst_sends_one_event_per_step(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let limits = pb::IssueTokenRequest {
        spend_limit_micros: Some(USD),
        ..Default::default()
    };
    let (_, bob, token) = budget_watch(&h, &rx, 10 * USD, limits).await;
    // A burst of 100 concurrent one-cent payments uses the whole dollar.
    let payments = (0..100).map(|i| {
        let (h, bob, token) = (&h, bob.clone(), token.clone());
        async move { spend(h, &bob, &token, 10_000, &format!("burst-{i}")).await }
    });
    futures::future::join_all(payments).await;
    let got = rx
        .wait_until(WAIT, "three budget steps", |r| {
            of_type(r, "budget.threshold").len() >= 3
        })
        .await;
    settle().await;
    let events = of_type(&rx.received(), "budget.threshold");
    assert_eq!(events.len(), 3, "one event per step: {got:#?}");
    let mut steps: Vec<i64> = events
        .iter()
        .map(|e| e.json()["data"]["step_percent"].as_i64().unwrap_or(0))
        .collect();
    steps.sort();
    assert_eq!(steps, [50, 80, 100]);
    assert!(events.iter().all(|e| e.valid));
    assert_eq!(events[2].json()["data"]["window"], "lifetime");
    h
}

async fn spend_errors_expiry_and_digest_fire_at_their_thresholds(h: Harness) -> Harness {
    let (rx_alice, rx_bob) = (
        WebhookReceiver::start().await,
        WebhookReceiver::start().await,
    );
    let (alice, bob, token) = alice_and_bob(&h, 10 * USD).await;
    let spend_rule = pb::AlertRule {
        event: pb::AlertEvent::SpendThreshold as i32,
        threshold_micros: 3 * USD,
        ..Default::default()
    };
    let expired_rule = pb::AlertRule {
        event: pb::AlertEvent::HoldsExpired as i32,
        count: 1,
        window_minutes: 60,
        ..Default::default()
    };
    let rules = vec![spend_rule, expired_rule];
    add(&h, &alice, &rx_alice, pb::AlertFormat::Json, rules).await;
    let errors_rule = errors_spike(5);
    let digest_rule = pb::AlertRule {
        event: pb::AlertEvent::DigestDaily as i32,
        hour: 0,
        ..Default::default()
    };
    add(
        &h,
        &bob,
        &rx_bob,
        pb::AlertFormat::Slack,
        vec![errors_rule, digest_rule],
    )
    .await;

    // spend.threshold: 2 USD today is under 3; the third dollar reaches it, once.
    spend(&h, &bob, &token, 2 * USD, "s1").await;
    settle().await;
    assert!(of_type(&rx_alice.received(), "spend.threshold").is_empty());
    spend(&h, &bob, &token, USD, "s2").await;
    rx_alice
        .wait_until(WAIT, "spend.threshold", |r| {
            !of_type(r, "spend.threshold").is_empty()
        })
        .await;

    // errors.spike: three failures are too few requests; a fourth (successful) request makes
    // 75 % of 4, over 50 %. Refusals before any upstream call are not requests of the app's:
    // counted, four of them would make it 3 of 8 (a flood of bad tokens muted an outage).
    // Bob's endpoint speaks Slack.
    let mut bob_client = h.client(&bob);
    let refused = [
        "token_refused",
        "rate_limited",
        "insufficient_funds",
        "budget_exceeded",
    ];
    let answered = ["upstream_error", "timeout", "invalid_response", "success"];
    for (i, status) in refused.iter().chain(&answered).enumerate() {
        if i == refused.len() + 3 {
            settle().await;
            assert!(rx_bob.received().is_empty(), "fired before min_requests");
        }
        bob_client
            .record_usage(pb::RecordUsageRequest {
                usage: Some(pb::Usage {
                    request_id: format!("r{i}"),
                    app_name: "chat-app".into(),
                    endpoint: "/chat".into(),
                    user_email: ALICE.into(),
                    model: "echo".into(),
                    status: status.to_string(),
                    ..Default::default()
                }),
            })
            .await
            .expect("usage");
    }
    let got = rx_bob
        .wait_until(WAIT, "errors.spike", |r| !r.is_empty())
        .await;
    let text = got[0].json()["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains("errors.spike") && text.contains("3 of 4"),
        "{text}"
    );
    assert!(got[0].valid);

    // holds.expired: a one-second hold nobody captures expires (the sweep cancels it).
    let mut hold = authorize(USD, &token, "expiring");
    hold.hold_ttl_seconds = Some(1);
    h.client(&bob).authorize(hold).await.expect("hold");
    let got = rx_alice
        .wait_until(WAIT, "holds.expired", |r| {
            !of_type(r, "holds.expired").is_empty()
        })
        .await;
    assert_eq!(
        of_type(&got, "holds.expired")[0].json()["data"]["expired"],
        1
    );

    // Nothing fired twice.
    settle().await;
    assert_eq!(of_type(&rx_alice.received(), "spend.threshold").len(), 1);
    assert_eq!(of_type(&rx_alice.received(), "holds.expired").len(), 1);

    // digest.daily at 00:00 UTC: evaluated as of tomorrow 01:00 (an injected time), it fires
    // once for that day, however often it is evaluated.
    let day = 86_400_000_000i64;
    let tomorrow = now_micros() - now_micros().rem_euclid(day) + day + 3_600_000_000;
    evaluate_all(&h.store, tomorrow).await.expect("evaluate");
    evaluate_all(&h.store, tomorrow + 1_000_000)
        .await
        .expect("evaluate");
    let got = rx_bob
        .wait_until(WAIT, "digest", |r| {
            r.iter().any(|x| {
                x.json()["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("digest.daily"))
            })
        })
        .await;
    settle().await;
    let digests = rx_bob
        .received()
        .iter()
        .filter(|x| {
            x.json()["text"]
                .as_str()
                .is_some_and(|t| t.contains("digest.daily"))
        })
        .count();
    assert_eq!(digests, 1, "{got:#?}");
    h
}

/// The budget.threshold events received, as (window, step) pairs, sorted.
fn budget_steps(received: &[syft_testkit::Received]) -> Vec<(String, i64)> {
    let mut steps: Vec<_> = of_type(received, "budget.threshold")
        .iter()
        .map(|e| {
            let data = &e.json()["data"];
            let window = data["window"].as_str().unwrap_or_default().to_string();
            (window, data["step_percent"].as_i64().unwrap_or(0))
        })
        .collect();
    steps.sort();
    steps
}

/// A burst of 100 concurrent payments uses all of a per-user daily budget and of a token's limit
/// per 24 hours: one event per step per budget, however often rules are evaluated. The first
/// burst is moved to yesterday and evaluated as of then; today a second burst fires every step
/// again: the calendar day is a new window, and the token's rolling window re-armed once its
/// usage aged out.
async fn windowed_budgets_fire_once_per_step_and_rearm_each_window(h: Harness) -> Harness {
    const DAY: i64 = 86_400_000_000;
    let rx = WebhookReceiver::start().await;
    let limits = pb::IssueTokenRequest {
        limit_per_day_micros: Some(USD),
        ..Default::default()
    };
    let (_, bob, token) = budget_watch(&h, &rx, 10 * USD, limits).await;
    let burst = |round: &'static str| {
        let payments = (0..100).map(|i| {
            let mut hold = authorize(10_000, &token, &format!("{round}-{i}"));
            hold.budget_per_day_micros = Some(USD);
            spend_with(&h, &bob, hold)
        });
        futures::future::join_all(payments)
    };
    let store = &h.store;
    let evaluate = |at: i64| async move { evaluate_all(store, at).await.expect("evaluate") };
    let day_name = |at: i64| {
        chrono::DateTime::from_timestamp_micros(at)
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default()
    };

    // Yesterday: the first burst, evaluated as of then (twice: no duplicates).
    burst("first").await;
    let pool = h.store.pool();
    sqlx::query(
        "UPDATE transfers SET created_at = created_at - $1, resolved_at = resolved_at - $1, \
         expires_at = expires_at - $1",
    )
    .bind(DAY)
    .execute(pool)
    .await
    .expect("move the burst to yesterday");
    sqlx::query("UPDATE budget_limits SET seen_day = seen_day - $1")
        .bind(DAY)
        .execute(pool)
        .await
        .expect("seen yesterday");
    let yesterday = now_micros() - DAY;
    assert_eq!(evaluate(yesterday).await, 6, "three steps of two budgets");
    assert_eq!(evaluate(yesterday + 1).await, 0);

    // Today: nothing fires until usage rises again (the token's window re-arms silently).
    assert_eq!(evaluate(now_micros()).await, 0);
    burst("second").await;
    let today = now_micros();
    assert_eq!(evaluate(today).await, 6, "every step again");
    assert_eq!(evaluate(today + 1).await, 0);

    rx.wait_until(WAIT, "twelve budget events", |r| {
        of_type(r, "budget.threshold").len() >= 12
    })
    .await;
    settle().await;
    let received = rx.received();
    let mut want: Vec<(String, i64)> = ["24h", "24h", "day", "day"]
        .iter()
        .flat_map(|w| [50, 80, 100].map(|s| (w.to_string(), s)))
        .collect();
    want.sort();
    assert_eq!(budget_steps(&received), want, "{received:#?}");
    assert!(received.iter().all(|e| e.valid));
    let ids: std::collections::HashSet<_> = received.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), received.len(), "every crossing is its own event");
    let mut days: Vec<String> = of_type(&received, "budget.threshold")
        .iter()
        .map(|e| e.json()["data"].clone())
        .filter(|d| d["window"] == "day")
        .map(|d| d["budget"].as_str().unwrap_or_default().to_string())
        .collect();
    days.sort();
    days.dedup();
    let subject = |at| format!("budget:{ALICE}>{BOB}:day:{}", day_name(at));
    assert_eq!(days, [subject(yesterday), subject(today)]);
    h
}

/// `errors.spike` (50 %, 1 minute, at least 4 requests) during one outage in which every request
/// fails, while the window's count wobbles 4, 3, 4: one event. The rule re-armed as soon as the
/// count fell under `min_requests` and fired again 42 s later for the same outage.
async fn an_errors_spike_fires_once_while_its_count_wobbles(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let bob = h.account(BOB, 10 * USD).await;
    let ep = add(&h, &bob, &rx, pb::AlertFormat::Json, vec![errors_spike(1)]).await;
    let base = now_micros() - 600_000_000;
    let mut client = h.client(&bob);
    let mut originals: Vec<(String, i64)> = Vec::new();
    // Failed requests at these seconds; the rule evaluated as the clock passes each `at`.
    let plan: [(&[i64], i64); 3] = [(&[0, 10, 20, 30], 30), (&[], 62), (&[65, 72], 72)];
    for (offsets, at) in plan {
        for off in offsets {
            let id = format!("f{off}");
            let usage = pb::Usage {
                request_id: id.clone(),
                app_name: "chat-app".into(),
                endpoint: "/chat".into(),
                user_email: ALICE.into(),
                model: "echo".into(),
                status: "upstream_error".into(),
                ..Default::default()
            };
            let row = client.record_usage(pb::RecordUsageRequest { usage: Some(usage) });
            let row = row.await.expect("usage").into_inner();
            originals.push((id.clone(), row.created_at_unix_micros));
            sqlx::query("UPDATE usage_records SET created_at = $1 WHERE request_id = $2")
                .bind(base + off * 1_000_000)
                .bind(&id)
                .execute(h.store.pool())
                .await
                .expect("place the row");
        }
        let at = base + at * 1_000_000;
        evaluate_all(&h.store, at).await.expect("evaluate");
    }
    // Back where the rollups have them, for the ledger's verify.
    for (id, was) in &originals {
        sqlx::query("UPDATE usage_records SET created_at = $1 WHERE request_id = $2")
            .bind(*was)
            .bind(id)
            .execute(h.store.pool())
            .await
            .expect("restore");
    }
    let fired: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM alert_events WHERE endpoint_id = $1 AND kind = 'errors.spike'",
    )
    .bind(&ep)
    .fetch_one(h.store.pool())
    .await
    .expect("count");
    assert_eq!(fired, 1, "one outage, {fired} errors.spike events");
    h
}

/// `errors.spike` at 50 % of at least 4 requests over `window_minutes`.
fn errors_spike(window_minutes: u32) -> pb::AlertRule {
    pb::AlertRule {
        event: pb::AlertEvent::ErrorsSpike as i32,
        percent: 50,
        window_minutes,
        min_requests: 4,
        ..Default::default()
    }
}

/// An endpoint with `MAX_PENDING_EVENTS` waiting gets no more from its rules: holds of one micro
/// placed and voided in a loop re-armed a budget's steps at every cycle and wrote thousands of
/// events into the outbox the money paths share a database with (an alerts reviewer's finding).
/// Its level still moves, so the rule does not fire again at the next pass.
async fn a_full_endpoint_gets_no_more_events(h: Harness) -> Harness {
    use syft_ledger::alerts::evaluate::MAX_PENDING_EVENTS;
    let rx = WebhookReceiver::start().await;
    let limits = pb::IssueTokenRequest {
        spend_limit_micros: Some(USD),
        ..Default::default()
    };
    let (alice, bob, token) = budget_watch(&h, &rx, 10 * USD, limits).await;
    let endpoint = endpoints(&h, &alice).await.remove(0).id;
    // Events waiting (due in a year, so not sent meanwhile) leave room for one more.
    let fill = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2) \
                INSERT INTO alert_events (id, endpoint_id, kind, payload, status, \
                next_attempt_at, created_at) SELECT 'waiting-' || i, $1, 'budget.threshold', \
                '{}', 'PENDING', $3, 0 FROM n";
    sqlx::query(fill)
        .bind(&endpoint)
        .bind(MAX_PENDING_EVENTS - 1)
        .bind(now_micros() + 365 * 86_400_000_000)
        .execute(h.store.pool())
        .await
        .expect(fill);
    // Every step crossed at once: three events fired, one written.
    spend(&h, &bob, &token, USD, "all").await;
    let store = &h.store;
    let evaluate = || async move { evaluate_all(store, now_micros()).await.expect("evaluate") };
    assert_eq!(evaluate().await, 1, "room for one");
    assert_eq!(evaluate().await, 0, "the level moved: nothing fires again");
    let got = rx
        .wait_until(WAIT, "the one event", |r| {
            !of_type(r, "budget.threshold").is_empty()
        })
        .await;
    assert_eq!(
        of_type(&got, "budget.threshold")[0].json()["data"]["step_percent"],
        50
    );
    sqlx::query("DELETE FROM alert_events WHERE id LIKE 'waiting-%'")
        .execute(h.store.pool())
        .await
        .expect("empty");
    h
}
