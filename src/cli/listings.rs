//! The listing commands (`transfers`, `usage`): a window of rows, newest first, as a table or
//! `--json`.

use clap::Args;
use serde_json::json;
use syft_ledger::money::format_micros;
use syft_proto::ledger as pb;

use super::client::{Conn, OrFail};
use super::paging::{list_all, print_list};
use super::tables::{
    fetch_pages, more_hint, print_transfers, print_usage_table, transfer_json, usage_json,
};
use super::time::parse_time;

/// Which rows of a paged listing to fetch.
#[derive(Args, Debug, Clone)]
pub struct Window {
    /// Only rows created at or after this time: a date (2025-01-31), a UTC time
    /// (2025-01-31T12:00:00Z) or a duration ago (90m, 24h, 7d).
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Only rows created before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    /// Most rows to print, newest first (pages of up to 500 are fetched as needed).
    // At least 1: `--limit 0` fetched nothing and printed totals of 0 as if nothing matched.
    #[arg(long, default_value_t = 50, conflicts_with = "all",
          value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
    /// Every matching row, however many (progress on stderr when it is a terminal).
    #[arg(long)]
    all: bool,
}

#[derive(Args, Debug)]
pub struct TransfersArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only transfers in this state.
    #[arg(long, value_parser = ["pending", "completed", "cancelled"])]
    status: Option<String>,
    /// sender (money you paid) or recipient (money paid to you); default both.
    #[arg(long, value_parser = ["sender", "recipient"])]
    role: Option<String>,
    /// Only transfers of this app (a router's name).
    #[arg(long)]
    app: Option<String>,
    /// Admin: another account's transfers.
    #[arg(long)]
    account: Option<String>,
    /// Only the transfers this delegation token paid (its id, as `token list` shows it): what a
    /// lost or stolen token spent.
    #[arg(long)]
    token: Option<String>,
    #[command(flatten)]
    window: Window,
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only requests paid by (or made by) this user's email.
    #[arg(long)]
    user: Option<String>,
    /// Only requests to this app (a router's name).
    #[arg(long)]
    app: Option<String>,
    /// Only rows with this outcome (docs/router.md lists what each means).
    #[arg(long, value_parser = super::usage_statuses())]
    status: Option<String>,
    /// Only the rows of this request id (its outcome, its transfer): a support lookup.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    window: Window,
}

impl Window {
    fn limit(&self) -> Option<u32> {
        (!self.all).then_some(self.limit)
    }
}

pub async fn transfers(args: TransfersArgs) -> anyhow::Result<()> {
    let status = match args.status.as_deref() {
        Some("pending") => pb::TransferStatus::Pending,
        Some("completed") => pb::TransferStatus::Completed,
        Some("cancelled") => pb::TransferStatus::Cancelled,
        _ => pb::TransferStatus::Unspecified,
    };
    let role = match args.role.as_deref() {
        Some("sender") => pb::Role::Sender,
        Some("recipient") => pb::Role::Recipient,
        _ => pb::Role::Any,
    };
    let conn = &args.conn;
    let client = conn.user()?;
    let w = &args.window;
    let request = pb::ListTransfersRequest {
        status: status as i32,
        role: role as i32,
        since_unix_micros: w.since,
        until_unix_micros: w.until,
        app_name: args.app.clone().unwrap_or_default(),
        account_email: args.account.clone().unwrap_or_default(),
        token_id: args.token.clone().unwrap_or_default(),
        ..Default::default()
    };
    let (rows, next) = list_all(conn, &client, request, w.limit()).await?;
    // A ledger older than the filter ignores it: its answer is not that token's spending.
    if let Some(token) = args.token.as_deref() {
        // Named by the token itself, its transfers name its id: one id, whichever.
        let filtered = match token.starts_with(syft_ledger::store::TOKEN_PREFIX) {
            true => rows
                .iter()
                .all(|t| !t.token_id.is_empty() && t.token_id == rows[0].token_id),
            false => rows.iter().all(|t| t.token_id == token),
        };
        anyhow::ensure!(
            filtered,
            "this ledger does not filter transfers by token (an older version): upgrade it"
        );
    }
    print_list(
        conn,
        "transfers",
        &rows,
        &next,
        transfer_json,
        print_transfers,
    );
    Ok(())
}

pub async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    let client = conn.user()?;
    let w = &args.window;
    let request = pb::QueryUsageRequest {
        since_unix_micros: w.since,
        until_unix_micros: w.until,
        user_email: args.user.clone().unwrap_or_default(),
        app_name: args.app.clone().unwrap_or_default(),
        status: args.status.clone().unwrap_or_default(),
        request_id: args.request_id.clone().unwrap_or_default(),
        ..Default::default()
    };
    // Totals cover every matching row, whatever the page; the first page's are kept.
    let totals = std::sync::Mutex::new(None);
    let (rows, next) = fetch_pages(w.limit(), "usage rows", |page_size, page_token| {
        let mut client = client.clone();
        let request = pb::QueryUsageRequest {
            page_size,
            page_token,
            ..request.clone()
        };
        let totals = &totals;
        let wanted = args.request_id.as_deref();
        async move {
            let page = client.query_usage(request).await.or_fail(conn)?;
            // A ledger older than the filter ignores it and answers every row: refused at its
            // first page (not after downloading the owner's whole history), not printed as the
            // rows of that request (a support lookup would read another request's outcome).
            if let Some(id) = wanted {
                let other = (page.records.iter())
                    .filter_map(|r| r.usage.as_ref())
                    .any(|u| u.request_id != id);
                anyhow::ensure!(
                    !other,
                    "this ledger does not filter usage by request id (an older version): \
                     upgrade it, or list the rows and look for {id}"
                );
            }
            let mut kept = totals.lock().unwrap_or_else(|e| e.into_inner());
            if kept.is_none() {
                *kept = page.totals;
            }
            Ok((page.records, page.next_page_token))
        }
    })
    .await?;
    let totals = totals
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_default();
    if conn.json {
        let rows: Vec<_> = rows.iter().map(usage_json).collect();
        println!(
            "{}",
            json!({"records": rows, "next_page_token": next,
                   "totals": {"requests": totals.requests, "prompt_tokens": totals.prompt_tokens,
                              "completion_tokens": totals.completion_tokens, "total_tokens": totals.total_tokens,
                              "cost_micros": totals.cost_micros, "currency": totals.currency}})
        );
        return Ok(());
    }
    print_usage_table(&rows);
    more_hint(&next, "usage rows");
    println!(
        "total: {} requests, {} tokens, cost {} {}",
        totals.requests,
        totals.total_tokens,
        format_micros(totals.cost_micros),
        totals.currency
    );
    Ok(())
}
