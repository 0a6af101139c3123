//! The router's one error enum. Each variant says which [`ErrorCode`] it is; the shared code
//! decides the gRPC code and the HTTP status (docs/design.md, "Errors").

use http::StatusCode;
use syft_error::{ErrorCode, QuotaDetails, Reason};
use thiserror::Error;
use tonic::Code;

pub use syft_error::REASON_HEADER;

/// `ErrorInfo.domain` of every router error.
pub const ERROR_DOMAIN: &str = "syft.router";

/// The reason of a hold refused because the user's balance cannot cover it.
pub const INSUFFICIENT_FUNDS: &str = Reason::InsufficientFunds.as_str();

/// The longest wait an OpenAI SDK honours from `Retry-After`: past it, the SDKs retry at once
/// (after their own half-second backoff) into the same refusal, each retry a new upstream call
/// and hold, so such a refusal says `x-should-retry: false` and the client waits as told.
pub const SOON: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a duplicate of a request still in progress is told to wait (`Retry-After`,
/// `RetryInfo`). The IETF Idempotency-Key draft answers such a duplicate 409; without a wait the
/// OpenAI SDKs retry after their own half second, twice, and a chat answer takes longer.
pub const IN_PROGRESS_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A request refused by a rate, concurrency or budget limit: the reason, when to retry, which
/// quota, and the rate-limit headers of the refusal.
#[derive(Debug, Clone)]
pub struct QuotaRefusal {
    pub reason: Reason,
    pub message: String,
    pub details: QuotaDetails,
    pub headers: crate::limits::RateHeaders,
    /// The request can never pass this limit as it is (it reserves more tokens than the whole
    /// window holds): no wait helps, only a smaller `max_tokens`.
    pub never_fits: bool,
}

/// Everything a router call can fail with. Messages are safe to show to clients; internal details
/// go to the log only.
#[derive(Debug, Clone, Error)]
pub enum RouterError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("payment required: {0}")]
    PaymentRequired(String),
    #[error("{message}")]
    FailedPrecondition {
        reason: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The ledger refused the token as proving nothing about the named user (`TOKEN_INVALID`:
    /// unknown, another user's, issued to another router). A 403 like
    /// [`RouterError::PermissionDenied`], told apart so that the refusal's usage row names no
    /// user: the request proved none.
    #[error("{0}")]
    ForeignToken(String),
    /// The token's spend limit cannot cover the hold (`TOKEN_LIMIT_EXCEEDED`): a token refusal
    /// (403), told apart so that its message can say what sized the hold.
    #[error("{0}")]
    TokenSpendLimit(String),
    /// The user's own token can no longer pay (`TOKEN_REVOKED`, `TOKEN_EXPIRED`): a 403 whose
    /// reason says which, to the client and in the refusal's usage row (it said
    /// `PERMISSION_DENIED` for both, and a support agent could not tell them apart).
    #[error("{message}")]
    TokenEnded {
        reason: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request id is claimed by a request still running at this router (`ALREADY_EXISTS`
    /// with [`IN_PROGRESS_RETRY`]): a retry once it is over gets its outcome.
    #[error("{0}")]
    InProgress(String),
    /// The request id is spent: its request is over (charged or not, `REQUEST_PROCESSED`), or
    /// the key named another request (`IDEMPOTENCY_CONFLICT`). `ALREADY_EXISTS` like an id in
    /// progress, but sending it again cannot change the answer: its own reason tells gRPC
    /// clients, and the SDKs are told not to retry.
    #[error("{message}")]
    Processed { reason: Reason, message: String },
    #[error("{0}")]
    ResourceExhausted(String),
    /// A limit refused the request (`RESOURCE_EXHAUSTED` / 429 with retry details).
    #[error("{}", .0.message)]
    Quota(Box<QuotaRefusal>),
    #[error("{0}")]
    Unavailable(String),
    /// Unavailable, and the upstream said when to come back (a 5xx with `Retry-After`): passed
    /// on as `RetryInfo` and `Retry-After`, so clients wait as long as the provider asked rather
    /// than retrying at once into the same refusal.
    #[error("{message}")]
    UnavailableFor {
        message: String,
        retry_after: std::time::Duration,
    },
    /// The upstream answered with something unusable (malformed, empty).
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Cancelled(String),
    /// The string is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

impl RouterError {
    pub fn error_code(&self) -> ErrorCode {
        match self {
            RouterError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            RouterError::PaymentRequired(_) => ErrorCode::PaymentRequired,
            RouterError::FailedPrecondition { .. } => ErrorCode::FailedPrecondition,
            RouterError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            RouterError::PermissionDenied(_)
            | RouterError::ForeignToken(_)
            | RouterError::TokenSpendLimit(_)
            | RouterError::TokenEnded { .. } => ErrorCode::PermissionDenied,
            RouterError::NotFound(_) => ErrorCode::NotFound,
            RouterError::AlreadyExists(_)
            | RouterError::InProgress(_)
            | RouterError::Processed { .. } => ErrorCode::AlreadyExists,
            RouterError::ResourceExhausted(_) | RouterError::Quota(_) => {
                ErrorCode::ResourceExhausted
            }
            RouterError::Unavailable(_) | RouterError::UnavailableFor { .. } => {
                ErrorCode::Unavailable
            }
            RouterError::BadGateway(_) => ErrorCode::BadGateway,
            RouterError::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
            RouterError::Cancelled(_) => ErrorCode::Cancelled,
            RouterError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Machine-readable reason (`ErrorInfo.reason`, `x-syft-error-reason`, OpenAI `code`).
    pub fn reason(&self) -> &'static str {
        match self {
            RouterError::FailedPrecondition { reason, .. } => reason,
            RouterError::Quota(q) => q.reason.as_str(),
            RouterError::Processed { reason, .. } => reason.as_str(),
            RouterError::TokenSpendLimit(_) => Reason::TokenLimitExceeded.as_str(),
            RouterError::ForeignToken(_) => Reason::TokenInvalid.as_str(),
            RouterError::TokenEnded { reason, .. } => reason,
            other => other.error_code().as_str(),
        }
    }

    pub fn grpc_code(&self) -> Code {
        self.error_code().grpc()
    }

    pub fn http_status(&self) -> StatusCode {
        self.error_code().http()
    }

    /// The OpenAI error `type`.
    pub fn openai_type(&self) -> &'static str {
        match self {
            RouterError::InvalidArgument(_) | RouterError::NotFound(_) => "invalid_request_error",
            RouterError::PaymentRequired(_) => "payment_required",
            // Only money the user lacks is a quota: the SDKs read `insufficient_quota` as "out
            // of credit", which a disabled service or a hold's state is not.
            RouterError::FailedPrecondition { reason, .. }
                if *reason == Reason::InsufficientFunds.as_str() =>
            {
                "insufficient_quota"
            }
            RouterError::FailedPrecondition { .. } => "invalid_request_error",
            RouterError::Unauthenticated(_) => "authentication_error",
            RouterError::PermissionDenied(_)
            | RouterError::ForeignToken(_)
            | RouterError::TokenSpendLimit(_)
            | RouterError::TokenEnded { .. } => "permission_error",
            RouterError::AlreadyExists(_)
            | RouterError::InProgress(_)
            | RouterError::Processed { .. } => "conflict_error",
            RouterError::ResourceExhausted(_) => "rate_limit_error",
            // OpenAI's type for a spent quota (not retryable soon), as opposed to a rate.
            RouterError::Quota(_) if self.is_spent_quota() => "insufficient_quota",
            RouterError::Quota(_) => "rate_limit_error",
            RouterError::Unavailable(_)
            | RouterError::UnavailableFor { .. }
            | RouterError::BadGateway(_) => "service_unavailable",
            RouterError::DeadlineExceeded(_) => "timeout",
            RouterError::Cancelled(_) => "cancelled",
            RouterError::Internal(_) => "server_error",
        }
    }

    /// A budget or a token's daily limit, spent until its window resets (hours): as opposed to a
    /// rate, whose `Retry-After` is seconds away.
    pub fn is_spent_quota(&self) -> bool {
        matches!(self, RouterError::Quota(q)
            if matches!(q.reason, Reason::BudgetExceeded | Reason::TokenDailyLimitExceeded))
    }

    /// Whether sending the same request again soon can succeed (`x-should-retry`): not for a
    /// state the user must change (`FAILED_PRECONDITION`: funds, a hold's state, a disabled
    /// service), a request id already spent, a spent quota, a request that never fits its token
    /// window, nor a refusal that asks for a wait longer than [`SOON`]. Rates, an id still in
    /// progress and unavailability can.
    pub fn retry_helps(&self) -> bool {
        match self {
            RouterError::FailedPrecondition { .. } | RouterError::Processed { .. } => false,
            RouterError::Quota(q) if q.never_fits => false,
            _ if self.retry_after().is_some_and(|after| after > SOON) => false,
            _ => !self.is_spent_quota(),
        }
    }

    /// When the client should come back, if the refusal says: a limit's wait or the upstream's.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            RouterError::Quota(q) => q.details.retry_after,
            RouterError::UnavailableFor { retry_after, .. } => Some(*retry_after),
            RouterError::InProgress(_) => Some(IN_PROGRESS_RETRY),
            _ => None,
        }
    }

    /// Client-facing message.
    pub fn public_message(&self) -> String {
        self.to_string()
    }

    /// The OpenAI-style body `{"error":{"message","type","code","param"}}`.
    pub fn openai_body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.public_message(),
                "type": self.openai_type(),
                "code": self.reason().to_ascii_lowercase(),
                "param": null,
            }
        })
    }
}

impl From<RouterError> for tonic::Status {
    fn from(err: RouterError) -> Self {
        if let RouterError::Internal(detail) = &err {
            tracing::error!(error = %detail, "internal router error");
        }
        // One builder for every error: `RetryInfo` when the error says when to come back, and a
        // limit's `QuotaFailure` and rate-limit headers.
        let details = match &err {
            RouterError::Quota(q) => q.details.clone(),
            other => QuotaDetails {
                retry_after: other.retry_after(),
                violations: Vec::new(),
            },
        };
        let mut status = syft_error::grpc_status_retry(
            err.error_code(),
            err.reason(),
            ERROR_DOMAIN,
            err.public_message(),
            &details,
        );
        if let RouterError::Quota(q) = &err {
            for (name, value) in q.headers.pairs() {
                if let Ok(v) = value.parse() {
                    status.metadata_mut().insert(name, v);
                }
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn payment_required_maps_to_failed_precondition_with_reason() {
        let status = tonic::Status::from(RouterError::PaymentRequired("send a token".into()));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().starts_with("payment required"));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "PAYMENT_REQUIRED");
        assert_eq!(
            status
                .metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("PAYMENT_REQUIRED")
        );
        assert_eq!(
            RouterError::PaymentRequired(String::new()).http_status(),
            StatusCode::PAYMENT_REQUIRED
        );
    }

    #[test]
    fn internal_details_are_hidden() {
        let status = tonic::Status::from(RouterError::Internal("SELECT secret".into()));
        assert_eq!(status.message(), "internal error");
        let body = RouterError::Internal("SELECT secret".into()).openai_body();
        assert!(!body.to_string().contains("SELECT"));
    }
}
