//! Usage rollups, written in the same transaction as the usage rows they count so analytics never
//! scan raw rows for wide ranges (docs/analytics.md, "Rollups"): `usage_rollups` per (grain,
//! bucket, owner, app, endpoint, model, status) at minute, hour and day, WITHOUT the user, with an
//! active-user sketch (`hll.rs`); `usage_user_rollups` per (grain, bucket, owner, app, user) at hour
//! and day. Both keep sums and fixed log-scale latency histograms.
//!
//! Writers hand [`upsert_rollups`] a slice of the usage rows they inserted: the rows are aggregated
//! first, so a batch of N rows costs one upsert per distinct key and grain, and the keys are
//! written in sorted order so concurrent batches lock rollup rows in one global order (no
//! deadlocks).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::AnyConnection;

use syft_error::UsageStatus;

use super::hll::{register_of, REGISTERS};
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

/// The summed columns of `usage_rollups`, as written and read.
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

/// The summed columns of `usage_user_rollups`: the status is not in its key, so it counts the
/// successes itself.
pub const USER_SUM_COLUMNS: [&str; 9] = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "revenue",
    "refunds",
    "latency_sum",
    "ttft_count",
    "successes",
];

/// The grains of the per-user rollups: minutes of one user are read from the usage rows.
pub const USER_GRAINS: [Grain; 2] = [Grain::Hour, Grain::Day];

/// Every histogram column, in measure then bucket order.
pub fn hist_columns() -> impl Iterator<Item = String> {
    MEASURES
        .iter()
        .flat_map(|m| (0..HIST_BUCKETS).map(move |i| format!("h_{m}_{i:02}")))
}

/// Sums, histograms and (user-less rollups) the active-user sketch of a set of usage rows.
#[derive(Debug, Clone)]
pub(crate) struct Sums {
    pub requests: i64,
    pub successes: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub revenue: i64,
    pub refunds: i64,
    pub latency_sum: i64,
    pub ttft_count: i64,
    pub hist: [[i64; HIST_BUCKETS]; 3],
    /// HyperLogLog registers (`hll.rs`); empty where the user is in the key.
    pub registers: Vec<u8>,
}

impl Sums {
    pub fn new(sketch: bool) -> Self {
        Self {
            requests: 0,
            successes: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            revenue: 0,
            refunds: 0,
            latency_sum: 0,
            ttft_count: 0,
            hist: [[0; HIST_BUCKETS]; 3],
            registers: if sketch {
                vec![0; REGISTERS]
            } else {
                Vec::new()
            },
        }
    }

    /// A summed column by name ([`SUM_COLUMNS`], [`USER_SUM_COLUMNS`]).
    pub fn sum(&self, name: &str) -> i64 {
        match name {
            "requests" => self.requests,
            "successes" => self.successes,
            "prompt_tokens" => self.prompt_tokens,
            "completion_tokens" => self.completion_tokens,
            "total_tokens" => self.total_tokens,
            "revenue" => self.revenue,
            "refunds" => self.refunds,
            "latency_sum" => self.latency_sum,
            _ => self.ttft_count,
        }
    }

    pub fn sum_mut(&mut self, name: &str) -> &mut i64 {
        match name {
            "requests" => &mut self.requests,
            "successes" => &mut self.successes,
            "prompt_tokens" => &mut self.prompt_tokens,
            "completion_tokens" => &mut self.completion_tokens,
            "total_tokens" => &mut self.total_tokens,
            "revenue" => &mut self.revenue,
            "refunds" => &mut self.refunds,
            "latency_sum" => &mut self.latency_sum,
            _ => &mut self.ttft_count,
        }
    }

    fn add(&mut self, r: &RollupInput<'_>) {
        let u = r.usage;
        self.requests += 1;
        self.successes += i64::from(u.status == UsageStatus::Success.as_str());
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
        if !self.registers.is_empty() {
            if let Some((i, rank)) = register_of(&u.user_email) {
                self.registers[i] = self.registers[i].max(rank);
            }
        }
    }

    /// Adds another set's sums, histograms and sketch (merged by maximum).
    pub fn merge(&mut self, o: &Sums) {
        self.requests += o.requests;
        self.successes += o.successes;
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(o.total_tokens);
        self.revenue = self.revenue.saturating_add(o.revenue);
        self.refunds = self.refunds.saturating_add(o.refunds);
        self.latency_sum = self.latency_sum.saturating_add(o.latency_sum);
        self.ttft_count += o.ttft_count;
        for (mine, theirs) in self.hist.iter_mut().zip(&o.hist) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        for (a, b) in self.registers.iter_mut().zip(&o.registers) {
            *a = (*a).max(*b);
        }
    }
}

/// A rollup table the writers keep: its text key columns (after grain, bucket start and owner),
/// its sums, and whether it keeps the active-user sketch.
struct Table {
    name: &'static str,
    texts: &'static [&'static str],
    sums: &'static [&'static str],
    sketch: bool,
}

const USERLESS: Table = Table {
    name: "usage_rollups",
    texts: &["app_name", "endpoint", "model", "status"],
    sums: &SUM_COLUMNS,
    sketch: true,
};

const PER_USER: Table = Table {
    name: "usage_user_rollups",
    texts: &["app_name", "user_email"],
    sums: &USER_SUM_COLUMNS,
    sketch: false,
};

/// (grain, bucket start, recipient, text key columns in [`Table::texts`] order), borrowed.
type Key<'a> = (i16, i64, i64, [&'a str; 4]);

/// A column written by the upsert.
#[derive(Clone, Copy)]
enum Col {
    Sum(&'static str),
    /// Measure × bucket.
    Hist(usize, usize),
    Register(usize),
}

impl Col {
    fn name(self) -> String {
        match self {
            Col::Sum(n) => n.to_string(),
            Col::Hist(m, i) => format!("h_{}_{i:02}", MEASURES[m]),
            Col::Register(i) => format!("u_{i:03}"),
        }
    }

    fn value(self, s: &Sums) -> i64 {
        match self {
            Col::Sum(n) => s.sum(n),
            Col::Hist(m, i) => s.hist[m][i],
            Col::Register(i) => i64::from(s.registers[i]),
        }
    }
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

/// Adds the rows to the rollups, in the caller's transaction: the user-less rollups at every grain
/// and the per-user ones at hour and day (docs/analytics.md, "Rollups").
///
/// Rows are aggregated per key first, so a batch costs one upserted row per distinct key and grain:
/// the user-less keys are few (owner × app × endpoint × model × status), the per-user ones one per
/// user, owner and app. Only the columns some key of the batch changes are written (a usage row
/// touches at most three of the 192 histogram buckets): writing all of them made the statement
/// megabytes long, and parsing it cost more than the batch's inserts.
pub(crate) async fn upsert_rollups(
    conn: &mut AnyConnection,
    rows: &[RollupInput<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() || !ENABLED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut userless: BTreeMap<Key<'_>, Sums> = BTreeMap::new();
    let mut per_user: BTreeMap<Key<'_>, Sums> = BTreeMap::new();
    for r in rows {
        let u = r.usage;
        for grain in Grain::ALL {
            let start = r.created_at.div_euclid(grain.micros()) * grain.micros();
            let texts = [
                u.app_name.as_str(),
                u.endpoint.as_str(),
                u.model.as_str(),
                u.status.as_str(),
            ];
            userless
                .entry((grain as i16, start, r.recipient_id, texts))
                .or_insert_with(|| Sums::new(true))
                .add(r);
            if USER_GRAINS.contains(&grain) {
                let texts = [u.app_name.as_str(), u.user_email.as_str(), "", ""];
                per_user
                    .entry((grain as i16, start, r.recipient_id, texts))
                    .or_insert_with(|| Sums::new(false))
                    .add(r);
            }
        }
    }
    upsert_table(conn, &USERLESS, &userless).await?;
    upsert_table(conn, &PER_USER, &per_user).await
}

async fn upsert_table(
    conn: &mut AnyConnection,
    table: &Table,
    agg: &BTreeMap<Key<'_>, Sums>,
) -> Result<(), sqlx::Error> {
    // The sums always; a histogram bucket or register only when some key of the batch has it.
    let mut cols: Vec<Col> = table.sums.iter().map(|&n| Col::Sum(n)).collect();
    for m in 0..MEASURES.len() {
        for i in 0..HIST_BUCKETS {
            if agg.values().any(|s| s.hist[m][i] != 0) {
                cols.push(Col::Hist(m, i));
            }
        }
    }
    if table.sketch {
        for i in 0..REGISTERS {
            if agg.values().any(|s| s.registers[i] != 0) {
                cols.push(Col::Register(i));
            }
        }
    }
    let postgres = conn.backend_name() == POSTGRES;
    let texts = table.texts.join(", ");
    let mut head = format!(
        "INSERT INTO {} AS r (grain, bucket_start, recipient_id, {texts}",
        table.name
    );
    let mut set =
        format!(" ON CONFLICT (grain, bucket_start, recipient_id, {texts}) DO UPDATE SET ");
    for (n, c) in cols.iter().enumerate() {
        let c_name = c.name();
        let _ = write!(head, ", {c_name}");
        let sep = if n == 0 { "" } else { ", " };
        let _ = match (c, postgres) {
            // Registers merge by maximum; NULL is 0 (GREATEST skips NULL, SQLite's MAX does not).
            (Col::Register(_), true) => {
                write!(
                    set,
                    "{sep}{c_name} = GREATEST(r.{c_name}, excluded.{c_name})"
                )
            }
            (Col::Register(_), false) => write!(
                set,
                "{sep}{c_name} = MAX(COALESCE(r.{c_name}, 0), excluded.{c_name})"
            ),
            // Histogram columns are NULL for "none" on Postgres (migrations 0014, 0015).
            _ => write!(
                set,
                "{sep}{c_name} = COALESCE(r.{c_name}, 0) + excluded.{c_name}"
            ),
        };
    }
    head.push(')');
    if postgres {
        upsert_postgres(conn, table, agg, &cols, &head, &set).await
    } else {
        upsert_sqlite(conn, table, agg, &cols, &head, &set).await
    }
}

/// Postgres: one statement per table and batch whatever its size, the keys as one JSON parameter
/// (the `Any` driver binds no arrays), in key order so concurrent batches lock rollup rows in one
/// order (no deadlocks).
async fn upsert_postgres(
    conn: &mut AnyConnection,
    table: &Table,
    agg: &BTreeMap<Key<'_>, Sums>,
    cols: &[Col],
    head: &str,
    set: &str,
) -> Result<(), sqlx::Error> {
    let names: Vec<String> = cols.iter().map(|c| c.name()).collect();
    // Written by hand: one string for the whole batch instead of a map per key.
    let mut input = String::with_capacity(agg.len() * (120 + 24 * cols.len()));
    input.push('[');
    for (n, ((grain, start, recipient, texts), s)) in agg.iter().enumerate() {
        if n > 0 {
            input.push(',');
        }
        let _ = write!(
            input,
            r#"{{"n":{n},"grain":{grain},"bucket_start":{start},"recipient_id":{recipient}"#
        );
        for (name, text) in table.texts.iter().zip(texts) {
            let _ = write!(input, r#","{name}":{}"#, json_text(text));
        }
        for (c, name) in cols.iter().zip(&names) {
            let _ = write!(input, r#","{name}":{}"#, c.value(s));
        }
        input.push('}');
    }
    input.push(']');
    let typed: Vec<String> = table
        .texts
        .iter()
        .map(|t| format!("{t} text"))
        .chain(cols.iter().zip(&names).map(|(c, name)| match c {
            Col::Register(_) => format!("{name} smallint"),
            _ => format!("{name} bigint"),
        }))
        .collect();
    let sql = format!(
        "{head} SELECT grain, bucket_start, recipient_id, {}, {} FROM jsonb_to_recordset($1::jsonb) \
         AS i(n bigint, grain smallint, bucket_start bigint, recipient_id bigint, {}) ORDER BY n{set}",
        table.texts.join(", "),
        names.join(", "),
        typed.join(", ")
    );
    sqlx::query(&sql).bind(input).execute(&mut *conn).await?;
    Ok(())
}

/// A JSON string literal (quoted and escaped).
pub(crate) fn json_text(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Keys per SQLite statement: four bound texts each stay under SQLite's oldest bind limit (999).
const SQLITE_KEYS_PER_STATEMENT: usize = 150;

/// SQLite: multi-row upserts, numbers written inline (integers we computed, never caller text) and
/// the texts bound. SQLite's cost is the commit, so a few statements per batch are cheap.
async fn upsert_sqlite(
    conn: &mut AnyConnection,
    table: &Table,
    agg: &BTreeMap<Key<'_>, Sums>,
    cols: &[Col],
    head: &str,
    set: &str,
) -> Result<(), sqlx::Error> {
    let n_texts = table.texts.len();
    let keys: Vec<(&Key<'_>, &Sums)> = agg.iter().collect();
    for chunk in keys.chunks(SQLITE_KEYS_PER_STATEMENT) {
        let mut sql = format!("{head} VALUES ");
        for (n, ((grain, start, recipient, _), s)) in chunk.iter().enumerate() {
            let _ = write!(
                sql,
                "{}({grain}, {start}, {recipient}",
                if n == 0 { "" } else { ", " },
            );
            for t in 0..n_texts {
                let _ = write!(sql, ", ${}", n * n_texts + t + 1);
            }
            for c in cols {
                let _ = write!(sql, ", {}", c.value(s));
            }
            sql.push(')');
        }
        sql.push_str(set);
        let mut q = sqlx::query(&sql).persistent(false);
        for ((_, _, _, texts), _) in chunk {
            for t in &texts[..n_texts] {
                q = q.bind(*t);
            }
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
            sqlx::query(
                "LOCK TABLE usage_records, usage_rollups, usage_user_rollups \
                 IN SHARE ROW EXCLUSIVE MODE",
            )
            .execute(&mut *tx)
            .await?;
        }
        for table in [USERLESS.name, PER_USER.name] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
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
