//! `syft-router bench analytics` (issue 12, "fast at scale"): loads `--rows` usage rows (10
//! million by default) spread over `--days` days into a fresh Postgres database, with their
//! rollups, then times every dashboard query shape over those days and reports p50/p99 per shape
//! against the 50 ms target. Ends with `verify`, which also checks the rollups against the rows.
//!
//! The load is set-based (a day at a time: `INSERT … SELECT FROM generate_series` for the rows,
//! then the minute rollups grouped from those rows, the hours from the minutes and the day from
//! the hours, in one transaction), so it takes minutes, not the hours that ten million
//! acknowledged rows through the writer would. Latencies are drawn from a fixed list of values, so
//! the loader knows each value's histogram bucket (`bucket_of`) and writes only those columns,
//! exactly as the writer would. Queries go through `Store::usage_stats` in-process: the figure is
//! the query itself, without a network hop.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use syft_ledger::store::hll::{register_columns, sql_index, sql_rank, REGISTERS};
use syft_ledger::store::rollup::{bucket_of, DAY, HOUR, MINUTE, SUM_COLUMNS, USER_SUM_COLUMNS};
use syft_ledger::store::Store;

use crate::bench_analytics_shapes::shapes;
use crate::setup::verify_ledger;

#[derive(Args, Debug)]
pub struct AnalyticsBench {
    #[command(flatten)]
    server: crate::bench::BenchServer,
    /// Usage rows to load.
    #[arg(long, default_value_t = 10_000_000)]
    rows: i64,
    /// Days the rows are spread over (ending at the last whole UTC day).
    #[arg(long, default_value_t = 30)]
    days: i64,
    /// Distinct users; each sticks to one app and one model.
    #[arg(long, default_value_t = 1_000)]
    users: i64,
    /// Distinct apps, owned by `--owners` accounts.
    #[arg(long, default_value_t = 20)]
    apps: i64,
    #[arg(long, default_value_t = 10)]
    owners: i64,
    /// Timed runs of each query shape.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Keep the database afterwards (its URL is printed) to rerun queries by hand or with
    /// `--existing`.
    #[arg(long)]
    keep: bool,
    /// Time the queries on a database an earlier run kept (`--keep`; same `--days` and
    /// `--users`) instead of loading a new one; no verify (the loading run verified it).
    #[arg(long)]
    existing: Option<String>,
}

/// The target for any dashboard query over 30 days.
const TARGET_P99_MS: f64 = 50.0;

/// Whole-request latencies (ms) the rows draw from; upstream latency and TTFT are fixed fractions.
const LATENCIES: [i64; 12] = [
    35, 60, 90, 120, 180, 250, 400, 650, 900, 1_500, 2_500, 4_000,
];

fn upstream_of(lat: i64) -> i64 {
    lat * 4 / 5
}

fn ttft_of(lat: i64) -> i64 {
    lat / 4
}

pub async fn run(b: &AnalyticsBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.server.is_postgres(), "bench analytics loads Postgres");
    anyhow::ensure!(
        b.rows > 0 && b.days > 0 && b.users > 0 && b.apps > 0 && b.owners > 0,
        "rows, days, users, apps and owners must be positive"
    );
    let db = match &b.existing {
        Some(_) => None,
        None => Some(b.server.fresh_db().await?),
    };
    let url = match (&db, &b.existing) {
        (Some(db), _) => db.url.clone(),
        (None, Some(url)) => url.clone(),
        (None, None) => anyhow::bail!("no database"),
    };
    let store = Store::connect(&url, 4).await?;
    let (owners, since) = match &b.existing {
        Some(_) => existing(&store).await?,
        None => (fresh(&store, b).await?, {
            let now = syft_ledger::store::now_micros();
            (now.div_euclid(DAY) - b.days) * DAY
        }),
    };
    let until = since + b.days * DAY;
    if db.is_some() {
        let t0 = Instant::now();
        load(&store, b, &owners, since).await?;
        let load_s = t0.elapsed().as_secs_f64();
        sqlx::query("ANALYZE usage_records, usage_rollups, usage_user_rollups, usage_app_rollups")
            .execute(store.pool())
            .await?;
        println!(
            "analytics bench: {} rows over {} days loaded in {load_s:.0} s ({:.0} rows/s, \
             set-based)",
            b.rows,
            b.days,
            b.rows as f64 / load_s,
        );
    }
    let mut sizes = Vec::new();
    for table in [
        "usage_records",
        "usage_rollups",
        "usage_user_rollups",
        "usage_app_rollups",
    ] {
        let (n, size): (i64, String) = sqlx::query_as(&format!(
            "SELECT COUNT(*), pg_size_pretty(pg_total_relation_size('{table}')) FROM {table}"
        ))
        .fetch_one(store.pool())
        .await?;
        sizes.push(format!("{table}: {n} rows ({size})"));
    }
    println!("  {}", sizes.join(", "));
    // Worst p99 of the dashboard's own queries (the target) and of the other API shapes.
    let mut worst = [0f64; 2];
    let user = format!("user{}@bench.example", b.users / 2);
    for shape in shapes(since, until, owners[0], &user) {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut groups = 0;
        // One untimed run warms the cache, as a dashboard's second look would.
        store.usage_stats(&shape.filter).await?;
        for _ in 0..b.runs.max(1) {
            let t = Instant::now();
            groups = store.usage_stats(&shape.filter).await?.len();
            let _ = h.record(t.elapsed().as_micros() as u64);
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let w = &mut worst[usize::from(!shape.dashboard)];
        *w = w.max(ms(0.99));
        println!(
            "  {:<44} {groups:>6} groups  p50 {:>8.1} ms  p99 {:>8.1} ms",
            shape.name,
            ms(0.5),
            ms(0.99)
        );
    }
    println!(
        "  worst p99 of the dashboard's queries {:.1} ms: target <= {TARGET_P99_MS:.0} ms {}; \
         of the other API shapes {:.1} ms",
        worst[0],
        if worst[0] <= TARGET_P99_MS {
            "met"
        } else {
            "NOT met"
        },
        worst[1]
    );
    store.close().await;
    let Some(db) = db else { return Ok(()) };
    let t = Instant::now();
    let report = verify_ledger(&db.url).await?;
    println!(
        "  verify: ok ({} transfers, rollups equal the rows; {:.0} s)",
        report.transfers,
        t.elapsed().as_secs_f64()
    );
    if b.keep {
        println!("  kept: {}", db.url);
    } else {
        db.drop_db().await;
    }
    Ok(())
}

/// A fresh database's owner accounts.
async fn fresh(store: &Store, b: &AnalyticsBench) -> anyhow::Result<Vec<i64>> {
    let mut owners = Vec::new();
    for i in 0..b.owners {
        let a = store
            .create_account(&format!("owner{i}@bench.example"), "bench", "USD", "-")
            .await?;
        owners.push(a.id);
    }
    Ok(owners)
}

/// A kept database's owner accounts and the start of its first day.
async fn existing(store: &Store) -> anyhow::Result<(Vec<i64>, i64)> {
    let owners: Vec<i64> = sqlx::query_scalar("SELECT id FROM accounts ORDER BY id")
        .fetch_all(store.pool())
        .await?;
    let first: i64 = sqlx::query_scalar("SELECT MIN(created_at) FROM usage_records")
        .fetch_one(store.pool())
        .await?;
    anyhow::ensure!(!owners.is_empty(), "no accounts in the kept database");
    Ok((owners, first.div_euclid(DAY) * DAY))
}

/// Loads the rows and their rollups a day at a time, each day in one transaction.
async fn load(store: &Store, b: &AnalyticsBench, owners: &[i64], since: i64) -> anyhow::Result<()> {
    let per_day = (b.rows + b.days - 1) / b.days;
    let step = (DAY / per_day).max(1);
    let rows_sql = rows_sql(b, owners, since, per_day, step);
    // Each day's rollups, from its rows and then from each other, in this order; each statement
    // takes the day's `[$1, $2)`.
    let rollups_sql = [
        minute_sql(),
        user_hour_sql(),
        coarser_sql(Table::Userless, 1, HOUR, 0),
        coarser_sql(Table::Userless, 2, DAY, 1),
        coarser_sql(Table::PerUser, 2, DAY, 1),
        app_sql(),
    ];
    let mut last_print = Instant::now();
    for d in 0..b.days {
        let (first, last) = (d * per_day, ((d + 1) * per_day).min(b.rows) - 1);
        if first > last {
            break;
        }
        let day = since + d * DAY;
        let mut tx = store.pool().begin().await?;
        sqlx::query(&rows_sql)
            .bind(first)
            .bind(last)
            .execute(&mut *tx)
            .await?;
        for sql in &rollups_sql {
            sqlx::query(sql)
                .bind(day)
                .bind(day + DAY)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if last_print.elapsed() > Duration::from_secs(10) || d + 1 == b.days {
            println!("  loaded day {}/{} ({} rows)", d + 1, b.days, last + 1);
            last_print = Instant::now();
        }
    }
    Ok(())
}

/// Rows `$1..=$2`: row g is the `g % per_day`-th of day `g / per_day`, at `step` from the one
/// before (`per_day * step <= DAY`, so every day's rows lie in that day and its rollups, computed
/// from that day's rows, count them all); the user, and through it the app, owner and
/// model, from a hash of g; endpoint, status and latency from another.
fn rows_sql(b: &AnalyticsBench, owners: &[i64], since: i64, per_day: i64, step: i64) -> String {
    let owners: Vec<String> = owners.iter().map(i64::to_string).collect();
    let list = |f: fn(i64) -> i64| {
        LATENCIES
            .iter()
            .map(|&v| f(v).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let n = LATENCIES.len();
    format!(
        "INSERT INTO usage_records (id, recipient_id, request_id, transfer_id, app_name, endpoint, \
         user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, \
         latency_ms, upstream_latency_ms, created_at, refused, ttft_ms) \
         SELECT 'b' || g, (ARRAY[{owners}]::bigint[])[1 + (u % {apps}) % {n_owners}], 'r' || g, \
           NULL, 'app-' || (u % {apps}), (ARRAY['/chat','/embed','/search'])[1 + h2 % 3], \
           'user' || u || '@bench.example', 'model-' || (u % 4), 50 + h1 % 500, 10 + h2 % 300, \
           60 + h1 % 500 + h2 % 300, 0, \
           CASE WHEN h2 / 3 % 100 < 90 THEN 'success' WHEN h2 / 3 % 100 < 95 THEN 'upstream_error' \
                WHEN h2 / 3 % 100 < 98 THEN 'timeout' ELSE 'payment_required' END, \
           (ARRAY[{lat}]::bigint[])[1 + h2 / 300 % {n}], (ARRAY[{up}]::bigint[])[1 + h2 / 300 % {n}], \
           {since} + (g / {per_day}) * {DAY} + (g % {per_day}) * {step}, h2 / 3 % 100 >= 98, \
           CASE WHEN h1 / {users} % 3 = 0 THEN (ARRAY[{ttft}]::bigint[])[1 + h2 / 300 % {n}] END \
         FROM (SELECT g, abs(hashint8(g)::bigint) AS h2, abs(hashint8(-g - 1)::bigint) AS h1, \
                      abs(hashint8(-g - 1)::bigint) % {users} AS u \
               FROM generate_series($1::bigint, $2::bigint) g) x",
        owners = owners.join(","),
        apps = b.apps,
        n_owners = owners.len(),
        users = b.users,
        lat = list(|v| v),
        up = list(upstream_of),
        ttft = list(ttft_of),
    )
}

/// Key columns of the user-less and the per-user rollups (after grain and bucket start).
const KEYS: &str = "recipient_id, app_name, endpoint, model, status";
const USER_KEYS: &str = "recipient_id, app_name, user_email";

#[derive(Clone, Copy)]
enum Table {
    Userless,
    PerUser,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Userless => "usage_rollups",
            Table::PerUser => "usage_user_rollups",
        }
    }

    fn keys(self) -> &'static str {
        match self {
            Table::Userless => KEYS,
            Table::PerUser => USER_KEYS,
        }
    }
}

/// The histogram columns the rows can touch, each with the values that fall in it.
fn hist_buckets() -> BTreeMap<String, (&'static str, Vec<i64>)> {
    let mut out: BTreeMap<String, (&'static str, Vec<i64>)> = BTreeMap::new();
    for &v in &LATENCIES {
        for (m, col, value) in [
            ("lat", "latency_ms", v),
            ("up", "upstream_latency_ms", upstream_of(v)),
            ("ttft", "ttft_ms", ttft_of(v)),
        ] {
            out.entry(format!("h_{m}_{:02}", bucket_of(value)))
                .or_insert((col, Vec::new()))
                .1
                .push(value);
        }
    }
    out
}

/// The summed columns a table's loader writes: its sums, then the histogram buckets the rows can
/// touch.
fn sum_columns(table: Table) -> Vec<String> {
    let sums: &[&str] = match table {
        Table::Userless => &SUM_COLUMNS,
        Table::PerUser => &USER_SUM_COLUMNS,
    };
    sums.iter()
        .map(|c| c.to_string())
        .chain(hist_buckets().into_keys())
        .collect()
}

/// The aggregates of the sums and histogram columns over usage rows `u`.
fn row_sums(table: Table) -> Vec<String> {
    let mut exprs = vec![
        "COUNT(*)".to_string(),
        "SUM(u.prompt_tokens)".into(),
        "SUM(u.completion_tokens)".into(),
        "SUM(u.total_tokens)".into(),
        "SUM(u.cost)".into(),
        "0".into(),
        "SUM(u.latency_ms)".into(),
        "COUNT(u.ttft_ms)".into(),
    ];
    if let Table::PerUser = table {
        exprs.push("COUNT(*) FILTER (WHERE u.status = 'success')".into());
    }
    for (col, values) in hist_buckets().values() {
        let vs: Vec<String> = values.iter().map(i64::to_string).collect();
        // NULL, not 0, when no row is in the bucket: what the writer leaves (migration 0014).
        exprs.push(format!(
            "SUM(CASE WHEN u.{col} IN ({}) THEN 1 END)",
            vs.join(",")
        ));
    }
    exprs
}

/// User-less minute rollups of the rows created in `[$1, $2)`, with their active-user sketches:
/// each distinct user's register and rank computed once (`hll::sql_index`, `hll::sql_rank`, the
/// writer's hash), then the highest rank per register.
fn minute_sql() -> String {
    let regs: Vec<String> = register_columns().collect();
    let mut exprs = row_sums(Table::Userless);
    exprs.extend((0..REGISTERS).map(|i| format!("MAX(CASE WHEN s.i = {i} THEN s.rk END)")));
    format!(
        "WITH s AS MATERIALIZED (SELECT e.user_email, {} AS i, {} AS rk FROM \
           (SELECT DISTINCT user_email FROM usage_records \
            WHERE created_at >= $1 AND created_at < $2) e) \
         INSERT INTO usage_rollups (grain, bucket_start, {KEYS}, {}, {}) \
         SELECT 0, u.created_at / {MINUTE} * {MINUTE}, u.{}, {} \
         FROM usage_records u LEFT JOIN s ON s.user_email = u.user_email \
         WHERE u.created_at >= $1 AND u.created_at < $2 GROUP BY 2, {}",
        sql_index("e.user_email"),
        sql_rank("e.user_email"),
        sum_columns(Table::Userless).join(", "),
        regs.join(", "),
        KEYS.replace(", ", ", u."),
        exprs.join(", "),
        KEYS.split(", ")
            .map(|k| format!("u.{k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Per-user hour rollups of the rows created in `[$1, $2)`.
fn user_hour_sql() -> String {
    format!(
        "INSERT INTO usage_user_rollups (grain, bucket_start, {USER_KEYS}, {}) \
         SELECT 1, u.created_at / {HOUR} * {HOUR}, u.{}, {} FROM usage_records u \
         WHERE u.created_at >= $1 AND u.created_at < $2 GROUP BY 2, {}",
        sum_columns(Table::PerUser).join(", "),
        USER_KEYS.replace(", ", ", u."),
        row_sums(Table::PerUser).join(", "),
        USER_KEYS
            .split(", ")
            .map(|k| format!("u.{k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Per-app rollups (migration 0020) of every grain in `[$1, $2)`, summed from the user-less ones
/// (sketches: maximum).
fn app_sql() -> String {
    let summed: Vec<String> = SUM_COLUMNS
        .iter()
        .map(|c| c.to_string())
        .chain(hist_buckets().into_keys())
        .collect();
    let regs: Vec<String> = register_columns().collect();
    let aggs: Vec<String> = summed
        .iter()
        .map(|c| format!("SUM({c})"))
        .chain(["SUM(CASE WHEN status = 'success' THEN requests ELSE 0 END)".into()])
        .chain(regs.iter().map(|c| format!("MAX({c})")))
        .collect();
    format!(
        "INSERT INTO usage_app_rollups (grain, bucket_start, recipient_id, app_name, {}, \
         successes, {}) \
         SELECT grain, bucket_start, recipient_id, app_name, {} FROM usage_rollups \
         WHERE bucket_start >= $1 AND bucket_start < $2 \
         GROUP BY grain, bucket_start, recipient_id, app_name",
        summed.join(", "),
        regs.join(", "),
        aggs.join(", ")
    )
}

/// Rollups of grain `grain` summed from those of grain `from` in `[$1, $2)` (sketches: maximum).
fn coarser_sql(table: Table, grain: i16, micros: i64, from: i16) -> String {
    let mut cols = sum_columns(table);
    let mut aggs: Vec<String> = cols.iter().map(|c| format!("SUM({c})")).collect();
    if let Table::Userless = table {
        for c in register_columns() {
            aggs.push(format!("MAX({c})"));
            cols.push(c);
        }
    }
    let (name, keys) = (table.name(), table.keys());
    format!(
        "INSERT INTO {name} (grain, bucket_start, {keys}, {}) \
         SELECT {grain}, bucket_start / {micros} * {micros}, {keys}, {} FROM {name} \
         WHERE grain = {from} AND bucket_start >= $1 AND bucket_start < $2 GROUP BY 2, {keys}",
        cols.join(", "),
        aggs.join(", ")
    )
}
