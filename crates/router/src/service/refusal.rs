//! A usage row for every refused request (issue 15, point 7): payment required, token refused,
//! insufficient funds, invalid request, duplicate, rate limited, budget exceeded, ledger
//! unavailable. Owners see refusals next to
//! answers in `syft-router usage --status …`.
//!
//! The row goes through the ledger's group-commit path (`RecordUsage`, batched in the ledger), so a
//! flood of refusals shares commits instead of costing one each, and never enters the batches of
//! holds and captures. The refusal is returned after its row is written (or the write failed and
//! was logged), like every other usage row.

use std::time::Instant;

use syft_error::{Reason, UsageStatus};
use syft_proto::ledger::Usage;
use syft_proto::router::{ChatRequest, SearchRequest};

use super::admission::{row_key, Ticket};
use super::{elapsed_ms, RouterService};
use crate::config::{hold_sizing, insufficient_funds_message, ServiceKind};
use crate::error::{RouterError, INSUFFICIENT_FUNDS};

/// What a refused request is recorded under, taken before validation (which may be what failed).
pub(super) struct Attempt {
    request_id: String,
    user_email: String,
    model: String,
    kind: ServiceKind,
    started: Instant,
    /// The refusal's machine-readable reason, kept on its row (`naming_for`).
    reason: &'static str,
}

impl Attempt {
    pub(super) fn chat(req: &ChatRequest) -> Self {
        Attempt {
            request_id: req.request_id.clone(),
            user_email: req.user_email.clone(),
            model: req.model.clone(),
            kind: ServiceKind::Chat,
            started: Instant::now(),
            reason: "",
        }
    }

    /// This attempt as its refusal `e` records it: with `e`'s reason (what told a revoked token
    /// from an expired one, a rate limit from a concurrency limit), and under no user when `e`
    /// shows the request proved none ([`proves_no_user`]).
    pub(super) fn naming_for(mut self, e: &RouterError) -> Self {
        if proves_no_user(e) {
            self.user_email.clear();
        }
        self.reason = e.reason();
        self
    }

    /// `provider`: the search backend, the `model` of search usage rows.
    pub(super) fn search(req: &SearchRequest, provider: &str) -> Self {
        Attempt {
            request_id: req.request_id.clone(),
            user_email: req.user_email.clone(),
            model: provider.to_string(),
            kind: ServiceKind::Search,
            started: Instant::now(),
            reason: "",
        }
    }
}

/// The usage status a refusal is recorded with.
pub(super) fn refusal_status(e: &RouterError) -> UsageStatus {
    match e {
        RouterError::PaymentRequired(_) => UsageStatus::PaymentRequired,
        RouterError::FailedPrecondition {
            reason: INSUFFICIENT_FUNDS,
            ..
        } => UsageStatus::InsufficientFunds,
        // Every token refusal of the ledger (unknown, revoked, expired, over its limit), and a
        // malformed `Authorization` header (the only `Unauthenticated` of the router).
        RouterError::PermissionDenied(_)
        | RouterError::ForeignToken(_)
        | RouterError::TokenSpendLimit(_)
        | RouterError::TokenEnded { .. }
        | RouterError::Unauthenticated(_) => UsageStatus::TokenRefused,
        RouterError::InvalidArgument(_)
        | RouterError::NotFound(_)
        | RouterError::FailedPrecondition { .. } => UsageStatus::InvalidRequest,
        RouterError::AlreadyExists(_)
        | RouterError::InProgress(_)
        | RouterError::Processed { .. } => UsageStatus::Duplicate,
        // A limit: the router's rate and concurrency windows, or the ledger's spend budgets.
        RouterError::Quota(_) if e.is_spent_quota() => UsageStatus::BudgetExceeded,
        RouterError::Quota(_) => UsageStatus::RateLimited,
        RouterError::ResourceExhausted(_)
        | RouterError::Unavailable(_)
        | RouterError::UnavailableFor { .. }
        | RouterError::BadGateway(_)
        | RouterError::DeadlineExceeded(_)
        | RouterError::Internal(_) => UsageStatus::Unavailable,
        // The router's own: a request whose client left before it was admitted.
        RouterError::Cancelled(_) => UsageStatus::Abandoned,
    }
}

/// Whether a refusal shows that the request proved nothing about the user it named: no token,
/// a malformed one, or one the ledger says is not that user's. Its row then names no user: anyone
/// can name anyone, and such rows showed in the named person's own history (and a digest's top
/// users) as theirs, for good. A refusal of the user's own token (revoked, expired, over a limit)
/// or funds still names them.
pub(super) fn proves_no_user(e: &RouterError) -> bool {
    matches!(
        e,
        RouterError::PaymentRequired(_)
            | RouterError::ForeignToken(_)
            | RouterError::Unauthenticated(_)
    )
}

/// A request id the ledger accepts: the client's when it is a valid one, else a fresh id (an
/// invalid or missing id is often the very reason of the refusal).
fn recordable_id(id: &str) -> String {
    if crate::validate::is_usable_request_id(id) {
        id.to_string()
    } else {
        format!("refused-{}", uuid::Uuid::now_v7())
    }
}

impl RouterService {
    /// Records a request an HTTP front refused before it became a [`ChatRequest`] or a
    /// [`SearchRequest`] (a body that is not JSON, an option the router does not support), under
    /// what it said of its user and request id, if anything. In a task of its own, so that a
    /// client leaving meanwhile does not cut the row short.
    pub(crate) async fn record_unread(
        &self,
        kind: ServiceKind,
        user_email: &str,
        request_id: &str,
        e: &RouterError,
    ) {
        let model = match (kind, &self.inner.search) {
            (ServiceKind::Search, Some(backend)) => backend.provider().to_string(),
            _ => String::new(),
        };
        let attempt = Attempt {
            request_id: request_id.to_string(),
            user_email: user_email.to_string(),
            model,
            kind,
            started: Instant::now(),
            reason: "",
        }
        .naming_for(e);
        let (svc, status, work) = (self.clone(), refusal_status(e), self.inner.drain.enter());
        let record = tokio::spawn(async move {
            let _work = work;
            svc.record_refusal(attempt, status).await
        });
        if let Err(e) = record.await {
            tracing::warn!(error = %e, "could not record the usage row of a refusal");
        }
    }

    /// Records the refusal of `attempt` with `status`. Never fails the request: the refusal is the
    /// answer either way.
    pub(super) async fn record_refusal(&self, attempt: Attempt, status: UsageStatus) {
        if self.ledger_refuses_us() {
            // Refused anyway, and each wrong secret sent counts against this machine's address.
            // Counted as a row not confirmed: the metric operators watch for lost rows stayed 0.
            crate::metrics::row_unconfirmed(crate::metrics::UnconfirmedRow::Refusal);
            tracing::warn!(request_id = %attempt.request_id, ?status, "refusal row not recorded: the ledger does not accept this router now");
            return;
        }
        // A chat refused before its model was read is put under the router's first model; a
        // search names its backend, and none when the router has no search (not a chat model).
        let model = match (attempt.model.is_empty(), attempt.kind) {
            (true, ServiceKind::Chat) => self.models().into_iter().next().unwrap_or_default(),
            _ => attempt.model,
        };
        let usage = Usage {
            request_id: recordable_id(&attempt.request_id),
            app_name: self.inner.config.name.clone(),
            endpoint: attempt.kind.endpoint().into(),
            user_email: attempt.user_email,
            model,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            status: status.as_str().into(),
            latency_ms: elapsed_ms(attempt.started),
            upstream_latency_ms: 0,
            ttft_ms: None,
            // Kept by the retries below and by a failed-over call: one row however often sent.
            row_key: row_key(status),
            answered_at_unix_micros: None,
            reason: attempt.reason.into(),
        };
        let Err(err) = self.inner.ledger.record_usage(usage.clone()).await else {
            return;
        };
        if let RouterError::InvalidArgument(_) = err {
            // Malformed fields (an invalid email, a model name too long) are often why the
            // request was refused: record the refusal without them.
            let bare = Usage {
                user_email: String::new(),
                model: String::new(),
                ..usage
            };
            if self.inner.ledger.record_usage(bare).await.is_ok() {
                return;
            }
        }
        crate::metrics::row_unconfirmed(crate::metrics::UnconfirmedRow::Refusal);
        tracing::warn!(status = %status, error = %err, "a refusal's usage row not confirmed by the ledger: lost unless it committed late");
    }
}

/// Replaces the ledger's insufficient-funds message (a bare amount in micros) with one that says
/// what the hold is in money, what sized it, and how to reserve less; adds the same to a token's
/// spend or daily limit refusal (its "requested" is the hold, far above a cheap answer's cost).
pub(super) fn explain_refusal(t: &Ticket, e: RouterError) -> RouterError {
    let sized = |message: &str| match hold_sizing(&t.pricing, t.hold_micros, t.bound) {
        Some(sizing) => format!("{message}; {sizing}"),
        None => message.to_string(),
    };
    match e {
        // The ledger keeps a spend-limit refusal under the request's key (a daily limit's it
        // does not): a retry with less reserved needs a new id, or it meets the refusal again.
        RouterError::TokenSpendLimit(message) => RouterError::TokenSpendLimit(format!(
            "{}; send it with a new request id (this one's refusal stands)",
            sized(&message)
        )),
        RouterError::Quota(mut q) if q.reason == Reason::TokenDailyLimitExceeded => {
            q.message = sized(&q.message);
            RouterError::Quota(q)
        }
        RouterError::FailedPrecondition {
            reason: INSUFFICIENT_FUNDS,
            message,
        } => {
            tracing::debug!(request_id = %t.request_id, ledger_message = %message, "hold refused");
            RouterError::FailedPrecondition {
                reason: INSUFFICIENT_FUNDS,
                message: insufficient_funds_message(&t.pricing, t.hold_micros, t.bound),
            }
        }
        other => other,
    }
}
