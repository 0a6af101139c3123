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
use super::json;

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

/// A pair's transfers from `$from` to before `$to` (micros), per UTC day: what each day counts at
/// `$now`, exactly as the budget check has always counted it (a pending hold its amount until it
/// expires, a completed one what it captured, a cancelled one nothing), and the latest expiry of
/// its pending holds. One text for the one-pair statement and the many-pair one.
macro_rules! day_sums {
    ($now:literal, $sender:literal, $recipient:literal, $from:literal, $to:literal) => {
        concat!(
            "SELECT created_at / 86400000000 AS d, \
             CAST(COALESCE(SUM(CASE WHEN status = 'COMPLETED' THEN captured \
             WHEN status = 'PENDING' AND expires_at > ", $now, " THEN amount ELSE 0 END), 0) \
             AS BIGINT) AS used, \
             CAST(COALESCE(MAX(CASE WHEN status = 'PENDING' THEN expires_at END), 0) AS BIGINT) \
             AS open_until FROM transfers WHERE sender_id = ", $sender, " AND recipient_id = ",
            $recipient, " AND created_at >= ", $from, " AND created_at < ", $to,
            " GROUP BY created_at / 86400000000"
        )
    };
}

const DAY_SUMS: &str = day_sums!("$1", "$2", "$3", "$4", "$5");

/// [`DAY_SUMS`] of many pairs in one round trip (Postgres), each with its own clock and first
/// day: `$1` is a JSON array of `{n, s, r, f, t}` (index, sender, recipient, from, now). Each pair
/// is read through the `transfers_budget` index (a `LATERAL` lookup, as the locks are).
const PAIRS_DAY_SUMS: &str = concat!(
    "SELECT i.n, s.d, s.used \
     FROM json_to_recordset($1::json) AS i(n BIGINT, s BIGINT, r BIGINT, f BIGINT, t BIGINT) \
     CROSS JOIN LATERAL (",
    day_sums!("i.t", "i.s", "i.r", "i.f", "9223372036854775807"),
    ") s"
);

/// A pair's settled days: what each counts, by UTC day (days since the epoch). Rows never change
/// once written (a clock set back past one deletes it, [`settled`]), so a set read before a
/// transaction holds inside it too.
pub(crate) type Settled = HashMap<i64, i64>;

/// A sender and a recipient (account ids).
pub(crate) type Pair = (i64, i64);

/// The settled days of each pair from `from_day` (UTC days since the epoch) to before `to_day`:
/// one statement for them all ([`one_statement`]), else one per pair. A settled day from `to_day`
/// on means this clock went back past it (a ledger's clock corrected by more than the settling
/// margin, or a replica that far behind): its row is deleted, as the transfers this clock now
/// dates into it would make it stale, undercounting the month's budget for good and failing
/// `verify` (a time tester, 2026-12-06). It is settled again once the day has ended anew.
async fn settled(
    conn: &mut AnyConnection,
    pairs: &[Pair],
    from_day: i64,
    to_day: i64,
) -> Result<HashMap<Pair, Settled>, sqlx::Error> {
    let mut out: HashMap<Pair, Settled> = pairs.iter().map(|p| (*p, Settled::new())).collect();
    if one_statement(conn, pairs.len()) {
        let input: Vec<_> = pairs
            .iter()
            .map(|(s, r)| serde_json::json!({"s": s, "r": r}))
            .collect();
        let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT i.s, i.r, b.day, b.used \
             FROM json_to_recordset($1::json) AS i(s BIGINT, r BIGINT) CROSS JOIN LATERAL \
             (SELECT day, used FROM budget_days WHERE sender_id = i.s AND recipient_id = i.r \
             AND day >= $2) b",
        )
        .bind(json(&input)?)
        .bind(from_day)
        .fetch_all(&mut *conn)
        .await?;
        let mut ahead = Vec::new();
        for (s, r, day, used) in rows {
            match day < to_day {
                true => _ = out.entry((s, r)).or_default().insert(day, used),
                false => ahead.push((s, r)),
            }
        }
        ahead.sort_unstable();
        ahead.dedup();
        unsettle_from(conn, &ahead, to_day).await?;
        return Ok(out);
    }
    let mut ahead = Vec::new();
    for (&(s, r), days) in out.iter_mut() {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT day, used FROM budget_days WHERE sender_id = $1 AND recipient_id = $2 \
             AND day >= $3",
        )
        .bind(s)
        .bind(r)
        .bind(from_day)
        .fetch_all(&mut *conn)
        .await?;
        if rows.iter().any(|(day, _)| *day >= to_day) {
            ahead.push((s, r));
        }
        days.extend(rows.into_iter().filter(|(day, _)| *day < to_day));
    }
    unsettle_from(conn, &ahead, to_day).await?;
    Ok(out)
}

/// Deletes the pairs' settled days from `day` on (see [`settled`]); rare, so one statement each.
async fn unsettle_from(
    conn: &mut AnyConnection,
    pairs: &[Pair],
    day: i64,
) -> Result<(), sqlx::Error> {
    for &(s, r) in pairs {
        tracing::warn!(
            sender_id = s,
            recipient_id = r,
            day,
            "a settled budget day is not over by this clock (it went back): settled again later"
        );
        sqlx::query(
            "DELETE FROM budget_days WHERE sender_id = $1 AND recipient_id = $2 AND day >= $3",
        )
        .bind(s)
        .bind(r)
        .bind(day)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Whether `n` pairs (tokens) are read or written in one statement: on Postgres, where the ledger
/// may be a round trip away from its database, when there are several. One alone keeps the plain
/// statement, which needs no JSON to parse, and so does SQLite, which is in the process.
pub(crate) fn one_statement(conn: &AnyConnection, n: usize) -> bool {
    n > 1 && super::is_postgres(conn)
}

/// The first day from `from_day` that is not settled (at most `today`, which never is).
fn first_open_day(from_day: i64, today: i64, settled: &Settled) -> i64 {
    (from_day..today)
        .find(|d| !settled.contains_key(d))
        .unwrap_or(today)
}

async fn day_sums(
    conn: &mut AnyConnection,
    (sender_id, recipient_id): Pair,
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

/// For each pair, writes its days from `from_day` to yesterday that have settled and are not
/// written yet, and returns every settled day of that range (for [`pair_uses`], which then reads
/// none again). The rows written are read for all pairs at once; a pair writes only on the first
/// hold after one of its days settled. Runs outside the holds' transaction: the values do not
/// depend on it, and a refused hold rolls its transaction back, which would otherwise throw them
/// away on every refusal.
pub(crate) async fn settle(
    conn: &mut AnyConnection,
    pairs: &[Pair],
    from_day: i64,
    now: i64,
) -> Result<HashMap<Pair, Settled>, sqlx::Error> {
    let today = now.div_euclid(DAY_MICROS);
    let mut all = settled(conn, pairs, from_day, today).await?;
    for (&pair, done) in all.iter_mut() {
        let open = first_open_day(from_day, today, done);
        if open >= today {
            continue;
        }
        let range = (open * DAY_MICROS, today * DAY_MICROS);
        let sums: HashMap<i64, DaySum> = day_sums(conn, pair, now, range)
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
            .bind(pair.0)
            .bind(pair.1)
            .bind(d)
            .bind(used)
            .execute(&mut *conn)
            .await?;
            done.insert(d, used);
        }
    }
    Ok(all)
}

/// What the pair has used today and since `from_day`, counted at `now`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PairUse {
    pub today: i64,
    pub since: i64,
}

/// One pair's use to read: from `from_day` at `now`, with its `settled` days (from [`settle`];
/// none are needed when `from_day` is today).
pub(crate) struct UseQuery<'a> {
    pub pair: Pair,
    pub from_day: i64,
    pub settled: &'a Settled,
    pub now: i64,
}

impl UseQuery<'_> {
    /// The settled days of the range, and the first day to sum from the transfers.
    fn split(&self) -> (Settled, i64) {
        let today = self.now.div_euclid(DAY_MICROS);
        let done: Settled = self
            .settled
            .iter()
            .filter(|(d, _)| (self.from_day..today).contains(*d))
            .map(|(d, used)| (*d, *used))
            .collect();
        let open = first_open_day(self.from_day, today, &done);
        (done, open)
    }
}

/// [`PairUse`] of each query: the settled days, every other day from the transfers (one
/// statement for them all, [`one_statement`]). Inside the holds' transaction this runs after the
/// senders' row locks, like the sum it replaces. A day another ledger settled meanwhile is simply
/// summed from its transfers, which count what its row says.
pub(crate) async fn pair_uses(
    conn: &mut AnyConnection,
    queries: &[UseQuery<'_>],
) -> Result<Vec<PairUse>, sqlx::Error> {
    let split: Vec<(Settled, i64)> = queries.iter().map(UseQuery::split).collect();
    // Per query, its days summed from the transfers: (day, used).
    let mut sums: Vec<Vec<(i64, i64)>> = vec![Vec::new(); queries.len()];
    if one_statement(conn, queries.len()) {
        let input: Vec<_> = queries
            .iter()
            .zip(&split)
            .enumerate()
            .map(|(n, (q, (_, open)))| {
                serde_json::json!({"n": n, "s": q.pair.0, "r": q.pair.1,
                    "f": open * DAY_MICROS, "t": q.now})
            })
            .collect();
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(PAIRS_DAY_SUMS)
            .bind(json(&input)?)
            .fetch_all(&mut *conn)
            .await?;
        for (n, d, used) in rows {
            if let Some(days) = usize::try_from(n).ok().and_then(|n| sums.get_mut(n)) {
                days.push((d, used));
            }
        }
    } else {
        for ((q, (_, open)), days) in queries.iter().zip(&split).zip(sums.iter_mut()) {
            let range = (open * DAY_MICROS, i64::MAX);
            let rows = day_sums(conn, q.pair, q.now, range).await?;
            days.extend(rows.into_iter().map(|s| (s.d, s.used)));
        }
    }
    let uses = queries
        .iter()
        .zip(split)
        .zip(sums)
        .map(|((q, (done, _)), days)| {
            let today = q.now.div_euclid(DAY_MICROS);
            let mut used = PairUse {
                today: 0,
                since: done.values().sum(),
            };
            for (d, day_used) in days {
                // A settled day after an open one is counted from its row.
                if done.contains_key(&d) {
                    continue;
                }
                used.since += day_used;
                if d == today {
                    used.today = day_used;
                }
            }
            used
        });
    Ok(uses.collect())
}

/// Every settled day whose row disagrees with its transfers, or that still has a hold that can be
/// captured (its amount is then in no budget: the day is read from its row), for `ledger verify`.
/// `now` is the ledger's clock.
pub(crate) async fn problems(
    conn: &mut AnyConnection,
    now: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT b.sender_id, b.recipient_id, b.day, b.used, CAST(COALESCE(SUM( \
             CASE WHEN t.status = 'COMPLETED' THEN t.captured ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN t.status = 'PENDING' AND t.expires_at > $1 \
                                    THEN 1 ELSE 0 END), 0) AS BIGINT) \
         FROM budget_days b LEFT JOIN transfers t ON t.sender_id = b.sender_id \
             AND t.recipient_id = b.recipient_id AND t.created_at >= b.day * 86400000000 \
             AND t.created_at < (b.day + 1) * 86400000000 \
         GROUP BY b.sender_id, b.recipient_id, b.day, b.used \
         HAVING b.used <> CAST(COALESCE(SUM( \
             CASE WHEN t.status = 'COMPLETED' THEN t.captured ELSE 0 END), 0) AS BIGINT) \
             OR SUM(CASE WHEN t.status = 'PENDING' AND t.expires_at > $1 THEN 1 ELSE 0 END) > 0",
    )
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(sender, recipient, day, stored, counted, open)| match open {
                0 => format!(
                    "settled budget day {day} of accounts {sender} > {recipient}: \
                 {stored} stored, its transfers count {counted}"
                ),
                _ => format!(
                    "settled budget day {day} of accounts {sender} > {recipient} still has {open} \
                 holds that can be captured"
                ),
            },
        )
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
