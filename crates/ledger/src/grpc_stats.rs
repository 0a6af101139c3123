//! `GetUsageStats` messages: protobuf to [`StatsQuery`] and [`Stats`] back (the gRPC adapter).

use syft_proto::ledger as pb;

use crate::core::{Stats, StatsQuery, StatsRole, UsageDimsQuery};
use crate::error::{LedgerError, Result};
use crate::store::{Dimension, KeyValue, Percentiles, TimeRange, TopBy};

fn dimension(raw: i32) -> Result<Dimension> {
    use pb::StatsDimension as D;
    Ok(match D::try_from(raw) {
        Ok(D::Minute) => Dimension::Minute,
        Ok(D::Hour) => Dimension::Hour,
        Ok(D::Day) => Dimension::Day,
        Ok(D::App) => Dimension::App,
        Ok(D::Endpoint) => Dimension::Endpoint,
        Ok(D::User) => Dimension::User,
        Ok(D::Model) => Dimension::Model,
        Ok(D::Status) => Dimension::Status,
        Ok(D::Unspecified) | Err(_) => {
            return Err(LedgerError::invalid(format!(
                "unknown dimension {raw} in group_by"
            )))
        }
    })
}

pub(crate) fn stats_query(req: pb::GetUsageStatsRequest) -> Result<StatsQuery> {
    let role = match pb::StatsRole::try_from(req.role) {
        Ok(pb::StatsRole::Unspecified | pb::StatsRole::Owner) => StatsRole::Owner,
        Ok(pb::StatsRole::User) => StatsRole::User,
        Err(_) => return Err(LedgerError::invalid(format!("unknown role {}", req.role))),
    };
    Ok(StatsQuery {
        group_by: req
            .group_by
            .iter()
            .map(|d| dimension(*d))
            .collect::<Result<_>>()?,
        range: TimeRange::new(req.since_unix_micros, req.until_unix_micros),
        role,
        dims: UsageDimsQuery {
            app_name: req.app_name,
            endpoint: req.endpoint,
            user_email: req.user_email,
            model: req.model,
            status: req.status,
        },
        sums_only: req.sums_only,
        top: usize::try_from(req.top).unwrap_or(usize::MAX),
        top_by: match pb::StatsTopBy::try_from(req.top_by) {
            Ok(pb::StatsTopBy::Unspecified) => None,
            Ok(pb::StatsTopBy::Revenue) => Some(TopBy::Revenue),
            Ok(pb::StatsTopBy::Requests) => Some(TopBy::Requests),
            Err(_) => {
                return Err(LedgerError::invalid(format!(
                    "unknown top_by {}",
                    req.top_by
                )))
            }
        },
    })
}

fn percentiles(p: &Percentiles) -> pb::LatencyPercentiles {
    pb::LatencyPercentiles {
        p50: p.p50,
        p95: p.p95,
        p99: p.p99,
    }
}

pub(crate) fn stats_pb(s: Stats) -> pb::GetUsageStatsResponse {
    let groups = s
        .groups
        .into_iter()
        .map(|g| {
            let m = g.measures;
            pb::StatsGroup {
                key: g
                    .key
                    .into_iter()
                    .map(|k| pb::StatsKey {
                        value: Some(match k {
                            KeyValue::Time(t) => pb::stats_key::Value::BucketStartUnixMicros(t),
                            KeyValue::Text(t) => pb::stats_key::Value::Text(t),
                        }),
                    })
                    .collect(),
                requests: m.requests,
                successes: m.successes,
                failures: m.failures,
                success_rate: m.success_rate,
                prompt_tokens: m.prompt_tokens,
                completion_tokens: m.completion_tokens,
                total_tokens: m.total_tokens,
                revenue_micros: m.revenue_micros,
                refunds_micros: m.refunds_micros,
                active_users: m.active_users,
                latency_ms: m.latency_ms.as_ref().map(percentiles),
                upstream_latency_ms: m.upstream_latency_ms.as_ref().map(percentiles),
                ttft_ms: m.ttft_ms.as_ref().map(percentiles),
                streams: m.streams,
                mean_latency_ms: m.mean_latency_ms,
                app_owner_email: g.app_owner.unwrap_or_default(),
            }
        })
        .collect();
    pb::GetUsageStatsResponse {
        groups,
        since_unix_micros: s.since,
        until_unix_micros: s.until,
        currency: s.currency,
        refunded_micros: s.refunded_micros,
    }
}
