//! One error vocabulary for the router and the ledger.
//!
//! Each service keeps its own error enum, but every variant says only which [`ErrorCode`] it is;
//! the code knows its gRPC code, HTTP status and default machine-readable reason. Refusals that a
//! client must tell apart (insufficient funds, an expired hold, …) carry a [`Reason`], sent as
//! `google.rpc.ErrorInfo` on gRPC and as `code` in JSON bodies, so that callers branch on the
//! reason and never on message text. The table is in docs/design.md ("Errors").

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use tonic_types::{ErrorDetails, StatusExt};

mod usage;
pub use usage::{UsageStatus, MAX_ANSWER_BYTES, MAX_USAGE_COUNT, MAX_USAGE_NAME};

/// Metadata key (gRPC) and header (HTTP) carrying the machine-readable reason next to ErrorInfo,
/// for clients that do not decode `grpc-status-details-bin`.
pub const REASON_HEADER: &str = "x-syft-error-reason";

/// What kind of failure this is; decides the gRPC code and the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    /// The router needs a payment it was not given (no token, no sender).
    PaymentRequired,
    /// The request is valid but the state refuses it (funds, a resolved or expired hold).
    FailedPrecondition,
    NotFound,
    /// A key reused with other parameters, an account that exists.
    AlreadyExists,
    /// Rate limit or quota.
    ResourceExhausted,
    Unavailable,
    /// The upstream answered with something unusable.
    BadGateway,
    DeadlineExceeded,
    Cancelled,
    /// Details are logged, never sent.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        Self::InvalidArgument,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::PaymentRequired,
        Self::FailedPrecondition,
        Self::NotFound,
        Self::AlreadyExists,
        Self::ResourceExhausted,
        Self::Unavailable,
        Self::BadGateway,
        Self::DeadlineExceeded,
        Self::Cancelled,
        Self::Internal,
    ];

    pub const fn grpc(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::PaymentRequired | Self::FailedPrecondition => Code::FailedPrecondition,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Unavailable | Self::BadGateway => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Cancelled => Code::Cancelled,
            Self::Internal => Code::Internal,
        }
    }

    pub const fn http(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::InvalidArgument => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::PaymentRequired => StatusCode::PAYMENT_REQUIRED,
            Self::FailedPrecondition | Self::AlreadyExists => StatusCode::CONFLICT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            // 499 (client closed request) is not a standard code; the client is gone anyway.
            Self::Cancelled => StatusCode::REQUEST_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable name, the default reason of errors that carry no more specific one.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::PaymentRequired => "PAYMENT_REQUIRED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::Unavailable => "UNAVAILABLE",
            Self::BadGateway => "UPSTREAM_INVALID_RESPONSE",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Cancelled => "CANCELLED",
            Self::Internal => "INTERNAL",
        }
    }

    /// The code an HTTP peer's error status stands for (the inverse of [`ErrorCode::http`] where
    /// it is one-to-one; 409 is a refused state, 5xx and unknown statuses are unavailability).
    pub const fn from_http(status: u16) -> Self {
        match status {
            400 | 422 => Self::InvalidArgument,
            401 => Self::Unauthenticated,
            402 => Self::PaymentRequired,
            403 => Self::PermissionDenied,
            404 => Self::NotFound,
            408 => Self::Cancelled,
            409 | 412 => Self::FailedPrecondition,
            429 => Self::ResourceExhausted,
            502 => Self::BadGateway,
            504 => Self::DeadlineExceeded,
            500 => Self::Internal,
            _ => Self::Unavailable,
        }
    }

    /// The code a peer's gRPC status stands for (transport codes collapse to `Unavailable`).
    pub const fn from_grpc(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::FailedPrecondition | Code::Aborted => Self::FailedPrecondition,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::Cancelled => Self::Cancelled,
            Code::Internal | Code::DataLoss | Code::Unimplemented => Self::Internal,
            Code::Ok | Code::Unknown | Code::Unavailable => Self::Unavailable,
        }
    }
}

/// `Display` and `FromStr` by the enum's wire name (`as_str`, `ALL`).
macro_rules! named_text {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownName(s.to_string()))
            }
        }
    };
}

named_text!(ErrorCode);

/// A name that is not one of this vocabulary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName(pub String);

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown name {:?}", self.0)
    }
}

impl std::error::Error for UnknownName {}

/// Refusals a client must be able to tell apart, each with the code it is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The sender's available balance does not cover the hold.
    InsufficientFunds,
    /// A capture after the hold's expiry.
    HoldExpired,
    /// A capture or void of a transfer that is already resolved the other way (or for another
    /// amount).
    TransferNotPending,
    TokenRevoked,
    TokenExpired,
    /// The delegation token's spend limit does not cover the hold.
    TokenLimitExceeded,
    /// The token is unknown, or not for this recipient.
    TokenInvalid,
    /// An idempotency key reused with other parameters.
    IdempotencyConflict,
    /// The router's request id names a request that is over (charged or not): a retry with it
    /// gets the same answer, never a new run (`ALREADY_EXISTS`, as opposed to one in progress).
    RequestProcessed,
    /// The operation is not served by this ledger's backend (hosted accounting).
    NotSupported,
    AccountExists,
    /// A request or token rate limit of the router refused the request (retry after `RetryInfo`).
    RateLimited,
    /// The user (or the router as a whole) has as many requests in flight as allowed.
    ConcurrencyLimited,
    /// The owner-set spend budget of the user for this day or month does not cover the hold;
    /// not retryable before the budget's window resets.
    BudgetExceeded,
    /// The delegation token's per-day spend limit does not cover the hold.
    TokenDailyLimitExceeded,
    /// The client's address sent too many wrong credentials: every authentication from it is
    /// refused until `RetryInfo` says (the ledger's failed-authentication limit).
    AuthLocked,
    /// The router's upstream (the model provider or search backend) refused for its own rate
    /// limit; nothing was charged. `RetryInfo` says when, if the upstream did.
    UpstreamRateLimited,
    /// A hold's life asked outside what the ledger grants (1 s to its `--max-hold-ttl`): a
    /// router's setting, not its user's input. `ErrorInfo.metadata` says the ledger's maximum
    /// ([`MAX_HOLD_TTL_SECONDS`]), so a router configured above it places holds that long.
    HoldTtlOutOfRange,
    /// The router does not serve the service asked for (not listed, or not enabled).
    ServiceDisabled,
}

impl Reason {
    pub const ALL: [Reason; 19] = [
        Self::InsufficientFunds,
        Self::HoldExpired,
        Self::TransferNotPending,
        Self::TokenRevoked,
        Self::TokenExpired,
        Self::TokenLimitExceeded,
        Self::TokenInvalid,
        Self::IdempotencyConflict,
        Self::RequestProcessed,
        Self::NotSupported,
        Self::AccountExists,
        Self::RateLimited,
        Self::ConcurrencyLimited,
        Self::BudgetExceeded,
        Self::TokenDailyLimitExceeded,
        Self::AuthLocked,
        Self::UpstreamRateLimited,
        Self::HoldTtlOutOfRange,
        Self::ServiceDisabled,
    ];

    pub const fn code(self) -> ErrorCode {
        match self {
            Self::InsufficientFunds
            | Self::HoldExpired
            | Self::TransferNotPending
            | Self::NotSupported
            | Self::ServiceDisabled => ErrorCode::FailedPrecondition,
            Self::TokenRevoked
            | Self::TokenExpired
            | Self::TokenLimitExceeded
            | Self::TokenInvalid => ErrorCode::PermissionDenied,
            Self::IdempotencyConflict | Self::RequestProcessed | Self::AccountExists => {
                ErrorCode::AlreadyExists
            }
            Self::RateLimited
            | Self::ConcurrencyLimited
            | Self::BudgetExceeded
            | Self::TokenDailyLimitExceeded
            | Self::AuthLocked
            | Self::UpstreamRateLimited => ErrorCode::ResourceExhausted,
            Self::HoldTtlOutOfRange => ErrorCode::InvalidArgument,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Self::HoldExpired => "HOLD_EXPIRED",
            Self::TransferNotPending => "TRANSFER_NOT_PENDING",
            Self::TokenRevoked => "TOKEN_REVOKED",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::TokenLimitExceeded => "TOKEN_LIMIT_EXCEEDED",
            Self::TokenInvalid => "TOKEN_INVALID",
            Self::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            Self::RequestProcessed => "REQUEST_PROCESSED",
            Self::NotSupported => "NOT_SUPPORTED",
            Self::AccountExists => "ACCOUNT_EXISTS",
            Self::RateLimited => "RATE_LIMITED",
            Self::ConcurrencyLimited => "CONCURRENCY_LIMITED",
            Self::BudgetExceeded => "BUDGET_EXCEEDED",
            Self::TokenDailyLimitExceeded => "TOKEN_DAILY_LIMIT_EXCEEDED",
            Self::AuthLocked => "AUTH_LOCKED",
            Self::UpstreamRateLimited => "UPSTREAM_RATE_LIMITED",
            Self::HoldTtlOutOfRange => "HOLD_TTL_OUT_OF_RANGE",
            Self::ServiceDisabled => "SERVICE_DISABLED",
        }
    }
}

named_text!(Reason);

/// A gRPC status with `google.rpc.ErrorInfo { reason, domain }` and the reason header.
pub fn grpc_status(code: ErrorCode, reason: &str, domain: &str, message: String) -> tonic::Status {
    grpc_status_with(code, reason, domain, message, HashMap::new())
}

/// [`grpc_status`] whose `ErrorInfo` also carries `metadata` (read with [`info_metadata`]).
pub fn grpc_status_with(
    code: ErrorCode,
    reason: &str,
    domain: &str,
    message: String,
    metadata: HashMap<String, String>,
) -> tonic::Status {
    let details = ErrorDetails::with_error_info(reason, domain, metadata);
    let mut status = tonic::Status::with_error_details(code.grpc(), message, details);
    if let Ok(v) = reason.parse() {
        status.metadata_mut().insert(REASON_HEADER, v);
    }
    status
}

/// A wait as `Retry-After` seconds: whole seconds, rounded up, at least 1, so that a client that
/// waits as told is never refused again for being early (both services' HTTP answers).
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    millis.div_ceil(1000).max(1)
}

/// Why a quota refused a request and when to come back: sent as `google.rpc.RetryInfo` and
/// `google.rpc.QuotaFailure` next to the `ErrorInfo` (and as `Retry-After` over HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QuotaDetails {
    /// When a retry can succeed; `None` when no retry helps before an unknown time.
    pub retry_after: Option<std::time::Duration>,
    /// `(subject, description)` of each quota that refused, e.g. `("user:a@x", "10 requests per
    /// minute")`.
    pub violations: Vec<(String, String)>,
}

/// A `RESOURCE_EXHAUSTED`-style status with `ErrorInfo`, `RetryInfo` and `QuotaFailure`.
pub fn grpc_quota_status(
    reason: Reason,
    domain: &str,
    message: String,
    quota: &QuotaDetails,
) -> tonic::Status {
    grpc_status_retry(reason.code(), reason.as_str(), domain, message, quota)
}

/// [`grpc_status`] with `RetryInfo` (when `quota` says when to retry) and `QuotaFailure` (when
/// it names violations).
pub fn grpc_status_retry(
    code: ErrorCode,
    reason: &str,
    domain: &str,
    message: String,
    quota: &QuotaDetails,
) -> tonic::Status {
    let mut details =
        ErrorDetails::with_error_info(reason, domain, HashMap::<String, String>::new());
    if let Some(after) = quota.retry_after {
        details.set_retry_info(Some(after));
    }
    if !quota.violations.is_empty() {
        details.set_quota_failure(
            quota
                .violations
                .iter()
                .map(|(s, d)| tonic_types::QuotaViolation::new(s.clone(), d.clone()))
                .collect::<Vec<_>>(),
        );
    }
    let mut status = tonic::Status::with_error_details(code.grpc(), message, details);
    if let Ok(v) = reason.parse() {
        status.metadata_mut().insert(REASON_HEADER, v);
    }
    status
}

/// The `RetryInfo` delay of a status, if it carries one.
pub fn retry_after_of(status: &tonic::Status) -> Option<std::time::Duration> {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
}

/// The `ErrorInfo.metadata` key of the transfer an idempotency key holds, sent with the ledger's
/// `IDEMPOTENCY_CONFLICT` refusal of an authorization.
pub const KEYED_TRANSFER: &str = "transfer_id";

/// `ErrorInfo.metadata` of a `HOLD_TTL_OUT_OF_RANGE` refusal: the longest hold, in seconds, the
/// ledger grants.
pub const MAX_HOLD_TTL_SECONDS: &str = "max_hold_ttl_seconds";

/// The `ErrorInfo.metadata` entry `key` of a status, if it carries one.
pub fn info_metadata(status: &tonic::Status, key: &str) -> Option<String> {
    let mut info = status.get_details_error_info()?;
    info.metadata.remove(key)
}

/// The `ErrorInfo.reason` of a status, falling back to the reason header.
pub fn reason_of(status: &tonic::Status) -> Option<String> {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .or_else(|| {
            status
                .metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        for reason in Reason::ALL {
            assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
        }
        assert!("insufficient".parse::<Reason>().is_err());
    }

    #[test]
    fn status_carries_reason() {
        let status = grpc_status(
            Reason::InsufficientFunds.code(),
            Reason::InsufficientFunds.as_str(),
            "syft.ledger",
            "insufficient funds".into(),
        );
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(reason_of(&status).as_deref(), Some("INSUFFICIENT_FUNDS"));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.domain, "syft.ledger");
    }

    #[test]
    fn quota_status_carries_retry_and_violations() {
        let quota = QuotaDetails {
            retry_after: Some(std::time::Duration::from_secs(6)),
            violations: vec![("user:a@x.org".into(), "10 requests per minute".into())],
        };
        let status = grpc_quota_status(Reason::RateLimited, "syft.router", "slow".into(), &quota);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(reason_of(&status).as_deref(), Some("RATE_LIMITED"));
        assert_eq!(
            retry_after_of(&status),
            Some(std::time::Duration::from_secs(6))
        );
        let failure = status.get_details_quota_failure().expect("quota failure");
        assert_eq!(failure.violations[0].subject, "user:a@x.org");
    }

    #[test]
    fn codes_map_consistently() {
        // Every code survives a trip through gRPC, except those that share a gRPC code.
        for code in ErrorCode::ALL {
            let back = ErrorCode::from_grpc(code.grpc());
            match code {
                ErrorCode::PaymentRequired => assert_eq!(back, ErrorCode::FailedPrecondition),
                ErrorCode::BadGateway => assert_eq!(back, ErrorCode::Unavailable),
                _ => assert_eq!(back, code),
            }
        }
        assert_eq!(
            ErrorCode::PaymentRequired.http(),
            http::StatusCode::PAYMENT_REQUIRED
        );
        // HTTP statuses map back, except the two codes that share 409.
        for code in ErrorCode::ALL {
            let back = ErrorCode::from_http(code.http().as_u16());
            match code {
                ErrorCode::AlreadyExists => assert_eq!(back, ErrorCode::FailedPrecondition),
                _ => assert_eq!(back, code),
            }
        }
    }
}
