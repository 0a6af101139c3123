//! Readiness of the router: `grpc.health.v1.Health`, HTTP `/readyz`, and gRPC server reflection.
//!
//! A router that sells anything needs its ledger, so it is SERVING only while a ledger answers
//! its own health check ([`run_ledger_probe`] asks every endpoint of `--ledger-url` every
//! [`PROBE_INTERVAL`]; one serving endpoint is enough, calls fail over to it) and has accepted the
//! router's secret as the credentials of `owner_email` (checked once the ledger answers, then
//! every [`OWNER_RECHECK`]). A wrong `--ledger-secret`, or a secret of another account than
//! `owner_email`, would otherwise show only at the first paid request (and with the other
//! account, the money would go where the config does not say). The router does not refuse to
//! start on it: the ledger may come up after the router, or the owner's account may be created
//! by a setup job that runs after it; it stays not ready, logs the problem once, and `/readyz`
//! says why. A router whose enabled services are all free only records usage on the ledger
//! (best effort), so it is ready whatever the ledger's state (the owner check is still logged).
//! A router whose limits are counted in Redis with `limiter.on_failure = "fail_closed"` refuses
//! every request while Redis does not answer, so it is not ready then either
//! ([`run_limiter_probe`] pings it every [`PROBE_INTERVAL`], [`LIMITER_MISSES`] unanswered in a
//! row make it unreachable): a load balancer should send its
//! traffic to a replica that can admit it. With `fail_open` it admits unlimited meanwhile and
//! stays ready; `/readyz` still shows the limiter's state.
//! During shutdown it reports NOT_SERVING.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use syft_server::{HealthPublisher, Tasks};
use tokio::sync::watch;

use crate::service::RouterService;

/// The fully-qualified name of the router's gRPC service.
pub const ROUTER_SERVICE: &str = "syft.router.v1.Router";
/// How often the ledger is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe slower than this counts as the ledger being unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a verified owner is checked again (its secret may be rotated or revoked).
pub const OWNER_RECHECK: Duration = Duration::from_secs(60);
/// How often a rejected secret is tried again: each try is a wrong credential the ledger counts
/// against this machine's address (20 per 5 minutes lock it, for every router and client on it),
/// so not every second; a setup job that creates the owner's account is seen within this.
pub const REJECTED_RECHECK: Duration = Duration::from_secs(30);

/// What the last ledger probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerState {
    /// Not probed yet.
    Unknown,
    /// The ledger answered SERVING.
    Serving,
    /// The ledger answered, but NOT_SERVING (its database is down).
    NotServing,
    /// No answer.
    Unreachable,
}

/// What the last probe of the rate limiter's shared store (Redis) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimiterState {
    /// No shared store to probe: no limits, or the in-process limiter.
    Local,
    /// Not probed yet.
    Unknown,
    /// Redis answered.
    Serving,
    /// Redis did not answer in the limiter's timeout.
    Unreachable,
}

/// One ledger endpoint's state, as the last probe found it (`/readyz` lists them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEndpoint {
    pub url: String,
    pub state: LedgerState,
}

/// Whether the ledger accepts the router's secret as the credentials of its `owner_email`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerCheck {
    /// Not checked yet (the ledger has not answered).
    Unchecked,
    /// The secret authenticates as `owner_email`.
    Verified,
    /// The ledger refused the secret (wrong `--ledger-secret`).
    SecretRejected,
    /// No `--ledger-secret` was given, and the ledger wants one.
    NoSecret,
    /// The secret is valid but belongs to another account than `owner_email`.
    NotOwner,
    /// `owner_email` has no account on the ledger (or, hosted, is not its owner).
    OwnerUnknown,
    /// A paid service is priced in another currency than the owner's account (the ledger's).
    CurrencyMismatch,
    /// The config sets spend budgets and the ledger, with hosted accounting, keeps none.
    BudgetsUnsupported,
    /// The ledger refuses this router's address for now: too many wrong credentials came from
    /// it (another router or client on this machine, or behind the same proxy).
    AddressLocked,
}

impl OwnerCheck {
    /// Whether the ledger authenticated the router's secret in giving this verdict (every
    /// verdict but a refused or missing secret, and a lock that refused before looking).
    pub(crate) fn took_the_secret(self) -> bool {
        !matches!(
            self,
            OwnerCheck::Unchecked
                | OwnerCheck::SecretRejected
                | OwnerCheck::NoSecret
                | OwnerCheck::AddressLocked
        )
    }

    /// Whether the ledger refuses the router's own credentials (a wrong or missing secret).
    pub(crate) fn refuses_credentials(self) -> bool {
        matches!(self, OwnerCheck::SecretRejected | OwnerCheck::NoSecret)
    }

    /// What an operator should read, for the log and `/readyz`.
    pub fn problem(self, owner_email: &str) -> Option<String> {
        match self {
            OwnerCheck::Unchecked | OwnerCheck::Verified => None,
            OwnerCheck::SecretRejected => Some(format!(
                "the ledger rejected the router's secret: check --ledger-secret \
                 (SYFT_ROUTER_LEDGER_SECRET or --ledger-secret-file), and that owner_email \
                 {owner_email} has an account with that secret (syft-router account create \
                 {owner_email}); checked again every {} s",
                REJECTED_RECHECK.as_secs()
            )),
            OwnerCheck::NoSecret => Some(format!(
                "the router has no ledger secret: give {owner_email}'s account secret with \
                 --ledger-secret (SYFT_ROUTER_LEDGER_SECRET or --ledger-secret-file)"
            )),
            OwnerCheck::NotOwner => Some(format!(
                "the router's ledger secret belongs to another account than owner_email \
                 {owner_email}: set owner_email to that account, or give {owner_email}'s secret"
            )),
            OwnerCheck::CurrencyMismatch => Some(format!(
                "a paid service is priced in another currency than owner_email {owner_email}'s \
                 account: the ledger would hold and charge that many of the account's units; set \
                 pricing.currency to the account's currency"
            )),
            OwnerCheck::BudgetsUnsupported => Some(
                "the config sets spend budgets ([budgets]), which need a ledger with local \
                 accounting; this ledger uses hosted accounting and refuses every hold that \
                 carries them: remove [budgets] or use a local ledger"
                    .into(),
            ),
            OwnerCheck::AddressLocked => Some(
                "the ledger refuses this router's address for now: too many wrong credentials \
                 came from it (another router or client on this machine with a wrong secret?); \
                 paid requests fail until the lock ends (docs/ledger.md, \"Failed \
                 authentications\")"
                    .into(),
            ),
            OwnerCheck::OwnerUnknown => Some(format!(
                "owner_email {owner_email} has no account on the ledger: create it \
                 (syft-router account create {owner_email}) or fix owner_email"
            )),
        }
    }
}

/// The router's readiness, as shown by `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// The best state of any ledger endpoint: serving while at least one serves.
    pub ledger: LedgerState,
    /// Each endpoint's state (`--ledger-url` may list several).
    pub ledgers: Vec<LedgerEndpoint>,
    /// Whether readiness depends on the ledger (some enabled service is paid).
    pub ledger_required: bool,
    /// Whether the router's secret authenticates as its owner.
    pub owner: OwnerCheck,
    /// The rate limiter's shared store (Redis), as the last probe found it.
    pub limiter: LimiterState,
    /// Whether readiness depends on the limiter's store (`on_failure = "fail_closed"`: every
    /// request is refused while it does not answer).
    pub limiter_required: bool,
    pub shutting_down: bool,
    /// Why the router is not ready, in words; absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip)]
    owner_email: String,
}

impl Readiness {
    /// `shared_limiter`: the limits are counted in a shared store (`Some(required)`: whether
    /// the router refuses every request while it does not answer).
    pub(crate) fn starting(
        ledger_required: bool,
        owner_email: &str,
        shared_limiter: Option<bool>,
    ) -> Self {
        let mut r = Readiness {
            ready: false,
            ledger: LedgerState::Unknown,
            ledgers: Vec::new(),
            ledger_required,
            owner: OwnerCheck::Unchecked,
            limiter: match shared_limiter {
                Some(_) => LimiterState::Unknown,
                None => LimiterState::Local,
            },
            limiter_required: shared_limiter.unwrap_or(false),
            shutting_down: false,
            reason: None,
            owner_email: owner_email.to_string(),
        };
        r.recompute();
        r
    }

    fn with_owner(&self, owner: OwnerCheck) -> Self {
        let mut next = self.clone();
        next.owner = owner;
        next.recompute();
        next
    }

    fn with_ledger(&self, ledger: LedgerState, ledgers: Vec<LedgerEndpoint>) -> Self {
        let mut next = self.clone();
        next.ledger = ledger;
        next.ledgers = ledgers;
        next.recompute();
        next
    }

    fn with_limiter(&self, limiter: LimiterState) -> Self {
        let mut next = self.clone();
        next.limiter = limiter;
        next.recompute();
        next
    }

    fn recompute(&mut self) {
        self.reason = if self.shutting_down {
            Some("shutting down".into())
        } else if self.limiter_required && self.limiter != LimiterState::Serving {
            Some(match self.limiter {
                LimiterState::Unknown => "the rate limiter's Redis has not been probed yet".into(),
                _ => "the rate limiter's Redis does not answer (limiter.on_failure = \
                      \"fail_closed\" refuses every request meanwhile)"
                    .into(),
            })
        } else if !self.ledger_required {
            // Free services answer whatever the ledger's state (their rows are best effort), but
            // not while the ledger refuses the router's credentials: then no row can ever be
            // recorded, and only readiness tells the operator (a first-hour reviewer's finding).
            match self.owner.refuses_credentials() {
                true => self.owner.problem(&self.owner_email),
                false => None,
            }
        } else {
            match self.ledger {
                LedgerState::Unknown => Some("the ledger has not been probed yet".into()),
                LedgerState::NotServing => Some("no ledger is serving".into()),
                LedgerState::Unreachable => Some("no ledger is reachable".into()),
                LedgerState::Serving => match self.owner {
                    OwnerCheck::Unchecked => {
                        Some("the router's ledger credentials are not checked yet".into())
                    }
                    other => other.problem(&self.owner_email),
                },
            }
        };
        self.ready = self.reason.is_none();
    }
}

/// Starts the ledger probe and the gRPC health publisher of `service`; they stop when the
/// returned tasks are dropped.
pub(crate) fn spawn(service: &RouterService, publisher: HealthPublisher) -> Tasks {
    let mut tasks = Tasks::default();
    tasks.spawn(run_ledger_probe(service.clone(), PROBE_INTERVAL));
    if service.readiness().limiter != LimiterState::Local {
        tasks.spawn(run_limiter_probe(service.clone(), PROBE_INTERVAL));
    }
    tasks.spawn(run_reporter(service.watch_readiness(), publisher));
    tasks
}

/// Follows `service`'s readiness into the gRPC health service, forever.
pub(crate) async fn run_reporter(mut ready: watch::Receiver<Readiness>, reporter: HealthPublisher) {
    loop {
        let (serving, stopping) = {
            let now = ready.borrow_and_update();
            (now.ready, now.shutting_down)
        };
        reporter.publish(serving).await;
        if stopping {
            reporter.end_watches();
        }
        if ready.changed().await.is_err() {
            return;
        }
    }
}

/// Probes the ledger every `every` and updates `service`'s readiness, forever; checks the
/// router's credentials while the ledger serves and they are not verified, every
/// [`OWNER_RECHECK`] once they are, and every [`REJECTED_RECHECK`] while they are rejected.
pub(crate) async fn run_ledger_probe(service: RouterService, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last verdict and when it was given: a verified owner is checked again every
    // `OWNER_RECHECK`, a rejected secret every `REJECTED_RECHECK`, anything else every tick.
    let mut last: Option<(OwnerCheck, tokio::time::Instant)> = None;
    loop {
        tick.tick().await;
        let (state, endpoints) = service.probe_ledgers(PROBE_TIMEOUT).await;
        // The ledger's state first: an owner verdict below is never shown beside a ledger not
        // yet probed (a reader between the two saw `secret_rejected` with `ledger: unknown`).
        service.update_readiness(|r| {
            for e in &endpoints {
                let before = r.ledgers.iter().find(|b| b.url == e.url).map(|b| b.state);
                if before.is_some_and(|b| b != e.state) {
                    tracing::info!(ledger = %e.url, state = ?e.state, "ledger endpoint changed state");
                }
            }
            let next = r.with_ledger(state, endpoints);
            if next.ledger != r.ledger {
                match state {
                    LedgerState::Serving => tracing::info!(ready = next.ready, "ledger reachable"),
                    other => {
                        tracing::warn!(ledger = ?other, ready = next.ready, "ledger not serving")
                    }
                }
            }
            next
        });
        // A request's call was refused for the secret since the last check: readiness says so at
        // once (requests are refused locally meanwhile), and the check below asks now, to
        // confirm it or to clear it. While unanswered, it asks again at every tick.
        if service.credential_refused() && last.is_none_or(|(owner, _)| owner.took_the_secret()) {
            update_owner(&service, OwnerCheck::SecretRejected);
            last = None;
        }
        let due = match last {
            Some((OwnerCheck::Verified, at)) => at.elapsed() >= OWNER_RECHECK,
            // A missing secret cannot appear without a restart: asked again as rarely.
            Some((OwnerCheck::SecretRejected | OwnerCheck::NoSecret, at)) => {
                at.elapsed() >= REJECTED_RECHECK
            }
            _ => true,
        };
        if state == LedgerState::Serving && due {
            let asked = tokio::time::Instant::now();
            match service.check_owner(PROBE_TIMEOUT).await {
                Some(owner) => {
                    last = Some((owner, asked));
                    update_owner(&service, owner);
                }
                // No answer this time: the previous verdict stands. A rejected secret's next
                // try still waits from this one (the ledger may have counted it).
                None => {
                    if let Some((OwnerCheck::SecretRejected, at)) = &mut last {
                        *at = asked;
                    }
                }
            }
        }
    }
}

/// Pings in a row that must go unanswered before the limiter's Redis counts as unreachable: one
/// slow answer (a fork for a snapshot, a short pause) should not take every replica sharing it
/// out of the load balancer at once. One answer counts it as serving again.
pub const LIMITER_MISSES: u32 = 3;

/// Pings the rate limiter's Redis every `every` (each ping bounded by `limiter.timeout`) and
/// updates `service`'s readiness, forever; logs each change.
pub(crate) async fn run_limiter_probe(service: RouterService, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut misses = 0u32;
    loop {
        tick.tick().await;
        let state = match service.ping_limiter().await {
            Ok(()) => {
                misses = 0;
                LimiterState::Serving
            }
            Err(e) => {
                tracing::debug!(error = %e.message, "the limiter's Redis did not answer a ping");
                misses = misses.saturating_add(1);
                if misses < LIMITER_MISSES {
                    continue;
                }
                LimiterState::Unreachable
            }
        };
        service.update_readiness(|r| {
            let next = r.with_limiter(state);
            if next.limiter != r.limiter {
                match state {
                    LimiterState::Serving => {
                        tracing::info!(ready = next.ready, "the rate limiter's Redis answers")
                    }
                    _ if r.limiter_required => tracing::error!(
                        ready = next.ready,
                        "the rate limiter's Redis does not answer: every request is refused \
                         (limiter.on_failure = \"fail_closed\") until it does"
                    ),
                    _ => tracing::warn!(
                        ready = next.ready,
                        "the rate limiter's Redis does not answer: requests are admitted \
                         unlimited (limiter.on_failure = \"fail_open\") until it does"
                    ),
                }
            }
            next
        });
    }
}

/// Records a verdict on the router's credentials, logging it when it changes.
fn update_owner(service: &RouterService, owner: OwnerCheck) {
    let email = service.config().owner_email.clone();
    service.update_readiness(|r| {
        let next = r.with_owner(owner);
        if next.owner != r.owner {
            match owner.problem(&email) {
                None => tracing::info!(owner = %email, "the ledger accepts the router's secret as its owner's"),
                Some(problem) if r.ledger_required => tracing::error!(
                    owner = %email,
                    "{problem}; the router stays not ready (paid requests would fail) until this is fixed"
                ),
                Some(problem) if owner.refuses_credentials() => tracing::error!(
                    owner = %email,
                    "{problem}; the router stays not ready (no usage row can be recorded) until this is fixed"
                ),
                Some(problem) => tracing::warn!(
                    owner = %email,
                    "{problem}; usage rows of this free router cannot be recorded"
                ),
            }
        }
        next
    });
}

/// Marks the router as shutting down (NOT_SERVING from now on).
pub(crate) fn mark_shutting_down(service: &RouterService) {
    service.update_readiness(|r| {
        let mut next = r.clone();
        next.shutting_down = true;
        next.recompute();
        next
    });
}

/// Shared readiness cell of a [`RouterService`].
pub(crate) type ReadinessCell = Arc<watch::Sender<Readiness>>;
