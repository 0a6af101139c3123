//! Usage rollups: per (grain, bucket, owner, app, endpoint, user, model, status) sums and fixed
//! log-scale latency histograms, written in the same transaction as the usage rows they count so
//! analytics never scan raw rows (docs/analytics.md).
//!
//! Writers hand [`upsert_rollups`] a slice of the usage rows they inserted: the rows are aggregated
//! first, so a batch of N rows costs one upsert per distinct key and grain, and the keys are
//! written in sorted order so concurrent batches lock rollup rows in one global order (no
//! deadlocks).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::AnyConnection;

use super::{Backend, Store, UsageInput};
use crate::error::Result;

/// `AnyConnection::backend_name` of a Postgres connection.
const POSTGRES: &str = "PostgreSQL";

/// Histogram buckets per measure.
pub const HIST_BUCKETS: usize = 64;

pub const MINUTE: i64 = 60_000_000;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;

/// The rollup grains, finest first; the value is the `grain` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grain {
    Minute = 0,
    Hour = 1,
    Day = 2,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    pub fn micros(self) -> i64 {
        match self {
            Grain::Minute => MINUTE,
            Grain::Hour => HOUR,
            Grain::Day => DAY,
        }
    }
}

/// The three histogrammed measures, in column order.
pub const MEASURES: [&str; 3] = ["lat", "up", "ttft"];

/// Lower bounds (ms, inclusive) of the histogram buckets: one bucket per integer up to 5 ms, then
/// each bound is the previous one times 1.2 (rounded down), so a bucket's upper bound is at most
/// 1.2 times its lower bound and the last bucket is open (≥ ~150 s).
pub fn bucket_bounds() -> [i64; HIST_BUCKETS] {
    BOUNDS
}

/// [`bucket_bounds`], computed once at compile time (every usage row looks up three buckets).
const BOUNDS: [i64; HIST_BUCKETS] = {
    let mut b = [0i64; HIST_BUCKETS];
    let mut i = 1;
    while i < HIST_BUCKETS {
        let grown = b[i - 1] * 6 / 5;
        b[i] = if grown > b[i - 1] + 1 {
            grown
        } else {
            b[i - 1] + 1
        };
        i += 1;
    }
    b
};

/// The bucket of a value in ms (negative values count as 0).
pub fn bucket_of(ms: i64) -> usize {
    BOUNDS.partition_point(|&lo| lo <= ms).saturating_sub(1)
}

/// The value reported for bucket `i`: the one that minimises the worst relative error over the
/// integers of the bucket (their harmonic midpoint); the open last bucket reports its lower bound.
pub fn bucket_value(i: usize) -> f64 {
    let bounds = bucket_bounds();
    let lo = bounds[i.min(HIST_BUCKETS - 1)] as f64;
    match bounds.get(i + 1) {
        Some(&next) if lo > 0.0 => {
            let hi = (next - 1) as f64;
            2.0 * lo * hi / (lo + hi)
        }
        _ => lo,
    }
}

/// One usage row as the rollups see it.
#[derive(Debug, Clone)]
pub(crate) struct RollupInput<'a> {
    pub recipient_id: i64,
    pub created_at: i64,
    /// Captured micros.
    pub revenue: i64,
    /// Hold amount released (authorized minus captured); 0 for free rows.
    pub refund: i64,
    pub usage: &'a UsageInput,
}

/// (grain, bucket start, recipient, app, endpoint, user, model, status), borrowed from the rows.
type Key<'a> = (i16, i64, i64, &'a str, &'a str, &'a str, &'a str, &'a str);

#[derive(Debug, Clone)]
struct Sums {
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    revenue: i64,
    refunds: i64,
    latency_sum: i64,
    ttft_count: i64,
    hist: [[i64; HIST_BUCKETS]; 3],
}

impl Default for Sums {
    fn default() -> Self {
        Self {
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            revenue: 0,
            refunds: 0,
            latency_sum: 0,
            ttft_count: 0,
            hist: [[0; HIST_BUCKETS]; 3],
        }
    }
}

impl Sums {
    /// Column `i` in [`SUM_COLUMNS`] then [`hist_columns`] order.
    fn value(&self, i: usize) -> i64 {
        match i {
            0 => self.requests,
            1 => self.prompt_tokens,
            2 => self.completion_tokens,
            3 => self.total_tokens,
            4 => self.revenue,
            5 => self.refunds,
            6 => self.latency_sum,
            7 => self.ttft_count,
            _ => {
                let h = i - SUM_COLUMNS.len();
                self.hist[h / HIST_BUCKETS][h % HIST_BUCKETS]
            }
        }
    }

    fn add(&mut self, r: &RollupInput<'_>) {
        let u = r.usage;
        self.requests += 1;
        self.prompt_tokens = self.prompt_tokens.saturating_add(u.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(u.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(u.total_tokens);
        self.revenue = self.revenue.saturating_add(r.revenue);
        self.refunds = self.refunds.saturating_add(r.refund);
        self.latency_sum = self.latency_sum.saturating_add(u.latency_ms);
        self.hist[0][bucket_of(u.latency_ms)] += 1;
        self.hist[1][bucket_of(u.upstream_latency_ms)] += 1;
        if let Some(ttft) = u.ttft_ms {
            self.ttft_count += 1;
            self.hist[2][bucket_of(ttft)] += 1;
        }
    }
}

/// The summed columns, as written and read.
pub const SUM_COLUMNS: [&str; 8] = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "revenue",
    "refunds",
    "latency_sum",
    "ttft_count",
];

/// Every histogram column, in measure then bucket order.
pub fn hist_columns() -> impl Iterator<Item = String> {
    MEASURES
        .iter()
        .flat_map(|m| (0..HIST_BUCKETS).map(move |i| format!("h_{m}_{i:02}")))
}

/// Whether writers maintain the rollups; only `bench usage/router --rollups false` turns it off.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Benchmarks only: turns rollup maintenance off (or back on) for the whole process, to measure
/// what it costs the write path (issue 12: the router's throughput may drop by at most 5%). While
/// off, rows are written without rollups and `verify` reports them; call
/// `Store::rebuild_rollups` after turning it back on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Adds the rows to the rollups of every grain, in the caller's transaction.
///
/// Only the columns some key of this batch changes are written (a usage row touches eight sums and
/// at most three of the 192 histogram buckets): writing all 200 columns of every key made the
/// statement megabytes long for a batch of a thousand rows, and parsing it cost more than the
/// batch's inserts. Columns left out keep their value (a new row: 0, or NULL for a histogram
/// bucket on Postgres, which keeps rows narrow: migration 0014).
pub(crate) async fn upsert_rollups(
    conn: &mut AnyConnection,
    rows: &[RollupInput<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() || !ENABLED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut agg: BTreeMap<Key<'_>, Sums> = BTreeMap::new();
    // The sums are always written; a histogram column only when some row of the batch is in it.
    let mut used: Vec<bool> = (0..SUM_COLUMNS.len() + 3 * HIST_BUCKETS)
        .map(|i| i < SUM_COLUMNS.len())
        .collect();
    for r in rows {
        let u = r.usage;
        used[SUM_COLUMNS.len() + bucket_of(u.latency_ms)] = true;
        used[SUM_COLUMNS.len() + HIST_BUCKETS + bucket_of(u.upstream_latency_ms)] = true;
        if let Some(ttft) = u.ttft_ms {
            used[SUM_COLUMNS.len() + 2 * HIST_BUCKETS + bucket_of(ttft)] = true;
        }
        for grain in Grain::ALL {
            let start = r.created_at.div_euclid(grain.micros()) * grain.micros();
            let key = (
                grain as i16,
                start,
                r.recipient_id,
                u.app_name.as_str(),
                u.endpoint.as_str(),
                u.user_email.as_str(),
                u.model.as_str(),
                u.status.as_str(),
            );
            agg.entry(key).or_default().add(r);
        }
    }
    let names: Vec<String> = SUM_COLUMNS
        .iter()
        .map(|c| c.to_string())
        .chain(hist_columns())
        .collect();
    let used: Vec<usize> = (0..names.len()).filter(|&i| used[i]).collect();
    let mut head = String::from(
        "INSERT INTO usage_rollups AS r (grain, bucket_start, recipient_id, app_name, endpoint, \
         user_email, model, status",
    );
    let mut set = String::from(
        " ON CONFLICT (grain, bucket_start, recipient_id, app_name, endpoint, user_email, model, \
         status) DO UPDATE SET ",
    );
    for (n, &i) in used.iter().enumerate() {
        let c = &names[i];
        let _ = write!(head, ", {c}");
        let sep = if n == 0 { "" } else { ", " };
        // Histogram columns are NULL for "none" on Postgres (migration 0014).
        let _ = write!(set, "{sep}{c} = COALESCE(r.{c}, 0) + excluded.{c}");
    }
    head.push(')');
    if conn.backend_name() == POSTGRES {
        upsert_postgres(conn, &agg, &names, &used, &head, &set).await
    } else {
        upsert_sqlite(conn, &agg, &used, &head, &set).await
    }
}

/// Postgres: one statement per batch whatever its size, the keys as one JSON parameter (the `Any`
/// driver binds no arrays), in key order so concurrent batches lock rollup rows in one order.
/// Its text depends only on the set of columns written, so it is prepared once per set.
async fn upsert_postgres(
    conn: &mut AnyConnection,
    agg: &BTreeMap<Key<'_>, Sums>,
    names: &[String],
    used: &[usize],
    head: &str,
    set: &str,
) -> Result<(), sqlx::Error> {
    // Written by hand: one string for the whole batch instead of a map per key.
    let mut input = String::with_capacity(agg.len() * (120 + 24 * used.len()));
    input.push('[');
    for (n, ((grain, start, recipient, app, endpoint, user, model, status), s)) in
        agg.iter().enumerate()
    {
        if n > 0 {
            input.push(',');
        }
        let _ = write!(
            input,
            r#"{{"n":{n},"grain":{grain},"bucket_start":{start},"recipient_id":{recipient},"app_name":{},"endpoint":{},"user_email":{},"model":{},"status":{}"#,
            json_text(app),
            json_text(endpoint),
            json_text(user),
            json_text(model),
            json_text(status)
        );
        for &i in used {
            let _ = write!(input, r#","{}":{}"#, names[i], s.value(i));
        }
        input.push('}');
    }
    input.push(']');
    let cols: Vec<&str> = used.iter().map(|&i| names[i].as_str()).collect();
    let typed: Vec<String> = cols.iter().map(|c| format!("{c} bigint")).collect();
    let sql = format!(
        "{head} SELECT grain, bucket_start, recipient_id, app_name, endpoint, user_email, model, \
         status, {} FROM jsonb_to_recordset($1::jsonb) AS i(n bigint, grain smallint, \
         bucket_start bigint, recipient_id bigint, app_name text, endpoint text, user_email text, \
         model text, status text, {}) ORDER BY n{set}",
        cols.join(", "),
        typed.join(", ")
    );
    sqlx::query(&sql).bind(input).execute(&mut *conn).await?;
    Ok(())
}

/// A JSON string literal (quoted and escaped).
pub(crate) fn json_text(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Keys per SQLite statement: five bound texts each stay under SQLite's oldest bind limit (999).
const SQLITE_KEYS_PER_STATEMENT: usize = 150;

/// SQLite: multi-row upserts, numbers written inline (integers we computed, never caller text) and
/// the five texts bound. SQLite's cost is the commit, so a few statements per batch are cheap.
async fn upsert_sqlite(
    conn: &mut AnyConnection,
    agg: &BTreeMap<Key<'_>, Sums>,
    used: &[usize],
    head: &str,
    set: &str,
) -> Result<(), sqlx::Error> {
    let keys: Vec<(&Key<'_>, &Sums)> = agg.iter().collect();
    for chunk in keys.chunks(SQLITE_KEYS_PER_STATEMENT) {
        let mut sql = format!("{head} VALUES ");
        for (n, ((grain, start, recipient, ..), s)) in chunk.iter().enumerate() {
            let p = n * 5;
            let _ = write!(
                sql,
                "{}({grain}, {start}, {recipient}, ${}, ${}, ${}, ${}, ${}",
                if n == 0 { "" } else { ", " },
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5,
            );
            for &i in used {
                let _ = write!(sql, ", {}", s.value(i));
            }
            sql.push(')');
        }
        sql.push_str(set);
        let mut q = sqlx::query(&sql).persistent(false);
        for ((_, _, _, app, endpoint, user, model, status), _) in chunk {
            q = q
                .bind(app)
                .bind(endpoint)
                .bind(user)
                .bind(model)
                .bind(status);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A usage row with the hold it settled, as a rebuild reads it.
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

const REBUILD_PAGE: i64 = 1_000;

impl Store {
    /// Recomputes every rollup from the usage rows, in one transaction that keeps writers out
    /// (Postgres: table locks; SQLite: the single writer). Used when a ledger upgrades with usage
    /// rows older than the rollups, and by `ledger rollups rebuild`. Returns the rows counted.
    pub async fn rebuild_rollups(&self) -> Result<u64> {
        let mut tx = self.pool().begin().await?;
        if self.backend() == Backend::Postgres {
            // Writers take ROW EXCLUSIVE on usage_records, then usage_rollups: same order here.
            sqlx::query("LOCK TABLE usage_records, usage_rollups IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM usage_rollups")
            .execute(&mut *tx)
            .await?;
        let mut after = String::new();
        let mut counted = 0u64;
        loop {
            let rows: Vec<RawRow> = sqlx::query_as(
                "SELECT u.id, u.recipient_id, u.created_at, u.cost, \
                 COALESCE(t.amount, h.amount, u.cost) AS held, u.request_id, u.app_name, \
                 u.endpoint, u.user_email, u.model, u.prompt_tokens, u.completion_tokens, \
                 u.total_tokens, u.status, u.latency_ms, u.upstream_latency_ms, u.ttft_ms \
                 FROM usage_records u LEFT JOIN transfers t ON t.id = u.transfer_id \
                 LEFT JOIN hosted_transfers h ON h.id = u.hosted_transfer_id \
                 WHERE u.id > $1 ORDER BY u.id LIMIT $2",
            )
            .bind(&after)
            .bind(REBUILD_PAGE)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.id.clone();
            let inputs: Vec<RollupInput<'_>> = rows
                .iter()
                .map(|r| RollupInput {
                    recipient_id: r.recipient_id,
                    created_at: r.created_at,
                    revenue: r.cost,
                    refund: r.held.saturating_sub(r.cost).max(0),
                    usage: &r.usage,
                })
                .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_within_the_error_bound() {
        let b = bucket_bounds();
        assert_eq!(&b[..7], &[0, 1, 2, 3, 4, 5, 6]);
        for i in 0..HIST_BUCKETS - 1 {
            assert!(b[i + 1] > b[i]);
            // Every integer in the bucket is within 10% of the reported value.
            for v in [b[i], b[i + 1] - 1] {
                if v > 0 {
                    let err = (bucket_value(i) - v as f64).abs() / v as f64;
                    assert!(err <= 0.10, "bucket {i} value {v} err {err}");
                }
                assert_eq!(bucket_of(v), i);
            }
        }
        assert!(b[HIST_BUCKETS - 1] >= 120_000, "{}", b[HIST_BUCKETS - 1]);
        assert_eq!(bucket_of(-5), 0);
        assert_eq!(bucket_of(i64::MAX), HIST_BUCKETS - 1);
    }
}
