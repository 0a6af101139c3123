//! Listings of the client commands: paging past the ledger's 500-row pages, tables and JSON
//! objects (times in UTC, amounts with their currency).

use serde_json::json;
use syft_ledger::money::format_micros;
use syft_proto::ledger as pb;

use super::time::format_time;

/// Fetches pages from `fetch(page_size, page_token)` until `window` is satisfied; returns the
/// rows and the token of the next page when rows were left (for `--json` callers to resume).
pub async fn fetch_pages<T, F, Fut>(
    window_limit: Option<u32>,
    what: &str,
    mut fetch: F,
) -> anyhow::Result<(Vec<T>, String)>
where
    F: FnMut(u32, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    use std::io::IsTerminal;
    const MAX_PAGE: u32 = 500;
    let progress = std::io::stderr().is_terminal();
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let want = match window_limit {
            Some(limit) => (limit as usize)
                .saturating_sub(rows.len())
                .min(MAX_PAGE as usize) as u32,
            None => MAX_PAGE,
        };
        if want == 0 {
            break;
        }
        let (page, next) = fetch(want, token).await?;
        rows.extend(page);
        token = next;
        if token.is_empty() {
            break;
        }
        if progress {
            eprint!("\rfetched {} {what}…", rows.len());
        }
    }
    if progress && rows.len() > MAX_PAGE as usize {
        eprintln!("\rfetched {} {what}   ", rows.len());
    }
    Ok((rows, token))
}

/// Says that rows were left out, and how to get them.
pub fn more_hint(next_page_token: &str, what: &str) {
    if !next_page_token.is_empty() {
        eprintln!("(more {what}: raise --limit, or --all for every one)");
    }
}

/// A column of a plain-text [`Table`]: its header and width, text on the left or on the right.
#[derive(Clone, Copy)]
pub enum Col {
    Left(&'static str, usize),
    Right(&'static str, usize),
}

/// A plain-text table of fixed-width columns joined by `gap`; a last column on the left is not
/// padded (no trailing blanks). Every listing prints through it, so the header and the rows
/// cannot drift apart.
pub struct Table {
    pub cols: &'static [Col],
    pub gap: &'static str,
}

impl Table {
    pub fn header(&self) {
        let names: Vec<&dyn std::fmt::Display> = self
            .cols
            .iter()
            .map(|c| match c {
                Col::Left(name, _) | Col::Right(name, _) => name as &dyn std::fmt::Display,
            })
            .collect();
        self.row(&names);
    }

    pub fn row(&self, cells: &[&dyn std::fmt::Display]) {
        let last = self.cols.len().saturating_sub(1);
        let line: Vec<String> = self
            .cols
            .iter()
            .zip(cells)
            .enumerate()
            .map(|(i, (col, cell))| match col {
                Col::Left(..) if i == last => cell.to_string(),
                Col::Left(_, w) => format!("{:<w$}", cell.to_string()),
                Col::Right(_, w) => format!("{:>w$}", cell.to_string()),
            })
            .collect();
        println!("{}", line.join(self.gap));
    }
}

pub fn print_usage_table(records: &[pb::UsageRecord]) {
    use Col::{Left, Right};
    let table = Table {
        cols: &[
            Left("time (UTC)", 19),
            Left("request", 24),
            Left("user", 22),
            Left("model", 10),
            Left("status", 15),
            Right("tokens", 7),
            Right("cost", 10),
            Right("latency", 8),
        ],
        gap: "  ",
    };
    table.header();
    for r in records {
        let u = r.usage.clone().unwrap_or_default();
        table.row(&[
            &format_time(r.created_at_unix_micros),
            &truncate(&u.request_id, 24),
            &truncate(&u.user_email, 22),
            &truncate(&u.model, 10),
            &u.status,
            &u.total_tokens,
            &format_micros(r.cost_micros),
            &format!("{}ms", u.latency_ms),
        ]);
    }
}

pub fn print_accounts(accounts: &[pb::Account]) {
    use Col::{Left, Right};
    let table = Table {
        cols: &[
            Left("email", 32),
            Left("organization", 16),
            Right("balance", 12),
            Right("held", 12),
            Right("available", 12),
            Left("currency", 8),
            Left("created (UTC)", 0),
        ],
        gap: "  ",
    };
    table.header();
    for a in accounts {
        table.row(&[
            &truncate(&a.email, 32),
            &truncate(&a.organization, 16),
            &format_micros(a.balance_micros),
            &format_micros(a.held_micros),
            &format_micros(a.available_micros),
            &a.currency,
            &format_time(a.created_at_unix_micros),
        ]);
    }
}

pub fn print_tokens(tokens: &[pb::Token]) {
    use Col::{Left, Right};
    let table = Table {
        cols: &[
            Left("id", 36),
            Left("sender", 24),
            Left("recipient", 24),
            Right("limit", 10),
            Right("per day", 10),
            Right("spent", 10),
            Left("created (UTC)", 19),
            Left("expires (UTC)", 19),
            Left("state", 0),
        ],
        gap: "  ",
    };
    table.header();
    let now = syft_ledger::store::now_micros();
    for t in tokens {
        let state = match (t.revoked_at_unix_micros, t.expires_at_unix_micros) {
            (Some(_), _) => "revoked",
            (None, Some(e)) if e <= now => "expired",
            _ => "active",
        };
        table.row(&[
            &t.token_id,
            &truncate(&t.sender_email, 24),
            &truncate(&t.recipient_email, 24),
            &t.spend_limit_micros.map_or("none".into(), format_micros),
            &t.limit_per_day_micros.map_or("none".into(), format_micros),
            &format_micros(t.spent_micros),
            &format_time(t.created_at_unix_micros),
            &t.expires_at_unix_micros.map_or("never".into(), format_time),
            &state,
        ]);
    }
}

pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('…')).collect()
    }
}

pub fn status_word(s: pb::TransferStatus) -> &'static str {
    match s {
        pb::TransferStatus::Pending => "pending",
        pb::TransferStatus::Completed => "completed",
        pb::TransferStatus::Cancelled => "cancelled",
        pb::TransferStatus::Unspecified => "?",
    }
}

pub fn print_account(a: &pb::Account) {
    println!("email         {}", a.email);
    println!("organization  {}", a.organization);
    println!(
        "balance       {} {}",
        format_micros(a.balance_micros),
        a.currency
    );
    println!(
        "held          {} {}",
        format_micros(a.held_micros),
        a.currency
    );
    println!(
        "available     {} {}",
        format_micros(a.available_micros),
        a.currency
    );
}

pub fn account_json(a: &pb::Account) -> serde_json::Value {
    json!({"email": a.email, "organization": a.organization, "currency": a.currency,
           "balance_micros": a.balance_micros, "held_micros": a.held_micros,
           "available_micros": a.available_micros, "created_at_unix_micros": a.created_at_unix_micros})
}

pub fn token_json(t: &pb::Token) -> serde_json::Value {
    json!({"token_id": t.token_id, "sender": t.sender_email, "recipient": t.recipient_email,
           "currency": t.currency, "created_at_unix_micros": t.created_at_unix_micros,
           "expires_at_unix_micros": t.expires_at_unix_micros, "spend_limit_micros": t.spend_limit_micros,
           "spent_micros": t.spent_micros, "held_micros": t.held_micros,
           "limit_per_day_micros": t.limit_per_day_micros,
           "revoked_at_unix_micros": t.revoked_at_unix_micros})
}

pub fn transfer_json(t: &pb::Transfer) -> serde_json::Value {
    json!({"id": t.id, "status": status_word(t.status()), "sender": t.sender_email, "recipient": t.recipient_email,
           "amount_micros": t.amount_micros, "captured_micros": t.captured_micros, "refunded_micros": t.refunded_micros,
           "currency": t.currency, "app_name": t.app_name, "app_ep_path": t.app_ep_path, "created_at_unix_micros": t.created_at_unix_micros,
           "resolved_at_unix_micros": t.resolved_at_unix_micros, "cancel_reason": t.cancel_reason,
           "request_id": t.idempotency_key, "token_id": t.token_id})
}

pub fn usage_json(r: &pb::UsageRecord) -> serde_json::Value {
    let u = r.usage.clone().unwrap_or_default();
    json!({"id": r.id, "request_id": u.request_id, "transfer_id": r.transfer_id, "app_name": u.app_name,
           "endpoint": u.endpoint, "user_email": u.user_email, "model": u.model, "prompt_tokens": u.prompt_tokens,
           "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens, "cost_micros": r.cost_micros,
           "status": u.status, "reason": u.reason, "latency_ms": u.latency_ms,
           "upstream_latency_ms": u.upstream_latency_ms, "created_at_unix_micros": r.created_at_unix_micros})
}

pub fn print_transfers(rows: &[pb::Transfer]) {
    use Col::{Left, Right};
    let table = Table {
        cols: &[
            Left("created (UTC)", 19),
            Left("id", 36),
            Left("status", 9),
            Right("held", 10),
            Right("captured", 10),
            Right("refunded", 10),
            Left("currency", 8),
            Left("sender", 24),
            Left("recipient", 24),
            Left("app", 0),
        ],
        gap: "  ",
    };
    table.header();
    for t in rows {
        table.row(&[
            &format_time(t.created_at_unix_micros),
            &t.id,
            &status_word(t.status()),
            &format_micros(t.amount_micros),
            &format_micros(t.captured_micros),
            &format_micros(t.refunded_micros),
            &t.currency,
            &t.sender_email,
            &t.recipient_email,
            &t.app_name,
        ]);
    }
}

/// A token just issued (its secret is shown this once), its limits in `currency`.
pub fn print_issued_token(issued: &pb::IssueTokenResponse, currency: &str) {
    println!("token      {}   (shown once: store it now)", issued.token);
    println!("id         {}", issued.token_id);
    println!("sender     {}", issued.sender_email);
    println!("recipient  {}", issued.recipient_email);
    println!(
        "limit      {}",
        issued.spend_limit_micros.map_or("none".to_string(), |l| {
            format!("{} {currency}", format_micros(l))
                .trim_end()
                .to_string()
        })
    );
    println!(
        "per day    {}",
        issued.limit_per_day_micros.map_or("none".to_string(), |l| {
            format!("{} {currency} in any 24 hours", format_micros(l))
        })
    );
    println!(
        "expires    {}",
        issued
            .expires_at_unix_micros
            .map_or("never (until revoked)".to_string(), |t| format!(
                "{} UTC",
                format_time(t)
            ))
    );
}
