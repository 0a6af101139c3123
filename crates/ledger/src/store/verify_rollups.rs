//! `verify`, rollup part: the usage rollups equal the usage rows they count (docs/analytics.md).
//!
//! A usage row commits with its rollups (SQLite) or with its entry in the rollup queue, which the
//! folder turns into rollups and removes in one transaction (Postgres, `rollup_fold.rs`), so on one
//! snapshot the rollups must agree exactly with the rows not queued ([`counted_rows`]). For each rollup table the rows are summed per key at every grain it keeps and
//! the rollups subtracted (`UNION ALL` of both sides with the rollups negated, then `GROUP BY`): a
//! key whose difference is not zero in some measure, or that exists on one side only, is a
//! problem. Histograms are checked by their totals (each measure's buckets add up to the requests
//! it counts); which bucket a value went to is the writer's pure function (`bucket_of`,
//! unit-tested). The active-user sketches of the user-less rollups are recomputed from the rows'
//! user emails and must equal the stored registers.

use std::collections::BTreeMap;
use std::fmt::Write;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::hll::{register_columns, register_of, sql_index, sql_rank, REGISTERS};
use super::is_postgres;
use super::rollup::{
    hist_columns, success_case, Grain, HIST_BUCKETS, MEASURES, SUM_COLUMNS, USER_GRAINS,
    USER_SUM_COLUMNS,
};
use super::rollup_fold::counted_rows;
use crate::error::Result;

/// A rollup key whose stored sums differ from its rows'.
#[derive(sqlx::FromRow)]
struct Mismatch {
    grain: i64,
    bucket_start: i64,
    app_name: String,
    requests: i64,
}

/// What `verify` checks of one rollup table.
struct Checked {
    table: &'static str,
    keys: &'static str,
    sums: &'static [&'static str],
    grains: &'static [Grain],
}

const TABLES: [Checked; 2] = [
    Checked {
        table: "usage_rollups",
        keys: "recipient_id, app_name, endpoint, model, status",
        sums: &SUM_COLUMNS,
        grains: &Grain::ALL,
    },
    Checked {
        table: "usage_user_rollups",
        keys: "recipient_id, app_name, user_email",
        sums: &USER_SUM_COLUMNS,
        grains: &USER_GRAINS,
    },
];

/// Problems found, in words; empty when every rollup equals its rows.
pub(super) async fn rollup_problems(conn: &mut AnyConnection) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for t in &TABLES {
        sums_problems(conn, t, &mut problems).await?;
        hist_problems(conn, t, &mut problems).await?;
    }
    app_problems(conn, &mut problems).await?;
    let bad = if is_postgres(conn) {
        sketch_mismatches_sql(conn).await?
    } else {
        sketch_mismatches_rust(conn).await?
    };
    if bad > 0 {
        problems.push(format!(
            "{bad} usage rollups have active-user sketches that differ from their rows' users"
        ));
    }
    Ok(problems)
}

async fn sums_problems(
    conn: &mut AnyConnection,
    t: &Checked,
    problems: &mut Vec<String>,
) -> Result<()> {
    let keys = t.keys;
    let grains: Vec<String> = t
        .grains
        .iter()
        .map(|g| format!("SELECT {} AS grain, {} AS m", *g as i16, g.micros()))
        .collect();
    let successes = if t.sums.contains(&"successes") {
        format!(", {} AS successes", success_case("u.status", "1"))
    } else {
        String::new()
    };
    // Refunds as the writers count them: what the hold released (held minus captured).
    let raw = format!(
        "SELECT g.grain, (u.created_at / g.m) * g.m AS bucket_start, u.{}, \
         1 AS requests, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost AS revenue, \
         CASE WHEN COALESCE(t.amount, h.amount, u.cost) > u.cost \
              THEN COALESCE(t.amount, h.amount, u.cost) - u.cost ELSE 0 END AS refunds, \
         u.latency_ms AS latency_sum, CASE WHEN u.ttft_ms IS NULL THEN 0 ELSE 1 END AS ttft_count\
         {successes} \
         FROM {} u CROSS JOIN ({}) g \
         LEFT JOIN transfers t ON t.id = u.transfer_id \
         LEFT JOIN hosted_transfers h ON h.id = u.hosted_transfer_id",
        keys.replace(", ", ", u."),
        counted_rows(is_postgres(conn)),
        grains.join(" UNION ALL ")
    );
    let negated: Vec<String> = t.sums.iter().map(|c| format!("-{c}")).collect();
    let differs: Vec<String> = t.sums.iter().map(|c| format!("SUM({c}) <> 0")).collect();
    let sql = format!(
        "SELECT CAST(grain AS BIGINT) AS grain, bucket_start, app_name, \
         CAST(SUM(requests) AS BIGINT) AS requests FROM ( \
           {raw} UNION ALL \
           SELECT grain, bucket_start, {keys}, {} FROM {} \
         ) d GROUP BY grain, bucket_start, {keys} \
         HAVING {} OR COUNT(*) = 1 ORDER BY grain, bucket_start",
        negated.join(", "),
        t.table,
        differs.join(" OR ")
    );
    let bad: Vec<Mismatch> = sqlx::query_as(&sql).fetch_all(&mut *conn).await?;
    if let Some(m) = bad.first() {
        problems.push(format!(
            "{} usage rollups differ from their usage rows (in {}; first: grain {} bucket {} app \
             {:?}, rows minus rollup: {} requests)",
            bad.len(),
            t.table,
            m.grain,
            m.bucket_start,
            m.app_name,
            m.requests
        ));
    }
    Ok(())
}

async fn hist_problems(
    conn: &mut AnyConnection,
    t: &Checked,
    problems: &mut Vec<String>,
) -> Result<()> {
    let hist: Vec<String> = hist_columns().collect();
    let mut check = String::new();
    for (i, (measure, cols)) in MEASURES.iter().zip(hist.chunks(HIST_BUCKETS)).enumerate() {
        let total: Vec<String> = cols.iter().map(|c| format!("COALESCE({c}, 0)")).collect();
        let counted = if *measure == "ttft" {
            "ttft_count"
        } else {
            "requests"
        };
        let _ = write!(
            check,
            "{}{} <> {counted}",
            if i == 0 { "" } else { " OR " },
            total.join(" + ")
        );
    }
    let bad_hist: i64 =
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {} WHERE {check}", t.table))
            .fetch_one(&mut *conn)
            .await?;
    if bad_hist > 0 {
        problems.push(format!(
            "{bad_hist} usage rollups have latency histograms that do not add up to their requests \
             (in {})",
            t.table
        ));
    }
    Ok(())
}

/// The per-app rollups (migration 0020) are the user-less ones summed over endpoint, model and
/// status (sketches merged by maximum); those are checked against the rows above, so this checks
/// the per-app ones against the rows too. One pass: the user-less rollups aggregated per app,
/// fully joined with the per-app rows (a key on one side only is a problem too).
async fn app_problems(conn: &mut AnyConnection, problems: &mut Vec<String>) -> Result<()> {
    const KEYS: [&str; 4] = ["grain", "bucket_start", "recipient_id", "app_name"];
    let summed: Vec<String> = SUM_COLUMNS
        .iter()
        .map(|c| c.to_string())
        .chain(hist_columns())
        .collect();
    let mut aggregated: Vec<String> = summed
        .iter()
        .map(|c| format!("SUM(COALESCE({c}, 0)) AS {c}"))
        .collect();
    aggregated.push(format!(
        "SUM({}) AS successes",
        success_case("status", "requests")
    ));
    aggregated.extend(register_columns().map(|c| format!("MAX({c}) AS {c}")));
    let compared: Vec<String> = summed
        .into_iter()
        .chain(["successes".to_string()])
        .chain(register_columns())
        .collect();
    let differs: Vec<String> = ["x.grain IS NULL".to_string(), "a.grain IS NULL".to_string()]
        .into_iter()
        .chain(
            compared
                .iter()
                .map(|c| format!("COALESCE(a.{c}, 0) <> COALESCE(x.{c}, 0)")),
        )
        .collect();
    let on: Vec<String> = KEYS.iter().map(|k| format!("x.{k} = a.{k}")).collect();
    let sql = format!(
        "SELECT COUNT(*) FROM ( \
           SELECT {keys}, {} FROM usage_rollups GROUP BY {keys}) x \
         FULL JOIN usage_app_rollups a ON {} WHERE {}",
        aggregated.join(", "),
        on.join(" AND "),
        differs.join(" OR "),
        keys = KEYS.join(", "),
    );
    let bad: i64 = sqlx::query_scalar(&sql).fetch_one(&mut *conn).await?;
    if bad > 0 {
        problems.push(format!(
            "{bad} per-app usage rollups differ from the user-less rollups of their app \
             (usage_app_rollups)"
        ));
    }
    Ok(())
}

const USERLESS_KEYS: &str = "recipient_id, app_name, endpoint, model, status";

/// Postgres: the registers of every user-less rollup recomputed in SQL (SHA-256 of each distinct
/// user once, then the highest rank per key and register) and compared; the count that differ.
async fn sketch_mismatches_sql(conn: &mut AnyConnection) -> Result<i64> {
    let grains: Vec<String> = Grain::ALL
        .iter()
        .map(|g| format!("SELECT {} AS grain, {} AS m", *g as i16, g.micros()))
        .collect();
    let pivot: Vec<String> = (0..REGISTERS)
        .map(|i| format!("MAX(CASE WHEN i = {i} THEN rk END) AS u_{i:03}"))
        .collect();
    let differ: Vec<String> = register_columns()
        .map(|c| format!("COALESCE(r.{c}, 0) <> COALESCE(x.{c}, 0)"))
        .collect();
    let join: Vec<String> = ["grain", "bucket_start"]
        .into_iter()
        .chain(USERLESS_KEYS.split(", "))
        .map(|k| format!("x.{k} = r.{k}"))
        .collect();
    let counted = counted_rows(true);
    let sql = format!(
        "WITH users AS MATERIALIZED ( \
           SELECT e.user_email, {} AS i, {} AS rk \
           FROM (SELECT DISTINCT user_email FROM {counted} e0 WHERE user_email <> '') e), \
         ranks AS ( \
           SELECT g.grain, (u.created_at / g.m) * g.m AS bucket_start, u.{}, s.i, MAX(s.rk) AS rk \
           FROM {counted} u JOIN users s ON s.user_email = u.user_email \
           CROSS JOIN ({}) g GROUP BY 1, 2, 3, 4, 5, 6, 7, 8), \
         x AS (SELECT grain, bucket_start, {USERLESS_KEYS}, {} FROM ranks \
               GROUP BY grain, bucket_start, {USERLESS_KEYS}) \
         SELECT COUNT(*) FROM usage_rollups r LEFT JOIN x ON {} WHERE {}",
        sql_index("e.user_email"),
        sql_rank("e.user_email"),
        USERLESS_KEYS.replace(", ", ", u."),
        grains.join(" UNION ALL "),
        pivot.join(", "),
        join.join(" AND "),
        differ.join(" OR ")
    );
    Ok(sqlx::query_scalar(&sql).fetch_one(&mut *conn).await?)
}

/// (grain, bucket start, recipient, app, endpoint, model, status).
type SketchKey = (i64, i64, i64, String, String, String, String);

/// The key of a row at `grain` with columns `bucket_start` and [`USERLESS_KEYS`].
fn sketch_key(grain: i64, row: &AnyRow) -> Result<SketchKey> {
    Ok((
        grain,
        row.try_get("bucket_start")?,
        row.try_get("recipient_id")?,
        row.try_get("app_name")?,
        row.try_get("endpoint")?,
        row.try_get("model")?,
        row.try_get("status")?,
    ))
}

/// SQLite (no SHA-256 in SQL; ledgers there are small): the registers recomputed here from the
/// distinct users of each key and grain, compared with the stored ones.
async fn sketch_mismatches_rust(conn: &mut AnyConnection) -> Result<i64> {
    let mut want: BTreeMap<SketchKey, Vec<u8>> = BTreeMap::new();
    for g in Grain::ALL {
        let sql = format!(
            "SELECT DISTINCT (created_at / {m}) * {m} AS bucket_start, {USERLESS_KEYS}, \
             user_email FROM usage_records",
            m = g.micros()
        );
        for row in sqlx::query(&sql).fetch_all(&mut *conn).await? {
            let registers = want
                .entry(sketch_key(g as i64, &row)?)
                .or_insert_with(|| vec![0; REGISTERS]);
            let email: String = row.try_get("user_email")?;
            if let Some((i, rank)) = register_of(&email) {
                registers[i] = registers[i].max(rank);
            }
        }
    }
    let cols: Vec<String> = register_columns().collect();
    let sql = format!(
        "SELECT CAST(grain AS BIGINT) AS grain, bucket_start, {USERLESS_KEYS}, {} \
         FROM usage_rollups",
        cols.join(", ")
    );
    let mut bad = 0;
    for row in sqlx::query(&sql).fetch_all(&mut *conn).await? {
        let key = sketch_key(row.try_get("grain")?, &row)?;
        let mut stored = vec![0u8; REGISTERS];
        for (r, c) in stored.iter_mut().zip(&cols) {
            let v: Option<i64> = row.try_get(c.as_str())?;
            *r = v.unwrap_or(0).clamp(0, 255) as u8;
        }
        let expected = want
            .get(&key)
            .cloned()
            .unwrap_or_else(|| vec![0; REGISTERS]);
        if stored != expected {
            bad += 1;
        }
    }
    Ok(bad)
}
