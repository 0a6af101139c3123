//! Turns for analytics answers, shared out fairly among the accounts that ask.
//!
//! A few answers run at once (a quarter of the pool on Postgres, one on SQLite); the rest wait.
//! A plain semaphore served waiters in arrival order, so one account keeping ~20 wide queries
//! queued made every other account wait behind all of them and time out (`UNAVAILABLE`). Here a
//! freed turn goes to the next *caller* in a round robin over the callers that wait, each caller's
//! own waiters in arrival order: a newcomer waits for one freed turn per caller ahead of it in the
//! round, however long a busy account's queue. It is work-conserving (no turn idles while anyone waits, so a lone dashboard
//! still runs on every turn), which a hard cap per account was not (design.md §7).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// Who an answer is for: the unit the turns are shared out by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Caller {
    /// The ledger's admin (answers over every account, or one currency's).
    Admin,
    /// An account asking about the apps it owns (its id).
    Owner(i64),
    /// An account asking about the requests it sent (its email).
    User(String),
}

/// The turns. Cheap to share: every [`Turn`] keeps the state alive.
pub(crate) struct FairTurns {
    state: Arc<Mutex<State>>,
}

struct State {
    /// Turns nobody holds. Only ever above 0 while nobody waits.
    free: usize,
    /// The callers that wait, in the order they are served next; a caller is here exactly
    /// while it has an entry in `waiting`.
    ring: VecDeque<Caller>,
    /// Each waiting caller's waiters, oldest first (a waiter that gave up is skipped when reached).
    waiting: HashMap<Caller, VecDeque<oneshot::Sender<Turn>>>,
}

/// A turn, given back (to the next waiter, or to the free ones) when dropped.
pub(crate) struct Turn {
    /// `None` once given back, or while being handed on.
    state: Option<Arc<Mutex<State>>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is consistent between statements (no await, no panic inside), so a poisoned lock
    // still holds good state.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FairTurns {
    pub(crate) fn new(turns: usize) -> Self {
        let state = State {
            free: turns.max(1),
            ring: VecDeque::new(),
            waiting: HashMap::new(),
        };
        FairTurns {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// A turn for `caller`, or `None` after `wait`. The place in the queue is taken when this is
    /// called, not when the future is first polled (the order tests rely on it).
    pub(crate) fn take(
        &self,
        caller: Caller,
        wait: Duration,
    ) -> impl Future<Output = Option<Turn>> + use<> {
        let ready = {
            let mut s = lock(&self.state);
            if s.free > 0 {
                s.free -= 1;
                Ok(Turn {
                    state: Some(self.state.clone()),
                })
            } else {
                let (tx, rx) = oneshot::channel();
                if !s.waiting.contains_key(&caller) {
                    s.ring.push_back(caller.clone());
                }
                let queue = s.waiting.entry(caller).or_default();
                // Waiters that gave up are dropped here too, so a caller whose answers keep
                // timing out while every turn is busy does not grow its queue without end.
                queue.retain(|w| !w.is_closed());
                queue.push_back(tx);
                Err(rx)
            }
        };
        async move {
            match ready {
                Ok(turn) => Some(turn),
                // A turn sent just as the wait ended is dropped with the receiver, and so given on.
                Err(rx) => tokio::time::timeout(wait, rx).await.ok()?.ok(),
            }
        }
    }
}

impl State {
    /// The next waiter in the round robin, its caller moved to the back of the ring if it has more.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Turn>> {
        while let Some(caller) = self.ring.pop_front() {
            let Some(queue) = self.waiting.get_mut(&caller) else {
                continue;
            };
            // Waiters that gave up first: a caller whose first waiter timed out would otherwise
            // go to the back of the ring with its next waiter still unserved.
            while queue.front().is_some_and(oneshot::Sender::is_closed) {
                queue.pop_front();
            }
            let next = queue.pop_front();
            if queue.is_empty() {
                self.waiting.remove(&caller);
            } else {
                self.ring.push_back(caller);
            }
            if let Some(tx) = next {
                return Some(tx);
            }
        }
        None
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let mut turn = Turn {
            state: Some(state.clone()),
        };
        loop {
            // The lock is let go before sending: a send can drop the turn it carries (its waiter
            // gone meanwhile), and that drop comes back here.
            let next = {
                let mut s = lock(&state);
                let next = s.next_waiter();
                if next.is_none() {
                    s.free += 1;
                    turn.state = None;
                }
                next
            };
            let Some(tx) = next else {
                return;
            };
            match tx.send(turn) {
                Ok(()) => return,
                // That waiter gave up: the next one.
                Err(back) => turn = back,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    /// Each of `waiters` takes its place in order, then notes when it is served and gives its
    /// turn straight back; returns the order they were served in.
    async fn served_order(
        turns: &FairTurns,
        held: Turn,
        waiters: &[(&str, Caller)],
    ) -> Vec<String> {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, caller) in waiters {
            let take = turns.take(caller.clone(), LONG);
            let (order, name) = (order.clone(), name.to_string());
            tasks.push(tokio::spawn(async move {
                let turn = take.await.expect("served");
                order.lock().expect("order").push(name);
                drop(turn);
            }));
        }
        drop(held);
        for task in tasks {
            task.await.expect("task");
        }
        let order = order.lock().expect("order").clone();
        order
    }

    #[tokio::test]
    async fn a_newcomer_is_served_before_a_busy_callers_queue() {
        let turns = FairTurns::new(1);
        let held = turns.take(Caller::Owner(1), LONG).await.expect("free turn");
        let busy = Caller::Owner(1);
        let waiters = [
            ("a1", busy.clone()),
            ("a2", busy.clone()),
            ("a3", busy.clone()),
            ("b1", Caller::User("b@example.com".into())),
            ("admin", Caller::Admin),
        ];
        // First come first served would be a1 a2 a3 b1 admin.
        assert_eq!(
            served_order(&turns, held, &waiters).await,
            ["a1", "b1", "admin", "a2", "a3"]
        );
        // Every turn came back.
        assert_eq!(lock(&turns.state).free, 1);
    }

    #[tokio::test]
    async fn a_lone_caller_gets_every_turn() {
        let turns = FairTurns::new(3);
        let mut held = Vec::new();
        for _ in 0..3 {
            let take = turns.take(Caller::Owner(7), Duration::from_millis(1));
            held.push(take.await.expect("a free turn, no wait"));
        }
        let fourth = turns.take(Caller::Owner(7), Duration::from_millis(20));
        assert!(fourth.await.is_none(), "three turns, three held");
        drop(held);
        assert_eq!(lock(&turns.state).free, 3);
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_keeps_no_turn() {
        let turns = FairTurns::new(1);
        let held = turns.take(Caller::Admin, LONG).await.expect("free turn");
        let gave_up = turns.take(Caller::Owner(2), Duration::from_millis(10));
        assert!(gave_up.await.is_none());
        // Its place is still queued; the freed turn skips it and goes to the one behind it.
        let waiting = turns.take(Caller::Owner(3), LONG);
        drop(held);
        let turn = waiting.await.expect("served");
        drop(turn);
        let s = lock(&turns.state);
        assert_eq!((s.free, s.ring.len(), s.waiting.len()), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_caller_whose_first_waiter_gave_up_keeps_its_place() {
        let turns = FairTurns::new(1);
        let held = turns.take(Caller::Admin, LONG).await.expect("free turn");
        let a1 = turns.take(Caller::Owner(1), Duration::from_millis(10));
        let a2 = turns.take(Caller::Owner(1), LONG);
        let b1 = tokio::spawn(turns.take(Caller::Owner(2), LONG));
        assert!(a1.await.is_none());
        drop(held);
        // Owner 1 was first in the round: its next waiter is served, not the caller behind it.
        let turn = tokio::time::timeout(Duration::from_secs(5), a2)
            .await
            .expect("a2 served first")
            .expect("a turn");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!b1.is_finished(), "one turn, held by a2");
        drop(turn);
        let turn = b1.await.expect("task").expect("b1 served");
        drop(turn);
        assert_eq!(lock(&turns.state).free, 1);
    }

    #[tokio::test]
    async fn a_turn_handed_to_a_dropped_wait_is_given_on() {
        let turns = FairTurns::new(1);
        let held = turns.take(Caller::Admin, LONG).await.expect("free turn");
        // Queued, but never polled: the turn is sent into its channel, then dropped with it.
        let dropped = turns.take(Caller::Owner(2), LONG);
        let next = turns.take(Caller::Owner(3), LONG);
        drop(held);
        drop(dropped);
        let turn = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("not stuck")
            .expect("served");
        drop(turn);
        assert_eq!(lock(&turns.state).free, 1);
    }
}
