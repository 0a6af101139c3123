//! Alerts (issue 13): signed webhooks for balance, budget, spend, error and expiry events.
//!
//! - [`rules`]: event kinds and the rules (thresholds) an endpoint subscribes to.
//! - [`evaluate`]: level-triggered evaluation. A rule's state (armed / fired, with hysteresis)
//!   and the event it fires commit in one transaction: the transactional outbox. Nothing runs on
//!   the money hot path, so accounts without rules cost nothing.
//! - [`deliver`]: the delivery worker: claims due events under a lease (a conditional update of
//!   pending events whose lease is free), signs them (Standard Webhooks), retries with backoff
//!   and jitter, disables endpoints that keep failing.
//! - [`seal`]: signing secrets, sealed at rest under `--alerts-key`.
//! - [`target`]: URL and address checks (SSRF).
//! - [`api`]: the core calls the gRPC adapter, the REST API (`web/alerts.rs`) and the CLI use.
//! - [`metrics`]: events written, attempts by outcome, retries, the queue, disabled endpoints.
//!
//! docs/alerts.md describes events, payloads, signatures, the retry schedule and failure modes.

pub mod api;
pub mod deliver;
pub mod evaluate;
pub mod metrics;
mod payload;
mod purge;
pub mod rules;
pub mod seal;
mod store;
pub mod target;

use std::time::Duration;

pub use api::{AlertEndpoint, Delivery, NewEndpoint};
pub use rules::{EventKind, Format, Rule, SpendSide};
pub use seal::SealKey;

/// Alerts settings of a ledger (flags `--alerts-*`).
#[derive(Clone)]
pub struct AlertsConfig {
    /// Seals signing secrets at rest; without it endpoints cannot be added (the ledger refuses to
    /// keep webhook secrets in clear text).
    pub key: Option<std::sync::Arc<SealKey>>,
    /// Hosts that may be reached over http and at private or loopback addresses (local use,
    /// tests): `127.0.0.1`, `localhost`, an internal name.
    pub allowed_hosts: Vec<String>,
    /// Delay before each retry; the last entry ends the schedule (then the event is given up).
    pub retry_schedule: Vec<Duration>,
    /// Random spread of each retry delay, in percent either side (0 disables jitter).
    pub jitter_percent: u8,
    /// One attempt's whole time budget (connect, send, first bytes of the answer).
    pub request_timeout: Duration,
    /// An endpoint failing without a single success for this long is disabled.
    pub disable_after: Duration,
    /// How often rules are evaluated.
    pub evaluate_interval: Duration,
    /// How often the worker looks for due events.
    pub deliver_interval: Duration,
    /// Default per-endpoint cap of attempts per minute.
    pub rate_per_minute: u32,
    /// Test events of one endpoint that may wait at once: a test checks a receiver, and with no
    /// bound one account's calls filled the outbox (2,000 pending in a reviewer's run), swelling
    /// the operator's queue alarms and delaying the account's real alerts.
    pub max_pending_tests: i64,
}

impl std::fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("retry_schedule", &self.retry_schedule)
            .field("jitter_percent", &self.jitter_percent)
            .field("request_timeout", &self.request_timeout)
            .field("disable_after", &self.disable_after)
            .field("evaluate_interval", &self.evaluate_interval)
            .field("deliver_interval", &self.deliver_interval)
            .field("rate_per_minute", &self.rate_per_minute)
            .field("max_pending_tests", &self.max_pending_tests)
            .finish()
    }
}

/// 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h, 8 h, 8 h: eleven retries over about
/// 31.7 hours (at least 25 hours with the largest negative jitter).
pub fn default_retry_schedule() -> Vec<Duration> {
    [
        5, 30, 120, 600, 1800, 3600, 7200, 14_400, 28_800, 28_800, 28_800,
    ]
    .into_iter()
    .map(Duration::from_secs)
    .collect()
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            key: None,
            allowed_hosts: Vec::new(),
            retry_schedule: default_retry_schedule(),
            jitter_percent: 20,
            request_timeout: Duration::from_secs(5),
            disable_after: Duration::from_secs(3 * 86_400),
            evaluate_interval: Duration::from_secs(5),
            deliver_interval: Duration::from_secs(1),
            rate_per_minute: 60,
            max_pending_tests: 10,
        }
    }
}

/// The longest single retry delay a schedule may hold.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 86_400);
/// The most retries a schedule may hold.
const MAX_RETRIES: usize = 100;

/// Parses a schedule such as `5s,30s,2m,1h` (units s, m, h, ms). Refuses a zero delay (a retry
/// loop without pause), a delay over 7 days and more than 100 entries.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    let schedule = text
        .split(',')
        .map(|part| {
            let part = part.trim();
            let split = part
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(|| format!("{part:?} needs a unit (ms, s, m, h)"))?;
            let (number, unit) = part.split_at(split);
            let n: u64 = number
                .parse()
                .map_err(|_| format!("{part:?} is not a number with a unit"))?;
            let ms = match unit {
                "ms" => n,
                "s" => n.saturating_mul(1000),
                "m" => n.saturating_mul(60_000),
                "h" => n.saturating_mul(3_600_000),
                other => return Err(format!("unknown unit {other:?} in {part:?}")),
            };
            Ok(Duration::from_millis(ms))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if schedule.is_empty() {
        return Err("the retry schedule is empty".into());
    }
    if schedule.len() > MAX_RETRIES {
        return Err(format!(
            "the retry schedule has more than {MAX_RETRIES} entries"
        ));
    }
    if let Some(bad) = schedule
        .iter()
        .find(|d| d.is_zero() || **d > MAX_RETRY_DELAY)
    {
        return Err(format!(
            "retry delay {bad:?} must be more than 0 and at most 7 days"
        ));
    }
    Ok(schedule)
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_schedule_spans_a_day_even_with_jitter() {
        let total: u64 = super::default_retry_schedule()
            .iter()
            .map(|d| d.as_secs())
            .sum();
        assert!(total * 80 / 100 >= 24 * 3600, "{total}");
        assert_eq!(
            super::parse_schedule("100ms,2s,1m").unwrap(),
            [100, 2000, 60_000].map(std::time::Duration::from_millis)
        );
        for bad in ["5x", "", "5s,,1m", "0s", "5s,0ms", "8d", "200h", "-5s", "5"] {
            assert!(super::parse_schedule(bad).is_err(), "{bad:?} accepted");
        }
        assert!(super::parse_schedule(&vec!["1s"; 101].join(",")).is_err());
        assert_eq!(
            super::parse_schedule(" 5s, 168h ").unwrap(),
            [5, 604_800].map(std::time::Duration::from_secs)
        );
    }
}
