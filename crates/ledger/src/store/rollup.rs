//! Usage rollups, kept up to date with the usage rows they count so analytics never scan raw rows
//! for wide ranges (docs/analytics.md, "Rollups"; when they are written: `rollup_fold.rs`):
//! `usage_rollups` per (grain, bucket, owner, app, endpoint, model, status) at minute, hour and
//! day, WITHOUT the user, with an active-user sketch (`hll.rs`); `usage_user_rollups` per (grain,
//! bucket, owner, app, user) at hour and day. Both keep sums and fixed log-scale latency
//! histograms.
//!
//! [`upsert_rollups`] takes a slice of usage rows (a fold's page, a SQLite writer's rows): they are
//! aggregated first, so N rows cost one upsert per distinct key and grain, and the keys are
//! written in sorted order so concurrent writers lock rollup rows in one global order (no
//! deadlocks).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use sqlx::AnyConnection;

use syft_error::UsageStatus;

use super::hll::{register_of, REGISTERS};
use super::UsageInput;

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
    /// The usage row's id (what the Postgres writers queue, `rollup_fold.rs`).
    pub usage_id: &'a str,
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

/// The summed columns of `usage_user_rollups`: [`SUM_COLUMNS`] and `successes` (the status is not
/// in its key, so it counts the successes itself).
pub const USER_SUM_COLUMNS: [&str; 9] = {
    let mut cols = [""; 9];
    let mut i = 0;
    while i < SUM_COLUMNS.len() {
        cols[i] = SUM_COLUMNS[i];
        i += 1;
    }
    cols[8] = "successes";
    cols
};

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

impl Table {
    /// [`postgres_upsert_sql`] of this table, built once.
    fn postgres_sql(&'static self) -> &'static str {
        static USERLESS_SQL: LazyLock<String> = LazyLock::new(|| postgres_upsert_sql(&USERLESS));
        static PER_USER_SQL: LazyLock<String> = LazyLock::new(|| postgres_upsert_sql(&PER_USER));
        if self.name == USERLESS.name {
            &USERLESS_SQL
        } else {
            &PER_USER_SQL
        }
    }
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

pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Adds the rows to the rollups, in the caller's transaction: the user-less rollups at every grain
/// and the per-user ones at hour and day (docs/analytics.md, "Rollups"). Writers call
/// `rollup_fold::add_to_rollups`, which queues the rows on Postgres; this is the folder's (and
/// SQLite's, and the rebuild's) step.
///
/// Rows are aggregated per key first, so a batch costs one upserted row per distinct key and grain:
/// the user-less keys are few (owner × app × endpoint × model × status), the per-user ones one per
/// user, owner and app.
pub(crate) async fn upsert_rollups(
    conn: &mut AnyConnection,
    rows: &[RollupInput<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
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
    table: &'static Table,
    agg: &BTreeMap<Key<'_>, Sums>,
) -> Result<(), sqlx::Error> {
    if conn.backend_name() == POSTGRES {
        return upsert_postgres(conn, table, agg).await;
    }
    // SQLite: the sums always; a histogram bucket or register only when some key of the batch
    // has it (the numbers are written inline, so the statement is new each time anyway).
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
        let _ = match c {
            // Registers merge by maximum; NULL is 0 (SQLite's MAX returns NULL with a NULL).
            Col::Register(_) => write!(
                set,
                "{sep}{c_name} = MAX(COALESCE(r.{c_name}, 0), excluded.{c_name})"
            ),
            _ => write!(
                set,
                "{sep}{c_name} = COALESCE(r.{c_name}, 0) + excluded.{c_name}"
            ),
        };
    }
    head.push(')');
    upsert_sqlite(conn, table, agg, &cols, &head, &set).await
}

/// The Postgres upsert of a table: the same text for every batch, so each connection prepares it
/// once. (Writing only the columns a batch touches, as before, made a new statement text for
/// nearly every batch, since each user's register and each latency bucket changed it: 4,584
/// texts in one benchmark run, each prepared anew and churning the statement cache. Measured, the
/// upsert's cost was its execution either way, which is why writers queue and a folder upserts:
/// `rollup_fold.rs`.)
///
/// Keys come as one JSON parameter (the `Any` driver binds no arrays), histograms and registers
/// as JSON arrays; a zero stays NULL in the table (`NULLIF`, and `COALESCE(a + b, a, b)` adds
/// two possibly-NULL counts), as migrations 0014 and 0015 store "none".
fn postgres_upsert_sql(table: &Table) -> String {
    let texts = table.texts.join(", ");
    let hist: Vec<(String, String)> = MEASURES
        .iter()
        .flat_map(|m| {
            (0..HIST_BUCKETS).map(move |i| {
                (
                    format!("h_{m}_{i:02}"),
                    format!("NULLIF(i.h_{m}[{}], 0)", i + 1),
                )
            })
        })
        .collect();
    let regs: Vec<(String, String)> = if table.sketch {
        (0..REGISTERS)
            .map(|i| {
                (
                    format!("u_{i:03}"),
                    format!("CAST(NULLIF(i.u[{}], 0) AS SMALLINT)", i + 1),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let names: Vec<&str> = table
        .sums
        .iter()
        .copied()
        .chain(hist.iter().chain(&regs).map(|(n, _)| n.as_str()))
        .collect();
    let values: Vec<String> = table
        .sums
        .iter()
        .map(|s| format!("i.{s}"))
        .chain(hist.iter().chain(&regs).map(|(_, v)| v.clone()))
        .collect();
    let mut typed: Vec<String> = table.texts.iter().map(|t| format!("{t} text")).collect();
    typed.extend(table.sums.iter().map(|s| format!("{s} bigint")));
    typed.extend(MEASURES.iter().map(|m| format!("h_{m} bigint[]")));
    if table.sketch {
        typed.push("u int[]".into());
    }
    let set: Vec<String> = table
        .sums
        .iter()
        .map(|s| format!("{s} = r.{s} + excluded.{s}"))
        .chain(
            hist.iter()
                .map(|(c, _)| format!("{c} = COALESCE(r.{c} + excluded.{c}, r.{c}, excluded.{c})")),
        )
        .chain(
            regs.iter()
                .map(|(c, _)| format!("{c} = GREATEST(r.{c}, excluded.{c})")),
        )
        .collect();
    format!(
        "INSERT INTO {name} AS r (grain, bucket_start, recipient_id, {texts}, {names}) \
         SELECT i.grain, i.bucket_start, i.recipient_id, {itexts}, {values} \
         FROM jsonb_to_recordset($1::jsonb) AS i(n bigint, grain smallint, bucket_start bigint, \
         recipient_id bigint, {typed}) ORDER BY i.n \
         ON CONFLICT (grain, bucket_start, recipient_id, {texts}) DO UPDATE SET {set}",
        name = table.name,
        names = names.join(", "),
        itexts = table
            .texts
            .iter()
            .map(|t| format!("i.{t}"))
            .collect::<Vec<_>>()
            .join(", "),
        values = values.join(", "),
        typed = typed.join(", "),
        set = set.join(", "),
    )
}

/// Postgres: one statement per table and batch whatever its size, in key order so concurrent
/// batches lock rollup rows in one order (no deadlocks).
async fn upsert_postgres(
    conn: &mut AnyConnection,
    table: &'static Table,
    agg: &BTreeMap<Key<'_>, Sums>,
) -> Result<(), sqlx::Error> {
    // Written by hand: one string for the whole batch instead of a map per key.
    let width = 3 * HIST_BUCKETS + if table.sketch { REGISTERS } else { 0 };
    let mut input = String::with_capacity(agg.len() * (200 + 2 * width));
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
        for name in table.sums {
            let _ = write!(input, r#","{name}":{}"#, s.sum(name));
        }
        for (m, measure) in MEASURES.iter().enumerate() {
            let _ = write!(input, r#","h_{measure}":"#);
            json_array(&mut input, s.hist[m].iter().copied());
        }
        if table.sketch {
            input.push_str(r#","u":"#);
            json_array(&mut input, s.registers.iter().map(|&r| i64::from(r)));
        }
        input.push('}');
    }
    input.push(']');
    sqlx::query(table.postgres_sql())
        .bind(input)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn json_array(out: &mut String, values: impl Iterator<Item = i64>) {
    out.push('[');
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v}");
    }
    out.push(']');
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
