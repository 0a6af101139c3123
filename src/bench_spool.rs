//! `syft-router bench spool`: the usage spool's crash test (issue 16, docs/crash-safety.md).
//!
//! A ledger and a free router with a usage spool (`--usage-spool`), as separate processes. Clients
//! send free chats over gRPC, each with a fresh request id, while the router is killed with
//! SIGKILL and restarted again and again; once, the ledger is killed too and the router keeps
//! answering (and is killed) while it is down, so rows are answered, spooled, left by a killed
//! router and shipped by the next one. After the load it waits until the spool shipped, then
//! checks in the database that **every answered request has exactly one usage row**, and runs
//! `ledger verify`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use syft_ledger::client::connect_lazy;
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::ChatRequest;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};

use crate::chaos_parts::{CrashRun, Proc, Rng};
use crate::setup::{create_account, user_chat, verify_ledger, wait_for_ledger};

#[derive(Args, Debug, Clone)]
pub struct SpoolBench {
    /// Router kills (kill -9, then a restart on the same spool directory).
    #[arg(long, default_value_t = 6)]
    pub kills: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    #[command(flatten)]
    pub run: CrashRun,
}

const OWNER: &str = "owner@spool.example";
const ADMIN_KEY: &str = "spool-admin-key-0123456789abcdef";
/// How long the spool may take to ship everything after the load.
const SHIP_PATIENCE: Duration = Duration::from_secs(60);

/// What the run found.
#[derive(Debug, Default, serde::Serialize)]
pub struct SpoolTotals {
    pub kills: usize,
    /// Requests sent (one request id each).
    pub sent: usize,
    pub answered: usize,
    /// Answered while the ledger was down (their rows could only ship later).
    pub answered_ledger_down: usize,
    /// Usage rows of the run in the ledger.
    pub rows: usize,
    /// Must be zero: answered requests without a usage row.
    pub answered_without_row: usize,
    /// Must be zero: request ids with more than one usage row.
    pub duplicate_rows: usize,
    /// Rows of requests whose answer was lost with a killed router (allowed: the row was
    /// spooled before the answer left).
    pub rows_unanswered: usize,
    /// Must be empty: anything else, in words.
    pub problems: Vec<String>,
}

pub async fn run(b: &SpoolBench) -> anyhow::Result<()> {
    let t = spool_chaos(b).await?;
    let summary = format!(
        "spool: {} kills, {} sent, {} answered ({} with the ledger down), {} rows ({} of \
         unanswered requests)\n  answered without a row: {}   duplicate rows: {}   other \
         problems: {}",
        t.kills,
        t.sent,
        t.answered,
        t.answered_ledger_down,
        t.rows,
        t.rows_unanswered,
        t.answered_without_row,
        t.duplicate_rows,
        t.problems.len()
    );
    let clean = t.answered_without_row == 0 && t.duplicate_rows == 0 && t.problems.is_empty();
    b.run.report(
        &t,
        &summary,
        &t.problems,
        clean,
        "spool test found problems",
    )
}

pub async fn spool_chaos(b: &SpoolBench) -> anyhow::Result<SpoolTotals> {
    anyhow::ensure!(b.run.server.is_postgres(), "bench spool needs Postgres");
    let seed = b.run.seed();
    eprintln!("spool: seed {seed}");
    let db = b.run.server.fresh_db().await?;
    let dir = tempfile::tempdir()?;
    let result = session(b, seed, &db.url, dir.path()).await;
    let failed = result.as_ref().map_or(true, |t| {
        !t.problems.is_empty() || t.answered_without_row > 0
    });
    if failed {
        let kept = dir.keep();
        eprintln!("spool: process logs kept in {}", kept.display());
    }
    db.drop_db().await;
    result
}

async fn session(
    b: &SpoolBench,
    seed: u64,
    db_url: &str,
    dir: &std::path::Path,
) -> anyhow::Result<SpoolTotals> {
    let mut rng = Rng::new(seed);
    let ledger_args = ["ledger", "--database-url", db_url, "--admin-key", ADMIN_KEY];
    let mut ledger = Proc::spawn("ledger", &ledger_args, dir).await?;
    let mut admin = connect_lazy(&ledger.url(), ADMIN_KEY)?;
    wait_for_ledger(&mut admin).await?;
    let secret = create_account(&mut admin, OWNER, 0).await?;
    let config = serde_json::json!({
        "name": "spool", "owner_email": OWNER,
        "services": [{"type": "chat", "pricing": {"pricing_type": "free"}}],
        "ledger": {"url": ledger.url(), "timeout_ms": 2000},
    });
    let config_path = dir.join("router.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let (config_arg, spool_arg) = (
        config_path.display().to_string(),
        dir.join("spool").display().to_string(),
    );
    let router_args = [
        "router",
        "--config",
        &config_arg,
        "--ledger-secret",
        &secret,
        "--usage-spool",
        &spool_arg,
    ];
    let mut router = Proc::spawn("router", &router_args, dir).await?;
    let client = router_client(&router.url())?;

    let answered = Arc::new(Mutex::new(HashSet::<String>::new()));
    let ledger_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let down_answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run_id = rng.next() % 1_000_000;
    let clients: Vec<_> = (0..b.clients.max(1))
        .map(|c| {
            let (client, answered, stop, sent) =
                (client.clone(), answered.clone(), stop.clone(), sent.clone());
            let (ledger_down, down_answers) = (ledger_down.clone(), down_answers.clone());
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::Relaxed;
                let mut i = 0;
                while !stop.load(Relaxed) {
                    let key = format!("s{run_id}-c{c}-{i}");
                    i += 1;
                    sent.fetch_add(1, Relaxed);
                    let mut client = client.clone();
                    let reply = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.chat(chat(&key)),
                    )
                    .await;
                    match reply {
                        Ok(Ok(_)) => {
                            if ledger_down.load(Relaxed) {
                                down_answers.fetch_add(1, Relaxed);
                            }
                            answered.lock().await.insert(key);
                        }
                        // The router is being killed or restarted: pause, go on with a new id.
                        Ok(Err(s)) => {
                            tracing::debug!(key = %key, code = ?s.code(), error = %s.message(), "not answered");
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(_) => {
                            tracing::debug!(key = %key, "timed out");
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                    }
                }
            })
        })
        .collect();

    let mut totals = SpoolTotals::default();
    // Half-way through, the ledger is down across one router kill: rows are answered and
    // spooled, the router dies with them unshipped, and the next one ships them once the
    // ledger is back.
    let ledger_down_at = b.kills / 2;
    let warm = |n: usize| {
        let (client, answered) = (client.clone(), answered.clone());
        let key = format!("s{run_id}-warm-{n}");
        async move { answering(client, answered, key).await }
    };
    warm(0).await?;
    for k in 0..b.kills {
        if k == ledger_down_at {
            ledger.kill();
            ledger_down.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        tokio::time::sleep(rng.ms(300, 1000)).await;
        router.kill();
        totals.kills += 1;
        tokio::time::sleep(rng.ms(50, 300)).await;
        router.start().await?;
        // A new router process answers its first request slowly (lazy setup, e.g. the tokenizer
        // in a debug build): wait for it, so each life of the router answers many requests.
        warm(k + 1).await?;
        if k == ledger_down_at {
            tokio::time::sleep(rng.ms(300, 800)).await;
            ledger_down.store(false, std::sync::atomic::Ordering::Relaxed);
            ledger.start().await?;
        }
    }
    tokio::time::sleep(rng.ms(300, 800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.context("client task")?;
    }
    ledger.ensure_running().await?;
    router.ensure_running().await?;
    let answered = std::mem::take(&mut *answered.lock().await);
    totals.sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    totals.answered = answered.len();
    totals.answered_ledger_down = down_answers.load(std::sync::atomic::Ordering::Relaxed);

    // Every answered row must arrive: the spool ships in the background.
    let started = Instant::now();
    let rows = loop {
        let rows = usage_rows(db_url).await?;
        if answered.iter().all(|k| rows.contains_key(k)) || started.elapsed() > SHIP_PATIENCE {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    totals.rows = rows.values().sum();
    totals.answered_without_row = answered.iter().filter(|k| !rows.contains_key(*k)).count();
    totals.duplicate_rows = rows.values().filter(|n| **n > 1).count();
    totals.rows_unanswered = rows.keys().filter(|k| !answered.contains(*k)).count();
    if totals.answered_ledger_down == 0 && b.kills > 0 {
        totals
            .problems
            .push("no request was answered while the ledger was down".into());
    }
    if let Err(e) = verify_ledger(db_url).await {
        totals.problems.push(format!("ledger verify: {e}"));
    }
    drop((ledger, router));
    Ok(totals)
}

/// Sends `key` until the router answers it (30 s at most) and records it as answered.
async fn answering(
    mut client: RouterClient<Channel>,
    answered: Arc<Mutex<HashSet<String>>>,
    key: String,
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if client.chat(chat(&key)).await.is_ok() {
            answered.lock().await.insert(key);
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < until, "the router does not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Usage rows per request id.
async fn usage_rows(db_url: &str) -> anyhow::Result<HashMap<String, usize>> {
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(db_url).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT request_id, COUNT(*) FROM usage_records WHERE app_name = 'spool' GROUP BY request_id",
    )
    .fetch_all(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, n)| (id, usize::try_from(n).unwrap_or(0)))
        .collect())
}

fn router_client(url: &str) -> anyhow::Result<RouterClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    Ok(RouterClient::new(channel))
}

fn chat(key: &str) -> ChatRequest {
    ChatRequest {
        request_id: key.into(),
        ..user_chat("user@spool.example", "echo", &format!("question {key}"), 16)
    }
}
