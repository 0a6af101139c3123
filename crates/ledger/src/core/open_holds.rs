//! The holds this process placed and has not seen resolved: requests of routers still in flight,
//! whose capture or void is to come. A stopping ledger takes calls while one is open (within
//! half its grace, `serve`), so that routers stopping beside it capture what they answered and
//! void what they did not. A hold resolved through another replica, or by the sweep, stays here
//! until it expires; the map is pruned of expired holds as it grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::domain::TransferStatus;
use crate::store::TransferRow;

/// Pruned of expired holds each time it grows past the size it had after the last pruning,
/// doubled (and at least this).
const PRUNE_FROM: usize = 1_024;

/// The most holds tracked (about 10 MB): past it a new hold is not kept, and the map counts as
/// open until the latest of those expires (holds resolved through other replicas, which stay
/// until they expire, could otherwise grow it with the request rate times the hold's life).
const MAX_TRACKED: usize = 100_000;

#[derive(Clone, Default)]
pub struct OpenHolds(Arc<Mutex<Holds>>);

#[derive(Default)]
struct Holds {
    /// Transfer id → when its hold expires (micros).
    expires: HashMap<String, i64>,
    prune_at: usize,
    /// When the latest hold not kept (past [`MAX_TRACKED`]) expires.
    untracked_until: i64,
}

impl OpenHolds {
    /// `t` was placed (or found placed, or extended) by a call to this process.
    pub(crate) fn placed(&self, t: &TransferRow, now: i64) {
        if t.status == TransferStatus::Pending {
            self.open(&t.id, t.expires_at, now);
        }
    }

    fn open(&self, id: &str, expires_at: i64, now: i64) {
        let Ok(mut holds) = self.0.lock() else { return };
        if holds.expires.len() >= holds.prune_at.max(PRUNE_FROM) {
            holds.expires.retain(|_, expires| *expires > now);
            holds.prune_at = holds.expires.len() * 2;
        }
        if holds.expires.len() >= MAX_TRACKED && !holds.expires.contains_key(id) {
            holds.untracked_until = holds.untracked_until.max(expires_at);
            return;
        }
        holds.expires.insert(id.to_string(), expires_at);
    }

    /// Transfer `id` was captured or voided through this process.
    pub(crate) fn resolved(&self, id: &str) {
        if let Ok(mut holds) = self.0.lock() {
            holds.expires.remove(id);
        }
    }

    /// Whether a hold placed here is still open and unexpired at `now`.
    pub fn any_open(&self, now: i64) -> bool {
        self.0.lock().is_ok_and(|mut holds| {
            holds.expires.retain(|_, expires| *expires > now);
            !holds.expires.is_empty() || holds.untracked_until > now
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_until_resolved_or_expired_and_pruned_as_it_grows() {
        let open = OpenHolds::default();
        open.open("a", 100, 0);
        assert!(open.any_open(50));
        open.resolved("a");
        assert!(!open.any_open(50), "resolved");
        open.open("c", 100, 0);
        assert!(!open.any_open(100), "expired");
        for n in 0..PRUNE_FROM {
            open.open(&format!("x{n}"), 10, 0);
        }
        open.open("late", 1_000, 500);
        let kept = open.0.lock().map(|h| h.expires.len()).unwrap_or_default();
        assert_eq!(kept, 1, "the expired ones were pruned");
        // Past the most tracked, a hold is not kept, and counts as open until it expires.
        for n in 0..MAX_TRACKED {
            open.open(&format!("y{n}"), 2_000, 600);
        }
        open.open("over", 3_000, 700);
        assert!(open.0.lock().is_ok_and(|h| !h.expires.contains_key("over")));
        assert!(open.any_open(2_500), "the untracked hold");
        assert!(!open.any_open(3_000));
    }
}
