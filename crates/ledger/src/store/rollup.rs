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

use sqlx::AnyConnection;

use super::{Backend, Store, UsageInput};
use crate::error::Result;

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
    let mut b = [0i64; HIST_BUCKETS];
    for i in 1..HIST_BUCKETS {
        b[i] = (b[i - 1] + 1).max(b[i - 1] * 6 / 5);
    }
    b
}

/// The bucket of a value in ms (negative values count as 0).
pub fn bucket_of(ms: i64) -> usize {
    let bounds = bucket_bounds();
    bounds.partition_point(|&lo| lo <= ms).saturating_sub(1)
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

type Key = (i16, i64, i64, String, String, String, String, String);

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
pub(super) const SUM_COLUMNS: [&str; 8] = [
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

/// Adds the rows to the rollups of every grain, in the caller's transaction.
pub(crate) async fn upsert_rollups(
    conn: &mut AnyConnection,
    rows: &[RollupInput<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut agg: BTreeMap<Key, Sums> = BTreeMap::new();
    for r in rows {
        for grain in Grain::ALL {
            let start = r.created_at.div_euclid(grain.micros()) * grain.micros();
            let u = r.usage;
            let key = (
                grain as i16,
                start,
                r.recipient_id,
                u.app_name.clone(),
                u.endpoint.clone(),
                u.user_email.clone(),
                u.model.clone(),
                u.status.clone(),
            );
            agg.entry(key).or_default().add(r);
        }
    }
    // Numbers are written inline (they are integers we computed, never caller text) and the five
    // texts are bound: 200 columns a row would otherwise exceed the bind limit for large batches.
    let hist: Vec<String> = hist_columns().collect();
    let mut sql = String::from(
        "INSERT INTO usage_rollups (grain, bucket_start, recipient_id, app_name, endpoint, \
         user_email, model, status",
    );
    for c in SUM_COLUMNS
        .iter()
        .copied()
        .chain(hist.iter().map(String::as_str))
    {
        let _ = write!(sql, ", {c}");
    }
    sql.push_str(") VALUES ");
    for (n, ((grain, start, recipient, ..), s)) in agg.iter().enumerate() {
        let p = n * 5;
        let _ = write!(
            sql,
            "{}({grain}, {start}, {recipient}, ${}, ${}, ${}, ${}, ${}, {}, {}, {}, {}, {}, {}, {}, {}",
            if n == 0 { "" } else { ", " },
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            s.requests,
            s.prompt_tokens,
            s.completion_tokens,
            s.total_tokens,
            s.revenue,
            s.refunds,
            s.latency_sum,
            s.ttft_count
        );
        for v in s.hist.iter().flatten() {
            let _ = write!(sql, ", {v}");
        }
        sql.push(')');
    }
    sql.push_str(
        " ON CONFLICT (grain, bucket_start, recipient_id, app_name, endpoint, user_email, model, \
         status) DO UPDATE SET ",
    );
    for (n, c) in SUM_COLUMNS
        .iter()
        .copied()
        .chain(hist.iter().map(String::as_str))
        .enumerate()
    {
        let sep = if n == 0 { "" } else { ", " };
        let _ = write!(sql, "{sep}{c} = usage_rollups.{c} + excluded.{c}");
    }
    let mut q = sqlx::query(&sql).persistent(false);
    for (_, _, _, app, endpoint, user, model, status) in agg.keys() {
        q = q
            .bind(app)
            .bind(endpoint)
            .bind(user)
            .bind(model)
            .bind(status);
    }
    q.execute(&mut *conn).await?;
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
