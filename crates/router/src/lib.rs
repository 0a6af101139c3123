//! syft router: prices chat requests, holds the money on the ledger, runs the model, and
//! captures only what succeeded (DESIGN.md §7).
//!
//! - [`config`]: the config file (services, pricing, upstream, limits) and exact amounts.
//! - [`upstream`]: the `openai` and built-in `echo` upstreams.
//! - [`service`]: the paid-request flow shared by both fronts.
//! - [`grpc`]: `syft.router.v1.Router`; [`http`]: the OpenAI-compatible HTTP front.
//! - [`serve`]: runs both on given listeners until shutdown.

pub mod config;
mod drain;
pub mod error;
pub mod grpc;
pub mod health;
pub mod http;
mod ledger;
mod metrics;
pub mod money;
pub mod service;
pub mod tokens;
pub mod upstream;
pub mod validate;

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use axum::serve::ListenerExt;
use syft_tls::TlsListener;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use config::{
    ConfigError, LedgerSettings, Limits, OpenAiConfig, Pricing, PricingKind, RouterConfig,
    ServiceConfig, UpstreamConfig,
};
pub use error::RouterError;
pub use grpc::GrpcRouter;
pub use service::{ChatStreamHandle, RouterService};
pub use upstream::{ECHO_FAIL_TRIGGER, ECHO_MODEL};

/// Why [`serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("router setup failed: {0}")]
    Setup(#[from] RouterError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] syft_tls::TlsError),
}

/// Serves the gRPC API on `grpc_listener` and the OpenAI-compatible HTTP front (plus `/healthz`,
/// `/readyz`) on `http_listener` until `shutdown` completes. Then it stops accepting, lets
/// in-flight requests (streams included) finish within `config.shutdown_grace`, cancels the
/// rest (voiding their holds, which completes before this returns), and returns `Ok`.
pub async fn serve(
    config: RouterConfig,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let service = RouterService::new(config)?;
    serve_service(service, grpc_listener, http_listener, shutdown).await
}

/// Like [`serve`], for an already built [`RouterService`].
pub async fn serve_service(
    service: RouterService,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = rx.clone();
    let grace = service.config().shutdown_grace;
    let draining = service.clone();
    tokio::spawn(async move {
        shutdown.await;
        health::mark_shutting_down(&draining);
        let _ = tx.send(true);
    });
    let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let grpc_addr = grpc_listener.local_addr().ok();
    let http_addr = http_listener.local_addr().ok();
    tracing::info!(
        name = %service.config().name,
        provider = service.provider(),
        grpc = ?grpc_addr,
        http = ?http_addr,
        tls = service.config().tls.is_some(),
        ledger_tls = service.config().ledger.tls.is_some(),
        "router serving"
    );
    let (reporter, health_service) = health::Reporter::new().await;
    let (reflection_v1, reflection_v1alpha) = health::reflection()?;
    let _health = health::spawn(&service, reporter);
    let tls = service.config().tls.clone();
    let grpc = syft_tls::grpc_server(tls.as_ref())?
        .layer(syft_telemetry::RequestLayer(syft_telemetry::Server::Grpc))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(GrpcRouter::new(service.clone()).into_server())
        .serve_with_incoming_shutdown(
            TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            signal(rx.clone()),
        );
    let app = http::http_router(service.clone());
    let http: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match &tls {
        Some(tls) => Box::pin(
            axum::serve(TlsListener::new(http_listener, tls.rustls()?)?, app)
                .with_graceful_shutdown(signal(rx))
                .into_future(),
        ),
        None => Box::pin(
            axum::serve(
                http_listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                app,
            )
            .with_graceful_shutdown(signal(rx))
            .into_future(),
        ),
    };
    let http = async { http.await.map_err(ServeError::from) };
    let grpc = async { grpc.await.map_err(ServeError::from) };
    let servers = async { tokio::try_join!(grpc, http).map(|_| ()) };
    drain::run_with_grace(&service, servers, signal(stop), grace).await
}
