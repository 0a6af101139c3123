//! Analytics read path: grouped measures over the usage rollups (docs/analytics.md).
//!
//! A range `[since, until)` (whole minutes) is split into whole days, whole hours at the day edges
//! and minutes at the hour edges, and each part is read from the coarsest grain that covers it
//! exactly, so a 30-day answer reads about 30 day rows per key plus a few hundred edge rows.
//! Queries that neither group nor filter by user (nor are one user's own view) read the user-less
//! rollups here; the others are answered by `analytics_user.rs`.

use std::ops::ControlFlow;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::Row;

use super::analytics_keys::{group_keys, group_select, key_of, owner_select, read_hist, GroupKey};
use super::db_error::{classify, DbErrorClass};
use super::hll::{estimate, register_columns, REGISTERS};
use super::query::{Bind, UsageDims, Where};
use super::rollup::{
    bucket_value, hist_columns, success_case, Grain, Summed, Sums, HIST_BUCKETS, SUM_COLUMNS,
};
use super::turns::{Caller, Turn};
use super::{Backend, Store};
use crate::error::{LedgerError, Result};

/// How long an analytics answer waits for its turn (a quarter of the pool's connections answer
/// at once) before it is refused `UNAVAILABLE`: a dashboard refresh asks 8 answers at once, and
/// on SQLite (one turn) they queue.
const ANALYTICS_WAIT: Duration = Duration::from_secs(30);

/// The longest one analytics statement may run on Postgres (`statement_timeout`): the rollups
/// answer a dashboard in milliseconds, and a raw-row scan of a wide range that runs longer holds
/// its connection from everyone else.
const ANALYTICS_STATEMENT_LIMIT: Duration = Duration::from_secs(15);

/// What rows are grouped by. Time dimensions group by UTC minute, hour or day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dimension {
    Minute,
    Hour,
    Day,
    App,
    Endpoint,
    User,
    Model,
    Status,
}

impl Dimension {
    pub const ALL: [Dimension; 8] = [
        Dimension::Minute,
        Dimension::Hour,
        Dimension::Day,
        Dimension::App,
        Dimension::Endpoint,
        Dimension::User,
        Dimension::Model,
        Dimension::Status,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Minute => "minute",
            Dimension::Hour => "hour",
            Dimension::Day => "day",
            Dimension::App => "app",
            Dimension::Endpoint => "endpoint",
            Dimension::User => "user",
            Dimension::Model => "model",
            Dimension::Status => "status",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The grain of a time dimension.
    pub fn grain(self) -> Option<Grain> {
        match self {
            Dimension::Minute => Some(Grain::Minute),
            Dimension::Hour => Some(Grain::Hour),
            Dimension::Day => Some(Grain::Day),
            _ => None,
        }
    }

    /// The SQL of this dimension's value for a row of table alias `t` whose time column is
    /// `time` (`bucket_start` in rollups, `created_at` in usage rows).
    pub(super) fn column(self, t: &str, time: &str) -> String {
        match self.grain() {
            Some(g) => format!("({t}.{time} / {0}) * {0}", g.micros()),
            None => format!(
                "{t}.{}",
                match self {
                    Dimension::App => "app_name",
                    Dimension::Endpoint => "endpoint",
                    Dimension::User => "user_email",
                    Dimension::Model => "model",
                    _ => "status",
                }
            ),
        }
    }
}

/// Whose rollup rows a query may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsScope {
    /// The admin: every row.
    All,
    /// The admin on a ledger whose accounts keep several currencies: the rows of apps whose
    /// owner keeps this one (money of two currencies is never summed).
    Currency(String),
    /// Rows of the apps this account receives money for.
    Owner(i64),
    /// Rows of requests this user sent, across all apps.
    User(String),
}

impl StatsScope {
    /// Whom the analytics turns count this answer for.
    pub(super) fn caller(&self) -> Caller {
        match self {
            StatsScope::All | StatsScope::Currency(_) => Caller::Admin,
            StatsScope::Owner(id) => Caller::Owner(*id),
            StatsScope::User(email) => Caller::User(email.clone()),
        }
    }
}

/// A validated analytics query: `since`/`until` are whole minutes, `until > since`.
#[derive(Debug, Clone)]
pub struct StatsFilter {
    pub scope: StatsScope,
    pub since: i64,
    pub until: i64,
    pub group_by: Vec<Dimension>,
    pub dims: UsageDims,
    /// At most this many groups are read (without `top`).
    pub limit: usize,
    /// No percentiles: the histograms are not read (most of a wide query's aggregates).
    pub sums_only: bool,
    /// Only the groups with the largest measure, largest first (else in key order).
    pub top: Option<Top>,
}

/// What a top-N answer ranks its groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopBy {
    /// Captured micros.
    Revenue,
    Requests,
}

impl TopBy {
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "revenue" => Ok(TopBy::Revenue),
            "requests" => Ok(TopBy::Requests),
            other => Err(LedgerError::invalid(format!(
                "unknown top_by {other:?}: use revenue or requests"
            ))),
        }
    }

    /// Its column in the rollups' select (`SUM_COLUMNS`).
    fn column(self) -> &'static str {
        match self {
            TopBy::Revenue => "revenue",
            TopBy::Requests => "requests",
        }
    }

    pub(super) fn summed(self) -> Summed {
        match self {
            TopBy::Revenue => Summed::Revenue,
            TopBy::Requests => Summed::Requests,
        }
    }
}

/// The `n` groups with the largest `by`, ties in key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Top {
    pub by: TopBy,
    pub n: usize,
}

impl StatsFilter {
    /// The most groups read: the top-N's `n`, else `limit`.
    pub(super) fn max_groups(&self) -> usize {
        self.top.map_or(self.limit, |t| t.n)
    }

    /// The coarsest rollup grain that still resolves the finest time dimension grouped by.
    pub(super) fn max_grain(&self) -> Grain {
        self.group_by
            .iter()
            .filter_map(|d| d.grain())
            .min()
            .unwrap_or(Grain::Day)
    }
}

/// The value of one grouping dimension.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(untagged)]
pub enum KeyValue {
    /// Start of a time bucket, unix micros.
    Time(i64),
    Text(String),
}

/// Latency percentiles in ms, from the rollup histograms (error bound in docs/analytics.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Measures {
    pub requests: i64,
    pub successes: i64,
    pub failures: i64,
    /// successes / requests; 0 without requests.
    pub success_rate: f64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Captured micros.
    pub revenue_micros: i64,
    /// Held micros released without capture.
    pub refunds_micros: i64,
    pub active_users: i64,
    /// `None` when only sums were asked for (`StatsFilter::sums_only`).
    pub latency_ms: Option<Percentiles>,
    pub upstream_latency_ms: Option<Percentiles>,
    /// Streams only; `None` without streamed requests (or with `sums_only`).
    pub ttft_ms: Option<Percentiles>,
    pub streams: i64,
    /// Mean whole-request latency (exact, from sums).
    pub mean_latency_ms: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatsGroup {
    pub key: Vec<KeyValue>,
    /// Grouped by app: the app's owner (the account its rows pay). Two owners may name an app
    /// alike, and a payer's or the admin's figures keep their apps apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_owner: Option<String>,
    pub measures: Measures,
}

/// The parts of `[since, until)` and the grain each is read at, coarsest first.
pub(super) fn segments(since: i64, until: i64, max: Grain) -> Vec<(Grain, i64, i64)> {
    fn split(a: i64, b: i64, grain: Grain, out: &mut Vec<(Grain, i64, i64)>) {
        if a >= b {
            return;
        }
        let g = grain.micros();
        let (lo, hi) = (ceil_to(a, g), b.div_euclid(g) * g);
        let finer = match grain {
            Grain::Day => Some(Grain::Hour),
            Grain::Hour => Some(Grain::Minute),
            Grain::Minute => None,
        };
        match finer {
            Some(f) if lo >= hi => split(a, b, f, out),
            Some(f) => {
                out.push((grain, lo, hi));
                split(a, lo, f, out);
                split(hi, b, f, out);
            }
            None => out.push((grain, a, b)),
        }
    }
    let mut out = Vec::new();
    split(since, until, max, &mut out);
    out
}

fn ceil_to(v: i64, g: i64) -> i64 {
    v.saturating_add(g - 1).div_euclid(g).saturating_mul(g)
}

pub(super) fn percentiles(hist: &[i64]) -> Percentiles {
    let n: i64 = hist.iter().sum();
    let at = |q: f64| -> f64 {
        let rank = ((q * n as f64).ceil() as i64).max(1);
        let mut seen = 0;
        for (i, c) in hist.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (bucket_value(i) * 10.0).round() / 10.0;
            }
        }
        0.0
    };
    if n == 0 {
        return Percentiles::default();
    }
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
    }
}

/// The measures of a group from its sums and its count of active users; percentiles from its
/// histograms unless `sums_only` (they were not read).
pub(super) fn measures(s: &Sums, active_users: i64, sums_only: bool) -> Measures {
    let requests = s[Summed::Requests];
    let pct = |h: &[i64], any: bool| (!sums_only && any).then(|| percentiles(h));
    Measures {
        requests,
        successes: s[Summed::Successes],
        failures: requests - s[Summed::Successes],
        success_rate: s[Summed::Successes] as f64 / requests as f64,
        prompt_tokens: s[Summed::PromptTokens],
        completion_tokens: s[Summed::CompletionTokens],
        total_tokens: s[Summed::TotalTokens],
        revenue_micros: s[Summed::Revenue],
        refunds_micros: s[Summed::Refunds],
        active_users,
        latency_ms: pct(&s.hist[0], true),
        upstream_latency_ms: pct(&s.hist[1], true),
        ttft_ms: pct(&s.hist[2], s[Summed::TtftCount] > 0),
        streams: s[Summed::TtftCount],
        mean_latency_ms: s[Summed::LatencySum] as f64 / requests as f64,
    }
}

/// Whether a query needs the user: one user's own view, a user filter or user groups.
fn needs_user(f: &StatsFilter) -> bool {
    matches!(f.scope, StatsScope::User(_))
        || f.dims.user_email.is_some()
        || f.group_by.contains(&Dimension::User)
}

/// Whether the per-app rollups answer a user-less query: it groups by time and app only and filters
/// by nothing finer than the app. They hold one row per owner × app and bucket instead of one per
/// endpoint × model × status too (~12× fewer in the benchmark's data), each as wide, and the cost
/// of these queries is the rows' ~330 aggregates (migration 0020).
fn per_app(f: &StatsFilter) -> bool {
    use Dimension::*;
    keys_within(f, &[Minute, Hour, Day, App])
}

/// Whether a rollup table keyed by `dims` (besides owner and time) answers `f`: it groups by
/// those dimensions only and filters by nothing outside them (the app and the user are the
/// filters a narrow table can keep; endpoint, model and status need the user-less key).
pub(super) fn keys_within(f: &StatsFilter, dims: &[Dimension]) -> bool {
    f.group_by.iter().all(|d| dims.contains(d))
        && f.dims.endpoint.is_none()
        && f.dims.model.is_none()
        && f.dims.status.is_none()
}

/// The scope and the filters other than the user's, on table alias `t`.
/// The accounts that keep a currency (bound as `?`).
pub(super) const OWNERS_IN: &str = "(SELECT id FROM accounts WHERE currency = ?)";

pub(super) fn scope_and_filters(w: &mut Where, f: &StatsFilter, t: &str) {
    match &f.scope {
        StatsScope::All => {}
        StatsScope::Currency(c) => w.text(&format!("{t}.recipient_id IN {OWNERS_IN}"), c),
        StatsScope::Owner(id) => w.int(&format!("{t}.recipient_id = ?"), *id),
        StatsScope::User(email) => w.text(&format!("{t}.user_email = ?"), email),
    }
    f.dims.push_where(w, t);
}

/// `[a, b)` of rollups of grain `g` (`r.bucket_start`), or of usage rows (`u.created_at`) without a
/// grain, as bound parameters: the statement's text then depends on the query's shape only, so it
/// is prepared once per connection and planned once (a plan over ~330 aggregates costs more than
/// reading a few thousand rollup rows).
pub(super) fn range_clause(w: &mut Where, g: Option<Grain>, a: i64, b: i64) -> String {
    let mut bind = |v: i64| {
        let p = w.next();
        w.binds.push(Bind::Int(v));
        p
    };
    match g {
        Some(g) => {
            let (pg, pa, pb) = (bind(g as i64), bind(a), bind(b));
            format!("(r.grain = {pg} AND r.bucket_start >= {pa} AND r.bucket_start < {pb})")
        }
        None => {
            let (pa, pb) = (bind(a), bind(b));
            format!("(u.created_at >= {pa} AND u.created_at < {pb})")
        }
    }
}

impl Store {
    /// Grouped measures, groups in key order (time ascending).
    pub async fn usage_stats(&self, f: &StatsFilter) -> Result<Vec<StatsGroup>> {
        // A quarter of the pool answers analytics at once; the rest stays for the calls that move
        // money and record usage. Without this, dashboards (8 answers per refresh each) or one
        // account sending many wide queries held every connection, each waiting on the fold
        // lock or a long scan, and usage rows and budgeted holds waited for a connection.
        let _turn = self.analytics_turn(f.scope.caller()).await?;
        // Rows still queued for the rollups are folded first, so the answer is exact.
        self.fold_rollups().await?;
        // A range that ends after the last row (the dashboard's "to now") is answered as if it
        // ran to the end of its last bucket at the coarsest grain read: the rollup of that
        // bucket holds only rows before `until`, so its coarse row replaces up to 23 hour and 59
        // minute rows per key (or, for the user, the raw rows of the last minutes). Checked
        // before (to skip a wasted read) and after the read: a row from `until` on that the read
        // could have counted was committed before it, so the second check sees it, and the
        // answer is read again over the exact range.
        let grain = f.max_grain();
        let end = ceil_to(f.until, grain.micros());
        if grain != Grain::Minute && end > f.until && !self.rows_in(f.until, end).await? {
            let wider = StatsFilter {
                until: end,
                ..f.clone()
            };
            let got = self.stats_in_range(&wider).await?;
            if !self.rows_in(f.until, end).await? {
                return Ok(got);
            }
        }
        self.stats_in_range(f).await
    }

    /// Whether a usage row was created in `[a, b)` (index `usage_records_created`).
    async fn rows_in(&self, a: i64, b: i64) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM (SELECT 1 FROM usage_records \
             WHERE created_at >= $1 AND created_at < $2 LIMIT 1) x",
        )
        .bind(a)
        .bind(b)
        .fetch_one(self.reader())
        .await?
            > 0)
    }

    /// [`Self::usage_stats`] over exactly `[f.since, f.until)`.
    async fn stats_in_range(&self, f: &StatsFilter) -> Result<Vec<StatsGroup>> {
        if needs_user(f) {
            return self.user_stats(f).await;
        }
        let mut w = Where::default();
        let ranges: Vec<String> = segments(f.since, f.until, f.max_grain())
            .into_iter()
            .map(|(g, a, b)| range_clause(&mut w, Some(g), a, b))
            .collect();
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        w.clauses.push(format!("({})", ranges.join(" OR ")));
        scope_and_filters(&mut w, f, "r");
        let mut select = group_select(f, "r", "bucket_start");
        let sum = |c: &str| format!("CAST(SUM(r.{c}) AS BIGINT) AS {c}");
        select.extend(SUM_COLUMNS.map(sum));
        let table = if per_app(f) {
            select.push(sum("successes"));
            "usage_app_rollups"
        } else {
            select.push(format!(
                "CAST(SUM({}) AS BIGINT) AS successes",
                success_case("r.status", "r.requests")
            ));
            "usage_rollups"
        };
        // Empty histogram buckets are NULL on Postgres (migrations 0014, 0015).
        if !f.sums_only {
            select.extend(hist_columns().map(|c| format!("CAST(SUM(r.{c}) AS BIGINT) AS {c}")));
        }
        // The active-user sketches merge by maximum (`hll.rs`); NULL registers are 0.
        select.extend(register_columns().map(|c| format!("CAST(MAX(r.{c}) AS BIGINT) AS {c}")));
        select.extend(owner_select(f, "r"));
        let group = if f.group_by.is_empty() {
            String::new()
        } else {
            let keys = group_keys(f).join(", ");
            match f.top {
                // The output column (its sum), ranked; ties in key order.
                Some(t) => format!("GROUP BY {keys} ORDER BY {} DESC, {keys}", t.by.column()),
                None => format!("GROUP BY {keys} ORDER BY {keys}"),
            }
        };
        let sql = format!(
            "SELECT {} FROM {table} r {} {group} LIMIT {}",
            select.join(", "),
            w.sql(),
            f.max_groups()
        );
        let rows = self.fetch_stats(&w, &sql, true).await?;
        let mut out = Vec::with_capacity(rows.len());
        // Columns by index, in `select` order: keys, sums, successes, histograms, registers.
        let sums_at = f.group_by.len();
        let hist_at = sums_at + SUM_COLUMNS.len() + 1;
        let regs_at = hist_at + if f.sums_only { 0 } else { 3 * HIST_BUCKETS };
        for row in rows {
            let requests: Option<i64> = row.try_get(sums_at)?;
            if requests.is_none_or(|r| r <= 0) {
                continue; // no rows matched: an aggregate without GROUP BY still returns one row
            }
            let mut s = Sums::new(false);
            for (i, c) in SUM_COLUMNS.into_iter().chain(["successes"]).enumerate() {
                s.set_sum(c, row.try_get(sums_at + i)?);
            }
            if !f.sums_only {
                read_hist(&row, hist_at, &mut s)?;
            }
            let mut registers = [0u8; REGISTERS];
            for (i, r) in registers.iter_mut().enumerate() {
                let v: Option<i64> = row.try_get(regs_at + i)?;
                *r = v.unwrap_or(0).clamp(0, 255) as u8;
            }
            let GroupKey { key, owner } = key_of(&row, f)?;
            out.push((
                owner,
                StatsGroup {
                    key,
                    app_owner: None,
                    measures: measures(&s, estimate(&registers), f.sums_only),
                },
            ));
        }
        self.name_owners(out).await
    }

    /// A turn to answer analytics for `caller` (held until dropped), or `UNAVAILABLE` after
    /// [`ANALYTICS_WAIT`]. Waiting callers are served round robin (`turns.rs`).
    pub(super) async fn analytics_turn(&self, caller: Caller) -> Result<Turn> {
        self.analytics
            .take(caller, ANALYTICS_WAIT)
            .await
            .ok_or_else(|| {
                LedgerError::Unavailable("too many analytics answers in progress; retry".into())
            })
    }

    /// Runs an analytics query, prepared (its text depends on the query's shape, not its range).
    /// On Postgres without JIT (compiling a few hundred aggregate expressions costs more than the
    /// query) and with the generic plan (planning them costs more than reading a few thousand
    /// rollup rows; the ranges and filters are all index conditions, so the plan does not depend
    /// on their values).
    ///
    /// Reads of usage rows (`generic = false`) keep custom plans: whether the user's index or the
    /// time index is the better path depends on the values (measured: one user's month through a
    /// generic plan took ~1 s instead of a few ms).
    pub(super) async fn fetch_stats(
        &self,
        w: &Where,
        sql: &str,
        generic: bool,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        let mut rows = Vec::new();
        self.fetch_stats_each(w, sql, generic, |row| {
            rows.push(row);
            Ok(ControlFlow::Continue(()))
        })
        .await?;
        Ok(rows)
    }

    /// [`Store::fetch_stats`], each row handed to `each` as it comes (until it says `Break`):
    /// a query of one row per user held every row at once, about 16 KB each (a few hundred
    /// columns), and one answer over 60,000 users took a gigabyte of the ledger's memory.
    pub(super) async fn fetch_stats_each(
        &self,
        w: &Where,
        sql: &str,
        generic: bool,
        mut each: impl FnMut(sqlx::any::AnyRow) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let query = w.bind_query(sqlx::query(sql));
        if self.backend() != Backend::Postgres {
            let mut rows = query.fetch(self.reader());
            while let Some(row) = rows.try_next().await? {
                if each(row)?.is_break() {
                    break;
                }
            }
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        let mode = if generic {
            "force_generic_plan"
        } else {
            "auto"
        };
        sqlx::query(&format!(
            "SELECT set_config('jit', 'off', true), set_config('plan_cache_mode', '{mode}', true), \
             set_config('statement_timeout', '{}', true)",
            ANALYTICS_STATEMENT_LIMIT.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        {
            let mut rows = query.fetch(&mut *tx);
            while let Some(row) = rows.try_next().await.map_err(|e| {
                // Not `UNAVAILABLE`: the same query would run as long again.
                if classify(&e) == DbErrorClass::Cancelled {
                    LedgerError::ResourceExhausted(format!(
                        "this analytics query ran longer than {ANALYTICS_STATEMENT_LIMIT:?}; ask \
                         for a shorter range or fewer groups"
                    ))
                } else {
                    e.into()
                }
            })? {
                if each(row)?.is_break() {
                    break;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rollup::{DAY, HOUR, MINUTE};

    #[test]
    fn segments_cover_the_range_exactly_once() {
        let base = 10 * DAY;
        let cases = [
            (base, base + 30 * DAY),
            (base + 7 * MINUTE, base + 3 * DAY + 5 * HOUR + 2 * MINUTE),
            (base + 59 * MINUTE, base + 61 * MINUTE),
            (base, base + MINUTE),
        ];
        for (since, until) in cases {
            for max in Grain::ALL {
                let mut segs = segments(since, until, max);
                assert!(segs.iter().all(|(g, ..)| *g <= max));
                segs.sort_by_key(|s| s.1);
                let mut at = since;
                for (g, a, b) in segs {
                    assert_eq!(a, at);
                    assert_eq!(a % g.micros(), 0);
                    assert_eq!(b % g.micros(), 0);
                    at = b;
                }
                assert_eq!(at, until);
            }
        }
        // 30 whole days are read as 30 day buckets.
        assert_eq!(segments(base, base + 30 * DAY, Grain::Day).len(), 1);
    }

    #[test]
    fn percentiles_pick_the_bucket_of_the_rank() {
        let mut h = [0i64; HIST_BUCKETS];
        h[3] = 98; // 3 ms
        h[10] = 2; // 10 ms
        let p = percentiles(&h);
        assert_eq!((p.p50, p.p95), (3.0, 3.0));
        assert!((p.p99 - 10.0).abs() <= 1.0, "{p:?}");
    }
}
