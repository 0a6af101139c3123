//! Health and discovery: `grpc.health.v1.Health` follows the database (ledger) and the ledger
//! (router), `/readyz` agrees, and server reflection lists the services.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use syft_router_svc::config::{LimiterBackend, OnFailure, Rate, RateUnit};
use syft_router_svc::{Pricing, RouterConfig};
use syft_testkit::*;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const LEDGER: &str = "syft.ledger.v1.Ledger";
const ROUTER: &str = "syft.router.v1.Router";

async fn channel(url: &str) -> Channel {
    for _ in 0..100 {
        if let Ok(c) = Channel::from_shared(url.to_string())
            .expect("url")
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{url} did not start");
}

async fn status(ch: &Channel, service: &str) -> ServingStatus {
    HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status()
}

/// Waits until both the server (`""`) and `service` report `want`.
async fn wait_status(ch: &Channel, service: &str, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let overall = status(ch, "").await;
        let named = status(ch, service).await;
        if overall == want && named == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service}: want {want:?}, have overall {overall:?} / service {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ledger_health_follows_the_database(db: Db) {
    let ledger = LedgerServer::start(ledger_config(&db.url)).await;
    let ch = channel(&ledger.url).await;
    wait_status(&ch, LEDGER, ServingStatus::Serving).await;
    // Unknown services are NOT_FOUND, as the health protocol requires.
    let unknown = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    assert_eq!(
        unknown.expect_err("unknown service").code(),
        tonic::Code::NotFound
    );
    // The database goes away: the ledger stops serving.
    ledger.store.close().await;
    wait_status(&ch, LEDGER, ServingStatus::NotServing).await;
    db.drop_postgres().await;
}

syft_testkit::db_suite!(ledger_health_follows_the_database);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_router_is_ready_only_while_its_ledger_serves() {
    let mut s = Stack::start(Pricing::per_request(PRICE)).await;
    let ch = channel(&s.router.grpc_url).await;
    wait_status(&ch, ROUTER, ServingStatus::Serving).await;
    let (code, body) = readyz(&s.router.http_url).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["ledger"], "serving");
    assert_eq!(body["ledger_required"], true);

    // The ledger's database goes down: the ledger answers NOT_SERVING, so the router is not ready.
    s.ledger.store.close().await;
    wait_status(&ch, ROUTER, ServingStatus::NotServing).await;
    let (code, body) = readyz(&s.router.http_url).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["ledger"], "not_serving");

    // The ledger process goes away entirely.
    s.ledger.stop_now().await;
    wait_status(&ch, ROUTER, ServingStatus::NotServing).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = readyz(&s.router.http_url).await;
        assert_eq!(code, 503, "{body}");
        if body["ledger"] == "unreachable" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Liveness is not readiness: the process itself is fine.
    let live = reqwest::get(format!("{}/healthz", s.router.http_url))
        .await
        .expect("GET /healthz");
    assert_eq!(live.status().as_u16(), 200);
}

/// Polls `/readyz` until its `owner` field is `want`; returns the status code and body.
async fn wait_owner(http_url: &str, want: &str) -> (u16, Value) {
    wait_readyz(http_url, "owner", want).await
}

/// Config mistakes show at start, not at the first paid request: a paid router whose secret the
/// ledger refuses, whose secret is another account's, or whose owner has no account, stays not
/// ready with the reason in words; with the owner's own secret it becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_router_is_ready_only_with_its_owners_secret() {
    let db = Db::sqlite();
    let ledger = LedgerServer::start(ledger_config(&db.url)).await;
    let owner = create_account(&ledger.url, "owner").await;
    let other = create_account(&ledger.url, "other").await;
    let paid = || Pricing::per_request(PRICE);
    let cases = [
        (
            "wrong secret",
            owner.email.clone(),
            "not-the-secret-0123456789".to_string(),
            "secret_rejected",
            "--ledger-secret",
        ),
        (
            // Told that it has none, not that the ledger rejected one.
            "no secret",
            owner.email.clone(),
            String::new(),
            "no_secret",
            "has no ledger secret",
        ),
        (
            "another account's secret",
            owner.email.clone(),
            other.secret.clone(),
            "not_owner",
            "belongs to another account than owner_email",
        ),
        (
            "owner without an account",
            "nobody@example.com".to_string(),
            owner.secret.clone(),
            // The secret is valid but not nobody@'s: the ledger says so before looking it up.
            "not_owner",
            "nobody@example.com",
        ),
    ];
    for (what, owner_email, secret, want, says) in cases {
        let config = router_config("r", &owner_email, &secret, &ledger.url, paid(), None);
        let router = RouterHandle::start(config).await;
        let ch = channel(&router.grpc_url).await;
        let (code, body) = wait_owner(&router.http_url, want).await;
        assert_eq!(code, 503, "{what}: {body}");
        assert_eq!(body["ready"], false, "{what}: {body}");
        assert_eq!(body["ledger"], "serving", "{what}: {body}");
        let reason = body["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(says), "{what}: {reason}");
        assert_eq!(
            status(&ch, ROUTER).await,
            ServingStatus::NotServing,
            "{what}"
        );
    }
    // The right secret: verified and ready, no reason.
    let config = router_config("r", &owner.email, &owner.secret, &ledger.url, paid(), None);
    let router = RouterHandle::start(config).await;
    let ch = channel(&router.grpc_url).await;
    wait_status(&ch, ROUTER, ServingStatus::Serving).await;
    let (code, body) = wait_owner(&router.http_url, "verified").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.get("reason").is_none(), "{body}");
}

/// A router started without a secret sends none: its probe, every second, counted as a wrong
/// secret from its address, and within 20 s the ledger locked every client of the machine out,
/// the admin and correctly configured routers included (a first-hour reviewer's finding). A free
/// router without one is not ready: no usage row of it can be recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_a_secret_locks_nobody_out() {
    let db = Db::sqlite();
    let mut config = ledger_config(&db.url);
    config.auth_failures_per_address = 2;
    let ledger = LedgerServer::start(config).await;
    let owner = create_account(&ledger.url, "owner").await;
    let free = router_config("r", &owner.email, "", &ledger.url, Pricing::free(), None);
    let router = RouterHandle::start(free).await;
    let (code, body) = wait_owner(&router.http_url, "no_secret").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("has no ledger secret"),
        "{body}"
    );
    // Several of the probe's ticks; two counted failures would lock this address.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The admin's call goes through (it panics if the address is locked).
    create_account(&ledger.url, "later").await;
    let (code, body) = readyz(&router.http_url).await;
    assert_eq!(
        (code, &body["owner"]),
        (503, &Value::from("no_secret")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_router_without_a_ledger_is_ready() {
    // Nothing listens on the ledger URL.
    let mut config = RouterConfig::new("free-router", "owner@example.com");
    config.ledger.url = closed_url();
    config.ledger.connect_timeout = Duration::from_millis(200);
    let router = RouterHandle::start(config).await;
    let ch = channel(&router.grpc_url).await;
    wait_status(&ch, ROUTER, ServingStatus::Serving).await;
    // The probe has run and found no ledger, and the router is still ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = readyz(&router.http_url).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["ledger_required"], false);
        if body["ledger"] == "unreachable" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A router whose limits are counted in Redis with `on_failure = "fail_closed"` refuses every
/// request while Redis does not answer, so it is not ready then (it used to say ready while
/// refusing everything, and a load balancer kept sending it traffic); with `fail_open` it admits
/// unlimited and stays ready. `/readyz` shows the limiter's state either way. A short pause of
/// Redis changes nothing, and a Redis back makes it ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_limiter_store_is_down_fails_closed_not_ready() {
    let Some(mut redis) = OwnRedis::start().await else {
        syft_testkit::skipped(syft_testkit::Need::RedisServer, "cannot start redis-server");
        return;
    };
    let router = |url: &str, on_failure: OnFailure| {
        // Free and without a ledger: only the limiter decides readiness.
        let mut config = RouterConfig::new("limited-router", "owner@example.com");
        config.ledger.url = closed_url();
        config.ledger.connect_timeout = Duration::from_millis(200);
        config.rate_limits.requests = vec![Rate {
            count: 100,
            unit: RateUnit::Minute,
        }];
        config.limiter.backend = LimiterBackend::Redis { url: url.into() };
        config.limiter.on_failure = on_failure;
        RouterHandle::start(config)
    };
    let closed = router(&redis.url, OnFailure::FailClosed).await;
    let ch = channel(&closed.grpc_url).await;
    wait_status(&ch, ROUTER, ServingStatus::Serving).await;
    let (code, body) = wait_readyz(&closed.http_url, "limiter", "serving").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["limiter_required"], true, "{body}");
    let open = router(&redis.url, OnFailure::FailOpen).await;
    let (code, body) = wait_readyz(&open.http_url, "limiter", "serving").await;
    assert_eq!(
        (code, &body["limiter_required"]),
        (200, &Value::Bool(false))
    );

    // One slow moment (Redis paused 1.2 s: at most two pings unanswered, of the three it takes)
    // does not take the router out of service.
    if redis.pause(1_200).await {
        let until = tokio::time::Instant::now() + Duration::from_millis(2_500);
        while tokio::time::Instant::now() < until {
            let (code, body) = readyz(&closed.http_url).await;
            assert_eq!(code, 200, "a short pause: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    redis.kill();
    let (code, body) = wait_readyz(&closed.http_url, "limiter", "unreachable").await;
    assert_eq!(code, 503, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("fail_closed"), "{body}");
    wait_status(&ch, ROUTER, ServingStatus::NotServing).await;
    // It does refuse: the readiness tells the truth.
    let refused = reqwest::Client::new()
        .post(closed.chat_completions_url())
        .json(
            &serde_json::json!({"model": "echo", "user": "u@example.com",
                                  "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .expect("http");
    assert_eq!(refused.status(), 503);
    let (code, body) = wait_readyz(&open.http_url, "limiter", "unreachable").await;
    assert_eq!(code, 200, "fail_open admits meanwhile: {body}");

    // Back: ready again, and answering.
    assert!(redis.restart().await, "redis-server restarts on its port");
    let (code, body) = wait_readyz(&closed.http_url, "limiter", "serving").await;
    assert_eq!(code, 200, "{body}");
    wait_status(&ch, ROUTER, ServingStatus::Serving).await;
}

/// Lists services over reflection, and resolves `symbol` to its file descriptor.
async fn reflect(ch: &Channel, symbol: &str) -> (Vec<String>, usize) {
    let requests = futures::stream::iter(vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        },
    ]);
    let mut responses = ServerReflectionClient::new(ch.clone())
        .server_reflection_info(requests)
        .await
        .expect("reflection")
        .into_inner();
    let mut services = Vec::new();
    let mut files = 0;
    while let Some(resp) = responses.next().await {
        match resp.expect("reflection response").message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                services.extend(list.service.into_iter().map(|s| s.name));
            }
            Some(MessageResponse::FileDescriptorResponse(fd)) => {
                files += fd.file_descriptor_proto.len();
            }
            Some(MessageResponse::ErrorResponse(e)) => {
                panic!("reflection error for {symbol}: {}", e.error_message)
            }
            other => panic!("unexpected reflection response {other:?}"),
        }
    }
    services.sort();
    (services, files)
}

/// The services a server lists over reflection: health, reflection and its own `services`,
/// sorted.
fn advertised<'a>(services: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];
    all.extend_from_slice(services);
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let ledger = channel(&s.ledger.url).await;
    let (services, files) = reflect(&ledger, "syft.ledger.v1.Ledger.Authorize").await;
    // What it serves, its alerts service included (it was missing from `grpcurl list`).
    assert_eq!(
        services,
        advertised(&[LEDGER, "syft.ledger.v1.Alerts"]),
        "the ledger advertises what it serves"
    );
    assert!(files >= 1);

    let router = channel(&s.router.grpc_url).await;
    let (services, files) = reflect(&router, "syft.router.v1.ChatRequest").await;
    assert_eq!(services, advertised(&[ROUTER]));
    assert!(files >= 1);
}

/// A router that prices in another currency than its ledger keeps (EUR against USD accounts)
/// would hold and charge the same number of the ledger's units. It stays not ready, saying why,
/// and a paid request that reaches it anyway is refused, its hold voided at once: nothing is
/// charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_priced_in_another_currency_than_its_ledger_sells_nothing() {
    let mut euros = Pricing::per_request(PRICE);
    euros.currency = "EUR".into();
    let s = Stack::start_with(Db::sqlite(), euros, Duration::from_secs(300), |_| {}).await;
    let (code, body) = wait_owner(&s.router.http_url, "currency_mismatch").await;
    assert_eq!(code, 503, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("pricing.currency"), "{reason}");
    let mut c = s.client().await;
    let err = c.chat(s.request("hi")).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let t = s.wait_no_pending(Duration::from_secs(5)).await;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(s.alice_money().await, (FUNDS, 0, FUNDS));
    assert_eq!(s.usage_statuses().await, vec!["unavailable".to_string()]);
    s.check_invariants().await;
}

/// Opens a health `Watch` of `service` and reads its first status.
async fn watch(ch: &Channel, service: &str) -> tonic::Streaming<HealthCheckResponse> {
    let mut statuses = HealthClient::new(ch.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = statuses.next().await.expect("a status").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);
    statuses
}

/// What a watcher reads once its server stops: NOT_SERVING, then the end of the stream.
async fn assert_told_and_ended(mut statuses: tonic::Streaming<HealthCheckResponse>) {
    let last = tokio::time::timeout(Duration::from_secs(5), statuses.next())
        .await
        .expect("NOT_SERVING sent at the stop")
        .expect("a status")
        .expect("ok");
    assert_eq!(last.status(), ServingStatus::NotServing);
    let end = tokio::time::timeout(Duration::from_secs(5), statuses.next())
        .await
        .expect("the stream ended at the stop");
    assert!(end.as_ref().is_none_or(|e| e.is_err()), "{end:?}");
}

/// A health watcher (a monitor, a load balancer) does not hold a stopping server open: the gRPC
/// server waits for every open call, and a `Watch` used to run until the grace was over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watchers_let_stopping_servers_go() {
    const LONG_GRACE: Duration = Duration::from_secs(30);
    let s = Stack::start_with_ledger(Pricing::per_request(PRICE), |c| {
        c.shutdown_grace = LONG_GRACE
    })
    .await;
    let Stack {
        ledger, mut router, ..
    } = s;
    let router_ch = channel(&router.grpc_url).await;
    wait_status(&router_ch, ROUTER, ServingStatus::Serving).await;
    let ledger_ch = channel(&ledger.url).await;
    let router_watch = watch(&router_ch, ROUTER).await;
    let ledger_watch = watch(&ledger_ch, LEDGER).await;

    router.shutdown();
    assert_told_and_ended(router_watch).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !router.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the router waited for its health watcher"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stopped = tokio::spawn(ledger.stop());
    assert_told_and_ended(ledger_watch).await;
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the ledger waited for its health watcher")
        .expect("stopped cleanly");
}
