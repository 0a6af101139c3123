//! A ledger's refusal in the router's terms: [`map_status`] reads the ledger's machine-readable
//! reason (`ErrorInfo.reason`), never its message text, to tell the user's problem from the
//! router's own (a refused credential, a hold life the ledger does not grant) and from an outage.

use syft_error::Reason;
use tonic::Code;
use tonic_types::StatusExt;

use super::Op;
use crate::error::RouterError;

/// The transfer an idempotency key holds, named by the ledger's `IDEMPOTENCY_CONFLICT` refusal.
pub(super) fn keyed_transfer(s: &tonic::Status) -> Option<String> {
    (ledger_reason(s) == Some(Reason::IdempotencyConflict))
        .then(|| syft_error::info_metadata(s, syft_error::KEYED_TRANSFER))
        .flatten()
}

/// The ledger's machine-readable reason (`ErrorInfo.reason`), if it sent one we know.
pub(super) fn ledger_reason(s: &tonic::Status) -> Option<Reason> {
    syft_error::reason_of(s).and_then(|r| r.parse().ok())
}

/// Ledger status -> router error. The ledger's own messages are client-safe for business
/// errors; transport and internal failures become a generic `UNAVAILABLE`.
pub(crate) fn map_status(op: Op, s: tonic::Status) -> RouterError {
    let msg = s.message().to_string();
    match s.code() {
        // The router's hold setting, not the user's input (`Ledger::granted_ttl`). An extension
        // refused so stays `INVALID_ARGUMENT`: its guard stops extending (a replica with a lower
        // maximum than the one that placed the hold), where a retryable error was asked again
        // at every tick.
        Code::InvalidArgument
            if matches!(op, Op::Authorize)
                && ledger_reason(&s) == Some(Reason::HoldTtlOutOfRange) =>
        {
            tracing::error!(?op, detail = %msg, "the ledger refuses this router's hold life");
            RouterError::Unavailable("the ledger refuses this router's hold life".into())
        }
        Code::InvalidArgument => RouterError::InvalidArgument(msg),
        Code::FailedPrecondition => RouterError::FailedPrecondition {
            // Without a reason the router knows, the code's own name (in the error table), not
            // one of its own making (`LEDGER_REJECTED` was in none).
            reason: ledger_reason(&s)
                .map(Reason::as_str)
                .unwrap_or(syft_error::ErrorCode::FailedPrecondition.as_str()),
            message: msg,
        },
        Code::PermissionDenied if ledger_reason(&s) == Some(Reason::TokenLimitExceeded) => {
            RouterError::TokenSpendLimit(msg)
        }
        Code::PermissionDenied if ledger_reason(&s) == Some(Reason::TokenInvalid) => {
            RouterError::ForeignToken(msg)
        }
        Code::PermissionDenied => match ledger_reason(&s) {
            Some(r @ (Reason::TokenRevoked | Reason::TokenExpired)) => RouterError::TokenEnded {
                reason: r.as_str(),
                message: msg,
            },
            _ => RouterError::PermissionDenied(msg),
        },
        // This router placed the hold it resolves, so the ledger lost it (a hold committed
        // asynchronously and lost in a Postgres crash, docs/design.md): nothing was charged, and
        // a retry of the request places a new one. It was a 404 `invalid_request_error` naming
        // the transfer, which clients do not retry.
        // (A void or an extension of a lost hold keeps its own handling: nothing is held.)
        Code::NotFound if matches!(op, Op::Capture) => {
            tracing::error!(?op, detail = %msg, "the ledger lost this router's hold");
            RouterError::Unavailable(
                "the ledger lost the hold on your funds; nothing was charged: retry the request"
                    .into(),
            )
        }
        Code::NotFound => RouterError::NotFound(msg),
        // The key was used by a request with other parameters: this one never runs under it.
        Code::AlreadyExists if ledger_reason(&s) == Some(Reason::IdempotencyConflict) => {
            RouterError::Processed {
                reason: Reason::IdempotencyConflict,
                message: msg,
            }
        }
        Code::AlreadyExists => RouterError::AlreadyExists(msg),
        Code::ResourceExhausted => match ledger_reason(&s) {
            // The ledger refuses this router's address for failed authentications (a router with
            // a stale secret, or a neighbour behind the same address): a deployment problem, as
            // a refused credential is, not the user's quota.
            Some(Reason::AuthLocked) => {
                tracing::error!(?op, detail = %msg, "the ledger refuses this router's address");
                RouterError::Unavailable("ledger refuses this router's address".into())
            }
            // A budget or token-window refusal: passed on with the ledger's retry time.
            Some(reason) => RouterError::Quota(Box::new(crate::error::QuotaRefusal {
                reason,
                details: syft_error::QuotaDetails {
                    retry_after: syft_error::retry_after_of(&s),
                    violations: s
                        .get_details_quota_failure()
                        .map(|q| {
                            q.violations
                                .into_iter()
                                .map(|v| (v.subject, v.description))
                                .collect()
                        })
                        .unwrap_or_default(),
                },
                message: msg,
                headers: Default::default(),
                never_fits: false,
            })),
            None => RouterError::ResourceExhausted(msg),
        },
        Code::Unauthenticated => {
            // The router's own credential was refused: a deployment problem, not the user's.
            tracing::error!(?op, "ledger rejected the router's credentials");
            RouterError::Unavailable("ledger rejected the router's credentials".into())
        }
        // A ledger older than the call (mixed versions during an upgrade): said as such, where
        // "ledger unavailable" sent its operator looking for an outage.
        Code::Unimplemented => {
            static LINE: crate::log_throttle::LogThrottle = crate::log_throttle::LogThrottle::new();
            if LINE.allow() {
                tracing::error!(?op, detail = %msg, "the ledger does not know this call: an older version (upgrade ledgers first, docs/operations.md \"Upgrades\"), or what answers at its address is not a ledger (a proxy's 404)");
            }
            RouterError::Unavailable(
                "the ledger does not support this yet (an older version); nothing was charged"
                    .into(),
            )
        }
        code => {
            tracing::warn!(?op, ?code, detail = %msg, "ledger call failed");
            RouterError::Unavailable("ledger unavailable".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A capture of a hold this router placed that the ledger no longer knows: the ledger lost
    /// it, and the client gets a retryable 503, not a 404 naming the transfer (which clients do
    /// not retry). A lost hold's extension or void keeps its own handling (nothing is held).
    #[test]
    fn a_lost_hold_is_unavailable_not_found_elsewhere() {
        let lost = || tonic::Status::not_found("transfer 01-x not found");
        let e = map_status(Op::Capture, lost());
        assert!(
            matches!(&e, RouterError::Unavailable(m) if m.contains("retry")),
            "{e:?}"
        );
        for op in [Op::ExtendHold, Op::Void, Op::GetAccount] {
            let e = map_status(op, lost());
            assert!(matches!(e, RouterError::NotFound(_)), "{op:?}: {e:?}");
        }
    }

    /// A call an older ledger does not know says so (mixed versions during an upgrade): it was
    /// "ledger unavailable", which sent an operator looking for an outage.
    #[test]
    fn a_call_an_older_ledger_lacks_says_so() {
        let e = map_status(
            Op::CheckToken,
            tonic::Status::unimplemented("unknown method"),
        );
        assert!(
            matches!(&e, RouterError::Unavailable(m) if m.contains("older version")),
            "{e:?}"
        );
    }
}
