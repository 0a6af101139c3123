//! syft-ledger: money state for syft-router. Accounts, delegation tokens, two-phase transfers and
//! usage rows over Postgres or SQLite, served as `syft.ledger.v1.Ledger` over gRPC.

pub mod auth;
pub mod client;
pub mod error;
pub mod health;
pub mod lifecycle;
pub mod money;
pub mod service;
pub mod store;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use error::{LedgerError, Result};
pub use service::LedgerService;
pub use store::Store;

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// `postgres://…` or `sqlite://path?mode=rwc`.
    pub database_url: String,
    /// Bearer key with admin rights; empty disables admin access.
    pub admin_key: String,
    /// Default lifetime of a hold.
    pub hold_ttl: Duration,
    /// Longest hold a caller may ask for.
    pub max_hold_ttl: Duration,
    /// How often expired holds are swept and hot-account credits rolled up.
    pub sweep_interval: Duration,
    /// Currency of new accounts.
    pub currency: String,
    /// Upper bound for any single amount (deposit, hold, spend limit).
    pub max_amount_micros: i64,
    /// Postgres pool size (SQLite always uses one connection).
    pub max_connections: u32,
    /// Postgres write batches in flight at once (see `store/batch.rs`).
    pub batch_workers: usize,
    /// TLS on the gRPC listener; with a client CA, clients must present a certificate it signed.
    pub tls: Option<syft_tls::ServerTls>,
    /// After the shutdown signal, how long in-flight calls may run before they are dropped.
    pub shutdown_grace: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite://syft-ledger.db?mode=rwc".into(),
            admin_key: String::new(),
            hold_ttl: Duration::from_secs(300),
            max_hold_ttl: Duration::from_secs(86_400),
            sweep_interval: Duration::from_secs(1),
            currency: "USD".into(),
            // 1,000,000 USD.
            max_amount_micros: 1_000_000_000_000,
            max_connections: 16,
            batch_workers: store::DEFAULT_BATCH_WORKERS,
            tls: None,
            shutdown_grace: lifecycle::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Connects to the database (running migrations) and serves gRPC on `listener` until `shutdown`
/// resolves; in-flight calls finish (within `config.shutdown_grace`) before this returns.
pub async fn serve(
    config: LedgerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = Arc::new(
        Store::connect_with(
            &config.database_url,
            config.max_connections,
            config.batch_workers,
        )
        .await?,
    );
    serve_with_store(store, config, listener, shutdown).await
}

/// Like [`serve`], over an already connected store.
pub async fn serve_with_store(
    store: Arc<Store>,
    config: LedgerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let config = Arc::new(config);
    let sweeper = tokio::spawn(run_sweeper(store.clone(), config.sweep_interval));
    let service = LedgerService::new(store.clone(), config.clone());
    let (health, health_service) = health::Health::new().await;
    let _probe = health::spawn_database_probe(store.clone(), health.clone());
    let (reflection_v1, reflection_v1alpha) = health::reflection()?;
    let addr = listener.local_addr().ok();
    let (signal, deadline) = lifecycle::with_grace(shutdown, config.shutdown_grace);
    let signal = async move {
        signal.await;
        health.shut_down().await;
    };
    let tls = config.tls.as_ref();
    let mut server =
        syft_tls::grpc_server(tls).map_err(|e| LedgerError::Internal(e.to_string()))?;
    tracing::info!(
        ?addr,
        backend = ?store.backend(),
        tls = tls.is_some(),
        client_auth = tls.is_some_and(|t| t.requires_client_cert()),
        "ledger serving gRPC"
    );
    let result = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(syft_proto::ledger::ledger_server::LedgerServer::new(
            service,
        ))
        .serve_with_incoming_shutdown(incoming(listener), signal);
    let result = tokio::select! {
        r = result => r.map_err(|e| LedgerError::Unavailable(format!("gRPC server failed: {e}"))),
        _ = deadline => Ok(()),
    };
    sweeper.abort();
    tracing::info!("ledger stopped");
    result
}

/// Accepted connections with Nagle's algorithm off: small RPCs must not wait for delayed ACKs.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Cancels expired holds and folds hot-recipient credits into balances, forever.
pub async fn run_sweeper(store: Arc<Store>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.sweep_expired(500).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(cancelled = n, "expired holds cancelled"),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        if let Err(e) = store.roll_up_all().await {
            tracing::warn!(error = %e, "credit roll-up failed");
        }
    }
}
