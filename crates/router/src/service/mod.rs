//! The paid-request flow (docs/design.md §3), shared by the gRPC service and the HTTP front.
//!
//! validate -> price -> Authorize (hold) -> upstream -> Capture (actual cost) or Void.
//! Free services skip the money steps but still record a usage row. The streamed variant lives in
//! `stream`; the guards that resolve a request's claim and hold exactly once in `hold`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use syft_proto::ledger::{AuthorizeRequest, TransferStatus, Usage};
use syft_proto::router::{ChatRequest, ChatResponse, Message, Metadata, ProviderInfo, Service};
use tracing::Instrument;

use crate::config::{
    describe_price, insufficient_funds_message, pricing_proto, Pricing, PricingKind, RouterConfig,
    ServiceConfig, TokenBound,
};
use crate::drain::Drain;
use crate::error::{RouterError, INSUFFICIENT_FUNDS};
use crate::health::{LedgerState, Readiness, ReadinessCell};
use crate::ledger::Ledger;
use crate::limits::{Gate, Pass, RateHeaders};
use crate::metrics;
use crate::tokens;
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest, UpstreamUsage};
use crate::validate::{validate_chat, ValidRequest};

mod answer;
mod hold;
mod limit;
mod stream;

use answer::{elapsed_ms, normalize_finish, token_usage};
use hold::{Claim, HoldGuard};
pub use limit::RefusalStatus;
pub use stream::ChatStreamHandle;

/// `app_ep_path` of chat transfers and `endpoint` of chat usage rows.
pub const CHAT_ENDPOINT: &str = "/chat";

/// The `type` of the chat service in the config (its per-service limits).
const CHAT_SERVICE: &str = "chat";

/// Prompts above this size are tokenized on the blocking pool.
const INLINE_TOKENIZE_BYTES: usize = 64 * 1024;

/// The router: configuration, upstream and ledger client. Cheap to clone.
#[derive(Clone)]
pub struct RouterService {
    inner: Arc<Inner>,
}

struct Inner {
    config: RouterConfig,
    chat: Option<ServiceConfig>,
    upstream: Upstream,
    ledger: Ledger,
    /// (user email, request id) of the requests in progress.
    in_flight: Mutex<HashSet<(String, String)>>,
    readiness: ReadinessCell,
    drain: Arc<Drain>,
    /// The rate limits; `None` when none are configured.
    gate: Option<Arc<Gate>>,
}

struct Prepared {
    v: ValidRequest,
    model: String,
    upstream_req: UpstreamRequest,
    pricing: Pricing,
    prompt_tokens: Option<u64>,
    hold_micros: i64,
    /// What sized a per-token hold (explains an insufficient-funds refusal).
    bound: Option<TokenBound>,
    /// The request's place in the rate-limit windows (released when the request ends).
    pass: Option<Pass>,
}

impl RouterService {
    /// Validates the config, builds the upstream, and connects (lazily) to the ledger.
    /// Must be called inside a Tokio runtime.
    pub fn new(config: RouterConfig) -> Result<Self, RouterError> {
        config
            .validate()
            .map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
        let upstream = Upstream::from_config(&config.upstream)?;
        let ledger = Ledger::connect(&config.ledger)?;
        let chat = config.chat_service().cloned();
        let gate = Gate::from_config(&config)?;
        let ledger_required = config
            .services
            .iter()
            .any(|s| s.enabled && !s.pricing.kind.is_free());
        let readiness = Arc::new(
            tokio::sync::watch::channel(Readiness::starting(ledger_required, &config.owner_email))
                .0,
        );
        Ok(RouterService {
            inner: Arc::new(Inner {
                config,
                chat,
                upstream,
                ledger,
                in_flight: Mutex::new(HashSet::new()),
                readiness,
                drain: Drain::new(),
                gate,
            }),
        })
    }

    /// Requests (and unresolved holds) in flight.
    pub fn in_flight(&self) -> usize {
        self.inner.drain.active()
    }

    /// Ends the grace period: running requests stop waiting for the upstream, void their holds
    /// and fail with `UNAVAILABLE`; new requests are refused.
    pub fn cancel_in_flight(&self) {
        self.inner.drain.abort();
    }

    /// Resolves when nothing is in flight (every hold captured or voided).
    pub async fn wait_idle(&self) {
        self.inner.drain.idle().await;
    }

    /// Runs `work` unless the grace period ends first.
    async fn until_shutdown<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        tokio::select! {
            r = work => r,
            _ = self.inner.drain.aborted() => Err(UpstreamError::ShuttingDown),
        }
    }

    /// Current readiness (see [`crate::health`]).
    pub fn readiness(&self) -> Readiness {
        self.inner.readiness.borrow().clone()
    }

    /// Follows readiness changes.
    pub fn watch_readiness(&self) -> tokio::sync::watch::Receiver<Readiness> {
        self.inner.readiness.subscribe()
    }

    pub(crate) fn update_readiness(&self, f: impl FnOnce(&Readiness) -> Readiness) {
        self.inner.readiness.send_if_modified(|r| {
            let next = f(r);
            let changed = next != *r;
            *r = next;
            changed
        });
    }

    /// Asks the ledger's gRPC health service whether it is serving.
    pub async fn probe_ledger(&self, timeout: std::time::Duration) -> LedgerState {
        self.inner.ledger.probe(timeout).await
    }

    /// Whether the ledger accepts the router's secret as its owner's; `None` without an answer.
    pub async fn check_owner(
        &self,
        timeout: std::time::Duration,
    ) -> Option<crate::health::OwnerCheck> {
        self.inner
            .ledger
            .check_owner(&self.inner.config.owner_email, timeout)
            .await
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// `echo` or `openai`.
    pub fn provider(&self) -> &'static str {
        self.inner.upstream.provider()
    }

    /// Models offered: the configured list, else what the upstream is known to serve.
    pub fn models(&self) -> Vec<String> {
        if self.inner.config.models.is_empty() {
            self.inner.upstream.known_models()
        } else {
            self.inner.config.models.clone()
        }
    }

    pub fn metadata(&self) -> Metadata {
        let c = &self.inner.config;
        Metadata {
            name: c.name.clone(),
            description: c.description.clone(),
            owner_email: c.owner_email.clone(),
            services: c
                .services
                .iter()
                .map(|s| Service {
                    r#type: s.service_type.clone(),
                    enabled: s.enabled,
                    pricing: Some(pricing_proto(&s.pricing)),
                })
                .collect(),
            models: self.models(),
        }
    }

    /// A unary chat. Returns only after the capture (or the usage row, for free services) is
    /// committed.
    pub async fn chat(&self, req: ChatRequest) -> Result<ChatResponse, RouterError> {
        self.chat_with_limits(req).await.map(|(resp, _)| resp)
    }

    /// [`RouterService::chat`], with the rate-limit headers of the answer.
    pub async fn chat_with_limits(
        &self,
        req: ChatRequest,
    ) -> Result<(ChatResponse, RateHeaders), RouterError> {
        let span = self.span(&req, false);
        self.unary(req).instrument(span).await
    }

    /// The request's span: request id, user, app and transfer id (never the token).
    fn span(&self, req: &ChatRequest, stream: bool) -> tracing::Span {
        tracing::info_span!(
            "chat",
            request_id = %req.request_id,
            user = %req.user_email,
            app = %self.inner.config.name,
            transfer_id = tracing::field::Empty,
            stream,
        )
    }

    async fn unary(&self, req: ChatRequest) -> Result<(ChatResponse, RateHeaders), RouterError> {
        let started = Instant::now();
        let (p, _claim, hold) = self.admit(req).await?;
        let up_start = Instant::now();
        let result = self
            .until_shutdown(self.inner.upstream.complete(&p.upstream_req))
            .await
            .and_then(|c| {
                if c.content.trim().is_empty() {
                    Err(UpstreamError::Empty)
                } else {
                    Ok(c)
                }
            });
        let upstream_time = up_start.elapsed();
        let upstream_ms = elapsed_ms(up_start);
        let c = match result {
            Ok(c) => c,
            Err(e) => {
                self.fail(&p, hold, &e, started, upstream_ms).await;
                metrics::observe(
                    self.provider(),
                    "unary",
                    e.usage_status(),
                    started,
                    upstream_time,
                );
                return Err(e.into());
            }
        };
        let (prompt_tokens, completion_tokens) = self.final_tokens(&p, c.usage, &c.content).await;
        Self::settle_pass(&p, prompt_tokens.saturating_add(completion_tokens)).await;
        let cost = self.cost(&p, prompt_tokens, completion_tokens);
        let usage = self.usage(
            &p,
            "success",
            prompt_tokens,
            completion_tokens,
            started,
            upstream_ms,
        );
        let settled = self.settle(&p, hold, cost, usage).await;
        let outcome = if settled.is_ok() {
            "success"
        } else {
            "not_settled"
        };
        metrics::observe(self.provider(), "unary", outcome, started, upstream_time);
        let transfer_id = settled?;
        let currency = p.pricing.currency.clone();
        let headers = Self::rate_headers(&p);
        let resp = ChatResponse {
            id: p.v.request_id.clone(),
            model: p.model.clone(),
            message: Some(Message {
                role: "assistant".into(),
                content: c.content,
                name: None,
            }),
            finish_reason: normalize_finish(&c.finish_reason),
            usage: Some(token_usage(prompt_tokens, completion_tokens)),
            cost_micros: cost,
            transfer_id,
            provider_info: Some(ProviderInfo {
                provider: self.provider().into(),
                upstream_model: if c.model.is_empty() {
                    p.upstream_req.model.clone()
                } else {
                    c.model
                },
                upstream_finish_reason: c.finish_reason,
                upstream_id: c.id,
            }),
            currency,
        };
        Ok((resp, headers))
    }

    // -----------------------------------------------------------------------------------------
    // steps

    /// Validates and prices a request, claims its id (held until the returned claim is dropped)
    /// and places its hold when the service is paid.
    async fn admit(
        &self,
        req: ChatRequest,
    ) -> Result<(Prepared, Claim, Option<HoldGuard>), RouterError> {
        let mut p = self.prepare(req).await?;
        tracing::Span::current().record("request_id", p.v.request_id.as_str());
        let claim = self.claim(&p.v.user_email, &p.v.request_id)?;
        let admitted = match self.pass_gate(&mut p).await {
            Ok(()) => self.authorize(&p).await,
            Err(e) => Err(e),
        };
        let hold = match admitted {
            Ok(hold) => hold,
            Err(e) => {
                self.record_refusal(&p, &e).await;
                return Err(e);
            }
        };
        if let Some(h) = &hold {
            tracing::Span::current().record("transfer_id", h.transfer_id.as_str());
        }
        Ok((p, claim, hold))
    }

    async fn prepare(&self, req: ChatRequest) -> Result<Prepared, RouterError> {
        let inner = &self.inner;
        let v = validate_chat(req, &inner.config.limits)?;
        let service = match &inner.chat {
            Some(s) if s.enabled => s,
            _ => {
                return Err(RouterError::FailedPrecondition {
                    reason: "SERVICE_DISABLED",
                    message: "the chat service is not enabled on this router".into(),
                })
            }
        };
        let model = if v.model.is_empty() {
            inner
                .config
                .models
                .first()
                .cloned()
                .or_else(|| inner.upstream.default_model())
                .ok_or_else(|| RouterError::InvalidArgument("model is required".into()))?
        } else {
            v.model.clone()
        };
        if !inner.config.models.is_empty() && !inner.config.models.contains(&model) {
            return Err(RouterError::NotFound(format!(
                "model {model:?} is not served by this router"
            )));
        }
        let pricing = service.pricing.clone();
        if !pricing.kind.is_free() {
            if v.transaction_token.is_empty() {
                return Err(RouterError::PaymentRequired(format!(
                    "this service costs {}; send a transaction token issued to {}",
                    describe_price(&pricing),
                    inner.config.owner_email
                )));
            }
            if v.user_email.is_empty() {
                return Err(RouterError::InvalidArgument(
                    "the payer's email is required for paid requests (`user` in the OpenAI API, `user_email` over gRPC)".into(),
                ));
            }
        }
        let max_tokens = match pricing.kind {
            // The hold must bound the answer, so the bound is always sent upstream.
            PricingKind::PerToken { .. } => Some(
                v.max_tokens
                    .unwrap_or(inner.config.limits.default_max_tokens),
            ),
            _ => v.max_tokens,
        };
        let upstream_req = UpstreamRequest {
            model: inner.upstream.upstream_model(&model),
            messages: v.messages.clone(),
            max_tokens,
            temperature: v.temperature,
            top_p: v.top_p,
            stop: v.stop.clone(),
            user: v.user_email.clone(),
        };
        let mut p = Prepared {
            v,
            model,
            upstream_req,
            pricing,
            prompt_tokens: None,
            hold_micros: 0,
            bound: None,
            pass: None,
        };
        if let PricingKind::PerToken { .. } = p.pricing.kind {
            let prompt = self.prompt_tokens(&p).await;
            p.prompt_tokens = Some(prompt);
            let max_out = u64::from(max_tokens.unwrap_or(0));
            p.hold_micros = p.pricing.hold_micros(prompt, max_out);
            p.bound = Some(TokenBound {
                prompt_tokens: prompt,
                max_completion_tokens: max_out,
                defaulted: p.v.max_tokens.is_none(),
            });
        } else {
            p.hold_micros = p.pricing.hold_micros(0, 0);
        }
        Ok(p)
    }

    /// Marks the user's request id in flight in this process, so a concurrent duplicate is
    /// refused instead of calling the upstream twice. (Across replicas the ledger's idempotency
    /// still guarantees a single charge.) Request ids are scoped per user, like the ledger's
    /// idempotency keys: two users who send the same id do not collide.
    fn claim(&self, user_email: &str, request_id: &str) -> Result<Claim, RouterError> {
        if self.inner.drain.is_aborting() {
            return Err(RouterError::Unavailable(
                "the router is shutting down; retry".into(),
            ));
        }
        let mut set = self
            .inner
            .in_flight
            .lock()
            .map_err(|_| RouterError::Internal("in-flight set poisoned".into()))?;
        let key = (user_email.to_string(), request_id.to_string());
        if !set.insert(key.clone()) {
            return Err(RouterError::AlreadyExists(format!(
                "request {request_id} is already in progress"
            )));
        }
        Ok(Claim {
            inner: self.inner.clone(),
            key,
            _work: self.inner.drain.enter(),
        })
    }

    async fn authorize(&self, p: &Prepared) -> Result<Option<HoldGuard>, RouterError> {
        if p.pricing.kind.is_free() {
            return Ok(None);
        }
        let inner = &self.inner;
        let transfer = inner
            .ledger
            .authorize(AuthorizeRequest {
                sender_email: p.v.user_email.clone(),
                amount_micros: p.hold_micros,
                token: p.v.transaction_token.clone(),
                app_name: inner.config.name.clone(),
                app_ep_path: CHAT_ENDPOINT.into(),
                idempotency_key: p.v.request_id.clone(),
                hold_ttl_seconds: inner.ledger.hold_ttl_seconds,
                budget_per_day_micros: inner.config.budgets.per_day_micros,
                budget_per_month_micros: inner.config.budgets.per_month_micros,
            })
            .await
            .map_err(|e| explain_refusal(p, e))?;
        if transfer.status() != TransferStatus::Pending {
            let state = match transfer.status() {
                TransferStatus::Completed => "completed (already charged)",
                TransferStatus::Cancelled => "cancelled (not charged)",
                _ => "resolved",
            };
            return Err(RouterError::AlreadyExists(format!(
                "request {} was already processed: transfer {} is {state}; use a new request id \
                 to send a new request",
                p.v.request_id, transfer.id
            )));
        }
        tracing::debug!(request_id = %p.v.request_id, transfer_id = %transfer.id, hold_micros = p.hold_micros, "hold authorized");
        Ok(Some(HoldGuard {
            work: Some(inner.drain.enter()),
            ledger: inner.ledger.clone(),
            transfer_id: transfer.id,
            cancel_usage: Some(self.usage(p, "cancelled", 0, 0, Instant::now(), 0)),
        }))
    }

    /// Success: capture the cost (or record the usage row for a free request). Returns the
    /// transfer id (empty for free requests).
    async fn settle(
        &self,
        p: &Prepared,
        hold: Option<HoldGuard>,
        cost: i64,
        usage: Usage,
    ) -> Result<String, RouterError> {
        let Some(hold) = hold else {
            self.record_free_usage(usage).await;
            return Ok(String::new());
        };
        let transfer_id = hold.transfer_id.clone();
        if cost <= 0 {
            // Nothing to charge (e.g. only free tokens were used): release the hold, keep the row.
            hold.void("nothing to charge", usage).await;
            return Ok(transfer_id);
        }
        let result = hold.capture(cost, usage).await;
        match &result {
            Ok(_) => tracing::info!(
                request_id = %p.v.request_id, transfer_id = %transfer_id, cost_micros = cost,
                user = %p.v.user_email, model = %p.model, "chat captured"
            ),
            Err(e) => tracing::error!(
                request_id = %p.v.request_id, transfer_id = %transfer_id, error = %e,
                "capture failed; the answer is withheld"
            ),
        }
        result.map(|_| transfer_id)
    }

    /// Failure: void the hold (or record the failed free request).
    async fn fail(
        &self,
        p: &Prepared,
        hold: Option<HoldGuard>,
        e: &UpstreamError,
        started: Instant,
        upstream_ms: i64,
    ) {
        tracing::warn!(request_id = %p.v.request_id, error = %e, status = e.usage_status(), "upstream failed");
        let prompt = self.prompt_tokens(p).await;
        let usage = self.usage(p, e.usage_status(), prompt, 0, started, upstream_ms);
        self.release(hold, &e.to_string(), usage).await;
    }

    async fn release(&self, hold: Option<HoldGuard>, reason: &str, usage: Usage) {
        match hold {
            Some(h) => h.void(reason, usage).await,
            None => self.record_free_usage(usage).await,
        }
    }

    async fn record_free_usage(&self, usage: Usage) {
        let request_id = usage.request_id.clone();
        if let Err(e) = self.inner.ledger.record_usage(usage).await {
            // Free answers do not depend on the ledger being up.
            tracing::warn!(request_id = %request_id, error = %e, "could not record usage");
        }
    }

    async fn prompt_tokens(&self, p: &Prepared) -> u64 {
        if let Some(n) = p.prompt_tokens {
            return n;
        }
        if p.v.prompt_bytes <= INLINE_TOKENIZE_BYTES {
            return tokens::count_prompt(&p.v.messages);
        }
        let messages = p.v.messages.clone();
        tokio::task::spawn_blocking(move || tokens::count_prompt(&messages))
            .await
            .unwrap_or(0)
    }

    /// Upstream-reported usage when present, else counted with the tokenizer.
    async fn final_tokens(
        &self,
        p: &Prepared,
        reported: Option<UpstreamUsage>,
        content: &str,
    ) -> (u64, u64) {
        match reported {
            Some(u) if u.prompt_tokens > 0 || u.completion_tokens > 0 => {
                (u.prompt_tokens, u.completion_tokens)
            }
            _ => (self.prompt_tokens(p).await, tokens::count_text(content)),
        }
    }

    /// The actual cost, never above the hold.
    fn cost(&self, p: &Prepared, prompt_tokens: u64, completion_tokens: u64) -> i64 {
        let cost = p.pricing.cost_micros(prompt_tokens, completion_tokens);
        if cost > p.hold_micros {
            tracing::warn!(request_id = %p.v.request_id, cost, hold = p.hold_micros, "cost above hold; capped");
        }
        cost.min(p.hold_micros)
    }

    fn usage(
        &self,
        p: &Prepared,
        status: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
        started: Instant,
        upstream_ms: i64,
    ) -> Usage {
        let prompt = i64::try_from(prompt_tokens).unwrap_or(i64::MAX);
        let completion = i64::try_from(completion_tokens).unwrap_or(i64::MAX);
        Usage {
            request_id: p.v.request_id.clone(),
            app_name: self.inner.config.name.clone(),
            endpoint: CHAT_ENDPOINT.into(),
            user_email: p.v.user_email.clone(),
            model: p.model.clone(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            status: status.into(),
            latency_ms: elapsed_ms(started),
            upstream_latency_ms: upstream_ms,
        }
    }
}

/// Replaces the ledger's insufficient-funds message (a bare amount in micros) with one that says
/// what the hold is in money, what sized it, and how to reserve less.
fn explain_refusal(p: &Prepared, e: RouterError) -> RouterError {
    match e {
        RouterError::FailedPrecondition {
            reason: INSUFFICIENT_FUNDS,
            message,
        } => {
            tracing::debug!(request_id = %p.v.request_id, ledger_message = %message, "hold refused");
            RouterError::FailedPrecondition {
                reason: INSUFFICIENT_FUNDS,
                message: insufficient_funds_message(&p.pricing, p.hold_micros, p.bound),
            }
        }
        other => other,
    }
}
