//! `grpc.health.v1.Health` and gRPC server reflection for the ledger.
//!
//! The ledger is SERVING (for the overall server `""` and for `syft.ledger.v1.Ledger`) only while
//! its database answers: [`run_database_probe`] pings it every [`PROBE_INTERVAL`] and flips the
//! status. [`Health::readiness`] exposes the same state for HTTP `/readyz` handlers.

use std::sync::Arc;
use std::time::Duration;

use syft_server::HealthPublisher;
use tokio::sync::watch;
use tonic_health::pb::health_server::HealthServer;

use crate::store::Store;

/// The fully-qualified name of the ledger's gRPC service.
pub const LEDGER_SERVICE: &str = "syft.ledger.v1.Ledger";
/// The alerts service the ledger serves beside it (advertised by reflection).
pub const ALERTS_SERVICE: &str = "syft.ledger.v1.Alerts";
/// How often the database is pinged.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A ping slower than this is a miss.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Misses in a row that make the ledger NOT_SERVING. A database that answers with an error (it
/// refuses the connection, it is shutting down) does at once; one that is only slow (a table
/// lock, every connection of the pool busy) is given this many: one slow ping took every ledger,
/// and with them every router, out of service together for the rest of a lock that failed no
/// request by itself. (As the routers' Redis probe does, docs/limits.md.)
pub const PROBE_MISSES: u32 = 3;

/// The ledger's health state: the gRPC health publisher plus a watch for HTTP probes.
#[derive(Clone)]
pub struct Health {
    publisher: HealthPublisher,
    ready: Arc<watch::Sender<bool>>,
    /// Whether the server is shutting down; held while a status is published, so that a probe
    /// that read `false` cannot publish SERVING after the shutdown published NOT_SERVING.
    stopping: Arc<tokio::sync::Mutex<bool>>,
}

impl Health {
    /// A NOT_SERVING health state and the gRPC service that serves it.
    pub async fn new() -> (
        Self,
        HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (publisher, server) = HealthPublisher::new(LEDGER_SERVICE).await;
        let health = Health {
            publisher,
            ready: Arc::new(watch::channel(false).0),
            stopping: Arc::default(),
        };
        (health, server)
    }

    /// True while the database answers.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// NOT_SERVING from now on, whatever the database says (the server is shutting down).
    pub async fn shut_down(&self) {
        let mut stopping = self.stopping.lock().await;
        *stopping = true;
        self.publish(false).await;
        self.publisher.end_watches();
    }

    /// Sets SERVING or NOT_SERVING for `""` and [`LEDGER_SERVICE`] (NOT_SERVING once shutting
    /// down).
    pub async fn set_serving(&self, serving: bool) {
        let stopping = self.stopping.lock().await;
        self.publish(serving && !*stopping).await;
    }

    /// Publishes `serving`; the caller holds `stopping`.
    async fn publish(&self, serving: bool) {
        // Receivers wake only on a change: this runs every second, and a wake per probe kept
        // the dashboard's live streams from ever reaching their session check.
        let changed = self.ready.send_if_modified(|ready| {
            let changed = *ready != serving;
            *ready = serving;
            changed
        });
        if changed {
            if serving {
                tracing::info!("database reachable: ledger SERVING");
            } else {
                tracing::warn!("ledger NOT_SERVING");
            }
        }
        self.publisher.publish(serving).await;
    }
}

/// Pings the database every `every` and publishes the result, forever.
pub async fn run_database_probe(store: Arc<Store>, health: Health, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut misses = 0u32;
    loop {
        tick.tick().await;
        let ok = match tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => {
                misses = 0;
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "database ping failed");
                false
            }
            Err(_) => {
                misses += 1;
                tracing::warn!(
                    timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                    misses,
                    "database ping timed out"
                );
                // Still serving until the misses add up: the last verdict stands meanwhile.
                if misses < PROBE_MISSES {
                    continue;
                }
                false
            }
        };
        health.set_serving(ok).await;
    }
}
