//! The router's one error enum, mapped to gRPC and HTTP in one place each.

use http::StatusCode;
use thiserror::Error;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every router error.
pub const ERROR_DOMAIN: &str = "syft.router";

/// Metadata key (gRPC) and header (HTTP) carrying the machine-readable reason.
pub const REASON_HEADER: &str = "x-syft-error-reason";

/// The reason of a hold refused because the user's balance cannot cover it.
pub const INSUFFICIENT_FUNDS: &str = "INSUFFICIENT_FUNDS";

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
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
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
    /// Machine-readable reason (`ErrorInfo.reason`, `x-syft-error-reason`, OpenAI `code`).
    pub fn reason(&self) -> &'static str {
        match self {
            RouterError::InvalidArgument(_) => "INVALID_ARGUMENT",
            RouterError::PaymentRequired(_) => "PAYMENT_REQUIRED",
            RouterError::FailedPrecondition { reason, .. } => reason,
            RouterError::Unauthenticated(_) => "UNAUTHENTICATED",
            RouterError::PermissionDenied(_) => "PERMISSION_DENIED",
            RouterError::NotFound(_) => "NOT_FOUND",
            RouterError::AlreadyExists(_) => "ALREADY_EXISTS",
            RouterError::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            RouterError::Unavailable(_) => "UNAVAILABLE",
            RouterError::BadGateway(_) => "UPSTREAM_INVALID_RESPONSE",
            RouterError::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            RouterError::Cancelled(_) => "CANCELLED",
            RouterError::Internal(_) => "INTERNAL",
        }
    }

    pub fn grpc_code(&self) -> Code {
        match self {
            RouterError::InvalidArgument(_) => Code::InvalidArgument,
            RouterError::PaymentRequired(_) | RouterError::FailedPrecondition { .. } => {
                Code::FailedPrecondition
            }
            RouterError::Unauthenticated(_) => Code::Unauthenticated,
            RouterError::PermissionDenied(_) => Code::PermissionDenied,
            RouterError::NotFound(_) => Code::NotFound,
            RouterError::AlreadyExists(_) => Code::AlreadyExists,
            RouterError::ResourceExhausted(_) => Code::ResourceExhausted,
            RouterError::Unavailable(_) | RouterError::BadGateway(_) => Code::Unavailable,
            RouterError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            RouterError::Cancelled(_) => Code::Cancelled,
            RouterError::Internal(_) => Code::Internal,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            RouterError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            RouterError::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            RouterError::FailedPrecondition { .. } => StatusCode::CONFLICT,
            RouterError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            RouterError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            RouterError::NotFound(_) => StatusCode::NOT_FOUND,
            RouterError::AlreadyExists(_) => StatusCode::CONFLICT,
            RouterError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            RouterError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            RouterError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            // 499 (client closed request) is not a standard code; the client is gone anyway.
            RouterError::Cancelled(_) => StatusCode::REQUEST_TIMEOUT,
            RouterError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error `type`.
    pub fn openai_type(&self) -> &'static str {
        match self {
            RouterError::InvalidArgument(_) | RouterError::NotFound(_) => "invalid_request_error",
            RouterError::PaymentRequired(_) => "payment_required",
            RouterError::FailedPrecondition { .. } => "insufficient_quota",
            RouterError::Unauthenticated(_) => "authentication_error",
            RouterError::PermissionDenied(_) => "permission_error",
            RouterError::AlreadyExists(_) => "conflict_error",
            RouterError::ResourceExhausted(_) => "rate_limit_error",
            RouterError::Unavailable(_) | RouterError::BadGateway(_) => "service_unavailable",
            RouterError::DeadlineExceeded(_) => "timeout",
            RouterError::Cancelled(_) => "cancelled",
            RouterError::Internal(_) => "server_error",
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
        let details = ErrorDetails::with_error_info(
            err.reason(),
            ERROR_DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        );
        let mut status =
            tonic::Status::with_error_details(err.grpc_code(), err.public_message(), details);
        if let Ok(v) = err.reason().parse() {
            status.metadata_mut().insert(REASON_HEADER, v);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
