//! The money steps every service shares, whatever it sells (chat or search): pick the service and
//! its price, refuse unpaid requests to paid services, claim the request id, hold the price on
//! the ledger; afterwards capture the cost (with the usage row) or void the hold. A service's
//! own flow only describes its request as a [`Ticket`] and says, at the end, what it cost.

use std::time::{Duration, Instant};

use syft_error::{Reason, UsageStatus, MAX_USAGE_COUNT};
use syft_proto::ledger::{AnswerToStore, AuthorizeRequest, Transfer, TransferStatus, Usage};

use super::attempts;
use super::hold::{self, Claim, HoldGuard};
use super::refusal::{explain_refusal, refusal_status, Attempt};
use super::{elapsed_ms, RouterService};
use crate::config::{describe_price, Pricing, ServiceKind, TokenBound};
use crate::error::RouterError;
use crate::limits::{Pass, RateHeaders};

/// What admission needs to know of a request, for any service.
pub(super) struct Ticket {
    pub kind: ServiceKind,
    pub request_id: String,
    pub user_email: String,
    pub transaction_token: String,
    pub pricing: Pricing,
    /// The most the request can cost.
    pub hold_micros: i64,
    /// What sized a per-token hold (explains an insufficient-funds refusal).
    pub bound: Option<TokenBound>,
    /// The usage rows' `model`: the chat model, or the search backend.
    pub model: String,
    /// The request's place in the rate-limit windows, once admitted (frees its in-flight slots
    /// when the request ends; `None` when no limit is configured).
    pub pass: Option<Pass>,
    /// When the request was validated: a `cancelled` row recorded when the request is dropped
    /// counts its latency from here.
    pub started: tokio::time::Instant,
    /// A free request's attempt, once admitted: the key of its row, which the ledger records once
    /// (its own row and the `cancelled` one its claim keeps for a client that leaves share it),
    /// while a retry of its id after a failure is another attempt and leaves its own row
    /// (migration 0039). Empty for a paid request, whose row its transfer makes one.
    pub free_row_key: String,
}

/// Counts of a usage row: tokens for chat; for search, the query's tokens and the results.
#[derive(Clone, Copy, Default)]
pub(super) struct Units {
    pub input: u64,
    pub output: u64,
}

/// The request an admission runs for, as its task sees it: the request holds the other end while
/// it waits ([`RouterService::admit_detached`]), so the end closes when the request is dropped.
pub(super) struct Presence(tokio::sync::watch::Sender<()>);

impl Presence {
    /// The request's future was dropped: its client left, or its deadline passed.
    pub(super) fn gone(&self) -> bool {
        self.0.is_closed()
    }

    /// Resolves once the request is gone.
    pub(super) async fn left(&self) {
        self.0.closed().await;
    }

    /// Refuses a request whose client left before it was admitted, so that it takes no id claim,
    /// no room in the windows and no hold (its row: `abandoned`).
    fn still_wanted(&self) -> Result<(), RouterError> {
        if self.gone() {
            return Err(RouterError::Cancelled(
                "the client left before the request was admitted".into(),
            ));
        }
        Ok(())
    }
}

impl RouterService {
    /// Runs a request's admission (validation, limits, the hold) and the recording of its
    /// refusal so that the request's leaving does not cancel it: in the request's own task while
    /// it waits, finished in a task of its own if the request is dropped first
    /// ([`hold::Unfinished`]). A request can be dropped at any of admission's waits (a long
    /// prompt tokenized, the Redis limiter, the ledger deciding a hold); its admission still
    /// ends, and leaves its row: a refusal's own (`abandoned` when it stopped because its client
    /// left, `Presence::still_wanted`), or, once its result is dropped unread, a free request's
    /// `cancelled` row (its claim's) or a voided hold's (its guard's). Before, such a request left
    /// no row. The admission counts as work in flight for a graceful shutdown, so its row is
    /// written before the process ends.
    pub(super) async fn admit_detached<T, F>(
        &self,
        attempt: Attempt,
        admission: impl FnOnce(RouterService, Presence) -> F,
    ) -> Result<T, RouterError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, RouterError>> + Send + 'static,
    {
        let (presence, waiting) = tokio::sync::watch::channel(());
        let run = admission(self.clone(), Presence(presence));
        let svc = self.clone();
        let admission = async move {
            let result = run.await;
            if let Err(e) = &result {
                svc.record_refusal(attempt.naming_for(e), refusal_status(e))
                    .await;
            }
            result
        };
        let work = self.inner.drain.enter();
        hold::Unfinished::new(admission, waiting, work).await
    }
}

impl RouterService {
    /// The enabled service of that kind and its price; a paid one needs a token and a payer.
    pub(super) fn price_for(
        &self,
        kind: ServiceKind,
        user_email: &str,
        transaction_token: &str,
    ) -> Result<Pricing, RouterError> {
        let config = &self.inner.config;
        let service = match config.service(kind) {
            Some(s) if s.enabled => s,
            _ => return Err(disabled(kind)),
        };
        let pricing = service.pricing.clone();
        if !pricing.kind.is_free() {
            if transaction_token.is_empty() {
                return Err(RouterError::PaymentRequired(format!(
                    "this service costs {}; send a transaction token issued to {}",
                    describe_price(&pricing),
                    config.owner_email
                )));
            }
            if let Some(why) = crate::validate::malformed_token(transaction_token) {
                // Refused here, before the rate limits: the ledger refuses such a token as an
                // invalid argument before it looks the token up, so the request would have
                // proved nothing about the user it names yet spent that user's windows.
                return Err(RouterError::ForeignToken(format!(
                    "the transaction token is not one the ledger issues ({why})"
                )));
            }
            if user_email.is_empty() {
                return Err(RouterError::InvalidArgument(
                    "the payer's email is required for paid requests (`user` in the OpenAI API, `user_email` over gRPC and in /chat and /search)".into(),
                ));
            }
        }
        Ok(pricing)
    }

    /// Claims the request id (held until the returned claim is dropped), takes the request's
    /// place in the rate-limit windows (`reserve_tokens` in the token windows; `limit.rs`), and
    /// places the hold when the service is paid (the ledger decides the spend budgets there).
    /// The limits run after the claim, so a concurrent duplicate never spends a window's room.
    pub(super) async fn admit_ticket(
        &self,
        t: &mut Ticket,
        reserve_tokens: u64,
        presence: &Presence,
    ) -> Result<(Claim, Authorized), RouterError> {
        tracing::Span::current().record("request_id", t.request_id.as_str());
        presence.still_wanted()?;
        let mut claim = self.claim(t)?;
        t.pass = self.pass_gate(t, reserve_tokens).await?;
        let authorized = match self.authorize(t, presence).await {
            Ok(authorized) => authorized,
            Err(e) => {
                let e = with_window_headers(e, t);
                // Refused for its token (unknown, revoked, expired, not this user's, over its
                // limit): the request may not be the named user's, so it spends none of their
                // windows (docs/limits.md). Nor does one the ledger found invalid (say, a hold
                // over its largest amount): it checks a request before the token, so such a
                // refusal proves no user either, and nothing was held or called. Nor one whose client left before it was
                // admitted (`abandoned`), nor one refused while the ledger is down or refuses this
                // router: it called no upstream and held nothing, and an outage of the
                // operator's should not leave users rate limited once it ends. (Other
                // `UNAVAILABLE`s, a busy or throttled ledger that is up, keep their place: a
                // user should not be able to bypass the windows by keeping the ledger busy.)
                let outage = matches!(e, RouterError::Unavailable(_)) && self.ledger_is_out();
                if outage
                    || matches!(
                        e,
                        RouterError::PermissionDenied(_)
                            | RouterError::InvalidArgument(_)
                            | RouterError::ForeignToken(_)
                            | RouterError::TokenSpendLimit(_)
                            | RouterError::TokenEnded { .. }
                            | RouterError::Cancelled(_)
                    )
                {
                    if let Some(pass) = t.pass.take() {
                        pass.withdraw().await;
                    }
                }
                return Err(e);
            }
        };
        match &authorized {
            Authorized::Hold(h) => {
                tracing::Span::current().record("transfer_id", h.transfer_id.as_str());
            }
            Authorized::Resolved(transfer) => {
                tracing::Span::current().record("transfer_id", transfer.id.as_str());
                // A retry of a resolved request is answered from the ledger (its stored answer,
                // or the refusal saying it was charged): no upstream call and no charge, so it
                // spends none of the windows (it used to spend a request's room each time). Its
                // headers stay those of its admission.
                if let Some(pass) = t.pass.take() {
                    let headers = pass.headers.clone();
                    pass.withdraw().await;
                    t.pass = Some(Pass::with_headers(headers));
                }
            }
            Authorized::Free => {
                t.free_row_key = uuid::Uuid::now_v7().to_string();
                let usage = Units::default();
                let cancelled = self.usage(t, UsageStatus::Cancelled, usage, Instant::now(), 0);
                claim.unrecorded = Some(cancelled);
            }
        }
        Ok((claim, authorized))
    }

    /// Marks the user's request id in flight in this process, so a concurrent duplicate is
    /// refused instead of calling the upstream twice. (Across replicas the ledger's idempotency
    /// still guarantees a single charge.) Request ids are scoped per user, like the ledger's
    /// idempotency keys: two users who send the same id do not collide.
    fn claim(&self, t: &Ticket) -> Result<Claim, RouterError> {
        let (user_email, request_id) = (&t.user_email, &t.request_id);
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
            return Err(RouterError::InProgress(format!(
                "request {request_id} is already in progress; retry once it is over"
            )));
        }
        Ok(Claim {
            inner: self.inner.clone(),
            key,
            _work: self.inner.drain.enter(),
            unrecorded: None,
            admitted: t.started,
        })
    }

    async fn authorize(&self, t: &Ticket, presence: &Presence) -> Result<Authorized, RouterError> {
        // Past the rate limits, whose answer it may have waited for.
        presence.still_wanted()?;
        if t.pricing.kind.is_free() {
            return Ok(Authorized::Free);
        }
        // The id's tries in order: each earlier one is found resolved (or waited for), and an
        // uncharged one hands on to the next (`attempts.rs`).
        for attempt in 1..=attempts::MAX_ATTEMPTS {
            let key = attempts::attempt_key(&t.request_id, attempt);
            let (mut transfer, guard) = self
                .place_hold(t, key, presence)
                .await
                .map_err(|e| explain_refusal(t, e))?;
            if let Some(guard) = guard {
                tracing::debug!(request_id = %t.request_id, transfer_id = %guard.transfer_id, hold_micros = t.hold_micros, attempt, "hold authorized");
                return Ok(Authorized::Hold(guard));
            }
            if transfer.status() == TransferStatus::Pending {
                // Another router (or an earlier attempt) holds this key and may be calling its
                // upstream right now: wait for its outcome rather than call ours a second time.
                transfer = self.outcome_of(t, transfer, presence).await?;
            }
            if !attempts::uncharged(&transfer) {
                return Ok(Authorized::Resolved(Box::new(transfer)));
            }
            tracing::info!(request_id = %t.request_id, transfer_id = %transfer.id, attempt,
                "an earlier try of this request id charged nothing; trying it again");
            presence.still_wanted()?;
        }
        Err(RouterError::Processed {
            reason: Reason::RequestProcessed,
            message: format!(
                "request {} was tried {} times without a charge; use a new request id to send \
                 it again",
                t.request_id,
                attempts::MAX_ATTEMPTS
            ),
        })
    }

    /// Asks the ledger for the request's hold: the key's transfer, with a guard when this call
    /// placed it. The ledger commits a hold whether or not the request still waits for it (its
    /// batcher writes holds, not this call); the admission runs in a task the request's leaving
    /// does not cancel ([`RouterService::admit_detached`]), so the guard is armed as soon as the
    /// hold exists, and dropped with the admission's result if the request is gone: it then voids
    /// the hold at once, with a `cancelled` row.
    async fn place_hold(
        &self,
        t: &Ticket,
        key: String,
        presence: &Presence,
    ) -> Result<(Transfer, Option<HoldGuard>), RouterError> {
        self.refused_locally()?;
        let inner = &self.inner;
        let sent = tokio::time::Instant::now();
        let request = AuthorizeRequest {
            sender_email: t.user_email.clone(),
            amount_micros: t.hold_micros,
            token: t.transaction_token.clone(),
            app_name: inner.config.name.clone(),
            app_ep_path: t.kind.endpoint().into(),
            idempotency_key: key,
            hold_ttl_seconds: inner.ledger.hold_ttl_seconds(),
            budget_per_day_micros: inner.config.budgets.per_day_micros,
            budget_per_month_micros: inner.config.budgets.per_month_micros,
            // This request's own: its hold is told from one another attempt placed under the key
            // (a retry of it, another router's duplicate) by it, not by timing.
            attempt_id: uuid::Uuid::now_v7().to_string(),
        };
        let cancel_usage = self.usage(
            t,
            UsageStatus::Cancelled,
            Units::default(),
            Instant::now(),
            0,
        );
        let (ledger, work) = (&inner.ledger, inner.drain.enter());
        // An attempt whose outcome is unknown is asked again (`Ledger::authorize`) for a while,
        // never past the life of the hold it may have placed, and not once the request is gone.
        let ttl = (ledger.hold_ttl_seconds())
            .and_then(|s| u64::try_from(s).ok())
            .map_or(hold::LEDGER_DEFAULT_TTL, Duration::from_secs);
        let settle_until = sent + ttl.min(hold::AUTHORIZE_SETTLE_LIMIT);
        let authorization = ledger.authorize(request, settle_until, &presence.0).await?;
        let transfer = authorization.transfer;
        if !authorization.existing && transfer.status() == TransferStatus::Cancelled {
            // This request's own hold, cancelled before it was told of it: the ledger could not
            // confirm it and closed it (a hosted ledger whose service answered the create too
            // late; a hold that expired while its outcome was asked again). Nothing was charged
            // and the id's transfer is settled: said as the ledger trouble it is (a retry of the
            // id is tried again under its next key, `attempts.rs`), not as an earlier request's.
            return Err(RouterError::Unavailable(format!(
                "the ledger could not place the hold (transfer {} is cancelled, not charged); \
                 send the request again",
                transfer.id
            )));
        }
        let fresh = transfer.status() == TransferStatus::Pending && !authorization.existing;
        let priced_in = &t.pricing.currency;
        if fresh && !transfer.currency.is_empty() && transfer.currency != *priced_in {
            // Priced in one currency, held in another: the same number of the ledger's units
            // (150 JPY held as 150 USD). Never sell so; readiness says why (health.rs). Voided
            // without a row: the refusal's own row is the request's one (`record_refusal`).
            let problem = format!(
                "priced in {priced_in} but the ledger holds {}: fix pricing.currency",
                transfer.currency
            );
            tracing::error!("{problem}");
            let until = hold::expiry_estimate(sent, &transfer) + hold::SETTLE_MARGIN;
            if let Err(e) = ledger.void(&transfer.id, &problem, None, until).await {
                tracing::warn!(transfer_id = %transfer.id, error = %e, "void failed; the hold will expire");
            }
            return Err(RouterError::Unavailable(
                "the router's prices do not match its ledger's currency".into(),
            ));
        }
        let guard = fresh.then(|| HoldGuard {
            work: Some(work),
            ledger: ledger.clone(),
            expires_at: hold::expiry_estimate(sent, &transfer),
            ttl: hold::hold_ttl(
                transfer.created_at_unix_micros,
                transfer.expires_at_unix_micros,
            ),
            slowest_call: sent.elapsed(),
            transfer_id: transfer.id.clone(),
            cancel_usage: Some(cancel_usage),
            void_reason: None,
            admitted: t.started,
        });
        Ok((transfer, guard))
    }

    /// Waits until another request's pending hold on this key is resolved (polling the
    /// transfer), and returns it resolved: captured (its stored answer is then replayed) or
    /// voided/expired (refused as already processed, not charged). Bounded by the hold's expiry:
    /// past it the ledger reports the hold expired whenever it is asked.
    ///
    /// A request that leaves meanwhile stops waiting (its row: `abandoned`, a refusal's, which
    /// does not take the request id). Its admission holds its id's in-flight claim while it
    /// waits, and a retry must not find the id taken until the original's outcome.
    async fn outcome_of(
        &self,
        t: &Ticket,
        pending: Transfer,
        presence: &Presence,
    ) -> Result<Transfer, RouterError> {
        tracing::info!(request_id = %t.request_id, transfer_id = %pending.id,
            "duplicate of a request in progress elsewhere; waiting for its outcome");
        let mut give_up = hold::wait_bound(&pending);
        let mut delay = std::time::Duration::from_millis(25);
        loop {
            // At shutdown's end this request holds nothing to void: it stops waiting (it kept
            // the router's drain open until the settle limit, which then logged it as unsettled).
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.inner.drain.aborted() => {
                    return Err(RouterError::Unavailable(
                        "the router is shutting down; retry".into(),
                    ));
                }
                () = presence.left() => {
                    return Err(RouterError::Cancelled(format!(
                        "the client of request {} left while its duplicate was in progress",
                        t.request_id
                    )));
                }
            }
            delay = (delay * 2).min(std::time::Duration::from_millis(500));
            match self.inner.ledger.transfer(&pending.id).await {
                Ok(tr) if tr.status() != TransferStatus::Pending => return Ok(tr),
                Ok(tr) => give_up = give_up.max(hold::wait_bound(&tr)),
                Err(RouterError::Unavailable(e)) => {
                    tracing::debug!(transfer_id = %pending.id, error = %e, "outcome not readable yet");
                }
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(RouterError::Unavailable(format!(
                    "request {} is still in progress elsewhere; retry",
                    t.request_id
                )));
            }
        }
    }

    /// Success: capture the cost, storing `answer` for replay when given (or record the usage
    /// row for a free request). `Ok` (the transfer id, empty for free requests) only once the
    /// capture is known to have committed.
    pub(super) async fn settle(
        &self,
        t: &Ticket,
        hold: Option<HoldGuard>,
        cost: i64,
        usage: Usage,
        answer: Option<AnswerToStore>,
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
        let result = hold.capture(cost, usage, answer).await;
        match &result {
            Ok(_) => tracing::info!(
                request_id = %t.request_id, transfer_id = %transfer_id, cost_micros = cost,
                user = %t.user_email, model = %t.model, service = t.kind.as_str(), "captured"
            ),
            Err(e) => tracing::error!(
                request_id = %t.request_id, transfer_id = %transfer_id, error = %e,
                "capture failed; the answer is withheld"
            ),
        }
        let refused = match result {
            Ok(_) => return Ok(transfer_id),
            Err(e @ RouterError::FailedPrecondition { .. }) => e,
            Err(e) => return Err(e),
        };
        // Refused for good (the hold expired or was resolved meanwhile: a ledger away past its
        // expiry). When the transfer is cancelled (the guard's void, or the sweep), nothing was
        // charged: said as the outage it is, which sending the request again overcomes (its id
        // too, `attempts.rs`), not as a 409 about the user's state, which the SDKs do not retry.
        // So is a hold refused as expired and still pending (its sweep not yet run: the
        // database that kept the capture out keeps the sweep out too): the ledger never
        // captures a hold past its expiry, so it can only end cancelled. (It was a 409
        // `hold_expired` typed `insufficient_quota`, which SDKs read as out of credit.)
        // Anything else (a hosted recovery that found the remote hold confirmed) keeps the
        // ledger's refusal: "nothing was charged" would be untrue.
        let expired = matches!(&refused, RouterError::FailedPrecondition { reason, .. }
            if *reason == Reason::HoldExpired.as_str());
        match self.inner.ledger.transfer(&transfer_id).await {
            Ok(t)
                if t.status() == TransferStatus::Cancelled
                    || (expired && t.status() == TransferStatus::Pending) =>
            {
                Err(RouterError::Unavailable(format!(
                    "the answer could not be charged ({}), and nothing was charged; send the \
                     request again",
                    refused.public_message()
                )))
            }
            _ => Err(refused),
        }
    }

    /// No charge: void the hold (or record the free request's row).
    pub(super) async fn release(&self, hold: Option<HoldGuard>, reason: &str, usage: Usage) {
        match hold {
            Some(h) => h.void(reason, usage).await,
            None => self.record_free_usage(usage).await,
        }
    }

    async fn record_free_usage(&self, usage: Usage) {
        let request_id = usage.request_id.clone();
        if self.ledger_refuses_us() && !self.inner.ledger.has_spool() {
            // Refused anyway, and each wrong secret sent counts against this machine's address.
            // (A spool keeps the row; its shipper waits while the ledger refuses the router.)
            crate::metrics::row_unconfirmed(crate::metrics::UnconfirmedRow::Free);
            tracing::warn!(request_id = %request_id, "usage row not recorded: the ledger does not accept this router now");
            return;
        }
        if let Err(e) = self.inner.ledger.record_free_usage(usage).await {
            // Free answers do not depend on the ledger being up.
            // With a spool, its own events count a row it could not keep.
            if !self.inner.ledger.has_spool() {
                crate::metrics::row_unconfirmed(crate::metrics::UnconfirmedRow::Free);
            }
            tracing::warn!(request_id = %request_id, error = %e, "usage row not confirmed by the ledger: lost unless it committed late");
        }
    }

    /// The request's usage row.
    pub(super) fn usage(
        &self,
        t: &Ticket,
        status: UsageStatus,
        units: Units,
        started: Instant,
        upstream_ms: i64,
    ) -> Usage {
        // Counts come from the upstream; the ledger refuses a row above its maximum, and a
        // refused capture or void would leave the hold pending, so clamp rather than fail.
        let count = |n: u64| i64::try_from(n).map_or(MAX_USAGE_COUNT, |n| n.min(MAX_USAGE_COUNT));
        let (input, output) = (count(units.input), count(units.output));
        Usage {
            request_id: t.request_id.clone(),
            app_name: self.inner.config.name.clone(),
            endpoint: t.kind.endpoint().into(),
            user_email: t.user_email.clone(),
            model: t.model.clone(),
            prompt_tokens: input,
            completion_tokens: output,
            total_tokens: input.saturating_add(output).min(MAX_USAGE_COUNT),
            status: status.as_str().into(),
            latency_ms: elapsed_ms(started),
            upstream_latency_ms: upstream_ms,
            // Streams set it once the first token arrived.
            ttft_ms: None,
            row_key: match status.is_refusal() {
                true => row_key(status),
                false => t.free_row_key.clone(),
            },
            // A free row's is set when it is recorded (`Ledger::record_free_usage`).
            answered_at_unix_micros: None,
            reason: String::new(),
        }
    }
}

/// The key a refusal's usage row is recorded once under (it does not take its request id, so a
/// call that fails over after its commit would record it twice); none for the others: a paid
/// row's transfer makes it one, a free row carries its attempt's ([`Ticket::free_row_key`]).
pub(super) fn row_key(status: UsageStatus) -> String {
    if status.is_refusal() {
        uuid::Uuid::now_v7().to_string()
    } else {
        String::new()
    }
}

/// The outcome of the hold step.
#[allow(clippy::large_enum_variant)]
pub(super) enum Authorized {
    /// A free service: no hold.
    Free,
    Hold(HoldGuard),
    /// The request id's transfer is already resolved (a retry).
    Resolved(Box<Transfer>),
}

/// The refusal of a retry whose transfer is already resolved (`detail` says why no stored answer
/// is replayed), saying whether the user was charged.
pub(super) fn already_processed(
    request_id: &str,
    transfer: &Transfer,
    detail: &str,
) -> RouterError {
    let state = match transfer.status() {
        TransferStatus::Completed => "completed (already charged)",
        TransferStatus::Cancelled => "cancelled (not charged)",
        _ => "resolved",
    };
    RouterError::Processed {
        reason: Reason::RequestProcessed,
        message: format!(
            "request {request_id} was already processed: transfer {} is {state}{detail}; use a \
             new request id to send a new request",
            transfer.id
        ),
    }
}

/// The refusal of a service that is not listed or not enabled.
pub(super) fn disabled(kind: ServiceKind) -> RouterError {
    RouterError::FailedPrecondition {
        reason: Reason::ServiceDisabled.as_str(),
        message: format!(
            "the {} service is not enabled on this router",
            kind.as_str()
        ),
    }
}

/// A budget refusal of the ledger, with the headers of the request and token windows the request
/// already passed (the ledger knows none), so it carries them like every other answer.
fn with_window_headers(e: RouterError, t: &Ticket) -> RouterError {
    match e {
        RouterError::Quota(mut q) if q.headers == RateHeaders::default() => {
            q.headers = RouterService::rate_headers(t);
            RouterError::Quota(q)
        }
        other => other,
    }
}
