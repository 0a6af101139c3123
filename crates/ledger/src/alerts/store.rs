//! The alerts tables (migration 0008). One SQL text for Postgres and SQLite.

use sqlx::{Any, AnyPool, Transaction};

use super::payload::{body, event_id, Fired};
use super::rules::{EventKind, Format};
use crate::error::Result;
use crate::store::{now_micros, retry_transient, AccountRow, Store, ACCOUNT_COLUMNS};

const ENDPOINT_COLUMNS: &str = "id, account_id, url, format, secret_sealed, \
    previous_secret_sealed, previous_secret_until, rules, rate_per_minute, failing_since, \
    disabled_at, created_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct EndpointRecord {
    pub id: String,
    pub account_id: i64,
    pub url: String,
    pub format: String,
    pub secret_sealed: String,
    #[sqlx(flatten)]
    pub previous_secret: PreviousSecret,
    pub rules: String,
    pub rate_per_minute: i64,
    pub failing_since: Option<i64>,
    pub disabled_at: Option<i64>,
    pub created_at: i64,
}

/// An event a worker holds the lease of.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ClaimedEvent {
    pub id: String,
    pub endpoint_id: String,
    pub payload: String,
    pub attempts: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub event_id: String,
    pub kind: String,
    pub attempt: i64,
    pub worker: String,
    pub started_at: i64,
    pub latency_ms: i64,
    pub status_code: Option<i64>,
    pub outcome: String,
    pub error: String,
    pub next_attempt_at: Option<i64>,
}

/// What one attempt ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Retry,
    GaveUp,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "DELIVERED",
            Outcome::Retry => "RETRY",
            Outcome::GaveUp => "GAVE_UP",
        }
    }
}

/// One attempt, as recorded in the delivery log.
#[derive(Debug, Clone)]
pub(crate) struct Attempt<'a> {
    pub event: &'a ClaimedEvent,
    pub worker: &'a str,
    pub started_at: i64,
    pub latency_ms: i64,
    pub status_code: Option<u16>,
    pub outcome: Outcome,
    pub error: &'a str,
    pub next_attempt_at: Option<i64>,
}

/// The secret a rotation replaced, sealed, and until when it still signs; both set during a
/// rotation's overlap, neither otherwise.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub(crate) struct PreviousSecret {
    #[sqlx(rename = "previous_secret_sealed")]
    pub sealed: Option<String>,
    #[sqlx(rename = "previous_secret_until")]
    pub until: Option<i64>,
}

/// How long a removed endpoint counts against its account's churn allowance
/// ([`insert_endpoint`]).
const CHURN_WINDOW_MICROS: i64 = 3_600 * 1_000_000;

/// Adds an endpoint unless its account has `max` already, or has had `2 × max` (those it has
/// and those it removed in the last hour): `false` then, nothing written. Removed endpoints are
/// kept (their deliveries are listed), so without the second bound one account added and
/// removed 250 a second, every row kept for good. One statement, so only adds racing each other
/// can pass the caps, by their number.
pub(crate) async fn insert_endpoint(pool: &AnyPool, e: &EndpointRecord, max: i64) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO alert_endpoints (id, account_id, url, format, secret_sealed, rules, \
         rate_per_minute, created_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
         WHERE (SELECT COUNT(*) FROM alert_endpoints \
                WHERE account_id = $2 AND removed_at IS NULL) < $9 \
           AND (SELECT COUNT(*) FROM alert_endpoints \
                WHERE account_id = $2 AND (removed_at IS NULL OR removed_at > $10)) < 2 * $9",
    )
    .bind(&e.id)
    .bind(e.account_id)
    .bind(&e.url)
    .bind(&e.format)
    .bind(&e.secret_sealed)
    .bind(&e.rules)
    .bind(e.rate_per_minute)
    .bind(e.created_at)
    .bind(max)
    .bind(e.created_at - CHURN_WINDOW_MICROS)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Endpoints not removed: of one account, or (None) of every account.
pub(crate) async fn endpoints(
    pool: &AnyPool,
    account_id: Option<i64>,
) -> Result<Vec<EndpointRecord>> {
    let sql = format!(
        "SELECT {ENDPOINT_COLUMNS} FROM alert_endpoints WHERE removed_at IS NULL \
         AND ($1 IS NULL OR account_id = $1) ORDER BY created_at, id"
    );
    Ok(sqlx::query_as(&sql)
        .bind(account_id)
        .fetch_all(pool)
        .await?)
}

pub(crate) async fn endpoint(pool: &AnyPool, id: &str) -> Result<Option<EndpointRecord>> {
    let sql = format!(
        "SELECT {ENDPOINT_COLUMNS} FROM alert_endpoints WHERE id = $1 AND removed_at IS NULL"
    );
    Ok(sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?)
}

/// Removes an endpoint; its undelivered events are given up with it.
///
/// Events first, then the endpoint: the order `record_attempt` takes them in. The other order
/// deadlocked with a delivery being recorded, and the dashboard's remove failed with "database
/// busy" (seen once in `dashboard_postgres`). A deadlock or serialization failure from anything
/// else is retried here, as everywhere in the ledger.
pub(crate) async fn remove_endpoint(pool: &AnyPool, id: &str, now: i64) -> Result<()> {
    retry_transient(|| async {
        let mut tx = pool.begin().await?;
        sqlx::query(
            "UPDATE alert_events SET status = 'FAILED', finished_at = $1, lease_owner = NULL, \
             lease_until = NULL WHERE endpoint_id = $2 AND status = 'PENDING'",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE alert_endpoints SET removed_at = $1 WHERE id = $2 AND removed_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    })
    .await
}

/// Replaces the signing secret `current` (as read) with `sealed`, keeping `current` as the previous
/// one until `previous_until` (`None`: no previous secret), only if `current` is still the current
/// one: two rotations of one endpoint at once would otherwise both keep the same old secret as the
/// previous one, and the first rotation's new secret would sign nothing while its caller believed
/// it current. `false` when another rotation got there first (nothing changed).
pub(crate) async fn rotate_secret(
    pool: &AnyPool,
    id: &str,
    sealed: &str,
    current: &str,
    previous_until: Option<i64>,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE alert_endpoints SET secret_sealed = $1, \
         previous_secret_sealed = CASE WHEN $3 IS NULL THEN NULL ELSE $2 END, \
         previous_secret_until = $3 WHERE id = $4 AND secret_sealed = $2",
    )
    .bind(sealed)
    .bind(current)
    .bind(previous_until)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Appends an event for `fired` to the outbox inside the caller's transaction, in the endpoint's
/// `format`; returns the event's id. `now` is the time the rule was evaluated as of (its payload's
/// time); the event is due at once, by the wall clock.
pub(crate) async fn insert_event(
    tx: &mut Transaction<'_, Any>,
    endpoint_id: &str,
    format: Format,
    fired: &Fired,
    now: i64,
) -> Result<String> {
    let id = event_id();
    let payload = body(format, &id, fired, now);
    sqlx::query(
        "INSERT INTO alert_events (id, endpoint_id, kind, payload, status, next_attempt_at, \
         created_at) VALUES ($1, $2, $3, $4, 'PENDING', $5, $6)",
    )
    .bind(&id)
    .bind(endpoint_id)
    .bind(fired.kind.as_str())
    .bind(payload)
    .bind(now_micros().min(now))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// The stored level of a rule's subject (None: never evaluated, i.e. armed).
pub(crate) async fn level(
    pool: &AnyPool,
    endpoint_id: &str,
    rule_index: i64,
    subject: &str,
) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT level FROM alert_state WHERE endpoint_id = $1 AND rule_index = $2 AND subject = $3",
    )
    .bind(endpoint_id)
    .bind(rule_index)
    .bind(subject)
    .fetch_optional(pool)
    .await?)
}

/// Moves a rule's level from `old` to `new` only if nobody moved it first (another replica's
/// evaluator); true when this transaction made the move. The caller writes the fired events in
/// the same transaction and commits.
pub(crate) async fn compare_and_set_level(
    tx: &mut Transaction<'_, Any>,
    key: (&str, i64, &str),
    old: Option<i64>,
    new: i64,
    now: i64,
) -> Result<bool> {
    let (endpoint_id, rule_index, subject) = key;
    let result =
        match old {
            None => sqlx::query(
                "INSERT INTO alert_state (endpoint_id, rule_index, subject, level, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(endpoint_id)
            .bind(rule_index)
            .bind(subject)
            .bind(new)
            .bind(now)
            .execute(&mut **tx)
            .await?,
            Some(old) => {
                sqlx::query(
                    "UPDATE alert_state SET level = $1, updated_at = $2 WHERE endpoint_id = $3 \
                 AND rule_index = $4 AND subject = $5 AND level = $6",
                )
                .bind(new)
                .bind(now)
                .bind(endpoint_id)
                .bind(rule_index)
                .bind(subject)
                .bind(old)
                .execute(&mut **tx)
                .await?
            }
        };
    Ok(result.rows_affected() == 1)
}

/// Most events of one account in flight at once (leased, not yet recorded), over every worker
/// of every replica (replicas that claim at the same moment may each add one). An account's slow
/// or hanging endpoints then hold at most this many send slots, and the other accounts' events
/// go out meanwhile: claimed in due order alone, one account's burst of test events at an
/// endpoint that hangs held every slot, and every other account's alerts waited behind it.
pub(crate) const ACCOUNT_IN_FLIGHT: i64 = 2;
/// Due events looked at per claim, from which each account's share is picked (the accounts with
/// no room left are not among them).
const CLAIM_CANDIDATES: i64 = 256;

/// Leases up to `limit` due events of enabled endpoints to `worker` until `lease_until`, at
/// most [`ACCOUNT_IN_FLIGHT`] in flight per account, oldest due first. The lease also moves the
/// event's due time to its end: an attempt whose record fails (the database away) is retried
/// then, behind the events due meanwhile, not first in every claim until it records.
pub(crate) async fn claim_due(
    store: &Store,
    worker: &str,
    now: i64,
    lease_until: i64,
    limit: i64,
) -> Result<Vec<ClaimedEvent>> {
    // Each account's share is taken in the statement (its oldest due events, as many as it has
    // room for): read by due time alone, 256 events of one account's backlog filled every page,
    // and no other account's alert was a candidate until that backlog drained.
    let candidates: Vec<(String, i64, i64)> = sqlx::query_as(
        "WITH busy AS (SELECT q.account_id, COUNT(*) AS n FROM alert_events x \
           JOIN alert_endpoints q ON q.id = x.endpoint_id \
           WHERE x.status = 'PENDING' AND x.lease_until >= $1 GROUP BY q.account_id), \
         due AS (SELECT e.id, p.account_id, COALESCE(b.n, 0) AS busy, e.next_attempt_at, \
             ROW_NUMBER() OVER (PARTITION BY p.account_id ORDER BY e.next_attempt_at, e.id) AS nth \
           FROM alert_events e \
           JOIN alert_endpoints p ON p.id = e.endpoint_id \
           LEFT JOIN busy b ON b.account_id = p.account_id \
           WHERE e.status = 'PENDING' AND e.next_attempt_at <= $1 \
             AND (e.lease_until IS NULL OR e.lease_until < $1) \
             AND p.disabled_at IS NULL AND p.removed_at IS NULL AND COALESCE(b.n, 0) < $2) \
         SELECT id, account_id, busy FROM due WHERE nth <= $2 - busy \
         ORDER BY next_attempt_at LIMIT $3",
    )
    .bind(now)
    .bind(ACCOUNT_IN_FLIGHT)
    .bind(CLAIM_CANDIDATES)
    .fetch_all(store.pool())
    .await?;
    let mut taken: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    let mut ids = Vec::new();
    for (id, account, busy) in candidates {
        let n = taken.entry(account).or_insert(busy);
        if *n < ACCOUNT_IN_FLIGHT && (ids.len() as i64) < limit {
            *n += 1;
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // Leased only if still free: a worker of another replica may have taken one since it was
    // read (on Postgres this re-checks the row after waiting for that worker's lock).
    let marks: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 4)).collect();
    let sql = format!(
        "UPDATE alert_events SET lease_owner = $1, lease_until = $2, next_attempt_at = $2 \
         WHERE id IN ({}) AND status = 'PENDING' AND (lease_until IS NULL OR lease_until < $3) \
         RETURNING id, endpoint_id, payload, attempts",
        marks.join(", ")
    );
    let mut q = sqlx::query_as(&sql)
        .bind(worker)
        .bind(lease_until)
        .bind(now);
    for id in &ids {
        q = q.bind(id);
    }
    Ok(q.fetch_all(store.pool()).await?)
}

/// Gives an event back for later without counting an attempt (the endpoint's rate cap).
pub(crate) async fn postpone(
    pool: &AnyPool,
    event_id: &str,
    worker: &str,
    until: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE alert_events SET next_attempt_at = $1, lease_owner = NULL, lease_until = NULL \
         WHERE id = $2 AND lease_owner = $3",
    )
    .bind(until)
    .bind(event_id)
    .bind(worker)
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives the unclaimed events of an endpoint due before `until` back for then, without counting
/// an attempt (its rate cap is reached; events another worker holds are left alone). Returns how
/// many.
pub(crate) async fn postpone_backlog(
    pool: &AnyPool,
    endpoint_id: &str,
    now: i64,
    until: i64,
) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE alert_events SET next_attempt_at = $1 \
         WHERE endpoint_id = $2 AND status = 'PENDING' AND next_attempt_at < $1 \
           AND (lease_until IS NULL OR lease_until < $3)",
    )
    .bind(until)
    .bind(endpoint_id)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// An endpoint's attempts since `since`, and when the oldest of them started.
/// The attempts at `endpoint_id` since `since`, and the oldest of them: those recorded, and those
/// in flight, leased by an earlier claim (its lease ends before `claim_lease`, this claim's) and
/// not yet recorded. A send in flight used to count for nothing, so a claim made while an
/// earlier one's sends were still waiting for their answers passed the endpoint's cap.
pub(crate) async fn attempts_since(
    pool: &AnyPool,
    endpoint_id: &str,
    since: i64,
    (now, claim_lease): (i64, i64),
) -> Result<(i64, Option<i64>)> {
    let (recorded, oldest, in_flight): (i64, Option<i64>, i64) = sqlx::query_as(
        "SELECT COUNT(*), MIN(started_at), \
                (SELECT COUNT(*) FROM alert_events WHERE endpoint_id = $1 AND status = 'PENDING' \
                   AND lease_owner IS NOT NULL AND lease_until > $3 AND lease_until < $4) \
         FROM alert_deliveries WHERE endpoint_id = $1 AND started_at >= $2",
    )
    .bind(endpoint_id)
    .bind(since)
    .bind(now)
    .bind(claim_lease)
    .fetch_one(pool)
    .await?;
    Ok((recorded + in_flight, oldest))
}

/// Records an attempt and moves the event on, only while `worker` still holds its lease; returns
/// the endpoint's `failing_since` after the attempt (None when it is healthy). A failure after
/// `quiet_micros` without any attempt at the endpoint starts its failure clock again: it was not
/// seen failing meanwhile (no events, the ledger down), and one failed attempt long ago and one
/// blip now used to disable it at once.
pub(crate) async fn record_attempt(
    pool: &AnyPool,
    a: &Attempt<'_>,
    now: i64,
    quiet_micros: i64,
) -> Result<Option<i64>> {
    let mut tx = pool.begin().await?;
    let status = match a.outcome {
        Outcome::Delivered => "DELIVERED",
        Outcome::Retry => "PENDING",
        Outcome::GaveUp => "FAILED",
    };
    let finished = (a.outcome != Outcome::Retry).then_some(now);
    let moved = sqlx::query(
        "UPDATE alert_events SET status = $1, attempts = attempts + 1, next_attempt_at = $2, \
         finished_at = $3, lease_owner = NULL, lease_until = NULL \
         WHERE id = $4 AND lease_owner = $5 AND status = 'PENDING'",
    )
    .bind(status)
    .bind(a.next_attempt_at.unwrap_or(now))
    .bind(finished)
    .bind(&a.event.id)
    .bind(a.worker)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() != 1 {
        // The lease ran out and another worker owns the event now: its attempt is the record.
        tracing::warn!(event = %a.event.id, "alert event lease lost before the attempt was recorded");
    }
    sqlx::query(
        "INSERT INTO alert_deliveries (event_id, endpoint_id, attempt, worker, started_at, \
         latency_ms, status_code, outcome, error, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&a.event.id)
    .bind(&a.event.endpoint_id)
    .bind(a.event.attempts + 1)
    .bind(a.worker)
    .bind(a.started_at)
    .bind(a.latency_ms)
    .bind(a.status_code.map(i64::from))
    .bind(a.outcome.as_str())
    .bind(printable(a.error))
    .bind(a.next_attempt_at)
    .execute(&mut *tx)
    .await?;
    let healthy = a.outcome == Outcome::Delivered;
    sqlx::query(
        "UPDATE alert_endpoints SET failing_since = CASE WHEN $1 THEN NULL \
         WHEN failing_since IS NULL OR NOT EXISTS (SELECT 1 FROM alert_deliveries d \
              WHERE d.endpoint_id = $3 AND d.started_at < $2 AND d.started_at >= $2 - $4) \
           THEN $2 \
         ELSE failing_since END WHERE id = $3",
    )
    .bind(healthy)
    .bind(a.started_at)
    .bind(&a.event.endpoint_id)
    .bind(quiet_micros)
    .execute(&mut *tx)
    .await?;
    let failing_since: Option<i64> =
        sqlx::query_scalar("SELECT failing_since FROM alert_endpoints WHERE id = $1")
            .bind(&a.event.endpoint_id)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(failing_since)
}

/// The account an endpoint belongs to.
pub(crate) async fn account(pool: &AnyPool, id: i64) -> Result<AccountRow> {
    let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = $1");
    Ok(sqlx::query_as(&sql).bind(id).fetch_one(pool).await?)
}

/// Enables an endpoint disabled after failing: the failure clock starts again (else the next
/// failure would disable it at once) and its pending events are due now. Events first, then the
/// endpoint, the order `record_attempt` takes them in.
pub(crate) async fn enable(pool: &AnyPool, id: &str, now: i64) -> Result<()> {
    retry_transient(|| async {
        let mut tx = pool.begin().await?;
        sqlx::query(
            "UPDATE alert_events SET next_attempt_at = $1 \
             WHERE endpoint_id = $2 AND status = 'PENDING' AND next_attempt_at > $1",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE alert_endpoints SET disabled_at = NULL, failing_since = NULL \
             WHERE id = $1 AND removed_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    })
    .await
}

/// Marks an endpoint disabled, once; true when this call disabled it.
pub(crate) async fn disable(tx: &mut Transaction<'_, Any>, id: &str, now: i64) -> Result<bool> {
    let result = sqlx::query(
        "UPDATE alert_endpoints SET disabled_at = $1 WHERE id = $2 AND disabled_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// The delivery log of an endpoint, newest first.
pub(crate) async fn deliveries(
    pool: &AnyPool,
    endpoint_id: &str,
    limit: i64,
) -> Result<Vec<DeliveryRow>> {
    Ok(sqlx::query_as(
        "SELECT d.event_id, e.kind, d.attempt, d.worker, d.started_at, d.latency_ms, \
         d.status_code, d.outcome, d.error, d.next_attempt_at \
         FROM alert_deliveries d JOIN alert_events e ON e.id = d.event_id \
         WHERE d.endpoint_id = $1 ORDER BY d.id DESC LIMIT $2",
    )
    .bind(endpoint_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The endpoint's test events not yet delivered nor given up, its row locked first so that two
/// tests at once count each other (SQLite's writes are one at a time already).
pub(crate) async fn lock_pending_tests(
    tx: &mut Transaction<'_, Any>,
    endpoint_id: &str,
) -> Result<i64> {
    sqlx::query("UPDATE alert_endpoints SET id = id WHERE id = $1")
        .bind(endpoint_id)
        .execute(&mut **tx)
        .await?;
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM alert_events WHERE endpoint_id = $1 AND kind = $2 \
         AND status = 'PENDING'",
    )
    .bind(endpoint_id)
    .bind(EventKind::Test.as_str())
    .fetch_one(&mut **tx)
    .await?)
}

/// Events of an endpoint not yet delivered nor given up.
pub(crate) async fn pending_events<'c, E>(conn: E, endpoint_id: &str) -> Result<i64>
where
    E: sqlx::Executor<'c, Database = Any>,
{
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM alert_events WHERE endpoint_id = $1 AND status = 'PENDING'",
    )
    .bind(endpoint_id)
    .fetch_one(conn)
    .await?)
}

/// `text` without control characters (each becomes a space): an error text holds what an
/// endpoint answered, and Postgres refuses a NUL in `TEXT`. The attempt's whole record failed
/// with it, so the event was claimed and sent again and again, first in every claim, with no
/// record of any attempt.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(crate) use super::purge::purge_finished;
