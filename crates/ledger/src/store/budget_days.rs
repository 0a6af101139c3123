//! Settled budget days (migration 0023): a budget check reads the days of the month that can no
//! longer change from `budget_days` and scans the transfers of the other days only.
//!
//! Why: the check used to sum every transfer of the pair since the month began, under the
//! sender's row lock, on every budgeted hold. A heavy user with 100,000 transfers in a month cost
//! 24 ms per hold (docs/benchmarks.md), and the cost grew through the month.
//!
//! A day is *settled* once it ended at least [`SETTLE_MARGIN`] ago and every hold it created that
//! is still pending expired at least that long ago. Its count is then fixed: a completed or
//! cancelled transfer never changes, and an expired hold can no longer be captured or extended
//! (both check the expiry), so it counts nothing now and forever. The margin covers ledger
//! replicas whose clocks disagree and a hold whose transaction commits late. What a settled day
//! counts is computed by the same expression as before, so any ledger writing the row writes the
//! same value; `ledger verify` recomputes every row.

use std::collections::HashMap;

use sqlx::AnyConnection;

use super::budget::DAY_MICROS;

/// How long after its end (and after its last open hold's expiry) a day is settled.
pub(crate) const SETTLE_MARGIN: i64 = 3_600 * 1_000_000;

/// What one UTC day of the pair counts now (`used`), and the latest expiry of its pending holds
/// (0 without any).
#[derive(sqlx::FromRow)]
struct DaySum {
    d: i64,
    used: i64,
    open_until: i64,
}

/// The pair's transfers from `$4` to `$5` (micros), per UTC day: what each day counts at `$1`,
/// exactly as the budget check has always counted it (a pending hold its amount until it expires,
/// a completed one what it captured, a cancelled one nothing).
const DAY_SUMS: &str = "SELECT created_at / 86400000000 AS d, \
     CAST(COALESCE(SUM(CASE WHEN status = 'COMPLETED' THEN captured \
         WHEN status = 'PENDING' AND expires_at > $1 THEN amount ELSE 0 END), 0) AS BIGINT) AS used, \
     CAST(COALESCE(MAX(CASE WHEN status = 'PENDING' THEN expires_at END), 0) AS BIGINT) AS open_until \
     FROM transfers WHERE sender_id = $2 AND recipient_id = $3 \
     AND created_at >= $4 AND created_at < $5 \
     GROUP BY created_at / 86400000000";

/// A pair's settled days: what each counts, by UTC day (days since the epoch). Rows never change
/// once written, so a set read before a transaction holds inside it too.
pub(crate) type Settled = HashMap<i64, i64>;

/// The settled days of the pair from `from_day` (UTC days since the epoch) to before `to_day`.
async fn settled(
    conn: &mut AnyConnection,
    sender_id: i64,
    recipient_id: i64,
    from_day: i64,
    to_day: i64,
) -> Result<Settled, sqlx::Error> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT day, used FROM budget_days WHERE sender_id = $1 AND recipient_id = $2 \
         AND day >= $3 AND day < $4",
    )
    .bind(sender_id)
    .bind(recipient_id)
    .bind(from_day)
    .bind(to_day)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The first day from `from_day` that is not settled (at most `today`, which never is).
fn first_open_day(from_day: i64, today: i64, settled: &Settled) -> i64 {
    (from_day..today)
        .find(|d| !settled.contains_key(d))
        .unwrap_or(today)
}

async fn day_sums(
    conn: &mut AnyConnection,
    sender_id: i64,
    recipient_id: i64,
    now: i64,
    (from, to): (i64, i64),
) -> Result<Vec<DaySum>, sqlx::Error> {
    sqlx::query_as(DAY_SUMS)
        .bind(now)
        .bind(sender_id)
        .bind(recipient_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await
}

/// Writes the pair's days from `from_day` to yesterday that have settled and are not written yet,
/// and returns every settled day of that range (for [`pair_use`], which then reads none again).
/// Runs outside the hold's transaction: the values do not depend on it, and a refused hold rolls
/// its transaction back, which would otherwise throw them away on every refusal.
pub(crate) async fn settle(
    conn: &mut AnyConnection,
    sender_id: i64,
    recipient_id: i64,
    from_day: i64,
    now: i64,
) -> Result<Settled, sqlx::Error> {
    let today = now.div_euclid(DAY_MICROS);
    let mut done = settled(conn, sender_id, recipient_id, from_day, today).await?;
    let open = first_open_day(from_day, today, &done);
    if open >= today {
        return Ok(done);
    }
    let range = (open * DAY_MICROS, today * DAY_MICROS);
    let sums: HashMap<i64, DaySum> = day_sums(conn, sender_id, recipient_id, now, range)
        .await?
        .into_iter()
        .map(|s| (s.d, s))
        .collect();
    for d in open..today {
        if done.contains_key(&d) {
            continue;
        }
        let (used, open_until) = sums.get(&d).map_or((0, 0), |s| (s.used, s.open_until));
        let ended = (d + 1) * DAY_MICROS;
        if ended.max(open_until).saturating_add(SETTLE_MARGIN) > now {
            continue;
        }
        sqlx::query(
            "INSERT INTO budget_days (sender_id, recipient_id, day, used) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (sender_id, recipient_id, day) DO NOTHING",
        )
        .bind(sender_id)
        .bind(recipient_id)
        .bind(d)
        .bind(used)
        .execute(&mut *conn)
        .await?;
        done.insert(d, used);
    }
    Ok(done)
}

/// What the pair has used today and since `from_day`, counted at `now`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PairUse {
    pub today: i64,
    pub since: i64,
}

/// [`PairUse`]: the `settled` days (from [`settle`]; none are needed when `from_day` is today),
/// every other day from the transfers. Inside the hold's transaction this runs after the sender's
/// row lock, like the sum it replaces. A day another ledger settled meanwhile is simply summed
/// from its transfers, which count what its row says.
pub(crate) async fn pair_use(
    conn: &mut AnyConnection,
    sender_id: i64,
    recipient_id: i64,
    (from_day, settled): (i64, &Settled),
    now: i64,
) -> Result<PairUse, sqlx::Error> {
    let today = now.div_euclid(DAY_MICROS);
    let done: Settled = settled
        .iter()
        .filter(|(d, _)| (from_day..today).contains(*d))
        .map(|(d, used)| (*d, *used))
        .collect();
    let open = first_open_day(from_day, today, &done);
    let range = (open * DAY_MICROS, i64::MAX);
    let mut used = PairUse {
        today: 0,
        since: done.values().sum(),
    };
    for s in day_sums(conn, sender_id, recipient_id, now, range).await? {
        // A settled day after an open one is counted from its row.
        if done.contains_key(&s.d) {
            continue;
        }
        used.since += s.used;
        if s.d == today {
            used.today = s.used;
        }
    }
    Ok(used)
}

/// Every settled day whose row disagrees with its transfers, for `ledger verify`.
pub(crate) async fn problems(conn: &mut AnyConnection) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT b.sender_id, b.recipient_id, b.day, b.used, CAST(COALESCE(SUM( \
             CASE WHEN t.status = 'COMPLETED' THEN t.captured ELSE 0 END), 0) AS BIGINT) \
         FROM budget_days b LEFT JOIN transfers t ON t.sender_id = b.sender_id \
             AND t.recipient_id = b.recipient_id AND t.created_at >= b.day * 86400000000 \
             AND t.created_at < (b.day + 1) * 86400000000 \
         GROUP BY b.sender_id, b.recipient_id, b.day, b.used \
         HAVING b.used <> CAST(COALESCE(SUM( \
             CASE WHEN t.status = 'COMPLETED' THEN t.captured ELSE 0 END), 0) AS BIGINT)",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(sender, recipient, day, stored, counted)| {
            format!(
                "settled budget day {day} of accounts {sender} > {recipient}: \
                 {stored} stored, its transfers count {counted}"
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_open_day_is_the_first_unsettled_one() {
        let settled: HashMap<i64, i64> = [(10, 5), (11, 0), (13, 7)].into_iter().collect();
        assert_eq!(first_open_day(10, 15, &settled), 12);
        assert_eq!(first_open_day(13, 15, &settled), 14);
        assert_eq!(first_open_day(10, 10, &settled), 10);
        assert_eq!(first_open_day(14, 15, &HashMap::new()), 14);
    }
}
