//! Postgres write path: hot operations are queued and applied in batches, one set-based statement
//! (one round trip, one commit) per kind per batch.
//!
//! Per-statement and per-commit costs dominate Postgres CPU for these tiny operations, so a batch of
//! N authorizations costs little more than one. A few workers drain one queue: while a batch is in
//! the database the next one fills up, so batches grow with load, and a lone request still goes
//! out at once. Within a batch:
//!
//! - several authorizations of one sender (or token) are decided together against running totals
//!   (see `AUTHORIZE_BATCH`), so one busy payer is not serialised to one hold per batch;
//! - resolutions are aggregated per sender and per token, so several captures for one sender in one
//!   batch move the right totals.
//!
//! A batch that fails for a non-transient reason is split and each job retried alone, so one bad job
//! never fails its neighbours. Serialization failures and deadlocks retry the whole batch.

use std::sync::Arc;

use serde_json::json;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::resolve_batch::resolve_batch;
use super::{
    Actor, AnswerWrite, BudgetRefusal, HoldBudgets, Micros, TransferRow, TransferStatus, UsageInput,
};
use crate::error::{is_check_violation, is_retryable, is_unique_violation};

const MAX_BATCH: usize = 256;

/// One hold to place. `id` and times are fixed by the caller so a retried batch is identical.
#[derive(Debug, Clone)]
pub(crate) struct AuthJob {
    pub id: String,
    pub sender_id: i64,
    pub recipient_id: i64,
    pub sender_email: String,
    pub recipient_email: String,
    pub token_id: String,
    pub amount: i64,
    pub currency: String,
    pub app_name: String,
    pub app_ep_path: String,
    pub idempotency_key: String,
    pub request_hash: String,
    /// The caller's id of this attempt (empty: none; stored as NULL).
    pub attempt_id: String,
    pub now: i64,
    pub expires_at: i64,
    /// The recipient's budgets for this sender, and the token's own limit per 24 hours: a job
    /// with any is placed with its sender's other budgeted holds (`budget_batch.rs`), not here.
    pub budgets: HoldBudgets,
    pub token_limit_per_day: Option<i64>,
}

impl AuthJob {
    pub fn pending_row(&self) -> TransferRow {
        TransferRow {
            id: self.id.clone(),
            sender_id: self.sender_id,
            recipient_id: self.recipient_id,
            sender_email: self.sender_email.clone(),
            recipient_email: self.recipient_email.clone(),
            amount: Micros::new(self.amount),
            captured: Micros::ZERO,
            currency: self.currency.clone(),
            status: TransferStatus::Pending,
            created_by: Actor::Recipient,
            resolved_by: None,
            app_name: self.app_name.clone(),
            app_ep_path: self.app_ep_path.clone(),
            idempotency_key: self.idempotency_key.clone(),
            created_at: self.now,
            expires_at: self.expires_at,
            resolved_at: None,
            cancel_reason: String::new(),
            token_id: Some(self.token_id.clone()).filter(|t| !t.is_empty()),
            refunded: Micros::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthResult {
    Created,
    /// Decided again in a later batch (never returned by [`Batcher::authorize`]).
    Deferred,
    TokenRejected,
    InsufficientFunds,
    BudgetExceeded(BudgetRefusal),
    /// The idempotency key was taken by a hold committed meanwhile (the caller replays it).
    DuplicateKey,
}

/// Which expiry condition a resolution needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeGuard {
    /// Captures: only before `expires_at`.
    BeforeExpiry = 1,
    /// The sweep: only after `expires_at`.
    AfterExpiry = 2,
    /// Voids by the recipient: any time.
    Any = 0,
}

#[derive(Debug, Clone)]
pub(crate) struct ResolveJob {
    pub transfer_id: String,
    /// -1: the ledger itself (sweep).
    pub recipient_id: i64,
    pub status: TransferStatus,
    /// -1 captures the full authorized amount.
    pub captured: i64,
    pub resolved_by: Actor,
    pub reason: String,
    pub now: i64,
    pub guard: TimeGuard,
    pub usage_id: String,
    pub usage: Option<UsageInput>,
    /// Captures only: the answer to store in the capture's transaction.
    pub answer: Option<AnswerWrite>,
}

enum Job {
    Authorize(AuthJob, oneshot::Sender<Result<AuthResult, sqlx::Error>>),
    Resolve(
        ResolveJob,
        oneshot::Sender<Result<Option<TransferRow>, sqlx::Error>>,
    ),
}

pub(crate) struct Batcher {
    queue: mpsc::UnboundedSender<Job>,
    /// The workers' own connections ([`connect`]), kept to close them with the store.
    pool: AnyPool,
}

/// The batch workers' own connections: two per worker, whose authorizations and resolutions run
/// side by side (`run_and_reply`).
///
/// They plan with sequential scans off. Every statement here reaches rows by key, and Postgres
/// caches one generic plan per connection after five executions, costed against the table sizes
/// of that moment. On a young database (a few pages, not analyzed yet) that plan scanned the
/// whole of `transfers` for each capture batch, and kept doing so as the table grew, until
/// autovacuum's first `ANALYZE` replaced it (a minute or more): in a fresh benchmark that doubled
/// the paid latency at one client. With sequential scans off the cached plans probe the primary
/// key whatever the sizes were. The rest of the ledger (verify, analytics, folds) keeps the
/// planner's defaults on the main pool.
pub(crate) async fn connect(
    options: AnyPoolOptions,
    database_url: &str,
    workers: usize,
) -> Result<AnyPool, sqlx::Error> {
    let connections = u32::try_from(workers.max(1) * 2).unwrap_or(u32::MAX);
    let options = options
        .max_connections(connections)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET enable_seqscan = off").await?;
                Ok(())
            })
        });
    super::open_pool(options, database_url).await
}

impl Batcher {
    /// `workers` batches may be in the database at once. Each worker drains whatever is queued
    /// into one batch: fewer workers make bigger batches (fewer commits, more throughput when
    /// commits are the bottleneck); more workers let a lone request skip a batch's commit.
    pub fn start(pool: AnyPool, workers: usize) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            tokio::spawn(worker(pool.clone(), rx.clone()));
        }
        Self { queue, pool }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Places one hold. A job refused only because of its batch neighbours (same sender or token)
    /// goes back into the queue: the neighbours' holds are committed by then, so the next batch
    /// decides it against the real state. Each batch decides at least the first job of every
    /// sender for good, so this ends.
    pub async fn authorize(&self, job: AuthJob) -> Result<AuthResult, sqlx::Error> {
        loop {
            let (tx, rx) = oneshot::channel();
            self.queue
                .send(Job::Authorize(job.clone(), tx))
                .map_err(|_| sqlx::Error::PoolClosed)?;
            match rx.await.map_err(|_| sqlx::Error::PoolClosed)? {
                Ok(AuthResult::Deferred) => continue,
                other => return other,
            }
        }
    }

    pub async fn resolve(&self, job: ResolveJob) -> Result<Option<TransferRow>, sqlx::Error> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Job::Resolve(job, tx))
            .map_err(|_| sqlx::Error::PoolClosed)?;
        rx.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

type AuthReply = (AuthJob, oneshot::Sender<Result<AuthResult, sqlx::Error>>);
type ResolveReply = (
    ResolveJob,
    oneshot::Sender<Result<Option<TransferRow>, sqlx::Error>>,
);

async fn worker(pool: AnyPool, rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    loop {
        let mut auths: Vec<AuthReply> = Vec::new();
        let mut resolves: Vec<ResolveReply> = Vec::new();
        let add = |job: Job, auths: &mut Vec<AuthReply>, resolves: &mut Vec<ResolveReply>| match job
        {
            Job::Authorize(a, tx) => auths.push((a, tx)),
            Job::Resolve(r, tx) => resolves.push((r, tx)),
        };
        let first = match rx.lock().await.recv().await {
            Some(job) => job,
            None => return,
        };
        add(first, &mut auths, &mut resolves);
        if let Ok(mut rx) = rx.try_lock() {
            while auths.len() + resolves.len() < MAX_BATCH {
                let Ok(job) = rx.try_recv() else { break };
                add(job, &mut auths, &mut resolves);
            }
        }
        tracing::trace!(
            authorizations = auths.len(),
            resolutions = resolves.len(),
            "batch"
        );
        run_and_reply(&pool, auths, resolves).await;
    }
}

/// Runs the authorizations and the resolutions of one batch side by side, on two connections:
/// they are independent statements, and both take row locks in the same global order.
async fn run_and_reply(pool: &AnyPool, auths: Vec<AuthReply>, resolves: Vec<ResolveReply>) {
    tokio::join!(
        reply_all(pool, auths, authorize_batch),
        reply_all(pool, resolves, resolve_batch)
    );
}

/// Runs `jobs` as one batch and answers each caller. A batch that fails for a non-transient reason
/// is split and each job retried alone, so one bad job never fails its neighbours.
async fn reply_all<J, R>(
    pool: &AnyPool,
    jobs: Vec<(J, oneshot::Sender<Result<R, sqlx::Error>>)>,
    run: impl AsyncFn(&AnyPool, &[&J]) -> Result<Vec<R>, sqlx::Error>,
) {
    if jobs.is_empty() {
        return;
    }
    let refs: Vec<&J> = jobs.iter().map(|(j, _)| j).collect();
    match retried(pool, &run, &refs).await {
        Ok(results) => {
            for ((_, tx), r) in jobs.into_iter().zip(results) {
                let _ = tx.send(Ok(r));
            }
        }
        Err(err) if jobs.len() == 1 => {
            if let Some((_, tx)) = jobs.into_iter().next() {
                let _ = tx.send(Err(err));
            }
        }
        Err(err) => {
            tracing::debug!(error = %err, "batch failed, retrying its jobs one by one");
            for (job, tx) in jobs {
                let r = retried(pool, &run, &[&job]).await.and_then(|mut r| {
                    r.pop()
                        .ok_or_else(|| sqlx::Error::Protocol("empty batch result".into()))
                });
                let _ = tx.send(r);
            }
        }
    }
}

/// Serialization failures and deadlocks retry the whole batch.
async fn retried<J, R>(
    pool: &AnyPool,
    run: &impl AsyncFn(&AnyPool, &[&J]) -> Result<Vec<R>, sqlx::Error>,
    jobs: &[&J],
) -> Result<Vec<R>, sqlx::Error> {
    let mut attempt = 0u32;
    loop {
        match run(pool, jobs).await {
            Err(err) if is_retryable(&err) && attempt < 8 => {
                attempt += 1;
                tracing::debug!(attempt, error = %err, "retrying batch after a transient database error");
                tokio::time::sleep(std::time::Duration::from_millis(2u64 << attempt.min(6))).await;
            }
            other => return other,
        }
    }
}

/// How often a batch of holds is run again for a constraint checked on a stale row version
/// (`authorize_batch`): each run starts after the resolutions the last one waited for.
const MAX_STALE_RERUNS: u32 = 8;

async fn authorize_batch(
    pool: &AnyPool,
    auths: &[&AuthJob],
) -> Result<Vec<AuthResult>, sqlx::Error> {
    let input: Vec<_> = auths
        .iter()
        .enumerate()
        .map(|(n, j)| {
            json!({"in_n": n, "in_id": j.id, "in_sender": j.sender_id, "in_recipient": j.recipient_id,
                   "in_token": j.token_id, "in_amount": j.amount, "in_currency": j.currency,
                   "in_app": j.app_name, "in_path": j.app_ep_path, "in_key": j.idempotency_key, "in_sender_email": j.sender_email,
                   "in_hash": j.request_hash, "in_now": j.now, "in_expires": j.expires_at,
                   "in_attempt": j.attempt_id})
        })
        .collect();
    let input = serde_json::Value::Array(input).to_string();
    let mut stale = 0;
    let rows = loop {
        let rows = match sqlx::query(AUTHORIZE_BATCH)
            .bind(&input)
            .fetch_all(pool)
            .await
        {
            // A key placed already (a replay): the batch again, skipping it, in one statement.
            Err(e) if is_unique_violation(&e) => {
                sqlx::query(AUTHORIZE_BATCH_SKIPPING)
                    .bind(&input)
                    .fetch_all(pool)
                    .await
            }
            other => other,
        };
        match rows {
            // A resolution of the same sender (or token) committed while the statement waited
            // for its lock: the checks read the locked row, fresh, but Postgres checks the
            // constraints of `held = t.held + x.amount` on the version the statement started
            // with, before it finds the newer one and computes again. That first check can fail
            // (a hold that fits only because of the resolution): nothing was written, and the
            // statement run again starts after the resolution. It was `INTERNAL` to the caller
            // (a model-based reviewer's finding, 2026-12-08).
            Err(e) if is_check_violation(&e) && stale < MAX_STALE_RERUNS => stale += 1,
            other => break other?,
        }
    };
    let mut results = vec![AuthResult::TokenRejected; auths.len()];
    for row in rows {
        let n: i32 = row.try_get("in_n")?;
        let token_ok: bool = row.try_get("token_ok")?;
        let funds_ok: bool = row.try_get("funds_ok")?;
        let alone_ok: bool = row.try_get("alone_ok")?;
        let token_alone_ok: bool = row.try_get("token_alone_ok")?;
        let placed: bool = row.try_get("placed")?;
        results[n as usize] = match (token_ok && funds_ok, alone_ok, token_alone_ok) {
            (true, _, _) if placed => AuthResult::Created,
            // Its key has a transfer already (a replay, or a duplicate committed meanwhile).
            (true, _, _) => AuthResult::DuplicateKey,
            // Refused only because of holds of the same sender or token earlier in this batch.
            (false, true, _) => AuthResult::Deferred,
            // Alone, the token would take it and the funds would not: the refusal it gets alone
            // (even when a neighbour's share of the token is what refused it here).
            (false, false, true) => AuthResult::InsufficientFunds,
            (false, false, false) => AuthResult::TokenRejected,
        };
    }
    Ok(results)
}

/// Adds what the batch placed (the holds its insert wrote, `placed`) to `held` of the rows of
/// `$table` they name in `$by`: the token's and the sender's update, one per row however many
/// holds it has.
macro_rules! held_by_batch {
    ($table:literal, $by:literal) => {
        concat!(
            "UPDATE ",
            $table,
            " t SET held = t.held + x.amount \
             FROM (SELECT ",
            $by,
            ", CAST(SUM(in_amount) AS BIGINT) AS amount FROM placed GROUP BY ",
            $by,
            ") x \
             WHERE t.id = x.",
            $by,
            " RETURNING t.id"
        )
    };
}

/// Places a batch of holds as one statement. Token and sender rows are locked first (in id order)
/// and the checks read the locked rows, so the updates that follow cannot fail half-way. Senders
/// are locked `FOR NO KEY UPDATE`, which leaves free the key-share lock a hold's insert takes on
/// its recipient (`LOCK_SENDERS` in budget_batch.rs says why).
///
/// Every row is locked through a `LATERAL` lookup of its primary key, one per distinct id in id
/// order (in this statement and in `RESOLVE_BATCH`, resolve_batch.rs). The statements run on
/// generic plans, which see `json_to_recordset` as 100 rows: written as `id IN (SELECT … FROM
/// input)`, the planner hashed the input and scanned the whole table (1,000 accounts: ~0.12 ms
/// each, a third of a lone hold's execution), and for transfers it scanned every pending hold
/// through `transfers_pending_expiry`. A parameterised lookup per id can only be a primary-key probe.
///
/// Several holds of one sender (or one token) are decided together: each job is checked against
/// the locked row plus the running total of the jobs before it in the batch (`SUM() OVER (PARTITION
/// BY … ORDER BY in_n)`), so the accepted holds of a sender never exceed its available balance and
/// those of a token never exceed its spend limit. The running totals count every earlier candidate,
/// even one refused later, so a job can be refused only because of a neighbour; such a job reports
/// `alone_ok` and is decided again in a later batch (see `Batcher::authorize`), so a refusal always
/// means "refused against the committed state", exactly as if the holds were placed one by one.
///
/// The hold commits asynchronously (`set_config('synchronous_commit', 'off', true)`: this
/// statement's transaction only): the caller does not wait for its WAL flush. A hold lost in a
/// Postgres crash moved no money, and the capture that follows commits synchronously, which flushes
/// the WAL up to and including the hold, so a captured hold is always durable (docs/design.md,
/// "Asynchronous hold commit").
///
/// A key with a recorded failure is refused at the token step; a key that already has a transfer
/// fails the insert on its unique constraint, and the batch is run again at once as
/// [`AUTHORIZE_BATCH_SKIPPING`], whose insert skips it (`ON CONFLICT … DO NOTHING` on
/// `transfers_idempotency`, migration 0003; the single and budgeted holds skip a taken key too):
/// it holds nothing and goes to the caller's replay lookup (`DuplicateKey`). Until 2026-12-07 a
/// failed batch was placed one hold at a time, one transaction each: one router's routine retry
/// after a lost answer cost up to 256 serial commits. (An explicit existence check here was
/// tried: with one hot recipient the planner probed it through `transfers_recipient` and scanned
/// all of that recipient's transfers per job.)
macro_rules! authorize_batch {
    ($on_conflict:literal, $placed:literal) => {
        concat!(
    "WITH input AS (
    SELECT * FROM json_to_recordset($1::json) AS i(in_n int, in_id text, in_sender bigint,
        in_recipient bigint, in_token text, in_amount bigint, in_currency text, in_app text, in_path text,
        in_key text, in_sender_email text, in_hash text, in_now bigint, in_expires bigint,
        in_attempt text)
    WHERE (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL
), lock_tokens AS (
    SELECT k.* FROM (SELECT DISTINCT in_token FROM input ORDER BY in_token) i
    CROSS JOIN LATERAL (SELECT id, revoked_at, expires_at, spend_limit, spent, held FROM tokens
                        WHERE id = i.in_token FOR UPDATE) k
), lock_accounts AS (
    SELECT a.* FROM (SELECT DISTINCT in_sender FROM input
                     WHERE (SELECT COUNT(*) FROM lock_tokens) >= 0 ORDER BY in_sender) i
    CROSS JOIN LATERAL (SELECT id, balance - held AS available FROM accounts
                        WHERE id = i.in_sender FOR NO KEY UPDATE) a
), token_usable AS (
    SELECT i.in_n, i.in_sender, i.in_amount, k.spend_limit - k.spent - k.held AS headroom,
        CAST(SUM(i.in_amount) OVER (PARTITION BY i.in_token ORDER BY i.in_n) AS BIGINT) AS running
    FROM input i JOIN lock_tokens k ON k.id = i.in_token
    WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > i.in_now)
      AND NOT EXISTS (SELECT 1 FROM authorize_failures f
                      WHERE f.recipient_id = i.in_recipient AND f.idempotency_key = i.in_key
                        AND f.sender_email = i.in_sender_email)
), token_ok AS (
    SELECT in_n, in_sender, in_amount FROM token_usable WHERE headroom IS NULL OR running <= headroom
), funds AS (
    SELECT t.in_n, a.available,
        CAST(SUM(t.in_amount) OVER (PARTITION BY t.in_sender ORDER BY t.in_n) AS BIGINT) AS running
    FROM token_ok t JOIN lock_accounts a ON a.id = t.in_sender
), funds_ok AS (
    SELECT in_n FROM funds WHERE running <= available
), alone_ok AS (
    SELECT u.in_n FROM token_usable u JOIN lock_accounts a ON a.id = u.in_sender
    WHERE (u.headroom IS NULL OR u.in_amount <= u.headroom) AND u.in_amount <= a.available
), ins AS (
    INSERT INTO transfers (id, sender_id, recipient_id, token_id, amount, currency, status, created_by,
        app_name, app_ep_path, idempotency_key, request_hash, created_at, expires_at, attempt_id)
    SELECT in_id, in_sender, in_recipient, in_token, in_amount, in_currency, 'PENDING', 'RECIPIENT',
        in_app, in_path, in_key, in_hash, in_now, in_expires, NULLIF(in_attempt, '')
    FROM input WHERE in_n IN (SELECT in_n FROM funds_ok)
    ",
    $on_conflict,
    "
    RETURNING id
), placed AS (
    SELECT i.in_n, i.in_token, i.in_sender, i.in_amount ",
    $placed,
    "
), tok AS (",
    held_by_batch!("tokens", "in_token"),
    "), snd AS (",
    held_by_batch!("accounts", "in_sender"),
    ")
SELECT i.in_n, i.in_n IN (SELECT in_n FROM token_ok) AS token_ok,
    i.in_n IN (SELECT in_n FROM funds_ok) AS funds_ok,
    i.in_n IN (SELECT in_n FROM placed) AS placed,
    i.in_n IN (SELECT in_n FROM alone_ok) AS alone_ok,
    i.in_n IN (SELECT in_n FROM token_usable WHERE headroom IS NULL OR in_amount <= headroom)
        AS token_alone_ok
FROM input i"
)
    };
}

/// Its insert writes every hold that passed the checks or fails (a placed key): what it placed is
/// what passed, read from the input, so the held sums do not wait for the insert's rows.
const AUTHORIZE_BATCH: &str = authorize_batch!(
    "",
    "FROM input i WHERE i.in_n IN (SELECT in_n FROM funds_ok)"
);

/// [`AUTHORIZE_BATCH`] skipping a key already placed: run when it failed on one. `ON CONFLICT`
/// on every batch cost the ledger 4 – 7 % of its pairs per second (Postgres's speculative
/// insertion: a probe of the key's index and a confirmation record per row), and replays are rare.
const AUTHORIZE_BATCH_SKIPPING: &str = authorize_batch!(
    "ON CONFLICT ON CONSTRAINT transfers_idempotency DO NOTHING",
    "FROM input i JOIN ins ON ins.id = i.in_id"
);
