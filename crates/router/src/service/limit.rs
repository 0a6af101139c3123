//! Admission through the rate limits (docs/limits.md): every request of every service takes a
//! [`Pass`] in the shared admission (`admission.rs`), after its id is claimed and before its hold;
//! the pass's token reservation is settled with the answer's count. A refusal leaves a usage row
//! with status `rate_limited` or `budget_exceeded` through the common refusal path (`refusal.rs`).

use super::admission::Ticket;
use super::{Prepared, RouterService};
use crate::config::ServiceKind;
use crate::error::RouterError;
use crate::limits::{Pass, RateHeaders, Rule, WindowState};

impl RouterService {
    /// Whether a token window applies to `kind` (the request's tokens are then counted before
    /// admission).
    pub(super) fn counts_tokens(&self, kind: ServiceKind) -> bool {
        self.inner
            .gate
            .as_ref()
            .is_some_and(|g| g.counts_tokens(kind))
    }

    /// The tokens a chat reserves in the token windows: its prompt and the most it may answer.
    pub(super) async fn chat_reservation(&self, p: &Prepared) -> u64 {
        if !self.counts_tokens(ServiceKind::Chat) {
            return 0;
        }
        let prompt = self.prompt_tokens(p).await;
        let max_out = p
            .upstream_req
            .max_tokens
            .unwrap_or(self.inner.config.limits.default_max_tokens);
        prompt.saturating_add(u64::from(max_out))
    }

    /// Takes the request's place in every window of its service, or refuses it.
    pub(super) async fn pass_gate(
        &self,
        t: &Ticket,
        reserve_tokens: u64,
    ) -> Result<Option<Pass>, RouterError> {
        match &self.inner.gate {
            None => Ok(None),
            Some(gate) => gate
                .admit(&t.user_email, t.kind, reserve_tokens)
                .await
                .map(Some),
        }
    }

    /// The rate-limit headers of an admitted request.
    pub(super) fn rate_headers(t: &Ticket) -> RateHeaders {
        t.pass
            .as_ref()
            .map(|x| x.headers.clone())
            .unwrap_or_default()
    }

    /// Replaces the request's token reservation with what it used.
    pub(super) async fn settle_pass(t: &Ticket, used_tokens: u64) {
        if let Some(pass) = &t.pass {
            pass.settle_tokens(used_tokens).await;
        }
    }

    /// What is left of `user`'s limits on the chat service (empty when nothing is limited).
    pub async fn remaining_limits(
        &self,
        user: &str,
    ) -> Result<Vec<(Rule, WindowState)>, RouterError> {
        match &self.inner.gate {
            None => Ok(Vec::new()),
            Some(gate) => gate.remaining(user, ServiceKind::Chat).await,
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
            .map(|s| (s.kind.as_str().to_string(), scope(&s.rate_limits)))
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
            Some(gate) => gate.admit(user, ServiceKind::Chat, tokens).await.map(Some),
        }
    }
}
