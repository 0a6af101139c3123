//! `syft-router limits --user <email> --token <token>`: how much of each limit that applies to a user is left on a
//! router (its `GetLimits` call): the rate windows, and the spend budgets the ledger counts. A readable table, or
//! `--json` in the shape of the router's `GET /v1/limits`.

use std::time::Duration;

use clap::Args;
use serde_json::json;
use syft_proto::router as pb;
use syft_router_svc::limits::format_reset;

use super::router::RouterUser;

#[derive(Args, Debug)]
pub struct LimitsArgs {
    #[command(flatten)]
    pub to: RouterUser,
    /// Your delegation token for the router's owner: what a user has left is shown only to the
    /// holder of one of their tokens.
    #[arg(long, env = "SYFT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The service: chat or search.
    #[arg(long, default_value = "chat")]
    pub service: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: LimitsArgs) -> anyhow::Result<()> {
    let fail = |s: tonic::Status| args.to.fail(s);
    let mut client = args.to.client()?;
    let left = client
        .get_limits(pb::GetLimitsRequest {
            user_email: args.to.user_email.clone(),
            service: args.service.clone(),
            transaction_token: args.token.clone(),
        })
        .await
        .map_err(fail)?
        .into_inner();
    if args.json {
        println!("{}", limits_json(&left));
    } else {
        print_table(&left);
    }
    Ok(())
}

/// A spend budget's entry (counted by the ledger, in micros), as opposed to a rate window.
fn is_budget(l: &pb::LimitLeft) -> bool {
    l.limit
        .as_ref()
        .is_some_and(|l| l.kind.starts_with("budget_"))
}

fn money(micros: u64) -> String {
    syft_ledger::money::format_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

/// The shape of the router's `GET /v1/limits`.
fn limits_json(left: &pb::GetLimitsResponse) -> serde_json::Value {
    let (budgets, windows): (Vec<_>, Vec<_>) = left.limits.iter().partition(|l| is_budget(l));
    let limits: Vec<_> = windows
        .iter()
        .map(|l| {
            let limit = l.limit.clone().unwrap_or_default();
            json!({
                "kind": limit.kind,
                "scope": limit.scope,
                "limit": limit.limit,
                "remaining": l.remaining,
                "window_seconds": limit.window_seconds,
                "reset": format_reset(Duration::from_millis(l.reset_ms)),
                "reset_ms": l.reset_ms,
                "description": limit.description,
            })
        })
        .collect();
    let budgets: Vec<_> = budgets
        .into_iter()
        .filter_map(syft_router_svc::limits::budget_left_json)
        .collect();
    json!({
        "user": left.user_email,
        "service": left.service,
        "limits": limits,
        "budgets": budgets,
    })
}

fn print_table(left: &pb::GetLimitsResponse) {
    if left.limits.is_empty() {
        println!(
            "no limits apply to {} on the {} service",
            left.user_email, left.service
        );
        return;
    }
    println!(
        "{:<18}  {:<8}  {:>12}  {:>12}  {:>9}  {:>10}  description",
        "kind", "scope", "limit", "remaining", "window", "resets in"
    );
    for l in &left.limits {
        let limit = l.limit.clone().unwrap_or_default();
        let (amount, remaining, window) = if is_budget(l) {
            let per = if limit.kind == "budget_day" {
                "UTC day"
            } else {
                "UTC month"
            };
            (money(limit.limit), money(l.remaining), per.to_string())
        } else if limit.window_seconds == 0 {
            (
                limit.limit.to_string(),
                l.remaining.to_string(),
                "in flight".into(),
            )
        } else {
            let window = format_reset(Duration::from_secs(limit.window_seconds));
            (limit.limit.to_string(), l.remaining.to_string(), window)
        };
        println!(
            "{:<18}  {:<8}  {:>12}  {:>12}  {:>9}  {:>10}  {}",
            limit.kind,
            limit.scope,
            amount,
            remaining,
            window,
            format_reset(Duration::from_millis(l.reset_ms)),
            limit.description
        );
    }
}
