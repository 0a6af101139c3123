//! `syft-router bench router`: paid chat requests through the router, the ledger (fresh Postgres
//! database) and an OpenAI-compatible upstream (in-process and instant, or `--upstream-url`), over
//! gRPC and over the HTTP front. Everything shares this machine's cores with the client.
//!
//! `--mode search` (or `all`, the default, next to chat) measures paid searches over gRPC against
//! the embedded index, generated here with `--search-chunks` chunks (100,000 by default); its
//! added latency is total − the index's own search time (measured on the same queries directly).
//!
//! Two measurements per front:
//! - throughput: `--concurrency` closed-loop clients for `--duration`;
//! - latency at a fixed rate (`--rate`, open loop): total latency, upstream handler time, and the
//!   router's added latency = total − upstream handler time (per percentile).
//!
//! Then the issue-16 shapes over HTTP (`bench_shapes.rs`): paid by `--payers`, free with and
//! without a reachable ledger, one client; with their ratios.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use syft_ledger::client::connect_lazy;
use syft_ledger::LedgerConfig;
use syft_proto::router as rpb;
use syft_router_svc::config::Budgets;
use syft_router_svc::search::{DocIndex, SourceDoc};
use syft_router_svc::{
    OpenAiConfig, Pricing, RouterConfig, SearchBackendConfig, SearchConfig, UpstreamConfig,
};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::setup::{
    create_account, issue_token, restore_rollups, user_chat, verify_ledger, wait_for_ledger,
};

#[derive(Args, Debug)]
pub struct RouterBench {
    #[command(flatten)]
    server: crate::bench::BenchServer,
    /// Closed-loop clients for the throughput runs.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// Payer counts of the paid shapes: requests cycle over this many paying users.
    #[arg(long, default_values_t = [1, 64], num_args = 1..)]
    pub(crate) payers: Vec<usize>,
    /// An OpenAI-compatible upstream to call (`http://host:port/v1`) instead of the in-process one
    /// (e.g. nginx serving a canned answer: scripts/bench-nginx.sh).
    #[arg(long)]
    upstream_url: Option<String>,
    /// Requests per second for the latency run.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub(crate) duration: Duration,
    /// The ledger's Postgres batch workers (see docs/ledger.md).
    #[arg(long, default_value_t = syft_ledger::store::DEFAULT_BATCH_WORKERS)]
    batch_workers: usize,
    /// What to measure: chat (gRPC and HTTP), search (gRPC), or all.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// Chunks in the generated search index.
    #[arg(long, default_value_t = 100_000)]
    search_chunks: usize,
    /// Maintain the usage rollups (false: measures what they cost the router's throughput,
    /// issue 12; they are rebuilt from the rows before `verify`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    rollups: bool,
    /// The cost of admission through the limits (docs/limits.md): after the rest (or alone, with
    /// `--mode limits`), this many interleaved rounds against the paid router without limits and
    /// one with generous limits that never refuse (0: skip; `--mode limits` defaults to 3).
    #[arg(long, default_value_t = 0)]
    pub(crate) limits_rounds: usize,
    /// Rounds of the one-client (c=1) paid and free runs, interleaved (the order flips every
    /// round): the latency a paid request adds is reported per round and as the median of the
    /// rounds' paired differences, which a loaded machine's drift between runs moves far less
    /// than one pair of runs.
    #[arg(long, default_value_t = 1)]
    pub(crate) latency_rounds: usize,
    /// Where the limited router counts: `memory`, or a Redis URL (`redis://127.0.0.1:6379`).
    #[arg(long, default_value = "memory")]
    pub(crate) limits_store: String,
    /// Give the paid router per-user budgets per day and per month that are never reached, so
    /// that every paid hold carries one (docs/limits.md, "Budgets in the ledger").
    #[arg(long)]
    pub(crate) budgets: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq)]
enum Mode {
    Chat,
    Search,
    All,
    /// Only the comparison with and without limits (`--limits-rounds`).
    Limits,
}

/// A deterministic corpus: `n` one-chunk documents of 40 words from a 2,000-word vocabulary.
fn bench_docs(n: usize) -> impl Iterator<Item = SourceDoc> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n).map(move |i| {
        let words: Vec<String> = (0..40)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                format!("w{}", (x >> 33) % 2000)
            })
            .collect();
        SourceDoc {
            id: format!("doc-{i}"),
            content: words.join(" "),
            metadata: Default::default(),
        }
    })
}

/// Two-word queries over the bench vocabulary (each matches many chunks).
fn bench_query(n: u64) -> String {
    format!("w{} w{}", n % 2000, (n * 7 + 3) % 2000)
}

/// Upstream handler time in microseconds, recorded by the fake upstream itself.
type UpstreamTimes = Arc<std::sync::Mutex<Histogram<u64>>>;

async fn start_upstream(times: UpstreamTimes) -> anyhow::Result<String> {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let times = times.clone();
            async move {
                let t0 = Instant::now();
                let model = body["model"].as_str().unwrap_or("bench").to_string();
                let answer = serde_json::json!({
                    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok, here is the answer"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
                });
                if let Ok(mut h) = times.lock() {
                    let _ = h.record(t0.elapsed().as_micros() as u64);
                }
                axum::Json(answer)
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

pub(crate) struct User {
    pub(crate) email: String,
    pub(crate) token: String,
}

/// Serves a router with `pricing` against `ledger_url` and `upstream_url`; returns its gRPC and
/// HTTP chat URLs and the serving task.
pub(crate) async fn start_router(
    pricing: Pricing,
    budgets: Budgets,
    ledger_url: &str,
    secret: &str,
    upstream_url: &str,
    search: Option<SearchConfig>,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(String, String, RouterTask)> {
    let mut config = RouterConfig::new("bench-router", OWNER).with_chat_pricing(pricing.clone());
    config.budgets = budgets;
    if let Some(search) = search {
        config = config.with_search(pricing, search);
    }
    start_configured(config, ledger_url, secret, upstream_url, signal).await
}

/// [`start_router`] for a config of the caller's (its ledger and upstream are set here).
pub(crate) async fn start_configured(
    mut config: RouterConfig,
    ledger_url: &str,
    secret: &str,
    upstream_url: &str,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(String, String, RouterTask)> {
    config.ledger.url = ledger_url.to_string();
    config.ledger.secret = secret.to_string().into();
    config.upstream = UpstreamConfig::OpenAi(OpenAiConfig::new(upstream_url.to_string()));
    if config.models.is_empty() {
        config.models = vec![syft_router_svc::ANY_MODEL.into()];
    }
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_url = format!("http://{}", grpc.local_addr()?);
    let http_url = format!("http://{}/v1/chat/completions", http.local_addr()?);
    let task = tokio::spawn(syft_router_svc::serve(config, grpc, http, signal));
    Ok((grpc_url, http_url, task))
}

pub(crate) type RouterTask = tokio::task::JoinHandle<Result<(), syft_router_svc::ServeError>>;

pub(crate) const OWNER: &str = "owner@bench.example";

/// The price of a paid benchmark request ($0.01).
pub(crate) const PAID_PRICE: i64 = 10_000;

pub async fn run(b: &RouterBench) -> anyhow::Result<()> {
    const ADMIN: &str = "bench-admin";
    let db = b.server.fresh_db().await?;
    syft_ledger::store::rollup::set_enabled(b.rollups);
    println!("rollups: {}", if b.rollups { "on" } else { "off" });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let ledger_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ledger_url = format!("http://{}", ledger_listener.local_addr()?);
    let ledger = tokio::spawn(syft_ledger::serve(
        LedgerConfig {
            database_url: db.service_url.clone(),
            admin_key: ADMIN.into(),
            max_connections: 16,
            batch_workers: b.batch_workers,
            ..LedgerConfig::default()
        },
        syft_ledger::Listeners::grpc(ledger_listener),
        signal(),
    ));
    let mut admin = connect_lazy(&ledger_url, ADMIN)?;
    wait_for_ledger(&mut admin).await?;
    let owner_secret = create_account(&mut admin, OWNER, 0).await?;
    let mut users = Vec::new();
    for i in 0..1000 {
        let email = format!("user{i}@bench.example");
        let secret = create_account(&mut admin, &email, 1_000_000_000_000).await?;
        let token = issue_token(&mut connect_lazy(&ledger_url, &secret)?, OWNER).await?;
        users.push(User { email, token });
    }
    let users = Arc::new(users);

    let upstream_times: UpstreamTimes = Arc::new(std::sync::Mutex::new(Histogram::new(3)?));
    let upstream_url = match &b.upstream_url {
        Some(url) => url.clone(),
        None => start_upstream(upstream_times.clone()).await?,
    };
    let index_dir = tempfile::tempdir()?;
    let mut index_times = Histogram::<u64>::new(3)?;
    let mut search = None;
    if matches!(b.mode, Mode::Search | Mode::All) {
        let (dir, chunks) = (index_dir.path().to_path_buf(), b.search_chunks);
        let t0 = Instant::now();
        let index =
            tokio::task::spawn_blocking(move || DocIndex::build(bench_docs(chunks), Some(&dir)))
                .await??;
        println!(
            "search index: {} chunks built in {:.1} s",
            index.chunks(),
            t0.elapsed().as_secs_f64()
        );
        for n in 0..2000 {
            let t0 = Instant::now();
            index.search(&bench_query(n), 5, 0.0, true)?;
            index_times.record(t0.elapsed().as_micros() as u64)?;
        }
        search = Some(SearchConfig::new(SearchBackendConfig::Index(
            index_dir.path().to_path_buf(),
        )));
    }
    // Budgets that never refuse: a thousand dollars a day per user.
    let budgets = Budgets {
        per_day_micros: b.budgets.then_some(1_000_000_000),
        per_month_micros: b.budgets.then_some(1_000_000_000),
    };
    let (grpc_url, http_url, router) = start_router(
        Pricing::per_request(PAID_PRICE),
        budgets,
        &ledger_url,
        &owner_secret,
        &upstream_url,
        search,
        signal(),
    )
    .await?;
    let shapes = crate::bench_shapes::Shapes {
        ledger_url: ledger_url.clone(),
        owner_secret: owner_secret.clone(),
        upstream_url: upstream_url.clone(),
        paid_http_url: http_url.clone(),
        users: users.clone(),
        spool_dir: tempfile::tempdir()?,
    };

    let channel = tonic::transport::Endpoint::from_shared(grpc_url)?
        .tcp_nodelay(true)
        .connect_lazy();
    let grpc_client = rpb::router_client::RouterClient::new(channel);
    let http_client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let counter = Arc::new(AtomicU64::new(0));
    let send = {
        let users = users.clone();
        let counter = counter.clone();
        move |front: Front| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let user = &users[(n % users.len() as u64) as usize];
            let (email, token) = (user.email.clone(), user.token.clone());
            let mut grpc = grpc_client.clone();
            let http = http_client.clone();
            let http_url = http_url.clone();
            async move {
                match front {
                    Front::Search => grpc
                        .search(rpb::SearchRequest {
                            user_email: email,
                            query: bench_query(n),
                            options: None,
                            transaction_token: token,
                            request_id: format!("bench-{n}"),
                        })
                        .await
                        .map(|r| r.into_inner().cost_micros == PAID_PRICE)
                        .unwrap_or(false),
                    Front::Grpc => grpc
                        .chat(rpb::ChatRequest {
                            transaction_token: token,
                            request_id: format!("bench-{n}"),
                            ..user_chat(&email, "bench", "hello there", 32)
                        })
                        .await
                        .map(|r| r.into_inner().cost_micros == PAID_PRICE)
                        .unwrap_or(false),
                    Front::Http => {
                        let body = serde_json::json!({"model": "bench", "user": email, "max_tokens": 32,
                            "messages": [{"role": "user", "content": "hello there"}]});
                        match http
                            .post(&http_url)
                            .bearer_auth(token)
                            .header("Idempotency-Key", format!("bench-{n}"))
                            .json(&body)
                            .send()
                            .await
                        {
                            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                            Err(_) => false,
                        }
                    }
                }
            }
        }
    };

    let upstream_name = b
        .upstream_url
        .as_deref()
        .unwrap_or("in-process instant upstream");
    println!(
        "router bench: paid requests ($0.01 each) via router + ledger (postgres) + {upstream_name}"
    );
    let fronts: Vec<Front> = match b.mode {
        Mode::Chat => vec![Front::Grpc, Front::Http],
        Mode::Search => vec![Front::Search],
        Mode::All => vec![Front::Grpc, Front::Http, Front::Search],
        Mode::Limits => vec![],
    };
    // Latency first, on a quiet system; then throughput.
    for &front in &fronts {
        // Warm up first: new database connections, statements planned on each of them for the
        // first time and new HTTP/2 connections are start-up costs, not the steady state measured.
        let warm_up = Instant::now() + Duration::from_secs(2);
        let mut warm = tokio::time::interval(Duration::from_micros(1_000_000 / b.rate.max(1)));
        let mut warming = Vec::new();
        while Instant::now() < warm_up {
            warm.tick().await;
            warming.push(tokio::spawn(send(front)));
        }
        for t in warming {
            t.await?;
        }
        // Latency at a fixed rate, open loop.
        if let Ok(mut h) = upstream_times.lock() {
            h.reset();
        }
        let total = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
        let failures = Arc::new(AtomicU64::new(0));
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / b.rate.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let end = Instant::now() + b.duration;
        let mut inflight = Vec::new();
        while Instant::now() < end {
            tick.tick().await;
            let (send, total, failures) = (send.clone(), total.clone(), failures.clone());
            inflight.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let good = send(front).await;
                let us = t0.elapsed().as_micros() as u64;
                if good {
                    let _ = total.lock().await.record(us);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in inflight {
            t.await?;
        }
        let total = total.lock().await;
        // For search the "upstream" is the index itself, timed directly above.
        let upstream = match front {
            Front::Search => index_times.clone(),
            _ => upstream_times
                .lock()
                .map(|h| h.clone())
                .map_err(|_| anyhow::anyhow!("poisoned"))?,
        };
        let ms = |v: u64| v as f64 / 1000.0;
        println!(
            "  {:<4} at {} req/s: total p50 {:.2} ms p99 {:.2} ms | upstream p50 {:.3} ms p99 {:.3} ms | added p50 {:.2} ms p99 {:.2} ms (p90 {:.2}, p99.9 {:.2}, max {:.2}) ({} failed)",
            front.name(),
            b.rate,
            ms(total.value_at_quantile(0.5)),
            ms(total.value_at_quantile(0.99)),
            ms(upstream.value_at_quantile(0.5)),
            ms(upstream.value_at_quantile(0.99)),
            ms(total.value_at_quantile(0.5).saturating_sub(upstream.value_at_quantile(0.5))),
            ms(total.value_at_quantile(0.99).saturating_sub(upstream.value_at_quantile(0.99))),
            ms(total.value_at_quantile(0.9).saturating_sub(upstream.value_at_quantile(0.9))),
            ms(total.value_at_quantile(0.999).saturating_sub(upstream.value_at_quantile(0.999))),
            ms(total.max().saturating_sub(upstream.max())),
            failures.load(Ordering::Relaxed)
        );
    }
    for &front in &fronts {
        // Throughput, closed loop.
        let deadline = Instant::now() + b.duration;
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let warm_until = Instant::now() + Duration::from_secs(1);
        let mut workers = Vec::new();
        for _ in 0..b.concurrency {
            let (send, ok, failed) = (send.clone(), ok.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let good = send(front).await;
                    if Instant::now() >= warm_until {
                        if good {
                            ok.fetch_add(1, Ordering::Relaxed)
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed)
                        };
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        let measured = b
            .duration
            .saturating_sub(Duration::from_secs(1))
            .as_secs_f64();
        println!(
            "  {:<4} throughput: {:.0} paid requests/s with {} clients ({} ok, {} failed)",
            front.name(),
            ok.load(Ordering::Relaxed) as f64 / measured,
            b.concurrency,
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
    }

    let mut shape_routers = Vec::new();
    if b.mode != Mode::Limits {
        shape_routers = shapes.run(b, &signal).await?;
    }
    let rounds = match (b.mode, b.limits_rounds) {
        (Mode::Limits, 0) => 3,
        (_, n) => n,
    };
    if rounds > 0 {
        shape_routers.push(shapes.compare_limits(b, rounds, signal()).await?);
    }

    let _ = stop_tx.send(true);
    router.await?.context("router")?;
    for r in shape_routers {
        r.await?.context("router")?;
    }
    ledger.await?.context("ledger")?;
    restore_rollups(&db.url, b.rollups).await?;
    let report = verify_ledger(&db.url).await?;
    println!(
        "  verify: ok ({} transfers, {} pending)",
        report.transfers, report.pending_transfers
    );
    db.drop_db().await;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Front {
    Grpc,
    Http,
    /// Paid searches over gRPC.
    Search,
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Grpc => "grpc",
            Front::Http => "http",
            Front::Search => "search",
        }
    }
}
