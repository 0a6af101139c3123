//! The ledger's one error type. Each variant says which [`ErrorCode`] it is; the code decides
//! the gRPC code and the HTTP status (see `syft_error` and docs/design.md, "Errors").

use std::sync::atomic::{AtomicU64, Ordering};
use syft_error::{ErrorCode, QuotaDetails, Reason, KEYED_TRANSFER, MAX_HOLD_TTL_SECONDS};
use tonic::Status;

/// `ErrorInfo.domain` of every ledger error.
pub const ERROR_DOMAIN: &str = "syft.ledger";

use crate::store::db_error::{classify, DbErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A state that refuses the request, without a more specific reason.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    /// Account exists, and other conflicts without a more specific reason.
    #[error("{0}")]
    AlreadyExists(String),
    /// Rate limit or quota (from the hosted accounting service).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    /// A refusal a client must tell apart: its reason decides its code.
    #[error("{message}")]
    Refused { reason: Reason, message: String },
    /// An idempotency key already used for a request with other parameters
    /// (`IDEMPOTENCY_CONFLICT`), naming the transfer the key holds: the caller placed it (keys are
    /// the caller's own), so a router whose earlier request it was can find it and replay a
    /// completed one's answer after its price changed. Sent in `ErrorInfo.metadata` as
    /// [`KEYED_TRANSFER`].
    #[error("{message}")]
    KeyTaken {
        message: String,
        transfer_id: String,
    },
    /// A hold's life asked outside 1 s ..= `max_seconds` (`HOLD_TTL_OUT_OF_RANGE`), sent with the
    /// maximum in `ErrorInfo.metadata` ([`MAX_HOLD_TTL_SECONDS`]): a router asking longer holds
    /// than this ledger grants places them that long instead of failing every paid request.
    #[error("{message}")]
    TtlOutOfRange { message: String, max_seconds: i64 },
    /// A budget refused a hold: sent with `RetryInfo` (when the window has room again) and
    /// `QuotaFailure`.
    #[error("{message}")]
    Quota {
        reason: Reason,
        message: String,
        details: QuotaDetails,
    },
    /// Details are logged, never sent to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

impl LedgerError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn refused(reason: Reason, msg: impl Into<String>) -> Self {
        Self::Refused {
            reason,
            message: msg.into(),
        }
    }

    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Refused { reason, .. } | Self::Quota { reason, .. } => reason.code(),
            Self::KeyTaken { .. } => Reason::IdempotencyConflict.code(),
            Self::TtlOutOfRange { .. } => Reason::HoldTtlOutOfRange.code(),
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn code(&self) -> tonic::Code {
        self.error_code().grpc()
    }

    pub fn reason(&self) -> Option<Reason> {
        match self {
            Self::Refused { reason, .. } => Some(*reason),
            Self::KeyTaken { .. } => Some(Reason::IdempotencyConflict),
            Self::TtlOutOfRange { .. } => Some(Reason::HoldTtlOutOfRange),
            _ => None,
        }
    }

    /// Stable short name: the reason, or the code's name. Sent as `ErrorInfo.reason` and as the
    /// REST body's `code`, and stored with recorded authorization failures so that a replay
    /// returns the same error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Refused { reason, .. } | Self::Quota { reason, .. } => reason.as_str(),
            Self::KeyTaken { .. } => Reason::IdempotencyConflict.as_str(),
            Self::TtlOutOfRange { .. } => Reason::HoldTtlOutOfRange.as_str(),
            other => other.error_code().as_str(),
        }
    }

    pub fn from_kind(kind: &str, message: String) -> Self {
        if let Ok(reason) = kind.parse::<Reason>() {
            return Self::refused(reason, message);
        }
        Self::with_code(kind.parse().unwrap_or(ErrorCode::Internal), message)
    }

    /// The ledger error of a code (the codes the ledger never sends collapse to the nearest).
    pub fn with_code(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::InvalidArgument => Self::InvalidArgument(message),
            ErrorCode::Unauthenticated => Self::Unauthenticated(message),
            ErrorCode::PermissionDenied => Self::PermissionDenied(message),
            ErrorCode::FailedPrecondition | ErrorCode::PaymentRequired => {
                Self::FailedPrecondition(message)
            }
            ErrorCode::NotFound => Self::NotFound(message),
            ErrorCode::AlreadyExists => Self::AlreadyExists(message),
            ErrorCode::ResourceExhausted => Self::ResourceExhausted(message),
            ErrorCode::Unavailable | ErrorCode::DeadlineExceeded | ErrorCode::BadGateway => {
                Self::Unavailable(message)
            }
            ErrorCode::Cancelled | ErrorCode::Internal => Self::Internal(message),
        }
    }

    /// The message a client may see: internal details are logged here and replaced.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(detail) => {
                tracing::error!(error = %detail, "internal ledger error");
                "internal error".to_string()
            }
            other => other.to_string(),
        }
    }
}

impl From<LedgerError> for Status {
    fn from(err: LedgerError) -> Self {
        if let LedgerError::Quota {
            reason,
            message,
            details,
        } = &err
        {
            return syft_error::grpc_quota_status(*reason, ERROR_DOMAIN, message.clone(), details);
        }
        let metadata = match &err {
            LedgerError::KeyTaken { transfer_id, .. } => {
                Some((KEYED_TRANSFER, transfer_id.clone()))
            }
            LedgerError::TtlOutOfRange { max_seconds, .. } => {
                Some((MAX_HOLD_TTL_SECONDS, max_seconds.to_string()))
            }
            _ => None,
        };
        if let Some((key, value)) = metadata {
            let metadata = [(key.to_string(), value)].into();
            let (code, reason) = (err.error_code(), err.kind());
            let message = err.public_message();
            return syft_error::grpc_status_with(code, reason, ERROR_DOMAIN, message, metadata);
        }
        syft_error::grpc_status(
            err.error_code(),
            err.kind(),
            ERROR_DOMAIN,
            err.public_message(),
        )
    }
}

/// Serialization failure, deadlock, busy or locked database: retried inside the ledger.
pub(crate) fn is_retryable(err: &sqlx::Error) -> bool {
    classify(err) == DbErrorClass::Transient
}

pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    classify(err) == DbErrorClass::UniqueViolation
}

pub(crate) fn is_check_violation(err: &sqlx::Error) -> bool {
    classify(err) == DbErrorClass::CheckViolation
}

/// The one place database errors become ledger errors.
impl From<sqlx::Error> for LedgerError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            // Every connection busy, or the database refusing new sessions (its
            // `max_connections` taken by others): calls waited the pool's timeout and failed
            // with nothing in the ledger's log (an operator's drill found it).
            sqlx::Error::PoolTimedOut => {
                static LAST: AtomicU64 = AtomicU64::new(0);
                now_and_then(
                    &LAST,
                    &err,
                    "no database connection within the pool's timeout: every connection busy, \
                     or the database refuses new sessions (max_connections?)",
                );
                LedgerError::Unavailable("database unavailable".into())
            }
            sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                LedgerError::Unavailable("database unavailable".into())
            }
            sqlx::Error::RowNotFound => LedgerError::NotFound("not found".into()),
            _ => match classify(&err) {
                DbErrorClass::Transient => LedgerError::Unavailable("database busy, retry".into()),
                DbErrorClass::ConnectionLost => {
                    LedgerError::Unavailable("database connection lost".into())
                }
                // The operator's to put right: logged with its reason, at most every 10 s (an
                // outage is thousands of calls, each logged as an internal error before). The
                // health ping does not see all of these (a read-only standby answers `SELECT 1`).
                DbErrorClass::Refused => {
                    static LAST: AtomicU64 = AtomicU64::new(0);
                    now_and_then(
                        &LAST,
                        &err,
                        "the database refuses the ledger's calls (answered UNAVAILABLE)",
                    );
                    LedgerError::Unavailable("database unavailable".into())
                }
                // Rolled back whole: repeating the call is safe (it used to be an internal error).
                DbErrorClass::Cancelled => LedgerError::Unavailable(
                    "a database statement was cancelled (a statement_timeout, or an \
                     administrator); retry"
                        .into(),
                ),
                // The statement did not run (a DBA's `lock_timeout`): it was `INTERNAL`, final to
                // a router.
                DbErrorClass::LockNotGranted => LedgerError::Unavailable(
                    "a database lock was not granted within its lock_timeout; retry".into(),
                ),
                DbErrorClass::SessionShared => LedgerError::Internal(format!(
                    "{err} (a connection pooler in transaction mode? the ledger needs session \
                     pooling: docs/operations.md, \"Postgres settings\")"
                )),
                DbErrorClass::UniqueViolation
                | DbErrorClass::CheckViolation
                | DbErrorClass::Other => LedgerError::Internal(err.to_string()),
            },
        }
    }
}

/// Logs a database's refusal, at most once per 10 s per kind (`last_logged`: when its kind was
/// last logged, so one kind does not hide another).
fn now_and_then(last_logged: &AtomicU64, err: &sqlx::Error, what: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = last_logged.load(Ordering::Relaxed);
    if now >= last + 10
        && last_logged
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(error = %err, "{what}");
    }
}
