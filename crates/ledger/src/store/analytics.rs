//! Analytics read path: grouped measures over the usage rollups (never the raw rows).
//!
//! A range `[since, until)` (whole minutes) is split into whole days, whole hours at the day edges
//! and minutes at the hour edges, and each part is read from the coarsest grain that covers it
//! exactly, so a 30-day answer reads about 30 day rows per key plus a few hundred edge rows.

use sqlx::Row;
use syft_error::UsageStatus;

use super::query::Where;
use super::rollup::{bucket_value, hist_columns, Grain, HIST_BUCKETS, MEASURES, SUM_COLUMNS};
use super::Store;
use crate::error::Result;

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

    fn column(self) -> String {
        match self.grain() {
            Some(g) => format!("(r.bucket_start / {0}) * {0}", g.micros()),
            None => match self {
                Dimension::App => "r.app_name",
                Dimension::Endpoint => "r.endpoint",
                Dimension::User => "r.user_email",
                Dimension::Model => "r.model",
                _ => "r.status",
            }
            .to_string(),
        }
    }
}

/// Whose rollup rows a query may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsScope {
    /// The admin: every row.
    All,
    /// Rows of the apps this account receives money for.
    Owner(i64),
    /// Rows of requests this user sent, across all apps.
    User(String),
}

/// A validated analytics query: `since`/`until` are whole minutes, `until > since`.
#[derive(Debug, Clone)]
pub struct StatsFilter {
    pub scope: StatsScope,
    pub since: i64,
    pub until: i64,
    pub group_by: Vec<Dimension>,
    pub app_name: Option<String>,
    pub endpoint: Option<String>,
    pub user_email: Option<String>,
    pub model: Option<String>,
    pub status: Option<String>,
    /// At most this many groups are read.
    pub limit: usize,
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
    pub latency_ms: Percentiles,
    pub upstream_latency_ms: Percentiles,
    /// Streams only; `None` without streamed requests.
    pub ttft_ms: Option<Percentiles>,
    pub streams: i64,
    /// Mean whole-request latency (exact, from sums).
    pub mean_latency_ms: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatsGroup {
    pub key: Vec<KeyValue>,
    pub measures: Measures,
}

/// The parts of `[since, until)` and the grain each is read at, coarsest first.
fn segments(since: i64, until: i64, max: Grain) -> Vec<(Grain, i64, i64)> {
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
    (v + g - 1).div_euclid(g) * g
}

fn percentiles(hist: &[i64]) -> Percentiles {
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

impl Store {
    /// Grouped measures, groups in key order (time ascending).
    pub async fn usage_stats(&self, f: &StatsFilter) -> Result<Vec<StatsGroup>> {
        let max_grain = f
            .group_by
            .iter()
            .filter_map(|d| d.grain())
            .min()
            .unwrap_or(Grain::Day);
        let mut w = Where::default();
        let ranges: Vec<String> = segments(f.since, f.until, max_grain)
            .into_iter()
            .map(|(g, a, b)| {
                format!(
                    "(r.grain = {} AND r.bucket_start >= {a} AND r.bucket_start < {b})",
                    g as i16
                )
            })
            .collect();
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        w.clauses.push(format!("({})", ranges.join(" OR ")));
        match &f.scope {
            StatsScope::All => {}
            StatsScope::Owner(id) => w.int("r.recipient_id = ?", *id),
            StatsScope::User(email) => w.text("r.user_email = ?", email),
        }
        for (col, v) in [
            ("r.app_name", &f.app_name),
            ("r.endpoint", &f.endpoint),
            ("r.user_email", &f.user_email),
            ("r.model", &f.model),
            ("r.status", &f.status),
        ] {
            if let Some(v) = v {
                w.text(&format!("{col} = ?"), v);
            }
        }
        let keys: Vec<String> = f.group_by.iter().map(|d| d.column()).collect();
        let mut select: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} AS k{i}"))
            .collect();
        let sum = |c: &str| format!("CAST(SUM(r.{c}) AS BIGINT) AS {c}");
        select.extend(SUM_COLUMNS.map(sum));
        // The status text is the enum's own (`UsageStatus::as_str`), never caller input.
        select.push(format!(
            "CAST(SUM(CASE WHEN r.status = '{}' THEN r.requests ELSE 0 END) AS BIGINT) \
             AS successes",
            UsageStatus::Success.as_str()
        ));
        select.push(
            "COUNT(DISTINCT CASE WHEN r.user_email <> '' THEN r.user_email END) AS active_users"
                .into(),
        );
        // Empty histogram buckets are NULL on Postgres (migration 0014).
        select.extend(
            hist_columns().map(|c| format!("CAST(COALESCE(SUM(r.{c}), 0) AS BIGINT) AS {c}")),
        );
        let group = if keys.is_empty() {
            String::new()
        } else {
            let n: Vec<String> = (0..keys.len()).map(|i| format!("k{i}")).collect();
            format!("GROUP BY {0} ORDER BY {0}", n.join(", "))
        };
        let sql = format!(
            "SELECT {} FROM usage_rollups r {} {group} LIMIT {}",
            select.join(", "),
            w.sql(),
            f.limit
        );
        let rows = w
            .bind_query(sqlx::query(&sql).persistent(false))
            .fetch_all(self.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let requests: Option<i64> = row.try_get("requests")?;
            let Some(requests) = requests.filter(|r| *r > 0) else {
                continue; // no rows matched: an aggregate without GROUP BY still returns one row
            };
            let mut key = Vec::with_capacity(f.group_by.len());
            for (i, d) in f.group_by.iter().enumerate() {
                let name = format!("k{i}");
                key.push(match d.grain() {
                    Some(_) => KeyValue::Time(row.try_get(name.as_str())?),
                    None => KeyValue::Text(row.try_get(name.as_str())?),
                });
            }
            let mut hist = [[0i64; HIST_BUCKETS]; 3];
            for (m, cols) in hist_columns()
                .collect::<Vec<_>>()
                .chunks(HIST_BUCKETS)
                .enumerate()
            {
                for (i, c) in cols.iter().enumerate() {
                    hist[m][i] = row.try_get(c.as_str())?;
                }
            }
            debug_assert_eq!(MEASURES.len(), 3);
            let get = |c: &str| row.try_get::<i64, _>(c);
            let successes = get("successes")?;
            let streams = get("ttft_count")?;
            out.push(StatsGroup {
                key,
                measures: Measures {
                    requests,
                    successes,
                    failures: requests - successes,
                    success_rate: successes as f64 / requests as f64,
                    prompt_tokens: get("prompt_tokens")?,
                    completion_tokens: get("completion_tokens")?,
                    total_tokens: get("total_tokens")?,
                    revenue_micros: get("revenue")?,
                    refunds_micros: get("refunds")?,
                    active_users: get("active_users")?,
                    latency_ms: percentiles(&hist[0]),
                    upstream_latency_ms: percentiles(&hist[1]),
                    ttft_ms: (streams > 0).then(|| percentiles(&hist[2])),
                    streams,
                    mean_latency_ms: get("latency_sum")? as f64 / requests as f64,
                },
            });
        }
        Ok(out)
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
