//! `syft-router limits --user <email>`: how much of each limit that applies to a user is left on a
//! router (its `GetLimits` call), and the spend budgets its metadata lists. A readable table, or
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
        })
        .await
        .map_err(fail)?
        .into_inner();
    // The budgets are decided by the ledger: the router lists them, it does not count them.
    let budgets: Vec<pb::Limit> = client
        .get_metadata(pb::GetMetadataRequest {})
        .await
        .map_err(fail)?
        .into_inner()
        .services
        .into_iter()
        .filter(|s| s.r#type == left.service)
        .flat_map(|s| s.limits)
        .filter(|l| l.kind.starts_with("budget"))
        .collect();
    if args.json {
        println!("{}", limits_json(&left, &budgets));
    } else {
        print_table(&left, &budgets);
    }
    Ok(())
}

fn limits_json(left: &pb::GetLimitsResponse, budgets: &[pb::Limit]) -> serde_json::Value {
    let limits: Vec<_> = left
        .limits
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
        .iter()
        .map(|b| json!({"kind": b.kind, "limit_micros": b.limit, "description": b.description}))
        .collect();
    json!({
        "user": left.user_email,
        "service": left.service,
        "limits": limits,
        "budgets": budgets,
    })
}

fn print_table(left: &pb::GetLimitsResponse, budgets: &[pb::Limit]) {
    if left.limits.is_empty() && budgets.is_empty() {
        println!(
            "no limits apply to {} on the {} service",
            left.user_email, left.service
        );
        return;
    }
    println!(
        "{:<18}  {:<8}  {:>12}  {:>12}  {:>8}  {:>10}  description",
        "kind", "scope", "limit", "remaining", "window", "resets in"
    );
    for l in &left.limits {
        let limit = l.limit.clone().unwrap_or_default();
        let window = if limit.window_seconds == 0 {
            "in flight".to_string()
        } else {
            format_reset(Duration::from_secs(limit.window_seconds))
        };
        println!(
            "{:<18}  {:<8}  {:>12}  {:>12}  {:>8}  {:>10}  {}",
            limit.kind,
            limit.scope,
            limit.limit,
            l.remaining,
            window,
            format_reset(Duration::from_millis(l.reset_ms)),
            limit.description
        );
    }
    for b in budgets {
        println!(
            "{:<18}  {:<8}  {:>12}  {:>12}  {:>8}  {:>10}  {}",
            b.kind,
            b.scope,
            syft_ledger::money::format_micros(i64::try_from(b.limit).unwrap_or(i64::MAX)),
            "(ledger)",
            "UTC",
            "",
            b.description
        );
    }
}
