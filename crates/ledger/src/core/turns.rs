//! Each caller's share of the analytics turns (`Store::analytics_turn`, a few per ledger): at
//! most half of them answer one account (or the admin) at a time; its other answers wait behind
//! its own. One account that recorded millions of rows of its own and kept ~20 expensive
//! answers in flight held every turn, and every other account's analytics waited 30 s and
//! answered 503 (a dashboard reviewer's finding).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Caller;
use crate::error::{LedgerError, Result};
use crate::store::ANALYTICS_WAIT;

/// The callers with analytics answers in flight, each with its share's semaphore.
#[derive(Debug)]
pub struct CallerTurns {
    per_caller: usize,
    callers: Mutex<HashMap<Option<i64>, Arc<Semaphore>>>,
}

/// A caller's place among its own analytics answers; held for the whole answer.
pub struct CallerTurn<'a> {
    permit: Option<OwnedSemaphorePermit>,
    key: Option<i64>,
    turns: &'a CallerTurns,
}

impl CallerTurns {
    /// Shares of `turns`, the ledger's analytics turns: half each, at least one.
    pub fn new(turns: usize) -> Self {
        Self {
            per_caller: (turns / 2).max(1),
            callers: Mutex::default(),
        }
    }

    fn callers(&self) -> MutexGuard<'_, HashMap<Option<i64>, Arc<Semaphore>>> {
        self.callers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The caller's next place, or `UNAVAILABLE` after the analytics' own wait.
    pub async fn take(&self, caller: &Caller) -> Result<CallerTurn<'_>> {
        let key = match caller {
            Caller::Admin => None,
            Caller::Account(a) => Some(a.id),
        };
        let share = (self.callers().entry(key))
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_caller)))
            .clone();
        let permit = tokio::time::timeout(ANALYTICS_WAIT, share.acquire_owned()).await;
        match permit {
            Ok(Ok(permit)) => Ok(CallerTurn {
                permit: Some(permit),
                key,
                turns: self,
            }),
            _ => {
                self.forget_if_idle(key);
                Err(LedgerError::Unavailable(
                    "too many of your analytics answers in progress; retry".into(),
                ))
            }
        }
    }

    /// Drops a caller's entry once nothing holds or waits for its share (the map would keep one
    /// per account that ever asked).
    fn forget_if_idle(&self, key: Option<i64>) {
        let mut callers = self.callers();
        if callers.get(&key).is_some_and(|s| Arc::strong_count(s) == 1) {
            callers.remove(&key);
        }
    }

    /// How many callers have an entry.
    #[cfg(test)]
    fn callers_tracked(&self) -> usize {
        self.callers().len()
    }
}

impl Drop for CallerTurn<'_> {
    fn drop(&mut self) {
        // The permit first: it holds the share too.
        drop(self.permit.take());
        self.turns.forget_if_idle(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Identity;

    fn account(id: i64) -> Caller {
        Caller::Account(Arc::new(Identity {
            id,
            email: format!("a{id}@example.com"),
            currency: "USD".into(),
        }))
    }

    /// One caller holds at most half the turns; another caller still gets one at once; entries
    /// go once their answers end.
    #[tokio::test]
    async fn a_caller_holds_half_the_turns_at_most() {
        let turns = CallerTurns::new(4);
        let (busy, other) = (account(1), account(2));
        let first = turns.take(&busy).await.expect("first");
        let second = turns.take(&busy).await.expect("second");
        let third = tokio::time::timeout(std::time::Duration::from_millis(100), turns.take(&busy));
        assert!(
            third.await.is_err(),
            "a third waits behind the caller's own two"
        );
        let elsewhere = turns.take(&other).await.expect("another caller's");
        let admin = turns.take(&Caller::Admin).await.expect("the admin's");
        assert_eq!(turns.callers_tracked(), 3);
        drop((first, elsewhere, admin));
        assert_eq!(turns.callers_tracked(), 1, "only the busy caller's is left");
        let third = turns.take(&busy).await.expect("a place freed");
        drop((second, third));
        assert_eq!(turns.callers_tracked(), 0);
    }
}
