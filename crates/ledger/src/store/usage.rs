//! Usage rows: written with a resolution (same transaction) or alone for a free request.

use sqlx::AnyConnection;
use syft_error::UsageStatus;

use super::rollup::RollupInput;
use super::rollup_fold::add_to_rollups;
use super::usage_batch::UsageJob;
use super::{new_id_at, Identity, Micros, Store, UsageInput, UsageRow};
use crate::error::{LedgerError, Result};

/// How far back a free row may be dated by its recorder: a spool that ships after an outage of
/// up to a month keeps its rows' times. (Older rows are dated by the ledger: their hours' rollups
/// are long read, and a recorder's clock that far off is wrong.)
pub const MAX_ANSWER_AGE_MICROS: i64 = 30 * 86_400 * 1_000_000;

impl Store {
    /// A usage row without money, written through the group-commit writer (`usage_batch.rs`):
    /// returns once its batch committed. A request id already recorded for this user by a free
    /// row returns the existing row (request ids are scoped per user, like idempotency keys), and
    /// so does a row key already recorded for this recipient; refusals get a row of their own
    /// unless their row key was recorded.
    ///
    /// `answered_at`: when the recorder says it answered; the row is dated so when that is at
    /// most [`MAX_ANSWER_AGE_MICROS`] ago (rows a router spooled while the ledger was away ship
    /// late, and were dated when they shipped). Otherwise, or in the future, the ledger's clock.
    pub async fn record_usage(
        &self,
        recipient: &Identity,
        usage: &UsageInput,
        answered_at: Option<i64>,
    ) -> Result<UsageRow> {
        let now = self.now();
        let job = UsageJob {
            id: new_id_at(now),
            recipient_id: recipient.id,
            now: answered_at
                .filter(|at| (now - MAX_ANSWER_AGE_MICROS..=now).contains(at))
                .unwrap_or(now),
            usage: usage.clone(),
        };
        if self.usage_writer.write(job.clone()).await? {
            return Ok(UsageRow {
                id: job.id,
                recipient_email: recipient.email.clone(),
                currency: recipient.currency.clone(),
                transfer_id: None,
                cost: Micros::ZERO,
                created_at: job.now,
                usage: job.usage,
            });
        }
        // A keyed row (a refusal, a free request's attempt) meets only its key's index; any
        // other, its request id's.
        let existing = match row_key(usage) {
            Some(key) => self.usage_by_key(recipient.id, key).await?,
            None => {
                let (user, id) = (&usage.user_email, &usage.request_id);
                self.free_usage_by_request(recipient.id, user, id, &usage.endpoint)
                    .await?
            }
        };
        existing.ok_or_else(|| LedgerError::Internal("usage row vanished".into()))
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

/// Whether a row records a refusal: such rows do not take their request id (migration 0005).
pub(crate) fn is_refused(u: &UsageInput) -> bool {
    UsageStatus::parse(&u.status).is_some_and(UsageStatus::is_refusal)
}

/// The row a void brings when it finds its hold already cancelled (by the expiry sweep, which
/// cancels without one), so that the request still leaves its row: a router's void arriving after
/// the sweep (its ledger was away, its extension refused) used to leave none. A repeat of such a
/// void meets that row (same transfer, migration 0032) and writes nothing; a refusal's row,
/// which is not unique, is not written (a hold that was placed was not refused).
pub(crate) async fn late_void_row(
    pool: &sqlx::AnyPool,
    (recipient_id, link, held): (i64, UsageLink<'_>, Micros),
    usage: &UsageInput,
    now: i64,
) -> Result<()> {
    if is_refused(usage) {
        return Ok(());
    }
    let id = new_id_at(now);
    let w = UsageWrite {
        id: &id,
        recipient_id,
        link,
        cost: Micros::ZERO,
        held,
        usage,
        now,
    };
    let mut tx = pool.begin().await?;
    insert_usage(&mut tx, &w).await?;
    tx.commit().await?;
    Ok(())
}

/// Writes a usage row and hands it to the rollups (`rollup_fold.rs`: queued on Postgres, added on
/// SQLite), in the caller's transaction; a row already recorded (a free request id of this
/// recipient and user, a transfer's row, a refusal's key) is left as it is (and not counted
/// again).
pub(crate) async fn insert_usage(
    conn: &mut AnyConnection,
    w: &UsageWrite<'_>,
) -> std::result::Result<(), sqlx::Error> {
    if insert_usage_row(conn, w).await? {
        add_to_rollups(conn, &[w.rollup()]).await?;
    }
    Ok(())
}

impl UsageWrite<'_> {
    /// The row as the rollups count it.
    pub(crate) fn rollup(&self) -> RollupInput<'_> {
        RollupInput {
            usage_id: self.id,
            recipient_id: self.recipient_id,
            created_at: self.now,
            revenue: self.cost.get(),
            refund: self.held.get().saturating_sub(self.cost.get()).max(0),
            usage: self.usage,
        }
    }
}

/// One usage row, naming the one unique index it can meet (`{conflict}`): a conflict clause
/// without a target probes every unique index (`usage_batch.rs` measured what that costs).
fn insert_usage_sql(conflict: &str) -> String {
    format!(
        "INSERT INTO usage_records (id, recipient_id, request_id, transfer_id, app_name, endpoint, \
         user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, \
         upstream_latency_ms, created_at, hosted_transfer_id, refused, ttft_ms, row_key, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, \
                 $20, $21) \
         ON CONFLICT {conflict} DO NOTHING"
    )
}

/// A free row: one that names no transfer, local or hosted (`FREE_ROW`). Written as migration
/// 0030's free index writes it: SQLite matches a conflict target to a partial index only by its
/// predicate's text.
macro_rules! free_row {
    () => {
        "transfer_id IS NULL AND hosted_transfer_id IS NULL"
    };
}

/// Which usage rows are free (no transfer): what request-id uniqueness, `verify` and the lookup
/// of a free row's request id tell apart from paid rows.
pub(crate) const FREE_ROW: &str = free_row!();

/// The conflict target of a free row without a key: at most one per recipient, user, request id
/// and endpoint among the free rows (refusals excepted; the endpoint since migration 0038, so a
/// free chat and a free search of one turn id each keep their row). A keyed free row meets its
/// key's index instead (migration 0039): a router keys each attempt of a free request, so a retry
/// of a failed one keeps its row beside the failure's. Paid rows are unique apart from them, per
/// transfer (migrations 0030, 0032): a paid request after a free one of the same id is charged,
/// so its row must be written.
pub(crate) const FREE_REQUEST: &str = concat!(
    "(recipient_id, user_email, request_id, endpoint) WHERE NOT refused AND ",
    free_row!(),
    " AND row_key IS NULL"
);

/// The conflict target of a paid row of a local transfer: at most one per transfer (migration
/// 0032). Not one per request id: a request id whose paid request failed may be tried again under
/// a hold of its own (docs/router.md, "A failed request's id is retried"), and that attempt's row
/// has the same request id. Written as the index writes it (SQLite matches by predicate text).
pub(crate) const PAID_TRANSFER: &str =
    "(transfer_id) WHERE NOT refused AND transfer_id IS NOT NULL";

/// [`PAID_TRANSFER`] of a hosted transfer.
const PAID_HOSTED: &str =
    "(hosted_transfer_id) WHERE NOT refused AND hosted_transfer_id IS NOT NULL";

static INSERT_FREE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_usage_sql(FREE_REQUEST));

static INSERT_PAID: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_usage_sql(PAID_TRANSFER));

static INSERT_HOSTED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_usage_sql(PAID_HOSTED));

/// A keyed row (a refusal, or an attempt of a free request): at most one per recipient and key.
static INSERT_KEYED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    insert_usage_sql("(recipient_id, row_key) WHERE row_key IS NOT NULL")
});

/// A row without money's key as stored: `NULL` for none, so keyless rows never conflict on it.
/// A refusal's key makes it one however often it is sent (a refusal does not take its request
/// id); a free row's names its request's attempt (migration 0039: the attempt's own row and the
/// `cancelled` row its router keeps for a client that leaves share it, so one of them is kept,
/// while a retry of the id is another attempt, with a row of its own). A free row without a key
/// (from a router before 2026-12-07) is one per request id and endpoint, as before. A keyed row
/// meets only the key's index, and the inserts can name it (`ON CONFLICT` with a target probes
/// one index, without one every unique index of every row). A transfer's row is never keyed.
pub(crate) fn row_key(u: &UsageInput) -> Option<&str> {
    Some(u.row_key.as_str()).filter(|k| !k.is_empty())
}

/// Writes a usage row only (the caller hands it to the rollups); `false` when it was already
/// recorded (left as it is): a keyed row's key for this recipient (refusals and free rows, since
/// migration 0039), a keyless free row's request id for this recipient, user and endpoint, a paid
/// row's transfer. Each row meets exactly one of those indexes.
pub(crate) async fn insert_usage_row(
    conn: &mut AnyConnection,
    w: &UsageWrite<'_>,
) -> std::result::Result<bool, sqlx::Error> {
    let (transfer_id, hosted_transfer_id) = match w.link {
        UsageLink::None => (None, None),
        UsageLink::Transfer(t) => (Some(t), None),
        UsageLink::Hosted(t) => (None, Some(t)),
    };
    let u = w.usage;
    // A transfer's row is kept once by its transfer; the key is for rows without money (the
    // batched capture on Postgres does not store it either).
    let (key, reason) = match w.link {
        UsageLink::None => (row_key(u), u.reason.as_str()),
        UsageLink::Transfer(_) | UsageLink::Hosted(_) => (None, ""),
    };
    let sql = match (key, w.link) {
        (Some(_), _) => INSERT_KEYED.as_str(),
        (None, UsageLink::None) => INSERT_FREE.as_str(),
        (None, UsageLink::Transfer(_)) => INSERT_PAID.as_str(),
        (None, UsageLink::Hosted(_)) => INSERT_HOSTED.as_str(),
    };
    let inserted = sqlx::query(sql)
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
        .bind(is_refused(u))
        .bind(u.ttft_ms)
        .bind(key)
        .bind(reason)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(inserted > 0)
}
