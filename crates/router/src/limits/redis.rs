//! The Redis limiter: the windows live in one Redis shared by every router replica; each check is
//! one Lua script, which Redis runs atomically, so replicas never admit more than the limit.
//!
//! A window is four keys: a sorted set of leases scored by the time they were added
//! (`<key>:z`), a hash of their costs (`<key>:c`), their running total (`<key>:s`) and, in a token
//! window, the set of leases whose reservation is not settled yet (`<key>:r`, their requests still
//! running; a refusal they cause waits for one to end, not for the window). The four
//! suffixes have one length, so no user's key (which ends in their email, `gate.rs`) plus a
//! suffix can spell another user's: with the set at bare `<key>`, the email `a@x.io:s` named the
//! total of `a@x.io`, and its first request made that user's every check fail (`WRONGTYPE`).
//! Every key expires a second after its window, so an idle user leaves nothing behind (a
//! take-back's tombstone, `SETTLE`, lives 10 minutes). Windows age by Redis's clock, the one
//! clock every replica shares.

use std::sync::Arc;
use std::time::Duration;

use super::redis_conn::Conn;
use super::{Limiter, LimiterError, Reply, Rule, Slots, Verdict, WindowState, DEFAULT_RUNNING_FOR};

/// The start of the scripts that take a time: `now` is ARGV[1] in ms, or Redis's own clock when
/// that is -1 (`RedisLimiter::server_clock`).
const CLOCK: &str = r"
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
";

/// KEYS: four per rule (set, costs, total, running), then, when recording, the lease's tombstone
/// ([`tombstone_key`]). ARGV: now (ms, or -1 for Redis's own clock), lease, record (1) or peek
/// (0), how long a reservation counts as running after its admission (ms), then per rule: limit,
/// window_ms, cost, kind (1: a concurrency rule, whose wait is a
/// request ending, not a time; 2: a token window, whose entries are reservations running until
/// settled; 0: neither). Returns `{refused rule (1-based, 0 = none), retry_ms (-1 = none),
/// awaits running (1 or 0), then per rule: total, reset_ms}`; of several refusing rules, the one
/// that refuses longest (one the cost never fits, else the latest retry; a slot's, or a token
/// window's that running reservations fill, only when nothing else refuses), so a client waits
/// once, for a retry that passes. A lease with a tombstone is not recorded: it was taken back
/// before it arrived.
const ACQUIRE: &str = r"
local lease = ARGV[2]
local record = ARGV[3] == '1'
local running_ms = tonumber(ARGV[4])
local n = math.floor(#KEYS / 4)
if #KEYS % 4 == 1 and redis.call('EXISTS', KEYS[#KEYS]) == 1 then record = false end
local refused, retry, awaits, best = 0, -1, 0, -1
local totals = {}
for i = 1, n do
  local z, h, s, run = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i]
  local limit, window, cost = tonumber(ARGV[4*i+1]), tonumber(ARGV[4*i+2]), tonumber(ARGV[4*i+3])
  local cutoff = now - window
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for j = 1, #old, 500 do
      local chunk = {}
      for k = j, math.min(j + 499, #old) do chunk[#chunk + 1] = old[k] end
      for _, c in ipairs(redis.call('HMGET', h, unpack(chunk))) do freed = freed + (tonumber(c) or 0) end
      redis.call('HDEL', h, unpack(chunk))
      redis.call('SREM', run, unpack(chunk))
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
    if redis.call('EXISTS', z) == 0 then redis.call('DEL', s, run) else redis.call('DECRBY', s, freed) end
  end
  local total = tonumber(redis.call('GET', s) or '0')
  if total < 0 then total = 0 end
  totals[i] = total
  if total + cost > limit then
    local r = -1
    if cost <= limit then
      local left, start = total, 0
      while r < 0 do
        local batch = redis.call('ZRANGE', z, start, start + 99, 'WITHSCORES')
        if #batch == 0 then break end
        for k = 1, #batch, 2 do
          left = left - (tonumber(redis.call('HGET', h, batch[k])) or 0)
          if left + cost <= limit then
            r = math.max(1, tonumber(batch[k + 1]) + window - now)
            break
          end
        end
        start = start + 100
      end
    end
    -- Reservations of requests still running are settled to their real count when they end:
    -- if the request fits without them, its wait is for one to end.
    local waits = 0
    if ARGV[4*i+4] == '2' then
      -- Running: admitted within `running_ms` (a dead replica's never settle).
      local running = 0
      local leases = redis.call('SMEMBERS', run)
      for j = 1, #leases, 500 do
        local chunk = {}
        for k = j, math.min(j + 499, #leases) do chunk[#chunk + 1] = leases[k] end
        for k, c in ipairs(redis.call('HMGET', h, unpack(chunk))) do
          local at = tonumber(redis.call('ZSCORE', z, chunk[k]) or '0')
          if at > now - running_ms then running = running + (tonumber(c) or 0) end
        end
      end
      if running > 0 and total - running + cost <= limit then waits = 1 end
    end
    -- The rule that refuses longest is the one to report: never fitting beats any time, and
    -- a wait for a request to end (a slot, a running reservation) only counts when nothing
    -- else refuses (`refusal_rank` in mod.rs).
    local rank = r
    if ARGV[4*i+4] == '1' or waits == 1 then rank = 0 elseif r < 0 then rank = math.huge end
    if rank > best then refused, retry, awaits, best = i, r, waits, rank end
  end
end
if refused == 0 and record then
  for i = 1, n do
    local z, h, s, run = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i]
    local window, cost = tonumber(ARGV[4*i+2]), tonumber(ARGV[4*i+3])
    if cost > 0 then
      redis.call('ZADD', z, now, lease)
      redis.call('HSET', h, lease, cost)
      redis.call('INCRBY', s, cost)
      totals[i] = totals[i] + cost
      local keys = {z, h, s}
      if ARGV[4*i+4] == '2' then
        redis.call('SADD', run, lease)
        keys[4] = run
      end
      for _, k in ipairs(keys) do redis.call('PEXPIRE', k, window + 1000) end
    end
  end
end
local out = {refused, retry, awaits}
for i = 1, n do
  local window = tonumber(ARGV[4*i+2])
  local newest = redis.call('ZRANGE', KEYS[4*i-3], -1, -1, 'WITHSCORES')
  local reset = 0
  if #newest > 0 then reset = math.max(0, tonumber(newest[2]) + window - now) end
  out[#out + 1] = totals[i]
  out[#out + 1] = reset
end
return out
";

/// KEYS: four per window (set, costs, total, running), then, for a take-back only, the lease's
/// tombstone. ARGV: lease, the tombstone's life in ms, then the new cost per window. A settled
/// lease is no longer running. A take-back of a lease no window holds leaves the tombstone: if
/// the lease's check is still on its way (it overtook the check, on another connection), the
/// check then records nothing.
const SETTLE: &str = r"
local lease = ARGV[1]
local missing = false
for i = 1, math.floor(#KEYS / 4) do
  local z, h, s, run = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i]
  local cost = tonumber(ARGV[i + 2])
  local old = redis.call('HGET', h, lease)
  redis.call('SREM', run, lease)
  if old then
    if cost == 0 then
      redis.call('ZREM', z, lease)
      redis.call('HDEL', h, lease)
    else
      redis.call('HSET', h, lease, cost)
    end
    -- An emptied window leaves no total behind: a stranger's requests, each naming a new email
    -- and taken back when the ledger refused its token, left a zero for a window's life apiece.
    if redis.call('EXISTS', z) == 0 then
      redis.call('DEL', s, run)
    else
      redis.call('INCRBY', s, cost - tonumber(old))
    end
  elseif cost == 0 then
    missing = true
  end
end
if missing and #KEYS % 4 == 1 then redis.call('SET', KEYS[#KEYS], '1', 'PX', ARGV[2]) end
return 1
";

/// KEYS: four per window (set, costs, total, running). ARGV: now (ms, or -1 for Redis's own
/// clock), lease, then each window's length in ms. Moves the lease's entry to now in each window
/// that still holds it, and the window's keys' expiry with it.
const RENEW: &str = r"
local lease = ARGV[2]
for i = 1, math.floor(#KEYS / 4) do
  local z, h, s, run = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i]
  if redis.call('ZSCORE', z, lease) then
    redis.call('ZADD', z, 'XX', now, lease)
    for _, k in ipairs({z, h, s, run}) do redis.call('PEXPIRE', k, tonumber(ARGV[i + 2]) + 1000) end
  end
end
return 1
";

/// How long a tombstone keeps a late check from recording: longer than a check can wait in a
/// queue (a paused Redis) or in a closed connection's unsent data (Linux retransmits an orphaned
/// socket's data for about two minutes at LAN round trips, `tcp_orphan_retries`). Only take-backs
/// that found nothing leave one: checks that never arrived, or that were refused.
const TOMBSTONE_LIFE_MS: u64 = 600_000;

/// The key that says `lease` was taken back. Outside the windows' `syft:rl2:` space, and a lease
/// is a UUID the router made, so no user or app name can spell it.
fn tombstone_key(lease: &str) -> String {
    format!("syft:rl-gone:{lease}")
}

/// Whether a failed call surely never reached Redis: no connection could be made to send it on
/// (refused, or not made within the connect timeout: the connection has no response timeout of
/// its own, so a time-out it reports is a connect's). Anything else may have run.
fn never_sent(e: &redis::RedisError) -> bool {
    e.is_connection_refusal() || e.is_timeout()
}

/// The four keys of a window, in the scripts' order: set, costs, total, running (the module docs
/// say why each has a suffix).
fn window_keys(key: &str) -> [String; 4] {
    [
        format!("{key}:z"),
        format!("{key}:c"),
        format!("{key}:s"),
        format!("{key}:r"),
    ]
}

/// How long a settle waits for Redis (or the checks' `limiter.timeout`, if longer): settles run
/// in the background (`settle.rs`), and one given up on stays queued on the connection and runs
/// when Redis wakes, so a short wait only queued more copies of it behind a paused store. A settle is
/// also more than one round trip when its script is not loaded yet (a restarted Redis answers
/// `NOSCRIPT`, then the script is loaded and sent again), and a wait cut between them lost it.
/// Settles share the connection of the checks they follow, so a take-back normally runs after the
/// check it takes back; one that overtakes it (the connection was replaced meanwhile) leaves a
/// tombstone instead (`SETTLE`).
const SETTLE_PATIENCE: Duration = Duration::from_secs(5);

pub struct RedisLimiter {
    /// Replaced when it stops answering while Redis answers (`redis_conn.rs`).
    conn: Arc<Conn>,
    timeout: Duration,
    acquire: redis::Script,
    settle: redis::Script,
    renew: redis::Script,
    /// Windows age by Redis's clock (`TIME` in the script), one clock for every replica: with
    /// each router's own clock, a replica running ahead aged the others' entries out early and
    /// admitted more than the limit. Tests that move time by hand use the caller's clock.
    server_clock: bool,
    /// How long a reservation counts as running after its admission ([`DEFAULT_RUNNING_FOR`]).
    running_for: Duration,
}

impl RedisLimiter {
    /// Parses the URL now (a bad one is refused at start) and connects lazily, so a router
    /// starts while Redis is down and follows its `on_failure` mode until Redis is back. Must be
    /// called inside a Tokio runtime.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, LimiterError> {
        let conn = Conn::new(url, timeout)?;
        Ok(RedisLimiter {
            conn,
            timeout,
            acquire: redis::Script::new(&format!("{CLOCK}{ACQUIRE}")),
            settle: redis::Script::new(SETTLE),
            renew: redis::Script::new(&format!("{CLOCK}{RENEW}")),
            server_clock: true,
            running_for: DEFAULT_RUNNING_FOR,
        })
    }

    /// Reservations count as running for `running_for` after their admission.
    pub fn running_for(self, running_for: Duration) -> Self {
        RedisLimiter {
            running_for,
            ..self
        }
    }

    /// [`RedisLimiter::new`] whose windows age by the `now` each call passes instead of by
    /// Redis's clock: for tests that move time by hand.
    pub fn with_caller_clock(url: &str, timeout: Duration) -> Result<Self, LimiterError> {
        Ok(RedisLimiter {
            server_clock: false,
            ..Self::new(url, timeout)?
        })
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<T, LimiterError> {
        let (generation, mut conn) = self.conn.get();
        let answer = tokio::time::timeout(timeout, inv.invoke_async(&mut conn)).await;
        if answer.is_err() {
            self.conn.no_answer(generation, conn);
        }
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if never_sent(&e) => Err(LimiterError::not_applied(format!("redis: {e}"))),
            Ok(Err(e)) => Err(LimiterError::unknown(format!("redis: {e}"))),
            Err(_) => Err(LimiterError::unknown(format!(
                "redis did not answer within {timeout:?}"
            ))),
        }
    }

    async fn check(
        &self,
        now: u64,
        lease: &str,
        rules: &[Rule],
        record: bool,
    ) -> Result<Verdict, LimiterError> {
        let now = if self.server_clock {
            -1
        } else {
            i64::try_from(now).unwrap_or(i64::MAX)
        };
        let mut inv = self.acquire.prepare_invoke();
        inv.arg(now)
            .arg(lease)
            .arg(if record { 1 } else { 0 })
            .arg(u64::try_from(self.running_for.as_millis()).unwrap_or(u64::MAX));
        for r in rules {
            for k in window_keys(&r.key) {
                inv.key(k);
            }
            inv.arg(r.limit)
                .arg(u64::try_from(r.window.as_millis()).unwrap_or(u64::MAX))
                .arg(r.cost)
                .arg(match (r.is_concurrency(), r.reserves()) {
                    (true, _) => 1u8,
                    (false, true) => 2,
                    (false, false) => 0,
                });
        }
        if record {
            inv.key(tombstone_key(lease));
        }
        let out: Vec<i64> = self.run(inv, self.timeout).await?;
        if out.len() != 3 + 2 * rules.len() {
            return Err(LimiterError::unknown("redis: unexpected script reply"));
        }
        let states = rules
            .iter()
            .zip(out[3..].chunks(2))
            .map(|(r, pair)| {
                let total = u64::try_from(pair[0]).unwrap_or(0);
                WindowState {
                    limit: r.limit,
                    remaining: r.limit.saturating_sub(total),
                    reset: Duration::from_millis(u64::try_from(pair[1]).unwrap_or(0)),
                }
            })
            .collect();
        Ok(match usize::try_from(out[0]).unwrap_or(0) {
            0 => Verdict::Admitted(states),
            n => Verdict::Refused {
                rule: n - 1,
                retry_after: u64::try_from(out[1]).ok().map(Duration::from_millis),
                awaits_running: out[2] == 1,
                states,
            },
        })
    }

    /// `RENEW` of `lease` in `slots`, waiting as a settle does.
    async fn renew_lease(
        &self,
        now: u64,
        lease: &str,
        slots: Slots<'_>,
    ) -> Result<(), LimiterError> {
        let now = if self.server_clock {
            -1
        } else {
            i64::try_from(now).unwrap_or(i64::MAX)
        };
        let mut inv = self.renew.prepare_invoke();
        inv.arg(now).arg(lease);
        for (key, window) in slots {
            for k in window_keys(key) {
                inv.key(k);
            }
            inv.arg(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        }
        let patience = SETTLE_PATIENCE.max(self.timeout);
        self.run::<i64>(inv, patience).await.map(|_| ())
    }

    /// `PING`, within the checks' timeout, on the connection the checks use (so a stuck one is
    /// found and replaced as theirs would be).
    async fn ping(&self) -> Result<(), LimiterError> {
        let (generation, mut conn) = self.conn.get();
        let cmd = redis::cmd("PING");
        let answer = tokio::time::timeout(self.timeout, cmd.query_async::<String>(&mut conn)).await;
        if answer.is_err() {
            self.conn.no_answer(generation, conn);
        }
        match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(LimiterError::unknown(format!("redis: {e}"))),
            Err(_) => Err(LimiterError::unknown(format!(
                "redis did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// `SETTLE` of `updates`; a take-back also names its lease's tombstone.
    async fn change(
        &self,
        lease: &str,
        updates: &[(String, u64)],
        take_back: bool,
    ) -> Result<(), LimiterError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut inv = self.settle.prepare_invoke();
        inv.arg(lease).arg(TOMBSTONE_LIFE_MS);
        for (key, cost) in updates {
            for k in window_keys(key) {
                inv.key(k);
            }
            inv.arg(*cost);
        }
        if take_back {
            inv.key(tombstone_key(lease));
        }
        let patience = SETTLE_PATIENCE.max(self.timeout);
        self.run::<i64>(inv, patience).await.map(|_| ())
    }
}

impl Limiter for RedisLimiter {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn acquire<'a>(&'a self, now_ms: u64, lease: &'a str, rules: &'a [Rule]) -> Reply<'a, Verdict> {
        Box::pin(self.check(now_ms, lease, rules, true))
    }

    fn settle<'a>(&'a self, lease: &'a str, updates: &'a [(String, u64)]) -> Reply<'a, ()> {
        Box::pin(self.change(lease, updates, false))
    }

    fn take_back<'a>(&'a self, lease: &'a str, updates: &'a [(String, u64)]) -> Reply<'a, ()> {
        Box::pin(self.change(lease, updates, true))
    }

    fn ping(&self) -> Reply<'_, ()> {
        Box::pin(RedisLimiter::ping(self))
    }

    fn renew<'a>(&'a self, now_ms: u64, lease: &'a str, slots: Slots<'a>) -> Reply<'a, ()> {
        Box::pin(self.renew_lease(now_ms, lease, slots))
    }

    fn peek<'a>(&'a self, now_ms: u64, rules: &'a [Rule]) -> Reply<'a, Vec<WindowState>> {
        Box::pin(async move {
            // A peek is an acquire that records nothing.
            match self.check(now_ms, "", rules, false).await? {
                Verdict::Admitted(s) | Verdict::Refused { states: s, .. } => Ok(s),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind};

    use super::never_sent;

    /// Only a call that had no connection to go on is known to have run nothing (its check is
    /// then not taken back); one whose connection broke may have run.
    #[test]
    fn only_a_call_without_a_connection_surely_ran_nothing() {
        let io = |kind| redis::RedisError::from(Error::from(kind));
        assert!(never_sent(&io(ErrorKind::ConnectionRefused)));
        assert!(never_sent(&io(ErrorKind::TimedOut)));
        assert!(!never_sent(&io(ErrorKind::ConnectionReset)));
        assert!(!never_sent(&io(ErrorKind::BrokenPipe)));
        assert!(!never_sent(&io(ErrorKind::UnexpectedEof)));
    }
}
