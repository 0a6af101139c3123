//! Usage rows: written with a resolution (same transaction) or alone for a free request.

use sqlx::AnyConnection;

use super::rollup::{upsert_rollups, RollupInput};
use super::{new_id, now_micros, retry_transient, Micros, Store, UsageInput, UsageRow};
use crate::error::{LedgerError, Result};

impl Store {
    /// A usage row without money. A request id already recorded for this user returns the
    /// existing row (request ids are scoped per user, like idempotency keys).
    pub async fn record_usage(&self, recipient_id: i64, usage: &UsageInput) -> Result<UsageRow> {
        let id = new_id();
        let now = now_micros();
        retry_transient(|| async {
            let mut tx = self.pool().begin().await?;
            let write = UsageWrite {
                id: &id,
                recipient_id,
                link: UsageLink::None,
                cost: Micros::ZERO,
                held: Micros::ZERO,
                usage,
                now,
            };
            insert_usage(&mut tx, &write).await?;
            tx.commit().await
        })
        .await?;
        self.usage_by_request(recipient_id, &usage.user_email, &usage.request_id)
            .await?
            .ok_or_else(|| LedgerError::Internal("usage row vanished".into()))
    }
}

/// The transfer a usage row belongs to.
#[derive(Clone, Copy)]
pub(crate) enum UsageLink<'a> {
    /// A free request.
    None,
    /// A local transfer (`transfers`).
    Transfer(&'a str),
    /// A transfer of the hosted backend (`hosted_transfers`).
    Hosted(&'a str),
}

/// A usage row to write with the money its resolution moved.
pub(crate) struct UsageWrite<'a> {
    pub id: &'a str,
    pub recipient_id: i64,
    pub link: UsageLink<'a>,
    /// Captured micros (the row's cost and the rollups' revenue).
    pub cost: Micros,
    /// The authorized hold; what was not captured is counted as refunded.
    pub held: Micros,
    pub usage: &'a UsageInput,
    pub now: i64,
}

/// Writes a usage row and adds it to the rollups, in the caller's transaction; a request id
/// already recorded for this recipient and user is left as it is (and not counted again).
pub(crate) async fn insert_usage(
    conn: &mut AnyConnection,
    w: &UsageWrite<'_>,
) -> std::result::Result<(), sqlx::Error> {
    let (transfer_id, hosted_transfer_id) = match w.link {
        UsageLink::None => (None, None),
        UsageLink::Transfer(t) => (Some(t), None),
        UsageLink::Hosted(t) => (None, Some(t)),
    };
    let u = w.usage;
    let inserted = sqlx::query(
        "INSERT INTO usage_records (id, recipient_id, request_id, transfer_id, app_name, endpoint, \
         user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, \
         upstream_latency_ms, created_at, hosted_transfer_id, ttft_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT (recipient_id, user_email, request_id) DO NOTHING",
    )
    .bind(w.id)
    .bind(w.recipient_id)
    .bind(&u.request_id)
    .bind(transfer_id)
    .bind(&u.app_name)
    .bind(&u.endpoint)
    .bind(&u.user_email)
    .bind(&u.model)
    .bind(u.prompt_tokens)
    .bind(u.completion_tokens)
    .bind(u.total_tokens)
    .bind(w.cost)
    .bind(&u.status)
    .bind(u.latency_ms)
    .bind(u.upstream_latency_ms)
    .bind(w.now)
    .bind(hosted_transfer_id)
    .bind(u.ttft_ms)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        let row = RollupInput {
            recipient_id: w.recipient_id,
            created_at: w.now,
            revenue: w.cost.get(),
            refund: w.held.get().saturating_sub(w.cost.get()).max(0),
            usage: u,
        };
        upsert_rollups(conn, std::slice::from_ref(&row)).await?;
    }
    Ok(())
}
