//! What users see of the limits (docs/limits.md): the `x-ratelimit-*` headers on every answer of
//! every API (OpenAI front, the Syft `/chat` and `/search`, gRPC unary and streaming), the limits
//! that apply in `GetMetadata` and `GET /v1/models`, what is left in `GetLimits` and
//! `GET /v1/limits`, and the gRPC refusal details of each reason. Every scenario ends with the
//! ledger's verify.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde_json::{json, Value};
use syft_proto::router::{GetLimitsRequest, GetMetadataRequest, Limit};
use syft_router_svc::config::Rate;
use syft_router_svc::{
    HttpSearchConfig, Pricing, RouterConfig, SearchBackendConfig, SearchConfig, ServiceKind,
};
use syft_testkit::{
    backdate_transfers, get_json, get_json_as, quota_refusal, revoke_token, FakeUpstream, Mode,
    Stack, FUNDS, PRICE,
};
use tonic::metadata::MetadataMap;
use tonic::Code;
use tonic_types::StatusExt;

fn rates(list: &[&str]) -> Vec<Rate> {
    list.iter().map(|r| Rate::parse(r).expect("rate")).collect()
}

/// Chat and search (over `search_upstream`) at [`PRICE`], 10 requests and 100,000 tokens per
/// minute per user over the router, 5 searches per minute, $1.00 a day.
fn limited(c: &mut RouterConfig, search_upstream: &FakeUpstream) {
    let mut h = HttpSearchConfig::new(search_upstream.base_url.clone());
    h.timeout = Duration::from_secs(2);
    let search = SearchConfig::new(SearchBackendConfig::Http(h));
    *c = c.clone().with_search(Pricing::per_request(PRICE), search);
    c.rate_limits.requests = rates(&["10/minute"]);
    c.rate_limits.tokens = rates(&["100000/minute"]);
    c.budgets.per_day_micros = Some(1_000_000);
    if let Some(s) = c
        .services
        .iter_mut()
        .find(|s| s.kind == ServiceKind::Search)
    {
        s.rate_limits.requests = rates(&["5/minute"]);
    }
}

fn meta<'a>(m: &'a MetadataMap, name: &str) -> &'a str {
    m.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} in {m:?}"))
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
}

/// `POST url` with a JSON body, paying with `bearer` when given.
async fn post(url: String, bearer: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(url).json(body);
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    req.send().await.expect("http")
}

/// A chat of `user` on the OpenAI front.
fn openai_chat(user: &str, stream: bool) -> Value {
    json!({"model": "test-model", "max_tokens": 10, "stream": stream, "user": user,
        "messages": [{"role": "user", "content": "hi"}]})
}

fn kinds(limits: &[Limit]) -> Vec<(String, u64, String)> {
    limits
        .iter()
        .map(|l| (l.kind.clone(), l.limit, l.scope.clone()))
        .collect()
}

/// Every answer carries the tightest request and token windows: gRPC unary, streaming and search
/// as initial metadata; the OpenAI front (JSON and SSE) and the Syft `/chat` and `/search` as
/// headers. Refusals on the Syft API are 429 with `Retry-After` and the same headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_headers_on_every_answer() {
    let search_up = FakeUpstream::start().await;
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| limited(c, &search_up)).await;
    let mut c = s.client().await;

    // 1st request of the 10: gRPC unary.
    let r = c.chat(s.request("one")).await.expect("unary");
    assert_eq!(meta(r.metadata(), "x-ratelimit-limit-requests"), "10");
    assert_eq!(meta(r.metadata(), "x-ratelimit-remaining-requests"), "9");
    assert_eq!(meta(r.metadata(), "x-ratelimit-limit-tokens"), "100000");
    let left: u64 = meta(r.metadata(), "x-ratelimit-remaining-tokens")
        .parse()
        .expect("number");
    assert!(left < 100_000, "the reservation counts: {left}");
    // 2nd: gRPC streaming, headers before the first event.
    let r = c.chat_stream(s.request("two")).await.expect("stream");
    assert_eq!(meta(r.metadata(), "x-ratelimit-remaining-requests"), "8");
    assert!(r.metadata().contains_key("x-ratelimit-reset-tokens"));
    let mut events = r.into_inner();
    while let Some(e) = events.message().await.expect("event") {
        drop(e);
    }
    // 3rd: gRPC search; its own window (5/minute, 4 left) is tighter than the router's (7 left).
    let r = c.search(s.search("find")).await.expect("search");
    assert_eq!(meta(r.metadata(), "x-ratelimit-limit-requests"), "5");
    assert_eq!(meta(r.metadata(), "x-ratelimit-remaining-requests"), "4");

    let base = &s.router.http_url;
    let chat_body = json!({"userEmail": s.alice.email, "model": "test-model",
        "messages": [{"role": "user", "content": "hi"}], "options": {"maxTokens": 10},
        "transactionToken": s.token});
    // 4th: Syft /chat.
    let r = post(format!("{base}/chat"), None, &chat_body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "6");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100000");
    // 5th: Syft /search.
    let search_body =
        json!({"userEmail": s.alice.email, "query": "find", "transactionToken": s.token});
    let r = post(format!("{base}/search"), None, &search_body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "5");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "3");
    // 6th: the OpenAI front, streamed.
    let url = format!("{base}/v1/chat/completions");
    let r = post(url, Some(&s.token), &openai_chat(&s.alice.email, true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "4");
    assert!(r.text().await.expect("body").contains("[DONE]"));
    // 7th-9th: three more searches use up the search window; the 10th search is refused.
    for _ in 0..3 {
        c.search(s.search("find")).await.expect("search");
    }
    let r = post(format!("{base}/search"), None, &search_body).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], "RATE_LIMITED");
    // 10th and last of the router's window: Syft /chat; then the 11th is refused there too.
    let r = post(format!("{base}/chat"), None, &chat_body).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let r = post(format!("{base}/chat"), None, &chat_body).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "10");
    // A gRPC refusal carries them as metadata too.
    let err = c.chat(s.request("over")).await.expect_err("limited");
    assert_eq!(meta(err.metadata(), "x-ratelimit-remaining-requests"), "0");

    // 10 answers charged (the refused search and chats cost nothing).
    let (balance, held, _) = s.alice_money().await;
    assert_eq!((balance, held), (FUNDS - 10 * PRICE, 0));
    s.check_invariants().await;
}

/// `GetMetadata` and `GET /v1/models` list, per service, every limit that applies; `GetLimits` and
/// `GET /v1/limits` say what is left of each window and budget, per service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_that_apply_and_what_is_left() {
    let search_up = FakeUpstream::start().await;
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        limited(c, &search_up);
        c.rate_limits.concurrent = Some(3);
    })
    .await;
    let mut c = s.client().await;
    let m = c
        .get_metadata(GetMetadataRequest {})
        .await
        .expect("metadata")
        .into_inner();
    let service = |kind: &str| {
        m.services
            .iter()
            .find(|s| s.r#type == kind)
            .map(|s| kinds(&s.limits))
            .expect("service")
    };
    let router = |kind: &str, n: u64| (kind.to_string(), n, "router".to_string());
    assert_eq!(
        service("chat"),
        vec![
            router("requests", 10),
            router("tokens", 100_000),
            router("concurrent", 3),
            router("budget_day", 1_000_000),
        ]
    );
    assert_eq!(
        service("search"),
        vec![
            router("requests", 10),
            router("tokens", 100_000),
            router("concurrent", 3),
            ("requests".into(), 5, "search".into()),
            router("budget_day", 1_000_000),
        ]
    );
    let chat = &m.services[0].limits;
    assert_eq!(chat[0].window_seconds, 60);
    assert_eq!(chat[0].description, "10 requests per minute");
    assert_eq!(
        chat[2].window_seconds, 0,
        "concurrency lasts while in flight"
    );

    let base = &s.router.http_url;
    let http = reqwest::Client::new();
    let models = get_json(&http, &format!("{base}/v1/models")).await;
    let search = &models["syft_limits"]["apply"]["search"];
    assert_eq!(search[3]["scope"], "search");
    assert_eq!(search[3]["limit"], 5);
    assert_eq!(search[4]["kind"], "budget_day");

    c.search(s.search("find")).await.expect("search");
    c.chat(s.request("hi")).await.expect("chat");
    // What is left of alice's limits on a service, asked with her token.
    let alice_limits = |service: &str| {
        let mut c = c.clone();
        let req = GetLimitsRequest {
            user_email: s.alice.email.clone(),
            service: service.into(),
            transaction_token: s.token.clone(),
        };
        async move { c.get_limits(req).await }
    };
    let left = alice_limits("search").await.expect("limits").into_inner();
    assert_eq!(left.service, "search");
    let remaining: Vec<(String, String, u64)> = left
        .limits
        .iter()
        .map(|l| {
            let limit = l.limit.clone().unwrap_or_default();
            (limit.kind, limit.scope, l.remaining)
        })
        .collect();
    assert_eq!(remaining[0], ("requests".into(), "router".into(), 8));
    assert_eq!(remaining[2], ("concurrent".into(), "router".into(), 3));
    assert_eq!(remaining[3], ("requests".into(), "search".into(), 4));
    // The day's budget, counted by the ledger: one search and one chat at PRICE each.
    assert_eq!(
        remaining[4],
        (
            "budget_day".into(),
            "router".into(),
            1_000_000 - 2 * PRICE as u64
        )
    );
    assert!(left.limits[4].reset_ms > 0 && left.limits[4].reset_ms <= 86_400_000);
    assert!(left.limits[0].reset_ms > 0 && left.limits[0].reset_ms <= 60_000);
    // Asking records nothing.
    let again = alice_limits("").await.expect("limits").into_inner();
    assert_eq!(again.service, "chat");
    assert_eq!(again.limits[0].remaining, 8);
    let err = alice_limits("images").await.expect_err("unknown service");
    assert_eq!(err.code(), Code::InvalidArgument);
    let url = format!("{base}/v1/limits?user={}&service=search", s.alice.email);
    let rest = get_json_as(&http, &url, &s.token).await;
    assert_eq!(rest["limits"][3]["scope"], "search");
    assert_eq!(rest["limits"][3]["remaining"], 4);
    assert_eq!(rest["budgets"][0]["kind"], "budget_day");
    assert_eq!(
        rest["budgets"][0]["remaining_micros"],
        1_000_000 - 2 * PRICE
    );
    // A slot in use frees when its request ends: no reset or window to show (the store's
    // crash lease, a quarter of an hour, was shown as both).
    s.upstream
        .set_mode(Mode::Delay(Duration::from_millis(1500)));
    let slow = tokio::spawn({
        let mut c = c.clone();
        let req = s.request("in flight");
        async move { c.chat(req).await }
    });
    // Until the request holds its slot (it holds it until the upstream's 1.5 s timeout).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let left = loop {
        let left = alice_limits("").await.expect("limits").into_inner();
        if left.limits[2].remaining == 2 || tokio::time::Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (slot, limit) = (
        &left.limits[2],
        left.limits[2].limit.clone().unwrap_or_default(),
    );
    assert_eq!((limit.kind.as_str(), slot.remaining), ("concurrent", 2));
    assert_eq!((slot.reset_ms, limit.window_seconds), (0, 0));
    let url = format!("{base}/v1/limits?user={}", s.alice.email);
    let rest = get_json_as(&http, &url, &s.token).await;
    assert_eq!(rest["limits"][2]["remaining"], 2, "{rest}");
    assert_eq!(rest["limits"][2]["reset_ms"], 0, "{rest}");
    assert_eq!(rest["limits"][2]["window_seconds"], 0, "{rest}");
    // (Its outcome is not the point: the stack's upstream timeout may end it.)
    let _ = slow.await.expect("join");
    s.check_invariants().await;
}

/// Seconds until the next 00:00 UTC.
fn until_utc_midnight() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    86_400 - now % 86_400
}

/// The gRPC refusal of each reason: `RESOURCE_EXHAUSTED` with `ErrorInfo`, `QuotaFailure` and,
/// when a retry can succeed, `RetryInfo`. A budget refusal is not retryable before the next UTC
/// day and says so (also as HTTP 429 with that `Retry-After`); once the day has passed the budget
/// is whole again. A token's daily limit refuses with its own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refusals_and_the_budget_reset() {
    const COST: i64 = 20_000;
    let s = Stack::start_tweaked(Pricing::per_request(COST), |c| {
        c.budgets.per_day_micros = Some(50_000);
        c.rate_limits.concurrent = Some(1);
        c.rate_limits.requests = rates(&["100/minute"]);
    })
    .await;
    let mut c = s.client().await;
    // This router sells no search: asking its limits says so (it showed the chat windows).
    let err = c
        .get_limits(GetLimitsRequest {
            user_email: s.alice.email.clone(),
            service: "search".into(),
            transaction_token: s.token.clone(),
        })
        .await
        .expect_err("no search service");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Concurrency: one in flight, the second refused with a short retry.
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(500)));
    let results = join_all((0..2).map(|i| {
        let mut c = c.clone();
        let req = s.request(&format!("slow {i}"));
        async move { c.chat(req).await }
    }))
    .await;
    s.upstream.set_mode(Mode::Ok);
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("one refused");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert_eq!(
        quota_refusal(err, "CONCURRENCY_LIMITED"),
        Some(Duration::from_secs(1))
    );
    assert!(
        err.message()
            .ends_with("retry when a request in flight ends"),
        "{err:?}"
    );
    let quota = err.get_details_quota_failure().expect("quota failure");
    assert_eq!(
        quota.violations[0].subject,
        format!("user:{}", s.alice.email)
    );
    // The slot is released asynchronously when the request ends.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Budget: $0.04 of $0.05 spent; the next $0.02 is refused until the next UTC day.
    c.chat(s.request("second"))
        .await
        .expect("within the budget");
    let err = c.chat(s.request("over")).await.expect_err("budget");
    let retry = quota_refusal(&err, "BUDGET_EXCEEDED")
        .expect("retry info")
        .as_secs();
    assert!(
        err.message().contains("not retryable before") && err.message().contains("T00:00:00Z"),
        "{}",
        err.message()
    );
    let midnight = until_utc_midnight();
    assert!(
        retry <= midnight && retry + 30 >= midnight,
        "{retry} vs {midnight}"
    );
    let url = s.router.chat_completions_url();
    let r = post(url, Some(&s.token), &openai_chat(&s.alice.email, false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-should-retry"), "false", "not before midnight");
    let after: u64 = header(&r, "retry-after").parse().expect("seconds");
    assert!(after <= midnight + 1 && after + 30 >= midnight, "{after}");
    // The ledger's refusal carries the windows the request passed, like every answer.
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "100");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "96");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(body["error"]["type"], "insufficient_quota");

    // The window resets: a day later. A token issued with a daily limit of $0.03 pays one $0.02
    // request, and its second is refused by the token's limit (the owner's budget has room).
    backdate_transfers(&s.ledger.store, Duration::from_secs(86_400)).await;
    let mut alice =
        syft_ledger::client::connect_lazy(&s.ledger.url, &s.alice.secret).expect("client");
    let token = alice
        .issue_token(syft_proto::ledger::IssueTokenRequest {
            recipient_email: s.owner.email.clone(),
            limit_per_day_micros: Some(30_000),
            ..Default::default()
        })
        .await
        .expect("issue")
        .into_inner()
        .token;
    let with_token = |content: &str| syft_proto::router::ChatRequest {
        transaction_token: token.clone(),
        ..s.request(content)
    };
    c.chat(with_token("first")).await.expect("a new day");
    let err = c.chat(with_token("second")).await.expect_err("token day");
    let retry = quota_refusal(&err, "TOKEN_DAILY_LIMIT_EXCEEDED").expect("retry info");
    assert!(retry > Duration::from_secs(86_000) && retry <= Duration::from_secs(86_400));
    assert!(
        err.message().contains("not retryable before"),
        "{}",
        err.message()
    );
    // The owner's budget still has room for the other token.
    c.chat(s.request("other token")).await.expect("budget room");

    let (balance, held, _) = s.alice_money().await;
    assert_eq!((balance, held), (FUNDS - 4 * COST, 0));
    let refused = s
        .usage()
        .await
        .into_iter()
        .filter_map(|r| r.usage)
        .filter(|u| u.status == "budget_exceeded")
        .count();
    assert_eq!(refused, 3, "budget, budget over HTTP, token day");
    s.check_invariants().await;
}

/// A request the ledger refuses for its token spends none of the named user's windows: the user's
/// email is only what a request says, so a made-up token must not use up someone's requests,
/// tokens or in-flight slots (and have their own requests refused). A refusal for the user's own
/// reasons (a budget, above) keeps its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_for_its_token_spends_no_room() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.rate_limits.requests = rates(&["3/minute"]);
        c.rate_limits.tokens = rates(&["100000/minute"]);
        c.rate_limits.concurrent = Some(1);
    })
    .await;
    let mut c = s.client().await;
    // Made up, of a plausible length; longer than any the ledger issues; with a control
    // character (the last two the ledger refuses as invalid before it looks the token up).
    let made_up = |i: usize| match i % 3 {
        0 => format!("made-up-{i}"),
        1 => format!("{i}{}", "x".repeat(600)),
        _ => format!("made\u{1}up-{i}"),
    };
    for i in 0..6 {
        let forged = syft_proto::router::ChatRequest {
            transaction_token: made_up(i),
            ..s.request("forged")
        };
        let err = c.chat(forged).await.expect_err("a made-up token");
        assert_eq!(err.code(), Code::PermissionDenied, "{i}: {err:?}");
    }
    // All three of alice's own requests fit; the fourth is refused by the window.
    for left in ["2", "1", "0"] {
        let r = c.chat(s.request("own")).await.expect("alice's own request");
        assert_eq!(meta(r.metadata(), "x-ratelimit-remaining-requests"), left);
        assert_eq!(
            meta(r.metadata(), "x-ratelimit-limit-tokens"),
            "100000",
            "the token window applies"
        );
    }
    let err = c.chat(s.request("fourth")).await.expect_err("window full");
    assert!(quota_refusal(&err, "RATE_LIMITED").is_some(), "{err:?}");

    let (balance, held, _) = s.alice_money().await;
    assert_eq!((balance, held), (FUNDS - 3 * PRICE, 0));
    s.check_invariants().await;
}

/// A request the ledger finds invalid (here a hold over its largest amount, from a huge
/// `max_tokens`) spends none of the named user's windows either: the ledger checks a request
/// before its token, so the refusal proves no user, and nothing was held or called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_ledger_finds_invalid_spends_no_room() {
    let s = Stack::start_with_configs(
        Pricing::per_token(1_000_000, 1_000_000),
        |l| l.max_amount_micros = FUNDS,
        |c| c.rate_limits.requests = rates(&["3/minute"]),
    )
    .await;
    let mut c = s.client().await;
    for _ in 0..4 {
        let mut huge = s.request("forged");
        huge.transaction_token = "made-up".into();
        if let Some(o) = huge.options.as_mut() {
            o.max_tokens = Some(1_000_000);
        }
        let err = c
            .chat(huge)
            .await
            .expect_err("a hold over the ledger's largest");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    for left in ["2", "1", "0"] {
        let r = c.chat(s.request("own")).await.expect("alice's own request");
        assert_eq!(meta(r.metadata(), "x-ratelimit-remaining-requests"), left);
    }
    let (_, held, _) = s.alice_money().await;
    assert_eq!(held, 0);
    s.check_invariants().await;
}

/// What a user has left is shown only to the holder of one of their tokens for this router: no
/// token is `UNAUTHENTICATED` (401), another user's token or a made-up or revoked one is
/// `PERMISSION_DENIED` (403; another user's with the reason `TOKEN_INVALID`); the token alone
/// names its user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_shown_to_the_holder_of_the_users_token() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.rate_limits.requests = rates(&["10/minute"]);
        c.budgets.per_day_micros = Some(1_000_000);
    })
    .await;
    let mut c = s.client().await;
    c.chat(s.request("hi")).await.expect("chat");
    let ask = |user: &str, token: &str| GetLimitsRequest {
        user_email: user.into(),
        service: String::new(),
        transaction_token: token.into(),
    };
    let bob = syft_testkit::create_account(&s.ledger.url, "bob").await;
    let bob_token = syft_testkit::issue_token(&s.ledger.url, &bob, &s.owner.email).await;
    let alice = s.alice.email.as_str();
    // Another user's token is `TOKEN_INVALID`, as a chat with it is (it was `PERMISSION_DENIED`).
    let refused = [
        (ask(alice, ""), Code::Unauthenticated, None),
        (
            ask(alice, &bob_token),
            Code::PermissionDenied,
            Some("TOKEN_INVALID"),
        ),
        (ask(alice, "made-up"), Code::PermissionDenied, None),
    ];
    for (req, want, why) in refused {
        let err = c.get_limits(req).await.expect_err("refused");
        assert_eq!(err.code(), want, "{err:?}");
        if let Some(why) = why {
            assert_eq!(syft_testkit::reason(&err).as_deref(), Some(why), "{err:?}");
        }
    }
    // Alice's own token, with or without her email: her windows (one request made) and budget.
    for user in [alice, ""] {
        let left = c.get_limits(ask(user, &s.token)).await.expect("limits");
        let left = left.into_inner();
        assert_eq!(left.user_email, s.alice.email);
        assert_eq!(left.limits[0].remaining, 9);
    }
    // Bob's token answers for bob (nothing used).
    let left = c.get_limits(ask("", &bob_token)).await.expect("limits");
    assert_eq!(left.into_inner().limits[0].remaining, 10);

    // Over HTTP: 401 without a token, 403 with another's, else the token's sender.
    let url = format!("{}/v1/limits?user={alice}", s.router.http_url);
    let http = reqwest::Client::new();
    let r = http.get(&url).send().await.expect("http");
    assert_eq!(r.status(), 401);
    let r = http.get(&url).bearer_auth(&bob_token).send().await;
    assert_eq!(r.expect("http").status(), 403);
    let mine = get_json_as(&http, &format!("{}/v1/limits", s.router.http_url), &s.token).await;
    assert_eq!(mine["limits"][0]["remaining"], 9, "{mine}");

    // A revoked token shows nothing any more.
    revoke_token(&s.ledger.url, &s.alice, &s.token).await;
    let err = c
        .get_limits(ask(alice, &s.token))
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A paid request with it is refused saying why, and its row keeps the reason.
    let refused = c
        .chat(s.request("after revoke"))
        .await
        .expect_err("revoked");
    assert_eq!(
        (refused.code(), syft_testkit::reason(&refused).as_deref()),
        (Code::PermissionDenied, Some("TOKEN_REVOKED")),
        "{refused:?}"
    );
    let rows = syft_testkit::all_usage(&s.ledger.url, "token_refused").await;
    let reasons: Vec<&str> = rows.iter().map(|u| u.reason.as_str()).collect();
    assert!(reasons.contains(&"TOKEN_REVOKED"), "{reasons:?}");
    s.check_invariants().await;
}

/// One user is one user whatever the case of their email: `Alice@…` and `alice@…` share the
/// windows (they were two users' windows, a way around the limits, while the ledger charged the
/// same account).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_case_of_an_email_does_not_make_another_user() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.rate_limits.requests = rates(&["2/minute"]);
    })
    .await;
    let mut c = s.client().await;
    let as_written = |email: String| syft_proto::router::ChatRequest {
        user_email: email,
        ..s.request("hi")
    };
    c.chat(as_written(s.alice.email.to_uppercase()))
        .await
        .expect("first");
    c.chat(as_written(s.alice.email.clone()))
        .await
        .expect("second");
    let mut mixed = s.alice.email.clone();
    mixed[..1].make_ascii_uppercase();
    let err = c.chat(as_written(mixed)).await.expect_err("window full");
    assert!(quota_refusal(&err, "RATE_LIMITED").is_some(), "{err:?}");
    let (balance, held, _) = s.alice_money().await;
    assert_eq!((balance, held), (FUNDS - 2 * PRICE, 0));
    s.check_invariants().await;
}
