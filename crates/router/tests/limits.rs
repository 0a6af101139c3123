//! Rate and concurrency limits with real routers, ledgers and Redis (docs/limits.md). Every
//! scenario ends with the ledger's verify.

use std::time::Duration;
use tokio::time::Instant;

use futures::future::join_all;
use serde_json::{json, Value};
use syft_proto::ledger::TransferStatus;
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::ChatRequest;
use syft_router_svc::config::{LimiterBackend, OnFailure, Rate, RateUnit};
use syft_router_svc::limits::{
    Gate, Limiter, MemoryLimiter, RedisLimiter, Rule, RuleKind, Verdict,
};
use syft_router_svc::{Pricing, RouterConfig, RouterError, ServiceKind};
use syft_testkit::{
    assert_consistent, deposit, get_json, ledger_config, reason, shared_redis_answers, skipped, Db,
    FakeUpstream, Funded, KillableRouter, LedgerServer, Mode, Need, OwnRedis, RouterHandle,
    SilentRelay, Stack, PRICE,
};
use tonic::Code;
use tonic_types::StatusExt;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// A router name no other test run shares (Redis keys are scoped by it).
fn unique_name() -> String {
    format!("rl-{}", uuid::Uuid::new_v4().simple())
}

fn per_minute(n: u64) -> Rate {
    Rate {
        count: n,
        unit: RateUnit::Minute,
    }
}

fn per_hour(n: u64) -> Rate {
    Rate {
        count: n,
        unit: RateUnit::Hour,
    }
}

fn request_rule(key: &str, limit: u64, window: Duration) -> Rule {
    Rule {
        key: key.into(),
        kind: RuleKind::Requests,
        scope: "router",
        limit,
        window,
        cost: 1,
        describe: format!("{limit} requests"),
    }
}

async fn admitted(l: &dyn Limiter, now: u64, lease: &str, rules: &[Rule]) -> bool {
    matches!(
        l.acquire(now, lease, rules).await.expect("limiter"),
        Verdict::Admitted(_)
    )
}

/// A sliding window never admits more than its limit in any window-long span, also across what a
/// fixed bucket would call its boundary, and says exactly when to retry.
async fn window_boundary(l: &dyn Limiter, key: &str) {
    let minute = Duration::from_secs(60);
    let rules = [request_rule(key, 10, minute)];
    let t0 = 1_000_000_000u64;
    for i in 0..5 {
        assert!(admitted(l, t0, &format!("a{i}"), &rules).await);
    }
    // Five more just before a fixed bucket's edge, five right after it: a fixed bucket would admit
    // all ten after the edge; the sliding window admits none until the first five age out.
    for i in 0..5 {
        assert!(admitted(l, t0 + 59_000, &format!("b{i}"), &rules).await);
    }
    let refused = l.acquire(t0 + 59_500, "c", &rules).await.expect("limiter");
    match refused {
        Verdict::Refused {
            rule, retry_after, ..
        } => {
            assert_eq!(rule, 0);
            // The first five age out at t0 + 60 s.
            assert_eq!(retry_after, Some(Duration::from_millis(500)));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // At t0 + 60 s the first five are out: exactly five fit.
    for i in 0..5 {
        assert!(admitted(l, t0 + 60_000, &format!("d{i}"), &rules).await);
    }
    assert!(!admitted(l, t0 + 60_000, "e", &rules).await);
    // A refund (cost 0) frees a place at once.
    l.settle("d0", &[(key.to_string(), 0)])
        .await
        .expect("settle");
    assert!(admitted(l, t0 + 60_002, "f", &rules).await);
    let state = l.peek(t0 + 60_002, &rules).await.expect("peek");
    assert_eq!(state[0].remaining, 0);
    // An in-flight slot whose router died (never released) frees itself when its lease runs out.
    let slot = [Rule {
        kind: RuleKind::Concurrency,
        ..request_rule(&format!("{key}:inflight"), 1, Duration::from_secs(600))
    }];
    assert!(admitted(l, t0, "dead", &slot).await);
    assert!(!admitted(l, t0 + 599_999, "next", &slot).await);
    assert!(admitted(l, t0 + 600_000, "next", &slot).await);
    // A slot renewed by its request, still in flight, is counted a lease from its renewal; a
    // dead router's slot beside it ages out, and renewing a slot no longer there adds nothing.
    let live_key = format!("{key}:live");
    let live = [Rule {
        kind: RuleKind::Concurrency,
        ..request_rule(&live_key, 2, Duration::from_secs(60))
    }];
    let windows = [(live_key, Duration::from_secs(60))];
    assert!(admitted(l, t0, "running", &live).await);
    assert!(admitted(l, t0, "dead", &live).await);
    l.renew(t0 + 50_000, "running", &windows)
        .await
        .expect("renew");
    assert!(
        admitted(l, t0 + 60_000, "next", &live).await,
        "the dead one aged out"
    );
    assert!(
        !admitted(l, t0 + 60_000, "more", &live).await,
        "the renewed one did not"
    );
    l.renew(t0 + 60_000, "dead", &windows)
        .await
        .expect("renew a slot gone");
    // "running" ages out a lease after its renewal; "next" holds the other place.
    assert!(admitted(l, t0 + 110_000, "after", &live).await);
    assert!(!admitted(l, t0 + 110_000, "over", &live).await);
}

/// One scenario run on each limiter backend: in memory, and on the shared Redis (on the caller's
/// clock), each with a key of its own.
macro_rules! on_both_limiters {
    ($memory:ident, $redis:ident, $scenario:ident) => {
        #[tokio::test]
        async fn $memory() {
            $scenario(&MemoryLimiter::new(), stringify!($scenario)).await;
        }

        #[tokio::test]
        async fn $redis() {
            if let Some((l, key)) = shared_redis(true).await {
                $scenario(&l, &key).await;
            }
        }
    };
}

on_both_limiters!(
    sliding_window_boundary_memory,
    sliding_window_boundary_redis,
    window_boundary
);

/// A limiter on the shared Redis (on the caller's clock or Redis's) and a key of the test's own;
/// `None` (SKIPPED printed) without a Redis.
async fn shared_redis(caller_clock: bool) -> Option<(RedisLimiter, String)> {
    if !shared_redis_answers(SHARED_REDIS).await {
        skipped(Need::Redis, format!("no Redis at {SHARED_REDIS}"));
        return None;
    }
    let timeout = Duration::from_secs(2);
    let limiter = match caller_clock {
        true => RedisLimiter::with_caller_clock(SHARED_REDIS, timeout),
        false => RedisLimiter::new(SHARED_REDIS, timeout),
    };
    Some((
        limiter.expect("redis"),
        format!("syft:test:{}", unique_name()),
    ))
}

/// A take-back that reaches Redis before the check it takes back (sent on a new connection while
/// the check still waited on the old one) wins: the check records nothing when it arrives. Without
/// the tombstone the take-back found nothing to remove, and the late check's slot stayed taken for
/// its lease. Only a take-back leaves one: a release of a lease that is not there does not.
#[tokio::test]
async fn a_take_back_that_overtakes_its_check_wins() {
    let Some(redis) = OwnRedis::start().await else {
        skipped(Need::RedisServer, "cannot start redis-server");
        return;
    };
    let l = RedisLimiter::new(&redis.url, Duration::from_secs(2)).expect("limiter");
    let slot = [Rule {
        kind: RuleKind::Concurrency,
        ..request_rule("user:inflight", 1, Duration::from_secs(600))
    }];
    let gone = [(slot[0].key.clone(), 0)];
    l.take_back("late", &gone).await.expect("take-back");
    // The late check is answered (nobody waits for it any more) and records nothing.
    assert!(admitted(&l, 0, "late", &slot).await);
    assert_eq!(l.peek(0, &slot).await.expect("peek")[0].remaining, 1);
    l.settle("next", &gone).await.expect("a release of nothing");
    assert!(admitted(&l, 0, "next", &slot).await, "the slot was free");
    assert!(!admitted(&l, 0, "after", &slot).await, "and is taken now");
}

/// A window emptied by a release or a take-back, or by its entries ageing out, leaves no key
/// in Redis: its running total stayed at 0 for the window's life, about 100 bytes per request of
/// a stranger naming a new email each time, until a Redis under `noeviction` refused every write.
#[tokio::test]
async fn an_emptied_window_leaves_no_key() {
    let Some((l, key)) = shared_redis(true).await else {
        return;
    };
    let day = [request_rule(&key, 5, Duration::from_secs(86_400))];
    let gone = [(key.clone(), 0)];
    let pattern = format!("{key}:*");
    assert!(admitted(&l, 1_000, "released", &day).await);
    let keys = keys_like(&pattern).await;
    assert_eq!(keys.len(), 3, "a window's set, costs and total: {keys:?}");
    l.settle("released", &gone).await.expect("release");
    assert_eq!(keys_like(&pattern).await, Vec::<String>::new(), "released");
    assert!(admitted(&l, 1_000, "taken-back", &day).await);
    l.take_back("taken-back", &gone).await.expect("take-back");
    assert_eq!(
        keys_like(&pattern).await,
        Vec::<String>::new(),
        "taken back"
    );
    // Aged out: the next check (of a window of a second) finds it empty.
    let second = [request_rule(&key, 5, Duration::from_secs(1))];
    assert!(admitted(&l, 1_000, "aged", &second).await);
    let peeked = l.peek(10_000, &second).await.expect("peek");
    assert_eq!(peeked[0].remaining, 5);
    assert_eq!(keys_like(&pattern).await, Vec::<String>::new(), "aged out");
}

/// The keys of the shared Redis matching `pattern`.
async fn keys_like(pattern: &str) -> Vec<String> {
    let client = redis::Client::open(SHARED_REDIS).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .expect("keys")
}

/// Two replicas whose clocks disagree by ten minutes share one Redis window of 3 per minute:
/// the windows age by Redis's clock, so the replica running ahead does not see the other's
/// three requests as gone and admit a fourth.
#[tokio::test]
async fn a_replica_clock_ahead_admits_no_more() {
    let Some((l, key)) = shared_redis(false).await else {
        return;
    };
    let rule = [request_rule(&key, 3, Duration::from_secs(60))];
    let now = syft_router_svc::limits::now_ms();
    for i in 0..3 {
        assert!(admitted(&l, now, &format!("a{i}"), &rule).await);
    }
    let ahead = now + 10 * 60 * 1000;
    assert!(
        !admitted(&l, ahead, "b", &rule).await,
        "a fourth in the minute"
    );
}

/// A request reserving more tokens than fit waits for the reservation of others to be settled.
#[tokio::test]
async fn token_reservations_settle_to_the_actual_count() {
    let l = MemoryLimiter::new();
    let rule = |cost| Rule {
        key: "tok".into(),
        kind: RuleKind::Tokens,
        scope: "router",
        limit: 1_000,
        window: Duration::from_secs(60),
        cost,
        describe: "1000 tokens per minute".into(),
    };
    assert!(admitted(&l, 1, "a", &[rule(600)]).await);
    assert!(!admitted(&l, 2, "b", &[rule(600)]).await);
    // `a` used only 100 of its 600.
    l.settle("a", &[("tok".into(), 100)]).await.expect("settle");
    assert!(admitted(&l, 4, "b", &[rule(600)]).await);
    // A reservation above the whole limit can never fit: no retry time.
    match l.acquire(5, "c", &[rule(1_001)]).await.expect("limiter") {
        Verdict::Refused { retry_after, .. } => assert_eq!(retry_after, None),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A token window full of reservations of requests still running (each reserved its
/// `max_tokens` and is settled to its real count when it ends) refuses with a wait for one to
/// end, not for the window: an hour on a `/hour` window, though the request it waits for settled
/// a second later (an SDK reviewer's finding). Only a request that would fit without them waits
/// so; once they are settled the wait is the window's again. Memory and Redis alike.
async fn a_wait_for_running_reservations(l: &dyn Limiter, key: &str) {
    let hour = Duration::from_secs(3_600);
    let rule = |cost| Rule {
        key: key.into(),
        kind: RuleKind::Tokens,
        scope: "router",
        limit: 1_000,
        window: hour,
        cost,
        describe: "1000 tokens per hour".into(),
    };
    let refusal = |v: Verdict| match v {
        Verdict::Refused {
            retry_after,
            awaits_running,
            ..
        } => (retry_after, awaits_running),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let t0 = 1_000_000_000u64;
    assert!(admitted(l, t0, "a", &[rule(600)]).await);
    let b = l.acquire(t0 + 1, "b", &[rule(600)]).await.expect("limiter");
    let (after, awaits) = refusal(b);
    assert!(awaits, "a is running: b waits for it to end");
    assert_eq!(after, Some(Duration::from_millis(3_600_000 - 1)));
    // `a` ends having used 500 of its 600: settled, it ages out with the window.
    l.settle("a", &[(key.into(), 500)]).await.expect("settle");
    let b = l.acquire(t0 + 2, "b", &[rule(600)]).await.expect("limiter");
    assert_eq!(refusal(b), (Some(Duration::from_millis(3_599_998)), false));
    // `c` runs with 300 reserved: `d` (600) does not fit even if `c` used nothing (500 settled),
    // so it waits for the window, not for `c`.
    assert!(admitted(l, t0 + 3, "c", &[rule(300)]).await);
    let d = l.acquire(t0 + 4, "d", &[rule(600)]).await.expect("limiter");
    assert_eq!(refusal(d), (Some(Duration::from_millis(3_599_996)), false));
    // `e` (400) would fit once `c` is settled: it waits for `c`.
    let e = l.acquire(t0 + 5, "e", &[rule(400)]).await.expect("limiter");
    assert!(refusal(e).1, "c is running: e waits for it");
    // `c` failed (a refund, cost 0): `e` fits.
    l.settle("c", &[(key.into(), 0)]).await.expect("settle");
    assert!(admitted(l, t0 + 6, "e", &[rule(400)]).await);
    // `e` and `f` running fill the window: `g` waits for one to end...
    assert!(admitted(l, t0 + 7, "f", &[rule(100)]).await);
    let g = l.acquire(t0 + 8, "g", &[rule(100)]).await.expect("limiter");
    assert!(refusal(g).1, "e and f are running");
    // ...but not for a reservation admitted longer ago than a request runs (a replica that died
    // mid-request never settles it; it was "retry when one ends" for the whole window).
    let later = t0 + 60_008;
    let g = l.acquire(later, "g", &[rule(100)]).await.expect("limiter");
    let wait = Duration::from_millis(t0 + 3_600_000 - later);
    assert_eq!(refusal(g), (Some(wait), false));
}

on_both_limiters!(
    a_token_refusal_by_running_requests_waits_for_one_memory,
    a_token_refusal_by_running_requests_waits_for_one_redis,
    a_wait_for_running_reservations
);

/// Over HTTP: two concurrent chats without `max_tokens` on a 6,000 tokens an hour window (each
/// reserves the router's default bound, 4,096): the second is told to come back in a second,
/// and the SDKs may retry it (`x-should-retry` is not false). It used to be told an hour, and
/// not to retry. Once the first is answered (settled at its few tokens) the next one passes.
#[tokio::test]
async fn a_chat_refused_for_a_running_ones_reservation_is_retried_soon() {
    let s = Stack::start_tweaked(Pricing::free(), |c| {
        c.rate_limits.tokens = vec![per_hour(6_000)]
    })
    .await;
    // Within the stack's request timeout (1.5 s).
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(700)));
    let running = tokio::spawn(s.openai_chat(json!({})).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(refused.status(), 429);
    let h = refused.headers().clone();
    assert_eq!(h["retry-after"], "1", "{h:?}");
    assert_ne!(
        h.get("x-should-retry").map(|v| v.as_bytes()),
        Some(&b"false"[..]),
        "{h:?}"
    );
    let body: Value = refused.json().await.expect("json");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("requests still running"), "{body}");
    let first = running.await.expect("task").expect("http");
    assert_eq!(first.status(), 200);
    s.upstream.set_mode(Mode::Ok);
    let next = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(next.status(), 200);
    assert_consistent(&s.ledger.store).await;
}

/// One router, in-process limiter: 30 concurrent HTTP requests at 10/minute, exactly 10 answered;
/// the refusals are 429 with Retry-After and OpenAI's headers, cost nothing and leave usage rows.
#[tokio::test]
async fn http_refusals_are_429_with_headers() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.rate_limits.requests = vec![per_minute(10)]
    })
    .await;
    let http = reqwest::Client::new();
    let url = s.router.chat_completions_url();
    let calls = (0..30).map(|_| {
        http.post(&url)
            .bearer_auth(&s.token)
            .json(&json!({"model": "test-model", "max_tokens": 10,
                          "messages": [{"role": "user", "content": "hi"}], "user": s.alice.email}))
            .send()
    });
    let answers = join_all(calls).await;
    let mut ok = 0;
    let mut limited = 0;
    for a in answers {
        let resp = a.expect("http");
        let h = resp.headers().clone();
        assert_eq!(h["x-ratelimit-limit-requests"], "10");
        assert!(h.contains_key("x-ratelimit-reset-requests"));
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                let retry: u64 = h["retry-after"]
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("secs");
                assert!((1..=60).contains(&retry), "retry-after {retry}");
                assert!(
                    !h.contains_key("x-should-retry"),
                    "a rate limit may be retried"
                );
                assert_eq!(h["x-ratelimit-remaining-requests"], "0");
                let body: Value = resp.json().await.expect("json");
                assert_eq!(body["error"]["code"], "rate_limited");
                assert_eq!(body["error"]["type"], "rate_limit_error");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, limited), (10, 20));
    assert_eq!(s.upstream.hits(), 10);
    let (balance, held, _) = s.alice_money().await;
    assert_eq!((balance, held), (syft_testkit::FUNDS - 10 * PRICE, 0));
    let usage = s.usage().await;
    let status = |u: &syft_proto::ledger::UsageRecord| {
        u.usage
            .as_ref()
            .map(|u| u.status.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        usage.iter().filter(|u| status(u) == "rate_limited").count(),
        20
    );
    assert_eq!(usage.iter().filter(|u| status(u) == "success").count(), 10);
    // What is left, and the configured limits in the model list.
    let url = format!("{}/v1/limits?user={}", s.router.http_url, s.alice.email);
    let left = syft_testkit::get_json_as(&http, &url, &s.token).await;
    assert_eq!(left["limits"][0]["remaining"], 0);
    assert_eq!(left["limits"][0]["limit"], 10);
    let models = get_json(&http, &format!("{}/v1/models", s.router.http_url)).await;
    assert_eq!(
        models["syft_limits"]["per_user"]["requests"][0],
        "10/minute"
    );
    s.check_invariants().await;
}

/// Two ledgers on one Postgres and three routers (the middle one on the second ledger).
struct Replicas {
    funded: Funded,
    _second: LedgerServer,
    _upstream: FakeUpstream,
    _routers: Vec<RouterHandle>,
    clients: Vec<RouterClient<tonic::transport::Channel>>,
}

impl Replicas {
    async fn start(db: &Db, price: i64, tweak: impl Fn(&mut RouterConfig)) -> Self {
        let funded = Funded::start(db, Duration::from_secs(300)).await;
        let second = LedgerServer::start(ledger_config(&db.url)).await;
        let upstream = FakeUpstream::start().await;
        let name = unique_name();
        let routers = join_all((0..3).map(|i| {
            let mut c =
                funded.router_config(&name, Pricing::per_request(price), Some(&upstream.base_url));
            if i == 1 {
                c.ledger.url = second.url.clone();
            }
            // Holds of one sender are serialized on its row across both ledgers; on a loaded
            // 2-core machine that can take longer than the kit's short deadline.
            c.ledger.timeout = Duration::from_secs(30);
            tweak(&mut c);
            RouterHandle::start(c)
        }))
        .await;
        let mut clients = Vec::new();
        for r in &routers {
            clients.push(r.client().await);
        }
        Replicas {
            funded,
            _second: second,
            _upstream: upstream,
            _routers: routers,
            clients,
        }
    }

    /// `n` concurrent chats of alice, spread over the routers.
    async fn fire(&self, n: usize) -> Vec<Result<syft_proto::router::ChatResponse, tonic::Status>> {
        let calls = (0..n).map(|i| {
            let mut c = self.clients[i % 3].clone();
            let req = ChatRequest {
                model: "test-model".into(),
                ..syft_testkit::chat_request(&self.funded.alice.email, &self.funded.token, "hi")
            };
            async move { c.chat(req).await.map(tonic::Response::into_inner) }
        });
        join_all(calls).await
    }
}

/// A $1.00/day budget hit by 200 concurrent $0.03 requests across 3 routers and 2 ledgers:
/// exactly 33 are captured ($0.99), the 167 refusals are `BUDGET_EXCEEDED`, cost nothing and
/// leave `budget_exceeded` usage rows.
#[tokio::test]
async fn budget_exact_across_replicas() {
    let Some(db) = Db::postgres().await else {
        // `Db::postgres` said it skipped.
        return;
    };
    let r = Replicas::start(&db, 30_000, |c| c.budgets.per_day_micros = Some(1_000_000)).await;
    deposit(&r.funded.ledger.url, &r.funded.alice.email, 10_000_000).await;
    let results = r.fire(200).await;
    let ok = results.iter().filter(|x| x.is_ok()).count();
    assert_eq!(ok, 33);
    for err in results.iter().filter_map(|x| x.as_ref().err()) {
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert_eq!(reason(err).as_deref(), Some("BUDGET_EXCEEDED"));
        assert!(err.get_details_retry_info().is_some());
    }
    let f = &r.funded;
    let a = syft_testkit::account(&f.ledger.url, &f.alice.email).await;
    assert_eq!(
        a.balance_micros,
        syft_testkit::FUNDS + 10_000_000 - 33 * 30_000
    );
    assert_eq!(a.held_micros, 0);
    let usage = syft_testkit::usage_of(&f.ledger.url, &f.alice.email).await;
    let refused = usage
        .iter()
        .filter(|u| {
            u.usage
                .as_ref()
                .is_some_and(|u| u.status == "budget_exceeded")
        })
        .count();
    assert_eq!(refused, 167);
    assert_consistent(&f.ledger.store).await;
    db.drop_postgres().await;
}

/// Three routers and two ledgers on one Postgres, limits counted in the shared Redis: 100
/// concurrent requests of one user at 10/minute give exactly 10 answers and 90
/// `RESOURCE_EXHAUSTED` refusals that cost nothing.
#[tokio::test]
async fn exact_across_replicas() {
    let Some(db) = Db::postgres().await else {
        // `Db::postgres` said it skipped.
        return;
    };
    if !shared_redis_answers(SHARED_REDIS).await {
        skipped(Need::Redis, format!("no Redis at {SHARED_REDIS}"));
        db.drop_postgres().await;
        return;
    }
    let r = Replicas::start(&db, PRICE, |c| {
        c.rate_limits.requests = vec![per_minute(10)];
        // 100 checks at once on a loaded machine: a store call that ran past the default 250 ms
        // was refused `UNAVAILABLE` (fail_closed), not counted, and the test failed on its code.
        c.limiter.timeout = Duration::from_secs(2);
        c.limiter.backend = LimiterBackend::Redis {
            url: SHARED_REDIS.into(),
        };
    })
    .await;
    let results = r.fire(100).await;
    let funded = &r.funded;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let mut codes = std::collections::BTreeMap::new();
    for r in &results {
        let k = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{:?} {}", e.code(), e.message()),
        };
        *codes.entry(k).or_insert(0) += 1;
    }
    eprintln!("outcomes: {codes:#?}");
    assert_eq!(ok, 10, "exactly the limit is admitted across replicas");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert_eq!(reason(err).as_deref(), Some("RATE_LIMITED"));
        let retry = err.get_details_retry_info().and_then(|r| r.retry_delay);
        // Each router stamps its own time: another's entry may be a few ms "later".
        assert!(
            retry.is_some_and(|d| d <= Duration::from_secs(61)),
            "{retry:?}"
        );
        assert!(err.get_details_quota_failure().is_some());
    }
    let transfers = syft_testkit::transfers_of(&funded.ledger.url, &funded.alice.email).await;
    assert_eq!(transfers.len(), 10, "refused requests place no hold");
    assert!(transfers
        .iter()
        .all(|t| t.status() == TransferStatus::Completed));
    let a = syft_testkit::account(&funded.ledger.url, &funded.alice.email).await;
    assert_eq!(a.balance_micros, syft_testkit::FUNDS - 10 * PRICE);
    assert_consistent(&funded.ledger.store).await;
    db.drop_postgres().await;
}

/// A user's Redis windows are keys that end in their email, and an email may end in anything,
/// `:s` or `:c` included: requests as `<alice>:s` and `<alice>:c` leave alice's windows whole
/// (they used to make her every check fail, `UNAVAILABLE` under `fail_closed`).
#[tokio::test]
async fn an_email_ending_like_a_window_key_leaves_other_windows_alone() {
    if !shared_redis_answers(SHARED_REDIS).await {
        skipped(Need::Redis, format!("no Redis at {SHARED_REDIS}"));
        return;
    }
    let s = Stack::start_tweaked(Pricing::free(), |c| {
        c.name = unique_name();
        c.rate_limits.requests = vec![per_minute(3)];
        c.rate_limits.concurrent = Some(2);
        c.limiter.backend = LimiterBackend::Redis {
            url: SHARED_REDIS.into(),
        };
        c.limiter.on_failure = OnFailure::FailClosed;
    })
    .await;
    let mut c = s.client().await;
    for suffix in [":s", ":c", ":z"] {
        let mut req = s.request("hi");
        req.user_email = format!("{}{suffix}", s.alice.email);
        c.chat(req).await.expect("a user of its own");
    }
    for _ in 0..3 {
        c.chat(s.request("hi")).await.expect("alice's own windows");
    }
    let err = c.chat(s.request("hi")).await.expect_err("her 4th");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err).as_deref(), Some("RATE_LIMITED"));
    assert_consistent(&s.ledger.store).await;
}

/// Per-user concurrency: with a slow upstream and 2 in flight allowed, of 6 simultaneous requests
/// 2 are answered and 4 refused with `CONCURRENCY_LIMITED`; once they end, the slots are free.
/// The limit holds on a free service too.
#[tokio::test]
async fn concurrency_limit_on_a_free_service() {
    let s = Stack::start_tweaked(Pricing::free(), |c| c.rate_limits.concurrent = Some(2)).await;
    s.upstream.set_mode(Mode::Delay(Duration::from_millis(400)));
    let client = s.client().await;
    let calls = (0..6).map(|_| {
        let mut c = client.clone();
        let req = s.request("hi");
        async move { c.chat(req).await }
    });
    let results = join_all(calls).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(reason(err).as_deref(), Some("CONCURRENCY_LIMITED"));
    }
    // The slots are released when the requests end (the release is asynchronous).
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.upstream.set_mode(Mode::Ok);
    let mut c = client.clone();
    c.chat(s.request("again")).await.expect("slot freed");
    assert_consistent(&s.ledger.store).await;
}

/// A free chat service with a per-user request window of `rate`.
async fn free_with_requests(rate: Rate) -> Stack {
    Stack::start_tweaked(Pricing::free(), |c| c.rate_limits.requests = vec![rate]).await
}

/// A free chat service with a per-user token window of `limit` a minute.
async fn free_with_tokens_per_minute(limit: u64) -> Stack {
    Stack::start_tweaked(Pricing::free(), |c| {
        c.rate_limits.tokens = vec![per_minute(limit)]
    })
    .await
}

/// A free service with a token window: a request without `max_tokens` reserves the default
/// bound, and that bound goes upstream, so its answer cannot settle far above what it reserved
/// (unbounded, each of many concurrent requests could use several times its reservation).
#[tokio::test]
async fn a_token_window_bounds_the_answer_it_reserves_for() {
    let s = free_with_tokens_per_minute(1_000_000).await;
    let default = syft_router_svc::Limits::default().default_max_tokens;
    assert_eq!(s.max_tokens_sent_for_a_chat_without_one().await, default);
    assert_consistent(&s.ledger.store).await;
}

/// A request reserving more tokens than its whole window holds (no `max_tokens`: the router's
/// default of 4,096, against 200 a minute) can never pass: refused with no time to retry and
/// `x-should-retry: false`, so the OpenAI SDKs do not retry it (they retry every 429 otherwise).
/// The same request with a `max_tokens` that fits is answered.
#[tokio::test]
async fn a_request_that_never_fits_its_token_window_is_not_retried() {
    let s = free_with_tokens_per_minute(200).await;
    let refused = s.openai_chat(json!({})).send().await.expect("http");
    assert_eq!(refused.status(), 429);
    let h = refused.headers().clone();
    assert_eq!(h["x-should-retry"], "false", "{h:?}");
    assert!(!h.contains_key("retry-after"), "{h:?}");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("lower max_tokens"), "{body}");
    let fits = s.openai_chat(json!({"max_tokens": 50})).send().await;
    assert_eq!(fits.expect("http").status(), 200);
    assert_consistent(&s.ledger.store).await;
}

/// A refusal of an hourly window asks for a wait longer than the minute the OpenAI SDKs honour
/// from `Retry-After`: it says `x-should-retry: false`, or they would retry at once (twice, each
/// a new request) into the same refusal.
#[tokio::test]
async fn a_wait_past_a_minute_is_not_retried_by_the_sdks() {
    let s = free_with_requests(per_hour(1)).await;
    let first = s.openai_chat(json!({"max_tokens": 5})).send().await;
    assert_eq!(first.expect("http").status(), 200);
    let refused = s
        .openai_chat(json!({"max_tokens": 5}))
        .send()
        .await
        .expect("http");
    assert_eq!(refused.status(), 429);
    let h = refused.headers();
    let wait: u64 = h["retry-after"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(wait > 60, "{h:?}");
    assert_eq!(h["x-should-retry"], "false", "{h:?}");
    assert_consistent(&s.ledger.store).await;
}

/// Several windows full: the refusal names the one that refuses longest, in memory and in Redis,
/// so its `Retry-After` is a time at which a retry passes. A minute's and a day's window both
/// full say the day (the minute's "retry after 1m" was said, and `x-should-retry` left true:
/// the SDKs retried into the day's refusal); a minute's window and the concurrency slot both
/// full say the minute (a slot frees when a request ends, and is named only alone).
#[tokio::test]
async fn a_refusal_names_the_window_that_refuses_longest() {
    let day = Rate {
        count: 1,
        unit: RateUnit::Day,
    };
    let mut gates = vec![("memory", {
        let mut config = RouterConfig::new(unique_name(), "owner@example.com");
        config.rate_limits.requests = vec![per_minute(1), day];
        config.rate_limits.concurrent = Some(1);
        Gate::from_config(&config).expect("valid").expect("limited")
    })];
    if shared_redis_answers(SHARED_REDIS).await {
        gates.push((
            "redis",
            gate_on(SHARED_REDIS, |c| {
                c.rate_limits.requests = vec![per_minute(1), day];
                c.rate_limits.concurrent = Some(1);
            }),
        ));
    } else {
        skipped(
            Need::Redis,
            format!("the Redis half, no Redis at {SHARED_REDIS}"),
        );
    }
    for (backend, gate) in gates {
        let user = "alice@example.com";
        // In flight: its slot is taken, and both request windows are full.
        let running = gate.admit(user, ServiceKind::Chat, 0).await.expect("first");
        let err = refused_for(&gate, backend, Duration::from_secs(3600), "per day").await;
        assert!(
            !err.retry_helps(),
            "{backend}: x-should-retry must be false"
        );
        drop(running);
        // Only the minute's and the slot: the minute's, not the slot's.
        let mut config = RouterConfig::new(unique_name(), "owner@example.com");
        config.rate_limits.requests = vec![per_minute(1)];
        config.rate_limits.concurrent = Some(1);
        let minute = match backend {
            "memory" => Gate::from_config(&config).expect("valid").expect("limited"),
            _ => gate_on(SHARED_REDIS, |c| {
                c.rate_limits.requests = vec![per_minute(1)];
                c.rate_limits.concurrent = Some(1);
            }),
        };
        let running = minute
            .admit(user, ServiceKind::Chat, 0)
            .await
            .expect("first");
        refused_for(&minute, backend, Duration::from_secs(30), "per minute").await;
        drop(running);
    }
}

/// Alice's next request at `gate`: refused, to be retried after more than `longer_than`, naming
/// the `window` that refuses it.
async fn refused_for(
    gate: &Gate,
    backend: &str,
    longer_than: Duration,
    window: &str,
) -> RouterError {
    let err = gate
        .admit("alice@example.com", ServiceKind::Chat, 0)
        .await
        .err();
    let err = err.expect("refused");
    let after = err.retry_after().expect("a retry time");
    assert!(after > longer_than, "{backend}: {err}, after {after:?}");
    assert!(err.to_string().contains(window), "{backend}: {err}");
    err
}

/// Requests the ledger could not take (it is down) spend none of the user's request window:
/// once it is back, the user has their whole window (the operator's outage used to leave them
/// rate limited after it).
#[tokio::test]
async fn requests_refused_for_a_ledger_outage_spend_no_window() {
    let (mut s, mut c) = two_a_minute().await;
    let addr = s.ledger.url.clone();
    s.ledger.stop_now().await;
    // Found down by the router's probe (a ledger that is up but busy keeps the window spent).
    syft_testkit::wait_readyz(&s.router.http_url, "ledger", "unreachable").await;
    three_refused_while_down(&s, &mut c).await;
    restart_ledger(&mut s, &addr).await;
    for i in 0..2 {
        let answered = answer_once_back(&s, &mut c, &format!("back {i}")).await;
        assert!(answered.is_ok(), "the window is whole: {answered:?}");
    }
    s.assert_spent(2 * PRICE).await;
}

/// A paid router that admits two requests of a user a minute, and a client of it.
async fn two_a_minute() -> (Stack, RouterClient<tonic::transport::Channel>) {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.rate_limits.requests = vec![per_minute(2)];
    })
    .await;
    let c = s.client().await;
    (s, c)
}

/// Three chats while the ledger is down, each refused `UNAVAILABLE` (three: one more than the
/// window holds, so a refusal that kept its place shows as `RESOURCE_EXHAUSTED`).
async fn three_refused_while_down(s: &Stack, c: &mut RouterClient<tonic::transport::Channel>) {
    for i in 0..3 {
        let err = c
            .chat(s.request(&format!("down {i}")))
            .await
            .expect_err("ledger down");
        assert_eq!(err.code(), Code::Unavailable, "request {i}: {err:?}");
    }
}

/// Starts `s`'s ledger again at `addr`.
async fn restart_ledger(s: &mut Stack, addr: &str) {
    s.ledger =
        syft_testkit::LedgerServer::start_at(syft_testkit::ledger_config(&s.db.url), addr).await;
}

/// The first answer to a chat other than `UNAVAILABLE`: the router may take a moment to find its
/// ledger back (each `UNAVAILABLE` meanwhile is an outage's, and spends no window).
async fn answer_once_back(
    s: &Stack,
    c: &mut RouterClient<tonic::transport::Channel>,
    content: &str,
) -> Result<tonic::Response<syft_proto::router::ChatResponse>, tonic::Status> {
    for _ in 0..50 {
        match c.chat(s.request(content)).await {
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
    panic!("the ledger did not come back");
}

/// The first requests after the ledger dies, before the router's probe has seen it (once a
/// second), spend no window either: their calls found no ledger to connect to. They kept their
/// places, and a user could be rate limited by the outage's first second.
#[tokio::test]
async fn the_first_requests_after_the_ledger_dies_spend_no_window() {
    let (mut s, mut c) = two_a_minute().await;
    c.chat(s.request("before")).await.expect("the ledger is up");
    let addr = s.ledger.url.clone();
    s.ledger.stop_now().await;
    three_refused_while_down(&s, &mut c).await;
    restart_ledger(&mut s, &addr).await;
    let answered = answer_once_back(&s, &mut c, "back").await;
    assert!(answered.is_ok(), "the window's second place: {answered:?}");
    let err = c.chat(s.request("third")).await.expect_err("2 per minute");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    s.assert_spent(2 * PRICE).await;
}

/// A router never reads the windows an older layout left in Redis: before 2026-12-04 a
/// window's set was at the bare key and its total at the `:s` the later layout also uses, so a
/// router upgraded from such a version inherited the total (alice: 4 of 20 left) but could never
/// age its entries out, and held her below her limit for as long as she kept coming back.
#[tokio::test]
async fn windows_of_an_older_layout_are_not_read() {
    if !shared_redis_answers(SHARED_REDIS).await {
        skipped(Need::Redis, format!("no Redis at {SHARED_REDIS}"));
        return;
    }
    let name = unique_name();
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.name = name.clone();
        c.rate_limits.requests = vec![per_minute(20)];
        c.limiter.backend = LimiterBackend::Redis {
            url: SHARED_REDIS.into(),
        };
    })
    .await;
    // What a router of that layout left: 16 requests in the set at the bare key, their total.
    let old = format!("syft:rl:{name}:*:req:minute:{}", s.alice.email);
    let client = redis::Client::open(SHARED_REDIS).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    for i in 0..16 {
        let _: () = redis::cmd("ZADD")
            .arg(&old)
            .arg(now)
            .arg(format!("lease-{i}"))
            .query_async(&mut conn)
            .await
            .expect("zadd");
    }
    let _: () = redis::cmd("SET")
        .arg(format!("{old}:s"))
        .arg(16)
        .arg("PX")
        .arg(61_000)
        .query_async(&mut conn)
        .await
        .expect("set");
    let mut c = s.client().await;
    for i in 0..20 {
        let mut req = s.request("hi");
        req.request_id = format!("after-upgrade-{i}");
        c.chat(req)
            .await
            .unwrap_or_else(|e| panic!("request {i} of 20: {e:?}"));
    }
    let err = c.chat(s.request("21st")).await.expect_err("20 per minute");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    s.assert_spent(20 * PRICE).await;
    let _: () = redis::cmd("DEL")
        .arg(&old)
        .arg(format!("{old}:s"))
        .query_async(&mut conn)
        .await
        .expect("del");
}

/// What `s`'s user has left in the router's token window (`GetLimits` with their token).
async fn tokens_left(s: &Stack, c: &RouterClient<tonic::transport::Channel>) -> u64 {
    let ask = syft_proto::router::GetLimitsRequest {
        user_email: s.alice.email.clone(),
        service: String::new(),
        transaction_token: s.token.clone(),
    };
    let left = c
        .clone()
        .get_limits(ask)
        .await
        .expect("limits")
        .into_inner();
    left.limits
        .iter()
        .find(|l| l.limit.as_ref().is_some_and(|r| r.kind == "tokens"))
        .map(|l| l.remaining)
        .expect("a token window")
}

/// Requests that fail because the upstream is out (unreachable or failing with a 5xx) give their
/// places in the request windows back: a short outage, with the SDKs' two retries of each 5xx,
/// spent a user's requests and left them refused once it ended. A 429 of the upstream (the
/// owner's quota there) keeps its place.
#[tokio::test]
async fn an_upstream_outage_spends_no_requests() {
    let (s, mut c) = two_a_minute().await;
    s.upstream.set_mode(Mode::Status(503));
    for _ in 0..4 {
        let err = c
            .chat(s.request("hi"))
            .await
            .expect_err("the upstream is out");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        // The places go back when the request ends, in the background.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.upstream.set_mode(Mode::Ok);
    for _ in 0..2 {
        c.chat(s.request("hi")).await.expect("the window is whole");
    }
    let err = c.chat(s.request("hi")).await.expect_err("2 per minute");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    s.assert_spent(2 * PRICE).await;
}

/// An upstream that reports far more prompt tokens than the router counted (another tokenizer's
/// count, a system prompt of its own, a broken count) is believed within an allowance (the
/// router's count, a quarter more, and 64 tokens), which is what the row shows and the price is
/// charged on; and the token window never keeps more than the request reserved. It kept the
/// reported count: 505 tokens settled per request that reserved 39, a window 13 times past its
/// limit, and per-token rows showing prompts nobody was charged for.
#[tokio::test]
async fn an_upstream_overcounting_the_prompt_is_held_to_the_allowance_and_the_reservation() {
    const LIMIT: u64 = 100_000;
    let pricing = Pricing::per_token(1_000_000, 10_000_000); // 1 and 10 micros a token
    let s = Stack::start_tweaked(pricing, |c| c.rate_limits.tokens = vec![per_minute(LIMIT)]).await;
    s.upstream.set_mode(Mode::Usage(100_000, 5));
    let mut c = s.client().await;
    let ask = |max_tokens: u32| {
        let mut req = s.request("hi");
        req.options = Some(syft_proto::router::ChatOptions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        });
        req
    };
    let counted = syft_router_svc::tokens::count_prompt(&ask(1).messages);
    let allowance = counted + counted / 4 + 64;

    // Room in the hold: charged for the allowance and the answer, and the row says so.
    let answer = c.chat(ask(1_000)).await.expect("answer").into_inner();
    let allowance_i = i64::try_from(allowance).expect("small");
    assert_eq!(answer.cost_micros, allowance_i + 5 * 10);
    let rows = s.usage().await;
    let row = rows[0].usage.as_ref().expect("usage");
    assert_eq!((row.prompt_tokens, row.completion_tokens), (allowance_i, 5));
    assert_eq!(tokens_left(&s, &c).await, LIMIT - allowance - 5);

    // A reservation smaller than that (a prompt of `counted` and 10 tokens of answer): the window
    // keeps the reservation, and the charge stays within the hold.
    let answer = c.chat(ask(10)).await.expect("answer").into_inner();
    assert_eq!(
        answer.cost_micros,
        i64::try_from(counted).expect("small") + 10 * 10
    );
    assert_eq!(
        tokens_left(&s, &c).await,
        LIMIT - allowance - 5 - (counted + 10)
    );
    s.assert_spent(allowance_i + 50 + answer.cost_micros).await;
}

/// A client that leaves a stream after its first delta is counted for what it was sent: the
/// token window keeps the prompt and the delivered text (refunding all of it let a client read
/// most of every answer, leave, and never be counted).
#[tokio::test]
async fn a_stream_the_client_left_keeps_its_delivered_tokens() {
    delivered_tokens_are_kept(Mode::SlowStream(Duration::from_millis(100)), false).await;
}

/// A stream that fails after its client was sent text is voided (nothing charged) but keeps
/// its prompt and that text in the token windows, as a stream its client left does. It gave the
/// whole reservation back, so the text it delivered counted in no window (a known gap until
/// 2026-12-08).
#[tokio::test]
async fn a_stream_that_failed_after_text_keeps_its_delivered_tokens() {
    delivered_tokens_are_kept(Mode::StreamGarbage, true).await;
}

/// A stream from `mode` whose first delta is read, then left (`to_its_end` false) or read to its
/// failure: its token window keeps more than nothing and less than its reservation.
async fn delivered_tokens_are_kept(mode: Mode, to_its_end: bool) {
    const LIMIT: u64 = 100_000;
    let s = free_with_tokens_per_minute(LIMIT).await;
    s.upstream.set_mode(mode);
    let mut c = s.client().await;
    {
        let mut stream = c
            .chat_stream(s.request("hi"))
            .await
            .expect("stream")
            .into_inner();
        stream.message().await.expect("first").expect("delta");
        if to_its_end {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream was to fail"),
                    Err(_) => break,
                }
            }
        }
    }
    // Settled in the background: wait for the reservation (100 completion tokens) to be
    // replaced by what was kept, and a moment more (a give-back of all would come after).
    tokens_left_once_settled(&s, &c, LIMIT - 100).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = tokens_left(&s, &c).await;
    assert!(left > LIMIT - 100 && left < LIMIT, "{left} of {LIMIT} left");
    assert_consistent(&s.ledger.store).await;
}

/// The tokens left in the window once a request the client left has settled (its reservation
/// given back down to what it keeps: more than `settled` left), or after 3 s.
async fn tokens_left_once_settled(
    s: &Stack,
    c: &RouterClient<tonic::transport::Channel>,
    settled: u64,
) -> u64 {
    let mut left = tokens_left(s, c).await;
    for _ in 0..60 {
        if left > settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = tokens_left(s, c).await;
    }
    left
}

/// A unary chat whose client leaves while the upstream has its prompt keeps the prompt in its
/// token windows, as a stream keeps what it was sent: it gave all of it back, so a client could
/// send large prompts, leave before each answer, and be counted nothing. A unary chat that
/// failed by the upstream's fault still gives all back.
#[tokio::test]
async fn a_unary_chat_the_client_left_keeps_its_prompt() {
    the_client_left_keeps_its_prompt(false).await;
}

/// The same for a stream whose client leaves before the upstream opened it (a limits reviewer's
/// finding): it gave its whole reservation back, so large prompts sent as streams and left
/// before their first byte were counted nothing.
#[tokio::test]
async fn a_stream_the_client_left_before_it_opened_keeps_its_prompt() {
    the_client_left_keeps_its_prompt(true).await;
}

async fn the_client_left_keeps_its_prompt(stream: bool) {
    const LIMIT: u64 = 100_000;
    let s = free_with_tokens_per_minute(LIMIT).await;
    s.upstream.set_mode(Mode::Delay(Duration::from_secs(3)));
    let mut c = s.client().await;
    let prompt = "word ".repeat(2000);
    let given_up = Duration::from_millis(800);
    if stream {
        let mut request = tonic::Request::new(s.request(&prompt));
        request.set_timeout(given_up);
        let err = c.chat_stream(request).await.expect_err("past its deadline");
        assert!(
            matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{err:?}"
        );
    } else {
        syft_testkit::chat_given_up(&mut c, s.request(&prompt), given_up).await;
    }
    let left = tokens_left_once_settled(&s, &c, LIMIT - 2100).await;
    assert_eq!(s.upstream.hits(), 1, "the upstream had the prompt");
    // The reservation (prompt and 100 completion tokens) settles to the prompt: about 2,000.
    assert!(
        (LIMIT - 2100..LIMIT - 1500).contains(&left),
        "{left} of {LIMIT} left"
    );
    s.upstream.set_mode(Mode::Status(500));
    let before = left;
    c.chat(s.request(&prompt))
        .await
        .expect_err("upstream failed");
    assert_eq!(
        tokens_left(&s, &c).await,
        before,
        "a failed chat keeps nothing"
    );
    assert_consistent(&s.ledger.store).await;
}

/// Request limits on a free service: 3 per minute, the 4th refused, all without a ledger charge.
#[tokio::test]
async fn free_service_request_limit() {
    let s = free_with_requests(per_minute(3)).await;
    let mut c = s.client().await;
    for _ in 0..3 {
        c.chat(s.request("hi")).await.expect("admitted");
    }
    let err = c.chat(s.request("hi")).await.expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err).as_deref(), Some("RATE_LIMITED"));
    assert!(s.transfers().await.is_empty());
    assert_consistent(&s.ledger.store).await;
}

/// A gate counting in the Redis at `url`, tweaked with `limits`.
fn gate_on(url: &str, limits: impl FnOnce(&mut RouterConfig)) -> std::sync::Arc<Gate> {
    let mut config = RouterConfig::new(unique_name(), "owner@example.com");
    limits(&mut config);
    // A second for each check (the first connects and loads the script on a loaded machine
    // too), shorter than `OwnRedis::restarted_and_paused`'s pause: the single try of a change
    // used to be this long.
    config.limiter.timeout = Duration::from_secs(1);
    config.limiter.backend = LimiterBackend::Redis { url: url.into() };
    Gate::from_config(&config)
        .expect("valid limits")
        .expect("a limited router")
}

/// How long [`LateCheck::run`] pauses the store.
const LATE_PAUSE: Duration = Duration::from_secs(3);

/// A free router allowing one request in flight per user, counted in a Redis of its own, after a
/// request whose check timed out while that Redis was paused: the check still waits in the store.
struct LateCheck {
    redis: OwnRedis,
    s: Stack,
    c: RouterClient<tonic::transport::Channel>,
    /// When the pause began.
    paused: Instant,
}

impl LateCheck {
    /// Checks wait `timeout`. `None` (SKIPPED printed) without `redis-server` or `redis-cli`.
    async fn run(timeout: Duration) -> Option<Self> {
        let Some(redis) = OwnRedis::start().await else {
            skipped(Need::RedisServer, "cannot start redis-server");
            return None;
        };
        let s = Stack::start_tweaked(Pricing::free(), |c| {
            c.rate_limits.concurrent = Some(1);
            c.limiter.timeout = timeout;
            c.limiter.backend = LimiterBackend::Redis {
                url: redis.url.clone(),
            };
        })
        .await;
        let mut c = s.client().await;
        // Connected, its script loaded, and its slot released again.
        c.chat(s.request("before")).await.expect("redis up");
        let deadline = Instant::now() + Duration::from_secs(5);
        while counted(&redis).await != 0 {
            assert!(Instant::now() < deadline, "the slot was not released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let paused = Instant::now();
        if !redis.pause(LATE_PAUSE.as_millis() as u64).await {
            skipped(Need::RedisCli, "no redis-cli");
            return None;
        }
        let err = c.chat(s.request("late")).await.expect_err("fail closed");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        Some(LateCheck {
            redis,
            s,
            c,
            paused,
        })
    }
}

/// The store answers a check too late (`CLIENT PAUSE` holds it past the 500-ms timeout): the
/// request is refused (`fail_closed`), but the script still runs when the store wakes and records
/// the request's concurrency slot. The router takes that check back, so the user's one slot is
/// free again at once (it stayed taken for the whole lease, 18 minutes by default).
#[tokio::test]
async fn a_check_answered_too_late_is_taken_back() {
    let Some(LateCheck {
        redis: _redis,
        s,
        mut c,
        paused,
    }) = LateCheck::run(Duration::from_millis(500)).await
    else {
        return;
    };
    // Within seconds of the pause's end, not the lease's 16 minutes.
    let deadline = paused + LATE_PAUSE + Duration::from_secs(5);
    loop {
        match c.chat(s.request("after")).await {
            Ok(_) => break,
            Err(e)
                if matches!(e.code(), Code::ResourceExhausted | Code::Unavailable)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the late check's slot was not taken back: {e:?}"),
        }
    }
    assert_consistent(&s.ledger.store).await;
}

/// What every window in `redis` holds in all (each window's running total, `<key>:s`).
async fn counted(redis: &OwnRedis) -> i64 {
    let client = redis::Client::open(redis.url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let sum = "local t = 0 for _, k in ipairs(redis.call('KEYS', '*:s')) do \
               t = t + tonumber(redis.call('GET', k)) end return t";
    redis::cmd("EVAL")
        .arg(sum)
        .arg(0)
        .query_async(&mut conn)
        .await
        .expect("sum of the windows")
}

/// A graceful shutdown waits for the take-back of a check whose answer was lost. It held no
/// in-flight work, so the process could exit before it reached the store, and the user's slot
/// then stayed taken for the lease (18 minutes by default) on every replica sharing the store.
#[tokio::test]
async fn a_shutdown_waits_for_a_take_back() {
    let Some(LateCheck {
        redis, s, paused, ..
    }) = LateCheck::run(Duration::from_millis(300)).await
    else {
        return;
    };
    let Stack { mut router, .. } = s;
    router.shutdown();
    router.join().await.expect("a graceful shutdown");
    assert!(
        paused.elapsed() >= LATE_PAUSE,
        "the router stopped {:?} into the store's {LATE_PAUSE:?} pause, before its take-back \
         landed",
        paused.elapsed()
    );
    assert_eq!(counted(&redis).await, 0, "the late check was taken back");
}

/// A release that meets a store too slow to answer (paused, and its scripts flushed as by a
/// restart, so the release needs two more round trips once it answers) lands: its one try timed
/// out between those round trips, and the user's one slot stayed taken for the whole lease (the
/// CI failure of `a_check_answered_too_late_is_taken_back`: the release of a request that had
/// just ended met the test's next step, which put the store to sleep).
#[tokio::test]
async fn a_release_that_meets_a_slow_store_is_retried() {
    let Some(redis) = OwnRedis::start().await else {
        skipped(Need::RedisServer, "cannot start redis-server");
        return;
    };
    let gate = gate_on(&redis.url, |c| c.rate_limits.concurrent = Some(1));
    let admit = || gate.admit("alice@example.com", ServiceKind::Chat, 0);
    let pass = admit().await.expect("the one slot");
    assert_eq!(
        admit().await.err().map(|e| e.grpc_code()),
        Some(Code::ResourceExhausted),
        "one request in flight"
    );
    let paused = Instant::now();
    if !redis.restarted_and_paused().await {
        return;
    }
    drop(pass);
    let deadline = paused + Duration::from_secs(7);
    while let Err(e) = admit().await {
        assert!(
            Instant::now() < deadline,
            "the released slot is still taken: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The limiter's connection goes silent (its network path died without a word: no answer, no
/// error) while Redis itself is fine. Checks time out, so a `fail_closed` router refused every
/// request until the kernel gave the connection up, about 15 minutes. A fresh connection is
/// answered, so the silent one is replaced and checks are answered again within seconds; the
/// check lost on the silent connection never reached Redis and holds no slot.
#[tokio::test]
async fn a_connection_that_went_silent_is_replaced() {
    let Some(redis) = OwnRedis::start().await else {
        skipped(Need::RedisServer, "cannot start redis-server");
        return;
    };
    let relay = SilentRelay::start(([127, 0, 0, 1], redis.port).into()).await;
    let gate = gate_on(&relay.redis_url(), |c| c.rate_limits.concurrent = Some(1));
    let admit = || gate.admit("alice@example.com", ServiceKind::Chat, 0);
    drop(admit().await.expect("the one slot"));
    // Its release lands (in the background) before the connection goes silent.
    let released = || async {
        let windows = gate
            .remaining("alice@example.com", ServiceKind::Chat)
            .await
            .expect("redis answers");
        windows
            .iter()
            .any(|(r, w)| r.kind == RuleKind::Concurrency && w.remaining == 1)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !released().await {
        assert!(Instant::now() < deadline, "the slot was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = relay.connections();
    relay.silence_existing();
    let silenced = Instant::now();
    let err = admit()
        .await
        .err()
        .expect("no answer on the silent connection");
    assert_eq!(err.grpc_code(), Code::Unavailable, "fail_closed: {err}");
    // The slot is free (the released pass and the lost check are both gone from the window).
    let deadline = silenced + Duration::from_secs(8);
    let pass = loop {
        match admit().await {
            Ok(pass) => break pass,
            Err(e) => assert!(
                Instant::now() < deadline,
                "still no answer {:?} after the connection went silent: {e}",
                silenced.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        relay.connections() >= before + 2,
        "a probe and a new connection: {} connections made",
        relay.connections()
    );
    assert_eq!(
        admit().await.err().map(|e| e.grpc_code()),
        Some(Code::ResourceExhausted),
        "the new connection counts in the same windows"
    );
    drop(pass);
}

/// A token settlement whose client left while the store was paused with its scripts flushed still
/// lands: the reservation is replaced by what the answer used. It runs in a task of its own (the
/// client's future is dropped here) and waits for the store; a single short try was lost there,
/// and the whole reservation stayed in the window.
#[tokio::test]
async fn a_token_settlement_outlives_its_client_and_a_slow_store() {
    let Some(redis) = OwnRedis::start().await else {
        skipped(Need::RedisServer, "cannot start redis-server");
        return;
    };
    let gate = gate_on(&redis.url, |c| {
        c.rate_limits.tokens = vec![per_minute(1_000)]
    });
    // `None` while the store does not answer (paused).
    let tokens_left = || async {
        let windows = gate
            .remaining("alice@example.com", ServiceKind::Chat)
            .await
            .ok()?;
        windows
            .iter()
            .find(|(r, _)| r.kind == RuleKind::Tokens)
            .map(|(_, w)| w.remaining)
    };
    let pass = gate
        .admit("alice@example.com", ServiceKind::Chat, 900)
        .await
        .expect("reserved");
    assert_eq!(tokens_left().await, Some(100));
    let paused = Instant::now();
    if !redis.restarted_and_paused().await {
        return;
    }
    // The client leaves while its answer's 10 tokens are being settled.
    let left = tokio::time::timeout(Duration::from_millis(50), pass.settle_tokens(10)).await;
    assert!(left.is_err(), "the store is paused: the settlement waits");
    drop(pass);
    let deadline = paused + Duration::from_secs(7);
    loop {
        match tokens_left().await {
            Some(990) => break,
            other => assert!(
                Instant::now() < deadline,
                "the reservation was not settled: {other:?} tokens left"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shared store dies mid-test: a `fail_closed` router refuses with `UNAVAILABLE` and places no
/// hold; a `fail_open` router keeps answering and charging normally. Nothing is charged wrongly.
#[tokio::test]
async fn store_killed_mid_test() {
    let Some(mut redis) = OwnRedis::start().await else {
        skipped(Need::RedisServer, "cannot start redis-server");
        return;
    };
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.rate_limits.requests = vec![per_minute(100)];
        c.limiter.backend = LimiterBackend::Redis {
            url: redis.url.clone(),
        };
    })
    .await;
    let mut open = s.router_config(Pricing::per_request(PRICE));
    open.rate_limits.requests = vec![per_minute(100)];
    open.limiter.backend = LimiterBackend::Redis {
        url: redis.url.clone(),
    };
    open.limiter.on_failure = OnFailure::FailOpen;
    let open = RouterHandle::start(open).await;
    let mut closed = s.client().await;
    let mut open = open.client().await;
    closed.chat(s.request("before")).await.expect("redis up");
    open.chat(s.request("before")).await.expect("redis up");

    redis.kill();
    let err = closed
        .chat(s.request("down"))
        .await
        .expect_err("fail closed");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    open.chat(s.request("down"))
        .await
        .expect("fail open admits");

    let transfers = s.transfers().await;
    assert_eq!(transfers.len(), 3, "the refused request placed no hold");
    assert!(transfers
        .iter()
        .all(|t| t.status() == TransferStatus::Completed));
    let (balance, held, _) = s.alice_money().await;
    assert_eq!((balance, held), (syft_testkit::FUNDS - 3 * PRICE, 0));
    s.check_invariants().await;
}

/// A router whose only limit is on search, counted in a Redis that is down (`fail_closed`): a
/// chat, which no limit applies to, is admitted without asking the store (it was refused
/// `UNAVAILABLE`, its empty check failing with the store); a search is refused.
#[tokio::test]
async fn a_service_without_limits_is_admitted_while_the_store_is_down() {
    let search = syft_router_svc::SearchConfig::new(syft_router_svc::SearchBackendConfig::Http(
        syft_router_svc::HttpSearchConfig::new("http://127.0.0.1:9".to_string()),
    ));
    let mut config = RouterConfig::new(unique_name(), "owner@example.com")
        .with_search(Pricing::per_request(PRICE), search);
    for s in config.services.iter_mut() {
        if s.kind == ServiceKind::Search {
            s.rate_limits.requests = vec![per_minute(5)];
        }
    }
    config.limiter.timeout = Duration::from_millis(300);
    config.limiter.on_failure = OnFailure::FailClosed;
    // Nothing listens on port 9 (discard): the store is down.
    config.limiter.backend = LimiterBackend::Redis {
        url: "redis://127.0.0.1:9".into(),
    };
    let gate = Gate::from_config(&config).expect("valid").expect("limited");
    let user = "alice@example.com";
    assert!(
        gate.rules(user, ServiceKind::Chat, 0).is_empty(),
        "no chat limit"
    );
    let chat = gate.admit(user, ServiceKind::Chat, 0).await;
    assert!(
        chat.is_ok(),
        "an unlimited chat was refused: {:?}",
        chat.err()
    );
    let search = gate.admit(user, ServiceKind::Search, 0).await;
    let refused = search.err().expect("a limited search, the store down");
    assert_eq!(refused.grpc_code(), Code::Unavailable, "{refused}");
}

/// Nonsense limits are refused when the config loads, with a message naming the field.
#[test]
fn bad_limit_config_is_refused_at_start() {
    let base = |extra: &str| format!(r#"{{"name":"r","owner_email":"o@example.com",{extra}}}"#);
    for (extra, says) in [
        (
            r#""rate_limits":{"requests":["-5/minute"]}"#,
            "positive whole number",
        ),
        (r#""rate_limits":{"requests":["0/minute"]}"#, "zero"),
        (
            r#""rate_limits":{"tokens":["10/fortnight"]}"#,
            "unknown unit",
        ),
        (
            r#""rate_limits":{"requests":["99999999999999/day"]}"#,
            "at most",
        ),
        (
            r#""rate_limits":{"requests":["1/minute","2/minute"]}"#,
            "two rates per minute",
        ),
        (
            r#""rate_limits":{"concurrent":0}"#,
            "rate_limits.concurrent must be in",
        ),
        (
            r#""rate_limits":{"concurrent":-3}"#,
            "rate_limits.concurrent must be in",
        ),
        (r#""budgets":{"per_day":"-1.00"}"#, "budgets.per_day"),
        (r#""budgets":{"per_day":"0"}"#, "above zero"),
        (r#""limiter":{"backend":"memcached"}"#, "unknown"),
        (
            r#""limiter":{"backend":"redis"}"#,
            "needs limiter.redis_url",
        ),
        (r#""limiter":{"on_failure":"sometimes"}"#, "fail_closed"),
        (r#""limiter":{"lease_seconds":1}"#, "10..=86400"),
        (
            r#""limiter":{"max_concurrent_requests":0}"#,
            "max_concurrent_requests",
        ),
        (
            r#""services":[{"type":"chat","rate_limits":{"requests":["5/eon"]}}]"#,
            "services[0].rate_limits.requests",
        ),
    ] {
        let err = RouterConfig::from_json_str(&base(extra))
            .expect_err(extra)
            .to_string();
        assert!(err.contains(says), "{extra}: {err}");
    }
    let ok = RouterConfig::from_json_str(&base(
        r#""rate_limits":{"requests":["10/minute","1000/day"],"tokens":["50000/min"],"concurrent":4},
           "budgets":{"per_day":"1.00","per_month":"20"},
           "limiter":{"backend":"redis","redis_url":"redis://127.0.0.1:6379","on_failure":"fail_open"}"#,
    ))
    .expect("valid");
    assert_eq!(ok.rate_limits.requests.len(), 2);
    assert_eq!(ok.budgets.per_day_micros, Some(1_000_000));
    assert_eq!(ok.limiter.on_failure, OnFailure::FailOpen);
}

/// A Redis URL that cannot be used (it does not parse, or asks for TLS) stops the router from
/// starting, with limits or without (without, it was taken until a limit was added).
#[tokio::test]
async fn bad_redis_url_is_refused_at_start() {
    for (url, limited) in [
        ("not a url", true),
        ("not a url", false),
        ("rediss://127.0.0.1:6379", false),
    ] {
        let mut c = RouterConfig::new("r", "o@example.com");
        if limited {
            c.rate_limits.requests = vec![per_minute(1)];
        }
        c.limiter.backend = LimiterBackend::Redis { url: url.into() };
        let err = syft_router_svc::RouterService::new(c)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("redis_url"), "{url}: {err}");
    }
}

/// Two replicas sharing Redis, one request in flight allowed on the router as a whole, slots
/// leased for 2 s (renewed every 667 ms: a loaded machine's late tick must not lose the slot).
/// A request running at replica A keeps its slot past the lease (it is renewed while it runs);
/// once A is killed (no release), B admits again within the lease. Until
/// 2026-12-06 nothing renewed a slot, so the lease was raised to the longest request (18 minutes
/// by default) and a killed replica's slots refused every user that long, a restart included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_slots_free_within_the_lease_and_a_running_ones_do_not() {
    if !shared_redis_answers(SHARED_REDIS).await {
        skipped(Need::Redis, format!("no Redis at {SHARED_REDIS}"));
        return;
    }
    let name = unique_name();
    let shared = |c: &mut RouterConfig| {
        c.name = name.clone();
        c.limiter.backend = LimiterBackend::Redis {
            url: SHARED_REDIS.into(),
        };
        c.limiter.max_concurrent_requests = Some(1);
        c.limiter.lease = Duration::from_secs(2);
        if let syft_router_svc::UpstreamConfig::OpenAi(o) = &mut c.upstream {
            o.request_timeout = Duration::from_secs(60);
        }
    };
    let s = Stack::start_tweaked(Pricing::free(), shared).await;
    s.upstream.set_mode(Mode::Stall);
    // Replica A on its own runtime, so that it can be killed without running any cleanup.
    let mut config = s.router_config(Pricing::free());
    shared(&mut config);
    let replica_a = KillableRouter::start(config);
    let a_url = replica_a.grpc_url.clone();
    let mut a = RouterClient::connect(a_url).await.expect("connect to A");
    let running = tokio::spawn({
        let req = s.request("runs at A");
        async move { a.chat(req).await }
    });
    // B's answer to a probe: refused at once while the slot is taken; admitted, it waits on the
    // stalled upstream past the probe's deadline (`CANCELLED`). The deadline leaves a loaded
    // machine's admission check time to answer (400 ms did not, and read as "admitted").
    let b = s.client().await;
    let probe = || {
        let mut b = b.clone();
        let mut req = tonic::Request::new(s.request("probe at B"));
        req.set_timeout(Duration::from_millis(1_500));
        async move { b.chat(req).await.map(|_| ()).map_err(|e| e.code()) }
    };
    // A's request holds the slot once it reaches the stalled upstream (a probe sent before
    // could take the slot first and have A's request refused).
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.upstream.hits() == 0 {
        assert!(Instant::now() < deadline, "A's request never took the slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        probe().await,
        Err(Code::ResourceExhausted),
        "A holds the slot"
    );
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    assert_eq!(
        probe().await,
        Err(Code::ResourceExhausted),
        "A's running request kept its slot past the 2-s lease"
    );
    replica_a.kill(); // A dies: no release
    assert!(running.await.expect("join").is_err());
    s.upstream.set_mode(Mode::Ok);
    let killed = Instant::now();
    loop {
        match probe().await {
            Ok(()) => break,
            Err(code) => {
                assert!(
                    killed.elapsed() < Duration::from_secs(5),
                    "A's slot still taken {:?} after it died: {code:?}",
                    killed.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
