//! Shared set-up of the alerts tests: a ledger with alerts on (short, injectable schedule), an
//! endpoint on an in-process receiver, and money moves that cross thresholds.
#![allow(dead_code)]

use std::time::Duration;

use syft_ledger::alerts::parse_schedule;
use syft_ledger::client::{connect_alerts_lazy, AlertsClient};
use syft_ledger::LedgerConfig;
use syft_proto::ledger as pb;
use syft_testkit::{ok, Harness, WebhookReceiver, USD};

pub const ALICE: &str = "alice@example.com";
pub const BOB: &str = "bob@example.com";

pub use syft_testkit::alerts_on;

/// [`alerts_on`], and endpoints failing for a second are disabled.
pub fn alerts_disable_fast(c: &mut LedgerConfig) {
    alerts_on(c);
    c.alerts.retry_schedule = parse_schedule("300ms").expect("schedule").repeat(20);
    c.alerts.disable_after = Duration::from_secs(1);
}

/// [`alerts_on`], and rules are evaluated only when a test calls `evaluate_all` (at a time it
/// chooses), once at start-up aside.
pub fn alerts_evaluated_by_hand(c: &mut LedgerConfig) {
    alerts_on(c);
    c.alerts.evaluate_interval = Duration::from_secs(3600);
}

/// [`alerts_on`], and events are delivered only when a test calls `deliver_due` (the ledger's
/// own worker looks once at start-up, before any event).
pub fn alerts_delivered_by_hand(c: &mut LedgerConfig) {
    alerts_on(c);
    c.alerts.deliver_interval = Duration::from_secs(3600);
}

/// [`alerts_on`], and the name `localhost` allowed too (the DNS rebinding test takes it away).
pub fn alerts_allow_localhost(c: &mut LedgerConfig) {
    alerts_on(c);
    c.alerts.allowed_hosts.push("localhost".into());
}

/// Runs each `async fn(Harness) -> Harness` on SQLite and Postgres with `$tweak`, ending with
/// `Harness::finish` (the ledger must verify).
#[macro_export]
macro_rules! alerts_suite {
    ($module:ident, $tweak:path; $($name:ident),* $(,)?) => {
        mod $module {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $name() {
                        let h = syft_testkit::Harness::with(false, $tweak).await.expect("harness");
                        super::super::$name(h).await.finish().await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $name() {
                        let Some(h) = syft_testkit::Harness::with(true, $tweak).await else { return };
                        super::super::$name(h).await.finish().await;
                    }
                )*
            }
        }
    };
}

pub fn alerts(h: &Harness, secret: &str) -> AlertsClient {
    connect_alerts_lazy(&h.url(), secret, None).expect("alerts client")
}

pub fn balance_low(below: i64) -> pb::AlertRule {
    pb::AlertRule {
        event: pb::AlertEvent::BalanceLow as i32,
        threshold_micros: below,
        ..Default::default()
    }
}

/// Adds an endpoint for the caller; the receiver learns its secret. Returns the endpoint id.
pub async fn add(
    h: &Harness,
    secret: &str,
    rx: &WebhookReceiver,
    format: pb::AlertFormat,
    rules: Vec<pb::AlertRule>,
) -> String {
    let added = alerts(h, secret)
        .add_alert_endpoint(pb::AddAlertEndpointRequest {
            url: rx.url.clone(),
            format: format as i32,
            rules,
            ..Default::default()
        })
        .await
        .expect("add endpoint")
        .into_inner();
    assert!(added.secret.starts_with("whsec_"));
    rx.set_secrets(&[&added.secret]);
    added.endpoint.expect("endpoint").id
}

/// Adds an endpoint at `url` watching the caller's balance (below 1 USD); returns its id and
/// signing secret (no receiver is told it).
pub async fn add_balance_low(h: &Harness, secret: &str, url: &str) -> (String, String) {
    let new = pb::AddAlertEndpointRequest {
        url: url.into(),
        rules: vec![balance_low(USD)],
        ..Default::default()
    };
    let added = ok(alerts(h, secret).add_alert_endpoint(new).await);
    (added.endpoint.expect("endpoint").id, added.secret)
}

/// Rotates an endpoint's secret, the previous one signing for `overlap_seconds` more.
pub async fn rotate(
    h: &Harness,
    secret: &str,
    endpoint: &str,
    overlap_seconds: u32,
) -> pb::RotateAlertSecretResponse {
    let rotate = pb::RotateAlertSecretRequest {
        endpoint_id: endpoint.into(),
        overlap_seconds,
    };
    ok(alerts(h, secret).rotate_alert_secret(rotate).await)
}

/// An endpoint of the caller's with one rule, JSON format; returns its id.
pub async fn add_rule(
    h: &Harness,
    secret: &str,
    rx: &WebhookReceiver,
    rule: pb::AlertRule,
) -> String {
    add(h, secret, rx, pb::AlertFormat::Json, vec![rule]).await
}

/// Alice (with `funds`) and Bob, and a token that lets Bob charge Alice: their secrets and the token.
pub async fn alice_and_bob(h: &Harness, funds: i64) -> (String, String, String) {
    let alice = h.account(ALICE, funds).await;
    let bob = h.account(BOB, 0).await;
    let token = h.token(&alice, BOB).await;
    (alice, bob, token)
}

/// Alice (with `funds`) and Bob, an endpoint of Alice's watching her budgets at 50, 80 and 100 %,
/// and a token that lets Bob charge Alice within the limits `limits` sets (its recipient is Bob).
pub async fn budget_watch(
    h: &Harness,
    rx: &WebhookReceiver,
    funds: i64,
    limits: pb::IssueTokenRequest,
) -> (String, String, String) {
    let alice = h.account(ALICE, funds).await;
    let bob = h.account(BOB, 0).await;
    let issue = pb::IssueTokenRequest {
        recipient_email: BOB.into(),
        ..limits
    };
    let token = ok(h.client(&alice).issue_token(issue).await).token;
    let rule = pb::AlertRule {
        event: pb::AlertEvent::BudgetThreshold as i32,
        steps: vec![50, 80, 100],
        ..Default::default()
    };
    add_rule(h, &alice, rx, rule).await;
    (alice, bob, token)
}

/// The caller's endpoints over gRPC.
pub async fn endpoints(h: &Harness, secret: &str) -> Vec<pb::AlertEndpoint> {
    let list = pb::ListAlertEndpointsRequest::default();
    ok(alerts(h, secret).list_alert_endpoints(list).await).endpoints
}

pub fn authorize(amount: i64, token: &str, key: &str) -> pb::AuthorizeRequest {
    syft_testkit::req::hold(ALICE, amount, token, key)
}

/// Alice pays Bob `amount` (hold, then full capture) with `token`.
pub async fn spend(h: &Harness, bob_secret: &str, token: &str, amount: i64, key: &str) {
    spend_with(h, bob_secret, authorize(amount, token, key)).await
}

/// Alice pays Bob the hold `hold` asks for (hold, then full capture).
pub async fn spend_with(h: &Harness, bob_secret: &str, hold: pb::AuthorizeRequest) {
    let mut bob = h.client(bob_secret);
    let hold = ok(bob.authorize(hold).await);
    bob.capture(pb::CaptureRequest {
        transfer_id: hold.id,
        amount: Some(pb::capture_request::Amount::Full(true)),
        usage: None,
        answer: None,
    })
    .await
    .expect("capture");
}

/// Received requests of one event type.
pub fn of_type(received: &[syft_testkit::Received], kind: &str) -> Vec<syft_testkit::Received> {
    received
        .iter()
        .filter(|r| r.event_type() == kind)
        .cloned()
        .collect()
}

pub async fn deliveries(h: &Harness, secret: &str, endpoint: &str) -> Vec<pb::AlertDelivery> {
    alerts(h, secret)
        .list_alert_deliveries(pb::ListAlertDeliveriesRequest {
            endpoint_id: endpoint.into(),
            limit: 100,
        })
        .await
        .expect("deliveries")
        .into_inner()
        .deliveries
}

/// The endpoint's delivery log once `done` holds for it (the worker writes an attempt's entry
/// after the receiver answered), or as it is after [`WAIT`].
pub async fn deliveries_once(
    h: &Harness,
    secret: &str,
    endpoint: &str,
    done: impl Fn(&[pb::AlertDelivery]) -> bool,
) -> Vec<pb::AlertDelivery> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut log = deliveries(h, secret, endpoint).await;
    while !done(&log) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        log = deliveries(h, secret, endpoint).await;
    }
    log
}

pub const WAIT: Duration = Duration::from_secs(15);

/// The value of one series on the ledger's `/metrics`, e.g.
/// `syft_ledger_alert_deliveries_total{outcome="retry"}` (0 when absent).
pub async fn metric(h: &Harness, series: &str) -> f64 {
    let text = syft_testkit::get_text(&format!("{}/metrics", h.http_url())).await;
    text.lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum()
}

/// Scrapes until `series` satisfies `ok` (gauges are shared by the tests of one process, each
/// scrape setting them from its own database), or fails with the last value.
pub async fn wait_metric(h: &Harness, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = metric(h, series).await;
        if ok(value) {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{series} = {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
