//! The paid-request flow (docs/design.md §3), shared by the gRPC service and the HTTP front.
//!
//! validate -> price -> Authorize (hold) -> upstream -> Capture (actual cost) or Void.
//! Free services skip the money steps but still record a usage row. The streamed variant lives in
//! `stream`; the guards that resolve a request's claim and hold exactly once in `hold`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use syft_proto::ledger::Usage;
use syft_proto::router::{ChatOptions, ChatRequest, ChatResponse, Metadata, Service};
use tracing::Instrument;

use crate::config::{pricing_proto, PricingKind, RouterConfig, ServiceKind, TokenBound};
use crate::drain::Drain;
use crate::error::RouterError;
use crate::health::{LedgerState, OwnerCheck, Readiness, ReadinessCell};
use crate::ledger::Ledger;
use crate::limits::{Gate, RateHeaders};
use crate::metrics;
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest};
use crate::validate::{validate_chat, ValidRequest};

mod admission;
mod answer;
mod attempts;
mod count;
mod hold;
mod limit;
mod refusal;
mod replay;
use replay::chat_record;
mod search;
mod stream;

use admission::{Authorized, Presence, Ticket, Units};
use answer::{elapsed_ms, normalize_finish, token_usage};
use count::at_most_the_limit;
use hold::{Claim, HoldGuard};
pub use limit::parse_service;
pub use stream::ChatStreamHandle;

use crate::search::SearchBackend;

/// `app_ep_path` of chat transfers and `endpoint` of chat usage rows.
pub const CHAT_ENDPOINT: &str = "/chat";

/// The longest unary chat answer, as for search (`search.rs`): a standard gRPC client reads
/// messages of up to 4 MiB, and an answer it could not read was charged, while its retry was
/// refused as charged (the kept copy is smaller). A longer one is the upstream's failure, voided
/// (a stream passes it on in pieces: `upstream/openai.rs`).
const MAX_CHAT_ANSWER: usize = syft_error::MAX_ANSWER_BYTES;

/// The router: configuration, upstream and ledger client. Cheap to clone.
#[derive(Clone)]
pub struct RouterService {
    inner: Arc<Inner>,
}

struct Inner {
    config: RouterConfig,
    upstream: Upstream,
    /// Present when the config has a `search` section.
    search: Option<SearchBackend>,
    ledger: Ledger,
    /// (user email, request id) of the requests in progress.
    in_flight: Mutex<HashSet<(String, String)>>,
    readiness: ReadinessCell,
    drain: Arc<Drain>,
    /// The rate limits; `None` when none are configured.
    gate: Option<Arc<Gate>>,
}

/// What admission decided: run the request, or replay the stored answer of its earlier,
/// already charged attempt. (One per request, moved once: its size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Admission {
    Run(Prepared, Claim, Option<HoldGuard>),
    /// The stored answer, and the rate-limit headers of this retry.
    Replay(Box<ChatResponse>, RateHeaders),
}

/// What an answered request is charged: (prompt, completion) tokens, cost, usage row.
struct Charge {
    tokens: (u64, u64),
    cost: i64,
    usage: Usage,
}

/// A chat request, validated and priced.
struct Prepared {
    t: Ticket,
    v: ValidRequest,
    upstream_req: UpstreamRequest,
    prompt_tokens: Option<u64>,
}

impl RouterService {
    /// Validates the config, builds the upstream, and connects (lazily) to the ledger.
    /// Must be called inside a Tokio runtime.
    pub fn new(config: RouterConfig) -> Result<Self, RouterError> {
        config
            .validate()
            .map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
        let upstream = Upstream::from_config(&config.upstream)?;
        let ledger = Ledger::connect(&config.ledger, &config.owner_email)?;
        let search = config
            .search
            .as_ref()
            .map(SearchBackend::from_config)
            .transpose()?;
        let gate = Gate::from_config(&config)?;
        let ledger_required = config
            .services
            .iter()
            .any(|s| s.enabled && !s.pricing.kind.is_free());
        let shared_limiter = gate
            .as_ref()
            .filter(|g| g.is_shared())
            .map(|g| g.fails_closed());
        let readiness = Arc::new(
            tokio::sync::watch::channel(Readiness::starting(
                ledger_required,
                &config.owner_email,
                shared_limiter,
            ))
            .0,
        );
        Ok(RouterService {
            inner: Arc::new(Inner {
                config,
                upstream,
                search,
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

    /// Waits up to `timeout` until the local usage spool (`ledger.usage_spool`) has shipped every
    /// row to the ledger; `true` once it has (or without a spool). Rows left are shipped by the
    /// next router started on the same directory.
    pub async fn drain_usage_spool(&self, timeout: std::time::Duration) -> bool {
        self.inner.ledger.drain_spool(timeout).await
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

    /// Whether the ledger is known to refuse this router's own credentials (a rejected or
    /// missing secret). The router then sends it nothing on a user's behalf: each call would be
    /// refused, and each wrong secret counted against this machine's address, until every router
    /// and client on it is locked out of the ledger (docs/ledger.md, "Failed authentications").
    /// The owner check goes on (health.rs), and clears it. A locked address is not in this: a
    /// lock is one ledger replica's (another may take the call), and a locked refusal counts
    /// nothing.
    pub(crate) fn ledger_refuses_us(&self) -> bool {
        OwnerCheck::refuses_credentials(self.inner.readiness.borrow().owner)
            || self.credential_refused()
    }

    /// Whether a call was refused for the router's secret since the owner check last took it (a
    /// secret changed or revoked while the router runs): [`Self::ledger_refuses_us`] at once,
    /// not at the owner check's next minute.
    pub(crate) fn credential_refused(&self) -> bool {
        self.inner.ledger.credential_refused()
    }

    /// Whether the ledger is out for this router: not serving by the last probe, no endpoint
    /// connectable by the latest calls (the first requests after a ledger dies learn it before
    /// the probe does), or refusing its credentials.
    pub(crate) fn ledger_is_out(&self) -> bool {
        let now = self.inner.readiness.borrow();
        now.ledger != LedgerState::Serving
            || OwnerCheck::refuses_credentials(now.owner)
            || self.credential_refused()
            || self.inner.ledger.unreachable()
    }

    /// [`Self::ledger_refuses_us`] as the error a request gets instead of a ledger call.
    pub(crate) fn refused_locally(&self) -> Result<(), RouterError> {
        if self.ledger_refuses_us() {
            return Err(RouterError::Unavailable(
                "the router's ledger does not accept it now (its operator is told why); \
                 nothing was charged, retry later"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Asks the ledger's gRPC health service whether it is serving: the best state of any
    /// endpoint.
    pub async fn probe_ledger(&self, timeout: std::time::Duration) -> LedgerState {
        self.inner.ledger.probe(timeout).await.0
    }

    /// Every ledger endpoint's health: the best state and each endpoint's.
    pub async fn probe_ledgers(
        &self,
        timeout: std::time::Duration,
    ) -> (LedgerState, Vec<crate::health::LedgerEndpoint>) {
        self.inner.ledger.probe(timeout).await
    }

    /// Asks the rate limiter's shared store whether it answers (`Ok` without one).
    pub async fn ping_limiter(&self) -> Result<(), crate::limits::LimiterError> {
        match &self.inner.gate {
            Some(gate) => gate.ping().await,
            None => Ok(()),
        }
    }

    /// Whether the ledger accepts the router's secret as its owner's; `None` without an answer.
    pub async fn check_owner(&self, timeout: std::time::Duration) -> Option<OwnerCheck> {
        let config = &self.inner.config;
        let priced_in: Vec<&str> = config
            .services
            .iter()
            .filter(|s| !s.pricing.kind.is_free())
            .map(|s| s.pricing.currency.as_str())
            .collect();
        let budgets =
            config.budgets.per_day_micros.is_some() || config.budgets.per_month_micros.is_some();
        let ledger = &self.inner.ledger;
        ledger
            .check_owner(&config.owner_email, &priced_in, budgets, timeout)
            .await
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// `echo` or `openai`.
    pub fn provider(&self) -> &'static str {
        self.inner.upstream.provider()
    }

    /// The search backend (`embedded` or `http`), when the config has one.
    pub fn search_provider(&self) -> Option<&'static str> {
        self.inner.search.as_ref().map(SearchBackend::provider)
    }

    /// Models offered: the configured list, else what the upstream is known to serve.
    pub fn models(&self) -> Vec<String> {
        if !self.sells_chat() {
            // A search-only router listed the offline upstream's `echo`, which no request could
            // use (a chat there is refused SERVICE_DISABLED).
            return Vec::new();
        }
        match self.listed_models() {
            [] => self.inner.upstream.known_models(),
            listed => listed.to_vec(),
        }
    }

    /// The config's `models`, none for `["*"]`.
    fn listed_models(&self) -> &[String] {
        match self.inner.config.models.as_slice() {
            [any] if any == crate::config::ANY_MODEL => &[],
            listed => listed,
        }
    }

    /// Whether a chat may name `model`: one the config lists; with none listed, any on `echo` or
    /// with `models = ["*"]` (passed on), else the names of the upstream's `model_map`.
    pub fn serves_model(&self, model: &str) -> bool {
        let c = &self.inner.config;
        let any = c.models.iter().any(|m| m == crate::config::ANY_MODEL);
        self.sells_chat()
            && match (self.listed_models(), &c.upstream) {
                _ if any => true,
                ([], crate::config::UpstreamConfig::OpenAi(o)) => o.model_map.contains_key(model),
                ([], _) => true,
                (listed, _) => listed.iter().any(|m| m == model),
            }
    }

    /// The OpenAI `user` sent upstream for `email`: a pseudonym, never the payer's email.
    fn upstream_user(&self, email: &str) -> String {
        let c = &self.inner.config;
        crate::upstream::user_pseudonym(c.ledger.secret.expose(), &c.name, email)
    }

    /// Whether the chat service is listed and enabled.
    fn sells_chat(&self) -> bool {
        self.inner.config.chat_service().is_some_and(|s| s.enabled)
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
                    r#type: s.kind.as_str().into(),
                    enabled: s.enabled,
                    pricing: Some(pricing_proto(&s.pricing)),
                    limits: self.service_limits(s.kind),
                    left_streams: match s.kind {
                        ServiceKind::Chat => c.left_streams.as_str().into(),
                        ServiceKind::Search => String::new(),
                    },
                })
                .collect(),
            models: self.models(),
        }
    }

    /// A unary chat, with the rate-limit headers of the answer. Returns only after the capture
    /// (or the usage row, for free services) is committed.
    pub async fn chat_with_limits(
        &self,
        req: ChatRequest,
    ) -> Result<(ChatResponse, RateHeaders), RouterError> {
        let span = self.span(&req, false);
        self.unary(req).instrument(span).await
    }

    /// The request's span: request id, user, app and transfer id (never the token). The id and
    /// user are recorded before validation, escaped: a line break in them wrote a line of its own
    /// into text logs (a forged log line).
    fn span(&self, req: &ChatRequest, stream: bool) -> tracing::Span {
        tracing::info_span!(
            "chat",
            request_id = %req.request_id.escape_debug(),
            user = %req.user_email.escape_debug(),
            app = %self.inner.config.name,
            transfer_id = tracing::field::Empty,
            stream,
        )
    }

    async fn unary(&self, req: ChatRequest) -> Result<(ChatResponse, RateHeaders), RouterError> {
        let started = Instant::now();
        let (p, mut claim, mut hold) = match self.admit(req).await? {
            Admission::Run(p, claim, hold) => (p, claim, hold),
            Admission::Replay(r, headers) => {
                self.observe_replay("unary", started);
                return Ok((*r, headers));
            }
        };
        // From here the upstream has the prompt: a client that leaves keeps it in its token
        // windows, as a stream's does (`void_left`).
        if let (Some(pass), Some(prompt)) = (&p.t.pass, p.prompt_tokens) {
            pass.keep_if_dropped(prompt);
        }
        let up_start = Instant::now();
        let waiting = metrics::UpstreamWait::start(self.provider());
        let answer = self.until_shutdown(self.inner.upstream.complete(&p.upstream_req));
        let answer = hold::keeping_alive(&mut hold, answer).await;
        drop(waiting);
        let result = answer.and_then(|c| {
            if c.content.trim().is_empty() {
                Err(UpstreamError::Empty)
            } else if c.content.len() > MAX_CHAT_ANSWER {
                Err(UpstreamError::InvalidResponse(format!(
                    "an answer of {} bytes is more than the {MAX_CHAT_ANSWER} one may hold",
                    c.content.len()
                )))
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
                claim.recorded();
                metrics::observe_failure(self.provider(), "unary", &e, started, upstream_time);
                return Err(e.into());
            }
        };
        let charge = self
            .charge(&p, c.usage, &c.content, started, upstream_ms)
            .await;
        let transfer_id = hold.as_ref().map(|h| h.transfer_id.clone());
        let response = self.response(&p, c, charge.tokens, charge.cost, transfer_id);
        let answer = self.answer_to_store(&p.v.request_id, chat_record(&p, &response));
        let settled = self
            .settle(&p.t, hold, charge.cost, charge.usage, answer)
            .await;
        claim.recorded();
        let outcome = if settled.is_ok() {
            "success"
        } else {
            "not_settled"
        };
        metrics::observe(self.provider(), "unary", outcome, started, upstream_time);
        let headers = Self::rate_headers(&p.t);
        settled.map(|_| (response, headers))
    }

    /// A replayed answer in the metrics: no upstream time.
    fn observe_replay(&self, mode: &str, started: Instant) {
        metrics::observe(self.provider(), mode, "replay", started, Default::default());
    }

    // -----------------------------------------------------------------------------------------
    // steps

    /// Validates and prices a request, claims its id (held until the returned claim is dropped)
    /// and places its hold when the service is paid, so that its client leaving does not cancel
    /// it ([`RouterService::admit_detached`]). A refused request leaves a usage row with its
    /// refusal status (`refusal.rs`), even when its client left meanwhile.
    async fn admit(&self, req: ChatRequest) -> Result<Admission, RouterError> {
        let attempt = refusal::Attempt::chat(&req);
        let admission =
            |svc: RouterService, presence| async move { svc.try_admit(req, &presence).await };
        self.admit_detached(attempt, admission).await
    }

    async fn try_admit(
        &self,
        req: ChatRequest,
        presence: &Presence,
    ) -> Result<Admission, RouterError> {
        let mut p = self.prepare(req).await?;
        let reserve = self.chat_reservation(&p).await;
        let (claim, authorized) = self.admit_ticket(&mut p.t, reserve, presence).await?;
        let hold = match authorized {
            Authorized::Free => None,
            Authorized::Hold(h) => Some(h),
            Authorized::Resolved(transfer) => {
                let answer = self.replay(&p, &transfer).await?;
                let headers = Self::rate_headers(&p.t);
                return Ok(Admission::Replay(Box::new(answer), headers));
            }
        };
        Ok(Admission::Run(p, claim, hold))
    }

    async fn prepare(&self, req: ChatRequest) -> Result<Prepared, RouterError> {
        let inner = &self.inner;
        let v = validate_chat(req, &inner.config.limits)?;
        let pricing = self.price_for(ServiceKind::Chat, &v.user_email, &v.transaction_token)?;
        let model = if v.model.is_empty() {
            self.listed_models()
                .first()
                .cloned()
                .or_else(|| inner.upstream.default_model())
                .ok_or_else(|| RouterError::InvalidArgument("model is required".into()))?
        } else {
            v.model.clone()
        };
        if !self.serves_model(&model) {
            return Err(RouterError::NotFound(format!(
                "model {model:?} is not served by this router"
            )));
        }
        // The hold must bound the answer, and so must a token window's reservation (a free
        // answer of any length would settle far above what was reserved): the bound is then
        // always sent upstream. Otherwise only where the owner set `limits.default_max_tokens`:
        // an owner pricing per request pays the upstream for the answer's length, but a bound
        // sent unasked broke upstreams that refuse `max_tokens` (OpenAI's reasoning models) or
        // a prompt plus 4,096 over a small model's context (vLLM), every request refused.
        let bounded = matches!(pricing.kind, PricingKind::PerToken { .. })
            || self.counts_tokens(ServiceKind::Chat)
            || inner.config.limits.bound_every_chat;
        let max_tokens = match v.options.max_tokens {
            None if bounded => Some(inner.config.limits.default_max_tokens),
            given => given,
        };
        let upstream_req = UpstreamRequest {
            model: inner.upstream.upstream_model(&model),
            messages: v.messages.clone(),
            options: ChatOptions {
                max_tokens,
                ..v.options.clone()
            },
            user: self.upstream_user(&v.user_email),
        };
        let t = Ticket {
            started: tokio::time::Instant::now(),
            kind: ServiceKind::Chat,
            request_id: v.request_id.clone(),
            user_email: v.user_email.clone(),
            transaction_token: v.transaction_token.clone(),
            pricing,
            hold_micros: 0,
            bound: None,
            model,
            pass: None,
            free_row_key: String::new(),
        };
        let mut p = Prepared {
            t,
            v,
            upstream_req,
            prompt_tokens: None,
        };
        // Counted here, before the hold, when the hold or a token window needs it: a large
        // prompt waits its turn, or is refused while too many wait (`tokens.rs`).
        let per_token = matches!(p.t.pricing.kind, PricingKind::PerToken { .. });
        if per_token || self.counts_tokens(ServiceKind::Chat) {
            p.prompt_tokens = Some(self.admission_prompt_tokens(&p).await?);
        }
        if let (true, Some(prompt)) = (per_token, p.prompt_tokens) {
            let max_out = u64::from(max_tokens.unwrap_or(0));
            p.t.hold_micros = p.t.pricing.hold_micros(prompt, max_out);
            p.t.bound = Some(TokenBound {
                prompt_tokens: prompt,
                max_completion_tokens: max_out,
                defaulted: p.v.options.max_tokens.is_none(),
            });
        } else {
            p.t.hold_micros = p.t.pricing.hold_micros(0, 0);
        }
        Ok(p)
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
        tracing::warn!(request_id = %p.v.request_id, error = %e.summary(), status = %e.usage_status(), "upstream failed");
        tracing::debug!(request_id = %p.v.request_id, error = %e, "upstream failure in its words");
        // 401 only: some gateways answer 403 to one user's flagged prompt, not to the key.
        match e {
            UpstreamError::Status { status: 401, .. } => {
                crate::upstream::key_refused(self.provider())
            }
            UpstreamError::Status { status: 403, .. } => {
                crate::upstream::request_refused(self.provider());
            }
            UpstreamError::Status { status: 402, .. } => {
                tracing::error!(request_id = %p.v.request_id, "the upstream refuses this router's account for billing (out of credit): top it up");
            }
            _ => {}
        }
        if let Some(pass) = &p.t.pass {
            // A failed request uses nothing it pays for in the token windows either.
            pass.keep_if_dropped(0);
            if e.is_outage() {
                pass.give_back_requests();
            }
        }
        let units = Units {
            input: self.prompt_tokens(p).await,
            output: 0,
        };
        let usage = self.usage(&p.t, e.usage_status(), units, started, upstream_ms);
        self.release(hold, &e.summary(), usage).await;
    }
}
