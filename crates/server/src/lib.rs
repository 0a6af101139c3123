//! The server bootstrap both services share: listeners with Nagle off, the HTTP port with or
//! without TLS (idle timeout and connection cap included), gRPC health publishing, one shutdown signal fanned out to every server, the grace
//! period, background tasks that end with the server, and files only their user reads.

mod accepted;
mod bodies;
mod calls;
mod files;
mod grpc;
mod health;
mod http;
mod secret;

pub use accepted::Accepted;
pub use bodies::{BodyBudgetLayer, BODY_BUDGET_BYTES, BODY_DEADLINE, UNCOUNTED_BYTES};
pub use calls::{Calls, CallsLayer};
pub use files::{create_private_dir, private_file};
pub use grpc::{grpc_incoming, grpc_router, GrpcLayers, MAX_GRPC_CONNECTIONS};
pub use http::{HttpLimits, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS};
pub use secret::Secret;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// How long in-flight calls may finish after the shutdown signal, unless configured otherwise.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` (over TLS when given) within `limits` until `stopped` resolves,
/// then lets open requests finish. Each request carries its client's address ([`client_addr`]).
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<&syft_tls::ServerTls>,
    limits: HttpLimits,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        Some(tls) => {
            let rustls = tls.rustls().map_err(std::io::Error::other)?;
            let listener = syft_tls::TlsListener::new(listener, rustls, limits.max_connections)
                .map_err(std::io::Error::other)?;
            http::serve(listener, app, limits, stopped).await
        }
        None => {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            http::serve(listener, app, limits, stopped).await
        }
    }
    Ok(())
}

/// The address of the client that sent a request [`serve_http`] served, over TCP or TLS (`None`
/// for a router served some other way, e.g. called in-process).
pub fn client_addr(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// One shutdown signal, observed by any number of servers and loops.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// A `Stop` that fires once `shutdown` resolves and `before` (e.g. publishing NOT_SERVING)
    /// has run.
    pub fn on<B>(
        shutdown: impl Future<Output = ()> + Send + 'static,
        before: impl FnOnce() -> B + Send + 'static,
    ) -> Self
    where
        B: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            before().await;
            let _ = tx.send(true);
        });
        Stop(rx)
    }

    /// Resolves once the signal fired.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            // A dropped sender (the signal task ended without firing) counts as stopped too.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Resolves `grace` after the signal fired (never, if it does not): the point where calls
    /// still running are dropped.
    pub fn deadline(&self, grace: Duration) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: no new connections, draining in-flight calls"
            );
            tokio::time::sleep(grace).await;
            tracing::warn!("grace period over: dropping in-flight calls");
        }
    }
}

/// Publishes SERVING / NOT_SERVING for the whole server (`""`) and one named gRPC service.
#[derive(Clone)]
pub struct HealthPublisher {
    reporter: HealthReporter,
    service: &'static str,
    ended: Arc<watch::Sender<bool>>,
}

impl HealthPublisher {
    /// Starts NOT_SERVING; returns the gRPC health service to add to the server.
    pub async fn new(service: &'static str) -> (Self, HealthServer<impl Health>) {
        let reporter = HealthReporter::new();
        let (ended, watching) = watch::channel(false);
        let server = HealthServer::new(health::EndingHealth::new(
            HealthService::from_health_reporter(reporter.clone()),
            watching,
        ));
        let publisher = HealthPublisher {
            reporter,
            service,
            ended: Arc::new(ended),
        };
        publisher.publish(false).await;
        (publisher, server)
    }

    pub async fn publish(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }

    /// At shutdown, after NOT_SERVING was published: ends every `Watch` stream once it has sent
    /// that status, so watchers do not hold the server's shutdown open for its grace (the
    /// gRPC server waits for every open call).
    pub fn end_watches(&self) {
        self.ended.send_replace(true);
    }
}

/// Background tasks aborted when this is dropped, so they end with the server however its
/// future ends (returned, failed or dropped).
#[derive(Default)]
pub struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_fires_after_before_hook_and_deadline_after_grace() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (hook_tx, hook_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Stop::on(
            async {
                let _ = rx.await;
            },
            move || async move {
                let _ = hook_tx.send(());
            },
        );
        let stopped = tokio::spawn(stop.stopped());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!stopped.is_finished(), "stopped before the signal");
        let _ = tx.send(());
        stopped.await.expect("stopped");
        hook_rx.await.expect("hook ran before the stop fired");
        let started = std::time::Instant::now();
        stop.deadline(Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn tasks_end_when_dropped() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut tasks = Tasks::default();
        tasks.spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(tasks);
        // The task held the only sender: once aborted, the channel closes.
        assert!(rx.recv().await.is_none());
    }
}
