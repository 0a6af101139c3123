//! The server bootstrap both services share: listeners with Nagle off, the HTTP port with or
//! without TLS, gRPC health publishing, one shutdown signal fanned out to every server, the grace
//! period, and background tasks that end with the server.

mod secret;

pub use secret::Secret;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, ListenerExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// How long in-flight calls may finish after the shutdown signal, unless configured otherwise.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Accepted gRPC connections with Nagle's algorithm off: small RPCs must not wait for delayed
/// ACKs.
pub fn grpc_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// `axum::serve` of `app` with its client addresses as `$info`, until `$stopped`. A macro
/// because the two listeners are different types, and a generic function would have to spell
/// out axum's bounds on both.
macro_rules! serve_until {
    ($listener:expr, $app:expr, $info:ty, $stopped:expr) => {
        axum::serve(
            $listener,
            $app.into_make_service_with_connect_info::<$info>(),
        )
        .with_graceful_shutdown($stopped)
        .into_future()
        .await
    };
}

/// Serves `app` on `listener` (over TLS when given) until `stopped` resolves, then lets open
/// requests finish. Each request carries its client's address ([`client_addr`]).
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<&syft_tls::ServerTls>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        Some(tls) => {
            let rustls = tls.rustls().map_err(std::io::Error::other)?;
            let listener =
                syft_tls::TlsListener::new(listener, rustls).map_err(std::io::Error::other)?;
            serve_until!(listener, app, ClientAddr, stopped)
        }
        None => {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            serve_until!(listener, app, SocketAddr, stopped)
        }
    }
}

/// The client's address of a TLS connection as handlers see it (`ConnectInfo<ClientAddr>`; a
/// plain TCP connection's is axum's `ConnectInfo<SocketAddr>`). Read either with
/// [`client_addr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, syft_tls::TlsListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, syft_tls::TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// The address of the client that sent a request [`serve_http`] served, over TCP or TLS (`None`
/// for a router served some other way, e.g. called in-process).
pub fn client_addr(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    use axum::extract::ConnectInfo;
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| extensions.get::<ConnectInfo<ClientAddr>>().map(|c| c.0 .0))
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
}

impl HealthPublisher {
    /// Starts NOT_SERVING; returns the gRPC health service to add to the server.
    pub async fn new(service: &'static str) -> (Self, HealthServer<impl Health>) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let publisher = HealthPublisher { reporter, service };
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
