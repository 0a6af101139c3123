//! Access-control settings: per-user request/token rates and concurrency (per router and per
//! service), the router-wide concurrency cap, spend budgets, and which shared store counts them.
//! See docs/limits.md.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError, PricingKind, RouterConfig, ServiceKind};
use crate::money;

/// The largest count a rate may allow in one window; above it a limit is almost surely a typo
/// (and the in-memory window would grow without bound).
pub const MAX_RATE_COUNT: u64 = 1_000_000_000;

/// The largest per-user or router-wide concurrency.
pub const MAX_CONCURRENCY: u64 = 1_000_000;

/// One sliding window: at most `count` units (requests or tokens) in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub unit: RateUnit,
}

/// The window of a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RateUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl RateUnit {
    pub const fn window(self) -> Duration {
        Duration::from_secs(match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
            RateUnit::Day => 86_400,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            RateUnit::Second => "second",
            RateUnit::Minute => "minute",
            RateUnit::Hour => "hour",
            RateUnit::Day => "day",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "s" | "sec" | "second" => RateUnit::Second,
            "m" | "min" | "minute" => RateUnit::Minute,
            "h" | "hour" => RateUnit::Hour,
            "d" | "day" => RateUnit::Day,
            _ => return None,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit.as_str())
    }
}

impl Rate {
    /// Parses `"10/minute"` (units: `second|minute|hour|day`, or `s|m|h|d`, `sec|min`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (count, unit) = text
            .split_once('/')
            .ok_or_else(|| format!("rate {text:?} must look like \"10/minute\""))?;
        let count: u64 = count
            .trim()
            .parse()
            .map_err(|_| format!("rate {text:?}: the count must be a positive whole number"))?;
        let unit = RateUnit::parse(unit.trim()).ok_or_else(|| {
            format!("rate {text:?}: unknown unit (use second, minute, hour or day)")
        })?;
        if count == 0 {
            return Err(format!(
                "rate {text:?}: zero would refuse everything; remove the limit or disable the service"
            ));
        }
        if count > MAX_RATE_COUNT {
            return Err(format!(
                "rate {text:?}: at most {MAX_RATE_COUNT} per window"
            ));
        }
        Ok(Rate { count, unit })
    }
}

/// Per-user limits of one scope (the whole router, or one service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per window (each rate is its own sliding window).
    pub requests: Vec<Rate>,
    /// Prompt + completion tokens per window: the request's `max_tokens` (plus its prompt) is
    /// reserved at admission and settled to the actual count afterwards.
    pub tokens: Vec<Rate>,
    /// Requests of one user in flight at once.
    pub concurrent: Option<u64>,
}

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.tokens.is_empty() && self.concurrent.is_none()
    }
}

/// Spend budgets per user, in micros, enforced by the ledger inside the hold's transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budgets {
    /// Per UTC calendar day.
    pub per_day_micros: Option<i64>,
    /// Per UTC calendar month.
    pub per_month_micros: Option<i64>,
}

/// Which store counts the windows and in-flight requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LimiterBackend {
    /// In this process: exact for one router, needs no server (the embedded default).
    #[default]
    Memory,
    /// A Redis server shared by every replica (atomic Lua scripts).
    Redis { url: String },
}

/// What a rate limit does when its shared store cannot answer. Budgets always fail closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Refuse with `UNAVAILABLE` (no request gets past an unknown count).
    #[default]
    FailClosed,
    /// Admit without counting (availability over the limit).
    FailOpen,
}

impl OnFailure {
    pub const fn as_str(self) -> &'static str {
        match self {
            OnFailure::FailClosed => "fail_closed",
            OnFailure::FailOpen => "fail_open",
        }
    }
}

/// `limiter` in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterConfig {
    pub backend: LimiterBackend,
    pub on_failure: OnFailure,
    /// Deadline of one admission check at the shared store (and of connecting to it); also how
    /// long a request waits for a change it awaits after admission. The changes themselves wait
    /// longer in the background (docs/limits.md).
    pub timeout: Duration,
    /// How long an in-flight slot is held at most if its router dies without releasing it.
    pub lease: Duration,
    /// Requests in flight on this router, all users together (protects the upstream); with
    /// `backend = "redis"`, over every replica of its name.
    pub max_concurrent_requests: Option<u64>,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            backend: LimiterBackend::Memory,
            on_failure: OnFailure::FailClosed,
            timeout: Duration::from_millis(250),
            // Renewed by the requests in flight (`limits/renew.rs`): what a dead router holds.
            lease: Duration::from_secs(60),
            max_concurrent_requests: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// file format

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimits {
    #[serde(default)]
    requests: Vec<String>,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    concurrent: Option<i64>,
}

impl RawRateLimits {
    pub(super) fn into_limits(self, at: &str) -> Result<RateLimits, ConfigError> {
        let rates = |list: Vec<String>, what: &str| -> Result<Vec<Rate>, ConfigError> {
            let mut out: Vec<Rate> = Vec::new();
            for text in list {
                let rate = Rate::parse(&text).map_err(|e| invalid(format!("{at}.{what}: {e}")))?;
                if out.iter().any(|r| r.unit == rate.unit) {
                    return Err(invalid(format!(
                        "{at}.{what}: two rates per {}",
                        rate.unit.as_str()
                    )));
                }
                out.push(rate);
            }
            out.sort_by_key(|r| r.unit);
            Ok(out)
        };
        Ok(RateLimits {
            requests: rates(self.requests, "requests")?,
            tokens: rates(self.tokens, "tokens")?,
            concurrent: self
                .concurrent
                .map(|n| concurrency(n, &format!("{at}.concurrent")))
                .transpose()?,
        })
    }
}

fn concurrency(n: i64, field: &str) -> Result<u64, ConfigError> {
    match u64::try_from(n) {
        Ok(v) if (1..=MAX_CONCURRENCY).contains(&v) => Ok(v),
        _ => Err(invalid(format!(
            "{field} must be in 1..={MAX_CONCURRENCY} (got {n})"
        ))),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudgets {
    #[serde(default)]
    per_day: Option<String>,
    #[serde(default)]
    per_month: Option<String>,
}

impl RawBudgets {
    pub(super) fn into_budgets(self, max_micros: i64) -> Result<Budgets, ConfigError> {
        let amount = |v: Option<String>, field: &str| -> Result<Option<i64>, ConfigError> {
            let Some(text) = v else { return Ok(None) };
            let micros = money::parse_decimal_micros(&text, max_micros).map_err(|source| {
                ConfigError::Amount {
                    field: field.into(),
                    source,
                }
            })?;
            if micros <= 0 {
                return Err(invalid(format!(
                    "{field} must be above zero (remove it for no budget)"
                )));
            }
            Ok(Some(micros))
        };
        Ok(Budgets {
            per_day_micros: amount(self.per_day, "budgets.per_day")?,
            per_month_micros: amount(self.per_month, "budgets.per_month")?,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimiter {
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    redis_url: Option<String>,
    #[serde(default)]
    on_failure: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    lease_seconds: Option<u64>,
    #[serde(default)]
    max_concurrent_requests: Option<i64>,
}

impl RawLimiter {
    pub(super) fn into_config(self) -> Result<LimiterConfig, ConfigError> {
        let backend = match (self.backend.as_deref(), self.redis_url) {
            (None | Some("memory"), None) => LimiterBackend::Memory,
            (None | Some("memory"), Some(_)) => {
                return Err(invalid(
                    "limiter.redis_url is set but limiter.backend is not \"redis\"",
                ))
            }
            (Some("redis"), Some(url)) => LimiterBackend::Redis { url },
            (Some("redis"), None) => {
                return Err(invalid("limiter.backend \"redis\" needs limiter.redis_url"))
            }
            (Some(other), _) => {
                return Err(invalid(format!(
                    "limiter.backend {other:?} is unknown (use \"memory\" or \"redis\")"
                )))
            }
        };
        let on_failure = match self.on_failure.as_deref() {
            None | Some("fail_closed") => OnFailure::FailClosed,
            Some("fail_open") => OnFailure::FailOpen,
            Some(other) => {
                return Err(invalid(format!(
                    "limiter.on_failure {other:?} is unknown (use \"fail_closed\" or \"fail_open\")"
                )))
            }
        };
        let mut c = LimiterConfig {
            backend,
            on_failure,
            ..LimiterConfig::default()
        };
        if let Some(ms) = self.timeout_ms {
            if !(1..=60_000).contains(&ms) {
                return Err(invalid("limiter.timeout_ms must be in 1..=60000"));
            }
            c.timeout = Duration::from_millis(ms);
        }
        if let Some(s) = self.lease_seconds {
            // A renewal may wait up to 5 s a try (`renew.rs`): a shorter lease lapses in one
            // slow moment of the store, and the requests then running lose their slots.
            if !(10..=86_400).contains(&s) {
                return Err(invalid(
                    "limiter.lease_seconds must be in 10..=86400 (a request renews its slots every \
                     third of it, and a renewal may wait up to 5 s)",
                ));
            }
            c.lease = Duration::from_secs(s);
        }
        c.max_concurrent_requests = self
            .max_concurrent_requests
            .map(|n| concurrency(n, "limiter.max_concurrent_requests"))
            .transpose()?;
        Ok(c)
    }
}

impl RouterConfig {
    /// A budget below an enabled service's price per request admits none of its requests: the
    /// router started, said it was ready, and refused every paid request `BUDGET_EXCEEDED`
    /// every day. (A per-token hold depends on the request, so only per-request prices tell.)
    pub(super) fn validate_budgets(&self) -> Result<(), ConfigError> {
        let budgets = [
            ("budgets.per_day", self.budgets.per_day_micros),
            ("budgets.per_month", self.budgets.per_month_micros),
        ];
        for s in self.services.iter().filter(|s| s.enabled) {
            let PricingKind::PerRequest { amount_micros } = s.pricing.kind else {
                continue;
            };
            for (key, budget) in budgets {
                if let Some(b) = budget.filter(|b| *b < amount_micros) {
                    return Err(invalid(format!(
                        "{key} ({}) is below the {} service's price of {} per request: no \
                         request could be admitted; raise the budget or remove it",
                        money::format_micros(b),
                        s.kind.as_str(),
                        money::format_micros(amount_micros)
                    )));
                }
            }
        }
        Ok(())
    }

    /// The token windows (scope, rate) no chat without `max_tokens` fits in: it reserves its
    /// prompt and `limits.default_max_tokens`, so a window of at most that refuses every one (a
    /// new owner otherwise finds out at the first request). The router's and the chat
    /// service's, when chat is sold; a search reserves only its query's tokens.
    pub fn chat_token_limits_below_default(&self) -> Vec<(&'static str, Rate)> {
        let Some(chat) = self
            .services
            .iter()
            .find(|s| s.kind == ServiceKind::Chat && s.enabled)
        else {
            return Vec::new();
        };
        let reserve = u64::from(self.limits.default_max_tokens);
        [("router", &self.rate_limits), ("chat", &chat.rate_limits)]
            .into_iter()
            .flat_map(|(scope, limits)| limits.tokens.iter().map(move |r| (scope, *r)))
            .filter(|(_, r)| r.count <= reserve)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_below_a_price_per_request_is_refused() {
        let mut c = RouterConfig::new("r", "o@example.com");
        c.services[0].pricing = crate::config::Pricing::per_request(50_000);
        c.budgets.per_day_micros = Some(10_000);
        let err = c.validate_settings().expect_err("below").to_string();
        assert!(
            err.contains("budgets.per_day (0.01) is below the chat service's price of 0.05"),
            "{err}"
        );
        c.budgets.per_day_micros = Some(50_000);
        c.validate_settings().expect("a budget of one request");
        c.budgets.per_month_micros = Some(49_999);
        let err = c.validate_settings().expect_err("below").to_string();
        assert!(err.contains("budgets.per_month"), "{err}");
        // Not sold: nothing to admit.
        c.services[0].enabled = false;
        c.validate_settings().expect("chat is not sold");
    }

    #[test]
    fn a_limit_of_zero_is_named() {
        let mut c = RouterConfig::new("r", "o@example.com");
        c.limits.max_messages = 0;
        let err = c.validate_settings().expect_err("zero").to_string();
        assert!(
            err.contains("limits.max_messages must be above zero"),
            "{err}"
        );
    }

    #[test]
    fn token_limits_no_chat_without_max_tokens_fits_are_found() {
        let per_minute = |count| Rate {
            count,
            unit: RateUnit::Minute,
        };
        let mut c = RouterConfig::new("r", "o@example.com");
        // 4,096 is the default reserve itself: the prompt makes every such chat larger.
        c.rate_limits.tokens = vec![per_minute(4_096), per_minute(4_097)];
        c.services[0].rate_limits.tokens = vec![per_minute(200)];
        assert_eq!(
            c.chat_token_limits_below_default(),
            vec![("router", per_minute(4_096)), ("chat", per_minute(200))]
        );
        // Without chat sold, nothing reserves `default_max_tokens`.
        c.services[0].enabled = false;
        assert!(c.chat_token_limits_below_default().is_empty());
    }

    #[test]
    fn rates_parse_and_refuse_nonsense() {
        assert_eq!(
            Rate::parse("10/minute"),
            Ok(Rate {
                count: 10,
                unit: RateUnit::Minute
            })
        );
        assert_eq!(Rate::parse(" 5 / d ").map(|r| r.unit), Ok(RateUnit::Day));
        for (bad, says) in [
            ("0/minute", "zero"),
            ("-1/minute", "positive whole number"),
            ("10/fortnight", "unknown unit"),
            ("10", "must look like"),
            ("99999999999/day", "at most"),
            ("1.5/minute", "positive whole number"),
        ] {
            let err = Rate::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
