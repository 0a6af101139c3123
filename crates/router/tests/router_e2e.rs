//! End-to-end: router + real ledger + real in-process upstream. One test per behaviour of the
//! router issue's "Behaviour that must hold" list.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use syft_proto::ledger::{Actor, TransferStatus};
use syft_proto::router::{
    chat_stream_event, ChatOptions, ChatRequest, GetMetadataRequest, Message,
};
use syft_router_svc::{tokens, MaxTokensField, Pricing, RouterConfig, UpstreamConfig};
use syft_testkit::*;
use tonic::Code;

fn user_msg(content: &str) -> Vec<Message> {
    vec![Message {
        role: "user".into(),
        content: content.into(),
        name: None,
    }]
}

/// Sends an OpenAI-style request that must fail with `status`; the `error` object of its body.
async fn openai_error(request: reqwest::RequestBuilder, status: u16) -> Value {
    let resp = request.send().await.expect("http");
    assert_eq!(resp.status().as_u16(), status);
    let body: Value = resp.json().await.expect("json");
    body["error"].clone()
}

async fn wait_owner_balance(s: &Stack, want: i64) {
    for _ in 0..40 {
        if s.owner_balance().await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.owner_balance().await, want, "owner balance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_success_captures_exactly_the_price() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    let resp = c.chat(s.request("hi")).await.expect("chat").into_inner();
    assert_eq!(resp.cost_micros, PRICE);
    assert_eq!(resp.currency, "USD");
    assert_eq!(
        resp.message.as_ref().map(|m| m.content.as_str()),
        Some(CONTENT)
    );
    assert_eq!(resp.finish_reason, "stop");
    let usage = resp.usage.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (20, 5));
    assert_eq!(
        resp.provider_info.as_ref().map(|p| p.provider.as_str()),
        Some("openai")
    );

    // The answer came back only after the capture committed: no polling needed.
    let transfers = s.transfers().await;
    assert_eq!(transfers.len(), 1);
    let t = &transfers[0];
    assert_eq!(t.id, resp.transfer_id);
    assert_eq!(t.status(), TransferStatus::Completed);
    assert_eq!(t.captured_micros, PRICE);
    assert_eq!(t.app_name, "test-router");
    assert_eq!(t.app_ep_path, "/chat");
    assert_eq!(t.idempotency_key, resp.id);

    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    wait_owner_balance(&s, PRICE).await;

    let rows = s.usage().await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let u = row.usage.as_ref().expect("usage");
    assert_eq!(u.status, "success");
    assert_eq!(u.request_id, resp.id);
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (20, 5, 25)
    );
    assert!(u.latency_ms >= u.upstream_latency_ms);
    // Time to first token is a stream's measure only.
    assert_eq!(u.ttft_ms, None);
    assert_eq!(row.cost_micros, PRICE);
    assert_eq!(row.transfer_id, resp.transfer_id);

    assert_eq!(s.upstream.hits(), 1);
    let body = s.upstream.last_body().expect("upstream body");
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["max_tokens"], 100);
    // The upstream learns who is who by a pseudonym, never the payer's email.
    let user = body["user"].as_str().expect("user sent");
    assert!(user.starts_with("syft-") && user.len() == 37, "{user}");
    assert!(!body.to_string().contains(&s.alice.email), "{body}");
    s.check_invariants().await;
}

/// Priced per request (or free), a chat without `max_tokens` is sent none unless the owner set
/// `limits.default_max_tokens` (`bound_every_chat`): then that bound goes upstream, so the owner
/// does not pay the upstream for any length a user asks. Sent unasked, it broke upstreams that
/// refuse `max_tokens` or whose context is smaller than a prompt and 4,096 tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_may_bound_every_answer_whatever_its_price() {
    for pricing in [Pricing::per_request(PRICE), Pricing::free()] {
        let s = Stack::start(pricing.clone()).await;
        assert_eq!(
            s.max_tokens_sent_for_a_chat_without_one().await,
            Value::Null
        );
        s.check_invariants().await;
        let s = Stack::start_tweaked(pricing, |c| {
            c.limits.default_max_tokens = 300;
            c.limits.bound_every_chat = true;
        })
        .await;
        assert_eq!(s.max_tokens_sent_for_a_chat_without_one().await, 300);
        s.check_invariants().await;
    }
}

/// An upstream that counts more completion tokens than the limit it was sent (5 for a limit of 2)
/// is counted at the limit, in the answer's usage and in the usage row. The row used to keep
/// whatever it said (a billion tokens, in a new owner's trial) while the charge was capped at the
/// hold, so the owner's analytics and the user's token windows counted tokens nobody was sold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_tokens_past_the_limit_sent_are_counted_at_the_limit() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_token(0, 10_000_000)).await;
    let mut req = s.request("hi");
    req.options = Some(ChatOptions {
        max_tokens: Some(2),
        ..Default::default()
    });
    let resp = c.chat(req).await.expect("chat").into_inner();
    let usage = resp.usage.expect("usage");
    let prompt = UP_PROMPT as i64;
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (prompt, 2, prompt + 2)
    );
    assert_eq!(resp.cost_micros, 2 * 10);
    let rows = s.usage().await;
    let row = rows[0].usage.as_ref().expect("row");
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.total_tokens),
        (prompt, 2, prompt + 2)
    );
    s.assert_captured_once(20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_holds_the_maximum_and_captures_the_actual_cost() {
    let (input, output) = (3_000_000, 15_000_000); // $3 / $15 per million tokens
    let (s, mut c) = Stack::start_with_client(Pricing::per_token(input, output)).await;
    let req = s.request("count my tokens please");
    let counted_prompt = tokens::count_prompt(&req.messages);
    let resp = c.chat(req).await.expect("chat").into_inner();
    // Upstream reports 20 prompt + 5 completion tokens.
    let expected = (20 * 3) + (5 * 15);
    assert_eq!(resp.cost_micros, expected);
    let t = s.transfers().await;
    assert_eq!(t.len(), 1);
    assert_eq!(
        t[0].amount_micros,
        counted_prompt as i64 * 3 + 100 * 15,
        "hold = max cost"
    );
    assert_eq!(t[0].captured_micros, expected);
    assert_eq!(s.alice_money().await.0, FUNDS - expected);

    // Without upstream usage, the router counts with the tokenizer.
    s.upstream.set_mode(Mode::NoUsage);
    let req = s.request("count my tokens please");
    let resp = c.chat(req).await.expect("chat").into_inner();
    let completion = tokens::count_text(CONTENT) as i64;
    assert_eq!(
        resp.cost_micros,
        counted_prompt as i64 * 3 + completion * 15
    );
    let usage = resp.usage.expect("usage");
    assert_eq!(usage.prompt_tokens, counted_prompt as i64);
    assert_eq!(usage.completion_tokens, completion);
    assert_eq!(s.alice_money().await.0, FUNDS - expected - resp.cost_micros);
    let spent = expected + resp.cost_micros;

    // Usage with the prompt tokens only: the answer is counted, not charged as 0 tokens.
    s.upstream.set_mode(Mode::PromptUsageOnly);
    let resp = c
        .chat(s.request("count my tokens please"))
        .await
        .expect("chat");
    let resp = resp.into_inner();
    assert_eq!(resp.cost_micros, UP_PROMPT as i64 * 3 + completion * 15);
    assert_eq!(s.alice_money().await.0, FUNDS - spent - resp.cost_micros);

    // Without max_tokens the configured default bounds the hold and is sent upstream.
    let mut req = s.request("x");
    req.options = None;
    c.chat(req).await.expect("chat");
    let body = s.upstream.last_body().expect("body");
    assert_eq!(body["max_tokens"], 4096);
    s.check_invariants().await;
}

/// An upstream that cannot be reached: the void's reason, which the ledger keeps for good and
/// shows the payer, says so without the upstream's address (the transport's text named its whole
/// URL, path and query included, where a gateway may take its key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstreams_address_is_kept_from_the_payer() {
    let closed = closed_url();
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        if let UpstreamConfig::OpenAi(o) = &mut c.upstream {
            o.base_url = format!("{closed}/gateway-key-sk-hidden/v1");
        }
    })
    .await;
    let mut c = s.client().await;
    let err = c.chat(s.request("hi")).await.expect_err("unreachable");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!err.message().contains("sk-hidden"), "{err:?}");
    let transfers = s.transfers().await;
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    let reason = &transfers[0].cancel_reason;
    assert!(reason.starts_with("upstream unreachable"), "{reason}");
    let port = closed.rsplit(':').next().unwrap_or_default();
    for hidden in ["sk-hidden", "127.0.0.1", port, "url"] {
        assert!(!reason.contains(hidden), "{hidden} in {reason:?}");
    }
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_voided_and_recorded() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    let cases = [
        (Mode::Status(500), Code::Unavailable, "upstream_error"),
        (Mode::Status(400), Code::InvalidArgument, "upstream_error"),
        // A gateway's refusal of the request itself (a moderation flag), not of the router's key.
        (Mode::Status(403), Code::InvalidArgument, "upstream_error"),
        // An error body that never ends is read no further than its message needs (it used to
        // be read to the request's timeout).
        (Mode::EndlessError(500), Code::Unavailable, "upstream_error"),
        (Mode::Stall, Code::DeadlineExceeded, "timeout"),
        (Mode::Garbage, Code::Unavailable, "invalid_response"),
        (Mode::EmptyChoices, Code::Unavailable, "invalid_response"),
        // Error text the ledger would refuse as a void's reason (control characters, over 500
        // bytes): the void must still commit, with its row.
        (
            Mode::StatusBody(
                502,
                "<html>\r\n<body>502 Bad Gateway</body>\r\n</html>".into(),
            ),
            Code::Unavailable,
            "upstream_error",
        ),
        (
            Mode::StatusBody(
                400,
                json!({"error": {"message": "é".repeat(400), "type": "invalid_request_error"}})
                    .to_string(),
            ),
            Code::InvalidArgument,
            "upstream_error",
        ),
        // An error that quotes the prompt, as some servers and proxies write them.
        (
            Mode::StatusBody(
                400,
                json!({"error": {"message": "could not process input: patient Jane Roe HIV+"}})
                    .to_string(),
            ),
            Code::InvalidArgument,
            "upstream_error",
        ),
    ];
    for (mode, code, _) in &cases {
        s.upstream.set_mode(mode.clone());
        let err = c.chat(s.request("hi")).await.expect_err("must fail");
        assert_eq!(err.code(), *code, "{mode:?}: {err:?}");
        // The void is committed before the error is returned.
        assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS), "{mode:?}");
    }
    // The caller is told what the upstream said (it quotes the caller's own prompt)...
    let err = c.chat(s.request("hi")).await.expect_err("must fail");
    assert!(err.message().contains("Jane Roe"), "{err:?}");
    let transfers = s.transfers().await;
    assert_eq!(transfers.len(), cases.len() + 1);
    assert!(transfers
        .iter()
        .all(|t| t.status() == TransferStatus::Cancelled && t.captured_micros == 0));
    // ... but the ledger, which keeps a void's reason for good, is not: only the status.
    let reasons: Vec<&str> = transfers.iter().map(|t| t.cancel_reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .all(|r| !r.contains("Jane Roe") && !r.contains("é")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"upstream returned HTTP 400"),
        "{reasons:?}"
    );
    let rows = s.usage().await;
    let mut statuses: Vec<String> = rows
        .iter()
        .filter_map(|r| r.usage.as_ref().map(|u| u.status.clone()))
        .collect();
    statuses.sort();
    let mut want: Vec<String> = cases.iter().map(|c| c.2.to_string()).collect();
    want.push("upstream_error".into());
    want.sort();
    assert_eq!(statuses, want);
    assert!(rows.iter().all(|r| r.cost_micros == 0));
    assert_eq!(s.owner_balance().await, 0);

    // 503 is retried (max_retries = 1) before giving up; still nothing charged.
    let before = s.upstream.hits();
    s.upstream.set_mode(Mode::Status(503));
    let err = c.chat(s.request("hi")).await.expect_err("must fail");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(s.upstream.hits() - before, 2);
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_final_event_carries_usage_cost_and_transfer() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    let mut stream = ok(c.chat_stream(s.request("hi")).await);
    let mut text = String::new();
    let mut fin = None;
    while let Some(ev) = stream.next().await {
        match ev.expect("event").event {
            Some(chat_stream_event::Event::Delta(d)) => {
                assert!(fin.is_none(), "delta after final");
                text.push_str(&d.content);
            }
            Some(chat_stream_event::Event::Final(f)) => fin = Some(f),
            None => {}
        }
    }
    let fin = fin.expect("final event");
    assert_eq!(text, CONTENT);
    assert_eq!(fin.cost_micros, PRICE);
    assert_eq!(fin.finish_reason, "stop");
    assert_eq!(
        fin.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((20, 5))
    );
    let t = s.transfers().await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].id, fin.transfer_id);
    assert_eq!(t[0].status(), TransferStatus::Completed);
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    // The usage row carries the time to first token, within the whole request's latency.
    let rows = s.usage().await;
    let u = rows[0].usage.as_ref().expect("usage");
    let ttft = u.ttft_ms.expect("ttft of a stream");
    assert!((0..=u.latency_ms).contains(&ttft), "{u:?}");
    let body = s.upstream.last_body().expect("body");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_failures_are_voided() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    for (mode, code) in [
        (Mode::StreamStall, Code::DeadlineExceeded),
        (Mode::StreamGarbage, Code::Unavailable),
        (Mode::EmptyChoices, Code::Unavailable),
        (Mode::CutShort, Code::Unavailable),
        // `"finish_reason": ""` is not a finish: such a stream cut short was charged in full,
        // told "stop", and kept as the id's answer.
        (Mode::EmptyFinishCutShort, Code::Unavailable),
        (Mode::EmptyFinishStall, Code::DeadlineExceeded),
    ] {
        s.upstream.set_mode(mode.clone());
        let mut stream = ok(c.chat_stream(s.request("hi")).await);
        let mut last = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => assert!(
                    !matches!(ev.event, Some(chat_stream_event::Event::Final(_))),
                    "{mode:?}: a failed stream has no final event"
                ),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let err = last.unwrap_or_else(|| panic!("{mode:?}: stream must end with an error"));
        assert_eq!(err.code(), code, "{mode:?}: {err:?}");
        // Said to a client that holds part of an answer: it was not charged for it.
        assert!(err.message().ends_with("nothing was charged"), "{err:?}");
        assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS), "{mode:?}");
    }
    // A stream that fails before its first byte fails the call itself.
    s.upstream.set_mode(Mode::Status(500));
    let err = c.chat_stream(s.request("hi")).await.expect_err("must fail");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.message(),
        "upstream error (HTTP 500); nothing was charged"
    );
    // A JSON answer to a stream request whose body never comes meets the request's timeout (it
    // used to wait for ever, holding the request's slot).
    s.upstream.set_mode(Mode::JsonThenStall);
    let call = c.chat_stream(s.request("hi"));
    let err = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call ends")
        .expect_err("must fail");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let t = s.wait_no_pending(Duration::from_secs(3)).await;
    assert_eq!(t.len(), 8);
    assert!(t.iter().all(|t| t.status() == TransferStatus::Cancelled));
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    assert_eq!(s.usage().await.len(), 8);
    s.check_invariants().await;
}

/// An answer above the 4 MiB a standard gRPC client reads in one message (tonic's and grpc-go's
/// default; here an upstream that ignores the `max_tokens` it is sent):
/// unary, it was charged and then refused by the client, and its retry refused as charged (the
/// kept copy is 1 MiB at most); now it is the upstream's failure, voided. Streamed as one event,
/// it was one delta the client could not read, charged; now it comes in pieces, read and charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_above_a_grpc_message_is_never_charged_unread() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    s.upstream.set_mode(Mode::BigAnswer(5 * 1024 * 1024));
    let mut c = syft_proto::router::router_client::RouterClient::connect(s.router.grpc_url.clone())
        .await
        .expect("connect with the default message limits");
    let mut req = s.request("write a lot");
    req.request_id = "big-1".into();
    let err = c.chat(req.clone()).await.expect_err("too long to answer");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.message(),
        "upstream returned an invalid response; nothing was charged"
    );
    s.wait_no_pending(Duration::from_secs(3)).await;
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.assert_one_usage("invalid_response").await;
    // Streamed: as one event of an SSE stream, and as a JSON answer to the stream request (a
    // server that ignores `stream: true`), whose id is long too.
    for (mode, bytes) in [
        (Mode::BigAnswer(5 << 20), (5 << 20) + 3),
        (Mode::BigJsonAnswer(5 << 20, 200_000), 5 << 20),
    ] {
        s.upstream.set_mode(mode);
        let mut stream = ok(c.chat_stream(s.request("write a lot")).await);
        let mut text = String::new();
        let mut last = None;
        while let Some(ev) = stream.next().await {
            match ev.expect("every event can be read").event {
                Some(chat_stream_event::Event::Delta(d)) => text.push_str(&d.content),
                Some(chat_stream_event::Event::Final(f)) => last = Some(f),
                None => {}
            }
        }
        assert_eq!(text.len(), bytes);
        assert_eq!(last.expect("a final event").cost_micros, PRICE);
    }
    // Unary: a text within the limit, with an upstream id of 200,000 bytes (the answer echoes
    // it, cut to 256).
    s.upstream.set_mode(Mode::BigJsonAnswer(4_100_000, 200_000));
    let answer = c.chat(s.request("write a lot")).await.expect("readable");
    let info = answer.get_ref().provider_info.clone().unwrap_or_default();
    assert_eq!(info.upstream_id, "i".repeat(256));
    s.wait_no_pending(Duration::from_secs(3)).await;
    assert_eq!(s.alice_money().await.0, FUNDS - 3 * PRICE);
    s.check_invariants().await;
}

/// The upstream sends the whole answer and says it is finished, then fails (here a bad event in
/// place of `[DONE]`): the client has the whole answer, so it ends normally and is charged once.
/// Before, the late fault voided the hold: the client had the answer, an error, and no charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_after_its_finish_is_charged() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    s.upstream.set_mode(Mode::FinishThenGarbage);
    let mut stream = ok(c.chat_stream(s.request("hi")).await);
    let (text, last) = read_answer(&mut stream).await;
    assert_eq!(text, CONTENT);
    let last = last.expect("final event");
    assert_eq!(
        (last.finish_reason.as_str(), last.cost_micros),
        ("stop", PRICE)
    );
    let t = s.transfers().await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].status(), TransferStatus::Completed);
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    s.check_invariants().await;
}

/// A client whose deadline passes while the ledger is still placing its hold (its writes wait
/// on a table lock here): the hold commits after the request was dropped, and is voided at once
/// with a `cancelled` row. Before, nothing owned it: the user's money stayed held for the hold's
/// whole life (5 minutes here), and the request left no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_placed_after_its_client_gave_up_is_voided_at_once() {
    let Some(s) = Stack::on_postgres(Pricing::per_request(PRICE)).await else {
        return;
    };
    let mut c = s.client().await;
    ok(c.chat(s.request("before")).await);
    let lock = lock_transfers(&s.ledger.store).await;
    // 1 s: time for the authorization to reach the lock first, on a loaded machine too.
    chat_given_up(&mut c, s.request("given up"), Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.rollback().await.expect("unlock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = s.transfers().await;
        if t.len() == 2 && t.iter().all(|t| t.status() != TransferStatus::Pending) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hold left pending: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    let statuses = s.usage_statuses().await;
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert_eq!(statuses[0], "cancelled", "{statuses:?}");
    s.finish().await;
}

/// A client that leaves while the ledger is still deciding a hold it then refuses (the hold's
/// writes wait on a table lock here): the refusal still leaves its row, with its own status.
/// Before, the refusal came back to a request that was gone, and the request left no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_decided_after_its_client_gave_up_leaves_its_row() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    // A ledger call's deadline well past the lock's. One CI run saw this row `unavailable` (not
    // seen again in 21 runs under load here); the likeliest way is a refusal that came after the
    // default 5 s on a loaded machine, its outcome then unknown to the router.
    let s = Stack::start_with(
        db,
        Pricing::per_request(FUNDS + 1),
        Duration::from_secs(300),
        |c| {
            c.ledger.timeout = Duration::from_secs(60);
        },
    )
    .await;
    let mut c = s.client().await;
    let lock = lock_transfers(&s.ledger.store).await;
    // 1 s: time for the authorization to reach the lock first, on a loaded machine too.
    chat_given_up(&mut c, s.request("given up"), Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.rollback().await.expect("unlock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let statuses = loop {
        let statuses = s.usage_statuses().await;
        if !statuses.is_empty() {
            break statuses;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused request left no row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(statuses, ["insufficient_funds"]);
    assert!(s.transfers().await.is_empty());
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.finish().await;
}

/// A failed request's void cut short by its client's deadline (the ledger away meanwhile) is
/// finished in the background with the failure's own row once the ledger is back. It was
/// rewritten `cancelled`, "request cancelled", which takes a failure out of the owner's error
/// rates during exactly such an incident (a cancellation reviewer's finding, 2026-12-08).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failures_void_cut_by_its_client_keeps_the_failures_row() {
    let mut s = Stack::start(Pricing::per_request(PRICE)).await;
    // The upstream never answers: the request fails at its 1.5 s timeout, then voids.
    s.upstream.set_mode(Mode::Stall);
    let given_up = {
        let (mut c, req) = (s.client().await, s.request("stalls"));
        tokio::spawn(async move { chat_given_up(&mut c, req, Duration::from_millis(2_500)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.transfers().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no hold placed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The ledger goes away before the void: it is asked again until the client gives up, then
    // in the background.
    let addr = s.ledger.url.clone();
    s.ledger.stop_now().await;
    given_up.await.expect("client");
    s.ledger = LedgerServer::start_at(ledger_config(&s.db.url), &addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let statuses = loop {
        let statuses = s.usage_statuses().await;
        if !statuses.is_empty() {
            break statuses;
        }
        assert!(tokio::time::Instant::now() < deadline, "no row");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(statuses, ["timeout"]);
    let t = s.transfers().await;
    assert_eq!(t[0].status(), TransferStatus::Cancelled, "{t:?}");
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.finish().await;
}

/// An authorization whose outcome is unknown to the router (its call timed out while the ledger's
/// writes waited on a table lock, and the hold committed afterwards) is asked again until the
/// ledger answers: the request then runs on the hold it placed and is charged once. Before, the
/// router gave up at the first timeout: the client got `UNAVAILABLE` and the hold, which nothing
/// owned, kept the user's money for its whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_whose_outcome_was_unknown_is_settled() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let s = Stack::start_with(
        db,
        Pricing::per_request(PRICE),
        Duration::from_secs(300),
        |c| {
            c.ledger.timeout = Duration::from_millis(300);
        },
    )
    .await;
    let mut c = s.client().await;
    ok(c.chat(s.request("before")).await);
    let lock = lock_transfers(&s.ledger.store).await;
    let unlock = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        lock.rollback().await.expect("unlock");
    });
    let answer = ok(c.chat(s.request("after a timeout")).await);
    assert_eq!(answer.cost_micros, PRICE);
    unlock.await.expect("unlocked");
    let transfers = s.transfers().await;
    assert_eq!(transfers.len(), 2, "{transfers:?}");
    assert!(
        (transfers.iter()).all(|t| t.status() == TransferStatus::Completed),
        "{transfers:?}"
    );
    assert_eq!(
        s.alice_money().await,
        (FUNDS - 2 * PRICE, 0, FUNDS - 2 * PRICE)
    );
    assert_eq!(s.usage_statuses().await, ["success", "success"]);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancelling_a_stream_voids_the_hold() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    s.upstream
        .set_mode(Mode::SlowStream(Duration::from_millis(100)));
    {
        let mut stream = ok(c.chat_stream(s.request("hi")).await);
        let first = stream.next().await.expect("first").expect("ok");
        assert!(matches!(
            first.event,
            Some(chat_stream_event::Event::Delta(_))
        ));
        assert_eq!(s.alice_money().await.1, PRICE, "held while streaming");
        drop(stream);
        drop(c);
    }
    let t = s.assert_voided_once(Duration::from_secs(5)).await;
    assert_eq!(t.resolved_by(), Actor::Recipient);
    s.assert_one_usage("cancelled").await;
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_giving_up_on_a_unary_call_voids_the_hold() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;
    // The upstream answers long after the client's deadline.
    let (answer_after, deadline) = (Duration::from_millis(1000), Duration::from_millis(300));
    s.upstream.set_mode(Mode::Delay(answer_after));
    let mut req = tonic::Request::new(s.request("hi"));
    req.set_timeout(deadline);
    let err = c.chat(req).await.expect_err("client deadline");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    s.assert_voided_once(Duration::from_secs(5)).await;
    s.assert_one_usage("cancelled").await;
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_required_bad_token_and_insufficient_funds_never_call_upstream() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;

    let mut req = s.request("hi");
    req.transaction_token.clear();
    let err = refused(c.chat(req).await, Code::FailedPrecondition);
    let msg = err.message();
    assert!(msg.starts_with("payment required"), "{msg}");
    assert_eq!(reason(&err).as_deref(), Some("PAYMENT_REQUIRED"));

    let http = reqwest::Client::new();
    let no_token = http
        .post(s.router.chat_completions_url())
        .json(&json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "user": s.alice.email}));
    let error = openai_error(no_token, 402).await;
    assert_eq!(error["code"], "payment_required");
    assert!(error["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("payment required")));

    let mut req = s.request("hi");
    req.transaction_token = "not-a-real-token".into();
    let err = c.chat(req).await.expect_err("bad token");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let bob = create_account(&s.ledger.url, "bob").await;
    deposit(&s.ledger.url, &bob.email, PRICE / 2).await;
    let bob_token = issue_token(&s.ledger.url, &bob, &s.owner.email).await;
    let mut req = s.request("hi");
    req.user_email = bob.email.clone();
    req.transaction_token = bob_token.clone();
    let err = c.chat(req).await.expect_err("insufficient funds");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        reason(&err).as_deref(),
        Some("INSUFFICIENT_FUNDS"),
        "{err:?}"
    );
    assert_eq!(
        err.message(),
        "insufficient funds: this request costs 0.01 USD (the router's price per request); add \
         funds, then send it with a new request id (this one's refusal stands)"
    );
    // Over HTTP the OpenAI SDKs would send it twice more: told not to.
    let refused = http
        .post(s.router.chat_completions_url())
        .bearer_auth(&bob_token)
        .json(&json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "user": bob.email}))
        .send()
        .await
        .expect("http");
    assert_eq!(refused.status(), 409);
    assert_eq!(refused.headers()["x-should-retry"], "false");

    assert_eq!(s.upstream.hits(), 0);
    assert_eq!(
        account(&s.ledger.url, &bob.email).await.balance_micros,
        PRICE / 2
    );
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    assert!(s.transfers().await.is_empty());
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_funds_says_what_the_hold_reserves_and_how_to_reserve_less() {
    let (input, output) = (3_000_000, 10_000_000); // $3 / $10 per million tokens
    let (s, mut c) = Stack::start_with_client(Pricing::per_token(input, output)).await;
    let bob = create_account(&s.ledger.url, "bob").await;
    deposit(&s.ledger.url, &bob.email, 10_000).await; // $0.01
    let bob_token = issue_token(&s.ledger.url, &bob, &s.owner.email).await;
    let bob_req = |max_tokens: Option<u32>| {
        let mut req = s.request("hi");
        req.user_email = bob.email.clone();
        req.transaction_token = bob_token.clone();
        req.options = max_tokens.map(|m| ChatOptions {
            max_tokens: Some(m),
            ..Default::default()
        });
        req
    };
    let prompt = tokens::count_prompt(&bob_req(None).messages);
    assert_eq!(prompt, 8, "\"hi\" in OpenAI's chat framing");

    // No max_tokens: the router's default (4096) sizes the hold: 8 x 3 + 4096 x 10 = 40,984 micros.
    let default_msg =
        "insufficient funds: this request reserves 0.040984 USD (8 prompt tokens at 3 \
                       USD and up to 4096 completion tokens at 10 USD per million tokens; the \
                       request set no max_tokens, so the router's default applies); send a \
                       smaller max_tokens to reserve less, or add funds; either way with a new \
                       request id (this one's refusal stands). Only the actual cost is charged";
    let err = c.chat(bob_req(None)).await.expect_err("insufficient funds");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err).as_deref(), Some("INSUFFICIENT_FUNDS"));
    assert_eq!(err.message(), default_msg);

    let http = reqwest::Client::new();
    let url = s.router.chat_completions_url();
    let oai = |max_tokens: Option<u32>| {
        let mut body = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                              "user": bob.email});
        if let Some(m) = max_tokens {
            body["max_tokens"] = json!(m);
        }
        http.post(&url).bearer_auth(&bob_token).json(&body).send()
    };
    let resp = oai(None).await.expect("http");
    assert_eq!(resp.status().as_u16(), 409);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "insufficient_funds");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["message"], default_msg);

    // The request's own max_tokens sizes it: 8 x 3 + 2000 x 10 = 20,024 micros.
    let resp = oai(Some(2000)).await.expect("http");
    assert_eq!(resp.status().as_u16(), 409);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body["error"]["message"],
        "insufficient funds: this request reserves 0.020024 USD (8 prompt tokens at 3 USD and up \
         to 2000 completion tokens at 10 USD per million tokens; the request's max_tokens); send \
         a smaller max_tokens to reserve less, or add funds; either way with a new request id \
         (this one's refusal stands). Only the actual cost is charged"
    );
    assert_eq!(s.upstream.hits(), 0);

    // Following the advice works: 8 x 3 + 500 x 10 = 5,024 micros fits in $0.01.
    let resp = ok(c.chat(bob_req(Some(500))).await);
    assert_eq!(resp.cost_micros, 20 * 3 + 5 * 10);
    assert_eq!(
        account(&s.ledger.url, &bob.email).await.balance_micros,
        10_000 - resp.cost_micros
    );

    // A token's spend limit, and its daily limit, refuse the same hold: they say so too (they
    // said "requested 0.040984" of a request costing a thousandth of that).
    let mut alice = syft_ledger::client::connect_lazy(&s.ledger.url, &s.alice.secret).expect("c");
    for (limit, daily) in [(Some(10_000), None), (None, Some(10_000))] {
        let token = alice
            .issue_token(syft_proto::ledger::IssueTokenRequest {
                recipient_email: s.owner.email.clone(),
                spend_limit_micros: limit,
                limit_per_day_micros: daily,
                ..Default::default()
            })
            .await
            .expect("issue")
            .into_inner()
            .token;
        let req = |max_tokens: Option<u32>| ChatRequest {
            transaction_token: token.clone(),
            ..bob_req(max_tokens)
        };
        let req = |max_tokens| ChatRequest {
            user_email: s.alice.email.clone(),
            ..req(max_tokens)
        };
        let err = c.chat(req(None)).await.expect_err("over the token's limit");
        let code = [Code::PermissionDenied, Code::ResourceExhausted][usize::from(daily.is_some())];
        assert_eq!(err.code(), code, "{err:?}");
        assert!(
            err.message().contains(
                "; this request reserves 0.040984 USD (8 prompt tokens and up to 4096 completion \
                 tokens: the request set no max_tokens, so the router's default applies); send a \
                 smaller max_tokens to reserve less (only the actual cost is charged)"
            ),
            "{err:?}"
        );
        // The ledger keeps a spend limit's refusal under the key, not a daily limit's.
        let new_id = err
            .message()
            .ends_with("with a new request id (this one's refusal stands)");
        assert_eq!(new_id, limit.is_some(), "{err:?}");
        let named =
            ["TOKEN_LIMIT_EXCEEDED", "TOKEN_DAILY_LIMIT_EXCEEDED"][usize::from(daily.is_some())];
        assert_eq!(reason(&err).as_deref(), Some(named), "{err:?}");
        c.chat(req(Some(100)))
            .await
            .expect("within the token's limit");
    }
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_request_id_is_charged_once() {
    let (s, mut c) = Stack::start_with_client(Pricing::per_request(PRICE)).await;

    // Sequential retry: the stored answer again (tests/replay.rs has the details).
    let mut req = s.request("hi");
    req.request_id = "dup-sequential".into();
    let first = c.chat(req.clone()).await.expect("first").into_inner();
    assert_eq!(first.id, "dup-sequential");
    let again = c.chat(req).await.expect("replay").into_inner();
    assert!(again.replay);
    assert_eq!(again.transfer_id, first.transfer_id);
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);

    // Concurrent duplicates on one router.
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(300)));
    let mut req = s.request("hi");
    req.request_id = "dup-concurrent".into();
    let copies = (0..6).map(|_| {
        let (mut c, req) = (c.clone(), req.clone());
        async move { c.chat(req).await }
    });
    let in_progress = |e: &tonic::Status| e.code() == Code::AlreadyExists;
    assert_eq!(syft_testkit::count_succeeded(copies, in_progress).await, 1);
    assert_eq!(s.upstream.hits(), 2);
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);

    // Concurrent duplicates on two replicas: the ledger's idempotency still charges once.
    let replica = RouterHandle::start(s.router_config(Pricing::per_request(PRICE))).await;
    let mut c2 = replica.client().await;
    let mut req = s.request("hi");
    req.request_id = "dup-replicas".into();
    let (a, b) = tokio::join!(c.chat(req.clone()), c2.chat(req));
    let transfer_ids: Vec<String> = [a, b]
        .into_iter()
        .filter_map(|r| r.ok().map(|r| r.into_inner().transfer_id))
        .collect();
    assert!(!transfer_ids.is_empty(), "at least one replica answers");
    assert!(
        transfer_ids.windows(2).all(|w| w[0] == w[1]),
        "same transfer"
    );
    assert_eq!(s.alice_money().await.0, FUNDS - 3 * PRICE);

    // HTTP: the Idempotency-Key header is the request id.
    s.upstream.set_mode(Mode::Ok);
    let http = reqwest::Client::new();
    let send_as = |key: &'static str| {
        http.post(s.router.chat_completions_url())
            .bearer_auth(&s.token)
            .header("Idempotency-Key", key)
            .json(&json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "user": s.alice.email}))
            .send()
    };
    let send = || send_as("dup-http");
    assert_eq!(send().await.expect("http").status().as_u16(), 200);
    let second = send().await.expect("http");
    assert_eq!(second.status().as_u16(), 200);
    assert!(second.headers().get("x-syft-replay").is_some());
    assert_eq!(s.alice_money().await.0, FUNDS - 4 * PRICE);

    // A duplicate while the original runs is told when to come back (a second; without it the
    // SDKs retried after half a second) and that retrying helps: once the original is over, the
    // retry gets its stored answer.
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(500)));
    let send = || send_as("dup-http-running");
    let hits = s.upstream.hits();
    let original = tokio::spawn(send());
    while s.upstream.hits() == hits {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let running = send().await.expect("http");
    assert_eq!(running.status().as_u16(), 409);
    assert_eq!(running.headers()["retry-after"], "1");
    assert!(!running.headers().contains_key("x-should-retry"));
    let body: Value = running.json().await.expect("json");
    assert_eq!(body["error"]["code"], "already_exists", "{body}");
    assert_eq!(original.await.expect("joined").expect("http").status(), 200);
    let retry = send().await.expect("http");
    assert_eq!(retry.status().as_u16(), 200);
    assert!(retry.headers().get("x-syft-replay").is_some());
    assert_eq!(s.alice_money().await.0, FUNDS - 5 * PRICE);
    s.check_invariants().await;
}

/// Request ids (idempotency keys) are scoped per paying user: two users of one router who send
/// the same id at the same time both get their answer, are each charged once, and each get their
/// own usage row; each user's own retry replays that user's own answer.
async fn two_users_with_one_request_id_are_each_charged_once(db: Db) {
    let s = Stack::start_on(db, Pricing::per_request(PRICE)).await;
    let bob = create_account(&s.ledger.url, "bob").await;
    deposit(&s.ledger.url, &bob.email, FUNDS).await;
    let bob_token = issue_token(&s.ledger.url, &bob, &s.owner.email).await;
    let mut c = s.client().await;
    // Slow answers, so both requests are in flight together (the router's in-flight claim).
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(300)));
    let mut alice_req = s.request("hi");
    alice_req.request_id = "req-1".into();
    let mut bob_req = alice_req.clone();
    bob_req.user_email = bob.email.clone();
    bob_req.transaction_token = bob_token.clone();
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(c.chat(alice_req.clone()), c2.chat(bob_req.clone()));
    let (a, b) = (a.expect("alice").into_inner(), b.expect("bob").into_inner());
    assert_ne!(a.transfer_id, b.transfer_id);
    assert_eq!((a.cost_micros, b.cost_micros), (PRICE, PRICE));
    assert_eq!(s.upstream.hits(), 2);
    for (email, transfer_id) in [
        (&s.alice.email, &a.transfer_id),
        (&bob.email, &b.transfer_id),
    ] {
        let money = account(&s.ledger.url, email).await;
        assert_eq!(
            (money.balance_micros, money.held_micros),
            (FUNDS - PRICE, 0),
            "{email}"
        );
        let rows = usage_of(&s.ledger.url, email).await;
        assert_eq!(rows.len(), 1, "{email}: {rows:?}");
        assert_eq!(&rows[0].transfer_id, transfer_id);
        assert_eq!(
            rows[0].usage.as_ref().map(|u| u.request_id.as_str()),
            Some("req-1")
        );
    }
    // Each user's retry of its own id replays its own answer, and is not charged again.
    s.upstream.set_mode(Mode::Ok);
    for (req, transfer_id) in [(alice_req, &a.transfer_id), (bob_req, &b.transfer_id)] {
        let again = c.chat(req).await.expect("replay").into_inner();
        assert!(again.replay);
        assert_eq!(&again.transfer_id, transfer_id);
    }
    assert_eq!(s.upstream.hits(), 2);
    assert_eq!(s.owner_balance().await, 2 * PRICE);
    s.finish().await;
}

syft_testkit::db_suite!(two_users_with_one_request_id_are_each_charged_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_between_authorize_and_capture_pays_nothing() {
    let s = Stack::start_with(
        Db::sqlite(),
        Pricing::per_request(PRICE),
        Duration::from_secs(1),
        |_| {},
    )
    .await;
    s.upstream.set_mode(Mode::Stall);
    // A router on its own runtime, so that it can be killed without running any cleanup.
    let mut config = s.router_config(Pricing::per_request(PRICE));
    if let syft_router_svc::UpstreamConfig::OpenAi(o) = &mut config.upstream {
        o.request_timeout = Duration::from_secs(60);
    }
    let router = KillableRouter::start(config);
    let grpc_url = router.grpc_url.clone();
    let mut c = syft_proto::router::router_client::RouterClient::connect(grpc_url)
        .await
        .expect("connect");
    let req = s.request("hi");
    let call = tokio::spawn(async move { c.chat(req).await });
    // Wait for the hold.
    let mut pending = false;
    for _ in 0..100 {
        if s.transfers()
            .await
            .iter()
            .any(|t| t.status() == TransferStatus::Pending)
        {
            pending = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pending, "hold authorized");
    assert_eq!(s.alice_money().await.1, PRICE);
    router.kill(); // the router dies: no capture, no void
    assert!(call.await.expect("join").is_err());

    let t = s.wait_no_pending(Duration::from_secs(10)).await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].status(), TransferStatus::Cancelled);
    assert_eq!(t[0].resolved_by(), Actor::System, "expired, not voided");
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    assert_eq!(s.owner_balance().await, 0);
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_unreachable_fails_paid_requests_but_not_free_ones() {
    let upstream = FakeUpstream::start().await;
    let closed = closed_url();
    let paid = router_with_no_ledger("paid", &closed, Pricing::per_request(PRICE), &upstream).await;
    let free = router_with_no_ledger("free", &closed, Pricing::free(), &upstream).await;
    let req = ChatRequest {
        model: "m".into(),
        ..chat_request("alice@example.com", "tok", "hi")
    };
    let mut to_paid = paid.client().await;
    refused(to_paid.chat(req.clone()).await, Code::Unavailable);
    refused(to_paid.chat_stream(req.clone()).await, Code::Unavailable);
    assert_eq!(upstream.hits(), 0);
    let resp = free
        .client()
        .await
        .chat(req)
        .await
        .expect("free works")
        .into_inner();
    assert_eq!(resp.cost_micros, 0);
    assert!(resp.transfer_id.is_empty());
    assert_eq!(upstream.hits(), 1);
}

/// A router named `name` whose ledger at `ledger_url` never answers (closed or hung), over
/// `upstream`.
async fn router_with_no_ledger(
    name: &str,
    ledger_url: &str,
    pricing: Pricing,
    upstream: &FakeUpstream,
) -> RouterHandle {
    let config = router_config(
        name,
        "owner@example.com",
        "secret",
        ledger_url,
        pricing,
        Some(&upstream.base_url),
    );
    RouterHandle::start(config).await
}

/// A ledger that takes connections and never answers: each free answer waits one ledger call
/// timeout (2 s here) for its row, then is served as with an unreachable ledger. Rows sent while
/// the usage sender's call is out wait at most a few milliseconds for it to come back
/// (`crates/router/src/usage_send.rs`), so the later requests below are not held behind the first
/// call's timeout as well as their own (that would be about 4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_ledger_holds_free_answers_back_by_one_timeout() {
    let upstream = FakeUpstream::start().await;
    // Connections are taken by the kernel and read by this task, and nothing is ever written back.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", hung.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = hung.accept().await {
            held.push(sock);
        }
    });
    let free = router_with_no_ledger("free", &url, Pricing::free(), &upstream).await;
    let mut waves = Vec::new();
    for n in 0..3 {
        let mut client = free.client().await;
        let req = ChatRequest {
            model: "m".into(),
            request_id: format!("wave-{n}"),
            ..chat_request("alice@example.com", "", "hi")
        };
        waves.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = client.chat(req).await.expect("served without its row");
            (resp.into_inner().cost_micros, started.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (n, wave) in waves.into_iter().enumerate() {
        let (cost, took) = wave.await.expect("join");
        assert_eq!(cost, 0);
        assert!(
            // Held behind the first call's timeout as well, the third would take 3.6 s.
            took >= Duration::from_millis(1500) && took < Duration::from_millis(3400),
            "request {n} took {took:?}: one 2 s ledger timeout expected"
        );
    }
    server.abort();
}

/// The ledger stays away past the hold's life (1 s): the router settles the capture until then,
/// then gives up without an answer; nothing was captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_answer_is_withheld_when_capture_cannot_commit() {
    let mut s = Stack::start_with(
        Db::sqlite(),
        Pricing::per_request(PRICE),
        Duration::from_secs(1),
        |_| {},
    )
    .await;
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(600)));
    let mut c = s.client().await;
    let req = s.request("hi");
    let call = tokio::spawn(async move { c.chat(req).await });
    // Let the hold be authorized, then take the ledger away before the upstream answers.
    s.wait_pending(Duration::from_secs(1)).await;
    s.ledger.stop_now().await;
    let result = call.await.expect("join");
    let err = result.expect_err("no answer without a committed capture");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(s.upstream.hits(), 1);
    // Back up: nothing was captured.
    s.ledger = LedgerServer::start(ledger_config(&s.db.url)).await;
    let t = s.transfers().await;
    assert_eq!(t.len(), 1);
    assert_ne!(t[0].status(), TransferStatus::Completed);
    assert_eq!(s.alice_money().await.0, FUNDS);
}

/// JSON text of `s` with every non-ASCII character written as `\uXXXX` (surrogate pairs above
/// the BMP), as Python's `json.dumps` writes it by default (`ensure_ascii=True`: `requests`,
/// `aiohttp`, httpx before 0.28 and so the openai SDKs built on it).
fn ascii_json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// A prompt within `max_prompt_bytes`, sent as valid JSON that escapes its non-ASCII text (what
/// every Python client using the standard `json` module sends), is answered. The body limit was
/// `2 × max_prompt_bytes + 64 KiB`, but `\uXXXX` is 3× a 2-byte character (Cyrillic, Greek,
/// Arabic, accented Latin) and 3× an emoji (12 bytes for 4): such a prompt from two thirds of the
/// limit up was refused "larger than the router's limit" (a reviewer's finding with the openai
/// Python SDK).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_within_the_limit_is_not_refused_for_its_json_escapes() {
    const MAX_PROMPT: usize = 1_000_000;
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.limits.max_prompt_bytes = MAX_PROMPT;
    })
    .await;
    // 900,000 bytes of UTF-8 (Russian text): well within the prompt limit.
    let prompt = "Привет мир ".repeat(900_000 / "Привет мир ".len());
    assert!(prompt.len() < MAX_PROMPT - 50_000, "{}", prompt.len());
    let body = format!(
        r#"{{"model": "test-model", "user": "{}", "messages": [{{"role": "user", "content": {}}}]}}"#,
        s.alice.email,
        ascii_json_string(&prompt)
    );
    // The same JSON value as the UTF-8 body.
    let parsed: Value = serde_json::from_str(&body).expect("valid JSON");
    assert_eq!(parsed["messages"][0]["content"], json!(prompt));
    let resp = reqwest::Client::new()
        .post(s.router.chat_completions_url())
        .bearer_auth(&s.token)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("http");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    assert_eq!(
        status,
        200,
        "a {}-byte prompt (limit {MAX_PROMPT}) sent as a {}-byte ASCII-escaped body: {text}",
        prompt.len(),
        body.len()
    );
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_rejected_and_nothing_is_charged() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c: &mut RouterConfig| {
        c.limits.max_prompt_bytes = 10_000
    })
    .await;
    let mut c = s.client().await;
    let opts = |f: fn(&mut ChatOptions)| {
        let mut o = ChatOptions::default();
        f(&mut o);
        Some(o)
    };
    let case = |name: &'static str, edit: &dyn Fn(&mut ChatRequest)| {
        let mut r = s.request("hi");
        edit(&mut r);
        (name, r)
    };
    let cases = [
        case("no messages", &|r| r.messages.clear()),
        case("unknown role", &|r| r.messages[0].role = "wizard".into()),
        case("temperature 3", &|r| {
            r.options = opts(|o| o.temperature = Some(3.0))
        }),
        case("top_p 1.5", &|r| r.options = opts(|o| o.top_p = Some(1.5))),
        case("max_tokens 0", &|r| {
            r.options = opts(|o| o.max_tokens = Some(0))
        }),
        case("max_tokens 1e9", &|r| {
            r.options = opts(|o| o.max_tokens = Some(1_000_000_000))
        }),
        case("bad email", &|r| r.user_email = "not-an-email".into()),
        case("prompt over limit", &|r| {
            r.messages = user_msg(&"x".repeat(20_000))
        }),
    ];
    for (name, req) in cases {
        let err = c.chat(req.clone()).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        let err = c.chat_stream(req).await.expect_err(name);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name} (stream): {err:?}"
        );
    }
    // Far above the limit the transport refuses the message itself.
    let mut r = s.request("hi");
    r.messages = user_msg(&"x".repeat(2 * 1024 * 1024));
    let err = c.chat(r).await.expect_err("huge");
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{err:?}"
    );
    // A list longer than any router accepts is refused before it is decoded (an empty message is
    // 2 bytes on the wire and 72 decoded: 5 MiB of them cost hundreds of MiB); one at the bound
    // is decoded and refused by validation, as any list over `max_messages`.
    let mut r = s.request("hi");
    r.messages = vec![Message::default(); syft_proto::codec::ROUTER_MAX_FIELDS + 1];
    let err = c.chat(r).await.expect_err("too many entries");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("before decoding"), "{err:?}");
    // The one list inside a field of a request is counted too.
    let mut r = s.request("hi");
    r.options =
        opts(|o| o.stop_sequences = vec![String::new(); syft_proto::codec::MAX_NESTED_ENTRIES + 1]);
    let err = c.chat(r).await.expect_err("too many stop sequences");
    assert!(err.message().contains("before decoding"), "{err:?}");
    // A request that is not protobuf at all for its type (a user email that is not UTF-8) is the
    // caller's fault: `INVALID_ARGUMENT`, where tonic said `INTERNAL`.
    let err = undecodable_chat(&s.router.grpc_url).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("does not decode"), "{err:?}");
    let mut r = s.request("hi");
    r.messages = vec![Message::default(); syft_proto::codec::MAX_LIST_ENTRIES];
    let err = c.chat_stream(r).await.expect_err("over max_messages");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("too many messages"), "{err:?}");
    // HTTP: 400 with an OpenAI error body.
    let no_messages = reqwest::Client::new()
        .post(s.router.chat_completions_url())
        .bearer_auth(&s.token)
        .json(&json!({"model": "test-model", "messages": [], "user": s.alice.email}));
    let error = openai_error(no_messages, 400).await;
    assert_eq!(error["type"], "invalid_request_error");
    // The Syft `/chat` body's lists are refused as they are read, as the OpenAI front's (a list
    // past its bound used to be read whole first: within the default 8 MiB body, millions of
    // empty entries decoded to hundreds of MiB before validation counted them).
    let too_many = [
        (json!({"stopSequences": vec![""; 2_000]}), "stop sequences"),
        (json!({"stop_sequences": vec![""; 5]}), "stop sequences"),
    ];
    for (options, what) in too_many {
        let body = json!({"userEmail": s.alice.email, "options": options,
                          "messages": [{"role": "user", "content": "hi"}]});
        let resp = reqwest::Client::new()
            .post(format!("{}/chat", s.router.http_url))
            .bearer_auth(&s.token)
            .json(&body)
            .send()
            .await
            .expect("http");
        assert_eq!(resp.status().as_u16(), 400, "{what}");
        let text = resp.text().await.expect("body");
        // Refused by the reader (serde names the place), not by validation after it.
        assert!(
            text.contains("at most 4 stop sequences") && text.contains("column"),
            "{what}: {text}"
        );
    }

    assert_eq!(s.upstream.hits(), 0);
    assert!(s.transfers().await.is_empty());
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
}

/// An upstream configured with `max_tokens_field = "max_completion_tokens"` (OpenAI's reasoning
/// models refuse `max_tokens`) gets the limit under that name, and only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_limit_goes_in_the_field_the_upstream_takes() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c: &mut RouterConfig| {
        if let UpstreamConfig::OpenAi(o) = &mut c.upstream {
            o.max_tokens_field = MaxTokensField::MaxCompletionTokens;
        }
    })
    .await;
    let mut req = s.request("hi");
    req.options = Some(ChatOptions {
        max_tokens: Some(50),
        ..Default::default()
    });
    s.client().await.chat(req).await.expect("answer");
    let up = s.upstream.last_body().expect("body");
    assert_eq!(up["max_completion_tokens"], 50);
    assert!(up.get("max_tokens").is_none(), "{up}");
    s.finish().await;
}

/// `reasoning_effort` reaches the upstream from every front (it was dropped: a client asking for
/// `low` got the upstream's default and paid for its reasoning tokens); a malformed one, and a
/// `service_tier` other than the default (priced apart by the upstream), are refused before any
/// money moves. Sending the same request id with another effort is another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_effort_is_passed_on_and_other_tiers_refused() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let mut req = s.request("think");
    req.request_id = "effort-1".into();
    req.options = Some(ChatOptions {
        reasoning_effort: Some("low".into()),
        ..Default::default()
    });
    let mut c = s.client().await;
    c.chat(req.clone()).await.expect("gRPC answer");
    assert_eq!(
        s.upstream.last_body().expect("body")["reasoning_effort"],
        "low"
    );
    req.options = Some(ChatOptions {
        reasoning_effort: Some("high".into()),
        ..Default::default()
    });
    let err = c.chat(req).await.expect_err("same id, other effort");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("other content"), "{err:?}");

    let http = reqwest::Client::new();
    let send = |extra: Value| s.openai_chat(extra).send();
    let r =
        send(json!({"reasoning_effort": "minimal", "service_tier": "auto", "verbosity": "medium"}))
            .await
            .expect("http");
    assert_eq!(r.status(), 200);
    let up = s.upstream.last_body().expect("body");
    assert_eq!(up["reasoning_effort"], "minimal");
    assert!(up.get("service_tier").is_none(), "{up}");
    let syft = http
        .post(format!("{}/chat", s.router.http_url))
        .json(
            &json!({"userEmail": s.alice.email, "model": "test-model", "transactionToken": s.token,
                      "messages": [{"role": "user", "content": "hi"}],
                      "options": {"reasoningEffort": "medium"}}),
        )
        .send()
        .await
        .expect("syft /chat");
    assert_eq!(syft.status(), 200);
    assert_eq!(
        s.upstream.last_body().expect("body")["reasoning_effort"],
        "medium"
    );
    let hits = s.upstream.hits();
    for (extra, says) in [
        (json!({"reasoning_effort": "LOW"}), "reasoning_effort"),
        (
            json!({"reasoning_effort": "a".repeat(17)}),
            "reasoning_effort",
        ),
        (json!({"service_tier": "priority"}), "service_tier"),
        // Dropped, a shorter answer asked for was answered (and charged) at the default length.
        (json!({"verbosity": "low"}), "verbosity"),
        (json!({"web_search_options": {}}), "web_search_options"),
    ] {
        let r = send(extra.clone()).await.expect("http");
        assert_eq!(r.status(), 400, "{extra}");
        let body: Value = r.json().await.expect("json");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{extra}: {body}");
    }
    assert_eq!(s.upstream.hits(), hits, "refused before the upstream");
    s.assert_spent(3 * PRICE).await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_front_speaks_openai_json_and_sse() {
    let (s, http, url) = Stack::start_http(Pricing::per_request(PRICE)).await;
    let resp = http
        .post(&url)
        .bearer_auth(&s.token)
        .header("Idempotency-Key", "http-json-1")
        .json(&json!({"model": "test-model", "messages": [{"role": "developer", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      "user": s.alice.email, "max_tokens": 50, "temperature": 0.3, "stop": "\n\n"}))
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status().as_u16(), 200);
    // The request id under the OpenAI SDKs' name too (`_request_id` in openai-node).
    let openai_id = resp.headers().get("x-request-id").cloned();
    assert_eq!(
        openai_id.as_ref().map(|v| v.as_bytes()),
        Some(&b"http-json-1"[..])
    );
    let cost_header = resp
        .headers()
        .get("x-syft-cost-micros")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let transfer_header = resp
        .headers()
        .get("x-syft-transfer-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(cost_header.as_deref(), Some(PRICE.to_string().as_str()));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], CONTENT);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 25);
    assert_eq!(body["syft"]["cost_micros"], PRICE);
    assert_eq!(body["syft"]["currency"], "USD");
    assert_eq!(body["syft"]["request_id"], "http-json-1");
    assert_eq!(
        body["syft"]["transfer_id"].as_str(),
        transfer_header.as_deref()
    );
    let up = s.upstream.last_body().expect("body");
    assert_eq!(up["max_tokens"], 50);
    assert_eq!(up["stop"], json!(["\n\n"]));
    // As the client wrote it, not widened from f32 (0.30000001192092896).
    assert_eq!(up["temperature"], json!(0.3));
    // OpenAI's `developer` role is sent on as `system`, which every upstream knows.
    assert_eq!(up["messages"][0]["role"], "system");

    let resp = http
        .post(&url)
        .bearer_auth(&s.token)
        .json(&json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                      "user": s.alice.email, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers().get("x-syft-transfer-id").is_some());
    assert_eq!(
        resp.headers().get("x-request-id"),
        resp.headers().get("x-syft-request-id"),
        "a stream names its id under both names"
    );
    assert!(resp.headers().get("x-request-id").is_some());
    let text = resp.text().await.expect("sse body");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .collect();
    assert_eq!(data.last().copied(), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, CONTENT);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let finals: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["syft"]["cost_micros"] == PRICE)
        .collect();
    assert!(!finals.is_empty(), "cost in the final chunk");
    assert!(chunks
        .iter()
        .any(|c| c["choices"] == json!([]) && c["usage"]["total_tokens"] == 25));
    // Once: clients that add up every chunk's usage would count a second copy.
    let usages = chunks.iter().filter(|c| c["usage"].is_object()).count();
    assert_eq!(usages, 1, "usage on the last chunk only");
    assert_eq!(finals.len(), 1, "the cost once, on the last chunk");

    let models = get_json(&http, &format!("{}/v1/models", s.router.http_url)).await;
    assert_eq!(models["object"], "list");
    // A router that lists no models passes any on, and retrieves any (`one_model_is_retrieved`).
    let one = get_json(
        &http,
        &format!("{}/v1/models/test-model", s.router.http_url),
    )
    .await;
    assert_eq!(one["id"], "test-model");
    let health = http
        .get(format!("{}/healthz", s.router.http_url))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);

    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_upstream_runs_offline_and_metadata_shows_pricing() {
    let db = Db::sqlite();
    let funded = Funded::start(&db, Duration::from_secs(300)).await;
    let mut config = funded.router_config("echo-router", Pricing::per_request(PRICE), None);
    let Funded {
        ledger,
        owner,
        alice,
        token,
    } = funded;
    config.description = "an echo".into();
    let router = RouterHandle::start(config).await;
    let mut c = router.client().await;
    let meta = ok(c.get_metadata(GetMetadataRequest {}).await);
    assert_eq!(meta.name, "echo-router");
    assert_eq!(meta.owner_email, owner.email);
    assert_eq!(meta.models, vec!["echo".to_string()]);
    let svc = &meta.services[0];
    assert_eq!(svc.r#type, "chat");
    assert!(svc.enabled);
    // The default: a stream its client leaves costs nothing, and payers are told so.
    assert_eq!(svc.left_streams, "void");
    let p = svc.pricing.as_ref().expect("pricing");
    assert_eq!(
        (p.pricing_type.as_str(), p.amount_micros),
        ("per_request", PRICE)
    );

    let req = chat_request(&alice.email, &token, "hello echo");
    let resp = c.chat(req.clone()).await.expect("echo").into_inner();
    assert_eq!(
        resp.message.map(|m| m.content),
        Some("echo: hello echo".to_string())
    );
    assert_eq!(
        resp.provider_info.map(|p| p.provider),
        Some("echo".to_string())
    );
    assert_eq!(resp.model, "echo");
    assert_eq!(resp.cost_micros, PRICE);

    // The echo failure trigger is voided like any upstream failure.
    let mut fail = req;
    fail.messages = user_msg(&format!("{} boom", syft_router_svc::ECHO_FAIL_TRIGGER));
    let err = c.chat(fail).await.expect_err("simulated failure");
    assert_eq!(err.code(), Code::Unavailable);
    let a = account(&ledger.url, &alice.email).await;
    assert_eq!((a.balance_micros, a.held_micros), (FUNDS - PRICE, 0));
    assert_consistent(&ledger.store).await;
}

/// The core money scenarios again on Postgres (DATABASE_URL), when available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paid_flow() {
    let Some(s) = Stack::on_postgres(Pricing::per_request(PRICE)).await else {
        return;
    };
    let mut c = s.client().await;
    let resp = c.chat(s.request("hi")).await.expect("chat").into_inner();
    assert_eq!(resp.cost_micros, PRICE);
    s.upstream.set_mode(Mode::Status(500));
    assert!(c.chat(s.request("hi")).await.is_err());
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(200)));
    let mut req = s.request("hi");
    req.request_id = "pg-dup".into();
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(c2.chat(req.clone()), c.chat(req));
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1);
    assert_eq!(
        s.alice_money().await,
        (FUNDS - 2 * PRICE, 0, FUNDS - 2 * PRICE)
    );
    s.finish().await;
}

/// A `Chat` call whose `user_email` (field 1) holds bytes that are not UTF-8, as no generated
/// client can send.
async fn undecodable_chat(grpc_url: &str) -> tonic::Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Raw {
        #[prost(bytes = "vec", tag = "1")]
        user_email: Vec<u8>,
    }
    let channel = tonic::transport::Endpoint::from_shared(grpc_url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = syft_proto::codec::RouterCodec::<Raw, syft_proto::router::ChatResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/syft.router.v1.Router/Chat");
    let raw = Raw {
        user_email: vec![b'a', 0xff, 0xfe],
    };
    grpc.unary(tonic::Request::new(raw), path, codec)
        .await
        .expect_err("not UTF-8")
}

/// An unknown path or method answers in the API's error shape (they were empty bodies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_answer_with_an_error_body() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let http = reqwest::Client::new();
    let body = openai_error(http.get(format!("{}/v1/nope", s.router.http_url)), 404).await;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("no such endpoint"), "{body}");
    let body = openai_error(http.get(s.router.chat_completions_url()), 405).await;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("method GET"), "{body}");
}

/// A 409 for a spent request id: `reason`, a message that `says`, and `x-should-retry: false`.
async fn spent_id(resp: reqwest::Response, reason: &str, says: &str) {
    assert_eq!(resp.status(), 409);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(resp.headers()["x-syft-error-reason"], reason);
    let body: Value = resp.json().await.expect("json");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{body}");
}

/// A request id whose request is over, or that a request with other parameters used, is spent:
/// a retry with it gets the same 409 whatever happens meanwhile, so the OpenAI SDKs are told not
/// to spend their retries on it (with an `Idempotency-Key` they resend it twice, and the real
/// cause, the first answer, is lost behind two 409s). A request that failed is not over: it
/// charged and answered nothing, so its id is tried again (the SDKs' retries of a 503 with a key
/// used to end in a 409), under a hold of its own, charged once, and replayed after.
#[tokio::test]
async fn a_spent_request_id_is_not_retried_by_the_sdks() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let http = reqwest::Client::new();
    let send = |key: &str, token: &str| {
        http.post(s.router.chat_completions_url())
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(
                &json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                          "user": s.alice.email}),
            )
            .send()
    };
    s.upstream.set_mode(Mode::Status(500));
    for _ in 0..2 {
        let failed = send("failed-once", &s.token).await.expect("http");
        assert_eq!(failed.status(), 503);
        assert!(!failed.headers().contains_key("x-should-retry"));
    }
    s.upstream.set_mode(Mode::Ok);
    let again = send("failed-once", &s.token).await.expect("http");
    assert_eq!(again.status(), 200, "a failed request's id is tried again");
    let answered: Value = again.json().await.expect("json");
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE, "charged once");
    let replayed = send("failed-once", &s.token).await.expect("http");
    assert_eq!(replayed.status(), 200);
    assert_eq!(replayed.headers()["x-syft-replay"], "true");
    let replayed: Value = replayed.json().await.expect("json");
    assert_eq!(replayed["choices"], answered["choices"]);
    assert_eq!(s.upstream.hits(), 3, "two failed tries and one answered");
    let mut tries: Vec<_> = s
        .transfers()
        .await
        .into_iter()
        .map(|t| (t.idempotency_key.clone(), t.status()))
        .collect();
    tries.sort_by(|x, y| x.0.cmp(&y.0));
    let (cancelled, completed) = (TransferStatus::Cancelled, TransferStatus::Completed);
    assert_eq!(
        tries,
        [
            ("failed-once".to_string(), cancelled),
            ("failed-once (attempt 2)".to_string(), cancelled),
            ("failed-once (attempt 3)".to_string(), completed)
        ]
    );
    // The answered request's id is spent: other content under it is refused, not retried.
    let other = http
        .post(s.router.chat_completions_url())
        .bearer_auth(&s.token)
        .header("Idempotency-Key", "failed-once")
        .json(&json!({"model": "test-model", "user": s.alice.email,
                      "messages": [{"role": "user", "content": "something else"}]}))
        .send()
        .await
        .expect("http");
    spent_id(other, "REQUEST_PROCESSED", "completed (already charged)").await;
    // Every try left its row under the request id: two failures and the answer, with its
    // revenue (and the refusal its own).
    let mut rows: Vec<_> = s
        .usage()
        .await
        .into_iter()
        .filter_map(|r| r.usage.map(|u| (u.request_id, u.status, r.cost_micros)))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("failed-once".into(), "duplicate".into(), 0),
            ("failed-once".into(), "success".into(), PRICE),
            ("failed-once".into(), "upstream_error".into(), 0),
            ("failed-once".into(), "upstream_error".into(), 0)
        ]
    );

    // A made-up token, then the right one under the same key: the made-up one proved nothing
    // about the user it named, so it did not spend the key (anyone could have sent it), and the
    // user's own request is answered and charged once. (It was refused 409 for good.)
    let forged = send("forged-first", "made-up-token").await.expect("http");
    assert_eq!(forged.status(), 403);
    let right = send("forged-first", &s.token).await.expect("http");
    assert_eq!(right.status(), 200);
    assert_eq!(
        s.alice_money().await.0,
        FUNDS - 2 * PRICE,
        "the user's own request is charged, once"
    );
    // An id is tried 8 times at most: the 9th is told to use a new one, and never retried.
    s.upstream.set_mode(Mode::Status(500));
    for _ in 0..8 {
        let failed = send("always-fails", &s.token).await.expect("http");
        assert_eq!(failed.status(), 503);
    }
    let spent = send("always-fails", &s.token).await.expect("http");
    spent_id(spent, "REQUEST_PROCESSED", "tried 8 times").await;
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);
    s.check_invariants().await;
}

/// `GET /v1/models/{id}`, the SDKs' `models.retrieve`: a model the router lists (ids with slashes
/// included), else OpenAI's 404 (the route did not exist: every retrieve was a 404).
#[tokio::test]
async fn one_model_is_retrieved_as_the_sdks_ask() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.models = vec!["org/test-model".into()];
    })
    .await;
    let http = reqwest::Client::new();
    let url = |id: &str| format!("{}/v1/models/{id}", s.router.http_url);
    let one = get_json(&http, &url("org/test-model")).await;
    assert_eq!(
        (one["id"].as_str(), one["object"].as_str()),
        (Some("org/test-model"), Some("model"))
    );
    let unknown = http.get(url("test-model")).send().await.expect("models");
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.expect("json");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("\"test-model\" is not served"), "{body}");
    // An id that is not UTF-8 is refused in OpenAI's shape too (it was axum's plain text).
    let garbled = http.get(url("%ff")).send().await.expect("models");
    assert_eq!(garbled.status(), 400);
    let body: Value = garbled.json().await.expect("an OpenAI error body");
    assert_eq!(body["error"]["code"], "invalid_argument", "{body}");
}

/// A router with a `model_map` and no `models` sells the mapped names only: any other model is
/// refused before a hold or an upstream call (with an empty list every name was passed to the
/// upstream at this router's price, the dearest model included), and the listing shows the
/// mapped names.
#[tokio::test]
async fn a_mapped_router_sells_its_mapped_models_only() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.models.clear();
        if let UpstreamConfig::OpenAi(o) = &mut c.upstream {
            o.model_map.insert("mini".into(), "test-model".into());
        }
    })
    .await;
    let mut c = s.client().await;
    let mut req = s.request("hi");
    req.model = "o1-pro".into();
    assert_eq!(code(c.chat(req).await), Code::NotFound);
    assert_eq!(s.upstream.hits(), 0);
    let mut req = s.request("hi");
    req.model = "mini".into();
    c.chat(req).await.expect("a mapped model");
    let body = s.upstream.last_body().expect("upstream called");
    assert_eq!(body["model"], "test-model");
    let http = reqwest::Client::new();
    let listed = get_json(&http, &format!("{}/v1/models", s.router.http_url)).await;
    let ids: Vec<_> = listed["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["mini"]);
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);
    s.check_invariants().await;
}

/// A client that reads every word of a paid stream and leaves before its end (after the last
/// word, before the upstream's finish and the final event that follows the capture) had the
/// whole answer: it is charged once, and its retry gets the answer. It was voided: by default, a
/// whole answer free to a client that knows where its answer ends. (One that leaves with words
/// still to come is voided: `client_cancelling_a_stream_voids_the_hold`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_after_the_last_word_is_charged_for_the_answer() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let slow_end = Mode::SlowEnd(Duration::from_millis(300));
    let req = leave_after_the_last_word(&s, slow_end, "at-the-end").await;
    assert_eq!(outcomes(&s).await, [(TransferStatus::Completed, PRICE)]);
    let again = ok(s.client().await.chat(req).await);
    assert!(again.replay);
    assert_eq!(again.message.expect("message").content, CONTENT);
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);
    s.check_invariants().await;
}

/// Charged only if its retry can read it: a router that keeps no answers voids a client that
/// left after the last word, as any client that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_after_the_last_word_is_not_charged_without_storage() {
    let no_storage = syft_router_svc::ReplaySettings {
        retention: Duration::ZERO,
        ..syft_router_svc::ReplaySettings::default()
    };
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| c.replay = no_storage).await;
    leave_after_the_last_word(&s, Mode::SlowEnd(Duration::from_millis(300)), "unkept").await;
    assert_eq!(outcomes(&s).await, [(TransferStatus::Cancelled, 0)]);
    assert_eq!(s.alice_money().await.0, FUNDS);
    s.check_invariants().await;
}

/// An upstream that said it finished has nothing more to send: a client that left holding every
/// word is charged even when `[DONE]` comes later than the router reads on (2 s). It was voided,
/// a whole answer free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_answer_whose_done_is_late_is_charged() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let late = Mode::LateDone(Duration::from_millis(2500));
    leave_after_the_last_word(&s, late, "late-done").await;
    assert_eq!(outcomes(&s).await, [(TransferStatus::Completed, PRICE)]);
    s.check_invariants().await;
}

/// Each transfer's status and captured amount, once none is pending (within 8 s).
async fn outcomes(s: &Stack) -> Vec<(TransferStatus, i64)> {
    let transfers = s.wait_no_pending(Duration::from_secs(8)).await;
    transfers
        .iter()
        .map(|t| (t.status(), t.captured_micros))
        .collect()
}

/// Streams request `id` from an upstream in `mode` (one that sends every word at once), reads
/// every word and leaves; returns the request.
async fn leave_after_the_last_word(s: &Stack, mode: Mode, id: &str) -> ChatRequest {
    s.upstream.set_mode(mode);
    let req = ChatRequest {
        request_id: id.into(),
        ..s.request("hi")
    };
    let mut stream = ok(s.client().await.chat_stream(req.clone()).await);
    let mut read = String::new();
    while read != CONTENT {
        match stream.next().await.expect("event").expect("ok").event {
            Some(chat_stream_event::Event::Delta(d)) => read.push_str(&d.content),
            other => panic!("{other:?}"),
        }
    }
    req
}

/// `left_streams = "charge_delivered"`, the owner's choice: a client that leaves a stream is
/// charged for the text it took, counted by the router, at the service's price, under the
/// `cancelled` status; a retry of its id is given that text, marked as a replay with
/// `finish_reason = "cancelled"` (it used to be told it was charged, with no way to read it).
/// (By default the hold is voided: `client_cancelling_a_stream_voids_the_hold`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_stream_is_charged_for_what_it_took_when_the_owner_says_so() {
    let pricing = Pricing::per_token(1_000_000, 10_000_000);
    let s = Stack::start_tweaked(pricing, |c| {
        c.left_streams = syft_router_svc::LeftStreams::ChargeDelivered;
    })
    .await;
    let mut c = s.client().await;
    // Payers are told the rule before they pay: GetMetadata and the syft `/health`.
    let meta = ok(c.get_metadata(GetMetadataRequest {}).await);
    assert_eq!(meta.services[0].left_streams, "charge_delivered");
    let health: Value = reqwest::get(format!("{}/health", s.router.http_url))
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(
        health["services"]["chat"]["left_streams"], "charge_delivered",
        "{health}"
    );
    s.upstream
        .set_mode(Mode::SlowStream(Duration::from_millis(150)));
    let mut req = s.request("hi");
    req.request_id = "left-1".into();
    let mut read = String::new();
    {
        let mut stream = ok(c.chat_stream(req.clone()).await);
        for _ in 0..3 {
            match stream.next().await.expect("event").expect("ok").event {
                Some(chat_stream_event::Event::Delta(d)) => read.push_str(&d.content),
                other => panic!("{other:?}"),
            }
        }
    }
    let transfers = s.wait_no_pending(Duration::from_secs(5)).await;
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert_eq!(transfers[0].status(), TransferStatus::Completed);
    let prompt = tokens::count_prompt(&req.messages);
    let completion = tokens::count_text(&read);
    let cost = i64::try_from(prompt + 10 * completion).expect("small");
    assert_eq!(transfers[0].captured_micros, cost, "{read:?}");
    let rows = s.usage().await;
    let u = rows[0].usage.as_ref().expect("usage");
    assert_eq!(u.status, "cancelled");
    assert_eq!(
        u.completion_tokens,
        i64::try_from(completion).expect("small")
    );
    assert_eq!(rows[0].cost_micros, cost);
    assert_eq!(s.alice_money().await.0, FUNDS - cost);
    // Charged: its id is spent; its retry gets the text it paid for, not as if complete.
    let hits = s.upstream.hits();
    let retried = ok(c.chat(req).await);
    assert!(retried.replay);
    assert_eq!(retried.message.expect("message").content, read);
    assert_eq!(
        (retried.finish_reason.as_str(), retried.cost_micros),
        ("cancelled", cost)
    );
    assert_eq!(s.upstream.hits(), hits);
    assert_eq!(s.alice_money().await.0, FUNDS - cost);
    s.check_invariants().await;
}

/// `left_streams = "charge_delivered"` at a per-request price: a client that took some text pays
/// the price in full; one that left before taking any pays nothing (voided, as by default); one
/// that reads to the end is answered and charged as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_stream_at_a_per_request_price() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.left_streams = syft_router_svc::LeftStreams::ChargeDelivered;
    })
    .await;
    let mut c = s.client().await;
    s.upstream
        .set_mode(Mode::SlowStream(Duration::from_millis(150)));
    let ask = |id: &str| {
        let mut req = s.request("hi");
        req.request_id = id.into();
        req
    };
    {
        let mut took_one = ok(c.chat_stream(ask("took-one")).await);
        took_one.next().await.expect("event").expect("ok");
        let took_none = ok(c.chat_stream(ask("took-none")).await);
        drop(took_none);
    }
    s.upstream.set_mode(Mode::Ok);
    let mut whole = ok(c.chat_stream(ask("whole")).await);
    while let Some(event) = whole.next().await {
        event.expect("ok");
    }
    let mut got: Vec<_> = s
        .wait_no_pending(Duration::from_secs(5))
        .await
        .into_iter()
        .map(|t| (t.idempotency_key.clone(), t.status(), t.captured_micros))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("took-none".to_string(), TransferStatus::Cancelled, 0),
            ("took-one".to_string(), TransferStatus::Completed, PRICE),
            ("whole".to_string(), TransferStatus::Completed, PRICE),
        ]
    );
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);
    s.check_invariants().await;
}
