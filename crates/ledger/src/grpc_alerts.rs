//! `syft.ledger.v1.Alerts` over gRPC: a thin adapter over the core's alerts calls
//! (`alerts/api.rs`); it only converts messages to domain types and back.

use std::time::Duration;

use syft_proto::ledger as pb;

use crate::alerts::{AlertEndpoint, Delivery, Format, NewEndpoint, Rule, SpendSide};
use crate::error::{LedgerError, Result};
use crate::grpc::{grpc_methods, GrpcLedger};

impl GrpcLedger {
    pub fn into_alerts_server(self) -> pb::alerts_server::AlertsServer<Self> {
        pb::alerts_server::AlertsServer::new(self)
    }
}

grpc_methods! {
    impl pb::alerts_server::Alerts, |core, caller, req| {
        fn add_alert_endpoint(pb::AddAlertEndpointRequest) -> pb::AddAlertEndpointResponse {
            let new = NewEndpoint::try_from(req)?;
            let (endpoint, secret) = core.add_alert_endpoint(&caller, new).await?;
            Ok(pb::AddAlertEndpointResponse {
                endpoint: Some(endpoint_pb(&endpoint)),
                secret,
            })
        }

        fn list_alert_endpoints(pb::ListAlertEndpointsRequest) -> pb::ListAlertEndpointsResponse {
            let endpoints = core
                .list_alert_endpoints(&caller, &req.account_email)
                .await?;
            Ok(pb::ListAlertEndpointsResponse {
                endpoints: endpoints.iter().map(endpoint_pb).collect(),
            })
        }

        fn remove_alert_endpoint(pb::RemoveAlertEndpointRequest) -> pb::RemoveAlertEndpointResponse {
            core.remove_alert_endpoint(&caller, &req.endpoint_id)
                .await?;
            Ok(pb::RemoveAlertEndpointResponse {})
        }

        fn enable_alert_endpoint(pb::EnableAlertEndpointRequest) -> pb::EnableAlertEndpointResponse {
            let endpoint = core.enable_alert_endpoint(&caller, &req.endpoint_id).await?;
            Ok(pb::EnableAlertEndpointResponse {
                endpoint: Some(endpoint_pb(&endpoint)),
            })
        }

        fn rotate_alert_secret(pb::RotateAlertSecretRequest) -> pb::RotateAlertSecretResponse {
            let overlap = Duration::from_secs(u64::from(req.overlap_seconds));
            let (secret, until) = core
                .rotate_alert_secret(&caller, &req.endpoint_id, overlap)
                .await?;
            Ok(pb::RotateAlertSecretResponse {
                secret,
                previous_secret_until_unix_micros: until,
            })
        }

        fn send_test_alert(pb::SendTestAlertRequest) -> pb::SendTestAlertResponse {
            let event_id = core.send_test_alert(&caller, &req.endpoint_id).await?;
            Ok(pb::SendTestAlertResponse { event_id })
        }

        fn list_alert_deliveries(pb::ListAlertDeliveriesRequest) -> pb::ListAlertDeliveriesResponse {
            let deliveries = core
                .alert_deliveries(&caller, &req.endpoint_id, req.limit)
                .await?;
            Ok(pb::ListAlertDeliveriesResponse {
                deliveries: deliveries.iter().map(delivery_pb).collect(),
            })
        }
    }
}

impl TryFrom<pb::AddAlertEndpointRequest> for NewEndpoint {
    type Error = LedgerError;

    fn try_from(req: pb::AddAlertEndpointRequest) -> Result<Self> {
        Ok(Self {
            account_email: req.account_email,
            url: req.url,
            format: format_of(req.format)?,
            rules: req.rules.iter().map(rule_of).collect::<Result<_>>()?,
            rate_per_minute: req.rate_per_minute,
        })
    }
}

fn format_of(value: i32) -> Result<Format> {
    match pb::AlertFormat::try_from(value) {
        Ok(pb::AlertFormat::Json) => Ok(Format::Json),
        Ok(pb::AlertFormat::Slack) => Ok(Format::Slack),
        Err(_) => Err(LedgerError::invalid(format!("unknown format {value}"))),
    }
}

fn small(field: &str, value: u32) -> Result<u8> {
    u8::try_from(value).map_err(|_| LedgerError::invalid(format!("{field} {value} is too large")))
}

/// A protobuf rule as a domain rule (validated later by the core, with the other fields).
pub fn rule_of(r: &pb::AlertRule) -> Result<Rule> {
    use pb::AlertEvent as E;
    Ok(match E::try_from(r.event) {
        Ok(E::BalanceLow) => Rule::BalanceLow {
            below_micros: r.threshold_micros,
        },
        Ok(E::BudgetThreshold) => Rule::BudgetThreshold {
            steps: r
                .steps
                .iter()
                .map(|s| small("budget.threshold step", *s))
                .collect::<Result<_>>()?,
        },
        Ok(E::SpendThreshold) => Rule::SpendThreshold {
            side: match pb::SpendSide::try_from(r.side) {
                Ok(pb::SpendSide::Revenue) => SpendSide::Revenue,
                Ok(pb::SpendSide::Spend) => SpendSide::Spend,
                Err(_) => return Err(LedgerError::invalid(format!("unknown side {}", r.side))),
            },
            above_micros: r.threshold_micros,
        },
        Ok(E::ErrorsSpike) => Rule::ErrorsSpike {
            percent: small("errors.spike percent", r.percent)?,
            window_minutes: r.window_minutes,
            min_requests: r.min_requests,
        },
        Ok(E::HoldsExpired) => Rule::HoldsExpired {
            count: r.count,
            window_minutes: r.window_minutes,
        },
        Ok(E::DigestDaily) => Rule::DigestDaily {
            hour: small("digest.daily hour", r.hour)?,
        },
        Ok(E::Unspecified) | Err(_) => {
            return Err(LedgerError::invalid(format!(
                "rule event {} is unknown; name one of the AlertEvent values",
                r.event
            )))
        }
    })
}

/// A domain rule as protobuf.
pub fn rule_pb(rule: &Rule) -> pb::AlertRule {
    use pb::AlertEvent as E;
    let mut r = pb::AlertRule::default();
    match rule {
        Rule::BalanceLow { below_micros } => {
            r.set_event(E::BalanceLow);
            r.threshold_micros = *below_micros;
        }
        Rule::BudgetThreshold { steps } => {
            r.set_event(E::BudgetThreshold);
            r.steps = steps.iter().map(|s| u32::from(*s)).collect();
        }
        Rule::SpendThreshold { side, above_micros } => {
            r.set_event(E::SpendThreshold);
            r.threshold_micros = *above_micros;
            r.set_side(match side {
                SpendSide::Spend => pb::SpendSide::Spend,
                SpendSide::Revenue => pb::SpendSide::Revenue,
            });
        }
        Rule::ErrorsSpike {
            percent,
            window_minutes,
            min_requests,
        } => {
            r.set_event(E::ErrorsSpike);
            r.percent = u32::from(*percent);
            r.window_minutes = *window_minutes;
            r.min_requests = *min_requests;
        }
        Rule::HoldsExpired {
            count,
            window_minutes,
        } => {
            r.set_event(E::HoldsExpired);
            r.count = *count;
            r.window_minutes = *window_minutes;
        }
        Rule::DigestDaily { hour } => {
            r.set_event(E::DigestDaily);
            r.hour = u32::from(*hour);
        }
    }
    r
}

fn endpoint_pb(e: &AlertEndpoint) -> pb::AlertEndpoint {
    let mut out = pb::AlertEndpoint {
        id: e.id.clone(),
        account_email: e.account_email.clone(),
        url: e.url.clone(),
        format: 0,
        rules: e.rules.iter().map(rule_pb).collect(),
        rate_per_minute: e.rate_per_minute,
        failing_since_unix_micros: e.failing_since,
        disabled_at_unix_micros: e.disabled_at,
        previous_secret_until_unix_micros: e.previous_secret_until,
        pending_events: e.pending_events,
        created_at_unix_micros: e.created_at,
    };
    out.set_format(match e.format {
        Format::Json => pb::AlertFormat::Json,
        Format::Slack => pb::AlertFormat::Slack,
    });
    out
}

fn delivery_pb(d: &Delivery) -> pb::AlertDelivery {
    pb::AlertDelivery {
        event_id: d.event_id.clone(),
        event_type: d.kind.clone(),
        attempt: d.attempt,
        worker: d.worker.clone(),
        started_at_unix_micros: d.started_at,
        latency_ms: d.latency_ms,
        status_code: d.status_code.and_then(|c| u32::try_from(c).ok()),
        outcome: d.outcome.clone(),
        error: d.error.clone(),
        next_attempt_at_unix_micros: d.next_attempt_at,
    }
}
