//! The router's admission gate: turns the configured limits into windows for one request, asks
//! the [`Limiter`], applies the failure mode, and hands back a [`Pass`] that settles the token
//! reservation and frees the in-flight slots when the request ends.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{register_int_counter_vec, IntCounterVec};

use super::headers::RateHeaders;
use super::refusal::{refusal, Wait};
use super::renew::Renewal;
use super::settle::{spawn_settle, Change};
use super::{
    window_now_ms, Limiter, LimiterError, MemoryLimiter, RedisLimiter, Rule, RuleKind, Verdict,
    WindowState,
};
use crate::config::{LimiterBackend, OnFailure, RateLimits, RouterConfig, ServiceKind};
use crate::drain::DrainGuard;
use crate::error::RouterError;

/// The prefix of every window's keys in a shared store. Versions before 2026-12-04 kept a
/// window's set at the bare key and its costs and total at the `:c` and `:s` this layout also
/// uses: a router of this layout read an older one's total but never aged out its entries, which
/// held a user below their limit for as long as they stayed active. So each layout has its own
/// prefix (`syft:rl:` was the last shared one): an upgrade starts every window afresh.
const KEY_SPACE: &str = "syft:rl2";

static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "syft_router_limit_checks_total",
        "Admission checks against the rate limits, by backend and outcome (admitted, refused, \
         store_failed_open, store_failed_closed)",
        &["backend", "outcome"]
    )
    .expect("register syft_router_limit_checks_total")
});

/// The scope of the limits that apply to every service of the router.
pub const ROUTER_SCOPE: &str = "router";

/// The configured limits of one router and the store that counts them.
pub struct Gate {
    limiter: Arc<dyn Limiter>,
    on_failure: OnFailure,
    app: String,
    router: RateLimits,
    services: HashMap<ServiceKind, RateLimits>,
    max_concurrent: Option<u64>,
    lease: Duration,
    /// How long a request waits for a change it awaits after admission ([`Pass`]): the store's
    /// timeout, as for its check.
    patience: Duration,
    /// The services sold for free: their users' windows are counted apart (`rules`).
    free: HashSet<ServiceKind>,
}

impl Gate {
    /// `None` when nothing is limited (admission then costs nothing). Must run inside a Tokio
    /// runtime (the Redis connection is made lazily on it).
    pub fn from_config(c: &RouterConfig) -> Result<Option<Arc<Gate>>, RouterError> {
        let services: HashMap<ServiceKind, RateLimits> = c
            .services
            .iter()
            .filter(|s| !s.rate_limits.is_empty())
            .map(|s| (s.kind, s.rate_limits.clone()))
            .collect();
        if c.rate_limits.is_empty()
            && services.is_empty()
            && c.limiter.max_concurrent_requests.is_none()
        {
            // Refused as docs/limits.md says, limits or not: a URL that cannot be used was
            // taken until a limit was added, and only then refused.
            if let LimiterBackend::Redis { url } = &c.limiter.backend {
                super::redis_conn::Conn::client(url)
                    .map_err(|e| RouterError::InvalidArgument(e.message))?;
            }
            return Ok(None);
        }
        let limiter: Arc<dyn Limiter> = match &c.limiter.backend {
            LimiterBackend::Memory => Arc::new(MemoryLimiter::new().running_for(c.limiter.lease)),
            LimiterBackend::Redis { url } => Arc::new(
                RedisLimiter::new(url, c.limiter.timeout)
                    .map_err(|e| RouterError::InvalidArgument(e.message))?
                    .running_for(c.limiter.lease),
            ),
        };
        for (scope, rate) in c.chat_token_limits_below_default() {
            tracing::warn!(
                scope,
                limit = %rate,
                default_max_tokens = c.limits.default_max_tokens,
                "a token limit is at most limits.default_max_tokens: every chat that sets no \
                 max_tokens (or a larger one) reserves more than the window holds and is refused; \
                 raise the limit or lower default_max_tokens"
            );
        }
        // Every series at zero from the start: a rule on `increase()` sees nothing of a series
        // that does not exist yet, so the first store outage after a restart raised no alert.
        let backend = limiter.backend();
        for outcome in [
            "admitted",
            "refused",
            "store_failed_open",
            "store_failed_closed",
        ] {
            CHECKS.with_label_values(&[backend, outcome]);
        }
        super::settle::at_zero(backend);
        if matches!(c.limiter.backend, LimiterBackend::Redis { .. }) {
            super::redis_conn::at_zero();
        }
        Ok(Some(Arc::new(Gate::with_limiter(c, limiter, services))))
    }

    fn with_limiter(
        c: &RouterConfig,
        limiter: Arc<dyn Limiter>,
        services: HashMap<ServiceKind, RateLimits>,
    ) -> Self {
        Gate {
            limiter,
            on_failure: c.limiter.on_failure,
            app: c.name.clone(),
            router: c.rate_limits.clone(),
            services,
            max_concurrent: c.limiter.max_concurrent_requests,
            free: c
                .services
                .iter()
                .filter(|s| s.pricing.kind.is_free())
                .map(|s| s.kind)
                .collect(),
            lease: c.limiter.lease,
            patience: c.limiter.timeout,
        }
    }

    /// Whether the limits are counted in a store shared with other replicas (Redis), which can
    /// stop answering.
    pub fn is_shared(&self) -> bool {
        self.limiter.backend() != "memory"
    }

    /// Whether every request is refused while the store does not answer.
    pub fn fails_closed(&self) -> bool {
        self.on_failure == OnFailure::FailClosed
    }

    /// Asks the store whether it answers (readiness).
    pub async fn ping(&self) -> Result<(), LimiterError> {
        self.limiter.ping().await
    }

    /// Whether any window counts tokens (the prompt is then tokenized at admission).
    pub fn counts_tokens(&self, service: ServiceKind) -> bool {
        !self.router.tokens.is_empty()
            || self
                .services
                .get(&service)
                .is_some_and(|l| !l.tokens.is_empty())
    }

    /// The windows of `user`'s request to `service` reserving `tokens`.
    pub fn rules(&self, user: &str, service: ServiceKind, tokens: u64) -> Vec<Rule> {
        // Keys name the app so several routers can share one store; the user part is last so
        // an email can never make one key look like another scope's (the Redis store's keys of
        // one window all end in a suffix of one length, `redis.rs`, so no email ends like one).
        let user = if user.is_empty() { "-" } else { user };
        // A free request's user is only what its client says (no token proves it), so its
        // windows are apart from the paying user's: free requests naming a paying user would
        // otherwise spend that user's router-wide windows and have their paid requests refused.
        let side = if self.free.contains(&service) {
            ":free"
        } else {
            ""
        };
        let mut rules = Vec::new();
        let scopes = std::iter::once(("*", ROUTER_SCOPE, &self.router)).chain(
            self.services
                .get(&service)
                .map(|l| (service.as_str(), service.as_str(), l)),
        );
        for (key_scope, scope, limits) in scopes {
            let base = format!("{KEY_SPACE}:{}:{key_scope}{side}", self.app);
            // Request and token windows differ only in these: (kind, key tag, word, cost).
            let windows = [
                (RuleKind::Requests, "req", "requests", 1, &limits.requests),
                (RuleKind::Tokens, "tok", "tokens", tokens, &limits.tokens),
            ];
            for (kind, tag, word, cost, rates) in windows {
                for r in rates {
                    rules.push(Rule {
                        key: format!("{base}:{tag}:{}:{user}", r.unit.as_str()),
                        kind,
                        scope,
                        limit: r.count,
                        window: r.unit.window(),
                        cost,
                        describe: format!("{} {word} per {}", r.count, r.unit.as_str()),
                    });
                }
            }
            if let Some(n) = limits.concurrent {
                rules.push(Rule {
                    key: format!("{base}:inflight:{user}"),
                    kind: RuleKind::Concurrency,
                    scope,
                    limit: n,
                    window: self.lease,
                    cost: 1,
                    describe: format!("{n} requests in flight per user"),
                });
            }
        }
        if let Some(n) = self.max_concurrent {
            rules.push(Rule {
                key: format!("{KEY_SPACE}:{}:inflight", self.app),
                kind: RuleKind::RouterConcurrency,
                scope: ROUTER_SCOPE,
                limit: n,
                window: self.lease,
                cost: 1,
                // One key in the store: shared by every replica of this router name on Redis.
                describe: format!("{n} requests in flight on this router"),
            });
        }
        rules
    }

    /// Admits `user`'s request or refuses it with `RESOURCE_EXHAUSTED` (or `UNAVAILABLE` when the
    /// store fails and the mode is `fail_closed`).
    pub async fn admit(
        &self,
        user: &str,
        service: ServiceKind,
        tokens: u64,
    ) -> Result<Pass, RouterError> {
        self.admit_as_work(user, service, tokens, None).await
    }

    /// [`Gate::admit`] counted as in-flight work of the router (`work`, which a graceful shutdown
    /// waits for): the pass keeps it until its release reached the store, and so does the
    /// take-back of a check whose answer was lost. A take-back cut off by the process's exit left
    /// the slot taken for its lease on every replica sharing the store.
    pub(crate) async fn admit_as_work(
        &self,
        user: &str,
        service: ServiceKind,
        tokens: u64,
        work: Option<DrainGuard>,
    ) -> Result<Pass, RouterError> {
        let rules = self.rules(user, service, tokens);
        if rules.is_empty() {
            // No limit applies (a service without limits, and none router-wide): nothing to
            // count, so no store call, which under `fail_closed` refused such requests while
            // Redis was down.
            return Ok(Pass::unlimited());
        }
        let lease = uuid::Uuid::now_v7().to_string();
        let backend = self.limiter.backend();
        let mut unknown = Unknown {
            limiter: Some(&self.limiter),
            lease: &lease,
            rules: &rules,
            work: work.as_ref(),
        };
        let verdict = self.limiter.acquire(window_now_ms(), &lease, &rules).await;
        // Only a check that may have run needs taking back: one that never reached the store
        // (no connection) recorded nothing, and a take-back of it would retry for nothing.
        if !verdict.as_ref().is_err_and(|e| e.maybe_applied) {
            unknown.limiter = None;
        }
        drop(unknown);
        match verdict {
            Ok(Verdict::Admitted(states)) => {
                CHECKS.with_label_values(&[backend, "admitted"]).inc();
                let limiter = self.limiter.clone();
                Ok(Pass::new(
                    limiter,
                    lease,
                    &rules,
                    &states,
                    self.patience,
                    work,
                ))
            }
            Ok(Verdict::Refused {
                rule,
                retry_after,
                awaits_running,
                states,
            }) => {
                CHECKS.with_label_values(&[backend, "refused"]).inc();
                let wait = Wait::of(retry_after, awaits_running);
                Err(refusal(user, &rules, rule, wait, &states))
            }
            Err(e) => self.store_failed(user, e),
        }
    }

    fn store_failed(&self, user: &str, e: LimiterError) -> Result<Pass, RouterError> {
        let backend = self.limiter.backend();
        match self.on_failure {
            OnFailure::FailOpen => {
                CHECKS
                    .with_label_values(&[backend, "store_failed_open"])
                    .inc();
                tracing::warn!(user, error = %e, "rate limiter store failed; admitting (fail_open)");
                Ok(Pass::unlimited())
            }
            OnFailure::FailClosed => {
                CHECKS
                    .with_label_values(&[backend, "store_failed_closed"])
                    .inc();
                tracing::error!(user, error = %e, "rate limiter store failed; refusing (fail_closed)");
                Err(RouterError::Unavailable(
                    "the rate limiter is unavailable; retry shortly".into(),
                ))
            }
        }
    }

    /// What is left of each of `user`'s windows on `service` (nothing is recorded).
    pub async fn remaining(
        &self,
        user: &str,
        service: ServiceKind,
    ) -> Result<Vec<(Rule, WindowState)>, RouterError> {
        let rules = self.rules(user, service, 0);
        let states = self
            .limiter
            .peek(window_now_ms(), &rules)
            .await
            .map_err(|e| RouterError::Unavailable(e.to_string()))?;
        Ok(rules.into_iter().zip(states).collect())
    }

    /// The store (for `bench limits`).
    pub fn limiter(&self) -> Arc<dyn Limiter> {
        self.limiter.clone()
    }
}

/// An admitted request's place in its windows. Settle the tokens once the answer's count is
/// known; dropping the pass frees the in-flight slots (and refunds the tokens if they were never
/// settled: a failed or cancelled request used nothing it pays for).
pub struct Pass {
    limiter: Option<Arc<dyn Limiter>>,
    lease: String,
    /// Request windows: kept unless the request is withdrawn ([`Pass::withdraw`]).
    request_keys: Vec<String>,
    token_keys: Vec<String>,
    /// What the request reserved in its token windows: it is never settled above it.
    reserved_tokens: u64,
    slot_keys: Vec<String>,
    settled: AtomicBool,
    /// What the token windows keep if the pass is dropped unsettled ([`Pass::keep_if_dropped`]).
    kept_if_dropped: AtomicU64,
    /// Set when the request failed by the operator's fault ([`Pass::give_back_requests`]).
    give_back: AtomicBool,
    pub headers: RateHeaders,
    /// Keeps a graceful shutdown waiting until the release of the slots reached the store.
    work: Option<DrainGuard>,
    /// How long a request waits for a change it awaits (the rest goes on in the background).
    patience: Duration,
    /// Keeps the slots while the request runs (`renew.rs`); stopped before the release.
    renewal: Option<Renewal>,
}

impl Pass {
    fn new(
        limiter: Arc<dyn Limiter>,
        lease: String,
        rules: &[Rule],
        states: &[WindowState],
        patience: Duration,
        work: Option<DrainGuard>,
    ) -> Self {
        let keys = |pred: fn(RuleKind) -> bool| {
            rules
                .iter()
                .filter(|r| pred(r.kind) && r.cost > 0)
                .map(|r| r.key.clone())
                .collect::<Vec<_>>()
        };
        let slots = rules
            .iter()
            .filter(|r| r.is_concurrency() && r.cost > 0)
            .map(|r| (r.key.clone(), r.window))
            .collect();
        let renewal = Renewal::start(limiter.clone(), lease.clone(), slots);
        Pass {
            limiter: Some(limiter),
            lease,
            request_keys: keys(|k| k == RuleKind::Requests),
            token_keys: keys(|k| k == RuleKind::Tokens),
            reserved_tokens: rules
                .iter()
                .filter(|r| r.kind == RuleKind::Tokens)
                .map(|r| r.cost)
                .max()
                .unwrap_or(0),
            slot_keys: keys(|k| matches!(k, RuleKind::Concurrency | RuleKind::RouterConcurrency)),
            settled: AtomicBool::new(false),
            kept_if_dropped: AtomicU64::new(0),
            give_back: AtomicBool::new(false),
            headers: RateHeaders::from_states(rules, states),
            work,
            patience,
            renewal,
        }
    }

    /// Counts nothing and releases nothing, and shows `headers` (a request taken back out of its
    /// windows that still answers with what its admission saw).
    pub fn with_headers(headers: RateHeaders) -> Self {
        let mut pass = Pass::unlimited();
        pass.headers = headers;
        pass
    }

    /// Admitted without counting (the store failed and the mode is `fail_open`).
    pub fn unlimited() -> Self {
        Pass {
            limiter: None,
            lease: String::new(),
            request_keys: Vec::new(),
            token_keys: Vec::new(),
            reserved_tokens: 0,
            slot_keys: Vec::new(),
            settled: AtomicBool::new(true),
            kept_if_dropped: AtomicU64::new(0),
            give_back: AtomicBool::new(false),
            headers: RateHeaders::default(),
            work: None,
            patience: Duration::ZERO,
            renewal: None,
        }
    }

    /// Replaces the reserved tokens with the actual count, at most the reservation: an upstream
    /// that counts the prompt above the router's count (another tokenizer, a chat template, a
    /// system prompt of its own) took a window up to 13 times past its limit, since only the
    /// answer is bounded (by `max_tokens`). The window's limit is the user's promise.
    pub async fn settle_tokens(&self, actual: u64) {
        let Some(limiter) = &self.limiter else { return };
        if self.token_keys.is_empty() || self.settled.swap(true, Ordering::SeqCst) {
            return;
        }
        // A request that used no tokens still spent its place in the window: keep at least 1 so
        // the entry is not removed (a cost of 0 means removal).
        let updates: Vec<(String, u64)> = self
            .token_keys
            .iter()
            .map(|k| (k.clone(), actual.min(self.reserved_tokens).max(1)))
            .collect();
        // Spawned, then awaited, as `withdraw` is: marked settled already, a settle lost with a
        // dropped future (a client leaving meanwhile) left the whole reservation (prompt and
        // `max_tokens`) in the window, and `Drop` frees only the slots. It counts as in-flight
        // work of its own, since the request may end before it lands.
        let settle = spawn_settle(
            &tokio::runtime::Handle::current(),
            limiter.clone(),
            self.lease.clone(),
            updates,
            self.work.as_ref().map(DrainGuard::another),
            Change::SettleTokens,
        );
        let _ = tokio::time::timeout(self.patience, settle).await;
    }
}

impl Pass {
    /// The request's places in the request windows go back when it ends (with its slots): it
    /// failed by the operator's fault (its upstream unreachable or failing), and a short outage,
    /// with the SDKs' retries, spent users' daily requests and left them refused after it ended.
    pub fn give_back_requests(&self) {
        self.give_back.store(true, Ordering::SeqCst);
    }

    /// Once the upstream has the prompt: if the request is then dropped unsettled (a unary
    /// request whose client left), its token windows keep `tokens` (at most what it reserved)
    /// rather than giving everything back. 0 again once its upstream call failed.
    /// Streams keep what they were sent the same way (`void_left`); a unary request refunded
    /// all, so a client could send large prompts, leave before each answer, and count nothing.
    pub fn keep_if_dropped(&self, tokens: u64) {
        let tokens = tokens.min(self.reserved_tokens);
        self.kept_if_dropped.store(tokens, Ordering::SeqCst);
    }

    /// Takes the request out of every window, as if it had never been admitted. For a request
    /// the ledger refused because its payment credential does not pay for it: the user's email is
    /// only what the request says, so without this anyone could spend a user's room (and have
    /// their requests refused) by naming them with a made-up token.
    pub async fn withdraw(mut self) {
        self.renewal.take();
        let Some(limiter) = self.limiter.take() else {
            return;
        };
        let keys = [
            &mut self.request_keys,
            &mut self.token_keys,
            &mut self.slot_keys,
        ];
        let updates: Vec<(String, u64)> = keys
            .into_iter()
            .flat_map(|k| k.drain(..))
            .map(|k| (k, 0))
            .collect();
        if updates.is_empty() {
            return;
        }
        // Spawned, then awaited: if this future is dropped meanwhile (the client went away),
        // the release still reaches the store, as `Drop`'s does. Awaited inline, it was lost
        // with the future, and the slots stayed taken for the whole lease.
        let release = spawn_settle(
            &tokio::runtime::Handle::current(),
            limiter,
            std::mem::take(&mut self.lease),
            updates,
            self.work.take(),
            Change::Withdraw,
        );
        let _ = tokio::time::timeout(self.patience, release).await;
    }
}

/// A check whose outcome is unknown (the store did not answer in time, or the request went away
/// while waiting): the script may have run and recorded the request in its windows, and no
/// [`Pass`] will release it. Dropped still armed, it takes the lease out of every window in the
/// background; a lease not recorded (yet) is not found, and on Redis the take-back leaves a
/// tombstone that keeps a check still on its way from recording it (`redis.rs`).
struct Unknown<'a> {
    limiter: Option<&'a Arc<dyn Limiter>>,
    lease: &'a str,
    rules: &'a [Rule],
    /// The request's in-flight work; the take-back holds a unit of its own.
    work: Option<&'a DrainGuard>,
}

impl Drop for Unknown<'_> {
    fn drop(&mut self) {
        let Some(limiter) = self.limiter.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Copied only now: an answered check (nearly all) costs nothing here.
        let updates: Vec<(String, u64)> = (self.rules.iter())
            .filter(|r| r.cost > 0)
            .map(|r| (r.key.clone(), 0))
            .collect();
        spawn_settle(
            &rt,
            limiter.clone(),
            self.lease.to_string(),
            updates,
            self.work.map(DrainGuard::another),
            Change::TakeBack,
        );
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.renewal.take();
        let Some(limiter) = self.limiter.take() else {
            return;
        };
        let mut updates: Vec<(String, u64)> = self.slot_keys.drain(..).map(|k| (k, 0)).collect();
        if *self.give_back.get_mut() {
            updates.extend(self.request_keys.drain(..).map(|k| (k, 0)));
        }
        if !*self.settled.get_mut() {
            let kept = *self.kept_if_dropped.get_mut();
            updates.extend(self.token_keys.drain(..).map(|k| (k, kept)));
        }
        if updates.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        spawn_settle(
            &rt,
            limiter,
            std::mem::take(&mut self.lease),
            updates,
            self.work.take(),
            Change::Release,
        );
    }
}
