//! The in-process limiter: exact for one router, needs no server (the embedded default).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::{
    refusal_rank, retry_after, Limiter, LimiterError, Reply, Rule, Slots, Verdict, WindowState,
    DEFAULT_RUNNING_FOR,
};

/// Above this many keys, a sweep drops the windows whose entries have all aged out.
const SWEEP_ABOVE: usize = 100_000;
/// Above [`SWEEP_ABOVE`] keys, a sweep runs at least this often, whatever the map's growth.
const SWEEP_EVERY_MS: u64 = 60_000;

struct Entry {
    added_ms: u64,
    lease: String,
    cost: u64,
    /// A token reservation not settled yet: its request is still running.
    running: bool,
}

#[derive(Default)]
struct Window {
    /// Oldest first.
    entries: VecDeque<Entry>,
    total: u64,
    /// The window's length, as its rule last said: the sweep ages entries out with it.
    window_ms: u64,
}

impl Window {
    fn expire(&mut self, now_ms: u64, window_ms: u64) {
        while let Some(e) = self.entries.front() {
            if e.added_ms.saturating_add(window_ms) > now_ms {
                break;
            }
            self.total = self.total.saturating_sub(e.cost);
            self.entries.pop_front();
        }
    }

    fn state(&self, limit: u64, window_ms: u64, now_ms: u64) -> WindowState {
        let reset = self
            .entries
            .back()
            .map(|e| e.added_ms.saturating_add(window_ms).saturating_sub(now_ms))
            .unwrap_or(0);
        WindowState {
            limit,
            remaining: limit.saturating_sub(self.total),
            reset: Duration::from_millis(reset),
        }
    }
}

/// Sliding windows in a map behind one mutex: a check is a few hash lookups, far below the cost
/// of anything else a request does, so one lock does not limit throughput.
pub struct MemoryLimiter {
    state: Mutex<State>,
    /// How long a reservation counts as running after its admission ([`DEFAULT_RUNNING_FOR`]).
    running_ms: u64,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        MemoryLimiter {
            state: Mutex::default(),
            running_ms: ms(DEFAULT_RUNNING_FOR),
        }
    }
}

#[derive(Default)]
struct State {
    windows: HashMap<String, Window>,
    /// The size at which the next sweep runs.
    sweep_above: usize,
    /// When the next sweep runs at the latest (window clock, ms).
    sweep_at_ms: u64,
}

impl MemoryLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reservations count as running for `running_for` after their admission.
    pub fn running_for(self, running_for: Duration) -> Self {
        MemoryLimiter {
            running_ms: ms(running_for),
            ..self
        }
    }

    fn locked(&self) -> Result<std::sync::MutexGuard<'_, State>, LimiterError> {
        self.state
            .lock()
            .map_err(|_| LimiterError::not_applied("limiter state poisoned"))
    }

    fn acquire_now(&self, now: u64, lease: &str, rules: &[Rule]) -> Result<Verdict, LimiterError> {
        let mut state = self.locked()?;
        let len = state.windows.len();
        if len > SWEEP_ABOVE && (len > state.sweep_above || now >= state.sweep_at_ms) {
            // Entries age out only when their key is checked again, so without this every user
            // ever seen (free users may send any email) would keep a window for good.
            state.windows.retain(|_, w| {
                w.expire(now, w.window_ms);
                !w.entries.is_empty()
            });
            // The windows left are live: sweep again once the map has doubled, not on every
            // check of a router with that many active users, or a minute from now. Only on
            // doubling, windows that aged out after a sweep found them live stayed until the map
            // doubled again (a day window's users, months on a steady router).
            state.sweep_above = state.windows.len().saturating_mul(2);
            state.sweep_at_ms = now.saturating_add(SWEEP_EVERY_MS);
        }
        let map = &mut state.windows;
        let mut refused = None;
        for (i, r) in rules.iter().enumerate() {
            let w = map.entry(r.key.clone()).or_default();
            let window_ms = ms(r.window);
            w.window_ms = window_ms;
            w.expire(now, window_ms);
            if w.total.saturating_add(r.cost) > r.limit {
                let entries = w.entries.iter().map(|e| (e.added_ms, e.cost));
                let retry = retry_after(entries, w.total, r.cost, r.limit, window_ms, now);
                let running: u64 = (w.entries.iter())
                    .filter(|e| e.running && now.saturating_sub(e.added_ms) < self.running_ms)
                    .map(|e| e.cost)
                    .sum();
                let awaits_running = running > 0
                    && w.total.saturating_sub(running).saturating_add(r.cost) <= r.limit;
                // The rule that refuses longest, as in Redis (`refusal_rank`).
                let rank = refusal_rank(r, retry, awaits_running);
                if refused.is_none_or(|(_, _, _, best)| rank > best) {
                    refused = Some((i, retry, awaits_running, rank));
                }
            }
        }
        if refused.is_none() {
            for r in rules.iter().filter(|r| r.cost > 0) {
                if let Some(w) = map.get_mut(&r.key) {
                    w.entries.push_back(Entry {
                        added_ms: now,
                        lease: lease.to_string(),
                        cost: r.cost,
                        running: r.reserves(),
                    });
                    w.total = w.total.saturating_add(r.cost);
                }
            }
        }
        let states = states(map, rules, now);
        Ok(match refused {
            None => Verdict::Admitted(states),
            Some((rule, retry_after, awaits_running, _)) => Verdict::Refused {
                rule,
                retry_after,
                awaits_running,
                states,
            },
        })
    }

    fn settle_now(&self, lease: &str, updates: &[(String, u64)]) -> Result<(), LimiterError> {
        let mut state = self.locked()?;
        for (key, cost) in updates {
            let Some(w) = state.windows.get_mut(key) else {
                continue;
            };
            // Settlements follow admissions closely, so the lease is near the back.
            let Some(pos) = w.entries.iter().rposition(|e| e.lease == lease) else {
                continue;
            };
            let old = w.entries[pos].cost;
            w.total = w.total.saturating_sub(old).saturating_add(*cost);
            if *cost == 0 {
                w.entries.remove(pos);
            } else {
                w.entries[pos].cost = *cost;
                w.entries[pos].running = false;
            }
        }
        Ok(())
    }

    fn renew_now(&self, now: u64, lease: &str, slots: Slots<'_>) -> Result<(), LimiterError> {
        let mut state = self.locked()?;
        for (key, window) in slots {
            let Some(w) = state.windows.get_mut(key) else {
                continue;
            };
            w.expire(now, ms(*window));
            let Some(pos) = w.entries.iter().rposition(|e| e.lease == lease) else {
                continue;
            };
            // Moved to the back, as a new entry: `expire` reads the entries oldest first.
            if let Some(mut e) = w.entries.remove(pos) {
                e.added_ms = now.max(w.entries.back().map_or(0, |b| b.added_ms));
                w.entries.push_back(e);
            }
        }
        Ok(())
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn states(map: &HashMap<String, Window>, rules: &[Rule], now: u64) -> Vec<WindowState> {
    rules
        .iter()
        .map(|r| match map.get(&r.key) {
            Some(w) => w.state(r.limit, ms(r.window), now),
            None => WindowState {
                limit: r.limit,
                remaining: r.limit,
                reset: Duration::ZERO,
            },
        })
        .collect()
}

impl Limiter for MemoryLimiter {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn acquire<'a>(&'a self, now_ms: u64, lease: &'a str, rules: &'a [Rule]) -> Reply<'a, Verdict> {
        let r = self.acquire_now(now_ms, lease, rules);
        Box::pin(async move { r })
    }

    fn settle<'a>(&'a self, lease: &'a str, updates: &'a [(String, u64)]) -> Reply<'a, ()> {
        let r = self.settle_now(lease, updates);
        Box::pin(async move { r })
    }

    fn renew<'a>(&'a self, now_ms: u64, lease: &'a str, slots: Slots<'a>) -> Reply<'a, ()> {
        let r = self.renew_now(now_ms, lease, slots);
        Box::pin(async move { r })
    }

    fn peek<'a>(&'a self, now_ms: u64, rules: &'a [Rule]) -> Reply<'a, Vec<WindowState>> {
        let r = self.locked().map(|mut state| {
            for r in rules {
                if let Some(w) = state.windows.get_mut(&r.key) {
                    w.expire(now_ms, ms(r.window));
                }
            }
            states(&state.windows, rules, now_ms)
        });
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RuleKind;

    fn rule(key: String) -> Rule {
        Rule {
            key,
            kind: RuleKind::Requests,
            scope: "router",
            limit: 10,
            window: Duration::from_secs(1),
            cost: 1,
            describe: String::new(),
        }
    }

    /// Users seen once leave no window behind once their entries aged out: a check after the
    /// map grew past the sweep size drops them; live windows stay, with their counts.
    #[test]
    fn windows_of_users_gone_are_swept() {
        let limiter = MemoryLimiter::new();
        let live = rule("live-user".into());
        let admit = |now: u64, r: &Rule| {
            let verdict = limiter.acquire_now(now, "lease", std::slice::from_ref(r));
            assert!(matches!(verdict, Ok(Verdict::Admitted(_))));
        };
        for i in 0..=SWEEP_ABOVE {
            admit(1_000, &rule(format!("user-{i}")));
        }
        admit(2_500, &live);
        let windows = |l: &MemoryLimiter| l.locked().map(|s| s.windows.len()).unwrap_or(0);
        assert_eq!(windows(&limiter), 1, "only the live window is left");
        admit(2_600, &live);
        let peeked = limiter.peek(2_700, std::slice::from_ref(&live));
        let states = futures::executor::block_on(peeked).expect("peek");
        assert_eq!(states[0].remaining, 8, "the live window kept its count");
    }

    /// Windows a sweep found live and that aged out since are dropped within a minute, not when
    /// the map has doubled again (they stayed until then: a day window's users, for months).
    #[test]
    fn windows_found_live_are_swept_once_they_age_out() {
        let limiter = MemoryLimiter::new();
        let admit = |now: u64, r: &Rule| {
            let verdict = limiter.acquire_now(now, "lease", std::slice::from_ref(r));
            assert!(matches!(verdict, Ok(Verdict::Admitted(_))));
        };
        let long = |key: String| Rule {
            window: Duration::from_secs(30),
            ..rule(key)
        };
        for i in 0..=SWEEP_ABOVE {
            admit(1_000, &long(format!("user-{i}")));
        }
        // Past the sweep size: the sweep finds every window live (30 s windows) and keeps them.
        admit(2_000, &long("one-more".into()));
        let windows = |l: &MemoryLimiter| l.locked().map(|s| s.windows.len()).unwrap_or(0);
        assert_eq!(windows(&limiter), SWEEP_ABOVE + 2);
        // They age out at 31 s; a check a minute after that sweep drops them.
        admit(62_000, &rule("late".into()));
        assert_eq!(windows(&limiter), 1, "only the new window is left");
    }
}
