//! `syft-router bench chaos`: fault injection with real processes (docs/crash-safety.md).
//!
//! Two ledgers on one Postgres database, two routers listing both (`--ledger-url a,b`), and a
//! faulty upstream. Each run sends paid unary and streamed chats from several clients, each
//! retrying on the same request id (alternating routers) until it gets an answer or a definite
//! refusal, while one process at a time is killed with SIGKILL and restarted, or paused with
//! SIGSTOP and continued. After the run, once every hold is resolved, it checks: `ledger verify`
//! (conservation and every other invariant), no PENDING hold past its expiry, at most one
//! transfer per key, every charge equal to the price, every answer's cost and transfer id those
//! of its key's capture, and the two counts that must be zero: keys charged whose client never
//! got the answer, and answers delivered uncharged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt as _;
use syft_ledger::client::{connect_lazy, LedgerClient};
use syft_proto::ledger as pb;
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::{chat_stream_event, ChatRequest};
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::chaos_parts::{start_faulty_upstream, CrashRun, Proc, Rng, ANSWER};
use crate::setup::{create_account, issue_token, user_chat, verify_ledger, wait_for_ledger};

#[derive(Args, Debug, Clone)]
pub struct ChaosBench {
    /// Runs (each with fresh keys and fresh payers; the processes live across runs).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Load time of each run (clients finish their retries after it).
    #[arg(long, default_value = "6s", value_parser = crate::cli::parse_duration)]
    pub duration: Duration,
    /// Concurrent clients.
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    /// Give each payer a per-day spend budget of this many chats (the router's `budgets`
    /// section), so every hold is a budgeted one, decided in the ledger's per-sender batches,
    /// while processes die. Adds a check: no payer is charged more than its budget in a UTC day.
    #[arg(long)]
    pub budget_chats: Option<u32>,
    /// Payers per run; client `c` pays as payer `c % payers`. Several payers put holds of many
    /// senders into one of the ledger's batches (with `--budget-chats`, its multi-sender budget
    /// batches) while processes die.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub payers: u32,
    #[command(flatten)]
    pub run: CrashRun,
}

/// The price of one chat: $0.01.
const PRICE: i64 = 10_000;
const OWNER: &str = "owner@chaos.example";
const ADMIN_KEY: &str = "chaos-admin-key-0123456789abcdef";
/// Hold time to live: short, so holds of killed routers expire within a run.
const HOLD_TTL_SECS: u64 = 3;
/// A client stops retrying a key after this long.
const CLIENT_PATIENCE: Duration = Duration::from_secs(30);
/// One attempt's deadline: longer than a duplicate's wait for a pending hold (TTL + margin).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What all runs found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Totals {
    pub runs: usize,
    pub keys: usize,
    pub attempts: usize,
    pub answered: usize,
    pub replays: usize,
    /// Streams the router ended before their hold could expire (finish reason `length`).
    pub cut_streams: usize,
    pub charged: usize,
    pub kills: usize,
    pub pauses: usize,
    /// Must be zero: a key charged whose client never got the answer after its retries.
    pub charged_unanswered: usize,
    /// Must be zero: an answer the client got without a capture for its key.
    pub answered_uncharged: usize,
    /// Keys refused because the payer's budget was spent (`--budget-chats`).
    pub budget_refused: usize,
    /// Must be zero: a payer's UTC day charged more than its budget.
    pub over_budget: usize,
    /// Must be empty: any other broken invariant, in words.
    pub problems: Vec<String>,
}

/// What a client ended with for one key.
#[derive(Debug, Clone)]
enum Outcome {
    Answered {
        transfer_id: String,
        cost: i64,
        replay: bool,
        /// A stream ended early by the router (finish reason `length`), charged as delivered.
        cut: bool,
    },
    /// A definite refusal or an exhausted patience, with the last error.
    NotAnswered(String),
    /// Refused because the payer's budget was spent: definite, nothing charged.
    OverBudget,
}

pub async fn run(b: &ChaosBench) -> anyhow::Result<()> {
    let t = chaos(b).await?;
    let summary = format!(
        "chaos: {} runs, {} keys ({} attempts), {} answered ({} replays, {} streams cut at length), {} charged, {} refused over budget, {} kills, {} pauses\n  \
         charged but never answered: {}   answered but not charged: {}   days over budget: {}   other problems: {}",
        t.runs, t.keys, t.attempts, t.answered, t.replays, t.cut_streams, t.charged,
        t.budget_refused, t.kills, t.pauses, t.charged_unanswered, t.answered_uncharged,
        t.over_budget, t.problems.len()
    );
    let clean = t.charged_unanswered == 0
        && t.answered_uncharged == 0
        && t.over_budget == 0
        && t.problems.is_empty();
    b.run
        .report(&t, &summary, &t.problems, clean, "chaos found problems")
}

/// Sets everything up, runs `b.runs` runs, and adds up what they found.
pub async fn chaos(b: &ChaosBench) -> anyhow::Result<Totals> {
    anyhow::ensure!(
        b.run.server.is_postgres(),
        "bench chaos needs Postgres (two ledger processes share the database)"
    );
    let seed = b.run.seed();
    eprintln!("chaos: seed {seed}");
    let db = b.run.server.fresh_db().await?;
    let dir = tempfile::tempdir()?;
    let result = async {
        let budget = b.budget_chats.map(|n| i64::from(n) * PRICE);
        let mut procs = start_processes(&db.url, seed, dir.path(), budget).await?;
        let mut totals = Totals::default();
        let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
        for run in 0..b.runs {
            one_run(b, run, &mut procs, &mut rng, &db.url, &mut totals)
                .await
                .with_context(|| format!("run {run}; logs in {}", dir.path().display()))?;
            totals.runs += 1;
            eprintln!(
                "chaos: run {run} done: {} keys, {} answered, {} charged, {} kills, {} pauses, {} problems so far",
                totals.keys, totals.answered, totals.charged, totals.kills, totals.pauses,
                totals.problems.len()
            );
        }
        Ok::<_, anyhow::Error>(totals)
    }
    .await;
    if result.is_err() {
        // Keep the logs of a failed session.
        let kept = dir.keep();
        eprintln!("chaos: process logs kept in {}", kept.display());
    }
    db.drop_db().await;
    result
}

/// The four processes: ledgers first (index 0, 1), then routers (2, 3).
struct Procs {
    all: Vec<Proc>,
}

async fn start_processes(
    db_url: &str,
    seed: u64,
    dir: &std::path::Path,
    budget: Option<i64>,
) -> anyhow::Result<Procs> {
    let mut all = Vec::new();
    let ttl = format!("{HOLD_TTL_SECS}s");
    for i in 0..2 {
        let args = [
            "ledger",
            "--database-url",
            db_url,
            "--admin-key",
            ADMIN_KEY,
            "--hold-ttl",
            &ttl,
            "--sweep-interval",
            "500ms",
        ];
        all.push(Proc::spawn(&format!("ledger{i}"), &args, dir).await?);
    }
    let mut admin = connect_lazy(&all[0].url(), ADMIN_KEY)?;
    wait_for_ledger(&mut admin).await?;
    let secret = create_account(&mut admin, OWNER, 0).await?;
    let upstream = start_faulty_upstream(seed).await?;
    let mut config = serde_json::json!({
        "name": "chaos", "owner_email": OWNER, "models": ["*"],
        "services": [{"type": "chat", "pricing": {"pricing_type": "per_request", "amount": "0.01"}}],
        "upstream": {"kind": "openai", "base_url": upstream, "request_timeout_ms": 3000,
                      "idle_timeout_ms": 2000, "max_retries": 2},
        "ledger": {"url": [all[0].url(), all[1].url()], "timeout_ms": 2000,
                    "hold_ttl_seconds": HOLD_TTL_SECS},
    });
    if let Some(micros) = budget {
        let dollars = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
        config["budgets"] = serde_json::json!({ "per_day": dollars });
    }
    let config_path = dir.join("router.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let config_arg = config_path.display().to_string();
    for i in 0..2 {
        let args = [
            "router",
            "--config",
            &config_arg,
            "--ledger-secret",
            &secret,
        ];
        all.push(Proc::spawn(&format!("router{i}"), &args, dir).await?);
    }
    Ok(Procs { all })
}

async fn one_run(
    b: &ChaosBench,
    run: usize,
    procs: &mut Procs,
    rng: &mut Rng,
    db_url: &str,
    totals: &mut Totals,
) -> anyhow::Result<()> {
    let mut admin = connect_lazy(&procs.all[rng.range(0, 2) as usize].url(), ADMIN_KEY)?;
    let run_id = rng.next() % 1_000_000;
    let mut payers = Vec::new();
    for p in 0..b.payers {
        let payer = format!("payer-{run}-{run_id}-{p}@chaos.example");
        let payer_secret = create_account(&mut admin, &payer, 1_000 * PRICE).await?;
        let mut as_payer = connect_lazy(&procs.all[0].url(), &payer_secret)?;
        let token = issue_token(&mut as_payer, OWNER).await?;
        payers.push((payer, token));
    }
    let routers: Vec<RouterClient<Channel>> = procs.all[2..]
        .iter()
        .map(|p| router_client(&p.url()))
        .collect::<anyhow::Result<_>>()?;

    // Per payer, what its clients got for each key.
    let outcomes = Arc::new(Mutex::new(vec![
        HashMap::<String, Outcome>::new();
        payers.len()
    ]));
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let until = Instant::now() + b.duration;
    let clients: Vec<_> = (0..b.clients)
        .map(|c| {
            let (routers, outcomes, attempts) =
                (routers.clone(), outcomes.clone(), attempts.clone());
            let p = c % payers.len();
            let (payer, token) = payers[p].clone();
            let mut rng = Rng::new(rng.next());
            tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < until {
                    let key = format!("r{run}-{run_id}-c{c}-{i}");
                    i += 1;
                    let stream = rng.chance(50);
                    let req = chat(&payer, &token, &key);
                    let first = rng.range(0, 2) as usize;
                    let (outcome, n) = with_retries(&routers, first, req, stream).await;
                    attempts.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    outcomes.lock().await[p].insert(key, outcome);
                }
            })
        })
        .collect();

    // Faults, one at a time, while the clients run.
    while Instant::now() < until {
        tokio::time::sleep(rng.ms(300, 1200)).await;
        let victim = rng.range(0, procs.all.len() as u64) as usize;
        let p = &mut procs.all[victim];
        if rng.chance(50) {
            p.kill();
            totals.kills += 1;
            tokio::time::sleep(rng.ms(100, 1000)).await;
            p.start().await?;
        } else {
            p.signal_pause(true);
            totals.pauses += 1;
            tokio::time::sleep(rng.ms(200, 2000)).await;
            p.signal_pause(false);
        }
    }
    for p in &mut procs.all {
        p.ensure_running().await?;
    }
    for c in clients {
        c.await.context("client task")?;
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().await);
    totals.attempts += attempts.load(std::sync::atomic::Ordering::Relaxed);

    // Every hold resolves within its TTL plus a sweep; then the books are checked.
    for ((payer, _), outcomes) in payers.iter().zip(&outcomes) {
        let transfers = settled_transfers(&mut admin, payer).await?;
        check(outcomes, &transfers, totals);
        if let Some(n) = b.budget_chats {
            check_budget(&transfers, i64::from(n) * PRICE, totals);
        }
    }
    verify_ledger(db_url)
        .await
        .map_err(|e| {
            totals
                .problems
                .push(format!("run {run}: ledger verify: {e}"));
        })
        .ok();
    Ok(())
}

fn router_client(url: &str) -> anyhow::Result<RouterClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    Ok(RouterClient::new(channel))
}

fn chat(payer: &str, token: &str, key: &str) -> ChatRequest {
    ChatRequest {
        transaction_token: token.into(),
        request_id: key.into(),
        ..user_chat(payer, "chaos", &format!("question {key}"), 64)
    }
}

/// Sends `req` until it is answered or definitely refused, alternating routers, for at most
/// [`CLIENT_PATIENCE`]. Returns the outcome and the number of attempts.
async fn with_retries(
    routers: &[RouterClient<Channel>],
    first: usize,
    req: ChatRequest,
    stream: bool,
) -> (Outcome, usize) {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut n = 0;
    loop {
        let mut client = routers[(first + n) % routers.len()].clone();
        n += 1;
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, send(&mut client, req.clone(), stream));
        let status = match attempt.await {
            Ok(Ok(outcome)) => return (outcome, n),
            Ok(Err(s)) => s,
            Err(_) => tonic::Status::deadline_exceeded("attempt timed out"),
        };
        if syft_error::reason_of(&status).as_deref() == Some("BUDGET_EXCEEDED") {
            return (Outcome::OverBudget, n);
        }
        let retry = match status.code() {
            Code::AlreadyExists => status.message().contains("in progress"),
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted => true,
            _ => false,
        };
        if !retry || started.elapsed() > CLIENT_PATIENCE {
            return (
                Outcome::NotAnswered(format!("{:?}: {}", status.code(), status.message())),
                n,
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// One attempt: the answer, or why there is none (a stream that breaks before its final event
/// is no answer).
async fn send(
    client: &mut RouterClient<Channel>,
    req: ChatRequest,
    stream: bool,
) -> Result<Outcome, tonic::Status> {
    if !stream {
        let r = client.chat(req).await?.into_inner();
        let text = r.message.map(|m| m.content).unwrap_or_default();
        if text != ANSWER {
            return Err(tonic::Status::internal(format!("wrong answer {text:?}")));
        }
        return Ok(Outcome::Answered {
            transfer_id: r.transfer_id,
            cost: r.cost_micros,
            replay: r.replay,
            cut: false,
        });
    }
    let mut events = client.chat_stream(req).await?.into_inner();
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        match ev?.event {
            Some(chat_stream_event::Event::Delta(d)) => text.push_str(&d.content),
            Some(chat_stream_event::Event::Final(f)) => {
                // A stream the router ended before its hold could expire (a paused or slow
                // ledger left too little of the hold) is a complete answer, cut at `length`.
                let cut = f.finish_reason == "length" && ANSWER.starts_with(&text);
                if text != ANSWER && !cut {
                    return Err(tonic::Status::internal(format!("wrong answer {text:?}")));
                }
                return Ok(Outcome::Answered {
                    transfer_id: f.transfer_id,
                    cost: f.cost_micros,
                    replay: f.replay,
                    cut: text != ANSWER,
                });
            }
            None => {}
        }
    }
    Err(tonic::Status::unknown(
        "stream ended without its final event",
    ))
}

/// The payer's transfers once none is pending (holds of killed routers expire and are swept).
async fn settled_transfers(
    admin: &mut LedgerClient,
    payer: &str,
) -> anyhow::Result<Vec<pb::Transfer>> {
    let deadline = Instant::now() + Duration::from_secs(HOLD_TTL_SECS + 20);
    loop {
        let transfers = list_transfers(admin, payer).await;
        if let Ok(t) = &transfers {
            if t.iter().all(|t| t.status() != pb::TransferStatus::Pending) {
                return transfers;
            }
        }
        if Instant::now() > deadline {
            let t = transfers?;
            let pending = t
                .iter()
                .filter(|t| t.status() == pb::TransferStatus::Pending)
                .count();
            anyhow::bail!("{pending} holds still pending well past their expiry");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn list_transfers(
    admin: &mut LedgerClient,
    payer: &str,
) -> anyhow::Result<Vec<pb::Transfer>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_transfers(pb::ListTransfersRequest {
                account_email: payer.into(),
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.transfers);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// The request id a ledger key belongs to: a retried request's later tries are keyed
/// `<id> (attempt N)` (`crates/router/src/service/attempts.rs`).
fn request_id_of(key: &str) -> &str {
    match key.rsplit_once(" (attempt ") {
        Some((id, n))
            if n.strip_suffix(')')
                .is_some_and(|n| n.parse::<u32>().is_ok()) =>
        {
            id
        }
        _ => key,
    }
}

/// Compares what the clients got with what the ledger charged.
fn check(outcomes: &HashMap<String, Outcome>, transfers: &[pb::Transfer], totals: &mut Totals) {
    // One transfer per ledger key; a request id has one per try (a retry of an uncharged try
    // places the next under `<id> (attempt N)`), of which at most one is charged.
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    let mut by_key: HashMap<&str, Vec<&pb::Transfer>> = HashMap::new();
    for t in transfers {
        *per_key.entry(t.idempotency_key.as_str()).or_default() += 1;
        by_key
            .entry(request_id_of(&t.idempotency_key))
            .or_default()
            .push(t);
    }
    for (key, n) in per_key {
        if n > 1 {
            totals.problems.push(format!("key {key}: {n} transfers"));
        }
    }
    for (key, ts) in &by_key {
        let charged = ts
            .iter()
            .filter(|t| t.status() == pb::TransferStatus::Completed)
            .count();
        if charged > 1 {
            totals
                .problems
                .push(format!("request {key}: charged {charged} times"));
        }
        if !outcomes.contains_key(*key) {
            totals
                .problems
                .push(format!("key {key}: a transfer no client asked for"));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    for t in transfers {
        match t.status() {
            pb::TransferStatus::Completed if t.captured_micros != PRICE => totals.problems.push(
                format!("transfer {} charged {} micros", t.id, t.captured_micros),
            ),
            pb::TransferStatus::Pending if t.expires_at_unix_micros < now => totals
                .problems
                .push(format!("transfer {} pending past its expiry", t.id)),
            _ => {}
        }
    }
    for (key, outcome) in outcomes {
        totals.keys += 1;
        let capture = by_key.get(key.as_str()).and_then(|ts| {
            ts.iter()
                .find(|t| t.status() == pb::TransferStatus::Completed)
        });
        if capture.is_some() {
            totals.charged += 1;
        }
        match (outcome, capture) {
            (
                Outcome::Answered {
                    transfer_id,
                    cost,
                    replay,
                    cut,
                },
                Some(t),
            ) => {
                totals.answered += 1;
                totals.replays += usize::from(*replay);
                totals.cut_streams += usize::from(*cut);
                if *transfer_id != t.id || *cost != PRICE {
                    totals.problems.push(format!(
                        "key {key}: answered with transfer {transfer_id} cost {cost}, charged {} {}",
                        t.id, t.captured_micros
                    ));
                }
            }
            (Outcome::Answered { .. }, None) => {
                totals.answered += 1;
                totals.answered_uncharged += 1;
                totals
                    .problems
                    .push(format!("key {key}: answered but not charged"));
            }
            (Outcome::NotAnswered(why), Some(t)) => {
                totals.charged_unanswered += 1;
                totals.problems.push(format!(
                    "key {key}: charged ({}) but never answered: {why}",
                    t.id
                ));
            }
            (Outcome::OverBudget, Some(t)) => {
                totals.charged_unanswered += 1;
                totals.problems.push(format!(
                    "key {key}: charged ({}) but refused over budget",
                    t.id
                ));
            }
            (Outcome::OverBudget, None) => totals.budget_refused += 1,
            (Outcome::NotAnswered(_), None) => {}
        }
    }
}

/// Adds up the payer's captures per UTC day (the budget's window): none may pass `budget`.
fn check_budget(transfers: &[pb::Transfer], budget: i64, totals: &mut Totals) {
    const DAY_MICROS: i64 = 86_400_000_000;
    let mut per_day: HashMap<i64, i64> = HashMap::new();
    for t in transfers {
        if t.status() == pb::TransferStatus::Completed {
            *per_day
                .entry(t.created_at_unix_micros.div_euclid(DAY_MICROS))
                .or_default() += t.captured_micros;
        }
    }
    for (day, charged) in per_day {
        if charged > budget {
            totals.over_budget += 1;
            totals.problems.push(format!(
                "day {day}: charged {charged} micros against a budget of {budget}"
            ));
        }
    }
}
