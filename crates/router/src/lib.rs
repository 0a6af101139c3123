//! syft router: prices chat requests, holds the money on the ledger, runs the model, and
//! captures only what succeeded (docs/design.md §3).
//!
//! - [`config`]: the config file (services, pricing, upstream, limits) and exact amounts.
//! - [`upstream`]: the `openai` and built-in `echo` upstreams.
//! - [`service`]: the paid-request flow shared by both fronts.
//! - [`grpc`]: `syft.router.v1.Router`; [`http`]: the OpenAI-compatible HTTP front.
//! - [`serve`]: runs both on given listeners until shutdown.

pub mod config;
mod cors;
mod drain;
mod endpoints;
pub mod error;
pub mod grpc;
pub mod health;
pub mod http;
mod ledger;
pub mod limits;
mod log_throttle;
mod metrics;
pub mod money;
mod openai_wire;
pub mod search;
pub mod service;
mod syft_http;
pub mod tokens;
pub mod upstream;
mod usage_send;
mod usage_spool;
pub mod validate;

use std::future::Future;

use tokio::net::TcpListener;

pub use config::{
    ConfigError, HttpSearchConfig, LedgerSettings, LeftStreams, Limits, MaxTokensField,
    OpenAiConfig, Pricing, PricingKind, ReplaySettings, RouterConfig, SearchBackendConfig,
    SearchConfig, ServiceConfig, ServiceKind, UpstreamConfig, ANY_MODEL,
};
pub use error::RouterError;
pub use grpc::GrpcRouter;
pub use service::{ChatStreamHandle, RouterService};
pub use upstream::{ECHO_FAIL_TRIGGER, ECHO_MODEL};

/// Why [`serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Said in full: an internal error's text, which clients never see, is the operator's only
    /// clue at start ("router setup failed: internal error" named no key nor flag).
    #[error("router setup failed: {}", setup_detail(.0))]
    Setup(#[from] RouterError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC listener: {0}")]
    GrpcListener(std::io::Error),
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
}

fn setup_detail(e: &RouterError) -> String {
    match e {
        RouterError::Internal(detail) => detail.clone(),
        e => e.to_string(),
    }
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
    let mut shutdown = Box::pin(shutdown);
    // Before the spool's wait below, whose `grace + …` overflowed on a huge `--shutdown-grace`
    // (the flags are set after the file is read, and `RouterService::new` checks them too late).
    (config.validate_bounds()).map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
    if let Some(dir) = &config.ledger.usage_spool {
        // The router this one replaces may still drain on the same spool (its grace, then its
        // spool's drain): wait for it rather than exit. Past that the start fails, as before.
        let grace = config.shutdown_grace;
        let patience = grace + grace.min(SPOOL_DRAIN_LIMIT) + std::time::Duration::from_secs(5);
        tokio::select! {
            _ = usage_spool::wait_until_free(dir, patience) => {}
            () = &mut shutdown => return Ok(()),
        }
    }
    RouterService::new(config)?
        .serve(grpc_listener, http_listener, shutdown)
        .await
}

impl RouterService {
    /// Like [`crate::serve`], for an already built service (embedding, benchmarks that read its state).
    pub async fn serve(
        self,
        grpc_listener: TcpListener,
        http_listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let service = self;
        let grace = service.config().shutdown_grace;
        let draining = service.clone();
        let stop = syft_server::Stop::on(shutdown, move || async move {
            health::mark_shutting_down(&draining);
        });
        tracing::info!(
            name = %service.config().name,
            // The chat upstream, and the search backend when there is one (a search-only router
            // said only `provider="echo"`, the unused default upstream).
            provider = service.provider(),
            search = service.search_provider().unwrap_or("none"),
            grpc = %addr_text(grpc_listener.local_addr()),
            http = %addr_text(http_listener.local_addr()),
            tls = service.config().tls.is_some(),
            ledger_tls = service.config().ledger.tls.is_some(),
            "router serving"
        );
        let (publisher, health_service) =
            syft_server::HealthPublisher::new(health::ROUTER_SERVICE).await;
        let _health = health::spawn(&service, publisher);
        let tls = service.config().tls.clone();
        // Room for four requests of the largest size the gRPC front takes, whatever the limit.
        let body_budget = GrpcRouter::max_message_bytes(service.config()).saturating_mul(4);
        let grpc = syft_server::grpc_router(
            health_service,
            &[health::ROUTER_SERVICE],
            body_budget,
            syft_server::Calls::default(),
        )
        .map_err(|e| RouterError::Internal(format!("reflection descriptors: {e}")))?
        .add_service(GrpcRouter::new(service.clone()).into_server())
        .serve_with_incoming_shutdown(
            syft_server::grpc_incoming(
                grpc_listener,
                syft_server::MAX_GRPC_CONNECTIONS,
                tls.as_ref(),
            )
            .map_err(ServeError::GrpcListener)?,
            stop.stopped(),
        );
        let app = http::http_router(service.clone());
        let http = syft_server::serve_http(
            http_listener,
            app,
            tls.as_ref(),
            service.config().http,
            stop.stopped(),
        );
        let http = async { http.await.map_err(ServeError::from) };
        let grpc = async { grpc.await.map_err(ServeError::from) };
        let servers = async { tokio::try_join!(grpc, http).map(|_| ()) };
        let result = drain::run_with_grace(&service, servers, stop.stopped(), grace).await;
        // Free rows still spooled: give the shipper a moment, so a router taken out of service
        // leaves nothing behind in the usual case (what is left ships at the next start).
        if !service
            .drain_usage_spool(grace.min(SPOOL_DRAIN_LIMIT))
            .await
        {
            tracing::warn!(
                "usage spool not empty at shutdown; the next router started on its directory ships it"
            );
        }
        result
    }
}

/// Longest wait at shutdown for the usage spool to ship its rows (and never longer than the
/// shutdown grace).
const SPOOL_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A listener's address for the logs: `127.0.0.1:50051`, not `Some(127.0.0.1:50051)`.
fn addr_text(addr: std::io::Result<std::net::SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    /// A start that failed on an internal error said "router setup failed: internal error" and
    /// nothing else (a spool directory that could not be created, a ledger secret that is not
    /// header text): the detail, never sent to clients, is the operator's.
    #[test]
    fn a_setup_failure_says_what_failed() {
        let e = super::ServeError::Setup(super::RouterError::Internal(
            "cannot create usage spool /proc/nope".into(),
        ));
        assert_eq!(
            e.to_string(),
            "router setup failed: cannot create usage spool /proc/nope"
        );
    }
}
