//! Analytics that need the user: one user's own view (`role=user`), a user filter, or groups by
//! user (top users). The user-less rollups cannot answer these, so they read the per-user rollups
//! (`usage_user_rollups`: hour and day, key owner × app × user) for whole hours and days and the
//! usage rows themselves for the minutes at the edges (index `usage_records_created`: at most
//! ~2 hours of rows) or, when the query also needs the endpoint, model or status, or minute
//! buckets, for the whole range (docs/analytics.md, "Which rows a query reads").
//!
//! Both sources are grouped by the query's dimensions and the user in SQL and merged here, so
//! active users are exact: the distinct non-empty user emails of the group.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use sqlx::any::AnyRow;
use sqlx::Row;

use super::analytics::{
    keys_within, measures, range_clause, scope_and_filters, segments, Dimension, StatsFilter,
    StatsGroup,
};
use super::analytics_keys::{group_keys, group_select, key_of, owner_select, read_hist, GroupKey};
use super::query::Where;
use super::rollup::{
    bucket_bounds, hist_columns, success_case, Grain, Summed, Sums, HIST_BUCKETS, USER_SUM_COLUMNS,
};
use super::Store;
use crate::error::Result;

/// The groups read so far, and how many of them have requests.
#[derive(Default)]
struct Groups {
    map: BTreeMap<GroupKey, (Sums, BTreeSet<String>)>,
    with_requests: usize,
}

impl Groups {
    /// Whether reading on can change the answer: without a ranking, once more groups have
    /// requests than an answer may hold, it is refused whatever else is read (one answer over
    /// tens of thousands of users was read whole first).
    fn go_on(&self, f: &StatsFilter) -> ControlFlow<()> {
        if f.top.is_none() && self.with_requests >= f.limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// SQL of [`super::rollup::bucket_of`] for the value `x`: a binary search over the bucket bounds
/// (six comparisons), so raw rows land in the same histogram buckets as the writer puts them.
pub(super) fn bucket_sql(x: &str) -> String {
    fn rec(x: &str, b: &[i64], lo: usize, hi: usize) -> String {
        if hi - lo == 1 {
            return lo.to_string();
        }
        let mid = (lo + hi) / 2;
        format!(
            "CASE WHEN {x} < {} THEN {} ELSE {} END",
            b[mid],
            rec(x, b, lo, mid),
            rec(x, b, mid, hi)
        )
    }
    rec(x, &bucket_bounds(), 0, HIST_BUCKETS)
}

/// Adds the sums of one (group, user) row to its group, and the user to the group's active users.
fn add_user_row(
    groups: &mut Groups,
    row: &AnyRow,
    f: &StatsFilter,
    s: &Sums,
) -> Result<ControlFlow<()>> {
    let user: String = row.try_get("uk")?;
    let (sums, users) = groups
        .map
        .entry(key_of(row, f)?)
        .or_insert_with(|| (Sums::new(false), BTreeSet::new()));
    let had_requests = sums[Summed::Requests] > 0;
    sums.merge(s);
    if !had_requests && sums[Summed::Requests] > 0 {
        groups.with_requests += 1;
    }
    if !user.is_empty() {
        users.insert(user);
    }
    Ok(groups.go_on(f))
}

impl Store {
    pub(super) async fn user_stats(&self, f: &StatsFilter) -> Result<Vec<StatsGroup>> {
        let rollups_answer = keys_within(
            f,
            &[
                Dimension::Day,
                Dimension::Hour,
                Dimension::App,
                Dimension::User,
            ],
        );
        let mut groups = Groups::default();
        let mut raw = Vec::new();
        if rollups_answer {
            let mut ranges = Vec::new();
            for (g, a, b) in segments(f.since, f.until, f.max_grain()) {
                if g == Grain::Minute {
                    raw.push((a, b));
                } else {
                    ranges.push((g, a, b));
                }
            }
            if !ranges.is_empty() {
                self.user_rollup_groups(f, &ranges, &mut groups).await?;
            }
        } else {
            raw.push((f.since, f.until));
        }
        if !raw.is_empty() && groups.go_on(f).is_continue() {
            self.raw_groups(f, &raw, &mut groups).await?;
        }
        let mut groups: Vec<_> = groups
            .map
            .into_iter()
            .filter(|(_, (s, _))| s[Summed::Requests] > 0)
            .collect();
        if let Some(top) = f.top {
            // Stable: ties stay in key order.
            groups.sort_by_key(|(_, (s, _))| std::cmp::Reverse(s[top.by.summed()]));
        }
        let groups = groups
            .into_iter()
            .take(f.max_groups())
            .map(|(GroupKey { key, owner }, (s, users))| {
                let measures = measures(&s, users.len() as i64, f.sums_only);
                let app_owner = None;
                (
                    owner,
                    StatsGroup {
                        key,
                        app_owner,
                        measures,
                    },
                )
            })
            .collect();
        self.name_owners(groups).await
    }

    /// Per-user rollups of the whole hours and days of the range, per group and user.
    async fn user_rollup_groups(
        &self,
        f: &StatsFilter,
        ranges: &[(Grain, i64, i64)],
        groups: &mut Groups,
    ) -> Result<()> {
        let mut w = Where::default();
        let ranges: Vec<String> = ranges
            .iter()
            .map(|&(g, a, b)| range_clause(&mut w, Some(g), a, b))
            .collect();
        w.clauses.push(format!("({})", ranges.join(" OR ")));
        scope_and_filters(&mut w, f, "r");
        let mut select = group_select(f, "r", "bucket_start");
        select.push("r.user_email AS uk".into());
        select.extend(USER_SUM_COLUMNS.map(|c| format!("CAST(SUM(r.{c}) AS BIGINT) AS {c}")));
        if !f.sums_only {
            select.extend(hist_columns().map(|c| format!("CAST(SUM(r.{c}) AS BIGINT) AS {c}")));
        }
        select.extend(owner_select(f, "r"));
        let group: Vec<String> = group_keys(f)
            .into_iter()
            .chain(["uk".to_string()])
            .collect();
        let sql = format!(
            "SELECT {} FROM usage_user_rollups r {} GROUP BY {}",
            select.join(", "),
            w.sql(),
            group.join(", ")
        );
        self.fetch_stats_each(&w, &sql, true, |row| {
            let mut s = Sums::new(false);
            for c in USER_SUM_COLUMNS {
                s.set_sum(c, row.try_get(c)?);
            }
            if !f.sums_only {
                // After the keys, `uk` and the sums (`select` order).
                read_hist(&row, f.group_by.len() + 1 + USER_SUM_COLUMNS.len(), &mut s)?;
            }
            add_user_row(groups, &row, f, &s)
        })
        .await
    }

    /// The usage rows created in `ranges`, per group, user and histogram bucket.
    async fn raw_groups(
        &self,
        f: &StatsFilter,
        ranges: &[(i64, i64)],
        groups: &mut Groups,
    ) -> Result<()> {
        let mut w = Where::default();
        let times: Vec<String> = ranges
            .iter()
            .map(|&(a, b)| range_clause(&mut w, None, a, b))
            .collect();
        w.clauses.push(format!("({})", times.join(" OR ")));
        scope_and_filters(&mut w, f, "u");
        let mut select = group_select(f, "u", "created_at");
        // Refunds as the writers count them: what the hold released (held minus captured).
        let held = "COALESCE(t.amount, h.amount, u.cost)";
        select.extend([
            "u.user_email AS uk".to_string(),
            format!("CAST({} AS BIGINT) AS bl", bucket_sql("u.latency_ms")),
            format!(
                "CAST({} AS BIGINT) AS bu",
                bucket_sql("u.upstream_latency_ms")
            ),
            format!(
                "CAST(CASE WHEN u.ttft_ms IS NULL THEN NULL ELSE {} END AS BIGINT) AS bt",
                bucket_sql("u.ttft_ms")
            ),
            "CAST(COUNT(*) AS BIGINT) AS requests".into(),
            format!(
                "CAST(SUM({}) AS BIGINT) AS successes",
                success_case("u.status", "1")
            ),
            "CAST(SUM(u.prompt_tokens) AS BIGINT) AS prompt_tokens".into(),
            "CAST(SUM(u.completion_tokens) AS BIGINT) AS completion_tokens".into(),
            "CAST(SUM(u.total_tokens) AS BIGINT) AS total_tokens".into(),
            "CAST(SUM(u.cost) AS BIGINT) AS revenue".into(),
            format!(
                "CAST(SUM(CASE WHEN {held} > u.cost THEN {held} - u.cost ELSE 0 END) AS BIGINT) \
                 AS refunds"
            ),
            "CAST(SUM(u.latency_ms) AS BIGINT) AS latency_sum".into(),
            "CAST(COUNT(u.ttft_ms) AS BIGINT) AS ttft_count".into(),
        ]);
        select.extend(owner_select(f, "u"));
        let group: Vec<String> = group_keys(f)
            .into_iter()
            .chain(["uk", "bl", "bu", "bt"].map(String::from))
            .collect();
        let sql = format!(
            "SELECT {} FROM usage_records u LEFT JOIN transfers t ON t.id = u.transfer_id \
             LEFT JOIN hosted_transfers h ON h.id = u.hosted_transfer_id {} GROUP BY {}",
            select.join(", "),
            w.sql(),
            group.join(", ")
        );
        let bucket = |v: i64| (v.max(0) as usize).min(HIST_BUCKETS - 1);
        self.fetch_stats_each(&w, &sql, false, |row| {
            let mut s = Sums::new(false);
            for c in USER_SUM_COLUMNS {
                s.set_sum(c, row.try_get(c)?);
            }
            s.hist[0][bucket(row.try_get("bl")?)] += s[Summed::Requests];
            s.hist[1][bucket(row.try_get("bu")?)] += s[Summed::Requests];
            if let Some(bt) = row.try_get::<Option<i64>, _>("bt")? {
                s.hist[2][bucket(bt)] += s[Summed::TtftCount];
            }
            add_user_row(groups, &row, f, &s)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rollup::bucket_of;

    /// The SQL bucket search picks `bucket_of`'s bucket: checked by evaluating its comparisons.
    #[test]
    fn bucket_sql_follows_the_bounds() {
        fn eval(sql: &str, v: i64) -> usize {
            // "CASE WHEN x < B THEN a ELSE b END", nested.
            let s = sql.trim();
            if let Ok(n) = s.parse() {
                return n;
            }
            let rest = &s["CASE WHEN x < ".len()..s.len() - " END".len()];
            let (bound, rest) = rest.split_once(" THEN ").expect("then");
            // Split THEN/ELSE at the ELSE of this level (nesting depth 0).
            let mut depth = 0;
            let bytes = rest.as_bytes();
            let mut at = None;
            for i in 0..bytes.len() {
                if rest[i..].starts_with("CASE ") {
                    depth += 1;
                } else if rest[i..].starts_with(" END") {
                    depth -= 1;
                } else if depth == 0 && rest[i..].starts_with(" ELSE ") {
                    at = Some(i);
                    break;
                }
            }
            let at = at.expect("else");
            let (then, other) = (&rest[..at], &rest[at + " ELSE ".len()..]);
            if v < bound.parse::<i64>().expect("bound") {
                eval(then, v)
            } else {
                eval(other, v)
            }
        }
        let sql = bucket_sql("x");
        for v in (-3..200).chain([1_000, 5_000, 126_935, 126_936, 10_000_000]) {
            assert_eq!(eval(&sql, v), bucket_of(v), "{v}");
        }
    }
}
