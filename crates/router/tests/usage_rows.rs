//! Issue 15, point 7: every request leaves a usage row, refused ones included, each with its
//! status; a refusal does not take the request id, so a retry of the same id after a refusal is
//! answered, charged once and recorded once.

use std::time::Duration;

use serde_json::json;
use syft_router_svc::Pricing;
use syft_testkit::*;
use tonic::Code;

async fn refusals_leave_rows_and_free_the_request_id(s: Stack) {
    let mut c = s.client().await;

    // payment_required over gRPC and over HTTP (no token).
    let mut req = s.request("hi");
    req.request_id = "r-1".into();
    req.transaction_token.clear();
    assert_eq!(code(c.chat(req).await), Code::FailedPrecondition);
    let http = reqwest::Client::new();
    let resp = http
        .post(s.router.chat_completions_url())
        .header("Idempotency-Key", "r-http")
        .json(
            &json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                      "user": s.alice.email}),
        )
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status().as_u16(), 402);

    // token_refused (the ledger records this refusal for its key and replays it, so it gets an
    // id of its own), then invalid_request (an empty message list; no valid request id either).
    let mut req = s.request("hi");
    req.request_id = "r-2".into();
    req.transaction_token = "not-a-real-token".into();
    assert_eq!(code(c.chat(req).await), Code::PermissionDenied);
    let mut req = s.request("hi");
    req.request_id = "bad id with spaces".into();
    req.messages.clear();
    assert_eq!(code(c.chat(req).await), Code::InvalidArgument);

    // insufficient_funds: a hold larger than alice's balance.
    let bob = create_account(&s.ledger.url, "bob").await;
    let bob_token = issue_token(&s.ledger.url, &bob, &s.owner.email).await;
    let mut req = s.request("hi");
    req.user_email = bob.email.clone();
    req.transaction_token = bob_token;
    assert_eq!(code(c.chat(req).await), Code::FailedPrecondition);

    // The id refused by the router itself (no token), now with a token: answered, charged once.
    let mut req = s.request("hi");
    req.request_id = "r-1".into();
    let answer = c.chat(req.clone()).await.expect("paid answer").into_inner();
    assert_eq!(answer.cost_micros, PRICE);
    // The same request again: the stored answer (tests/replay.rs), not charged again.
    let again = c.chat(req).await.expect("replay").into_inner();
    assert!(again.replay);
    assert_eq!(again.transfer_id, answer.transfer_id);
    // Another request under the answered id is refused as a duplicate, charges nothing, leaves
    // a row.
    let mut other = s.request("something else");
    other.request_id = "r-1".into();
    assert_eq!(code(c.chat(other).await), Code::AlreadyExists);
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));

    let rows = s.usage().await;
    // The invalid request is recorded under a fresh id (its own was unusable).
    let invalid: Vec<_> = rows
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .filter(|u| u.status == "invalid_request")
        .collect();
    assert_eq!(invalid.len(), 1, "{rows:?}");
    assert!(invalid[0].request_id.starts_with("refused-"));
    // Each refusal row carries a key of its own, so that a call that failed over after its commit
    // records it once (the ledger's usage_batch_rpc.rs); the answered request's row needs none.
    let keys: Vec<(&str, &str)> = rows
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .map(|u| (u.status.as_str(), u.row_key.as_str()))
        .collect();
    let refusal_keys: std::collections::HashSet<&str> = keys
        .iter()
        .filter(|(status, _)| *status != "success")
        .map(|(_, key)| *key)
        .collect();
    assert!(!refusal_keys.contains(""), "{keys:?}");
    assert_eq!(refusal_keys.len(), rows.len() - 1, "{keys:?}");
    assert!(keys.contains(&("success", "")), "{keys:?}");
    let mut statuses: Vec<(String, String, i64)> = rows
        .into_iter()
        .filter(|r| {
            r.usage
                .as_ref()
                .is_some_and(|u| u.status != "invalid_request")
        })
        .map(|r| {
            let u = r.usage.unwrap_or_default();
            (u.request_id, u.status, r.cost_micros)
        })
        .collect();
    statuses.sort();
    let row = |id: &str, status: &str, cost: i64| (id.to_string(), status.to_string(), cost);
    assert_eq!(
        statuses,
        vec![row("r-1", "duplicate", 0), row("r-1", "success", PRICE)]
    );
    // A refusal that proved nothing about its user (no token, a token that is not theirs) names
    // no user: anyone can name anyone, and such rows showed in alice's own history as hers.
    let mut unnamed: Vec<(String, String)> = all_usage(&s.ledger.url, "")
        .await
        .into_iter()
        .filter(|u| u.user_email.is_empty() && u.status != "invalid_request")
        .map(|u| (u.request_id, u.status))
        .collect();
    unnamed.sort();
    let row = |id: &str, status: &str| (id.to_string(), status.to_string());
    assert_eq!(
        unnamed,
        vec![
            row("r-1", "payment_required"),
            row("r-2", "token_refused"),
            row("r-http", "payment_required"),
        ]
    );
    let bob_rows = usage_of(&s.ledger.url, &bob.email).await;
    assert_eq!(bob_rows.len(), 1);
    assert_eq!(
        bob_rows[0].usage.as_ref().map(|u| u.status.as_str()),
        Some("insufficient_funds")
    );
    // Each refusal row keeps the reason its client was answered with (a status alone told a
    // revoked token from an expired one nowhere); the answered request's row has none.
    let mut reasons: Vec<(String, String)> = all_usage(&s.ledger.url, "")
        .await
        .into_iter()
        .map(|u| (u.status, u.reason))
        .collect();
    reasons.sort();
    reasons.dedup();
    let reason = |status: &str, reason: &str| (status.to_string(), reason.to_string());
    assert_eq!(
        reasons,
        vec![
            reason("duplicate", "REQUEST_PROCESSED"),
            reason("insufficient_funds", "INSUFFICIENT_FUNDS"),
            reason("invalid_request", "INVALID_ARGUMENT"),
            reason("payment_required", "PAYMENT_REQUIRED"),
            reason("success", ""),
            reason("token_refused", "TOKEN_INVALID"),
        ]
    );
    s.finish().await;
}

/// Free requests finishing together share `RecordUsageBatch` calls (crates/router/src/
/// usage_send.rs): every one still leaves exactly its own row, and is answered only once the
/// ledger has it.
async fn concurrent_free_requests_each_leave_a_row(s: Stack) {
    let calls = (0..40).map(|n| {
        let s = &s;
        async move {
            let mut c = s.client().await;
            let mut req = s.request("hi");
            req.request_id = format!("free-{n}");
            req.transaction_token.clear();
            c.chat(req).await.expect("free chat");
        }
    });
    futures::future::join_all(calls).await;
    let rows = usage_of(&s.ledger.url, &s.alice.email).await;
    let mut ids: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .filter(|u| u.status == "success")
        .map(|u| u.request_id.as_str())
        .collect();
    ids.sort_unstable();
    let mut want: Vec<String> = (0..40).map(|n| format!("free-{n}")).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    assert_eq!(rows.len(), 40);
    s.finish().await;
}

/// A free request that failed and is sent again under its id (an SDK's retry of a 5xx) is another
/// attempt: its row is kept beside the failure's. The ledger kept one free row per request id
/// and endpoint, so the answered retry's row was dropped, missing from usage and analytics
/// (migration 0039 keys each attempt). A row sent again (a failover, the spool) is still one.
async fn a_free_retry_after_a_failure_leaves_its_row(s: Stack) {
    let mut c = s.client().await;
    let mut req = s.request("hi");
    req.request_id = "turn-1".into();
    req.transaction_token.clear();
    s.upstream.set_mode(Mode::Status(500));
    c.chat(req.clone()).await.expect_err("the upstream failed");
    s.upstream.set_mode(Mode::Ok);
    c.chat(req.clone()).await.expect("the retry is answered");
    let rows = usage_of(&s.ledger.url, &s.alice.email).await;
    let mut got: Vec<(&str, &str)> = rows
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .map(|u| (u.request_id.as_str(), u.status.as_str()))
        .collect();
    got.sort_unstable();
    assert_eq!(got, [("turn-1", "success"), ("turn-1", "upstream_error")]);
    assert_eq!(s.upstream.hits(), 2);
    s.finish().await;
}

/// A free request whose client gives up while the upstream works leaves a `cancelled` row,
/// recorded in the background once the request is dropped, as a paid one's hold guard records
/// its void; and only that row, once the upstream would have answered. Its latency is how long
/// the request lasted (both said 0 ms: the row was made at admission).
async fn a_request_the_client_gave_up_on_leaves_a_row(pricing: Pricing) {
    let s = Stack::start(pricing).await;
    let mut c = s.client().await;
    s.upstream
        .set_mode(Mode::Delay(Duration::from_millis(1000)));
    chat_given_up(&mut c, s.request("hi"), Duration::from_millis(300)).await;
    for _ in 0..50 {
        if !s.usage().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.assert_one_usage("cancelled").await;
    let row = s.usage().await.remove(0).usage.unwrap_or_default();
    assert!(row.latency_ms >= 250, "lasted {} ms", row.latency_ms);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.assert_one_usage("cancelled").await;
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_request_the_client_gave_up_on_leaves_a_row() {
    a_request_the_client_gave_up_on_leaves_a_row(Pricing::free()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_request_the_client_gave_up_on_leaves_a_row() {
    a_request_the_client_gave_up_on_leaves_a_row(Pricing::per_request(PRICE)).await;
}

/// Requests the HTTP fronts refuse before they are requests at all leave a row too: a body that is
/// not JSON (no user known), an option the router does not support and a `maxTokens` out of
/// range, tools or JSON mode (under the user they name), a malformed `Authorization` header
/// (`token_refused`, under no user: it proved none). None
/// reaches the upstream or moves money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_they_are_read_leave_rows() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let http = reqwest::Client::new();
    let send = |path: &str, key: &str, body: String| {
        http.post(format!("{}{path}", s.router.http_url))
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .body(body)
            .send()
    };
    let messages = json!([{"role": "user", "content": "hi"}]);
    let r = send("/v1/chat/completions", "u-1", "{not json".into()).await;
    assert_eq!(r.expect("http").status(), 400);
    let n2 = json!({"model": "test-model", "n": 2, "user": s.alice.email, "messages": messages});
    let r = send("/v1/chat/completions", "u-2", n2.to_string()).await;
    assert_eq!(r.expect("http").status(), 400);
    let huge = json!({"userEmail": s.alice.email, "model": "test-model", "messages": messages,
        "options": {"maxTokens": 10_000_000_000i64}});
    let r = send("/chat", "u-3", huge.to_string()).await;
    assert_eq!(r.expect("http").status(), 400);
    let chat = json!({"model": "test-model", "user": s.alice.email, "messages": messages});
    let r = http
        .post(s.router.chat_completions_url())
        .header("Idempotency-Key", "u-4")
        .header("Authorization", "Basic abc")
        .json(&chat)
        .send()
        .await;
    assert_eq!(r.expect("http").status(), 401);
    // Options that ask for another answer than text are refused, not dropped: the user would be
    // charged for an answer without the tool calls or the JSON asked for.
    let tools = json!({"model": "test-model", "user": s.alice.email, "messages": messages,
        "tools": [{"type": "function", "function": {"name": "f"}}]});
    let json_mode = json!({"model": "test-model", "user": s.alice.email, "messages": messages,
        "response_format": {"type": "json_object"}});
    let audio = json!({"model": "test-model", "user": s.alice.email, "messages": messages,
        "modalities": ["text", "audio"]});
    let no_content = json!({"model": "test-model", "user": s.alice.email,
        "messages": [{"role": "user", "content": null}]});
    // Neither is content (OpenAI refuses both); read as "", they were answered and charged.
    let no_parts = json!({"model": "test-model", "user": s.alice.email,
        "messages": [{"role": "user", "content": []}]});
    let no_text = json!({"model": "test-model", "user": s.alice.email,
        "messages": [{"role": "user", "content": [{"type": "text"}]}]});
    for (key, body, option) in [
        ("u-5", tools, "tools"),
        ("u-6", json_mode, "response_format"),
        ("u-7", audio, "modalities"),
        ("u-8", no_content, "messages[0]: content is required"),
        ("u-9", no_parts, "messages[0]: content is an empty list"),
        ("u-10", no_text, "messages[0]: a text part without its text"),
    ] {
        let r = send("/v1/chat/completions", key, body.to_string())
            .await
            .expect("http");
        assert_eq!(r.status(), 400);
        let error: serde_json::Value = r.json().await.expect("json");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(option), "{error}");
    }
    // The same on `/chat`, which read a message without content as "".
    let syft = json!({"userEmail": s.alice.email, "model": "test-model",
        "messages": [{"role": "user"}]});
    let r = send("/chat", "u-11", syft.to_string()).await.expect("http");
    assert_eq!(r.status(), 400);
    let error: serde_json::Value = r.json().await.expect("json");
    let detail = error["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("messages[0]: content is required"),
        "{error}"
    );

    let mut alice: Vec<(String, String, String)> = (s.usage().await.into_iter())
        .filter_map(|r| r.usage)
        .map(|u| (u.request_id, u.status, u.endpoint))
        .collect();
    alice.sort();
    let row = |id: &str, status: &str| (id.to_string(), status.to_string(), "/chat".to_string());
    assert_eq!(
        alice,
        vec![
            row("u-10", "invalid_request"),
            row("u-11", "invalid_request"),
            row("u-2", "invalid_request"),
            row("u-3", "invalid_request"),
            row("u-5", "invalid_request"),
            row("u-6", "invalid_request"),
            row("u-7", "invalid_request"),
            row("u-8", "invalid_request"),
            row("u-9", "invalid_request"),
        ]
    );
    let invalid = all_usage(&s.ledger.url, "invalid_request").await;
    let unnamed: Vec<_> = (invalid.into_iter())
        .filter(|u| u.user_email.is_empty())
        .map(|u| u.request_id)
        .collect();
    assert_eq!(unnamed, vec!["u-1".to_string()]);
    // A malformed `Authorization` header proved nothing about the user the body named.
    let refused = all_usage(&s.ledger.url, "token_refused").await;
    let refused: Vec<_> = refused
        .iter()
        .map(|u| (&*u.request_id, &*u.user_email))
        .collect();
    assert_eq!(refused, [("u-4", "")]);
    assert_eq!(s.upstream.hits(), 0);
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

/// A refusal names the request id its row is under, as an answer does, so a user can quote it and
/// the owner find the row: over HTTP in `x-syft-request-id` (a request without an
/// `Idempotency-Key` is given one), over gRPC in the status' metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_request_id_of_their_row() {
    let (s, http, url) = Stack::start_http(Pricing::per_request(PRICE)).await;
    let named = |r: &reqwest::Response| -> String {
        let id = r
            .headers()
            .get("x-syft-request-id")
            .expect("x-syft-request-id");
        // Also under the name the OpenAI SDKs read (`_request_id`, `error.requestID`).
        assert_eq!(r.headers().get("x-request-id"), Some(id), "x-request-id");
        id.to_str().expect("ascii").to_string()
    };
    // Refused while it is read (not JSON), and by the service (no token), both without a key.
    let unread = (http.post(&url).header("content-type", "application/json"))
        .body("{nope")
        .send()
        .await
        .expect("http");
    assert_eq!(unread.status(), 400);
    let chat = json!({"model": "test-model", "user": s.alice.email,
        "messages": [{"role": "user", "content": "hi"}]});
    let unpaid = http.post(&url).json(&chat).send().await.expect("http");
    assert_eq!(unpaid.status(), 402);
    // A client's own key is named as it came.
    let keyed = (http.post(&url).header("Idempotency-Key", "mine-1"))
        .json(&chat)
        .send()
        .await
        .expect("http");
    assert_eq!(named(&keyed), "mine-1");
    // `/chat` names its body's `requestId` (before the header), also when the body is refused
    // while it is converted.
    let huge = json!({"userEmail": s.alice.email, "model": "test-model", "requestId": "body-1",
        "messages": [{"role": "user", "content": "hi"}], "options": {"maxTokens": 10_000_000_000i64}});
    let body_id = (http.post(format!("{}/chat", s.router.http_url)))
        .header("Idempotency-Key", "header-1")
        .json(&huge)
        .send()
        .await
        .expect("http");
    assert_eq!(body_id.status(), 400);
    assert_eq!(named(&body_id), "body-1");
    // A key that is not text is named nowhere: its row is under a fresh `refused-` id.
    let not_text = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").expect("obs-text");
    let garbled = (http.post(&url).header("Idempotency-Key", not_text))
        .json(&chat)
        .send()
        .await
        .expect("http");
    assert_eq!(garbled.status(), 400);
    assert!(garbled.headers().get("x-syft-request-id").is_none());
    assert!(garbled.headers().get("x-request-id").is_none());
    // gRPC: no token, without a request id.
    let mut c = s.client().await;
    let mut req = s.request("hi");
    req.request_id = String::new();
    req.transaction_token = String::new();
    let status = c.chat(req).await.expect_err("no token");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let grpc = status.metadata().get("x-syft-request-id").expect("id");
    let grpc = grpc.to_str().expect("ascii").to_string();

    let ids: Vec<String> = (all_usage(&s.ledger.url, "").await.into_iter())
        .map(|u| u.request_id)
        .collect();
    for id in [
        named(&unread),
        named(&unpaid),
        "mine-1".into(),
        "body-1".into(),
        grpc,
    ] {
        assert!(ids.contains(&id), "{id} not among the rows {ids:?}");
    }
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert_eq!(
        ids.iter().filter(|id| id.starts_with("refused-")).count(),
        1
    );
    assert_eq!(s.upstream.hits(), 0);
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

/// A search sent to a router that offers none is refused and leaves its row, as a disabled chat
/// does (it used to leave none: the router answered before it knew the attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_on_a_router_without_search_leaves_a_row() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.models = vec!["test-model".into()];
    })
    .await;
    let mut c = s.client().await;
    let req = syft_proto::router::SearchRequest {
        request_id: "s-1".into(),
        ..s.search("anything")
    };
    assert_eq!(code(c.search(req).await), Code::FailedPrecondition);
    let rows = s.usage().await;
    let got: Vec<_> = rows
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .map(|u| {
            (
                u.request_id.as_str(),
                u.status.as_str(),
                u.endpoint.as_str(),
                u.model.as_str(),
            )
        })
        .collect();
    // No model: the router has no search backend to name (not its chat model).
    assert_eq!(got, vec![("s-1", "invalid_request", "/search", "")]);
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

/// The rows recorded under `request_id` (any user or none), 1.5 s on (a row is written after
/// its refusal is answered).
async fn rows_of(s: &Stack, request_id: &str) -> Vec<(String, String)> {
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    all_usage(&s.ledger.url, "")
        .await
        .into_iter()
        .filter(|u| u.request_id == request_id)
        .map(|u| (u.request_id, u.status))
        .collect()
}

/// A request dropped while its HTTP body was read has said nothing yet and leaves no row
/// (docs/router.md, "A request's admission outlives its client"). A client that sent its headers
/// and part of its body, then closed the connection, left an `invalid_request` row under its
/// `Idempotency-Key` (a reviewer's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_its_body_is_read_leaves_no_row() {
    use std::io::Write;
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let addr = s.router.http_url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    let part = format!(
        r#"{{"model":"test-model","user":"{}","messages":[{{"role":"user","content":"cut"#,
        s.alice.email
    );
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {}\r\nIdempotency-Key: dropped-mid-body\r\nContent-Length: 5000\r\n\r\n",
        s.token
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(part.as_bytes()).expect("part of the body");
    conn.flush().expect("flush");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(conn);
    let rows = rows_of(&s, "dropped-mid-body").await;
    assert!(
        rows.is_empty(),
        "a request dropped while its body was read left rows: {rows:?}"
    );
    assert_eq!(s.upstream.hits(), 0);
    s.check_invariants().await;
}

/// A live client whose chunked body is malformed is answered 400 and leaves its refusal row
/// (router.md: an unreadable body's refusal row is written); only a client that went away
/// mid-body leaves none (the test above). The first version of that rule took every body error
/// for a client gone (a diff reviewer's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_from_a_live_client_leaves_a_row() {
    use std::io::{Read, Write};
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let addr = s.router.http_url.trim_start_matches("http://").to_string();
    let answer = tokio::task::spawn_blocking({
        let token = s.token.clone();
        move || {
            let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
            conn.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok();
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n\
                 Authorization: Bearer {token}\r\nIdempotency-Key: malformed-chunked\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            );
            conn.write_all(head.as_bytes()).expect("head");
            conn.write_all(b"5\r\n{\"mod\r\nzz-not-a-chunk-size\r\n\r\n").expect("body");
            conn.flush().expect("flush");
            let mut out = Vec::new();
            let _ = conn.read_to_end(&mut out);
            String::from_utf8_lossy(&out).to_string()
        }
    })
    .await
    .expect("join");
    let rows = rows_of(&s, "malformed-chunked").await;
    let status_line = answer.lines().next().unwrap_or("").to_string();
    assert!(
        !rows.is_empty(),
        "the live client was answered {status_line:?} and left no row: {rows:?}"
    );
}

stack_suite!(
    refusals_leave_rows_and_free_the_request_id: Pricing::per_request(PRICE),
    concurrent_free_requests_each_leave_a_row: Pricing::free(),
    a_free_retry_after_a_failure_leaves_its_row: Pricing::free(),
);
