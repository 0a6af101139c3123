//! The tries of one request id (docs/router.md, "A failed request's id is retried").
//!
//! A paid request's id is its hold's idempotency key, so a retry after a failure used to find
//! the voided hold and was refused as already processed: a client that sent an `Idempotency-Key`,
//! as the docs advise, lost the SDKs' retries of a 503 that the same client without a key got.
//! A try that charged nothing does not spend the id ([`uncharged`]): each try after one places its
//! hold under a key of its own ([`attempt_key`]). (A charge spends it, and so does a refusal the
//! ledger keeps under the key, replayed as it stands, and the last try.) The ledger's idempotency then holds per try, so
//! duplicates of a retry (two replicas, a resend) still call the upstream once and charge once,
//! and a charged request's id is still answered from the ledger (its stored answer, or the
//! refusal saying it was charged).

use syft_proto::ledger::{Transfer, TransferStatus};

/// How many tries one request id gets. Past them the id is refused as processed: a client that
/// resends one id forever (a fixed key in a loop) should learn to make a new one, and each retry
/// reads the earlier tries' transfers first.
pub(super) const MAX_ATTEMPTS: u32 = 8;

/// The ledger key of a request id's `attempt`th try (from 1): the id itself, as it always was,
/// then the id with ` (attempt N)`. A request id is visible ASCII (`validate.rs`), never a space,
/// so no request's own id is another's try.
pub(super) fn attempt_key(request_id: &str, attempt: u32) -> String {
    match attempt {
        0 | 1 => request_id.to_string(),
        n => format!("{request_id} (attempt {n})"),
    }
}

/// Whether a resolved transfer charged nothing: voided (its upstream failed, its client left, its
/// capture was refused, or its answer cost nothing: all its tokens free, a search that found
/// nothing) or expired. Its id may be tried again: a charged answer is what a retry must get back
/// (replayed) rather than pay for twice, but an uncharged one is not stored, and running it again
/// charges only if the new answer costs something.
pub(super) fn uncharged(t: &Transfer) -> bool {
    t.status() == TransferStatus::Cancelled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_try_keeps_the_request_id_and_later_ones_cannot_be_a_request_id() {
        assert_eq!(attempt_key("req-1", 1), "req-1");
        assert_eq!(attempt_key("req-1", 2), "req-1 (attempt 2)");
        assert!(!crate::validate::is_usable_request_id(&attempt_key(
            "req-1", 2
        )));
        let longest = "x".repeat(crate::validate::MAX_REQUEST_ID_LEN);
        let key = attempt_key(&longest, MAX_ATTEMPTS);
        assert!(key.len() <= 200, "the ledger's key limit: {}", key.len());
    }

    #[test]
    fn only_a_charge_spends_its_id() {
        for reason in [
            "upstream timed out",
            "request cancelled",
            "nothing to charge",
        ] {
            let cancelled = Transfer {
                status: TransferStatus::Cancelled as i32,
                cancel_reason: reason.into(),
                ..Transfer::default()
            };
            assert!(uncharged(&cancelled), "{reason}");
        }
        for status in [TransferStatus::Completed, TransferStatus::Pending] {
            let t = Transfer {
                status: status as i32,
                ..Transfer::default()
            };
            assert!(!uncharged(&t), "{status:?}");
        }
    }
}
