//! `syft-router bench ledger`: authorize+capture pairs over gRPC against a real database, with the
//! client in the same process (so the machine's cores are shared, as the targets require).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use sqlx::Executor;
use syft_ledger::client::{with_credentials, Credentials, LedgerClient};
use syft_ledger::LedgerConfig;
use syft_proto::ledger as pb;
use tokio::sync::Mutex;

use crate::setup::{create_account, issue_token, verify_ledger};

pub use crate::bench_router::RouterBench;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Subcommand, Debug)]
enum BenchTarget {
    /// Authorize+capture pairs against the ledger.
    Ledger(LedgerBench),
    /// Paid and free chat requests through router + ledger + an upstream (in-process or
    /// `--upstream-url`), by payer count, with the issue-16 ratios.
    Router(RouterBench),
    /// Usage rows ingested per second (acknowledged after commit).
    Usage(crate::bench_usage::UsageBench),
    /// Checks per second of the shared rate limiter alone (docs/limits.md).
    Limits(crate::bench_limits::LimitsBench),
    /// Fault injection with real processes: kill -9 and SIGSTOP of ledgers and routers during
    /// paid traffic with client retries; checks the books after every run
    /// (docs/crash-safety.md).
    Chaos(crate::bench_chaos::ChaosBench),
    /// The usage spool under kill -9 of the router (and a ledger outage): every answered free
    /// request's row reaches the ledger exactly once (docs/crash-safety.md).
    Spool(crate::bench_spool::SpoolBench),
    /// Dashboard query latency over 10 million loaded usage rows (issue 12, docs/analytics.md).
    Analytics(crate::bench_analytics::AnalyticsBench),
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One recipient, 1,000 senders: every capture credits the same account.
    Hot,
    /// 100 recipients, 1,000 senders.
    Spread,
    /// One recipient, one sender: every client spends the same balance (one busy payer).
    OneSender,
    /// One sender whose holds carry per-day and per-month budgets (never reached), after
    /// `--history` earlier transfers of the pair this month: each hold counts the month's use.
    Budgeted,
}

#[derive(Args, Debug)]
struct LedgerBench {
    #[command(flatten)]
    server: BenchServer,
    #[arg(long, value_enum, default_values_t = [Shape::Hot, Shape::Spread, Shape::OneSender], num_args = 1..)]
    shape: Vec<Shape>,
    /// Also run `pgbench` (custom script updating one row, 8 clients) for the same duration and
    /// print the hot shape's pairs/s against it (needs `pgbench` on PATH; Postgres only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pgbench: bool,
    /// Concurrent clients.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Measured time per shape (after a warm-up of 2 s or a fifth of it).
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    duration: Duration,
    /// HTTP/2 connections shared by the clients.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Postgres pool size of the ledger under test.
    #[arg(long, default_value_t = 32)]
    pool: u32,
    /// Batch workers of the ledger under test.
    #[arg(long, default_value_t = syft_ledger::store::DEFAULT_BATCH_WORKERS)]
    batch_workers: usize,
    /// The budgeted shape's earlier transfers this month (voided holds, spread over the days
    /// before today; on the 1st of a month they fall on today, so only the day counts them).
    #[arg(long, default_value_t = 100_000)]
    history: u32,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        BenchTarget::Ledger(b) => {
            let mut rates = Vec::new();
            for shape in &b.shape {
                rates.push((*shape, bench_ledger(&b, *shape).await?));
            }
            let rate = |s: Shape| rates.iter().find(|(r, _)| *r == s).map(|(_, v)| *v);
            if let (Some(one), Some(budgeted)) = (rate(Shape::OneSender), rate(Shape::Budgeted)) {
                println!(
                    "ratio budgeted sender ({} transfers this month) / one sender: {:.2}",
                    b.history,
                    budgeted / one
                );
            }
            if let (Some(hot), Some(one)) = (rate(Shape::Hot), rate(Shape::OneSender)) {
                println!(
                    "ratio one sender / hot recipient (1,000 senders): {:.2}",
                    one / hot
                );
            }
            if b.pgbench && b.server.is_postgres() {
                let tps = crate::bench_pg::hot_row_tps(&b.server.database_url, b.duration).await?;
                println!("pgbench hot row (one UPDATE of one row per transaction, 8 clients): {tps:.0} tps");
                if let Some(hot) = rate(Shape::Hot) {
                    println!(
                        "ratio hot recipient pairs/s / pgbench hot-row tps: {:.2} (target >= 2.0: {})",
                        hot / tps,
                        if hot / tps >= 2.0 { "met" } else { "NOT met" }
                    );
                }
            }
            Ok(())
        }
        BenchTarget::Router(b) => crate::bench_router::run(&b).await,
        BenchTarget::Usage(b) => crate::bench_usage::run(&b).await,
        BenchTarget::Limits(b) => crate::bench_limits::run(&b).await,
        BenchTarget::Chaos(b) => crate::bench_chaos::run(&b).await,
        BenchTarget::Spool(b) => crate::bench_spool::run(&b).await,
        BenchTarget::Analytics(b) => crate::bench_analytics::run(&b).await,
    }
}

/// Where a benchmark makes its throwaway database; one flag for every `bench` command.
#[derive(Args, Debug, Clone)]
pub(crate) struct BenchServer {
    /// Server URL to create a fresh benchmark database on (postgres://…; `sqlite` for a file in a
    /// temporary directory, where the benchmark allows it).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_SERVER)]
    pub(crate) database_url: String,
    /// Delay every byte between the benchmark's ledger and Postgres by this much each way (e.g.
    /// `250us`: a database about half a millisecond away), through a relay in this process.
    /// `bench ledger` and `bench router` only; setup and the final `verify` connect directly.
    #[arg(long, value_parser = crate::cli::parse_duration)]
    pub(crate) database_delay: Option<std::time::Duration>,
}

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl BenchServer {
    pub(crate) fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres")
    }

    /// A fresh database on this server; with `--database-delay`, its `service_url` goes through
    /// a delaying relay.
    pub(crate) async fn fresh_db(&self) -> anyhow::Result<BenchDb> {
        let mut db = fresh_db(&self.database_url).await?;
        if let Some(one_way) = self.database_delay {
            anyhow::ensure!(self.is_postgres(), "--database-delay needs Postgres");
            db.service_url = crate::bench_delay::through_relay(&db.url, one_way)?;
            let rtt = round_trip(&db.service_url).await?;
            println!(
                "database delay: {} us each way; measured round trip (SELECT 1, median of 50) {:.2} ms",
                one_way.as_micros(),
                rtt.as_secs_f64() * 1e3
            );
        }
        Ok(db)
    }
}

/// A throwaway database, dropped afterwards.
pub(crate) struct BenchDb {
    pub(crate) url: String,
    /// What the benchmarked services connect to: `url`, or a delaying relay in front of it.
    pub(crate) service_url: String,
    drop: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

/// The median time of a `SELECT 1` on one connection to `url`.
async fn round_trip(url: &str) -> anyhow::Result<std::time::Duration> {
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url).await?;
    let mut times = Vec::new();
    for _ in 0..50 {
        let started = std::time::Instant::now();
        conn.execute("SELECT 1").await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

pub(crate) async fn fresh_db(server_url: &str) -> anyhow::Result<BenchDb> {
    if server_url.starts_with("sqlite") {
        let dir = tempfile::tempdir()?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        return Ok(BenchDb {
            service_url: url.clone(),
            url,
            drop: None,
            _dir: Some(dir),
        });
    }
    sqlx::any::install_default_drivers();
    let name = format!("syft_bench_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(server_url)
        .await
        .context("connect to the benchmark database server")?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let base = server_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(server_url);
    let url = format!("{base}/{name}");
    Ok(BenchDb {
        service_url: url.clone(),
        url,
        drop: Some((server_url.to_string(), name)),
        _dir: None,
    })
}

impl BenchDb {
    pub(crate) async fn drop_db(self) {
        if let Some((server, name)) = self.drop {
            if let Ok(mut conn) = <sqlx::AnyConnection as sqlx::Connection>::connect(&server).await
            {
                let _ = conn
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
            }
        }
    }
}

struct Payer {
    email: String,
    token: String,
    recipient: usize,
}

#[derive(Default)]
struct Stats {
    authorize: Option<Histogram<u64>>,
    capture: Option<Histogram<u64>>,
}

/// Runs one shape; returns its pairs/s.
async fn bench_ledger(b: &LedgerBench, shape: Shape) -> anyhow::Result<f64> {
    const ADMIN: &str = "bench-admin";
    let db = b.server.fresh_db().await?;
    let config = LedgerConfig {
        database_url: db.service_url.clone(),
        admin_key: ADMIN.into(),
        max_connections: b.pool,
        batch_workers: b.batch_workers,
        ..LedgerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(syft_ledger::serve(
        config,
        syft_ledger::Listeners::grpc(listener),
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut channels = Vec::new();
    for _ in 0..b.connections.max(1) {
        let endpoint = tonic::transport::Endpoint::from_shared(url.clone())?.tcp_nodelay(true);
        let mut channel = None;
        for _ in 0..100 {
            match endpoint.connect().await {
                Ok(c) => {
                    channel = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        channels.push(channel.context("ledger did not start")?);
    }
    let client = |i: usize, secret: &str| -> anyhow::Result<LedgerClient> {
        Ok(with_credentials(
            channels[i % channels.len()].clone(),
            Credentials::bearer(secret)?,
        ))
    };

    // Setup: recipients, 1,000 funded senders, one token each.
    let recipients = if shape == Shape::Hot { 1 } else { 100 };
    let mut admin = client(0, ADMIN)?;
    let mut recipient_secrets = Vec::new();
    for r in 0..recipients {
        recipient_secrets
            .push(create_account(&mut admin, &format!("router{r}@bench.example"), 0).await?);
    }
    let mut payers = Vec::new();
    let senders = if matches!(shape, Shape::OneSender | Shape::Budgeted) {
        1
    } else {
        1000
    };
    for s in 0..senders {
        let email = format!("user{s}@bench.example");
        let secret = create_account(&mut admin, &email, 1_000_000_000_000).await?;
        let recipient = s % recipients;
        let token = issue_token(
            &mut client(s, &secret)?,
            &format!("router{recipient}@bench.example"),
        )
        .await?;
        payers.push(Payer {
            email,
            token,
            recipient,
        });
    }
    if shape == Shape::Budgeted {
        crate::bench_history::load(&db.url, b.history).await?;
    }
    let budget = (shape == Shape::Budgeted).then_some(1_000_000_000_000_000);
    let payers = Arc::new(payers);

    let warmup = (b.duration / 5).max(Duration::from_secs(2));
    let started = Instant::now();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut workers = Vec::new();
    for w in 0..b.concurrency {
        let routers: Vec<LedgerClient> = recipient_secrets
            .iter()
            .map(|s| client(w, s))
            .collect::<anyhow::Result<_>>()?;
        let (payers, measuring, stop, pairs, errors, next, stats) = (
            payers.clone(),
            measuring.clone(),
            stop.clone(),
            pairs.clone(),
            errors.clone(),
            next.clone(),
            stats.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut auth_h = Histogram::<u64>::new(3).expect("histogram");
            let mut cap_h = Histogram::<u64>::new(3).expect("histogram");
            let mut routers = routers;
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let payer = &payers[(n % payers.len() as u64) as usize];
                let router = &mut routers[payer.recipient];
                let t0 = Instant::now();
                let auth = router
                    .authorize(pb::AuthorizeRequest {
                        sender_email: payer.email.clone(),
                        amount_micros: 10_000,
                        token: payer.token.clone(),
                        app_name: "bench".into(),
                        app_ep_path: "/chat".into(),
                        idempotency_key: format!("req-{n}"),
                        hold_ttl_seconds: None,
                        budget_per_day_micros: budget,
                        budget_per_month_micros: budget,
                        attempt_id: String::new(),
                    })
                    .await;
                let t1 = Instant::now();
                let Ok(transfer) = auth else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let cap = router
                    .capture(pb::CaptureRequest {
                        answer: None,
                        transfer_id: transfer.into_inner().id,
                        amount: Some(pb::capture_request::Amount::AmountMicros(7_000)),
                        usage: Some(pb::Usage {
                            request_id: format!("req-{n}"),
                            app_name: "bench".into(),
                            endpoint: "/chat".into(),
                            user_email: payer.email.clone(),
                            model: "echo".into(),
                            prompt_tokens: 20,
                            completion_tokens: 30,
                            total_tokens: 50,
                            status: "success".into(),
                            latency_ms: 1,
                            upstream_latency_ms: 0,
                            ttft_ms: None,
                            row_key: String::new(),
                            answered_at_unix_micros: None,
                            reason: String::new(),
                        }),
                    })
                    .await;
                let t2 = Instant::now();
                if cap.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if measuring.load(Ordering::Relaxed) {
                    pairs.fetch_add(1, Ordering::Relaxed);
                    let _ = auth_h.record((t1 - t0).as_micros() as u64);
                    let _ = cap_h.record((t2 - t1).as_micros() as u64);
                }
            }
            let mut s = stats.lock().await;
            match &mut s.authorize {
                Some(h) => h.add(&auth_h).expect("same bounds"),
                None => s.authorize = Some(auth_h),
            }
            match &mut s.capture {
                Some(h) => h.add(&cap_h).expect("same bounds"),
                None => s.capture = Some(cap_h),
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let measure_start = Instant::now();
    tokio::time::sleep(b.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = measure_start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    let done = pairs.load(Ordering::Relaxed);
    let s = stats.lock().await;
    let ms = |h: &Option<Histogram<u64>>, q: f64| {
        h.as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "ledger bench shape={:?} backend={} concurrency={} duration={:.1}s: {:.0} pairs/s ({} pairs, {} errors)",
        shape,
        if db.url.starts_with("postgres") { "postgres" } else { "sqlite" },
        b.concurrency,
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        done,
        errors.load(Ordering::Relaxed)
    );
    println!(
        "  authorize p50 {:.2} ms  p99 {:.2} ms | capture p50 {:.2} ms  p99 {:.2} ms   (setup+warm-up {:.1}s)",
        ms(&s.authorize, 0.5),
        ms(&s.authorize, 0.99),
        ms(&s.capture, 0.5),
        ms(&s.capture, 0.99),
        (measure_start - started).as_secs_f64()
    );
    drop(s);
    let _ = stop_tx.send(());
    server.await??;
    // Every benchmark run must also leave a consistent ledger.
    let report = verify_ledger(&db.url).await?;
    println!("  verify: ok ({} transfers)", report.transfers);
    db.drop_db().await;
    Ok(done as f64 / elapsed.as_secs_f64())
}
