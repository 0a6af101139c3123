//! Deleting what the alerts no longer need: finished events past their retention, with their
//! attempts (the delivery log shows them that long).

use sqlx::AnyPool;

use crate::error::Result;

/// How long a finished event (delivered or given up) and its attempts are kept: the delivery log
/// (`ListAlertDeliveries`) shows them that long.
pub const RETENTION_MICROS: i64 = 30 * 86_400 * 1_000_000;
/// Events deleted per statement.
const PURGE_BATCH: i64 = 1_000;

/// Gives up the pending events of removed endpoints, then deletes the events that finished before
/// `now - RETENTION_MICROS`, with their attempts, a batch at a time; returns how many events were
/// deleted. Pending events are never deleted.
pub(crate) async fn purge_finished(pool: &AnyPool, now: i64) -> Result<u64> {
    // An event written while its endpoint was being removed (the removal's statement did not
    // see it yet) would stay pending for ever: never claimed, never finished. It is given up
    // here, as the removal gives up its endpoint's events.
    sqlx::query(
        "UPDATE alert_events SET status = 'FAILED', finished_at = $1, lease_owner = NULL, \
         lease_until = NULL WHERE status = 'PENDING' AND endpoint_id IN \
         (SELECT id FROM alert_endpoints WHERE removed_at IS NOT NULL)",
    )
    .bind(now)
    .execute(pool)
    .await?;
    let before = now - RETENTION_MICROS;
    let mut purged = 0;
    loop {
        let mut tx = pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM alert_events WHERE status <> 'PENDING' AND finished_at < $1 LIMIT $2",
        )
        .bind(before)
        .bind(PURGE_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            return Ok(purged);
        }
        let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let list = marks.join(", ");
        for table_key in ["alert_deliveries WHERE event_id", "alert_events WHERE id"] {
            let sql = format!("DELETE FROM {table_key} IN ({list})");
            let mut q = sqlx::query(&sql);
            for id in &ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        purged += ids.len() as u64;
        if (ids.len() as i64) < PURGE_BATCH {
            return Ok(purged);
        }
    }
}
