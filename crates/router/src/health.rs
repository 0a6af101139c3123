//! Readiness of the router: `grpc.health.v1.Health`, HTTP `/readyz`, and gRPC server reflection.
//!
//! A router that sells anything needs its ledger, so it is SERVING only while the ledger answers
//! its own health check ([`run_ledger_probe`] asks every [`PROBE_INTERVAL`]). A router whose
//! enabled services are all free only records usage on the ledger (best effort), so it is ready
//! whatever the ledger's state. During shutdown it reports NOT_SERVING.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::error::RouterError;
use crate::service::RouterService;

/// The fully-qualified name of the router's gRPC service.
pub const ROUTER_SERVICE: &str = "syft.router.v1.Router";
/// How often the ledger is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe slower than this counts as the ledger being unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the last ledger probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerState {
    /// Not probed yet.
    Unknown,
    /// The ledger answered SERVING.
    Serving,
    /// The ledger answered, but NOT_SERVING (its database is down).
    NotServing,
    /// No answer.
    Unreachable,
}

/// The router's readiness, as shown by `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub ledger: LedgerState,
    /// Whether readiness depends on the ledger (some enabled service is paid).
    pub ledger_required: bool,
    pub shutting_down: bool,
}

impl Readiness {
    pub(crate) fn starting(ledger_required: bool) -> Self {
        Readiness {
            ready: !ledger_required,
            ledger: LedgerState::Unknown,
            ledger_required,
            shutting_down: false,
        }
    }

    fn with_ledger(&self, ledger: LedgerState) -> Self {
        let mut next = self.clone();
        next.ledger = ledger;
        next.recompute();
        next
    }

    fn recompute(&mut self) {
        self.ready =
            !self.shutting_down && (!self.ledger_required || self.ledger == LedgerState::Serving);
    }
}

/// Publishes readiness to the gRPC health service.
#[derive(Clone)]
pub(crate) struct Reporter {
    reporter: HealthReporter,
}

impl Reporter {
    pub(crate) async fn new() -> (
        Self,
        HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let reporter = Reporter { reporter };
        reporter.publish(false).await;
        (reporter, server)
    }

    pub(crate) async fn publish(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(ROUTER_SERVICE, status)
            .await;
    }
}

/// Background tasks aborted when dropped, so they end with the server however it ends.
pub(crate) struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Starts the ledger probe and the gRPC health reporter of `service`.
pub(crate) fn spawn(service: &RouterService, reporter: Reporter) -> Tasks {
    Tasks(vec![
        tokio::spawn(run_ledger_probe(service.clone(), PROBE_INTERVAL)),
        tokio::spawn(run_reporter(service.watch_readiness(), reporter)),
    ])
}

/// Follows `service`'s readiness into the gRPC health service, forever.
pub(crate) async fn run_reporter(mut ready: watch::Receiver<Readiness>, reporter: Reporter) {
    loop {
        let serving = ready.borrow_and_update().ready;
        reporter.publish(serving).await;
        if ready.changed().await.is_err() {
            return;
        }
    }
}

/// Probes the ledger every `every` and updates `service`'s readiness, forever.
pub(crate) async fn run_ledger_probe(service: RouterService, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = service.probe_ledger(PROBE_TIMEOUT).await;
        service.update_readiness(|r| {
            let next = r.with_ledger(state);
            if next.ledger != r.ledger {
                match state {
                    LedgerState::Serving => tracing::info!(ready = next.ready, "ledger reachable"),
                    other => {
                        tracing::warn!(ledger = ?other, ready = next.ready, "ledger not serving")
                    }
                }
            }
            next
        });
    }
}

/// Marks the router as shutting down (NOT_SERVING from now on).
pub(crate) fn mark_shutting_down(service: &RouterService) {
    service.update_readiness(|r| {
        let mut next = r.clone();
        next.shutting_down = true;
        next.recompute();
        next
    });
}

/// gRPC server reflection (v1 and v1alpha) advertising the router, health and reflection
/// services.
#[allow(clippy::type_complexity)]
pub(crate) fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    RouterError,
> {
    syft_proto::reflection(ROUTER_SERVICE)
        .map_err(|e| RouterError::Internal(format!("reflection descriptors: {e}")))
}

/// Shared readiness cell of a [`RouterService`].
pub(crate) type ReadinessCell = Arc<watch::Sender<Readiness>>;
