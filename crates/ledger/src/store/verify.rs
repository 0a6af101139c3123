//! `verify`: recomputes every balance from the journal and proves conservation; checks the usage
//! rollups against the usage rows (`verify_rollups.rs`).

use sqlx::AnyConnection;

use super::usage::FREE_ROW;
use super::{Backend, Store};
use crate::error::Result;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub accounts: i64,
    pub transfers: i64,
    /// Money that entered through deposits.
    pub total_deposits: i64,
    /// Sum of account balances.
    pub total_balances: i64,
    /// Money held by pending transfers (still part of the senders' balances).
    pub total_held: i64,
    pub pending_transfers: i64,
    /// Transfers of hosted accounting (`hosted_transfers`): this ledger's record of holds on
    /// the remote service, whose own balances are not checked here.
    pub hosted_transfers: i64,
    pub hosted_pending: i64,
    /// Every violated invariant, in words; empty when the ledger is consistent.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One account's stored totals beside what its journal and pending transfers say.
#[derive(sqlx::FromRow)]
struct AccountCheck {
    email: String,
    balance: i64,
    held: i64,
    journal: i64,
    pending: i64,
}

/// One token's counters beside what its transfers say.
#[derive(sqlx::FromRow)]
struct TokenCheck {
    id: String,
    held: i64,
    spent: i64,
    pending: i64,
    captured: i64,
    spend_limit: Option<i64>,
}

impl Store {
    /// Checks every invariant on ONE consistent snapshot of the database, so it is safe to run
    /// against a ledger under load: read in separate statements, a capture (or a hold placed or
    /// resolved) committed between two reads would be counted zero times or twice and raise a
    /// false alarm. Postgres reads in one `REPEATABLE READ READ ONLY` transaction; SQLite in one
    /// deferred transaction, which in WAL mode (set by `connect`) reads one snapshot while other
    /// connections keep writing.
    pub async fn verify(&self) -> Result<VerifyReport> {
        // Queued usage rows are folded first, so the rollups checked are as fresh as they can be
        // (the rows queued after this are left out of the comparison: `counted_rows`).
        if let Err(e) = self.fold_rollups().await {
            // Freshness only: the rollups are compared with the rows not queued at the snapshot
            // (`counted_rows`), folded or not. It runs under the database's `statement_timeout`,
            // which a lock on the queue outlasts (the snapshot below does not).
            tracing::warn!(error = %e, "the rollup queue was not folded first; the rollups are checked against the rows folded so far");
        }
        let mut tx = self.pool().begin().await?;
        if self.backend == Backend::Postgres {
            // Must be the transaction's first statement, before any snapshot is taken.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            // Reads every row, for seconds on a large ledger: a `statement_timeout` set on the
            // role or database for the money paths cancelled it every time ("retry", which never
            // helped). Read-only, it holds no lock a writer waits for.
            sqlx::query("SET LOCAL statement_timeout = 0")
                .execute(&mut *tx)
                .await?;
        }
        let report = verify_snapshot(&mut tx, self.now()).await?;
        // Nothing was written; ending the transaction releases the snapshot.
        tx.rollback().await?;
        Ok(report)
    }
}

/// Every check of [`Store::verify`], each statement on `conn` (one transaction); `now` is the
/// ledger's clock.
async fn verify_snapshot(conn: &mut AnyConnection, now: i64) -> Result<VerifyReport> {
    let (accounts, transfers, pending_transfers, total_deposits, total_held, stored_balances) =
        sqlx::query_as::<_, (i64, i64, i64, i64, i64, i64)>(
            "SELECT (SELECT COUNT(*) FROM accounts), (SELECT COUNT(*) FROM transfers), \
             (SELECT COUNT(*) FROM transfers WHERE status = 'PENDING'), \
             (SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM deposits), \
             (SELECT CAST(COALESCE(SUM(held), 0) AS BIGINT) FROM accounts), \
             (SELECT CAST(COALESCE(SUM(balance), 0) AS BIGINT) FROM accounts)",
        )
        .fetch_one(&mut *conn)
        .await?;
    // The journal's totals: all entries (must be 0), the system side (-deposits).
    let (journal_total, system_side) = sqlx::query_as::<_, (i64, i64)>(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN account_id IS NULL THEN amount ELSE 0 END), 0) AS BIGINT) \
         FROM journal",
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut report = VerifyReport {
        accounts,
        transfers,
        total_deposits,
        total_balances: stored_balances,
        total_held,
        pending_transfers,
        problems: Vec::new(),
        ..VerifyReport::default()
    };

    let problems = &mut report.problems;
    if journal_total != 0 {
        problems.push(format!(
            "journal does not balance: entries sum to {journal_total}"
        ));
    }
    if -system_side != report.total_deposits {
        problems.push(format!(
            "system journal side {} does not match deposits {}",
            -system_side, report.total_deposits
        ));
    }
    if report.total_balances != report.total_deposits {
        problems.push(format!(
            "conservation broken: balances {} != deposits {}",
            report.total_balances, report.total_deposits
        ));
    }
    // The same per currency: money of two currencies summed could balance while USD micros sat
    // in EUR accounts (a verify reviewer's finding, 2026-12-07). Deposits count in their
    // account's currency, as every transfer stays within one (`transfers_in_one_currency`).
    let per_currency: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT a.currency, CAST(SUM(a.balance) AS BIGINT), \
             CAST(COALESCE(SUM(d.amount), 0) AS BIGINT) \
         FROM accounts a LEFT JOIN (SELECT account_id, CAST(SUM(amount) AS BIGINT) AS amount \
                                    FROM deposits GROUP BY account_id) d ON d.account_id = a.id \
         GROUP BY a.currency ORDER BY a.currency",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (currency, balances, deposits) in per_currency {
        if balances != deposits {
            problems.push(format!(
                "conservation broken in {currency}: balances {balances} != deposits {deposits}"
            ));
        }
    }

    // Each account's balance equals its journal; held equals its pending transfers.
    let rows: Vec<AccountCheck> = sqlx::query_as(
        "SELECT a.email, a.balance, a.held, COALESCE(j.total, 0) AS journal, \
             COALESCE(p.held, 0) AS pending \
             FROM accounts a \
             LEFT JOIN (SELECT account_id, CAST(SUM(amount) AS BIGINT) AS total \
                        FROM journal GROUP BY account_id) j ON j.account_id = a.id \
             LEFT JOIN (SELECT sender_id, CAST(SUM(amount) AS BIGINT) AS held FROM transfers \
                        WHERE status = 'PENDING' GROUP BY sender_id) p ON p.sender_id = a.id",
    )
    .fetch_all(&mut *conn)
    .await?;
    for AccountCheck {
        email,
        balance,
        held,
        journal,
        pending,
    } in rows
    {
        if balance != journal {
            problems.push(format!("{email}: balance {balance} != journal {journal}"));
        }
        if held != pending {
            problems.push(format!(
                "{email}: held {held} != pending transfers {pending}"
            ));
        }
        if balance - held < 0 {
            problems.push(format!("{email}: available {} is negative", balance - held));
        }
    }

    // Tokens: held and spent match their transfers, and stay within the token's spend limit
    // (every hold checks `spent + held + amount <= spend_limit`, and a resolution only lowers
    // `spent + held`).
    let rows: Vec<TokenCheck> = sqlx::query_as(
            "SELECT k.id, k.held, k.spent, COALESCE(x.pending, 0) AS pending, \
             COALESCE(x.captured, 0) AS captured, k.spend_limit FROM tokens k \
             LEFT JOIN (SELECT token_id, \
                          CAST(SUM(CASE WHEN status = 'PENDING' THEN amount ELSE 0 END) AS BIGINT) AS pending, \
                          CAST(SUM(CASE WHEN status = 'COMPLETED' THEN captured ELSE 0 END) AS BIGINT) AS captured \
                        FROM transfers WHERE token_id IS NOT NULL GROUP BY token_id) x ON x.token_id = k.id",
        )
        .fetch_all(&mut *conn)
        .await?;
    for TokenCheck {
        id,
        held,
        spent,
        pending,
        captured,
        spend_limit,
    } in rows
    {
        if held != pending || spent != captured {
            problems.push(format!(
                "token {id}: held {held}/spent {spent} != pending {pending}/captured {captured}"
            ));
        }
        if let Some(limit) = spend_limit.filter(|l| spent.checked_add(held).is_none_or(|c| c > *l))
        {
            problems.push(format!(
                "token {id}: spent {spent} + held {held} exceeds its spend limit {limit}"
            ));
        }
    }

    // A transfer paid with a token is between the token's own parties, and was placed before the
    // token expired. (Not "before its revocation": a revocation stamped by a call that then
    // waited for the token's lock may carry an earlier time than a hold placed meanwhile.)
    named_ids(
        conn,
        problems,
        "transfers were paid with a token of other parties, or placed after it expired",
        "SELECT t.id FROM transfers t JOIN tokens k ON k.id = t.token_id \
         WHERE t.sender_id <> k.sender_id OR t.recipient_id <> k.recipient_id \
            OR t.created_at >= COALESCE(k.expires_at, t.created_at + 1) \
         ORDER BY t.id LIMIT 1001",
    )
    .await?;

    // Transfers: each completed one has exactly its two entries, the captured amount taken from
    // its sender and given to its recipient; others have none. (Entries were checked by count
    // and sums only, so a capture booked the wrong way round, or on other accounts, passed.)
    named_ids(
        conn,
        problems,
        "transfers do not match their journal entries",
        &format!(
            "SELECT t.id FROM transfers t LEFT JOIN ({}) j ON j.ref_id = t.id \
             WHERE (t.status = 'COMPLETED' AND (t.captured <= 0 OR COALESCE(j.entries, 0) <> 2 \
                      OR COALESCE(j.credited, 0) <> t.captured \
                      OR COALESCE(j.debited, 0) <> t.captured OR t.resolved_at IS NULL)) \
                OR (t.status <> 'COMPLETED' AND (t.captured <> 0 OR COALESCE(j.entries, 0) <> 0)) \
                OR (t.status = 'CANCELLED' AND t.resolved_at IS NULL) \
             ORDER BY t.id LIMIT 1001",
            entry_sums(
                "capture",
                "recipient_id",
                "sender_id",
                "JOIN transfers x ON x.id = e.ref_id"
            )
        ),
    )
    .await?;
    // A pending transfer carries no resolution: a token's 24-hour use counts a pending hold only
    // while `resolved_at` is empty, so one stamped but pending would count nowhere.
    named_ids(
        conn,
        problems,
        "pending transfers carry a resolution",
        "SELECT id FROM transfers WHERE status = 'PENDING' \
           AND (resolved_at IS NOT NULL OR resolved_by IS NOT NULL) ORDER BY id LIMIT 1001",
    )
    .await?;
    // A transfer never mixes currencies (design.md §2): it is in its parties' currency, and a
    // token is between accounts of one currency (`same_currency` when it is issued).
    named_ids(
        conn,
        problems,
        "transfers are in another currency than their parties",
        "SELECT t.id FROM transfers t JOIN accounts s ON s.id = t.sender_id \
           JOIN accounts r ON r.id = t.recipient_id \
         WHERE t.currency <> s.currency OR t.currency <> r.currency ORDER BY t.id LIMIT 1001",
    )
    .await?;
    named_ids(
        conn,
        problems,
        "tokens are between accounts of two currencies",
        "SELECT k.id FROM tokens k JOIN accounts s ON s.id = k.sender_id \
           JOIN accounts r ON r.id = k.recipient_id \
         WHERE s.currency <> r.currency ORDER BY k.id LIMIT 1001",
    )
    .await?;
    // A paid row says what its transfer captured, for its transfer's recipient, once the transfer
    // is resolved; a free row costs nothing. The rollups take revenue from the rows, so a row
    // that disagreed with the money was "verified" against itself. (Its payer and app are not
    // compared: rows recorded before the ledger named them from the transfer hold the router's.)
    named_ids(
        conn,
        problems,
        "usage rows do not match the transfer that paid them",
        "SELECT u.id FROM usage_records u LEFT JOIN transfers t ON t.id = u.transfer_id \
           LEFT JOIN hosted_transfers h ON h.id = u.hosted_transfer_id \
         WHERE (u.transfer_id IS NULL AND u.hosted_transfer_id IS NULL AND u.cost <> 0) \
            OR (u.transfer_id IS NOT NULL AND (u.hosted_transfer_id IS NOT NULL OR t.id IS NULL \
                OR t.status = 'PENDING' OR u.cost <> t.captured \
                OR u.recipient_id <> t.recipient_id)) \
            OR (u.hosted_transfer_id IS NOT NULL \
                AND (h.id IS NULL OR h.status = 'PENDING' OR u.cost <> h.captured)) \
         ORDER BY u.id LIMIT 1001",
    )
    .await?;
    // No capture after its hold's expiry: a capture must find its hold unexpired (by its own
    // clock, which it records as `resolved_at`, and by the database's once it has its locks), and
    // nothing moves a resolved transfer's expiry. A late capture would be money a budget check
    // had already counted as released.
    named_ids(
        conn,
        problems,
        "transfers were captured at or after their hold's expiry",
        "SELECT id FROM transfers WHERE status = 'COMPLETED' AND resolved_at >= expires_at \
         ORDER BY id LIMIT 1001",
    )
    .await?;
    // Refunds: each of a completed transfer, naming its parties, with exactly its two entries
    // (its amount taken from the transfer's recipient and given to its sender), and none
    // refunding more in all than the transfer captured (store/refund.rs).
    named_ids(
        conn,
        problems,
        "refunds do not match their transfer or their journal entries",
        &format!(
            "SELECT r.id FROM refunds r JOIN transfers t ON t.id = r.transfer_id \
             LEFT JOIN ({}) j ON j.ref_id = r.id \
             WHERE t.status <> 'COMPLETED' OR COALESCE(j.entries, 0) <> 2 \
                OR r.recipient_id <> t.recipient_id OR r.sender_id <> t.sender_id \
                OR COALESCE(j.credited, 0) <> r.amount OR COALESCE(j.debited, 0) <> r.amount \
                OR r.transfer_id IN (SELECT s.transfer_id FROM refunds s \
                     JOIN transfers u ON u.id = s.transfer_id \
                     GROUP BY s.transfer_id, u.captured HAVING SUM(s.amount) > u.captured) \
             ORDER BY r.id LIMIT 1001",
            entry_sums(
                "refund",
                "sender_id",
                "recipient_id",
                "JOIN refunds y ON y.id = e.ref_id JOIN transfers x ON x.id = y.transfer_id"
            )
        ),
    )
    .await?;
    // Entries that no transfer or deposit accounts for, and deposits whose two entries are not
    // the deposit's amount from the system to its account.
    let (orphans, bad_deposits): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM journal e WHERE \
                   (e.kind = 'capture' AND NOT EXISTS (SELECT 1 FROM transfers t \
                      WHERE t.id = e.ref_id AND t.status = 'COMPLETED')) \
                   OR (e.kind = 'deposit' AND NOT EXISTS (SELECT 1 FROM deposits d \
                      WHERE d.id = e.ref_id)) \
                   OR (e.kind = 'refund' AND NOT EXISTS (SELECT 1 FROM refunds r \
                      WHERE r.id = e.ref_id)) \
                   OR e.kind NOT IN ('capture', 'deposit', 'refund')), \
                (SELECT COUNT(*) FROM deposits d LEFT JOIN (SELECT ref_id, COUNT(*) AS entries, \
                   CAST(SUM(CASE WHEN account_id IS NULL THEN -amount ELSE 0 END) AS BIGINT) AS paid, \
                   MAX(account_id) AS account_id, \
                   CAST(SUM(CASE WHEN account_id IS NOT NULL THEN amount ELSE 0 END) AS BIGINT) AS got \
                   FROM journal WHERE kind = 'deposit' GROUP BY ref_id) j ON j.ref_id = d.id \
                 WHERE COALESCE(j.entries, 0) <> 2 OR j.paid <> d.amount OR j.got <> d.amount \
                   OR j.account_id <> d.account_id)",
    )
    .fetch_one(&mut *conn)
    .await?;
    // A free row without a key is one per request id and endpoint (a keyed one is one per key,
    // which its unique index keeps); a paid row one per transfer (migrations 0030, 0032, 0038,
    // 0039).
    let per_request: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM (SELECT recipient_id, user_email, request_id, endpoint \
             FROM usage_records WHERE NOT refused AND {FREE_ROW} AND row_key IS NULL \
             GROUP BY recipient_id, user_email, request_id, endpoint HAVING COUNT(*) > 1) d",
    ))
    .fetch_one(&mut *conn)
    .await?;
    let per_transfer: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT transfer_id, hosted_transfer_id FROM usage_records \
             WHERE NOT refused AND NOT (transfer_id IS NULL AND hosted_transfer_id IS NULL) \
             GROUP BY transfer_id, hosted_transfer_id HAVING COUNT(*) > 1) d",
    )
    .fetch_one(&mut *conn)
    .await?;
    let counted = [
        (
            orphans,
            "journal entries belong to no completed transfer or deposit",
        ),
        (bad_deposits, "deposits do not match their journal entries"),
        (
            per_request,
            "request ids have more than one free usage row (refusals aside)",
        ),
        (
            per_transfer,
            "transfers have more than one usage row (refusals aside)",
        ),
    ];
    for (n, what) in counted {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    hosted_problems(conn, &mut report).await?;
    // Every settled budget day still says what its transfers count (budget_days.rs).
    let settled = super::budget_days::problems(conn, now).await?;
    report.problems.extend(settled);
    // The rollups the analytics read equal the rows they count (verify_rollups.rs).
    let rollups = super::verify_rollups::rollup_problems(conn).await?;
    report.problems.extend(rollups);
    Ok(report)
}

/// Hosted accounting's journal (`hosted/journal.rs`): its counts, and each entry's state agreeing
/// with itself. A resolved entry has captured at most its hold (some if completed, none if
/// cancelled) and no longer keeps its delegation token; a pending one is in a step still under
/// way. (The money itself is on the remote service, which this cannot see.)
async fn hosted_problems(conn: &mut AnyConnection, report: &mut VerifyReport) -> Result<()> {
    let (total, pending, bad): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), \
                COALESCE(SUM(CASE WHEN status = 'PENDING' THEN 1 ELSE 0 END), 0), \
                COALESCE(SUM(CASE WHEN captured < 0 OR captured > amount \
                   OR (status = 'COMPLETED' AND (captured = 0 OR step <> 'done')) \
                   OR (status = 'CANCELLED' AND (captured <> 0 \
                       OR step NOT IN ('done', 'failed', 'unknown'))) \
                   OR (status = 'PENDING' AND (captured <> 0 \
                       OR step NOT IN ('creating', 'held', 'capturing', 'voiding'))) \
                   OR (status <> 'PENDING' AND token <> '') THEN 1 ELSE 0 END), 0) \
         FROM hosted_transfers",
    )
    .fetch_one(&mut *conn)
    .await?;
    report.hosted_transfers = total;
    report.hosted_pending = pending;
    if bad > 0 {
        report.problems.push(format!(
            "{bad} hosted transfers are in a state that contradicts itself (captured, status, \
             step or a kept token)"
        ));
    }
    Ok(())
}

/// The journal's entries of `kind` per reference (`ref_id`): how many, what they credit to the
/// transfer's `to` party and what they debit from its `from` party; `joins` lead from an entry
/// `e` to its transfer `x`. A capture credits the recipient; a refund gives back to the sender.
fn entry_sums(kind: &str, to: &str, from: &str, joins: &str) -> String {
    format!(
        "SELECT e.ref_id, COUNT(*) AS entries, \
           CAST(SUM(CASE WHEN e.account_id = x.{to} AND e.amount > 0 \
                    THEN e.amount ELSE 0 END) AS BIGINT) AS credited, \
           CAST(SUM(CASE WHEN e.account_id = x.{from} AND e.amount < 0 \
                    THEN -e.amount ELSE 0 END) AS BIGINT) AS debited \
         FROM journal e {joins} WHERE e.kind = '{kind}' GROUP BY e.ref_id"
    )
}

/// Runs `sql`, which selects the ids (at most 1,001) of the rows breaking one rule, and names
/// them as a problem when there are any.
async fn named_ids(
    conn: &mut AnyConnection,
    problems: &mut Vec<String>,
    what: &str,
    sql: &str,
) -> Result<()> {
    let ids: Vec<String> = sqlx::query_scalar(sql).fetch_all(&mut *conn).await?;
    if !ids.is_empty() {
        problems.push(named(&ids, what));
    }
    Ok(())
}

/// "`n` `what`: the first ids", for an operator to look the rows up (a count alone said which
/// kind of row was wrong, not which one). `ids` holds at most 1,001: past 1,000, "more than".
fn named(ids: &[String], what: &str) -> String {
    const SHOWN: usize = 5;
    let count = match ids.len() {
        n if n > 1000 => "more than 1000".to_string(),
        n => n.to_string(),
    };
    let mut first = ids
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        first.push_str(", …");
    }
    format!("{count} {what}: {first}")
}
