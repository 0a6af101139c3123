//! The resolve half of the Postgres write path (`batch.rs`): captures and voids of one batch as
//! one statement, with their usage rows and stored answers.

use serde_json::json;
use sqlx::{AnyPool, FromRow, Row};

use super::batch::ResolveJob;
use super::rollup;
use super::rollup_fold::QUEUE_INSERTED;
use super::usage::PAID_TRANSFER;
use super::{Backend, TransferRow, UsageInput, TRANSFER_COLUMNS, UNRESOLVED};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// `None` for a job whose transfer was not pending (or not the caller's, or past its time guard).
pub(super) async fn resolve_batch(
    pool: &AnyPool,
    resolves: &[&ResolveJob],
) -> Result<Vec<Option<TransferRow>>, sqlx::Error> {
    let empty = UsageInput::default();
    let input: Vec<_> = resolves
        .iter()
        .enumerate()
        .map(|(n, j)| {
            let u = j.usage.as_ref().unwrap_or(&empty);
            // Bytes travel in the JSON parameter as base64 (`decode(…, 'base64')` in SQL).
            let answer = j.answer.as_ref().map(|a| BASE64.encode(&a.body));
            let answer_expires = j.answer.as_ref().map(|a| a.expires_at);
            json!({"in_answer": answer, "in_answer_expires": answer_expires,"in_n": n, "in_id": j.transfer_id, "in_recipient": j.recipient_id, "in_status": j.status.as_str(),
                   "in_captured": j.captured, "in_resolved_by": j.resolved_by.as_str(), "in_reason": j.reason,
                   "in_now": j.now, "in_guard": j.guard as i32, "in_usage_id": j.usage_id,
                   "in_has_usage": j.usage.is_some(), "in_refused": super::usage::is_refused(u), "in_request_id": u.request_id,
                   "in_endpoint": u.endpoint, "in_model": u.model,
                   "in_pt": u.prompt_tokens, "in_ct": u.completion_tokens, "in_tt": u.total_tokens,
                   "in_ustatus": u.status, "in_lat": u.latency_ms, "in_ulat": u.upstream_latency_ms,
                   "in_ttft": u.ttft_ms})
        })
        .collect();
    // The statement queues the usage rows it inserted for the rollups (`q`, rollup_fold.rs).
    let rows = sqlx::query(&RESOLVE_BATCH)
        .bind(serde_json::Value::Array(input).to_string())
        .bind(rollup::enabled())
        .fetch_all(pool)
        .await?;
    let mut results = vec![None; resolves.len()];
    for row in rows {
        let n: i32 = row.try_get("in_n")?;
        results[n as usize] = Some(TransferRow::from_row(&row)?);
    }
    Ok(results)
}

/// Captures and voids a batch. A usage row names the transfer's payer and app, not the
/// recording account's word for them (`UsageInput::of_transfer`). Account and token updates are aggregated so several resolutions for
/// one sender or one recipient in a batch move the right totals. The recipient is credited here,
/// once per batch: its row lock is held from that update to the commit, so a busy recipient's
/// batches take turns, and each turn carries every capture that arrived meanwhile. Only captures
/// lock their recipient (a void or an expiry credits nobody). Accounts are locked `FOR NO KEY
/// UPDATE`, all the update needs, which leaves the key-share locks of concurrent inserts that
/// point at them (holds, usage rows) free to proceed. A capture's answer (`in_answer`) is inserted by the
/// same statement, so it commits exactly with its capture. Data-modifying CTEs always run to completion, so the
/// final SELECT reads only what the caller needs. The `lock_*` steps take row locks in a global order
/// (transfers, tokens, accounts; each by id) before anything is modified. A transfer is locked
/// whatever its status and kept only if the locked row is pending; the update then finds the locked
/// rows by primary key (`= ANY(ARRAY(…))`; `AUTHORIZE_BATCH` in batch.rs says why not `IN`) and
/// still requires the row unresolved, so nothing changed but how the rows are found.
///
/// Both steps say "unresolved" as [`UNRESOLVED`], `NOT IN ('COMPLETED', 'CANCELLED')`. Written as
/// `= 'PENDING'`, the clause matches the predicate of the partial index `transfers_pending_expiry`,
/// and the planner took that index: for the update, a bitmap scan of every pending hold's index
/// entry (dead ones included until vacuum) joined by hash to the batch. Seen with `auto_explain` in
/// a paid run of 64 payers: 14,479 index entries and 744 heap pages read for a batch of 30, half
/// the statement's time (docs/benchmarks.md). Every statement that finds a transfer by id and
/// requires it pending (`transfer.rs`, `extend.rs`) uses the same constant.
///
/// A capture must find its hold unexpired by the database's clock read once every lock is taken
/// (the `{clock}` subquery waits for `lock_accounts`), not only by the clock its caller read before
/// the statement: a capture that waited on its sender's lock while a budgeted hold of that sender
/// counted this one as expired would otherwise commit after all (`Backend::clock_micros_sql`).
static RESOLVE_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let clock = Backend::Postgres.clock_micros_sql();
    format!(
        "\
WITH input AS (
    SELECT * FROM json_to_recordset($1::json) AS i(in_n int, in_id text, in_recipient bigint,
        in_status text, in_captured bigint, in_resolved_by text, in_reason text, in_now bigint,
        in_guard int, in_usage_id text, in_has_usage boolean, in_refused boolean, in_request_id text,
        in_endpoint text, in_model text, in_pt bigint, in_ct bigint, in_tt bigint,
        in_ustatus text, in_lat bigint, in_ulat bigint, in_ttft bigint, in_answer text,
        in_answer_expires bigint)
), lock_transfers AS (
    SELECT l.* FROM (SELECT DISTINCT in_id FROM input ORDER BY in_id) i
    CROSS JOIN LATERAL (SELECT id, sender_id, recipient_id, token_id, status FROM transfers
                        WHERE id = i.in_id FOR UPDATE) l
    WHERE l.{UNRESOLVED}
), lock_tokens AS (
    SELECT k.* FROM (SELECT DISTINCT token_id FROM lock_transfers
                     WHERE token_id IS NOT NULL ORDER BY token_id) x
    CROSS JOIN LATERAL (SELECT id FROM tokens WHERE id = x.token_id FOR UPDATE) k
), lock_accounts AS (
    SELECT a.* FROM (SELECT id FROM (SELECT sender_id AS id FROM lock_transfers
                                     UNION
                                     SELECT l.recipient_id FROM lock_transfers l
                                     JOIN input i ON i.in_id = l.id
                                     WHERE i.in_status = 'COMPLETED') p
                     WHERE (SELECT COUNT(*) FROM lock_tokens) >= 0 ORDER BY id) x
    CROSS JOIN LATERAL (SELECT id FROM accounts WHERE id = x.id FOR NO KEY UPDATE) a
), t AS (
    UPDATE transfers t SET status = i.in_status,
        captured = CASE WHEN i.in_captured < 0 THEN t.amount ELSE i.in_captured END,
        resolved_by = i.in_resolved_by, resolved_at = i.in_now, cancel_reason = i.in_reason
    FROM input i
    WHERE t.id = ANY(ARRAY(SELECT id FROM lock_transfers)) AND t.id = i.in_id
      AND (SELECT COUNT(*) FROM lock_accounts) >= 0
      AND (i.in_recipient < 0 OR t.recipient_id = i.in_recipient)
      AND t.{UNRESOLVED} AND i.in_captured <= t.amount
      AND (i.in_status <> 'COMPLETED' OR t.created_by = i.in_resolved_by)
      AND CASE i.in_guard WHEN 1 THEN t.expires_at > GREATEST(i.in_now, (SELECT {clock}
                                         WHERE (SELECT COUNT(*) FROM lock_accounts) >= 0))
                          WHEN 2 THEN t.expires_at <= i.in_now ELSE TRUE END
    RETURNING t.*, i.*
), k AS (
    UPDATE tokens k SET held = k.held - x.amount, spent = k.spent + x.captured
    FROM (SELECT token_id, CAST(SUM(amount) AS BIGINT) AS amount, CAST(SUM(captured) AS BIGINT) AS captured
          FROM t WHERE token_id IS NOT NULL GROUP BY token_id) x
    WHERE k.id = x.token_id
    RETURNING k.id
), s AS (
    UPDATE accounts a SET balance = a.balance + x.credit, held = a.held - x.released
    FROM (SELECT id, CAST(SUM(credit) AS BIGINT) AS credit, CAST(SUM(released) AS BIGINT) AS released
          FROM (SELECT sender_id AS id, -captured AS credit, amount AS released FROM t
                UNION ALL
                SELECT recipient_id, captured, 0 FROM t WHERE captured > 0) d
          GROUP BY id) x
    WHERE a.id = x.id
    RETURNING a.id
), j AS (
    INSERT INTO journal (account_id, amount, kind, ref_id, created_at)
    SELECT sender_id, -captured, 'capture', id, in_now FROM t WHERE captured > 0
    UNION ALL
    SELECT recipient_id, captured, 'capture', id, in_now FROM t WHERE captured > 0
    RETURNING id
), u AS (
    INSERT INTO usage_records (id, recipient_id, request_id, transfer_id, app_name, endpoint, user_email,
        model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms,
        upstream_latency_ms, created_at, ttft_ms, refused)
    SELECT in_usage_id, t.recipient_id, in_request_id, t.id, t.app_name, in_endpoint, ua.email,
        in_model, in_pt, in_ct, in_tt, captured, in_ustatus, in_lat, in_ulat, in_now, in_ttft,
        in_refused
    FROM t JOIN accounts ua ON ua.id = t.sender_id WHERE in_has_usage
    ON CONFLICT {PAID_TRANSFER} DO NOTHING
    RETURNING id
), a AS (
    INSERT INTO answers (transfer_id, recipient_id, body, created_at, expires_at)
    SELECT id, recipient_id, decode(in_answer, 'base64'), in_now, in_answer_expires
    FROM t WHERE in_answer IS NOT NULL AND status = 'COMPLETED'
    ON CONFLICT (transfer_id) DO NOTHING
    RETURNING transfer_id
), q AS (
    {QUEUE_INSERTED}
)
SELECT {TRANSFER_COLUMNS}, t.in_n
FROM t JOIN accounts sa ON sa.id = t.sender_id JOIN accounts ra ON ra.id = t.recipient_id"
    )
});

#[cfg(test)]
mod tests {
    use super::RESOLVE_BATCH;
    use crate::store::batch::connect;
    use crate::Store;

    /// The plan Postgres caches for the resolve statement on a batch connection (a generic plan:
    /// prepared statements switch to one after five executions).
    async fn cached_plan(url: &str) -> String {
        let options = sqlx::any::AnyPoolOptions::new();
        let pool = connect(options, url, 1).await.expect("batch pool");
        let mut conn = pool.acquire().await.expect("connection");
        let prepare = format!("PREPARE resolve_batch(json, boolean) AS {}", *RESOLVE_BATCH);
        for sql in ["SET plan_cache_mode = force_generic_plan", &prepare] {
            sqlx::query(sql).execute(&mut *conn).await.expect(sql);
        }
        let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE resolve_batch('[]', TRUE)")
            .fetch_all(&mut *conn)
            .await
            .expect("explain");
        drop(conn);
        pool.close().await;
        plan.join("\n")
    }

    /// Captures find their transfers by primary key, on a young database (empty tables, never
    /// analyzed: a plan cached then is kept as the table grows) and on one in use (20,000 resolved
    /// transfers, 40 pending, statistics fresh). Never by a scan of the whole table, nor through
    /// the partial index of pending holds, which reads every pending hold (and every dead entry
    /// until vacuum) on each capture.
    #[tokio::test]
    async fn captures_find_their_transfers_by_primary_key() {
        let Some(db) = syft_testkit::Db::postgres().await else {
            return;
        };
        let store = Store::connect(&db.url, 2).await.expect("connect");
        let young = cached_plan(&db.url).await;
        for sql in [
            "INSERT INTO accounts (email, organization, currency, secret_hash, created_at) \
             VALUES ('a@example.com', '', 'USD', 'a', 0), ('b@example.com', '', 'USD', 'b', 0)",
            "INSERT INTO transfers (id, sender_id, recipient_id, amount, currency, status, created_by, \
                 app_name, app_ep_path, idempotency_key, request_hash, created_at, expires_at) \
             SELECT 't' || g, a.id, b.id, 10, 'USD', \
                 CASE WHEN g % 500 = 0 THEN 'PENDING' ELSE 'COMPLETED' END, 'RECIPIENT', 'app', \
                 '/chat', 'k' || g, 'h', g, g + 1000000 \
             FROM generate_series(1, 20000) g, accounts a, accounts b \
             WHERE a.email = 'a@example.com' AND b.email = 'b@example.com'",
            "ANALYZE transfers",
        ] {
            sqlx::query(sql).execute(store.pool()).await.expect(sql);
        }
        let in_use = cached_plan(&db.url).await;
        store.pool().close().await;
        db.drop_postgres().await;
        for (age, plan) in [("young", young), ("in use", in_use)] {
            for wrong in ["transfers_pending_expiry", "Seq Scan on transfers"] {
                assert!(!plan.contains(wrong), "{age}: {wrong} in\n{plan}");
            }
            assert!(plan.contains("transfers_pkey"), "{age}:\n{plan}");
        }
    }
}
