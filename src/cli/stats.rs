//! `syft-router stats`: grouped usage measures from the ledger's analytics (docs/analytics.md), as a
//! table, `--json` or `--csv`.

use clap::Args;
use syft_ledger::money::format_micros;
use syft_proto::ledger as pb;

use super::client::{Conn, OrFail};
use super::time::{format_time, parse_time};

/// A `--by` value: the lowercase name of a `StatsDimension` (`day`, `app`, …).
fn parse_dimension(s: &str) -> Result<pb::StatsDimension, String> {
    let name = format!("STATS_DIMENSION_{}", s.to_ascii_uppercase());
    pb::StatsDimension::from_str_name(&name)
        .filter(|d| *d != pb::StatsDimension::Unspecified)
        .ok_or_else(|| {
            format!(
                "unknown dimension {s:?}: minute, hour, day, app, endpoint, user, model or status"
            )
        })
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    conn: Conn,
    /// Group by up to two of: day, hour, minute (UTC), app, endpoint, user, model, status
    /// (`--by day --by app` or `--by day,app`). None: one total.
    #[arg(long, value_parser = parse_dimension, value_delimiter = ',')]
    by: Vec<pb::StatsDimension>,
    /// From this time: a date (2025-01-31), a UTC time (2025-01-31T12:00:00Z) or a duration ago
    /// (90m, 24h, 7d). Default: 1 hour (minute groups), 2 days (hour groups) or 30 days ago.
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Until this time (same forms as --since); default now.
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    /// Only requests to this app (a router's name).
    #[arg(long)]
    app: Option<String>,
    /// Only requests to this service endpoint: `/chat` (every chat, whichever front it came
    /// through: gRPC, `/chat` or `/v1/chat/completions`) or `/search`.
    #[arg(long)]
    endpoint: Option<String>,
    /// A user's email.
    #[arg(long)]
    user: Option<String>,
    /// Only requests for this model.
    #[arg(long)]
    model: Option<String>,
    /// Only requests with this outcome (docs/router.md lists what each means).
    #[arg(long, value_parser = super::usage_statuses())]
    status: Option<String>,
    /// owner: the apps you are paid for; user: the requests you sent (the admin sees everything).
    #[arg(long = "as", value_parser = ["owner", "user"], default_value = "owner")]
    role: String,
    /// Print CSV instead of a table.
    #[arg(long, conflicts_with = "json")]
    csv: bool,
}

const HEADER: [&str; 12] = [
    "requests",
    "success_rate",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "revenue",
    // `refunds_micros` in the answer: held money released without capture. Named "refunds"
    // here, it sat beside the footer's refunds given (a first-hour reviewer's finding).
    "released",
    "active_users",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "upstream_p99_ms",
];

fn key_text(k: &pb::StatsKey, csv: bool) -> String {
    match &k.value {
        Some(pb::stats_key::Value::BucketStartUnixMicros(t)) if csv => t.to_string(),
        Some(pb::stats_key::Value::BucketStartUnixMicros(t)) => format_time(*t),
        // An empty key (a row without a user: an unreadable body) is `-` in a table; the CSV
        // keeps it empty, as the data is ("-" would read as a user of that name).
        Some(pb::stats_key::Value::Text(t)) if t.is_empty() && !csv => "-".into(),
        Some(pb::stats_key::Value::Text(t)) => t.clone(),
        None => String::new(),
    }
}

/// The measures of a group as cells: money in currency units (table) or micros (CSV), the
/// success rate as a percentage (table) or the fraction the JSON has (CSV: a number to compute
/// with, not `75.0%`).
fn cells(g: &pb::StatsGroup, csv: bool) -> Vec<String> {
    let lat = g.latency_ms.unwrap_or_default();
    let up = g.upstream_latency_ms.unwrap_or_default();
    let money = |m: i64| if csv { m.to_string() } else { format_micros(m) };
    vec![
        g.requests.to_string(),
        if csv {
            g.success_rate.to_string()
        } else {
            format!("{:.1}%", 100.0 * g.success_rate)
        },
        g.prompt_tokens.to_string(),
        g.completion_tokens.to_string(),
        g.total_tokens.to_string(),
        money(g.revenue_micros),
        money(g.refunds_micros),
        g.active_users.to_string(),
        lat.p50.to_string(),
        lat.p95.to_string(),
        lat.p99.to_string(),
        up.p99.to_string(),
    ]
}

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    let mut client = conn.user()?;
    let role = if args.role == "user" {
        pb::StatsRole::User
    } else {
        pb::StatsRole::Owner
    };
    let request = pb::GetUsageStatsRequest {
        group_by: args.by.iter().map(|b| *b as i32).collect(),
        since_unix_micros: args.since,
        until_unix_micros: args.until,
        role: role as i32,
        app_name: args.app.clone().unwrap_or_default(),
        endpoint: args.endpoint.clone().unwrap_or_default(),
        user_email: args.user.clone().unwrap_or_default(),
        model: args.model.clone().unwrap_or_default(),
        status: args.status.clone().unwrap_or_default(),
        ..Default::default()
    };
    let stats = client.get_usage_stats(request).await.or_fail(conn)?;
    let names: Vec<String> = args
        .by
        .iter()
        .map(|b| {
            let name = b.as_str_name();
            name.trim_start_matches("STATS_DIMENSION_")
                .to_ascii_lowercase()
        })
        .collect();
    if conn.json {
        println!("{}", stats_json(&stats, &names));
        return Ok(());
    }
    // Apps are told apart by owner (two owners may name an app alike): the owner's column shows
    // where it can differ, a payer's view or an answer naming several owners.
    let app_at = names.iter().position(|n| n == "app");
    let owners: std::collections::BTreeSet<&str> = stats
        .groups
        .iter()
        .map(|g| g.app_owner_email.as_str())
        .collect();
    let owner_at = app_at
        .filter(|_| role == pb::StatsRole::User || owners.len() > 1)
        .map(|a| a + 1);
    let mut names = names;
    if let Some(at) = owner_at {
        names.insert(at, "owner".into());
    }
    // CSV keeps exact numbers (micros, unix micros), and its header says so: the table's
    // `revenue` in USD and its readable times would be another unit under the same name.
    let header: Vec<String> = names
        .iter()
        .map(|n| match (args.csv, n.as_str()) {
            (true, "minute" | "hour" | "day") => format!("{n}_start_unix_micros"),
            _ => n.clone(),
        })
        .chain(HEADER.iter().map(|h| match (args.csv, *h) {
            // The CSV keeps the answer's names (scripts read them).
            (true, "revenue") => "revenue_micros".to_string(),
            (true, "released") => "refunds_micros".to_string(),
            _ => h.to_string(),
        }))
        .collect();
    let rows: Vec<Vec<String>> = stats
        .groups
        .iter()
        .map(|g| {
            let mut keys: Vec<String> = g.key.iter().map(|k| key_text(k, args.csv)).collect();
            if let Some(at) = owner_at {
                keys.insert(at.min(keys.len()), g.app_owner_email.clone());
            }
            keys.into_iter().chain(cells(g, args.csv)).collect()
        })
        .collect();
    if args.csv {
        println!("{}", header.join(","));
        for r in rows {
            let quoted: Vec<String> = r.iter().map(|c| csv_cell(c)).collect();
            println!("{}", quoted.join(","));
        }
        return Ok(());
    }
    print_table(&header, &rows);
    println!(
        "{} to {} (UTC), money in {}; refunded in the range: {}",
        format_time(stats.since_unix_micros),
        format_time(stats.until_unix_micros),
        stats.currency,
        format_micros(stats.refunded_micros)
    );
    Ok(())
}

/// One CSV cell. A text that a spreadsheet would run as a formula (an app or model name, a user's
/// email starting with `=`, `+`, `-`, `@`, a tab or a return: anyone may name an app or a user)
/// is kept as text with a leading `'` (OWASP's advice); numbers are left as they are.
fn csv_cell(c: &str) -> String {
    let formula = c.starts_with(['=', '+', '-', '@', '\t', '\r']) && c.parse::<f64>().is_err();
    let c = if formula {
        format!("'{c}")
    } else {
        c.to_string()
    };
    if c.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c
    }
}

/// Columns as wide as their widest cell; text left, numbers right.
fn print_table(header: &[String], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let keys = header.len() - HEADER.len();
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < keys {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        println!("{}", parts.join("  "));
    };
    line(header);
    for r in rows {
        line(r);
    }
    if rows.is_empty() {
        println!("(no requests in this range)");
    }
}

fn stats_json(s: &pb::GetUsageStatsResponse, names: &[String]) -> serde_json::Value {
    let pct = |p: &Option<pb::LatencyPercentiles>| {
        p.map(|p| serde_json::json!({"p50": p.p50, "p95": p.p95, "p99": p.p99}))
    };
    let groups: Vec<_> = s
        .groups
        .iter()
        .map(|g| {
            let mut key: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(&g.key)
                .map(|(n, k)| {
                    let v = match &k.value {
                        Some(pb::stats_key::Value::BucketStartUnixMicros(t)) => (*t).into(),
                        Some(pb::stats_key::Value::Text(t)) => t.clone().into(),
                        None => serde_json::Value::Null,
                    };
                    (n.clone(), v)
                })
                .collect();
            if !g.app_owner_email.is_empty() {
                key.insert("owner".into(), g.app_owner_email.clone().into());
            }
            serde_json::json!({
                "key": key, "requests": g.requests, "successes": g.successes,
                "failures": g.failures, "success_rate": g.success_rate,
                "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                "total_tokens": g.total_tokens, "revenue_micros": g.revenue_micros,
                "refunds_micros": g.refunds_micros, "active_users": g.active_users,
                "latency_ms": pct(&g.latency_ms), "upstream_latency_ms": pct(&g.upstream_latency_ms),
                "ttft_ms": pct(&g.ttft_ms), "streams": g.streams,
                "mean_latency_ms": g.mean_latency_ms,
            })
        })
        .collect();
    serde_json::json!({
        "since_unix_micros": s.since_unix_micros, "until_unix_micros": s.until_unix_micros,
        "currency": s.currency, "groups": groups, "refunded_micros": s.refunded_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn a_cell_is_never_a_formula() {
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("+1+2"), "'+1+2");
        assert_eq!(csv_cell("-12"), "-12");
        assert_eq!(csv_cell("chat-app"), "chat-app");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
    }
}
