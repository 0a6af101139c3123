//! History for `bench ledger --shape budgeted`: a month of earlier transfers of the one pair, so
//! that each budgeted hold counts what a heavy user's month holds.

use anyhow::Context;
use chrono::{Datelike, TimeZone, Utc};
use sqlx::Connection;

const DAY_MICROS: i64 = 86_400_000_000;

/// Inserts `n` voided holds of the benchmark's one sender to its one recipient, spread over the
/// days of this UTC month before today (on the 1st, over the hour before now). Voided holds move
/// no money and leave no journal entry, so the ledger still verifies; the budget check reads them
/// like any other transfer of the pair.
pub(crate) async fn load(database_url: &str, n: u32) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let mut conn = sqlx::AnyConnection::connect(database_url)
        .await
        .context("connect to the benchmark database")?;
    let (sender, token, currency): (i64, String, String) = sqlx::query_as(
        "SELECT k.sender_id, k.id, a.currency FROM tokens k JOIN accounts a ON a.id = k.sender_id \
         ORDER BY k.created_at LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .context("the benchmark's token")?;
    let recipient: i64 = sqlx::query_scalar("SELECT recipient_id FROM tokens WHERE id = $1")
        .bind(&token)
        .fetch_one(&mut conn)
        .await?;
    let now = Utc::now();
    let month_start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .context("month start")?
        .timestamp_micros();
    let days = (now.timestamp_micros() - month_start) / DAY_MICROS;
    // Each row's day and second within it; on the 1st, seconds of the last hour.
    let (start, days, spread) = if days == 0 {
        (now.timestamp_micros() - 3_600_000_000, 1, 3_600_i64)
    } else {
        (month_start, days, 86_000)
    };
    let started = std::time::Instant::now();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
         INSERT INTO transfers (id, sender_id, recipient_id, token_id, amount, currency, status, \
             created_by, resolved_by, app_name, app_ep_path, idempotency_key, request_hash, \
             created_at, expires_at, resolved_at, cancel_reason) \
         SELECT 'history-' || i, $2, $3, $4, 10000, $5, 'CANCELLED', 'RECIPIENT', 'RECIPIENT', \
             'bench', '/chat', 'history-' || i, '', \
             $6 + (i % $7) * 86400000000 + (i % $8) * 1000000, \
             $6 + (i % $7) * 86400000000 + (i % $8) * 1000000 + 300000000, \
             $6 + (i % $7) * 86400000000 + (i % $8) * 1000000 + 1000000, 'voided' \
         FROM n",
    )
    .bind(i64::from(n))
    .bind(sender)
    .bind(recipient)
    .bind(&token)
    .bind(&currency)
    .bind(start)
    .bind(days)
    .bind(spread)
    .execute(&mut conn)
    .await
    .context("insert the history")?;
    println!(
        "  history: {n} voided holds over {days} day(s) before today, loaded in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
