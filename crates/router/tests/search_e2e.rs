//! End-to-end search (issue 14): the router with a real ledger, the embedded tantivy backend over
//! a real folder, and the `http` backend against a real in-process upstream. Every scenario ends
//! with the money checks (`ledger verify`, available >= 0, one usage row per request).

use std::time::Duration;

use serde_json::{json, Value};
use syft_proto::ledger::TransferStatus;
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::{GetMetadataRequest, SearchOptions};
use syft_router_svc::{
    HttpSearchConfig, Pricing, RouterConfig, SearchBackendConfig, SearchConfig, ServiceKind,
};
use syft_testkit::*;
use tonic::transport::Channel;
use tonic::Code;

const DOCS: &[(&str, &str)] = &[
    ("ledger.md", "# Ledger\nThe ledger holds money in two phases: authorize, then capture or void."),
    ("router.txt", "The router sells chat completions and search queries."),
    (
        "notes/faq.jsonl",
        "{\"id\": \"faq-1\", \"content\": \"Refunds: a voided hold costs nothing.\", \"metadata\": {\"topic\": \"billing\"}}\n",
    ),
];

fn embedded(dir: &std::path::Path, rescan: Duration) -> SearchConfig {
    SearchConfig::new(SearchBackendConfig::Docs {
        dir: dir.to_path_buf(),
        rescan,
    })
}

fn http_backend(upstream: &FakeUpstream) -> SearchConfig {
    let mut h = HttpSearchConfig::new(upstream.base_url.clone());
    h.timeout = Duration::from_millis(800);
    SearchConfig::new(SearchBackendConfig::Http(h))
}

/// A stack whose router also sells search at `price` over `search`.
async fn search_stack(db: Db, price: Pricing, search: SearchConfig) -> Stack {
    Stack::start_with(db, Pricing::free(), Duration::from_secs(300), move |c| {
        *c = c.clone().with_search(price, search);
    })
    .await
}

/// A paid search over an `http` backend (the in-process upstream), on SQLite, and a client.
async fn paid_http_search() -> (FakeUpstream, Stack, RouterClient<Channel>) {
    let up = FakeUpstream::start().await;
    let s = search_stack(Db::sqlite(), Pricing::per_request(PRICE), http_backend(&up)).await;
    let c = s.client().await;
    (up, s, c)
}

/// A search priced `PRICE` per query over the embedded index of `DOCS` (keep the folder alive).
async fn priced_docs_stack(db: Db) -> (syft_testkit::TempDir, Stack) {
    let docs = docs_dir(DOCS);
    let search = embedded(docs.path(), Duration::from_secs(60));
    let s = search_stack(db, Pricing::per_request(PRICE), search).await;
    (docs, s)
}

/// A stack selling chat at `chat` and search at `search` over the embedded index of `DOCS` (keep
/// the folder alive), on SQLite, with `tweak` applied to the router's configuration after that.
async fn docs_stack(
    chat: Pricing,
    search: Pricing,
    tweak: impl FnOnce(&mut RouterConfig),
) -> (syft_testkit::TempDir, Stack) {
    let docs = docs_dir(DOCS);
    let backend = embedded(docs.path(), Duration::from_secs(60));
    let s = Stack::start_tweaked(chat, |c| {
        *c = c.clone().with_search(search, backend);
        tweak(c);
    })
    .await;
    (docs, s)
}

async fn status_of(s: &Stack, transfer_id: &str) -> TransferStatus {
    let t = s.transfers().await;
    t.iter()
        .find(|t| t.id == transfer_id)
        .expect("transfer")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_search_charges_answers_once_and_voids_empty_ones() {
    let (_docs, s) = priced_docs_stack(Db::sqlite()).await;
    let mut c = s.client().await;

    let resp = ok(c.search(s.search("ledger capture")).await);
    assert_eq!(resp.query, "ledger capture");
    assert_eq!(resp.cost_micros, PRICE);
    assert_eq!(resp.currency, "USD");
    assert_eq!(resp.results[0].id, "ledger.md");
    assert!(resp.results.iter().all(|r| r.score > 0.0 && r.score <= 1.0));
    let meta: Value = serde_json::from_str(&resp.results[0].metadata_json).expect("metadata");
    assert_eq!(meta["source"], "ledger.md");
    assert_eq!(
        resp.provider_info.as_ref().map(|p| p.provider.as_str()),
        Some("embedded")
    );
    let t = s.transfers().await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].status(), TransferStatus::Completed);
    assert_eq!(t[0].captured_micros, PRICE);
    assert_eq!(t[0].app_ep_path, "/search");
    assert_eq!(t[0].id, resp.transfer_id);

    // Nothing found: the hold is voided, the answer is still a 200 with no results.
    let empty = ok(c.search(s.search("zebra")).await);
    assert!(empty.results.is_empty());
    assert_eq!(empty.cost_micros, 0);
    assert_eq!(
        status_of(&s, &empty.transfer_id).await,
        TransferStatus::Cancelled
    );

    // A threshold above every score is an empty answer too.
    let mut strict = s.search("ledger");
    strict.options = Some(SearchOptions {
        similarity_threshold: Some(1.0),
        ..Default::default()
    });
    let strict = c.search(strict).await.expect("search").into_inner();
    assert!(strict.results.is_empty());
    assert_eq!(strict.cost_micros, 0);

    // Metadata only when asked for; limit respected.
    let mut lean = s.search("the");
    lean.options = Some(SearchOptions {
        limit: Some(1),
        include_metadata: Some(false),
        ..Default::default()
    });
    let lean = c.search(lean).await.expect("search").into_inner();
    assert_eq!(lean.results.len(), 1);
    assert!(lean.results[0].metadata_json.is_empty());

    assert_eq!(
        s.alice_money().await,
        (FUNDS - 2 * PRICE, 0, FUNDS - 2 * PRICE)
    );
    let rows = s.usage().await;
    assert_eq!(rows.len(), 4, "one usage row per request");
    let row = rows
        .iter()
        .find(|r| r.transfer_id == resp.transfer_id)
        .and_then(|r| r.usage.clone())
        .expect("row");
    assert_eq!(row.endpoint, "/search");
    assert_eq!(row.model, "embedded");
    assert_eq!(row.status, "success");
    assert_eq!(
        row.completion_tokens,
        resp.results.len() as i64,
        "result count"
    );
    assert!(row.prompt_tokens > 0, "query length");
    let empty_row = rows
        .iter()
        .find_map(|r| r.usage.clone().filter(|u| u.request_id == empty.id))
        .expect("empty row");
    assert_eq!(empty_row.status, "no_results");

    let meta = ok(c.get_metadata(GetMetadataRequest {}).await);
    let search = meta
        .services
        .iter()
        .find(|s| s.r#type == "search")
        .expect("search service");
    assert_eq!(
        search.pricing.as_ref().map(|p| p.amount_micros),
        Some(PRICE)
    );
    assert_eq!(search.left_streams, "", "a chat rule");
    s.check_invariants().await;
}

/// A charged search sent without a `limit`, retried after the owner changed `default_limit`
/// (its answer lost on the way): the stored answer, not a refusal as "a different request" (the
/// retry was compared on the limit the router resolved). A retry asking another limit is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_retried_after_the_default_limit_changed_gets_its_answer() {
    let (docs, s) = priced_docs_stack(Db::sqlite()).await;
    let mut req = s.search("router");
    req.request_id = "search-default-1".into();
    req.options = None;
    let first = ok(s.client().await.search(req.clone()).await);
    assert_eq!(first.cost_micros, PRICE);
    let mut search = embedded(docs.path(), Duration::from_secs(60));
    search.default_limit = 2;
    let config = s
        .router_config(Pricing::free())
        .with_search(Pricing::per_request(PRICE), search);
    let changed = RouterHandle::start(config).await;
    let mut c = changed.client().await;
    let again = ok(c.search(req.clone()).await);
    assert!(again.replay);
    assert_eq!(
        (again.results, again.transfer_id),
        (first.results, first.transfer_id)
    );
    req.options = Some(SearchOptions {
        limit: Some(1),
        ..Default::default()
    });
    let refused = c.search(req).await.expect_err("another limit");
    assert!(
        refused.message().contains("different request"),
        "{refused:?}"
    );
    s.assert_spent(PRICE).await;
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_search_request_id_is_charged_once() {
    let (_docs, s) = priced_docs_stack(Db::sqlite()).await;
    let mut c = s.client().await;
    let mut req = s.search("router");
    req.request_id = "search-dup-1".into();
    let first = c.search(req.clone()).await.expect("first").into_inner();
    assert_eq!(first.cost_micros, PRICE);
    assert!(!first.replay);
    // The same search again: the stored answer, not charged again (a retry whose answer was
    // lost gets it; it used to be refused as already processed, charged and answerless).
    let again = c.search(req.clone()).await.expect("replay");
    // Marked as a replay over gRPC as a chat is (it was in the body only).
    let marked = again
        .metadata()
        .get("x-syft-replay")
        .map(|v| v.as_bytes().to_vec());
    assert_eq!(marked.as_deref(), Some(&b"true"[..]));
    let again = again.into_inner();
    assert!(again.replay);
    assert_eq!(
        (again.results, again.transfer_id),
        (first.results, first.transfer_id)
    );
    // The same id for another query is refused, and says the first was charged.
    let mut other = req.clone();
    other.query = "ledger".into();
    let refused = c.search(other).await.expect_err("other content");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(
        refused.message().contains("different request"),
        "{refused:?}"
    );
    assert_eq!(s.alice_money().await.0, FUNDS - PRICE);

    // Concurrent duplicates: one search, one charge (the other is refused as in progress, or
    // gets the stored answer if it came after the capture).
    req.request_id = "search-dup-2".into();
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(c.search(req.clone()), c2.search(req));
    assert_searched_once(a, b);
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);

    // An empty answer charged nothing and is not stored, so its id is not spent: a retry runs
    // the search again (it was refused 409 "already processed", an error for an answered request).
    let mut empty = s.search("zzzqqq");
    empty.request_id = "search-empty".into();
    for _ in 0..2 {
        let answer = ok(c.search(empty.clone()).await);
        assert_eq!((answer.results.len(), answer.cost_micros), (0, 0));
    }
    let keys: Vec<_> = s
        .transfers()
        .await
        .into_iter()
        .filter(|t| t.idempotency_key.starts_with("search-empty"))
        .map(|t| (t.idempotency_key.clone(), t.status()))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.1 == TransferStatus::Cancelled),
        "{keys:?}"
    );
    assert_eq!(s.alice_money().await.0, FUNDS - 2 * PRICE);
    s.check_invariants().await;
}

/// A paid search whose client leaves once the backend has its query keeps the query in its
/// token window, as a unary chat keeps its prompt (it gave all back: searches sent and left
/// before each answer counted nothing); a failed search still gives all back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_the_client_left_keeps_its_query_in_the_token_window() {
    let up = FakeUpstream::start().await;
    let backend = http_backend(&up);
    let s = Stack::start_tweaked(Pricing::free(), |c| {
        *c = c.clone().with_search(Pricing::per_request(PRICE), backend);
        if let Some(v) = c
            .services
            .iter_mut()
            .find(|v| v.kind == ServiceKind::Search)
        {
            v.rate_limits.tokens =
                vec![syft_router_svc::config::Rate::parse("50/minute").expect("rate")];
        }
    })
    .await;
    let mut c = s.client().await;
    // About 20 tokens: two fit in the window, three do not.
    let query = "ledger ".repeat(20);
    up.set_mode(Mode::Status(500));
    c.search(s.search(&query))
        .await
        .expect_err("the backend failed");
    up.set_mode(Mode::Delay(Duration::from_secs(3)));
    for _ in 0..2 {
        let mut left = c.clone();
        let call = left.search(s.search(&query));
        let _ = tokio::time::timeout(Duration::from_millis(600), call).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        up.hits(),
        3,
        "the failed one gave its tokens back; both left ones ran"
    );
    up.set_mode(Mode::Ok);
    let err = c
        .search(s.search(&query))
        .await
        .expect_err("the window is full");
    assert!(quota_refusal(&err, "RATE_LIMITED").is_some(), "{err:?}");
    s.check_invariants().await;
}

/// Two concurrent searches under one request id: exactly one ran (not a replay); the other was
/// refused or replayed its stored answer.
fn assert_searched_once(
    a: Result<tonic::Response<syft_proto::router::SearchResponse>, tonic::Status>,
    b: Result<tonic::Response<syft_proto::router::SearchResponse>, tonic::Status>,
) {
    let ran = [&a, &b]
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| !r.get_ref().replay))
        .count();
    assert_eq!(ran, 1, "{a:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_backend_forwards_the_syft_shape_and_voids_failures() {
    let db = Db::sqlite();
    let upstream_for_config = FakeUpstream::start().await;
    let s = search_stack(
        db,
        Pricing::per_request(PRICE),
        http_backend(&upstream_for_config),
    )
    .await;
    let up = &upstream_for_config;
    let mut c = s.client().await;

    let found = ok(c.search(s.search("find me")).await);
    assert_eq!(found.results.len(), SEARCH_HITS);
    assert_eq!(found.cost_micros, PRICE);
    assert_eq!(found.results[0].id, "doc-0");
    let body = up.last_body().expect("forwarded body");
    assert_eq!(body["query"], "find me");
    assert_eq!(body["userEmail"], s.alice.email);
    assert_eq!(body["options"]["limit"], 5);
    assert!(
        body.get("transactionToken").is_none(),
        "the token stays with the router"
    );

    for (mode, code) in [
        (Mode::Status(500), Code::Unavailable),
        // The backend's refusals of a request the router validated are its own fault.
        (Mode::Status(404), Code::Unavailable),
        (Mode::Status(422), Code::Unavailable),
        // A refusal quoting the query, as parsers write them.
        (
            Mode::StatusBody(
                400,
                json!({"error": "cannot parse query: patient Jane Roe"}).to_string(),
            ),
            Code::Unavailable,
        ),
        (Mode::Garbage, Code::Unavailable),
        (Mode::Stall, Code::DeadlineExceeded),
    ] {
        up.set_mode(mode.clone());
        let err = c.search(s.search("find me")).await.expect_err("fails");
        assert_eq!(err.code(), code, "{mode:?}");
    }
    up.set_mode(Mode::EmptyChoices);
    let empty = ok(c.search(s.search("find me")).await);
    assert!(empty.results.is_empty());
    assert_eq!(empty.cost_micros, 0);

    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    let t = s.transfers().await;
    assert_eq!(t.len(), 8);
    assert_eq!(
        t.iter()
            .filter(|t| t.status() == TransferStatus::Cancelled)
            .count(),
        7,
        "every failure and the empty answer were voided"
    );
    // The ledger keeps a void's reason for good: the backend's status, not its words.
    let reasons: Vec<&str> = t.iter().map(|t| t.cancel_reason.as_str()).collect();
    assert!(
        !reasons.iter().any(|r| r.contains("Jane Roe")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"upstream unreachable: search backend answered HTTP 400"),
        "{reasons:?}"
    );
    let statuses = s.usage_statuses().await;
    for want in [
        "success",
        "upstream_error",
        "invalid_response",
        "timeout",
        "no_results",
    ] {
        assert!(statuses.iter().any(|s| s == want), "{want} in {statuses:?}");
    }
    s.check_invariants().await;
}

/// An answer must be readable by the client that pays for it: a standard gRPC client reads at
/// most 4 MiB, and a backend may send up to 32 MiB. Results that do not fit are left out (the
/// answer is charged with those that do); a best result that does not fit alone is the backend's
/// failure, voided. Both answers used to be charged whole, and the client could read neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_to_read_is_cut_or_refused() {
    let up = FakeUpstream::start().await;
    // Megabytes of JSON to build and parse in a debug build on a busy machine: not the 800 ms
    // the timeout tests want (it timed out under load, DEADLINE_EXCEEDED for UNAVAILABLE).
    let mut backend = http_backend(&up);
    if let SearchBackendConfig::Http(h) = &mut backend.backend {
        h.timeout = Duration::from_secs(20);
    }
    let s = search_stack(Db::sqlite(), Pricing::per_request(PRICE), backend).await;
    let mut c = s.client().await;
    up.set_mode(Mode::BigResults(3_000_000));
    let cut = ok(c.search(s.search("big")).await);
    assert_eq!(cut.results.len(), 1, "the second 3 MB result does not fit");
    assert_eq!(cut.results[0].content.len(), 3_000_000);
    assert_eq!(cut.cost_micros, PRICE);
    up.set_mode(Mode::BigResults(5_000_000));
    let err = c.search(s.search("bigger")).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(s.alice_money().await, (FUNDS - PRICE, 0, FUNDS - PRICE));
    let statuses = s.usage_statuses().await;
    assert!(
        statuses.contains(&"invalid_response".to_string()),
        "{statuses:?}"
    );
    s.check_invariants().await;
}

/// A backend may answer in any order: `limit` keeps the best results, not the first ones (the
/// worst was kept and charged for), and `/search` says a score as the backend did (0.9, not its
/// f32's widening 0.8999999761581421).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_worst_first_is_cut_to_its_best() {
    let (up, s, mut c) = paid_http_search().await;
    up.set_mode(Mode::WorstFirst);
    let mut one = s.search("best");
    one.options = Some(SearchOptions {
        limit: Some(1),
        ..SearchOptions::default()
    });
    let best = ok(c.search(one).await);
    let ids: Vec<_> = best.results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["doc-1"]);
    let both = ok(c.search(s.search("both")).await);
    let ids: Vec<_> = both.results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["doc-1", "doc-0"], "best first");
    let body = json!({"user_email": s.alice.email, "query": "syft", "transaction_token": s.token});
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/search", s.router.http_url))
        .json(&body)
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    let scores: Vec<_> = answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["score"].to_string())
        .collect();
    assert_eq!(scores, ["0.9", "0.8"], "{answer}");
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_search_input_is_refused_and_nothing_is_charged() {
    let (up, s, mut c) = paid_http_search().await;
    let with = |f: &dyn Fn(&mut syft_proto::router::SearchRequest)| {
        let mut r = s.search("q");
        f(&mut r);
        r
    };
    let limit = |n: u32| {
        with(&move |r| {
            r.options = Some(SearchOptions {
                limit: Some(n),
                ..Default::default()
            })
        })
    };
    let threshold = |x: f32| {
        with(&move |r| {
            r.options = Some(SearchOptions {
                similarity_threshold: Some(x),
                ..Default::default()
            })
        })
    };
    let bad = Code::InvalidArgument;
    let cases: Vec<(syft_proto::router::SearchRequest, Code, Option<&str>)> = vec![
        (with(&|r| r.query = "   ".into()), bad, None),
        (with(&|r| r.query = "x".repeat(5000)), bad, None),
        (limit(0), bad, None),
        (limit(1_000_000), bad, None),
        (threshold(-0.1), bad, None),
        (threshold(1.5), bad, None),
        (threshold(f32::NAN), bad, None),
        (with(&|r| r.user_email.clear()), bad, None),
        (with(&|r| r.user_email = "not-an-email".into()), bad, None),
        (
            with(&|r| r.transaction_token.clear()),
            Code::FailedPrecondition,
            Some("PAYMENT_REQUIRED"),
        ),
        (
            with(&|r| r.transaction_token = "bogus".into()),
            Code::PermissionDenied,
            None,
        ),
    ];
    for (i, (req, want, want_reason)) in cases.into_iter().enumerate() {
        let err = c.search(req).await.expect_err("refused");
        assert_eq!(err.code(), want, "case {i}: {}", err.message());
        if let Some(r) = want_reason {
            assert_eq!(reason(&err).as_deref(), Some(r), "case {i}");
        }
    }
    // A `/search` refused by the HTTP front before it is a request (a malformed `Authorization`
    // header) still leaves a row, with the search backend as its model, naming no user: the
    // request proved none (it named alice).
    let r = reqwest::Client::new()
        .post(format!("{}/search", s.router.http_url))
        .header("Idempotency-Key", "unread-1")
        .header("Authorization", "Basic abc")
        .json(&serde_json::json!({"userEmail": s.alice.email, "query": "q"}))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 401);
    let rows = all_usage(&s.ledger.url, "token_refused").await;
    let unread = (rows.iter())
        .find(|u| u.request_id == "unread-1")
        .expect("a row for the unread request");
    assert_eq!(unread.user_email, "");
    assert_eq!(
        (unread.status.as_str(), unread.endpoint.as_str()),
        ("token_refused", "/search")
    );
    assert_eq!(unread.model, "http");
    // A body token and a bearer header naming another are refused, not settled by the body's.
    let r = reqwest::Client::new()
        .post(format!("{}/search", s.router.http_url))
        .bearer_auth("another-token")
        .json(
            &serde_json::json!({"userEmail": s.alice.email, "query": "q",
                                  "transactionToken": s.token}),
        )
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(body.to_string().contains("different tokens"), "{body}");
    // A limit out of u32 over HTTP is refused naming what was sent (a negative one was reported
    // as 0, a huge one as 4294967295).
    for limit in [-1, 99_999_999_999_i64] {
        let r = reqwest::Client::new()
            .post(format!("{}/search", s.router.http_url))
            .json(
                &serde_json::json!({"userEmail": s.alice.email, "query": "q",
                                  "transactionToken": s.token, "options": {"limit": limit}}),
            )
            .send()
            .await
            .expect("http");
        assert_eq!(r.status(), 400);
        let body: serde_json::Value = r.json().await.expect("json");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(&format!("(got {limit})")), "{body}");
    }
    // A body of the wrong shape is told what was expected in the client's terms (it named our
    // type, "struct SyftSearchRequest"), and another method in /search's own error shape.
    let http = reqwest::Client::new();
    let url = format!("{}/search", s.router.http_url);
    for wrong in [json!([]), json!([1, 2]), json!("q")] {
        let r = http.post(&url).json(&wrong).send().await.expect("http");
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.expect("json");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("must be a JSON object"), "{body}");
    }
    let options = json!({"query": "q", "options": "all"});
    let r = http.post(&url).json(&options).send().await.expect("http");
    let body: Value = r.json().await.expect("json");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("expected a JSON object (the search options)"),
        "{body}"
    );
    let r = http.get(&url).send().await.expect("http");
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("method GET"),
        "{body}"
    );
    assert_eq!(up.hits(), 0, "the backend was never called");
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    // Refusals leave their own rows (`refusal.rs`); nothing was answered or charged.
    let rows = s.answered_usage().await;
    assert!(rows.is_empty(), "{rows:#?}");
    s.check_invariants().await;
}

/// A query within `search.max_query_bytes` is read over HTTP and gRPC when the prompt limit is
/// lower: the fronts sized bodies by the prompt limit alone, and `/search` refused it (400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_query_is_read_whatever_the_prompt_limit() {
    let (_docs, s) = docs_stack(Pricing::free(), Pricing::free(), |c| {
        c.limits.max_prompt_bytes = 100;
        if let Some(search) = &mut c.search {
            search.max_query_bytes = 2 << 20;
        }
    })
    .await;
    let query = format!("ledger {}", "word ".repeat(300_000));
    let body = json!({"user_email": s.alice.email, "query": query});
    let r = reqwest::Client::new()
        .post(format!("{}/search", s.router.http_url))
        .json(&body)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let mut req = s.search(&query);
    req.transaction_token.clear();
    let mut c = s.client().await;
    c.search(req).await.expect("read over gRPC");
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_is_reindexed_and_a_free_search_costs_nothing() {
    let docs = docs_dir(DOCS);
    let s = search_stack(
        Db::sqlite(),
        Pricing::free(),
        embedded(docs.path(), Duration::from_millis(100)),
    )
    .await;
    let mut c = s.client().await;
    let mut req = s.search("kiwi");
    req.transaction_token.clear();
    assert!(c
        .search(req.clone())
        .await
        .expect("search")
        .into_inner()
        .results
        .is_empty());
    std::fs::write(docs.path().join("fruit.md"), "A kiwi is a fruit.").expect("write");
    let mut found = Vec::new();
    for _ in 0..50 {
        found = c
            .search(req.clone())
            .await
            .expect("search")
            .into_inner()
            .results;
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found.first().map(|r| r.id.as_str()), Some("fruit.md"));
    std::fs::remove_file(docs.path().join("fruit.md")).expect("rm");
    let mut gone = false;
    for _ in 0..50 {
        if c.search(req.clone())
            .await
            .expect("search")
            .into_inner()
            .results
            .is_empty()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a removed file leaves the index");
    assert!(s.transfers().await.is_empty(), "free: no money moves");
    assert!(
        !s.usage().await.is_empty(),
        "free searches still leave usage rows"
    );
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_query_price_comes_from_the_config_files_pricing_object() {
    let docs = docs_dir(DOCS);
    let text = json!({
        "name": "search-router",
        "owner_email": "placeholder@example.com",
        "services": [
            {"type": "chat", "enabled": false},
            {"type": "search", "pricing": {"pricing_type": "per_request", "amount": 0.02,
                                          "currency": "USD", "description": "$0.02 per search query"}}
        ],
        "search": {"backend": "embedded", "docs": docs.path(), "max_limit": 10}
    })
    .to_string();
    let parsed = RouterConfig::from_json_str(&text).expect("config");
    let s = Stack::start_tweaked(Pricing::free(), |c| {
        c.services = parsed.services.clone();
        c.search = parsed.search.clone();
    })
    .await;
    let mut c = s.client().await;
    let resp = ok(c.search(s.search("ledger")).await);
    assert_eq!(resp.cost_micros, 20_000);
    let mut big = s.search("ledger");
    big.options = Some(SearchOptions {
        limit: Some(11),
        ..Default::default()
    });
    assert_eq!(
        c.search(big).await.expect_err("over max_limit").code(),
        Code::InvalidArgument
    );
    let mut unpaid = s.search("ledger");
    unpaid.transaction_token.clear();
    let err = c.search(unpaid).await.expect_err("payment required");
    assert!(
        err.message().contains("$0.02 per search query"),
        "{}",
        err.message()
    );
    let chat = c.chat(s.request("hi")).await.expect_err("chat disabled");
    assert_eq!(chat.code(), Code::FailedPrecondition);
    assert_eq!(s.alice_money().await.0, FUNDS - 20_000);
    s.check_invariants().await;

    // Per-token pricing makes no sense per query, and a search service needs a backend.
    let v: Value = serde_json::from_str(&text).expect("json");
    let mut per_token = v.clone();
    per_token["services"][1]["pricing"] =
        json!({"pricing_type": "per_token", "input_per_million": 1, "output_per_million": 1});
    let err = RouterConfig::from_json_str(&per_token.to_string()).expect_err("per token");
    assert!(err.to_string().contains("per request"), "{err}");
    let mut no_backend = v.clone();
    no_backend.as_object_mut().expect("obj").remove("search");
    let err = RouterConfig::from_json_str(&no_backend.to_string()).expect_err("no backend");
    assert!(err.to_string().contains("`search` section"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_search_flow() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let (_docs, s) = priced_docs_stack(db).await;
    let mut c = s.client().await;
    let paid = c.search(s.search("ledger")).await.expect("ok").into_inner();
    assert_eq!(paid.cost_micros, PRICE);
    let empty = c
        .search(s.search("zebra"))
        .await
        .expect("empty")
        .into_inner();
    assert_eq!(empty.cost_micros, 0);
    let mut req = s.search("router");
    req.request_id = "pg-search-dup".into();
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(c2.search(req.clone()), c.search(req));
    assert_searched_once(a, b);
    assert_eq!(
        s.alice_money().await,
        (FUNDS - 2 * PRICE, 0, FUNDS - 2 * PRICE)
    );
    s.finish().await;
}

/// The limits run in the shared admission for search too: a per-service request window on search
/// (4 per minute) and the owner's daily budget (two searches' worth, decided by the ledger in the
/// hold's transaction). Two searches are charged, the next two are `BUDGET_EXCEEDED`, the fifth is
/// `RATE_LIMITED` (a budget refusal still spent its place in the request window); refusals cost
/// nothing and leave `budget_exceeded` / `rate_limited` rows on `/search`. Chat, which has no
/// limit of its own, is not touched by the search window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_limits_and_budgets_refuse_with_usage_rows() {
    use syft_router_svc::config::{Rate, RateUnit};
    let (_docs, s) = docs_stack(Pricing::free(), Pricing::per_request(PRICE), |c| {
        c.budgets.per_day_micros = Some(2 * PRICE);
        if let Some(svc) = c
            .services
            .iter_mut()
            .find(|s| s.kind == ServiceKind::Search)
        {
            svc.rate_limits.requests = vec![Rate {
                count: 4,
                unit: RateUnit::Minute,
            }];
        }
    })
    .await;
    let mut c = s.client().await;
    for _ in 0..2 {
        c.search(s.search("ledger capture")).await.expect("charged");
    }
    for want in ["BUDGET_EXCEEDED", "BUDGET_EXCEEDED", "RATE_LIMITED"] {
        let err = c.search(s.search("ledger capture")).await.expect_err(want);
        assert_eq!(err.code(), Code::ResourceExhausted, "{want}: {err:?}");
        assert_eq!(reason(&err).as_deref(), Some(want));
    }
    c.chat(s.request("hi"))
        .await
        .expect("chat is not in the search window");
    assert_eq!(
        s.alice_money().await,
        (FUNDS - 2 * PRICE, 0, FUNDS - 2 * PRICE)
    );
    let statuses: Vec<(String, String)> = s
        .usage()
        .await
        .into_iter()
        .filter_map(|r| r.usage)
        .filter(|u| u.endpoint == "/search")
        .map(|u| (u.status, u.endpoint))
        .collect();
    let count = |st: &str| statuses.iter().filter(|(s, _)| s == st).count();
    assert_eq!(count("success"), 2, "{statuses:?}");
    assert_eq!(count("budget_exceeded"), 2, "{statuses:?}");
    assert_eq!(count("rate_limited"), 1, "{statuses:?}");
    s.check_invariants().await;
}

/// Free requests name their user without a token, so they spend windows of their own: free
/// searches naming alice do not use up the router-wide window of her paid chat (they used to, and
/// anyone could have her paid requests refused). Each side keeps its own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_requests_naming_a_payer_leave_the_payers_windows_alone() {
    let (_docs, s) = docs_stack(Pricing::per_request(PRICE), Pricing::free(), |c| {
        let rate = syft_router_svc::config::Rate::parse("2/minute").expect("rate");
        c.rate_limits.requests = vec![rate];
    })
    .await;
    let mut c = s.client().await;
    let anonymous = || search_request(&s.alice.email, "", "ledger capture");
    for _ in 0..2 {
        c.search(anonymous()).await.expect("free search");
    }
    let err = c
        .search(anonymous())
        .await
        .expect_err("the free side's 3rd");
    assert_eq!(reason(&err).as_deref(), Some("RATE_LIMITED"), "{err:?}");
    for _ in 0..2 {
        c.chat(s.request("hi"))
            .await
            .expect("her paid side is whole");
    }
    let err = c
        .chat(s.request("hi"))
        .await
        .expect_err("the paid side's 3rd");
    assert_eq!(reason(&err).as_deref(), Some("RATE_LIMITED"), "{err:?}");
    let charged = s.transfers().await;
    assert_eq!(charged.len(), 2, "{charged:?}");
    assert_consistent(&s.ledger.store).await;
}

/// A free search and a paid chat under one request id (a client that names a turn once): both
/// are answered, the chat is charged once, and each leaves its row. The chat's row, with its
/// revenue, used to be dropped for the search's (migration 0030).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_search_and_a_paid_chat_of_one_request_id_each_leave_their_row() {
    let (_docs, s) = docs_stack(Pricing::per_request(PRICE), Pricing::free(), |_| {}).await;
    let mut c = s.client().await;
    let turn = "turn-1".to_string();
    let search = syft_proto::router::SearchRequest {
        request_id: turn.clone(),
        ..search_request(&s.alice.email, "", "ledger capture")
    };
    c.search(search).await.expect("free search");
    let chat = syft_proto::router::ChatRequest {
        request_id: turn.clone(),
        ..s.request("hi")
    };
    c.chat(chat.clone()).await.expect("paid chat");
    c.chat(chat).await.expect("its replay");
    let charged = s.transfers().await;
    assert_eq!(charged.len(), 1, "{charged:?}");
    assert_eq!(charged[0].captured_micros, PRICE);
    let mut rows: Vec<_> = s
        .answered_usage()
        .await
        .into_iter()
        .filter(|r| r.usage.as_ref().is_some_and(|u| u.request_id == turn))
        .map(|r| (r.transfer_id, r.cost_micros))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![(String::new(), 0), (charged[0].id.clone(), PRICE)]
    );
    s.finish().await;
}

/// A free chat and a free search under one request id (a RAG client that names a turn once):
/// each leaves its row. The free rows of one id were one in all (migration 0038 makes them one
/// per endpoint), and the answered search was missing from usage and analytics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_chat_and_a_free_search_of_one_request_id_each_leave_their_row() {
    let (_docs, s) = docs_stack(Pricing::free(), Pricing::free(), |_| {}).await;
    let mut c = s.client().await;
    let turn = "turn-free".to_string();
    let chat = syft_proto::router::ChatRequest {
        request_id: turn.clone(),
        transaction_token: String::new(),
        ..s.request("hi")
    };
    c.chat(chat).await.expect("free chat");
    let search = syft_proto::router::SearchRequest {
        request_id: turn.clone(),
        ..search_request(&s.alice.email, "", "ledger capture")
    };
    c.search(search).await.expect("free search");
    let mut rows: Vec<_> = s
        .answered_usage()
        .await
        .into_iter()
        .filter_map(|r| r.usage)
        .filter(|u| u.request_id == turn)
        .map(|u| (u.endpoint, u.status))
        .collect();
    rows.sort();
    let row = |e: &str| (e.to_string(), "success".to_string());
    assert_eq!(rows, vec![row("/chat"), row("/search")]);
    s.finish().await;
}

/// A `search` section is checked whenever it is there, with or without a search service: its
/// folder is watched either way, and `rescan_seconds = 0` used to pass and then stop the
/// router's rescan task.
#[test]
fn a_search_section_is_checked_without_a_search_service() {
    let config = r#"{"name":"r","owner_email":"o@example.com",
        "search":{"docs":"examples/docs","rescan_seconds":0}}"#;
    let err = syft_router_svc::RouterConfig::from_json_str(config)
        .expect_err("rescan 0")
        .to_string();
    assert!(err.contains("rescan_seconds must be positive"), "{err}");
}

/// Refusals over gRPC's `ChatStream` and `Search` name the request id their row is under in the
/// status' metadata (`x-syft-request-id`), as unary chat's do: a request without an id is given
/// one, and the row of its refusal is recorded under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stream_and_search_refusals_name_their_row() {
    let (_docs, s) = docs_stack(
        Pricing::per_request(PRICE),
        Pricing::per_request(PRICE),
        |_| {},
    )
    .await;
    let mut c = s.client().await;
    let named = |status: &tonic::Status| -> String {
        let id = status.metadata().get("x-syft-request-id").expect("id");
        id.to_str().expect("ascii").to_string()
    };
    let mut req = s.request("hi");
    req.request_id.clear();
    req.transaction_token.clear();
    let stream = c.chat_stream(req).await.expect_err("no token");
    assert_eq!(stream.code(), Code::FailedPrecondition);
    let search = c
        .search(search_request(&s.alice.email, "", "ledger capture"))
        .await
        .expect_err("no token");
    assert_eq!(search.code(), Code::FailedPrecondition);
    let (stream_id, search_id) = (named(&stream), named(&search));
    assert_ne!(stream_id, search_id);

    let rows: Vec<(String, String)> = (all_usage(&s.ledger.url, "").await.into_iter())
        .map(|u| (u.request_id, u.endpoint))
        .collect();
    assert!(rows.contains(&(stream_id, "/chat".into())), "{rows:?}");
    assert!(rows.contains(&(search_id, "/search".into())), "{rows:?}");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(s.upstream.hits(), 0);
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    s.finish().await;
}

/// A search-only router lists no model: it listed the offline upstream's `echo`, which no
/// request could use (a chat there is refused `SERVICE_DISABLED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_only_router_lists_no_model() {
    let up = FakeUpstream::start().await;
    let search = http_backend(&up);
    let s = Stack::start_with(
        Db::sqlite(),
        Pricing::free(),
        Duration::from_secs(300),
        |c| {
            *c = c.clone().with_search(Pricing::per_request(PRICE), search);
            c.services.retain(|s| s.kind == ServiceKind::Search);
        },
    )
    .await;
    let mut c = s.client().await;
    let meta = ok(c.get_metadata(GetMetadataRequest {}).await);
    assert!(meta.models.is_empty(), "{:?}", meta.models);
    let listed = get_json(
        &reqwest::Client::new(),
        &format!("{}/v1/models", s.router.http_url),
    )
    .await;
    assert_eq!(listed["data"], json!([]), "{listed}");
    let one = reqwest::get(format!("{}/v1/models/echo", s.router.http_url))
        .await
        .expect("http");
    assert_eq!(one.status(), 404);
    let chat = c.chat(s.request("hi")).await.expect_err("no chat here");
    assert_eq!(
        reason(&chat).as_deref(),
        Some("SERVICE_DISABLED"),
        "{chat:?}"
    );
    // Over the OpenAI front it is a request error, not `insufficient_quota`, which the SDKs
    // read as out of credit (every 409 was typed so).
    let http = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(http.status(), 409);
    let body: serde_json::Value = http.json().await.expect("json");
    assert_eq!(body["error"]["code"], "service_disabled", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

/// A prebuilt index without a word a search could find (built before `index build` refused one,
/// or by other means) is refused as a watched folder without text is: it was served as healthy,
/// every search a free `no_results` (a search reviewer's finding).
#[test]
fn a_prebuilt_index_without_a_word_is_refused() {
    use syft_router_svc::search::{DocIndex, SearchBackend, SourceDoc};
    let root = TempDir::new().expect("temp dir");
    let empty = root.path().join("empty");
    DocIndex::build(Vec::<SourceDoc>::new(), Some(&empty)).expect("empty build");
    let symbols = root.path().join("symbols");
    let doc = SourceDoc {
        id: "a".into(),
        content: "--- *** !!! ???".into(),
        metadata: Default::default(),
    };
    DocIndex::build(vec![doc], Some(&symbols)).expect("termless build");
    for dir in [empty, symbols] {
        let config = SearchConfig::new(SearchBackendConfig::Index(dir.clone()));
        match SearchBackend::from_config(&config) {
            Ok(_) => panic!("{dir:?} served"),
            Err(e) => assert!(e.to_string().contains("no text"), "{e}"),
        }
    }
}
