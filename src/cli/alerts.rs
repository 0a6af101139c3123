//! `syft-router alerts add|list|remove|enable|test|rotate|deliveries`: webhook alerts over the ledger's
//! `syft.ledger.v1.Alerts` service (docs/alerts.md). Tables for people, `--json` for scripts.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use syft_ledger::alerts::{Format, Rule, SpendSide};
use syft_ledger::grpc_alerts::{rule_of, rule_pb};
use syft_ledger::money::parse_decimal_micros;
use syft_proto::ledger as pb;

use super::client::Conn;
use super::time::format_time;

#[derive(Args, Debug)]
pub struct AlertsArgs {
    #[command(subcommand)]
    action: AlertsAction,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand, Debug)]
enum AlertsAction {
    /// Add a webhook endpoint with its rules; prints its signing secret once.
    Add(AddArgs),
    /// Your endpoints (admin: --account's), with their rules and health.
    List {
        /// Admin: whose endpoints.
        #[arg(long)]
        account: Option<String>,
    },
    /// Remove an endpoint; its undelivered events are dropped with it.
    Remove { endpoint_id: String },
    /// Enable an endpoint disabled after failing (fix its receiver first): its pending events
    /// are delivered again.
    Enable { endpoint_id: String },
    /// Queue a `test` event for an endpoint (see it in `deliveries`).
    Test { endpoint_id: String },
    /// New signing secret; the previous one keeps signing for --overlap.
    Rotate {
        endpoint_id: String,
        /// How long the previous secret keeps signing too (0s to 7 days).
        #[arg(long, default_value = "24h", value_parser = parse_overlap)]
        overlap: Duration,
    },
    /// An endpoint's delivery log, newest first.
    Deliveries {
        endpoint_id: String,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
}

#[derive(Args, Debug)]
struct AddArgs {
    /// https URL (http only to hosts the ledger allows with --alerts-allow-host).
    url: String,
    /// Admin: the account the endpoint belongs to.
    #[arg(long)]
    account: Option<String>,
    /// balance.low: your available balance falls below this decimal amount.
    #[arg(long)]
    balance_below: Option<String>,
    /// budget.threshold: token limits (lifetime or per 24 hours) and per-user budgets (per UTC
    /// day or month) passing these percentages, e.g. 50,80,90,100.
    #[arg(long, value_delimiter = ',')]
    budget_steps: Vec<u32>,
    /// spend.threshold: what you pay in one UTC day reaches this decimal amount.
    #[arg(long)]
    daily_spend_above: Option<String>,
    /// spend.threshold: what your apps earn in one UTC day reaches this decimal amount.
    #[arg(long)]
    daily_revenue_above: Option<String>,
    /// errors.spike: your apps' failure rate in percent over --error-window-minutes.
    #[arg(long)]
    error_percent: Option<u32>,
    #[arg(long, default_value_t = 5)]
    error_window_minutes: u32,
    /// errors.spike: requests needed in the window before the rate counts.
    #[arg(long, default_value_t = 20)]
    error_min_requests: u32,
    /// holds.expired: this many of your holds expire within --expired-window-minutes.
    #[arg(long)]
    expired_holds: Option<u32>,
    #[arg(long, default_value_t = 60)]
    expired_window_minutes: u32,
    /// digest.daily: a summary of the last 24 hours at this UTC hour (0-23).
    #[arg(long)]
    digest_hour: Option<u32>,
    /// Send Slack-compatible `{"text": …}` bodies instead of JSON events.
    #[arg(long)]
    slack: bool,
    /// Most delivery attempts per minute (default: the ledger's).
    #[arg(long)]
    rate_per_minute: Option<u32>,
}

fn parse_overlap(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" || text.trim() == "0s" {
        return Ok(Duration::ZERO);
    }
    super::parse_duration(text)
}

impl AddArgs {
    /// The rules the flags ask for, as the ledger's protobuf rules (checked by the ledger).
    fn rules(&self) -> anyhow::Result<Vec<pb::AlertRule>> {
        let mut rules = Vec::new();
        if let Some(amount) = &self.balance_below {
            rules.push(Rule::BalanceLow {
                below_micros: parse_decimal_micros(amount)?,
            });
        }
        if !self.budget_steps.is_empty() {
            let steps = self
                .budget_steps
                .iter()
                .map(|s| u8::try_from(*s))
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--budget-steps are percentages from 1 to 100"))?;
            rules.push(Rule::BudgetThreshold { steps });
        }
        for (amount, side) in [
            (&self.daily_spend_above, SpendSide::Spend),
            (&self.daily_revenue_above, SpendSide::Revenue),
        ] {
            if let Some(amount) = amount {
                rules.push(Rule::SpendThreshold {
                    side,
                    above_micros: parse_decimal_micros(amount)?,
                });
            }
        }
        let mut out: Vec<pb::AlertRule> = rules.iter().map(rule_pb).collect();
        // Percentages, counts and hours go to the ledger as given, so it refuses bad ones.
        let as_given = [
            self.error_percent.map(|percent| pb::AlertRule {
                event: pb::AlertEvent::ErrorsSpike as i32,
                percent,
                window_minutes: self.error_window_minutes,
                min_requests: self.error_min_requests,
                ..Default::default()
            }),
            self.expired_holds.map(|count| pb::AlertRule {
                event: pb::AlertEvent::HoldsExpired as i32,
                count,
                window_minutes: self.expired_window_minutes,
                ..Default::default()
            }),
            self.digest_hour.map(|hour| pb::AlertRule {
                event: pb::AlertEvent::DigestDaily as i32,
                hour,
                ..Default::default()
            }),
        ];
        out.extend(as_given.into_iter().flatten());
        anyhow::ensure!(
            !out.is_empty(),
            "name at least one rule: --balance-below, --budget-steps, --daily-spend-above, \
             --daily-revenue-above, --error-percent, --expired-holds or --digest-hour"
        );
        Ok(out)
    }
}

pub async fn alerts(args: AlertsArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    let mut client = conn.alerts()?;
    match args.action {
        AlertsAction::Add(add) => {
            let format = if add.slack {
                Format::Slack
            } else {
                Format::Json
            };
            let request = pb::AddAlertEndpointRequest {
                account_email: add.account.clone().unwrap_or_default(),
                url: add.url.clone(),
                format: match format {
                    Format::Json => pb::AlertFormat::Json as i32,
                    Format::Slack => pb::AlertFormat::Slack as i32,
                },
                rules: add.rules()?,
                rate_per_minute: add.rate_per_minute,
            };
            let added = client
                .add_alert_endpoint(request)
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            let endpoint = added.endpoint.unwrap_or_default();
            if conn.json {
                println!(
                    "{}",
                    json!({"secret": added.secret, "endpoint": endpoint_json(&endpoint)})
                );
            } else {
                println!("endpoint  {}", endpoint.id);
                println!(
                    "secret    {}   (shown once: give it to your receiver)",
                    added.secret
                );
                print_endpoint(&endpoint);
            }
        }
        AlertsAction::List { account } => {
            let listed = client
                .list_alert_endpoints(pb::ListAlertEndpointsRequest {
                    account_email: account.unwrap_or_default(),
                })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner()
                .endpoints;
            if conn.json {
                let rows: Vec<_> = listed.iter().map(endpoint_json).collect();
                println!("{}", serde_json::Value::Array(rows));
            } else if listed.is_empty() {
                println!("no alert endpoints");
            }
            for endpoint in listed.iter().filter(|_| !conn.json) {
                println!("endpoint  {}", endpoint.id);
                print_endpoint(endpoint);
                println!();
            }
        }
        AlertsAction::Remove { endpoint_id } => {
            client
                .remove_alert_endpoint(pb::RemoveAlertEndpointRequest {
                    endpoint_id: endpoint_id.clone(),
                })
                .await
                .map_err(|s| conn.fail(s))?;
            if conn.json {
                println!("{}", json!({"removed": endpoint_id}));
            } else {
                println!("removed {endpoint_id}");
            }
        }
        AlertsAction::Enable { endpoint_id } => {
            let endpoint = client
                .enable_alert_endpoint(pb::EnableAlertEndpointRequest { endpoint_id })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner()
                .endpoint
                .unwrap_or_default();
            if conn.json {
                println!("{}", endpoint_json(&endpoint));
            } else {
                println!("endpoint  {}", endpoint.id);
                print_endpoint(&endpoint);
            }
        }
        AlertsAction::Test { endpoint_id } => {
            let sent = client
                .send_test_alert(pb::SendTestAlertRequest { endpoint_id })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            if conn.json {
                println!("{}", json!({"event_id": sent.event_id}));
            } else {
                println!("queued test event {}", sent.event_id);
            }
        }
        AlertsAction::Rotate {
            endpoint_id,
            overlap,
        } => {
            let rotated = client
                .rotate_alert_secret(pb::RotateAlertSecretRequest {
                    endpoint_id,
                    overlap_seconds: u32::try_from(overlap.as_secs()).unwrap_or(u32::MAX),
                })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            // The same fields as the REST API's answer: a rotation job parses this, and the
            // secret is shown once.
            if conn.json {
                println!(
                    "{}",
                    json!({"secret": rotated.secret,
                           "previous_secret_until_unix_micros": rotated.previous_secret_until_unix_micros})
                );
            } else {
                println!("secret    {}   (shown once)", rotated.secret);
                println!(
                    "previous secret signs too until {}",
                    format_time(rotated.previous_secret_until_unix_micros)
                );
            }
        }
        AlertsAction::Deliveries { endpoint_id, limit } => {
            let log = client
                .list_alert_deliveries(pb::ListAlertDeliveriesRequest { endpoint_id, limit })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner()
                .deliveries;
            print_deliveries(&log, conn.json);
        }
    }
    Ok(())
}

fn rule_text(rule: &pb::AlertRule) -> String {
    match rule_of(rule) {
        Ok(rule) => serde_json::to_string(&rule).unwrap_or_default(),
        Err(e) => e.to_string(),
    }
}

fn endpoint_json(e: &pb::AlertEndpoint) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = e
        .rules
        .iter()
        .filter_map(|r| rule_of(r).ok())
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    json!({
        "id": e.id, "account": e.account_email, "url": e.url,
        "format": if e.format == pb::AlertFormat::Slack as i32 { "slack" } else { "json" },
        "rules": rules, "rate_per_minute": e.rate_per_minute,
        "failing_since_unix_micros": e.failing_since_unix_micros,
        "disabled_at_unix_micros": e.disabled_at_unix_micros,
        "previous_secret_until_unix_micros": e.previous_secret_until_unix_micros,
        "pending_events": e.pending_events, "created_at_unix_micros": e.created_at_unix_micros,
    })
}

fn print_endpoint(e: &pb::AlertEndpoint) {
    println!("account   {}", e.account_email);
    println!("url       {}", e.url);
    for rule in &e.rules {
        println!("rule      {}", rule_text(rule));
    }
    let state = match (e.disabled_at_unix_micros, e.failing_since_unix_micros) {
        (Some(at), _) => format!("DISABLED since {} (persistent failure)", format_time(at)),
        (None, Some(since)) => format!("failing since {}", format_time(since)),
        (None, None) => "healthy".to_string(),
    };
    println!("state     {state}, {} events pending", e.pending_events);
}

fn print_deliveries(log: &[pb::AlertDelivery], as_json: bool) {
    if as_json {
        let rows: Vec<_> = log
            .iter()
            .map(|d| {
                json!({"event_id": d.event_id, "type": d.event_type, "attempt": d.attempt,
                       "started_at_unix_micros": d.started_at_unix_micros, "latency_ms": d.latency_ms,
                       "status_code": d.status_code, "outcome": d.outcome, "error": d.error,
                       "next_attempt_at_unix_micros": d.next_attempt_at_unix_micros})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    use super::tables::{Col::Left, Col::Right, Table};
    let table = Table {
        cols: &[
            Left("time", 20),
            Left("event", 38),
            Left("type", 18),
            Right("try", 3),
            Right("status", 6),
            Right("ms", 7),
            Left("outcome", 9),
            Left("next retry", 20),
            Left("error", 0),
        ],
        gap: " ",
    };
    table.header();
    for d in log {
        table.row(&[
            &format_time(d.started_at_unix_micros),
            &d.event_id,
            &d.event_type,
            &d.attempt,
            &d.status_code.map_or("-".to_string(), |c| c.to_string()),
            &d.latency_ms,
            &d.outcome,
            &d.next_attempt_at_unix_micros
                .map_or("-".to_string(), format_time),
            &d.error,
        ]);
    }
}
