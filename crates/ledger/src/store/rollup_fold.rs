//! How usage rows reach the rollups (docs/analytics.md, "Rollups").
//!
//! Postgres: a writing statement queues the ids of the usage rows it inserted as one entry of
//! `usage_rollup_queue` (an array; one entry per batch, not per row: migration 0021), in the rows'
//! own transaction, and a folder moves queued rows into the rollups: it deletes a page of the
//! queue and upserts those rows' sums in one transaction, so every row is counted exactly once
//! whatever crashes when. The folder runs every [`FOLD_EVERY`] in each ledger process
//! and before every analytics answer, one at a time across processes (an advisory lock), so
//! answers are exact. Upserting the ~330-column rollup rows in the capture's transaction instead
//! cost ~1 ms of executor time per table and batch while that transaction held the payers'
//! account rows: a third of the paid throughput (migration 0019, docs/benchmarks.md).
//!
//! SQLite: writers upsert the rollups in the row's transaction (`rollup::upsert_rollups`); there is
//! one writer at a time and its cost is the commit, not the statement. There is no queue.

use std::time::Duration;

use sqlx::{AnyConnection, AnyPool};
use tokio::sync::oneshot;

use super::rollup::{enabled, RollupInput};
use super::rollup_upsert::{upsert_rollups, TABLES};
use super::{is_postgres, Backend, Store, UsageInput};
use crate::error::Result;

/// How often each ledger process folds the queue.
pub const FOLD_EVERY: Duration = Duration::from_secs(5);

/// Queued rows per fold transaction: whole queue entries are taken until at least this many.
const FOLD_PAGE: i64 = 10_000;

/// Rows per page of a rebuild.
const REBUILD_PAGE: i64 = 1_000;

/// The advisory lock key that makes folds (and rebuilds) take turns across ledger processes.
const FOLD_LOCK: i64 = 0x5359_4654_524f_4c4c; // "SYFTROLL"

/// The columns of a usage row as the rollups count it, with the hold it settled (`u` the row,
/// `t` and `h` its local or hosted transfer).
const RAW_COLUMNS: &str = "u.id, u.recipient_id, u.created_at, u.cost, \
     COALESCE(t.amount, h.amount, u.cost) AS held, u.request_id, u.app_name, u.endpoint, \
     u.user_email, u.model, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.status, \
     u.latency_ms, u.upstream_latency_ms, u.ttft_ms";

const TRANSFER_JOINS: &str = "LEFT JOIN transfers t ON t.id = u.transfer_id \
     LEFT JOIN hosted_transfers h ON h.id = u.hosted_transfer_id";

/// The batched writers' last step, in their own statement: queue the usage rows the CTE `u`
/// inserted (its `id`s) as one entry, when `$2` (the rollups are on) and `u` inserted any.
pub(crate) const QUEUE_INSERTED: &str = "INSERT INTO usage_rollup_queue (row_count, usage_ids)
    SELECT COUNT(*), array_agg(id) FROM u WHERE $2 HAVING COUNT(*) > 0";

/// A usage row with the hold it settled, as a fold or a rebuild reads it.
#[derive(sqlx::FromRow)]
struct RawRow {
    id: String,
    recipient_id: i64,
    created_at: i64,
    cost: i64,
    held: i64,
    #[sqlx(flatten)]
    usage: UsageInput,
}

impl RawRow {
    fn input(&self) -> RollupInput<'_> {
        RollupInput {
            usage_id: &self.id,
            recipient_id: self.recipient_id,
            created_at: self.created_at,
            revenue: self.cost,
            refund: self.held.saturating_sub(self.cost).max(0),
            usage: &self.usage,
        }
    }
}

/// The writers' step, in the transaction that inserted the rows: queue them (Postgres) or add them
/// to the rollups (SQLite).
pub(crate) async fn add_to_rollups(
    conn: &mut AnyConnection,
    rows: &[RollupInput<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() || !enabled() {
        return Ok(());
    }
    if !is_postgres(conn) {
        return upsert_rollups(conn, rows).await;
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.usage_id).collect();
    let ids = super::json(&ids)?;
    sqlx::query(
        "INSERT INTO usage_rollup_queue (row_count, usage_ids) \
         SELECT COUNT(*), array_agg(id) FROM json_array_elements_text($1::json) AS i(id)",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Folds one page of the queue, in its own transaction; `None` when `wait` is false and another
/// fold holds the lock. Returns the rows folded.
async fn fold_page(pool: &AnyPool, wait: bool) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Its own statement, before the one that reads the queue: that statement's snapshot then
    // sees everything the previous holder of the lock committed.
    let got: bool = if wait {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(FOLD_LOCK)
            .execute(&mut *tx)
            .await?;
        true
    } else {
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(FOLD_LOCK)
            .fetch_one(&mut *tx)
            .await?
    };
    if !got {
        return Ok(None);
    }
    // Whole entries, in the order they lie, while the rows before them are fewer than a page.
    let rows: Vec<RawRow> = sqlx::query_as(&format!(
        "WITH page AS (SELECT ctid FROM (SELECT ctid, SUM(row_count) OVER (ORDER BY ctid \
             ROWS UNBOUNDED PRECEDING) - row_count AS before FROM usage_rollup_queue) p \
             WHERE before < $1), \
         q AS (DELETE FROM usage_rollup_queue WHERE ctid = ANY(ARRAY(SELECT ctid FROM page)) \
           RETURNING usage_ids) \
         SELECT {RAW_COLUMNS} FROM q CROSS JOIN LATERAL unnest(q.usage_ids) AS x(usage_id) \
         JOIN usage_records u ON u.id = x.usage_id {TRANSFER_JOINS}"
    ))
    .bind(FOLD_PAGE)
    .fetch_all(&mut *tx)
    .await?;
    let inputs: Vec<RollupInput<'_>> = rows.iter().map(RawRow::input).collect();
    upsert_rollups(&mut tx, &inputs).await?;
    tx.commit().await?;
    Ok(Some(rows.len() as i64))
}

/// Folds the whole queue (Postgres); waits for a fold in progress elsewhere. Returns the rows
/// folded.
async fn fold_all(pool: &AnyPool) -> Result<u64, sqlx::Error> {
    let mut folded = 0u64;
    loop {
        let n = fold_page(pool, true).await?.unwrap_or(0);
        folded += n as u64;
        if n < FOLD_PAGE {
            return Ok(folded);
        }
    }
}

/// Stops the background folder when dropped (with its `Store`).
pub(crate) struct Folder {
    _stop: oneshot::Sender<()>,
}

/// Starts the background folder of a Postgres store.
pub(crate) fn start_folder(pool: AnyPool) -> Folder {
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FOLD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            // Another process folding now: its fold covers this tick's rows or the next one will.
            loop {
                match fold_page(&pool, false).await {
                    // A page takes whole queue entries, so a full one is often more than
                    // `FOLD_PAGE` rows (`==` left a backlog to the next tick).
                    Ok(Some(n)) if n >= FOLD_PAGE => continue,
                    Ok(_) => break,
                    Err(sqlx::Error::PoolClosed) => return,
                    Err(err) => {
                        tracing::warn!(error = %err, "folding usage rows into the rollups failed");
                        break;
                    }
                }
            }
        }
    });
    Folder { _stop: stop }
}

impl Store {
    /// Brings the rollups up to date with every usage row committed so far (Postgres: folds the
    /// queue; SQLite: nothing to do). Analytics answers call this first. Returns the rows folded.
    pub async fn fold_rollups(&self) -> Result<u64> {
        if self.backend() != Backend::Postgres {
            return Ok(0);
        }
        // One round trip when nothing is queued (a quiet ledger, or the folder just ran), instead
        // of a fold transaction per answer.
        let queued: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM usage_rollup_queue)")
            .fetch_one(self.pool())
            .await?;
        if !queued {
            return Ok(0);
        }
        Ok(fold_all(self.pool()).await?)
    }

    /// Recomputes every rollup from the usage rows, in one transaction that keeps writers out
    /// (Postgres: table locks and the fold lock; SQLite: the single writer), and empties the
    /// queue. Used when a ledger upgrades with usage rows older than the rollups (and by tests and
    /// benchmarks). Returns the rows counted.
    pub async fn rebuild_rollups(&self) -> Result<u64> {
        let mut tx = self.pool().begin().await?;
        if self.backend() == Backend::Postgres {
            // It reads every usage row, at start after an upgrade: a `statement_timeout` on the
            // role or database for the money paths would cancel it at every start.
            sqlx::query("SET LOCAL statement_timeout = 0")
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(FOLD_LOCK)
                .execute(&mut *tx)
                .await?;
            // Writers take ROW EXCLUSIVE on usage_records, then the queue: same order here.
            let rollups: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
            sqlx::query(&format!(
                "LOCK TABLE usage_records, usage_rollup_queue, {} IN SHARE ROW EXCLUSIVE MODE",
                rollups.join(", ")
            ))
            .execute(&mut *tx)
            .await?;
        }
        let queue = (self.backend() == Backend::Postgres).then_some("usage_rollup_queue");
        for table in queue.into_iter().chain(TABLES.iter().map(|t| t.name)) {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
        let mut after = String::new();
        let mut counted = 0u64;
        loop {
            let rows: Vec<RawRow> = sqlx::query_as(&format!(
                "SELECT {RAW_COLUMNS} FROM usage_records u {TRANSFER_JOINS} \
                 WHERE u.id > $1 ORDER BY u.id LIMIT $2"
            ))
            .bind(&after)
            .bind(REBUILD_PAGE)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.id.clone();
            let inputs: Vec<RollupInput<'_>> = rows.iter().map(RawRow::input).collect();
            upsert_rollups(&mut tx, &inputs).await?;
            counted += rows.len() as u64;
        }
        tx.commit().await?;
        Ok(counted)
    }

    /// After migrations: rollups are empty but usage rows exist (a ledger upgraded from before
    /// rollups), so they are computed once.
    pub(crate) async fn backfill_rollups(&self) -> Result<()> {
        let rollups: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM usage_rollups LIMIT 1) x")
                .fetch_one(self.pool())
                .await?;
        let usage: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM usage_records LIMIT 1) x")
                .fetch_one(self.pool())
                .await?;
        if rollups == 0 && usage > 0 {
            let n = self.rebuild_rollups().await?;
            tracing::info!(rows = n, "usage rollups computed from existing usage rows");
        }
        Ok(())
    }
}

/// The usage rows the rollups have counted, as a table expression for `verify`: every row but the
/// queued ones (their rollups are still to come; both commit with the row, so one snapshot of the
/// two is exact). SQLite has no queue: every row is counted. An anti-join over the unnested ids:
/// Postgres hashes them once (a `NOT IN` subquery is hashed only while it fits in `work_mem`, and
/// past ~100,000 queued ids it scanned the queue once per usage row: a verify that ran for
/// minutes).
pub(crate) fn counted_rows(postgres: bool) -> &'static str {
    if postgres {
        "(SELECT * FROM usage_records r WHERE NOT EXISTS (SELECT 1 FROM usage_rollup_queue q \
         CROSS JOIN LATERAL unnest(q.usage_ids) AS x(usage_id) WHERE x.usage_id = r.id))"
    } else {
        "usage_records"
    }
}
