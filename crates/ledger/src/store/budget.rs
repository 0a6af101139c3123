//! Spend budgets decided inside the transaction that places a hold (docs/limits.md).
//!
//! A budget caps what one sender may commit to one recipient in a window: the recipient's
//! per-user budgets per UTC day and per UTC month (sent with the hold), and the token's own limit
//! in any 24 hours (`tokens.limit_per_day`). What a window has used is read from the transfers
//! themselves, so there is no counter to keep in step: a pending hold counts its amount until it
//! expires (reserve), a captured one its captured amount (settle), a voided or expired one nothing
//! (release). Days that can no longer change are read from `budget_days` instead
//! (`budget_days.rs`), so a check scans today's transfers, not the month's. The use is read after
//! the holds' transaction has locked the sender's row, which every hold of that sender takes, so
//! it cannot change until that transaction commits or rolls back: concurrent holds across ledger
//! replicas cannot overspend. The holds themselves are placed in `budget_batch.rs`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use sqlx::AnyConnection;
use syft_error::{QuotaDetails, Reason};

use super::budget_days::{one_statement, pair_uses, settle, Pair, PairUse, Settled, UseQuery};
use super::json;
use crate::error::LedgerError;

pub(crate) const DAY_MICROS: i64 = 86_400_000_000;

/// The recipient's budgets for the sender of one hold, in micros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldBudgets {
    pub per_day: Option<i64>,
    pub per_month: Option<i64>,
}

impl HoldBudgets {
    pub fn is_empty(&self) -> bool {
        self.per_day.is_none() && self.per_month.is_none()
    }
}

/// Which budget refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWindow {
    /// The recipient's budget per UTC calendar day.
    Day,
    /// The recipient's budget per UTC calendar month.
    Month,
    /// The token's limit in any 24 hours.
    TokenDay,
}

/// A hold a budget refused: nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetRefusal {
    pub window: BudgetWindow,
    pub limit: i64,
    pub used: i64,
    pub requested: i64,
    /// When enough of the window frees for this hold (micros since the epoch); `None` if the
    /// hold is larger than the budget itself.
    pub retry_at: Option<i64>,
}

impl BudgetRefusal {
    pub fn into_error(self, now: i64) -> LedgerError {
        let (reason, what) = match self.window {
            BudgetWindow::Day => (Reason::BudgetExceeded, "daily budget (UTC day)"),
            BudgetWindow::Month => (Reason::BudgetExceeded, "monthly budget (UTC month)"),
            BudgetWindow::TokenDay => (
                Reason::TokenDailyLimitExceeded,
                "token's limit per 24 hours",
            ),
        };
        let retry_after = self
            .retry_at
            .map(|at| Duration::from_micros(u64::try_from(at.saturating_sub(now)).unwrap_or(0)));
        let when = match self.retry_at {
            Some(at) => format!(
                "; not retryable before {}",
                Utc.timestamp_micros(at)
                    .single()
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default()
            ),
            None => "; the request is larger than the whole budget".into(),
        };
        LedgerError::Quota {
            reason,
            message: format!(
                // In currency units, as users set budgets (the router passes this on to them).
                "{what} exceeded: limit {}, used {}, requested {}{when}",
                syft_money::format_micros(self.limit),
                syft_money::format_micros(self.used),
                syft_money::format_micros(self.requested),
            ),
            details: QuotaDetails {
                retry_after,
                violations: vec![(
                    "sender".into(),
                    format!("{what} of {}", syft_money::format_micros(self.limit)),
                )],
            },
        }
    }
}

/// Start of the UTC day and of the UTC month containing `now` (micros), and the next starts.
fn windows(now: i64) -> ((i64, i64), (i64, i64)) {
    let day = now - now.rem_euclid(DAY_MICROS);
    let t = Utc.timestamp_micros(now).single().unwrap_or_default();
    let month_start = |y: i32, m: u32| {
        Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
            .single()
            .map(|d| d.timestamp_micros())
            .unwrap_or(0)
    };
    let (ny, nm) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    (
        (day, day + DAY_MICROS),
        (month_start(t.year(), t.month()), month_start(ny, nm)),
    )
}

/// What a token's transfers count against its limit per 24 hours at a time (the token and the
/// time by name): a pending hold its amount until it expires, however old it is, and a captured
/// transfer what it captured while its capture (`resolved_at`) is less than 24 hours old; a voided
/// or expired hold nothing. Money moves at the capture, so this is what bounds what a leaked token
/// can take in any 24 hours. (Until 2026-12-05 a transfer counted while it was *created* less than
/// 24 hours before: a hold of the whole limit captured just before its 24th hour left the window
/// at once, and a second hold of the whole limit was captured seconds after the first; a hold
/// pending longer than 24 hours, with a larger `--max-hold-ttl`, counted nothing.) Each half is a
/// range of the `transfers_token_use` index (`token_id, resolved_at`, migration 0028): unresolved
/// transfers have no `resolved_at`. One text for the one-token statement and the many-token one.
macro_rules! used_by_token {
    ($now:literal, $token:literal) => {
        concat!(
            "SELECT CAST((SELECT COALESCE(SUM(CASE WHEN status = 'PENDING' AND expires_at > ",
            $now,
            " THEN amount ELSE 0 END), 0) FROM transfers WHERE token_id = ",
            $token,
            " AND resolved_at IS NULL) \
             + (SELECT COALESCE(SUM(CASE WHEN status = 'COMPLETED' THEN captured ELSE 0 END), 0) \
             FROM transfers WHERE token_id = ",
            $token,
            " AND resolved_at > ",
            $now,
            " - 86400000000) AS BIGINT) AS used"
        )
    };
}

/// [`used_by_token!`] of one token (`$2`) at `$1`.
const USED_BY_TOKEN: &str = used_by_token!("$1", "$2");

/// [`used_by_token!`] of many tokens in one round trip (Postgres): `$1` is a JSON array of
/// `{n, k, t}` (index, token, now), each read through the `transfers_token_use` index.
const TOKENS_USED: &str = concat!(
    "SELECT i.n, u.used FROM json_to_recordset($1::json) AS i(n BIGINT, k TEXT, t BIGINT) \
     CROSS JOIN LATERAL (",
    used_by_token!("i.t", "i.k"),
    ") u"
);
/// The token's transfers as [`used_by_token!`] reads them at `$1` (token `$2`), each with what it
/// counts and when it stops counting if nothing else happens to it: a pending hold at its expiry,
/// a capture 24 hours after it. Soonest first (when enough of the rolling window frees). No
/// `status = 'PENDING'` in a `WHERE`: it would match the partial index `transfers_pending_expiry`,
/// which holds every sender's pending holds.
const TOKEN_ENTRIES: &str = "SELECT frees_at, used FROM ( \
     SELECT expires_at AS frees_at, \
     CASE WHEN status = 'PENDING' AND expires_at > $1 THEN amount ELSE 0 END AS used \
     FROM transfers WHERE token_id = $2 AND resolved_at IS NULL \
     UNION ALL SELECT resolved_at + 86400000000 AS frees_at, \
     CASE WHEN status = 'COMPLETED' THEN captured ELSE 0 END AS used \
     FROM transfers WHERE token_id = $2 AND resolved_at > $1 - 86400000000) e \
     ORDER BY frees_at";

/// What [`record_limits`] writes on a conflict: only when the budgets changed or on the pair's
/// first budgeted hold of the UTC day; otherwise the statement matches the row and changes nothing.
const LIMITS_CHANGED: &str = " ON CONFLICT (sender_id, recipient_id) DO UPDATE \
     SET per_day = excluded.per_day, per_month = excluded.per_month, seen_day = excluded.seen_day \
     WHERE budget_limits.seen_day <> excluded.seen_day \
     OR COALESCE(budget_limits.per_day, 0) <> COALESCE(excluded.per_day, 0) \
     OR COALESCE(budget_limits.per_month, 0) <> COALESCE(excluded.per_month, 0)";

/// Records the budgets each pair's budgeted hold carried, for the alerts evaluator (migration
/// 0012): one statement for every pair ([`one_statement`]), else one per pair. Runs in the holds'
/// transaction after the senders' rows are locked, so holds of one pair never race on the row.
/// `pairs` holds each pair once.
pub(crate) async fn record_limits(
    conn: &mut AnyConnection,
    pairs: &[(Pair, HoldBudgets)],
    now: i64,
) -> Result<(), sqlx::Error> {
    let ((day, _), _) = windows(now);
    if pairs.is_empty() {
        return Ok(());
    }
    if one_statement(conn, pairs.len()) {
        let input: Vec<_> = pairs
            .iter()
            .map(
                |((s, r), b)| serde_json::json!({"s": s, "r": r, "d": b.per_day, "m": b.per_month}),
            )
            .collect();
        let sql = format!(
            "INSERT INTO budget_limits (sender_id, recipient_id, per_day, per_month, seen_day) \
             SELECT s, r, d, m, $2 \
             FROM json_to_recordset($1::json) AS i(s BIGINT, r BIGINT, d BIGINT, m BIGINT){LIMITS_CHANGED}"
        );
        sqlx::query(&sql)
            .bind(json(&input)?)
            .bind(day)
            .execute(conn)
            .await?;
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO budget_limits (sender_id, recipient_id, per_day, per_month, seen_day) \
         VALUES ($1, $2, $3, $4, $5){LIMITS_CHANGED}"
    );
    for ((sender_id, recipient_id), budgets) in pairs {
        sqlx::query(&sql)
            .bind(sender_id)
            .bind(recipient_id)
            .bind(budgets.per_day)
            .bind(budgets.per_month)
            .bind(day)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The first UTC day (days since the epoch) from which a pair's use counts for `budgets`: the
/// month's first with a monthly budget, else today.
pub(crate) fn counted_from_day(budgets: HoldBudgets, now: i64) -> i64 {
    let ((day, _), (month, _)) = windows(now);
    let from = if budgets.per_month.is_some() {
        month
    } else {
        day
    };
    from / DAY_MICROS
}

/// The recipient's calendar budget that refuses `amount` on top of what the pair has used: of
/// both, the one that refuses longest (none fits ever, else the latest reset), so the retry time
/// said is one at which a retry can pass. The day's was said while the month's refused on: a
/// client told "tomorrow" retried into the same refusal until the month turned.
pub(crate) fn calendar_refusal(
    budgets: HoldBudgets,
    used: PairUse,
    amount: i64,
    now: i64,
) -> Option<BudgetRefusal> {
    let ((_, next_day), (_, next_month)) = windows(now);
    [
        (BudgetWindow::Day, budgets.per_day, used.today, next_day),
        (
            BudgetWindow::Month,
            budgets.per_month,
            used.since,
            next_month,
        ),
    ]
    .into_iter()
    .filter_map(|(window, limit, used, resets)| {
        let limit = limit?;
        (used.saturating_add(amount) > limit).then_some(BudgetRefusal {
            window,
            limit,
            used,
            requested: amount,
            retry_at: (amount <= limit).then_some(resets),
        })
    })
    .max_by_key(|r| r.retry_at.unwrap_or(i64::MAX))
}

/// What each token's holds of the 24 hours before its `now` still commit: one statement for
/// them all ([`one_statement`]), else one per token.
pub(crate) async fn tokens_used(
    conn: &mut AnyConnection,
    tokens: &[(&str, i64)],
) -> Result<Vec<i64>, sqlx::Error> {
    if one_statement(conn, tokens.len()) {
        let input: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(n, (k, t))| serde_json::json!({"n": n, "k": k, "t": t}))
            .collect();
        let rows: Vec<(i64, i64)> = sqlx::query_as(TOKENS_USED)
            .bind(json(&input)?)
            .fetch_all(&mut *conn)
            .await?;
        let mut used = vec![0; tokens.len()];
        for (n, u) in rows {
            if let Some(slot) = usize::try_from(n).ok().and_then(|n| used.get_mut(n)) {
                *slot = u;
            }
        }
        return Ok(used);
    }
    let mut used = Vec::with_capacity(tokens.len());
    for (token_id, now) in tokens {
        let u: i64 = sqlx::query_scalar(USED_BY_TOKEN)
            .bind(now)
            .bind(token_id)
            .fetch_one(&mut *conn)
            .await?;
        used.push(u);
    }
    Ok(used)
}

/// [`tokens_used`] of one token.
pub(crate) async fn token_used(
    conn: &mut AnyConnection,
    token_id: &str,
    now: i64,
) -> Result<i64, sqlx::Error> {
    let used = tokens_used(conn, &[(token_id, now)]).await?;
    Ok(used.first().copied().unwrap_or(0))
}

/// The token's own limit per 24 hours refusing `amount` on top of `used`, with when enough of the
/// rolling window frees (read from the token's transfers, the refused hold's transaction
/// included).
pub(crate) async fn token_refusal(
    conn: &mut AnyConnection,
    token_id: &str,
    limit: i64,
    used: i64,
    amount: i64,
    now: i64,
) -> Result<Option<BudgetRefusal>, sqlx::Error> {
    if used.saturating_add(amount) <= limit {
        return Ok(None);
    }
    let mut retry_at = None;
    if amount <= limit {
        let entries: Vec<(i64, i64)> = sqlx::query_as(TOKEN_ENTRIES)
            .bind(now)
            .bind(token_id)
            .fetch_all(&mut *conn)
            .await?;
        let mut left = used;
        for (frees_at, c) in entries {
            left -= c;
            if left.saturating_add(amount) <= limit {
                retry_at = Some(frees_at);
                break;
            }
        }
    }
    Ok(Some(BudgetRefusal {
        window: BudgetWindow::TokenDay,
        limit,
        used,
        requested: amount,
        retry_at,
    }))
}

/// What one sender has used of one recipient's per-user budgets in the current UTC windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetUse {
    pub day_used: i64,
    pub month_used: i64,
    pub day_resets_at: i64,
    pub month_resets_at: i64,
}

/// Writes the pairs' settled days of this month (`budget_days.rs`). Before a budgeted hold's
/// transaction, so that a refused hold, which rolls back, does not throw them away.
pub(crate) async fn settle_month(
    conn: &mut AnyConnection,
    pairs: &[Pair],
    now: i64,
) -> Result<HashMap<Pair, Settled>, sqlx::Error> {
    let (_, (month, _)) = windows(now);
    settle(conn, pairs, month / DAY_MICROS, now).await
}

/// The pair's use of today and of this month, as the hold's check counts it.
async fn calendar_use(
    conn: &mut AnyConnection,
    pair: Pair,
    now: i64,
) -> Result<(i64, i64), sqlx::Error> {
    let settled = settle_month(conn, &[pair], now).await?;
    let (_, (month, _)) = windows(now);
    let none = Settled::new();
    let query = UseQuery {
        pair,
        from_day: month / DAY_MICROS,
        settled: settled.get(&pair).unwrap_or(&none),
        now,
    };
    let used = pair_uses(conn, &[query]).await?;
    let used = used.first().copied().unwrap_or_default();
    Ok((used.today, used.since))
}

/// [`BudgetUse`] at `now`, read as the hold check reads it (so it cannot disagree with it).
pub async fn budget_use(
    pool: &sqlx::AnyPool,
    sender_id: i64,
    recipient_id: i64,
    now: i64,
) -> Result<BudgetUse, sqlx::Error> {
    let ((_, next_day), (_, next_month)) = windows(now);
    let mut conn = pool.acquire().await?;
    let (day_used, month_used) = calendar_use(&mut conn, (sender_id, recipient_id), now).await?;
    Ok(BudgetUse {
        day_used,
        month_used,
        day_resets_at: next_day,
        month_resets_at: next_month,
    })
}

/// A windowed budget's use now, for the alerts evaluator (`budget.threshold`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowUse {
    /// The budget and its window, so each calendar window is its own crossing:
    /// `budget:{sender}>{recipient}:day:2026-12-02`, `...:month:2026-12`, `token:{id}:24h`.
    pub subject: String,
    /// `day` and `month` (UTC calendar), `24h` (a token's rolling limit).
    pub window: &'static str,
    pub used: i64,
    pub limit: i64,
}

/// A sender and recipient with their emails, and the per-day and per-month budgets in force.
type BudgetPair = (i64, i64, String, String, Option<i64>, Option<i64>);

/// The windowed budgets an account is party to (as sender or recipient) and what each window has
/// used, counted exactly as the hold's check counts it: per-user budgets per UTC day and month
/// in force today (`budget_limits.seen_day`), and the rolling 24 hours of live tokens with
/// `limit_per_day`.
pub(crate) async fn windowed_use(
    pool: &sqlx::AnyPool,
    account_id: i64,
    now: i64,
) -> Result<Vec<WindowUse>, sqlx::Error> {
    let ((day, _), (month, _)) = windows(now);
    let name = |at: i64, format: &str| {
        Utc.timestamp_micros(at)
            .single()
            .map(|t| t.format(format).to_string())
            .unwrap_or_default()
    };
    // One connection throughout: a SQLite pool may hold only one.
    let mut conn = pool.acquire().await?;
    let pairs: Vec<BudgetPair> = sqlx::query_as(
        "SELECT b.sender_id, b.recipient_id, s.email, r.email, b.per_day, b.per_month \
         FROM budget_limits b JOIN accounts s ON s.id = b.sender_id \
         JOIN accounts r ON r.id = b.recipient_id \
         WHERE (b.sender_id = $1 OR b.recipient_id = $1) AND b.seen_day = $2",
    )
    .bind(account_id)
    .bind(day)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for (sender, recipient, sender_email, recipient_email, per_day, per_month) in pairs {
        let (day_used, month_used) = calendar_use(&mut conn, (sender, recipient), now).await?;
        let windows = [
            ("day", per_day, day_used, name(day, "%Y-%m-%d")),
            ("month", per_month, month_used, name(month, "%Y-%m")),
        ];
        for (window, limit, used, label) in windows {
            let Some(limit) = limit else { continue };
            out.push(WindowUse {
                subject: format!("budget:{sender_email}>{recipient_email}:{window}:{label}"),
                window,
                used,
                limit,
            });
        }
    }
    let tokens: Vec<(String, i64)> = sqlx::query_as(
        "SELECT id, limit_per_day FROM tokens WHERE (sender_id = $1 OR recipient_id = $1) \
         AND limit_per_day IS NOT NULL AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $2) ORDER BY id",
    )
    .bind(account_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    for (token, limit) in tokens {
        out.push(WindowUse {
            used: token_used(&mut conn, &token, now).await?,
            subject: format!("token:{token}:24h"),
            window: "24h",
            limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_windows_are_utc() {
        // 2026-12-31T23:59:59.5Z
        let now = Utc
            .with_ymd_and_hms(2026, 12, 31, 23, 59, 59)
            .single()
            .map(|d| d.timestamp_micros() + 500_000)
            .expect("time");
        let ((day, next_day), (month, next_month)) = windows(now);
        let at = |y, m, d| {
            Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
                .single()
                .map(|t| t.timestamp_micros())
                .expect("time")
        };
        assert_eq!((day, next_day), (at(2026, 12, 31), at(2027, 1, 1)));
        assert_eq!((month, next_month), (at(2026, 12, 1), at(2027, 1, 1)));
    }

    /// Both budgets spent: the refusal names the one that refuses longest (the month's, whose
    /// reset is later; one the request can never fit, whatever it resets), not the first checked.
    #[test]
    fn a_budget_refusal_names_the_budget_that_refuses_longest() {
        use crate::store::budget_days::PairUse;
        let now = Utc
            .with_ymd_and_hms(2026, 12, 7, 12, 0, 0)
            .single()
            .map(|d| d.timestamp_micros())
            .expect("time");
        let ((_, tomorrow), (_, next_month)) = windows(now);
        let both = |per_day, per_month| HoldBudgets {
            per_day: Some(per_day),
            per_month: Some(per_month),
        };
        let used = PairUse {
            today: 20,
            since: 100,
        };
        let refused = |budgets, amount| calendar_refusal(budgets, used, amount, now);
        // Both full: the month refuses until the 1st.
        let r = refused(both(20, 100), 5).expect("refused");
        assert_eq!(
            (r.window, r.retry_at),
            (BudgetWindow::Month, Some(next_month))
        );
        // Only the day full: tomorrow.
        let r = refused(both(20, 1000), 5).expect("refused");
        assert_eq!((r.window, r.retry_at), (BudgetWindow::Day, Some(tomorrow)));
        // The day could never hold it, the month is full: never (the day's says so).
        let r = refused(both(4, 100), 5).expect("refused");
        assert_eq!((r.window, r.retry_at), (BudgetWindow::Day, None));
        assert!(refused(both(100, 1000), 5).is_none());
    }

    /// A token's use per 24 hours, one token at a time and several in one statement (Postgres'
    /// `TOKENS_USED`): a pending hold counts until it expires whatever its age, a capture for 24
    /// hours after it was captured, a void nothing; a refusal's retry time is when enough of that
    /// frees (a pending hold at its expiry, a capture 24 hours after it).
    #[tokio::test]
    async fn a_token_counts_pending_holds_and_the_last_days_captures() {
        const H: i64 = 3_600_000_000;
        let now = 1_800_000_000_000_000;
        let dbs = [
            Some(syft_testkit::Db::sqlite()),
            syft_testkit::Db::postgres().await,
        ];
        for db in dbs.into_iter().flatten() {
            let store = crate::store::Store::connect(&db.url, 2)
                .await
                .expect("connect");
            let pool = store.pool();
            for sql in [
                "INSERT INTO accounts (id, email, organization, currency, secret_hash, created_at) \
                 VALUES (1, 'a@example.com', '', 'USD', 'a', 0), (2, 'b@example.com', '', 'USD', 'b', 0)",
                "INSERT INTO tokens (id, token_hash, sender_id, recipient_id, created_at) \
                 VALUES ('k1', 'h1', 1, 2, 0), ('k2', 'h2', 1, 2, 0), ('k3', 'h3', 1, 2, 0)",
            ] {
                sqlx::query(sql).execute(pool).await.expect(sql);
            }
            // (token, amount, captured, status, created, expires, resolved), hours from now.
            let rows = [
                ("k1", 7_i64, 0_i64, "PENDING", -48, 1, None::<i64>),
                ("k1", 50, 0, "PENDING", -2, 0, None),
                ("k1", 9, 5, "COMPLETED", -30, -1, Some(-2)),
                ("k1", 100, 100, "COMPLETED", -26, -24, Some(-25)),
                ("k1", 1000, 0, "CANCELLED", -2, 22, Some(-1)),
                ("k2", 3, 0, "PENDING", 0, 1, None),
                ("k2", 4, 4, "COMPLETED", -2, 22, Some(-1)),
            ];
            for (n, (token, amount, captured, status, created, expires, resolved)) in
                rows.into_iter().enumerate()
            {
                sqlx::query(
                    "INSERT INTO transfers (id, sender_id, recipient_id, token_id, amount, captured, \
                     currency, status, created_by, app_name, app_ep_path, idempotency_key, \
                     request_hash, created_at, expires_at, resolved_at) VALUES ($1, 1, 2, $2, $3, \
                     $4, 'USD', $5, 'RECIPIENT', 'app', '/chat', $1, 'h', $6, $7, $8)",
                )
                .bind(format!("t{n}"))
                .bind(token)
                .bind(amount)
                .bind(captured)
                .bind(status)
                .bind(now + created * H)
                .bind(now + expires * H)
                .bind(resolved.map(|r| now + r * H))
                .execute(pool)
                .await
                .expect("transfer");
            }
            let mut conn = pool.acquire().await.expect("connection");
            let all = [("k1", now), ("k2", now), ("k3", now)];
            assert_eq!(
                tokens_used(&mut conn, &all).await.expect("used"),
                [12, 7, 0]
            );
            assert_eq!(token_used(&mut conn, "k1", now).await.expect("used"), 12);
            // 12 used, 10 more against 15: room once the 7 pending expire.
            let refusal = token_refusal(&mut conn, "k1", 15, 12, 10, now)
                .await
                .expect("refusal");
            assert_eq!(refusal.and_then(|r| r.retry_at), Some(now + H));
            // 12 used, 14 more: room once the capture of 2 hours ago is 24 hours old.
            let refusal = token_refusal(&mut conn, "k1", 15, 12, 14, now)
                .await
                .expect("refusal");
            assert_eq!(refusal.and_then(|r| r.retry_at), Some(now + 22 * H));
            drop(conn);
            store.close().await;
            db.drop_postgres().await;
        }
    }
}
