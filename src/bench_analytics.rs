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
use syft_ledger::store::rollup::{bucket_of, DAY, HOUR, MINUTE, SUM_COLUMNS};
use syft_ledger::store::{Dimension, StatsFilter, StatsScope, Store};

use crate::setup::verify_ledger;

#[derive(Args, Debug)]
pub struct AnalyticsBench {
    /// Postgres server URL to create a fresh benchmark database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
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
    /// Keep the database afterwards (its URL is printed) to rerun queries by hand.
    #[arg(long)]
    keep: bool,
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
    anyhow::ensure!(
        b.database_url.starts_with("postgres"),
        "bench analytics loads Postgres"
    );
    anyhow::ensure!(
        b.rows > 0 && b.days > 0 && b.users > 0 && b.apps > 0 && b.owners > 0,
        "rows, days, users, apps and owners must be positive"
    );
    let db = crate::bench::fresh_db(&b.database_url).await?;
    let store = Store::connect(&db.url, 4).await?;
    let mut owners = Vec::new();
    for i in 0..b.owners {
        let a = store
            .create_account(&format!("owner{i}@bench.example"), "bench", "USD", "-")
            .await?;
        owners.push(a.id);
    }
    let now = syft_ledger::store::now_micros();
    let since = (now.div_euclid(DAY) - b.days) * DAY;
    let until = since + b.days * DAY;
    let t0 = Instant::now();
    load(&store, b, &owners, since).await?;
    let load_s = t0.elapsed().as_secs_f64();
    sqlx::query("ANALYZE usage_records, usage_rollups")
        .execute(store.pool())
        .await?;
    let (rollups, size): (i64, String) = sqlx::query_as(
        "SELECT COUNT(*), pg_size_pretty(pg_total_relation_size('usage_rollups')) \
         FROM usage_rollups",
    )
    .fetch_one(store.pool())
    .await?;
    println!(
        "analytics bench: {} rows over {} days loaded in {load_s:.0} s ({:.0} rows/s, set-based); \
         {rollups} rollup rows ({size})",
        b.rows,
        b.days,
        b.rows as f64 / load_s
    );
    let mut worst = 0f64;
    for shape in shapes(b, since, until, owners[0]) {
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
        worst = worst.max(ms(0.99));
        println!(
            "  {:<44} {groups:>6} groups  p50 {:>8.1} ms  p99 {:>8.1} ms",
            shape.name,
            ms(0.5),
            ms(0.99)
        );
    }
    println!(
        "  worst p99 {worst:.1} ms: target <= {TARGET_P99_MS:.0} ms {}",
        if worst <= TARGET_P99_MS {
            "met"
        } else {
            "NOT met"
        }
    );
    store.close().await;
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

/// Loads the rows and their rollups a day at a time, each day in one transaction.
async fn load(store: &Store, b: &AnalyticsBench, owners: &[i64], since: i64) -> anyhow::Result<()> {
    let per_day = (b.rows + b.days - 1) / b.days;
    let step = (DAY / per_day).max(1);
    let rows_sql = rows_sql(b, owners, since, step);
    let minute_sql = minute_sql();
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
        sqlx::query(&minute_sql)
            .bind(day)
            .bind(day + DAY)
            .execute(&mut *tx)
            .await?;
        for (grain, micros, from) in [(1, HOUR, 0), (2, DAY, 1)] {
            sqlx::query(&coarser_sql(grain, micros, from))
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

/// Rows `$1..=$2`: row g at `since + g * step`; the user, and through it the app, owner and
/// model, from a hash of g; endpoint, status and latency from another.
fn rows_sql(b: &AnalyticsBench, owners: &[i64], since: i64, step: i64) -> String {
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
           {since} + g * {step}, h2 / 3 % 100 >= 98, \
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

const KEYS: &str = "recipient_id, app_name, endpoint, user_email, model, status";
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

/// The columns the loader writes: every sum, then the histogram buckets the rows can touch.
fn columns(hist: &BTreeMap<String, (&'static str, Vec<i64>)>) -> String {
    let cols: Vec<&str> = SUM_COLUMNS
        .iter()
        .copied()
        .chain(hist.keys().map(String::as_str))
        .collect();
    cols.join(", ")
}

/// Minute rollups of the rows created in `[$1, $2)`.
fn minute_sql() -> String {
    let hist = hist_buckets();
    let cols = columns(&hist);
    let mut exprs = vec![
        "COUNT(*)".to_string(),
        "SUM(prompt_tokens)".into(),
        "SUM(completion_tokens)".into(),
        "SUM(total_tokens)".into(),
        "SUM(cost)".into(),
        "0".into(),
        "SUM(latency_ms)".into(),
        "COUNT(ttft_ms)".into(),
    ];
    for (col, values) in hist.values() {
        let vs: Vec<String> = values.iter().map(i64::to_string).collect();
        // NULL, not 0, when no row is in the bucket: what the writer leaves (migration 0014).
        exprs.push(format!(
            "SUM(CASE WHEN {col} IN ({}) THEN 1 END)",
            vs.join(",")
        ));
    }
    format!(
        "INSERT INTO usage_rollups (grain, bucket_start, {KEYS}, {}) \
         SELECT 0, created_at / {MINUTE} * {MINUTE}, {KEYS}, {} FROM usage_records \
         WHERE created_at >= $1 AND created_at < $2 GROUP BY 2, {KEYS}",
        cols,
        exprs.join(", ")
    )
}

/// Rollups of grain `grain` summed from those of grain `from` in `[$1, $2)`.
fn coarser_sql(grain: i16, micros: i64, from: i16) -> String {
    let cols = columns(&hist_buckets());
    let sums: Vec<String> = cols.split(", ").map(|c| format!("SUM({c})")).collect();
    format!(
        "INSERT INTO usage_rollups (grain, bucket_start, {KEYS}, {}) \
         SELECT {grain}, bucket_start / {micros} * {micros}, {KEYS}, {} FROM usage_rollups \
         WHERE grain = {from} AND bucket_start >= $1 AND bucket_start < $2 GROUP BY 2, {KEYS}",
        cols,
        sums.join(", ")
    )
}

struct Shape {
    name: String,
    filter: StatsFilter,
}

/// Every dashboard query shape: each dimension alone, the pairs the dashboard and CLI use, the
/// three scopes and the filters, over the whole loaded range (hour buckets: the last 7 days, as the
/// dashboard's hourly chart), plus the dashboard's default "last 30 days to now" (unaligned edges).
fn shapes(b: &AnalyticsBench, since: i64, until: i64, owner: i64) -> Vec<Shape> {
    use Dimension::*;
    let base = StatsFilter {
        scope: StatsScope::All,
        since,
        until,
        group_by: Vec::new(),
        app_name: None,
        endpoint: None,
        user_email: None,
        model: None,
        status: None,
        limit: syft_ledger::core::MAX_GROUPS + 1,
    };
    let mut out = Vec::new();
    let mut add = |name: &str, f: StatsFilter| {
        out.push(Shape {
            name: name.to_string(),
            filter: f,
        })
    };
    let by = |dims: &[Dimension]| StatsFilter {
        group_by: dims.to_vec(),
        ..base.clone()
    };
    add("admin: totals", by(&[]));
    for (name, d) in [
        ("admin: by day", Day),
        ("admin: by app", App),
        ("admin: by endpoint", Endpoint),
        ("admin: by user", User),
        ("admin: by model", Model),
        ("admin: by status", Status),
    ] {
        add(name, by(&[d]));
    }
    for (name, d) in [
        ("admin: day x app", [Day, App]),
        ("admin: day x status", [Day, Status]),
        ("admin: day x model", [Day, Model]),
        ("admin: app x endpoint", [App, Endpoint]),
        ("admin: app x user", [App, User]),
        ("admin: model x status", [Model, Status]),
    ] {
        add(name, by(&d));
    }
    let week = StatsFilter {
        since: until - 7 * DAY,
        ..by(&[Hour])
    };
    add("admin: by hour, last 7 days", week.clone());
    add(
        "admin: hour x app, last 7 days",
        StatsFilter {
            group_by: vec![Hour, App],
            ..week
        },
    );
    let owner_scope = |dims: &[Dimension]| StatsFilter {
        scope: StatsScope::Owner(owner),
        ..by(dims)
    };
    add("owner: by day", owner_scope(&[Day]));
    add("owner: app x endpoint", owner_scope(&[App, Endpoint]));
    add("owner: by user (top users)", owner_scope(&[User]));
    add("owner: day x app", owner_scope(&[Day, App]));
    let user = format!("user{}@bench.example", b.users / 2);
    add(
        "user: day x app",
        StatsFilter {
            scope: StatsScope::User(user.clone()),
            ..by(&[Day, App])
        },
    );
    add(
        "filter app: by day",
        StatsFilter {
            app_name: Some("app-1".into()),
            ..by(&[Day])
        },
    );
    add(
        "filter model+status: by app",
        StatsFilter {
            model: Some("model-2".into()),
            status: Some("success".into()),
            ..by(&[App])
        },
    );
    add(
        "filter user: by day",
        StatsFilter {
            user_email: Some(user),
            ..by(&[Day])
        },
    );
    let now = syft_ledger::store::now_micros().div_euclid(MINUTE) * MINUTE;
    add(
        "admin: by day, last 30 days to now",
        StatsFilter {
            since: now - 30 * DAY,
            until: now,
            ..by(&[Day])
        },
    );
    out
}
