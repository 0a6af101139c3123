//! The alerts REST API on the ledger's HTTP port, over real HTTP: add, list, test, deliveries,
//! rotate and remove, with bearer auth; bad input refused with a clear 4xx and nothing written;
//! other accounts' endpoints invisible. SQLite and Postgres.

mod alerts_support;

use alerts_support::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use syft_testkit::{Harness, WebhookReceiver, ADMIN_KEY, USD};

alerts_suite!(
    rest,
    crate::alerts_support::alerts_on;
    rest_manages_endpoints_end_to_end,
    rest_refuses_bad_input_with_clear_errors,
    cross_site_browser_requests_are_refused,
    endpoints_are_capped_live_and_added_and_removed,
);

/// An account has at most 16 endpoints, and adds at most 32 an hour counting those it removed:
/// removed endpoints are kept (their deliveries are listed), and one account added and removed
/// 250 a second, every row kept (a growth reviewer's finding, 2026-12-08).
async fn endpoints_are_capped_live_and_added_and_removed(h: Harness) -> Harness {
    use syft_ledger::alerts::api::MAX_ENDPOINTS_PER_ACCOUNT as MAX;
    let alice = h.account(ALICE, 10 * USD).await;
    let url = WebhookReceiver::start().await.url;
    let body = || json!({"url": url, "rules": [balance_rule()]});
    let add = || call(&h, Method::POST, "/endpoints", Some(&alice), Some(body()));
    let mut live = Vec::new();
    for _ in 0..MAX {
        let (status, ep) = add().await;
        assert_eq!(status, StatusCode::CREATED, "{ep}");
        live.push(ep["endpoint"]["id"].as_str().expect("id").to_string());
    }
    let (status, refused) = add().await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    // Replacing one at a time works until the hour's allowance (32 added) is spent.
    let remove = |id: String| {
        let path = format!("/endpoints/{id}");
        let h = &h;
        let alice = &alice;
        async move {
            let (status, v) = call(h, Method::DELETE, &path, Some(alice), None).await;
            assert_eq!(status, StatusCode::OK, "{v}");
        }
    };
    for _ in MAX..2 * MAX {
        remove(live.pop().expect("an endpoint")).await;
        let (status, ep) = add().await;
        assert_eq!(status, StatusCode::CREATED, "{ep}");
        live.push(ep["endpoint"]["id"].as_str().expect("id").to_string());
    }
    remove(live.pop().expect("an endpoint")).await;
    let (status, refused) = add().await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let detail = refused["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("within the last hour"), "{refused}");
    h
}

/// One call of the alerts REST API: its status and JSON body.
async fn call(
    h: &Harness,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request =
        reqwest::Client::new().request(method, format!("{}/v1/alerts{path}", h.http_url()));
    if let Some(secret) = bearer {
        request = request.bearer_auth(secret);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("http");
    let status = response.status();
    let body = response.json().await.expect("every answer is JSON");
    (status, body)
}

/// `POST /endpoints/{ep}/rotate` as `secret`, the previous secret signing `overlap_seconds` more.
async fn rotate(h: &Harness, secret: &str, ep: &str, overlap_seconds: i64) -> (StatusCode, Value) {
    let path = format!("/endpoints/{ep}/rotate");
    let body = json!({ "overlap_seconds": overlap_seconds });
    call(h, Method::POST, &path, Some(secret), Some(body)).await
}

/// A 400 whose detail names `field`, so a client knows what to send.
fn assert_bad_request_naming(status: StatusCode, body: &Value, field: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(field), "{body}");
}

fn balance_rule() -> Value {
    json!({"event": "balance.low", "below_micros": USD})
}

async fn rest_manages_endpoints_end_to_end(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let bob = h.account(BOB, 0).await;
    let new = json!({"url": rx.url, "rules": [balance_rule(),
        {"event": "budget.threshold", "steps": [50, 100]}], "rate_per_minute": 30});

    let (status, body) = call(&h, Method::POST, "/endpoints", None, Some(new.clone())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, added) = call(&h, Method::POST, "/endpoints", Some(&alice), Some(new)).await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    let secret = added["secret"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("whsec_"));
    let ep = added["endpoint"]["id"].as_str().expect("id").to_string();
    assert_eq!(added["endpoint"]["account_email"], ALICE);
    assert_eq!(added["endpoint"]["rules"][1]["steps"], json!([50, 100]));
    assert_eq!(added["endpoint"]["rate_per_minute"], 30);
    rx.set_secrets(&[&secret]);

    // Listed (never with its secret); the gRPC API sees the same endpoint.
    let (status, listed) = call(&h, Method::GET, "/endpoints", Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["endpoints"].as_array().map(Vec::len), Some(1));
    assert!(!listed.to_string().contains(&secret));
    assert_eq!(endpoints(&h, &alice).await[0].id, ep);

    // Send test event: queued (202), delivered signed, and in the delivery log.
    let test = format!("/endpoints/{ep}/test");
    let (status, queued) = call(&h, Method::POST, &test, Some(&alice), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let event = queued["event_id"].as_str().expect("event id").to_string();
    let got = rx.wait_until(WAIT, "test event", |r| !r.is_empty()).await;
    assert_eq!((got[0].id.as_str(), got[0].valid), (event.as_str(), true));
    let log_path = format!("/endpoints/{ep}/deliveries?limit=10");
    let mut log = Value::Null;
    for _ in 0..100 {
        log = call(&h, Method::GET, &log_path, Some(&alice), None).await.1;
        if log["deliveries"][0]["outcome"] == "DELIVERED" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let first = &log["deliveries"][0];
    assert_eq!(first["outcome"], "DELIVERED", "{log}");
    assert_eq!(
        (first["event_id"].as_str(), first["status_code"].as_i64()),
        (Some(event.as_str()), Some(200))
    );
    assert_eq!(first["event_type"], "test");

    // Rotate without overlap: the next event verifies with the new secret only.
    let (status, rotated) = rotate(&h, &alice, &ep, 0).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().expect("secret").to_string();
    assert_ne!(new_secret, secret);
    rx.set_secrets(&[&new_secret]);
    call(&h, Method::POST, &test, Some(&alice), None).await;
    let got = rx
        .wait_until(WAIT, "second test event", |r| r.len() >= 2)
        .await;
    assert!(got[1].valid && got[1].signature.split(' ').count() == 1);

    // Enabling an endpoint that is not disabled changes nothing, and answers it.
    let enable = format!("/endpoints/{ep}/enable");
    let (status, enabled) = call(&h, Method::POST, &enable, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert_eq!(enabled["endpoint"]["id"], ep.as_str());
    assert_eq!(enabled["endpoint"]["disabled"], false, "{enabled}");

    // Bob sees nothing of Alice's: not found, not forbidden; the admin names the account.
    for (method, path) in [
        (Method::DELETE, format!("/endpoints/{ep}")),
        (Method::POST, enable.clone()),
        (Method::POST, test.clone()),
        (Method::POST, format!("/endpoints/{ep}/rotate")),
        (Method::GET, log_path.clone()),
    ] {
        let (status, body) = call(&h, method, &path, Some(&bob), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["code"], "NOT_FOUND");
    }
    let (_, bobs) = call(&h, Method::GET, "/endpoints", Some(&bob), None).await;
    assert_eq!(bobs["endpoints"], json!([]));
    // The admin must name an account: a missing field (it was a 403).
    let (status, body) = call(&h, Method::GET, "/endpoints", Some(ADMIN_KEY), None).await;
    assert_bad_request_naming(status, &body, "?account=");
    let admin_list = format!("/endpoints?account={ALICE}");
    let (_, listed) = call(&h, Method::GET, &admin_list, Some(ADMIN_KEY), None).await;
    assert_eq!(listed["endpoints"][0]["id"], ep.as_str());

    // Removed: gone from the list, and a second removal is a 404.
    let one = format!("/endpoints/{ep}");
    let (status, _) = call(&h, Method::DELETE, &one, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = call(&h, Method::GET, "/endpoints", Some(&alice), None).await;
    assert_eq!(listed["endpoints"], json!([]));
    let (status, _) = call(&h, Method::DELETE, &one, Some(&alice), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    h
}

async fn rest_refuses_bad_input_with_clear_errors(h: Harness) -> Harness {
    let alice = h.account(ALICE, 10 * USD).await;
    let good = WebhookReceiver::start().await.url;
    let with_rule = |rule: Value| json!({"url": good, "rules": [rule]});
    let with_url = |url: &str| json!({"url": url, "rules": [balance_rule()]});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("not a url", with_url("not a url"), "url"),
        (
            "private address",
            with_url("https://192.168.1.10/x"),
            "private",
        ),
        (
            "metadata address",
            with_url("https://169.254.169.254/x"),
            "private",
        ),
        (
            "http, host not allowed",
            with_url("http://hooks.example.com/x"),
            "https",
        ),
        (
            "unknown event",
            with_rule(json!({"event": "balance.lo", "below_micros": USD})),
            "unknown event",
        ),
        ("no event", with_rule(json!({"below_micros": USD})), "event"),
        (
            "event the ledger sends",
            with_rule(json!({"event": "test"})),
            "sent by the ledger",
        ),
        (
            "negative threshold",
            with_rule(json!({"event": "balance.low", "below_micros": -5})),
            "below_micros",
        ),
        (
            "huge threshold",
            with_rule(json!({"event": "balance.low", "below_micros": i64::MAX})),
            "below_micros",
        ),
        (
            "threshold beyond 64 bits",
            with_rule(json!({"event": "balance.low", "below_micros": 1e30})),
            "balance.low",
        ),
        (
            "misspelt field",
            with_rule(json!({"event": "balance.low", "below_micros": USD, "below": 1})),
            "no field \"below\"",
        ),
        (
            "steps not increasing",
            with_rule(json!({"event": "budget.threshold", "steps": [80, 50]})),
            "increasing",
        ),
        (
            "step over 255",
            with_rule(json!({"event": "budget.threshold", "steps": [50, 300]})),
            "budget.threshold",
        ),
        (
            "percent out of range",
            with_rule(
                json!({"event": "errors.spike", "percent": 0, "window_minutes": 5, "min_requests": 10}),
            ),
            "percent",
        ),
        ("no rules", json!({"url": good, "rules": []}), "rules"),
        (
            "negative rate cap",
            json!({"url": good, "rules": [balance_rule()], "rate_per_minute": -1}),
            "rate_per_minute",
        ),
        (
            "rate cap too high",
            json!({"url": good, "rules": [balance_rule()], "rate_per_minute": 100000}),
            "rate_per_minute",
        ),
        (
            "unknown format",
            json!({"url": good, "rules": [balance_rule()], "format": "xml"}),
            "format",
        ),
        (
            "unknown field",
            json!({"url": good, "rules": [balance_rule()], "secret": "mine"}),
            "secret",
        ),
        ("not JSON", json!("just a string"), "invalid JSON"),
    ];
    for (what, body, says) in cases {
        let (status, answer) = call(&h, Method::POST, "/endpoints", Some(&alice), Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        assert_eq!(answer["code"], "INVALID_ARGUMENT", "{what}: {answer}");
        let detail = answer["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(says),
            "{what}: {detail:?} should mention {says:?}"
        );
    }
    let (_, listed) = call(&h, Method::GET, "/endpoints", Some(&alice), None).await;
    assert_eq!(listed["endpoints"], json!([]), "nothing half-written");
    // The admin names the account (it has none of its own): a missing one is a bad request that
    // says which field, not a 403.
    let (status, answer) = call(
        &h,
        Method::POST,
        "/endpoints",
        Some(ADMIN_KEY),
        Some(with_url(&good)),
    )
    .await;
    assert_bad_request_naming(status, &answer, "account_email");

    // Query parameters and paths are checked too.
    let rx = WebhookReceiver::start().await;
    let ep = add_rule(&h, &alice, &rx, balance_low(USD)).await;
    for (path, says) in [
        (
            format!("/endpoints/{ep}/deliveries?limit=abc"),
            "whole number",
        ),
        (
            format!("/endpoints/{ep}/deliveries?limit=100000"),
            "maximum",
        ),
        // Zero is out of range here (over gRPC an unset limit is the default).
        (
            format!("/endpoints/{ep}/deliveries?limit=0"),
            "from 1 to 500",
        ),
        (
            format!("/endpoints/{ep}/deliveries?limt=5"),
            "unknown parameter",
        ),
        ("/endpoints?acount=x".to_string(), "unknown parameter"),
    ] {
        let (status, answer) = call(&h, Method::GET, &path, Some(&alice), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
        assert!(
            answer["detail"].as_str().unwrap_or_default().contains(says),
            "{path}: {answer}"
        );
    }
    let (status, answer) = rotate(&h, &alice, &ep, 30 * 86_400).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = call(&h, Method::POST, "/endpoints/nope/test", Some(&alice), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (status, _) = call(&h, Method::GET, "/endpoints", Some("wrong-secret"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // axum's own refusals are JSON too (a 9.6 MB body was answered in plain text). One byte
    // over axum's 2 MiB limit: the body is read whole before the refusal (a larger one was
    // refused while the client still sent it, which failed the client's send now and then).
    let huge = json!({ "url": "x".repeat((2 << 20) + 1 - r#"{"url":""}"#.len()) });
    let (status, answer) = call(&h, Method::POST, "/endpoints", Some(&alice), Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(
        answer["detail"].is_string() && answer["code"].is_string(),
        "{answer}"
    );
    let (status, answer) = call(&h, Method::PUT, "/endpoints", Some(&alice), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{answer}");
    assert!(answer["code"].is_string(), "{answer}");

    // An account has at most 16 endpoints (it has one, `ep`): the 17th is refused, writing
    // nothing, until one is removed. Without a cap one account kept the ledger's cores busy.
    let add = || {
        call(
            &h,
            Method::POST,
            "/endpoints",
            Some(&alice),
            Some(with_url(&good)),
        )
    };
    for _ in 1..16 {
        let (status, answer) = add().await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let (status, answer) = add().await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let detail = answer["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("16 alert endpoints"), "{answer}");
    assert_eq!(endpoints(&h, &alice).await.len(), 16);
    let (status, _) = call(
        &h,
        Method::DELETE,
        &format!("/endpoints/{ep}"),
        Some(&alice),
        None,
    )
    .await;
    assert!(status.is_success(), "{status}");
    let (status, answer) = add().await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    h
}

/// Removing an endpoint while a delivery of one of its events is being recorded. The remove locks
/// the endpoint's events before the endpoint, the order `record_attempt` takes them in, so the two
/// never deadlock. (In the other order the remove failed with "database busy" once Postgres'
/// deadlock check had picked it.) A transaction plays the recorder here: it holds the event, waits
/// until the remove is blocked on it, then asks for the endpoint with a lock timeout shorter than
/// the deadlock check, which it gets at once only if the remove does not hold the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_an_endpoint_while_a_delivery_is_recorded_never_deadlocks() {
    // One attempt, then an hour's wait: the event stays pending through the test.
    let tweak = |c: &mut syft_ledger::LedgerConfig| {
        crate::alerts_support::alerts_on(c);
        c.alerts.retry_schedule = syft_ledger::alerts::parse_schedule("1h").expect("schedule");
    };
    let Some(h) = Harness::with(true, tweak).await else {
        return;
    };
    let alice = h.account(ALICE, 10 * USD).await;
    let new = json!({"url": syft_testkit::closed_url(), "rules": [balance_rule()]});
    let (status, added) = call(&h, Method::POST, "/endpoints", Some(&alice), Some(new)).await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    let ep = added["endpoint"]["id"].as_str().expect("id").to_string();
    // A test event to a closed port: its first attempt fails, and it waits pending for the next.
    let test = format!("/endpoints/{ep}/test");
    let (status, body) = call(&h, Method::POST, &test, Some(&alice), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let pool = h.store.pool();
    let count = |sql: &'static str| {
        let ep = ep.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(ep)
                .fetch_one(pool)
                .await
                .expect(sql)
        }
    };
    let attempted = "SELECT COUNT(*) FROM alert_deliveries WHERE endpoint_id = $1";
    for _ in 0..200 {
        if count(attempted).await > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(count(attempted).await, 1, "the first attempt is recorded");

    let mut recorder = pool.begin().await.expect("begin");
    let held = sqlx::query(
        "UPDATE alert_events SET attempts = attempts WHERE endpoint_id = $1 AND status = 'PENDING'",
    )
    .bind(&ep)
    .execute(&mut *recorder)
    .await
    .expect("lock the event");
    assert_eq!(held.rows_affected(), 1);
    let url = format!("{}/v1/alerts/endpoints/{ep}", h.http_url());
    let remove = tokio::spawn(async move {
        let response = reqwest::Client::new()
            .delete(url)
            .bearer_auth(alice)
            .send()
            .await
            .expect("http");
        (response.status(), response.text().await.unwrap_or_default())
    });
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity")
    };
    for _ in 0..200 {
        if waiting().await > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(waiting().await >= 1, "the remove waits for the event");
    sqlx::query("SET LOCAL lock_timeout = '300ms'")
        .execute(&mut *recorder)
        .await
        .expect("lock timeout");
    sqlx::query("UPDATE alert_endpoints SET failing_since = failing_since WHERE id = $1")
        .bind(&ep)
        .execute(&mut *recorder)
        .await
        .unwrap_or_else(|e| panic!("the remove holds the endpoint: {e}"));
    recorder.commit().await.expect("commit");
    let (status, body) = remove.await.expect("remove task");
    assert_eq!(status, StatusCode::OK, "{body}");
    let given_up = "SELECT COUNT(*) FROM alert_events WHERE endpoint_id = $1 AND status = 'FAILED'";
    assert_eq!(count(given_up).await, 1, "the pending event is given up");
    h.finish().await;
}

/// A page of another site cannot drive the APIs through a browser that keeps credentials for
/// this host (Basic ones, saved at the prompt a 401 brings up): a request the browser marks as
/// sent from another site is refused before authentication, even a JSON body posted as a
/// `text/plain` form (no preflight), and without the prompt. Programs, which send neither
/// `Origin` nor `Sec-Fetch-Site`, and pages of this origin are served.
async fn cross_site_browser_requests_are_refused(h: Harness) -> Harness {
    let rx = WebhookReceiver::start().await;
    let secret = h.account(ALICE, 10 * USD).await;
    let base = h.http_url();
    let host = base.trim_start_matches("http://").to_string();
    // What `<form enctype="text/plain">` posts: one field whose name and value make JSON.
    let form = json!({"url": rx.url, "rules": [balance_rule()]}).to_string();
    let send = |path: &str, site: Option<&str>, origin: Option<&str>, post: bool| {
        let url = format!("{base}{path}");
        let client = reqwest::Client::new();
        let mut req = if post {
            client
                .post(url)
                .header("content-type", "text/plain")
                .body(form.clone())
        } else {
            client.get(url)
        };
        req = req.basic_auth(ALICE, Some(&secret));
        if let Some(site) = site {
            req = req.header("sec-fetch-site", site);
        }
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        req.send()
    };
    let attacker = Some("https://attacker.example");
    let refused = [
        (Some("cross-site"), attacker),
        (Some("same-site"), Some("https://sub.example")),
        (None, attacker),
        (None, Some("null")),
    ];
    for (site, origin) in refused {
        for (path, post) in [("/v1/alerts/endpoints", true), ("/user/my-info", false)] {
            let response = send(path, site, origin, post).await.expect("http");
            let status = response.status();
            assert!(
                response.headers().get("www-authenticate").is_none(),
                "{path} {site:?} {origin:?}: a refusal must not bring up a password prompt"
            );
            let body: Value = response.json().await.expect("json");
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{path} {site:?} {origin:?}: {body}"
            );
            assert_eq!(body["code"], "PERMISSION_DENIED", "{body}");
        }
    }
    let (status, listed) = call(&h, Method::GET, "/endpoints", Some(&secret), None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(
        listed["endpoints"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );

    // A program, and a page of this very origin, are served.
    let this_origin = format!("http://{host}");
    for (site, origin) in [
        (None, None),
        (Some("same-origin"), Some(this_origin.as_str())),
    ] {
        let response = send("/v1/alerts/endpoints", site, origin, true)
            .await
            .expect("http");
        assert!(
            response.status().is_success(),
            "{site:?}: {}",
            response.status()
        );
        let response = send("/user/my-info", site, origin, false)
            .await
            .expect("http");
        assert_eq!(response.status(), StatusCode::OK, "{site:?}");
    }
    let (_, listed) = call(&h, Method::GET, "/endpoints", Some(&secret), None).await;
    assert_eq!(
        listed["endpoints"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    h
}
