//! Admission through the rate limits (docs/limits.md): every request of every service takes a
//! [`Pass`] in the shared admission (`admission.rs`), after its id is claimed and before its hold;
//! the pass's token reservation is settled with the answer's count. A refusal leaves a usage row
//! with status `rate_limited` or `budget_exceeded` through the common refusal path (`refusal.rs`).

use syft_proto::router::{GetLimitsRequest, GetLimitsResponse, Limit, LimitLeft};

use super::admission::Ticket;
use super::{Prepared, RouterService};
use crate::config::ServiceKind;
use crate::error::RouterError;
use crate::limits::{Pass, RateHeaders, Rule, WindowState, ROUTER_SCOPE};
use crate::money::format_micros;

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
            .options
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
            Some(gate) => {
                let work = Some(self.inner.drain.enter());
                let pass = gate
                    .admit_as_work(&t.user_email, t.kind, reserve_tokens, work)
                    .await?;
                Ok(Some(pass))
            }
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

    /// What is left of `user`'s limits on `service` (empty when nothing is limited).
    pub async fn remaining_limits(
        &self,
        user: &str,
        service: ServiceKind,
    ) -> Result<Vec<(Rule, WindowState)>, RouterError> {
        // A service the router does not sell has no limits: said, rather than the router-wide
        // windows shown as if they were the service's.
        if !self
            .inner
            .config
            .service(service)
            .is_some_and(|s| s.enabled)
        {
            return Err(super::admission::disabled(service));
        }
        match &self.inner.gate {
            None => Ok(Vec::new()),
            Some(gate) => gate.remaining(user, service).await,
        }
    }

    /// Whose limits a caller may read: the sender of the transaction token it presents, who must
    /// be the user it asks about (when it names one). A request names its user by email, so
    /// without the token anyone could read what any user has left (docs/limits.md).
    pub async fn limits_user(&self, asked: &str, token: &str) -> Result<String, RouterError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(RouterError::Unauthenticated(
                "what a user has left is shown to the holder of their transaction token: send it \
                 (`Authorization: Bearer <token>`; `transaction_token` over gRPC)"
                    .into(),
            ));
        }
        self.refused_locally()?;
        let sender = self.inner.ledger.token_sender(token).await?;
        if !asked.is_empty() && !asked.trim().eq_ignore_ascii_case(&sender) {
            // As a chat with another user's token is refused: `TOKEN_INVALID`.
            return Err(RouterError::ForeignToken(
                "the transaction token is not this user's".into(),
            ));
        }
        Ok(sender)
    }

    /// `GetLimits`: what is left of each of `user`'s windows on `service` (`chat` when empty).
    pub async fn get_limits(
        &self,
        req: GetLimitsRequest,
    ) -> Result<GetLimitsResponse, RouterError> {
        let service = parse_service(&req.service)?;
        let user = self
            .limits_user(&req.user_email, &req.transaction_token)
            .await?;
        let windows = self.remaining_limits(&user, service).await?;
        let mut limits: Vec<LimitLeft> = windows
            .iter()
            .map(|(rule, state)| LimitLeft {
                limit: Some(rule_proto(rule)),
                remaining: state.remaining,
                reset_ms: u64::try_from(rule.reset_shown(state).as_millis()).unwrap_or(u64::MAX),
            })
            .collect();
        limits.extend(self.budgets_left(&user, service).await?);
        Ok(GetLimitsResponse {
            user_email: user,
            service: service.as_str().into(),
            limits,
        })
    }

    /// What is left of `user`'s spend budgets on `service` (none when it is free or has no
    /// budget). The ledger counts the spend (`GetBudgetUse`), with the same query its hold check
    /// uses, so this agrees with what the next hold will be decided against.
    pub async fn budgets_left(
        &self,
        user: &str,
        service: ServiceKind,
    ) -> Result<Vec<LimitLeft>, RouterError> {
        let budgets: Vec<Limit> = self
            .service_limits(service)
            .into_iter()
            .filter(|l| l.kind.starts_with("budget_"))
            .collect();
        if budgets.is_empty() {
            return Ok(Vec::new());
        }
        self.refused_locally()?;
        let used = self.inner.ledger.budget_use(user).await?;
        let now = crate::limits::now_ms();
        let left = |limit: &Limit, used: i64, resets_at_micros: i64| LimitLeft {
            limit: Some(limit.clone()),
            remaining: limit.limit.saturating_sub(u64::try_from(used).unwrap_or(0)),
            reset_ms: u64::try_from(resets_at_micros / 1000)
                .unwrap_or(0)
                .saturating_sub(now),
        };
        Ok(budgets
            .iter()
            .map(|b| match b.kind.as_str() {
                "budget_day" => left(b, used.day_used_micros, used.day_resets_at_unix_micros),
                _ => left(b, used.month_used_micros, used.month_resets_at_unix_micros),
            })
            .collect())
    }

    /// Every limit that applies to a user's requests to `service`: the rate, token and
    /// concurrency windows of the router and of the service, and the spend budgets when the
    /// service is paid (`GetMetadata`, `GET /v1/models`).
    pub fn service_limits(&self, service: ServiceKind) -> Vec<Limit> {
        let c = &self.inner.config;
        let mut out: Vec<Limit> = match &self.inner.gate {
            None => Vec::new(),
            Some(gate) => gate.rules("", service, 0).iter().map(rule_proto).collect(),
        };
        let paid = c.service(service).filter(|s| !s.pricing.kind.is_free());
        if let Some(paid) = paid {
            let budgets = [
                ("budget_day", c.budgets.per_day_micros, "UTC day"),
                ("budget_month", c.budgets.per_month_micros, "UTC month"),
            ];
            for (kind, micros, per) in budgets {
                let Some(micros) = micros else { continue };
                out.push(Limit {
                    kind: kind.into(),
                    limit: u64::try_from(micros).unwrap_or(0),
                    window_seconds: 0,
                    scope: ROUTER_SCOPE.into(),
                    description: format!(
                        "spend of {} {} per user per {per}",
                        format_micros(micros),
                        paid.pricing.currency
                    ),
                });
            }
        }
        out
    }

    /// The configured limits, as `GET /v1/models` shows them: per scope as configured, and per
    /// service every limit that applies (`service_limits`).
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
        let apply: serde_json::Map<String, serde_json::Value> = c
            .services
            .iter()
            .filter(|s| s.enabled)
            .map(|s| {
                let limits: Vec<_> = self.service_limits(s.kind).iter().map(limit_json).collect();
                (s.kind.as_str().to_string(), serde_json::Value::from(limits))
            })
            .collect();
        serde_json::json!({
            "per_user": scope(&c.rate_limits),
            "services": services,
            "max_concurrent_requests": c.limiter.max_concurrent_requests,
            "budgets": {
                "per_day_micros": c.budgets.per_day_micros,
                "per_month_micros": c.budgets.per_month_micros,
            },
            "apply": apply,
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

/// `chat` when empty, else `chat` or `search`.
pub fn parse_service(text: &str) -> Result<ServiceKind, RouterError> {
    if text.is_empty() {
        return Ok(ServiceKind::Chat);
    }
    ServiceKind::parse(text).ok_or_else(|| {
        RouterError::InvalidArgument(format!(
            "unknown service {text:?} (use \"chat\" or \"search\")"
        ))
    })
}

/// A window as the API describes it (concurrency windows have no length: they last while the
/// request runs).
fn rule_proto(r: &Rule) -> Limit {
    Limit {
        kind: r.kind.as_str().into(),
        limit: r.limit,
        window_seconds: r.window_shown().as_secs(),
        scope: r.scope.into(),
        description: r.describe.clone(),
    }
}

/// A limit in the JSON of `GET /v1/models` (the field names of the proto).
fn limit_json(l: &Limit) -> serde_json::Value {
    serde_json::json!({
        "kind": l.kind,
        "limit": l.limit,
        "window_seconds": l.window_seconds,
        "scope": l.scope,
        "description": l.description,
    })
}
