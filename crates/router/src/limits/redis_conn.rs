//! The Redis limiter's one connection, and what replaces it when it is stuck.
//!
//! The redis crate's `ConnectionManager` reconnects when its connection reports an error. A
//! connection whose peer is gone without a word (the Redis host died or moved in a failover, a
//! NAT or firewall dropped the idle flow) reports nothing: its commands go out and no answer
//! comes, until the kernel gives up retransmitting, about 15 minutes on Linux. Every check then
//! times out, so the router refuses every request (`fail_closed`) or admits every one
//! (`fail_open`) for those minutes, although Redis itself is fine.
//!
//! So a call that gets no answer in time makes this module ask Redis on a fresh connection. If
//! Redis answers there and the old connection stays silent ([`STUCK_GRACE`] more), the old one is
//! replaced. A Redis that is paused or down answers neither, and its connection is kept. One that
//! answers the fresh connection first for another reason (a long queue on the old one, a pause of
//! writes only, a proxy that answers `PING` itself) has its connection replaced too; that costs a
//! reconnect, nothing more: a take-back sent on the new connection may then reach Redis before
//! the check it takes back, and it leaves a tombstone that keeps that check from recording
//! (`redis.rs`, `SETTLE`). TCP keepalive on the connection finds a dead idle peer and keeps NAT
//! mappings alive in the first place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{register_int_counter, IntCounter};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::{AsyncConnectionConfig, IntoConnectionInfo};

use super::LimiterError;

static REPLACED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "syft_router_limit_connections_replaced_total",
        "Connections to the limiter's Redis replaced because they stopped answering while a \
         fresh connection was answered"
    )
    .expect("register syft_router_limit_connections_replaced_total")
});

/// Lists the counter at zero before its first replacement.
pub(super) fn at_zero() {
    LazyLock::force(&REPLACED);
}

/// How long a fresh connection may take to connect and answer a `PING`. Longer, and Redis itself
/// is taken to be slow or away: the old connection is kept (its manager reconnects on errors).
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// How long the old connection may stay silent after a fresh one was answered before it is
/// replaced: it may have a queue of commands to work off first (after a pause).
const STUCK_GRACE: Duration = Duration::from_secs(1);

/// At most one probe at a time and one a second: with Redis down or paused, every check times out.
const PROBE_SPACING: Duration = Duration::from_secs(1);

/// Keepalive probes after 30 s idle, every 5 s, 3 of them: a dead idle peer is found in about
/// 45 s, and a NAT keeps the flow (most drop idle ones after minutes).
fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    // Nagle stays on, as the redis crate has it: many checks in flight on one connection are
    // sent together, 5 % more checks/s in `bench limits` than with `TCP_NODELAY`.
    TcpSettings::default().set_keepalive(keepalive)
}

/// The current connection and its generation (which probe results refer to).
pub(super) struct Conn {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: Mutex<(u64, ConnectionManager)>,
    probing: AtomicBool,
}

impl Conn {
    /// The client of `url`, or why the URL cannot be used (it does not parse, or asks for TLS).
    /// Connects to nothing.
    pub(super) fn client(url: &str) -> Result<redis::Client, LimiterError> {
        let bad =
            |e: redis::RedisError| LimiterError::not_applied(format!("bad limiter.redis_url: {e}"));
        let info = url.into_connection_info().map_err(bad)?;
        redis::Client::open(info.set_tcp_settings(tcp_settings())).map_err(bad)
    }

    /// Parses `url` now (a bad one is refused at start) and connects lazily. Must be called
    /// inside a Tokio runtime.
    pub(super) fn new(url: &str, connect_timeout: Duration) -> Result<Arc<Self>, LimiterError> {
        let client = Self::client(url)?;
        // No response timeout on the connection: each call sets its own (`redis.rs`), so that a
        // settle can wait longer than a check on the same connection.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| LimiterError::not_applied(format!("redis: {e}")))?;
        Ok(Arc::new(Conn {
            client,
            config,
            current: Mutex::new((0, manager)),
            probing: AtomicBool::new(false),
        }))
    }

    /// The connection to send on, with its generation (for [`Conn::no_answer`]).
    pub(super) fn get(&self) -> (u64, ConnectionManager) {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A call on `generation` got no answer in time: checks in the background whether that
    /// connection is stuck while Redis answers, and replaces it if so.
    pub(super) fn no_answer(self: &Arc<Self>, generation: u64, old: ConnectionManager) {
        // Calls still waiting on a replaced connection say nothing of the current one.
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if current != generation || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            if me.stuck(old).await {
                me.replace(generation);
            }
            tokio::time::sleep_until(start + PROBE_SPACING).await;
            me.probing.store(false, Ordering::Release);
        });
    }

    /// Whether `old` stays silent while a fresh connection is answered.
    async fn stuck(&self, mut old: ConnectionManager) -> bool {
        let old_ping = async move {
            let _: Result<String, _> = redis::cmd("PING").query_async(&mut old).await;
        };
        tokio::pin!(old_ping);
        let fresh = async {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(PROBE_WAIT))
                .set_response_timeout(Some(PROBE_WAIT));
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        let fresh_answered = tokio::select! {
            // An answer or an error (its manager then reconnects): not stuck.
            () = &mut old_ping => return false,
            fresh = tokio::time::timeout(PROBE_WAIT, fresh) => matches!(fresh, Ok(Ok(_))),
        };
        fresh_answered && tokio::time::timeout(STUCK_GRACE, old_ping).await.is_err()
    }

    fn replace(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(manager) => {
                // Calls still waiting on the old connection time out as they would have; the
                // connection closes when the last of them lets go of it.
                *current = (generation + 1, manager);
                REPLACED.inc();
                tracing::warn!(
                    "the limiter's Redis connection stopped answering while a new one was \
                     answered; replaced it"
                );
            }
            Err(e) => tracing::warn!(error = %e, "could not replace a stuck Redis connection"),
        }
    }
}
