//! Budgeted holds, decided together in one transaction (docs/limits.md, "Budgets in the ledger").
//!
//! A budget is decided after the sender's row is locked, so the budgeted holds of one sender are
//! decided one after the other whatever the process or replica. One transaction each made that a
//! queue of commits: a busy payer with budgets got a twentieth of the throughput it gets without
//! them, and many payers with budgets half (docs/benchmarks.md). Here the holds that wait together
//! are decided in one transaction: every token and sender row of the batch is locked first (tokens,
//! then accounts, each in id order: the order of every statement that locks both), the budgets'
//! use is read once per pair and then counted on in memory hold by hold, and one commit places
//! them all. Each hold is still checked against the same conditions of its token and funds, in the
//! same order, so a refused hold is refused exactly as it was alone, and keeps nothing: on Postgres
//! one statement per hold ([`PLACE`]) takes the amount only once every check passed; on SQLite the
//! updates run first and what a refused hold took is given back before the next is decided.
//!
//! Senders are split over [`LANES`] queues by id, each drained by a task of its own: a sender's
//! holds always meet in one lane (so a busy payer's holds share batches), two lanes never lock the
//! same sender or token (a token belongs to its sender), and a client that goes away never strands
//! the holds queued behind its own.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sqlx::{AnyConnection, AnyPool};
use tokio::sync::oneshot;

use super::authorize::{add, hold_args, hold_insert, insert_hold, take_hold, token_room};
use super::batch::{AuthJob, AuthResult};
use super::budget::{
    calendar_refusal, counted_from_day, record_limits, settle_month, token_refusal, token_used,
    tokens_used, HoldBudgets, DAY_MICROS,
};
use super::budget_days::{pair_uses, Pair, PairUse, Settled, UseQuery};
use super::json;

/// At most this many holds in one transaction, so that the senders' and tokens' rows are not held
/// for long against the captures that need them too.
const MAX_BATCH: usize = 32;

/// Queues, and so transactions, at once: senders are spread over them by id. Two keep both cores
/// busy while one lane waits on Postgres.
const LANES: i64 = 2;

type Answer = Result<AuthResult, sqlx::Error>;
type Waiting = (AuthJob, oneshot::Sender<Answer>);
type Queues = Arc<Mutex<HashMap<i64, VecDeque<Waiting>>>>;

pub(crate) struct BudgetedHolds {
    pool: AnyPool,
    /// Per lane, the holds waiting; a lane has an entry exactly while its drain task runs.
    queues: Queues,
}

impl BudgetedHolds {
    pub(crate) fn new(pool: AnyPool) -> Self {
        Self {
            pool,
            queues: Arc::default(),
        }
    }

    /// Queues the hold in its sender's lane and waits for its outcome.
    pub(crate) async fn place(&self, job: AuthJob) -> Answer {
        let (tx, rx) = oneshot::channel();
        let lane = job.sender_id.rem_euclid(LANES);
        let start = {
            let mut map = self
                .queues
                .lock()
                .map_err(|_| sqlx::Error::Protocol("budgeted hold queues poisoned".into()))?;
            let start = !map.contains_key(&lane);
            map.entry(lane).or_default().push_back((job, tx));
            start
        };
        if start {
            let drain = Drain {
                pool: self.pool.clone(),
                queues: self.queues.clone(),
                lane,
                done: false,
            };
            tokio::spawn(drain.run());
        }
        rx.await.unwrap_or_else(|_| {
            Err(sqlx::Error::Protocol(
                "the budgeted hold's batch ended without an outcome".into(),
            ))
        })
    }
}

/// The task that decides one lane's queued holds until none is left.
struct Drain {
    pool: AnyPool,
    queues: Queues,
    lane: i64,
    /// Set when this task removed the lane's entry itself (its queue was empty).
    done: bool,
}

impl Drain {
    async fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            let jobs: Vec<&AuthJob> = batch.iter().map(|(job, _)| job).collect();
            match decide(&self.pool, &jobs).await {
                Ok(results) => {
                    for ((_, reply), result) in batch.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                // A failed batch (a lost connection, a failed commit) is decided again hold by
                // hold, so one hold's error is never another's; a hold that did commit before
                // the failure finds its key taken and is replayed by the caller.
                Err(_) => {
                    for (job, reply) in batch {
                        let one = decide(&self.pool, &[&job]).await;
                        let _ = reply.send(one.map(|mut r| r.remove(0)));
                    }
                }
            }
        }
    }

    /// The next holds to decide together: the oldest [`MAX_BATCH`] waiting. `None` once the
    /// queue is empty, and then the entry is gone.
    fn next_batch(&mut self) -> Option<Vec<Waiting>> {
        let mut map = self.queues.lock().ok()?;
        let queue = map.get_mut(&self.lane)?;
        if queue.is_empty() {
            map.remove(&self.lane);
            self.done = true;
            return None;
        }
        let n = queue.len().min(MAX_BATCH);
        Some(queue.drain(..n).collect())
    }
}

impl Drop for Drain {
    /// However else the task ends (a panic), the lane's entry goes with it: the holds still
    /// queued get an error instead of waiting forever, and the next hold starts a new task. Once
    /// the task removed the entry itself, a new one may already belong to a new task.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut map) = self.queues.lock() {
            map.remove(&self.lane);
        }
    }
}

/// One batch's budgets: each pair's use and the token's, read once under the locks and counted on
/// as holds are placed. A pair's use is kept per UTC day of the holds' clock, so a batch that
/// spans midnight reads the new day afresh. Within a day, what a later hold of the batch sees is
/// at least what a fresh read would (a pending hold that expired, or a token's transfer that left
/// the 24 hours, in the milliseconds between them still counts): a batch may refuse a hold a
/// moment early, never admit one over a budget.
#[derive(Default)]
struct Counted {
    /// Per (sender, recipient) pair with a monthly budget in the batch, its settled days
    /// (`settle`, before the transaction).
    settled: HashMap<Pair, Settled>,
    /// Per (sender, recipient, UTC day).
    pairs: HashMap<(i64, i64, i64), PairUse>,
    /// Per token with a limit per 24 hours.
    tokens: HashMap<String, i64>,
}

/// Locks the batch's tokens, then its senders, each in id order, the order of every statement
/// that locks both (`batch.rs`): the holds' own updates then find their rows already locked, so
/// the holds of many senders in one transaction wait on other batches and replicas only as those
/// wait on each other, never in a cycle. Senders are locked `FOR NO KEY UPDATE`, all a balance
/// update needs: inserting a hold takes a key-share lock on its recipient (the foreign key), which
/// `FOR UPDATE` would block, so two accounts paying each other deadlocked (50 times in the test
/// `payers_paying_each_other_never_deadlock` before the change). (Should Postgres still break a deadlock, the batch fails
/// and is decided again hold by hold.) Postgres only: SQLite has one writer, and a transaction has
/// the database to itself.
const LOCK_TOKENS: &str = "SELECT k.id FROM (SELECT DISTINCT value AS id \
     FROM json_array_elements_text($1::json) ORDER BY 1) i \
     CROSS JOIN LATERAL (SELECT id FROM tokens WHERE id = i.id FOR UPDATE) k";
const LOCK_SENDERS: &str = "SELECT a.id FROM (SELECT DISTINCT CAST(value AS BIGINT) AS id \
     FROM json_array_elements_text($1::json) ORDER BY 1) i \
     CROSS JOIN LATERAL (SELECT id FROM accounts WHERE id = i.id FOR NO KEY UPDATE) a";

/// Decides `jobs` in one transaction; one result per job, in order.
async fn decide(pool: &AnyPool, jobs: &[&AuthJob]) -> Result<Vec<AuthResult>, sqlx::Error> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let now = first.now;
    let mut conn = pool.acquire().await?;
    let mut counted = Counted::default();
    // Settled days are written first, in their own statements (budget_days.rs), on the
    // connection the transaction then uses.
    let mut monthly: Vec<Pair> = Vec::new();
    for job in jobs.iter().filter(|j| j.budgets.per_month.is_some()) {
        if !monthly.contains(&(job.sender_id, job.recipient_id)) {
            monthly.push((job.sender_id, job.recipient_id));
        }
    }
    if !monthly.is_empty() {
        counted.settled = settle_month(&mut conn, &monthly, now).await?;
    }
    let postgres = super::is_postgres(&conn);
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if postgres {
        let tokens: Vec<&str> = jobs.iter().map(|j| j.token_id.as_str()).collect();
        let senders: Vec<i64> = jobs.iter().map(|j| j.sender_id).collect();
        for (sql, ids) in [(LOCK_TOKENS, json(&tokens)), (LOCK_SENDERS, json(&senders))] {
            sqlx::query(sql).bind(ids?).fetch_all(&mut *tx).await?;
        }
    }
    read_uses(&mut tx, jobs, &mut counted).await?;
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        results.push(place(&mut tx, jobs, job, &mut counted, postgres).await?);
    }
    // The budgets each pair's last placed hold carried, for the alerts (budget.rs).
    let mut recorded: Vec<(Pair, HoldBudgets)> = Vec::new();
    for (job, result) in jobs.iter().zip(&results).rev() {
        let pair = (job.sender_id, job.recipient_id);
        if matches!(result, AuthResult::Created)
            && !job.budgets.is_empty()
            && !recorded.iter().any(|(p, _)| *p == pair)
        {
            recorded.push((pair, job.budgets));
        }
    }
    record_limits(&mut tx, &recorded, now).await?;
    tx.commit().await?;
    Ok(results)
}

/// Decides one hold in one round trip (Postgres): whether its token has room and its sender the
/// funds, and, when both do and the budgets (decided before, `$14`) allow it, takes the amount
/// from both and inserts the pending transfer. The rows are the batch's own (locked first), so
/// the checks and the updates see the same values. Returns (token has room, funds suffice,
/// inserted); with both yes and nothing inserted, the key was taken and the caller gives back.
/// Binds: the transfer's `$1` … `$12` ([`hold_args`]: id, sender `$2`, recipient `$3`, token
/// `$4`, amount `$5`, …, key `$9`, now `$11`), sender email, budgets allow, the attempt.
const PLACE: &str = concat!(
    "WITH tok AS (SELECT 1 FROM tokens WHERE id = $4 AND ",
    token_room!("$5", "$11", "$3", "$9", "$13"),
    "), funds AS (SELECT 1 FROM accounts WHERE id = $2 AND balance - held >= $5\
     ), go AS (SELECT 1 WHERE $14 AND EXISTS (SELECT 1 FROM tok) AND EXISTS (SELECT 1 FROM funds)\
     ), held_token AS (UPDATE tokens SET held = held + $5 \
        WHERE id = $4 AND EXISTS (SELECT 1 FROM go) RETURNING id\
     ), held_funds AS (UPDATE accounts SET held = held + $5 \
        WHERE id = $2 AND EXISTS (SELECT 1 FROM go) RETURNING id\
     ), ins AS (",
    hold_insert!("SELECT", "$15"),
    " WHERE EXISTS (SELECT 1 FROM go) ON CONFLICT DO NOTHING RETURNING id) \
     SELECT EXISTS (SELECT 1 FROM tok), EXISTS (SELECT 1 FROM funds), EXISTS (SELECT 1 FROM ins)"
);

/// Places one hold of the batch, or refuses it with nothing left taken. The refusal is the one
/// the hold would get alone: its token first, then its funds, then its budgets.
async fn place(
    conn: &mut AnyConnection,
    jobs: &[&AuthJob],
    job: &AuthJob,
    counted: &mut Counted,
    postgres: bool,
) -> Result<AuthResult, sqlx::Error> {
    // Reads only (the budgets' use, under the batch's locks): deciding it first lets Postgres
    // take the hold in one statement, and changes nothing the token and funds checks read.
    let budget = budget_refusal(conn, jobs, job, counted).await?;
    if postgres {
        let mut args = hold_args(job)?;
        add(&mut args, &job.sender_email)?;
        add(&mut args, budget.is_none())?;
        add(&mut args, &job.attempt_id)?;
        let (token_ok, funds_ok, inserted): (bool, bool, bool) = sqlx::query_as_with(PLACE, args)
            .fetch_one(&mut *conn)
            .await?;
        if !token_ok {
            return Ok(AuthResult::TokenRejected);
        }
        if !funds_ok {
            return Ok(AuthResult::InsufficientFunds);
        }
        if let Some(refusal) = budget {
            return Ok(AuthResult::BudgetExceeded(refusal));
        }
        if !inserted {
            give_back(conn, job, true).await?;
            return Ok(AuthResult::DuplicateKey);
        }
    } else {
        match take_hold(conn, job).await? {
            Some(AuthResult::InsufficientFunds) => {
                give_back(conn, job, false).await?;
                return Ok(AuthResult::InsufficientFunds);
            }
            Some(refused) => return Ok(refused),
            None => {}
        }
        if let Some(refusal) = budget {
            give_back(conn, job, true).await?;
            return Ok(AuthResult::BudgetExceeded(refusal));
        }
        if !insert_hold(conn, job).await? {
            give_back(conn, job, true).await?;
            return Ok(AuthResult::DuplicateKey);
        }
    }
    for ((sender, recipient, _), used) in counted.pairs.iter_mut() {
        if (*sender, *recipient) == (job.sender_id, job.recipient_id) {
            used.today += job.amount;
            used.since += job.amount;
        }
    }
    if let Some(used) = counted.tokens.get_mut(&job.token_id) {
        *used += job.amount;
    }
    Ok(AuthResult::Created)
}

/// Reads, in one statement each, the budgets' use of every pair and every token with a limit per
/// 24 hours the batch's holds will ask for first: the pair's key (its first budgeted hold's UTC
/// day), from the earliest day any of the pair's holds needs, at that hold's clock; the token's at
/// its first hold's clock. That is what each hold's first need would read, since only the pair's
/// (the token's) own holds change its sum and each placed hold is counted on in memory (`place`);
/// a later day of the pair (a batch across midnight) is read when first needed.
async fn read_uses(
    conn: &mut AnyConnection,
    jobs: &[&AuthJob],
    counted: &mut Counted,
) -> Result<(), sqlx::Error> {
    let none = Settled::new();
    let mut keys = Vec::new();
    let mut queries = Vec::new();
    for job in jobs.iter().filter(|j| !j.budgets.is_empty()) {
        let pair = (job.sender_id, job.recipient_id);
        if keys.iter().any(|(s, r, _)| (*s, *r) == pair) {
            continue;
        }
        keys.push((pair.0, pair.1, job.now.div_euclid(DAY_MICROS)));
        queries.push(use_query(jobs, job, &counted.settled, &none));
    }
    if !queries.is_empty() {
        let uses = pair_uses(conn, &queries).await?;
        counted.pairs.extend(keys.into_iter().zip(uses));
    }
    let mut tokens: Vec<(&str, i64)> = Vec::new();
    for job in jobs.iter().filter(|j| j.token_limit_per_day.is_some()) {
        if !tokens.iter().any(|(k, _)| *k == job.token_id) {
            tokens.push((&job.token_id, job.now));
        }
    }
    if !tokens.is_empty() {
        let used = tokens_used(conn, &tokens).await?;
        let read = tokens.iter().map(|(k, _)| k.to_string()).zip(used);
        counted.tokens.extend(read);
    }
    Ok(())
}

/// What `job`'s pair has used, read as `job` needs it: from the earliest day any hold of the pair
/// in the batch needs (a batch with only daily budgets reads from today, where nothing is settled).
fn use_query<'a>(
    jobs: &[&AuthJob],
    job: &AuthJob,
    settled: &'a HashMap<Pair, Settled>,
    none: &'a Settled,
) -> UseQuery<'a> {
    let pair = (job.sender_id, job.recipient_id);
    let from_day = jobs
        .iter()
        .filter(|j| (j.sender_id, j.recipient_id) == pair)
        .map(|j| counted_from_day(j.budgets, job.now))
        .min()
        .unwrap_or_else(|| counted_from_day(job.budgets, job.now));
    UseQuery {
        pair,
        from_day,
        settled: settled.get(&pair).unwrap_or(none),
        now: job.now,
    }
}

/// The budget that refuses `job`, if any: the recipient's calendar budgets, then the token's own
/// limit per 24 hours. Each use is read on first need (the locks are held by then).
async fn budget_refusal(
    conn: &mut AnyConnection,
    jobs: &[&AuthJob],
    job: &AuthJob,
    counted: &mut Counted,
) -> Result<Option<super::BudgetRefusal>, sqlx::Error> {
    if !job.budgets.is_empty() {
        let pair = (job.sender_id, job.recipient_id);
        let key = (pair.0, pair.1, job.now.div_euclid(DAY_MICROS));
        let used = match counted.pairs.get(&key) {
            Some(used) => *used,
            None => {
                let none = Settled::new();
                let query = use_query(jobs, job, &counted.settled, &none);
                let used = pair_uses(conn, &[query]).await?;
                let used = used.first().copied().unwrap_or_default();
                *counted.pairs.entry(key).or_insert(used)
            }
        };
        if let Some(refusal) = calendar_refusal(job.budgets, used, job.amount, job.now) {
            return Ok(Some(refusal));
        }
    }
    let Some(limit) = job.token_limit_per_day else {
        return Ok(None);
    };
    let used = match counted.tokens.get(&job.token_id) {
        Some(used) => *used,
        None => {
            let used = token_used(conn, &job.token_id, job.now).await?;
            *counted.tokens.entry(job.token_id.clone()).or_insert(used)
        }
    };
    token_refusal(conn, &job.token_id, limit, used, job.amount, job.now).await
}

/// Undoes a refused hold's token update (and its funds update, once that was made).
async fn give_back(
    conn: &mut AnyConnection,
    job: &AuthJob,
    funds_too: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE tokens SET held = held - $1 WHERE id = $2")
        .bind(job.amount)
        .bind(&job.token_id)
        .execute(&mut *conn)
        .await?;
    if funds_too {
        sqlx::query("UPDATE accounts SET held = held - $1 WHERE id = $2")
            .bind(job.amount)
            .bind(job.sender_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
