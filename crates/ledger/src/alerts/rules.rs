//! What an endpoint subscribes to: the event kinds and the rules (with their thresholds) that
//! fire them, validated before anything is written.

use serde::{Deserialize, Serialize};

use crate::error::{LedgerError, Result};
use crate::money::check_positive;

/// Every event type a webhook can carry (`type` in the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "balance.low")]
    BalanceLow,
    #[serde(rename = "budget.threshold")]
    BudgetThreshold,
    #[serde(rename = "spend.threshold")]
    SpendThreshold,
    #[serde(rename = "errors.spike")]
    ErrorsSpike,
    #[serde(rename = "holds.expired")]
    HoldsExpired,
    #[serde(rename = "digest.daily")]
    DigestDaily,
    /// Sent to an account's other endpoints when one is disabled after failing for days.
    #[serde(rename = "endpoint.disabled")]
    EndpointDisabled,
    /// "Send test event".
    #[serde(rename = "test")]
    Test,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::BalanceLow,
        EventKind::BudgetThreshold,
        EventKind::SpendThreshold,
        EventKind::ErrorsSpike,
        EventKind::HoldsExpired,
        EventKind::DigestDaily,
        EventKind::EndpointDisabled,
        EventKind::Test,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::BalanceLow => "balance.low",
            EventKind::BudgetThreshold => "budget.threshold",
            EventKind::SpendThreshold => "spend.threshold",
            EventKind::ErrorsSpike => "errors.spike",
            EventKind::HoldsExpired => "holds.expired",
            EventKind::DigestDaily => "digest.daily",
            EventKind::EndpointDisabled => "endpoint.disabled",
            EventKind::Test => "test",
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| {
                LedgerError::invalid(format!(
                    "unknown event {text:?}; known: balance.low, budget.threshold, \
                     spend.threshold, errors.spike, holds.expired, digest.daily"
                ))
            })
    }
}

/// Whose money `spend.threshold` sums per UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SpendSide {
    /// What the account paid (a user's spend).
    #[default]
    Spend,
    /// What the account was paid (an app owner's revenue).
    Revenue,
}

/// One rule of an endpoint. Stored as JSON in `alert_endpoints.rules`; the serialized form is the
/// REST and docs shape (`{"event": "balance.low", "below_micros": 5000000}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum Rule {
    /// The account's available balance falls below `below_micros`.
    #[serde(rename = "balance.low")]
    BalanceLow { below_micros: i64 },
    /// A token's spend passes each of `steps` percent of its limit (tokens the account issued or
    /// received, lifetime or per 24 hours) or of a per-user spend budget per UTC day or month.
    #[serde(rename = "budget.threshold")]
    BudgetThreshold { steps: Vec<u8> },
    /// The account's spend (or revenue) in the current UTC day passes `above_micros`.
    #[serde(rename = "spend.threshold")]
    SpendThreshold {
        #[serde(default)]
        side: SpendSide,
        above_micros: i64,
    },
    /// The failure rate of the account's apps over the last `window_minutes` passes `percent`,
    /// with at least `min_requests` requests.
    #[serde(rename = "errors.spike")]
    ErrorsSpike {
        percent: u8,
        window_minutes: u32,
        min_requests: u32,
    },
    /// At least `count` of the account's holds expired in the last `window_minutes`.
    #[serde(rename = "holds.expired")]
    HoldsExpired { count: u32, window_minutes: u32 },
    /// A summary of the last 24 hours, once a day at `hour` UTC.
    #[serde(rename = "digest.daily")]
    DigestDaily { hour: u8 },
}

pub const MAX_RULES: usize = 16;
const MAX_WINDOW_MINUTES: u32 = 24 * 60;
const MAX_COUNT: u32 = 1_000_000;

impl Rule {
    pub fn kind(&self) -> EventKind {
        match self {
            Rule::BalanceLow { .. } => EventKind::BalanceLow,
            Rule::BudgetThreshold { .. } => EventKind::BudgetThreshold,
            Rule::SpendThreshold { .. } => EventKind::SpendThreshold,
            Rule::ErrorsSpike { .. } => EventKind::ErrorsSpike,
            Rule::HoldsExpired { .. } => EventKind::HoldsExpired,
            Rule::DigestDaily { .. } => EventKind::DigestDaily,
        }
    }

    /// Refuses thresholds that can never or always fire, with the field that is wrong.
    pub fn validate(&self, max_amount: i64) -> Result<()> {
        match self {
            Rule::BalanceLow { below_micros } => {
                check_positive("balance.low below_micros", *below_micros, max_amount)?;
            }
            Rule::SpendThreshold { above_micros, .. } => {
                check_positive("spend.threshold above_micros", *above_micros, max_amount)?;
            }
            Rule::BudgetThreshold { steps } => {
                let increasing = steps.windows(2).all(|w| w[0] < w[1]);
                if steps.is_empty() || !increasing || steps.iter().any(|s| !(1..=100).contains(s)) {
                    return Err(LedgerError::invalid(
                        "budget.threshold steps must be increasing percentages from 1 to 100, \
                         such as 50,80,90,100",
                    ));
                }
            }
            Rule::ErrorsSpike {
                percent,
                window_minutes,
                min_requests,
            } => {
                in_range("errors.spike percent", u32::from(*percent), 1, 100)?;
                in_range(
                    "errors.spike window_minutes",
                    *window_minutes,
                    1,
                    MAX_WINDOW_MINUTES,
                )?;
                in_range("errors.spike min_requests", *min_requests, 1, MAX_COUNT)?;
            }
            Rule::HoldsExpired {
                count,
                window_minutes,
            } => {
                in_range("holds.expired count", *count, 1, MAX_COUNT)?;
                in_range(
                    "holds.expired window_minutes",
                    *window_minutes,
                    1,
                    MAX_WINDOW_MINUTES,
                )?;
            }
            Rule::DigestDaily { hour } => in_range("digest.daily hour", u32::from(*hour), 0, 23)?,
        }
        Ok(())
    }
}

fn in_range(field: &str, value: u32, min: u32, max: u32) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LedgerError::invalid(format!(
            "{field} must be between {min} and {max}, got {value}"
        )))
    }
}

/// How an endpoint wants its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// The Standard Webhooks JSON event (`{"type", "timestamp", "data"}`).
    #[default]
    Json,
    /// A Slack-compatible `{"text": …}` body (still signed).
    Slack,
}

impl Format {
    pub const fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Slack => "slack",
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "" | "json" => Ok(Format::Json),
            "slack" => Ok(Format::Slack),
            other => Err(LedgerError::invalid(format!(
                "format {other:?} must be json or slack"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_as_documented_json() {
        let rule = Rule::BalanceLow {
            below_micros: 5_000_000,
        };
        let text = serde_json::to_string(&rule).unwrap();
        assert_eq!(text, r#"{"event":"balance.low","below_micros":5000000}"#);
        assert_eq!(serde_json::from_str::<Rule>(&text).unwrap(), rule);
    }

    #[test]
    fn bad_thresholds_are_refused() {
        let max = 1_000_000_000_000;
        let bad = [
            Rule::BalanceLow { below_micros: -1 },
            Rule::BalanceLow {
                below_micros: max + 1,
            },
            Rule::BudgetThreshold { steps: vec![] },
            Rule::BudgetThreshold {
                steps: vec![80, 50],
            },
            Rule::BudgetThreshold {
                steps: vec![50, 101],
            },
            Rule::ErrorsSpike {
                percent: 0,
                window_minutes: 5,
                min_requests: 10,
            },
            Rule::DigestDaily { hour: 24 },
        ];
        for rule in bad {
            assert!(rule.validate(max).is_err(), "{rule:?} accepted");
        }
        assert!(EventKind::parse("balance.lo").is_err());
    }
}
