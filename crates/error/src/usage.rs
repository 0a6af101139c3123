//! The status of a usage row: how a request ended. Sent over the wire and stored as its text
//! (`as_str`), so rows stay readable with plain SQL; both services name it only through this enum.

/// The most a usage row's counts (tokens, milliseconds) may say; the ledger refuses more
/// (`INVALID_ARGUMENT`), so the router clamps what an upstream reports to it. A billion is far
/// above any real request, and low enough that the rollups' 64-bit sums of one key cannot be
/// overflowed (that would take 9.2 billion rows; at 10^12 a row, 9.2 million rows of an owner's
/// own app would have failed every fold, and so every analytics query and `verify`).
pub const MAX_USAGE_COUNT: i64 = 1_000_000_000;

/// The largest answer the ledger stores with a capture, in bytes: the default gRPC message size,
/// so a stored answer can always be read back in one message. A router's own cap
/// (`--answer-max-bytes`) may not be larger: a capture whose answer the ledger refuses would fail
/// after the upstream answered.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// The longest `model` (and `app_name`) a usage row stores, in bytes; no control characters.
/// The router checks a request's model against it before the hold, because a capture or void
/// whose row the ledger refuses would leave the hold pending until it expires.
pub const MAX_USAGE_NAME: usize = 200;

/// How a request ended, as recorded in its usage row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageStatus {
    /// Answered (and captured, when paid).
    Success,
    /// The upstream failed or answered with an error status.
    UpstreamError,
    /// The upstream did not answer in time.
    Timeout,
    /// The upstream's answer was malformed or empty.
    InvalidResponse,
    /// The client went away or the router shut down before the answer.
    Cancelled,
    /// A search that succeeded without results (voided: users pay for answers).
    NoResults,
    /// The ledger refused the capture for good (the hold expired meanwhile): voided, and the
    /// answer withheld.
    CaptureRefused,
    /// Refused: a paid service was called without a transaction token.
    PaymentRequired,
    /// Refused: the ledger did not accept the token (unknown, revoked, expired, over its limit).
    TokenRefused,
    /// Refused: the payer's balance cannot cover the hold.
    InsufficientFunds,
    /// Refused: the request itself is invalid (bad input, unknown model, disabled service).
    InvalidRequest,
    /// Refused: the request id is in progress or was already processed.
    Duplicate,
    /// Refused: the ledger could not be reached or the router is shutting down.
    Unavailable,
    /// Refused: a rate or concurrency limit of the router (docs/limits.md).
    RateLimited,
    /// Refused: a spend budget of the recipient, or the token's limit per 24 hours (decided by
    /// the ledger when it places the hold).
    BudgetExceeded,
    /// Not admitted: the client left before its request was admitted (before its hold was asked
    /// for, or while it waited for a duplicate's outcome), so nothing was held or called; a retry
    /// of the same request id runs as new.
    Abandoned,
}

impl UsageStatus {
    pub const ALL: [UsageStatus; 16] = [
        Self::Success,
        Self::UpstreamError,
        Self::Timeout,
        Self::InvalidResponse,
        Self::Cancelled,
        Self::NoResults,
        Self::CaptureRefused,
        Self::PaymentRequired,
        Self::TokenRefused,
        Self::InsufficientFunds,
        Self::InvalidRequest,
        Self::Duplicate,
        Self::Unavailable,
        Self::RateLimited,
        Self::BudgetExceeded,
        Self::Abandoned,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::UpstreamError => "upstream_error",
            Self::Timeout => "timeout",
            Self::InvalidResponse => "invalid_response",
            Self::Cancelled => "cancelled",
            Self::NoResults => "no_results",
            Self::CaptureRefused => "capture_refused",
            Self::PaymentRequired => "payment_required",
            Self::TokenRefused => "token_refused",
            Self::InsufficientFunds => "insufficient_funds",
            Self::InvalidRequest => "invalid_request",
            Self::Duplicate => "duplicate",
            Self::Unavailable => "unavailable",
            Self::RateLimited => "rate_limited",
            Self::BudgetExceeded => "budget_exceeded",
            Self::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Refused before any upstream call or hold. A refused row does not take its request id: a
    /// client may retry the same id after a refusal, and that attempt gets its own row.
    pub const fn is_refusal(self) -> bool {
        matches!(
            self,
            Self::PaymentRequired
                | Self::TokenRefused
                | Self::InsufficientFunds
                | Self::InvalidRequest
                | Self::Duplicate
                | Self::Unavailable
                | Self::RateLimited
                | Self::BudgetExceeded
                | Self::Abandoned
        )
    }

    /// The app failed the request: its upstream erred, timed out or answered nonsense. What an
    /// app's error rate counts; a cancellation is the client's doing, a refusal the router's or
    /// the ledger's.
    pub const fn is_failure(self) -> bool {
        matches!(
            self,
            Self::UpstreamError | Self::Timeout | Self::InvalidResponse
        )
    }

    /// The statuses for which `pick` holds, as an SQL list: `('a', 'b')`.
    pub fn sql_list(pick: fn(Self) -> bool) -> String {
        let names: Vec<String> = Self::ALL
            .into_iter()
            .filter(|s| pick(*s))
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        format!("({})", names.join(", "))
    }
}

impl std::fmt::Display for UsageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::UsageStatus;

    #[test]
    fn names_round_trip_and_refusals_are_the_pre_upstream_ones() {
        for s in UsageStatus::ALL {
            assert_eq!(UsageStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(UsageStatus::parse("ok"), None);
        let refusals: Vec<_> = UsageStatus::ALL
            .into_iter()
            .filter(|s| s.is_refusal())
            .map(UsageStatus::as_str)
            .collect();
        assert_eq!(
            refusals,
            [
                "payment_required",
                "token_refused",
                "insufficient_funds",
                "invalid_request",
                "duplicate",
                "unavailable",
                "rate_limited",
                "budget_exceeded",
                "abandoned"
            ]
        );
        assert_eq!(
            UsageStatus::sql_list(UsageStatus::is_failure),
            "('upstream_error', 'timeout', 'invalid_response')"
        );
    }
}
