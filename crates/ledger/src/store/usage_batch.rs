//! Group commit for usage rows without money (free requests, refusals, failures).
//!
//! Each of these rows used to cost one commit, which made the ledger the bottleneck of a free
//! service (one WAL flush per request). Rows are queued and a worker writes whatever is queued as
//! one transaction (two workers on Postgres, so one batch inserts while the other commits): on Postgres a single multi-row `INSERT … SELECT FROM json_to_recordset`, on
//! SQLite one transaction of single-row inserts (SQLite's cost is the commit's fsync, not the
//! statements). A caller is answered only after its batch committed, so a row acknowledged to the
//! router is durable; a lone row goes out at once and under load batches grow. The rows a batch
//! inserted reach the usage rollups through `rollup_fold.rs` in the same transaction: queued by the
//! insert statement itself on Postgres, upserted (one row per distinct key and grain) on SQLite.
//!
//! The queue is separate from the money batcher (`batch.rs`): a flood of refusals fills usage
//! batches, never the batches of holds and captures.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::rollup::{self, RollupInput};
use super::rollup_fold::{add_to_rollups, QUEUE_INSERTED};
use super::usage::{insert_usage_row, is_refused, row_key, UsageLink, UsageWrite, FREE_REQUEST};
use super::{Backend, Micros, UsageInput};
use crate::error::is_retryable;

/// Rows per statement: large enough to amortise the commit and the rollup upsert (whose cost
/// grows with the distinct keys of a batch, not its rows), small enough to keep the JSON parameter
/// and the statement's lock time modest.
const MAX_BATCH: usize = 4_000;

/// Batches written at once on Postgres: while one batch waits for its commit (the WAL flush), the
/// next one is already inserting, on another core. Batches lock rollup rows in key order, so two
/// of them meet on a rollup row by one waiting for the other's commit, never by a deadlock. SQLite
/// has one writer.
const PG_WORKERS: usize = 2;

/// One usage row to write. `id` and `now` are fixed by the caller, so a retried batch is identical.
#[derive(Debug, Clone)]
pub(crate) struct UsageJob {
    pub id: String,
    pub recipient_id: i64,
    pub now: i64,
    pub usage: UsageInput,
}

type Reply = oneshot::Sender<Result<bool, sqlx::Error>>;

pub(crate) struct UsageWriter {
    queue: mpsc::UnboundedSender<(UsageJob, Reply)>,
}

impl UsageWriter {
    pub fn start(pool: AnyPool, backend: Backend) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let workers = match backend {
            Backend::Postgres => PG_WORKERS,
            Backend::Sqlite => 1,
        };
        for _ in 0..workers {
            tokio::spawn(worker(pool.clone(), backend, rx.clone()));
        }
        Self { queue }
    }

    /// Writes one row; `Ok(false)` when a row with its request id already existed (left as is).
    pub async fn write(&self, job: UsageJob) -> Result<bool, sqlx::Error> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((job, tx))
            .map_err(|_| sqlx::Error::PoolClosed)?;
        rx.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

type Queue = Arc<Mutex<mpsc::UnboundedReceiver<(UsageJob, Reply)>>>;

/// Takes whatever is queued (up to [`MAX_BATCH`]), waiting for a first row when nothing is.
async fn next_batch(rx: &Queue) -> Option<Vec<(UsageJob, Reply)>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut jobs = vec![first];
    while jobs.len() < MAX_BATCH {
        let Ok(job) = rx.try_recv() else { break };
        jobs.push(job);
    }
    Some(jobs)
}

async fn worker(pool: AnyPool, backend: Backend, rx: Queue) {
    while let Some(jobs) = next_batch(&rx).await {
        let rows: Vec<&UsageJob> = jobs.iter().map(|(j, _)| j).collect();
        let started = std::time::Instant::now();
        let written = write_retried(&pool, backend, &rows).await;
        tracing::trace!(rows = jobs.len(), elapsed = ?started.elapsed(), "usage batch");
        match written {
            Ok(inserted) => {
                for (job, tx) in jobs {
                    let _ = tx.send(Ok(inserted.contains(&job.id)));
                }
            }
            // One bad row must not fail its neighbours: write each alone.
            Err(err) if jobs.len() > 1 => {
                tracing::debug!(error = %err, "usage batch failed, writing its rows one by one");
                for (job, tx) in jobs {
                    let r = write_retried(&pool, backend, &[&job]).await;
                    let _ = tx.send(r.map(|ids| ids.contains(&job.id)));
                }
            }
            Err(err) => {
                if let Some((_, tx)) = jobs.into_iter().next() {
                    let _ = tx.send(Err(err));
                }
            }
        }
    }
}

async fn write_retried(
    pool: &AnyPool,
    backend: Backend,
    jobs: &[&UsageJob],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut attempt = 0u32;
    loop {
        match write_batch(pool, backend, jobs).await {
            Err(err) if is_retryable(&err) && attempt < 8 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2u64 << attempt.min(6))).await;
            }
            other => return other,
        }
    }
}

/// Writes the batch and, atomically with it, hands the rows actually inserted to the rollups
/// (`rollup_fold.rs`). Returns the ids of the rows inserted (a row whose
/// request id was already recorded is skipped, and not counted).
async fn write_batch(
    pool: &AnyPool,
    backend: Backend,
    jobs: &[&UsageJob],
) -> Result<HashSet<String>, sqlx::Error> {
    match backend {
        // One statement inserts the rows and queues them for the rollups: atomic on its own, so
        // it runs without BEGIN and COMMIT round trips (as the batched resolve does).
        Backend::Postgres => insert_postgres(&mut *pool.acquire().await?, jobs).await,
        Backend::Sqlite => {
            let mut tx = pool.begin().await?;
            let inserted = insert_sqlite(&mut tx, jobs).await?;
            let writes: Vec<UsageWrite<'_>> = jobs
                .iter()
                .filter(|j| inserted.contains(&j.id))
                .map(|j| free_write(j))
                .collect();
            let rollups: Vec<RollupInput<'_>> = writes.iter().map(UsageWrite::rollup).collect();
            add_to_rollups(&mut tx, &rollups).await?;
            tx.commit().await?;
            Ok(inserted)
        }
    }
}

/// A job as a usage row without money.
fn free_write(j: &UsageJob) -> UsageWrite<'_> {
    UsageWrite {
        id: &j.id,
        recipient_id: j.recipient_id,
        link: UsageLink::None,
        cost: Micros::ZERO,
        held: Micros::ZERO,
        usage: &j.usage,
        now: j.now,
    }
}

/// One row of [`USAGE_BATCH`]'s JSON parameter (field names are its record's columns).
#[derive(serde::Serialize)]
struct PgRow<'a> {
    id: &'a str,
    recipient: i64,
    request_id: &'a str,
    app: &'a str,
    endpoint: &'a str,
    user_email: &'a str,
    model: &'a str,
    pt: i64,
    ct: i64,
    tt: i64,
    status: &'a str,
    lat: i64,
    ulat: i64,
    now: i64,
    refused: bool,
    ttft: Option<i64>,
    row_key: Option<&'a str>,
    reason: &'a str,
}

async fn insert_postgres(
    conn: &mut AnyConnection,
    jobs: &[&UsageJob],
) -> Result<HashSet<String>, sqlx::Error> {
    let input: Vec<PgRow<'_>> = jobs
        .iter()
        .map(|j| {
            let u = &j.usage;
            PgRow {
                id: &j.id,
                recipient: j.recipient_id,
                request_id: &u.request_id,
                app: &u.app_name,
                endpoint: &u.endpoint,
                user_email: &u.user_email,
                model: &u.model,
                pt: u.prompt_tokens,
                ct: u.completion_tokens,
                tt: u.total_tokens,
                status: &u.status,
                lat: u.latency_ms,
                ulat: u.upstream_latency_ms,
                now: j.now,
                refused: is_refused(u),
                ttft: u.ttft_ms,
                row_key: row_key(u),
                reason: &u.reason,
            }
        })
        .collect();
    let input = super::json(&input)?;
    let rows = sqlx::query(&USAGE_BATCH)
        .bind(input)
        .bind(rollup::enabled())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| r.try_get::<String, _>("id")).collect()
}

async fn insert_sqlite(
    conn: &mut AnyConnection,
    jobs: &[&UsageJob],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut inserted = HashSet::new();
    for j in jobs {
        if insert_usage_row(conn, &free_write(j)).await? {
            inserted.insert(j.id.clone());
        }
    }
    Ok(inserted)
}

/// Rows without money (cost 0, no transfer). Two rows of one request id (or row key) in a batch:
/// the first is inserted, the second skipped by `DO NOTHING` like any other duplicate. The inserted rows are
/// queued for the rollups by the same statement when `$2` (`rollup_fold.rs`).
///
/// Rows without a key and keyed rows (refusals, free requests' attempts: `row_key`) go in by one
/// insert each, each naming the one unique index it can meet: a conflict clause without a target
/// probes every unique index of every row (the primary key too), which cost `bench usage` a tenth
/// to a fifth of its rows per second.
static USAGE_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let columns = "id, recipient_id, request_id, transfer_id, app_name, endpoint, user_email, \
        model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, \
        upstream_latency_ms, created_at, refused, ttft_ms, row_key, reason";
    let values = "id, recipient, request_id, NULL, app, endpoint, user_email, model, pt, ct, tt, \
        0, status, lat, ulat, now, refused, ttft, row_key, reason";
    format!(
        "\
WITH i AS (
    SELECT * FROM json_to_recordset($1::json) AS i(id text, recipient bigint, request_id text,
        app text, endpoint text, user_email text, model text, pt bigint, ct bigint, tt bigint,
        status text, lat bigint, ulat bigint, now bigint, refused boolean, ttft bigint,
        row_key text, reason text)
), plain AS (
    INSERT INTO usage_records ({columns})
    SELECT {values} FROM i WHERE row_key IS NULL
    ON CONFLICT {FREE_REQUEST} DO NOTHING
    RETURNING id
), keyed AS (
    INSERT INTO usage_records ({columns})
    SELECT {values} FROM i WHERE row_key IS NOT NULL
    ON CONFLICT (recipient_id, row_key) WHERE row_key IS NOT NULL DO NOTHING
    RETURNING id
), u AS (
    SELECT id FROM plain UNION ALL SELECT id FROM keyed
), q AS (
    {QUEUE_INSERTED}
)
SELECT id FROM u"
    )
});
