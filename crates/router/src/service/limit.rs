//! Admission through the rate limits (docs/limits.md): each request takes a [`Pass`] before its
//! hold, the pass's token reservation is settled with the answer's count, and a refusal leaves a
//! usage row so owners see refusals in their analytics.

use std::time::Instant;

use syft_error::Reason;

use super::{Prepared, RouterService};
use crate::error::RouterError;
use crate::limits::{Pass, RateHeaders, Rule, WindowState};

/// The usage-row status of a request a limit refused (it costs nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalStatus {
    RateLimited,
    BudgetExceeded,
}

impl RefusalStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            RefusalStatus::RateLimited => "rate_limited",
            RefusalStatus::BudgetExceeded => "budget_exceeded",
        }
    }

    /// The status of a refusal by `reason`, if a limit refused.
    pub const fn of(reason: Reason) -> Option<Self> {
        match reason {
            Reason::RateLimited | Reason::ConcurrencyLimited => Some(RefusalStatus::RateLimited),
            Reason::BudgetExceeded | Reason::TokenDailyLimitExceeded => {
                Some(RefusalStatus::BudgetExceeded)
            }
            _ => None,
        }
    }
}

impl RouterService {
    /// Takes the request's place in every window that applies, or refuses it.
    pub(super) async fn pass_gate(&self, p: &mut Prepared) -> Result<(), RouterError> {
        let Some(gate) = &self.inner.gate else {
            return Ok(());
        };
        let service = super::CHAT_SERVICE;
        let tokens = if gate.counts_tokens(service) {
            let prompt = self.prompt_tokens(p).await;
            let max_out = p
                .upstream_req
                .max_tokens
                .unwrap_or(self.inner.config.limits.default_max_tokens);
            prompt.saturating_add(u64::from(max_out))
        } else {
            0
        };
        p.pass = Some(gate.admit(&p.v.user_email, service, tokens).await?);
        Ok(())
    }

    /// The rate-limit headers of an admitted request.
    pub(super) fn rate_headers(p: &Prepared) -> RateHeaders {
        p.pass
            .as_ref()
            .map(|x| x.headers.clone())
            .unwrap_or_default()
    }

    /// Replaces the request's token reservation with what it used.
    pub(super) async fn settle_pass(p: &Prepared, used_tokens: u64) {
        if let Some(pass) = &p.pass {
            pass.settle_tokens(used_tokens).await;
        }
    }

    /// Records a usage row for a request a limit refused (nothing else is written for it).
    /// The row's request id is suffixed with the status, so a later admitted retry with the
    /// same id still gets its own row.
    pub(super) async fn record_refusal(&self, p: &Prepared, e: &RouterError) {
        let RouterError::Quota(q) = e else { return };
        let Some(status) = RefusalStatus::of(q.reason) else {
            return;
        };
        let mut usage = self.usage(p, status.as_str(), 0, 0, Instant::now(), 0);
        usage.request_id = format!("{}~{}", usage.request_id, status.as_str());
        self.record_free_usage(usage).await;
    }

    /// What is left of `user`'s limits on the chat service (empty when nothing is limited).
    pub async fn remaining_limits(
        &self,
        user: &str,
    ) -> Result<Vec<(Rule, WindowState)>, RouterError> {
        match &self.inner.gate {
            None => Ok(Vec::new()),
            Some(gate) => gate.remaining(user, super::CHAT_SERVICE).await,
        }
    }

    /// The configured limits, as `GET /v1/models` shows them.
    pub fn limits_json(&self) -> serde_json::Value {
        let c = &self.inner.config;
        let scope = |l: &crate::config::RateLimits| {
            serde_json::json!({
                "requests": l.requests.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "tokens": l.tokens.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "concurrent": l.concurrent,
            })
        };
        let services: serde_json::Map<String, serde_json::Value> = c
            .services
            .iter()
            .filter(|s| !s.rate_limits.is_empty())
            .map(|s| (s.service_type.clone(), scope(&s.rate_limits)))
            .collect();
        serde_json::json!({
            "per_user": scope(&c.rate_limits),
            "services": services,
            "max_concurrent_requests": c.limiter.max_concurrent_requests,
            "budgets": {
                "per_day_micros": c.budgets.per_day_micros,
                "per_month_micros": c.budgets.per_month_micros,
            },
        })
    }

    /// Admission without the request: takes and drops a pass (benchmarks, tests).
    pub async fn check_limits(&self, user: &str, tokens: u64) -> Result<Option<Pass>, RouterError> {
        match &self.inner.gate {
            None => Ok(None),
            Some(gate) => gate
                .admit(user, super::CHAT_SERVICE, tokens)
                .await
                .map(Some),
        }
    }
}
