//! The ledger's one error type, mapped to gRPC status codes in one place (DESIGN.md §6).

use tonic::{Code, Status};

use crate::store::db_error::{classify, DbErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Insufficient funds, transfer not pending, hold expired.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    /// Idempotency key reused with other parameters; account exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// Rate limit or quota (from the hosted accounting service).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    /// Details are logged, never sent to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

impl LedgerError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// Stable short name, stored with recorded authorization failures so a replay returns the same error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Self::NotFound(_) => "NOT_FOUND",
            Self::AlreadyExists(_) => "ALREADY_EXISTS",
            Self::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
        }
    }

    pub fn from_kind(kind: &str, message: String) -> Self {
        match kind {
            "INVALID_ARGUMENT" => Self::InvalidArgument(message),
            "UNAUTHENTICATED" => Self::Unauthenticated(message),
            "PERMISSION_DENIED" => Self::PermissionDenied(message),
            "FAILED_PRECONDITION" => Self::FailedPrecondition(message),
            "NOT_FOUND" => Self::NotFound(message),
            "ALREADY_EXISTS" => Self::AlreadyExists(message),
            "RESOURCE_EXHAUSTED" => Self::ResourceExhausted(message),
            "UNAVAILABLE" => Self::Unavailable(message),
            _ => Self::Internal(message),
        }
    }
}

impl From<LedgerError> for Status {
    fn from(err: LedgerError) -> Self {
        match &err {
            LedgerError::Internal(detail) => {
                tracing::error!(error = %detail, "internal ledger error");
                Status::internal("internal error")
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

/// Serialization failure, deadlock, busy or locked database: retried inside the ledger.
pub(crate) fn is_retryable(err: &sqlx::Error) -> bool {
    classify(err) == DbErrorClass::Transient
}

pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    classify(err) == DbErrorClass::UniqueViolation
}

/// The one place database errors become ledger errors.
impl From<sqlx::Error> for LedgerError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => LedgerError::Unavailable("database unavailable".into()),
            sqlx::Error::RowNotFound => LedgerError::NotFound("not found".into()),
            _ if is_retryable(&err) => LedgerError::Unavailable("database busy, retry".into()),
            _ => LedgerError::Internal(err.to_string()),
        }
    }
}
