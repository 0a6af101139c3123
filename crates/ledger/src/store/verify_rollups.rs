//! `verify`, rollup part: the usage rollups equal the usage rows they count (docs/analytics.md).
//!
//! Every rollup is written in the same transaction as its rows, so on one snapshot the two must
//! agree exactly. The rows are summed per key at every grain and the rollups subtracted
//! (`UNION ALL` of both sides with the rollups negated, then `GROUP BY`): a key whose difference is
//! not zero in some measure, or that exists on one side only, is a problem. Histograms are checked
//! by their totals (each measure's buckets add up to the requests it counts); which bucket a value
//! went to is the writer's pure function (`bucket_of`, unit-tested).

use std::fmt::Write;

use sqlx::AnyConnection;

use super::rollup::{hist_columns, Grain, HIST_BUCKETS, MEASURES, SUM_COLUMNS};
use crate::error::Result;

/// A rollup key whose stored sums differ from its rows'.
#[derive(sqlx::FromRow)]
struct Mismatch {
    grain: i64,
    bucket_start: i64,
    app_name: String,
    user_email: String,
    status: String,
    requests: i64,
}

/// Problems found, in words; empty when every rollup equals its rows.
pub(super) async fn rollup_problems(conn: &mut AnyConnection) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let keys = "recipient_id, app_name, endpoint, user_email, model, status";
    let grains: Vec<String> = Grain::ALL
        .iter()
        .map(|g| format!("SELECT {} AS grain, {} AS m", *g as i16, g.micros()))
        .collect();
    // Refunds as the writers count them: what the hold released (held minus captured).
    let raw = format!(
        "SELECT g.grain, (u.created_at / g.m) * g.m AS bucket_start, u.{}, \
         1 AS requests, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost AS revenue, \
         CASE WHEN COALESCE(t.amount, h.amount, u.cost) > u.cost \
              THEN COALESCE(t.amount, h.amount, u.cost) - u.cost ELSE 0 END AS refunds, \
         u.latency_ms AS latency_sum, CASE WHEN u.ttft_ms IS NULL THEN 0 ELSE 1 END AS ttft_count \
         FROM usage_records u CROSS JOIN ({}) g \
         LEFT JOIN transfers t ON t.id = u.transfer_id \
         LEFT JOIN hosted_transfers h ON h.id = u.hosted_transfer_id",
        keys.replace(", ", ", u."),
        grains.join(" UNION ALL ")
    );
    let negated: Vec<String> = SUM_COLUMNS.iter().map(|c| format!("-{c}")).collect();
    let differs: Vec<String> = SUM_COLUMNS
        .iter()
        .map(|c| format!("SUM({c}) <> 0"))
        .collect();
    let sql = format!(
        "SELECT CAST(grain AS BIGINT) AS grain, bucket_start, app_name, user_email, status, \
         CAST(SUM(requests) AS BIGINT) AS requests FROM ( \
           {raw} UNION ALL \
           SELECT grain, bucket_start, {keys}, {} FROM usage_rollups \
         ) d GROUP BY grain, bucket_start, {keys} \
         HAVING {} OR COUNT(*) = 1 ORDER BY grain, bucket_start",
        negated.join(", "),
        differs.join(" OR ")
    );
    let bad: Vec<Mismatch> = sqlx::query_as(&sql).fetch_all(&mut *conn).await?;
    if let Some(m) = bad.first() {
        problems.push(format!(
            "{} usage rollups differ from their usage rows (first: grain {} bucket {} app {:?} \
             user {:?} status {:?}, rows minus rollup: {} requests)",
            bad.len(),
            m.grain,
            m.bucket_start,
            m.app_name,
            m.user_email,
            m.status,
            m.requests
        ));
    }
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
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM usage_rollups WHERE {check}"))
            .fetch_one(&mut *conn)
            .await?;
    if bad_hist > 0 {
        problems.push(format!(
            "{bad_hist} usage rollups have latency histograms that do not add up to their requests"
        ));
    }
    Ok(problems)
}
