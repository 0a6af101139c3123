//! syft-ledger: money state for syft-router. Accounts, delegation tokens, two-phase transfers and
//! usage rows over Postgres or SQLite, served as `syft.ledger.v1.Ledger` over gRPC and as the Syft
//! accounting REST API over HTTP.
//!
//! - [`core`]: the `Ledger` core (authentication, validation, transfer rules) over a
//!   [`backend::TransferBackend`]: [`backend::LocalBackend`] (the [`store`]) or
//!   [`hosted::backend::HostedBackend`] (a remote accounting service).
//! - [`grpc`] and [`rest`]: thin protocol adapters over the core; [`http`]: the HTTP port.
//! - [`serve`]: runs it all on given listeners until shutdown.

pub mod address_throttle;
pub mod alerts;
pub mod auth;
pub mod backend;
pub mod client;
pub mod core;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod grpc_alerts;
mod grpc_stats;
pub mod health;
pub mod hosted;
pub mod http;
pub mod metrics;
pub mod money;
pub mod rest;
pub mod store;
pub mod validate;
pub mod web;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use core::{AnswerInput, Ledger, MAX_ANSWER_BYTES, MAX_ANSWER_RETENTION_SECONDS};
pub use error::{LedgerError, Result};
pub use hosted::HostedConfig;
pub use store::Store;

/// `Debug` shows every field but the secrets.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// `postgres://…` or `sqlite://path?mode=rwc`.
    pub database_url: String,
    /// Bearer key with admin rights; empty disables admin access.
    pub admin_key: syft_server::Secret,
    /// Default lifetime of a hold.
    pub hold_ttl: Duration,
    /// Longest hold a caller may ask for.
    pub max_hold_ttl: Duration,
    /// How often expired holds are swept and expired answers purged.
    pub sweep_interval: Duration,
    /// Currency of new accounts.
    pub currency: String,
    /// Upper bound for any single amount (deposit, hold, spend limit).
    pub max_amount_micros: i64,
    /// Postgres pool size (SQLite always uses one connection).
    pub max_connections: u32,
    /// Postgres write batches in flight at once (see `store/batch.rs`).
    pub batch_workers: usize,
    /// Serve the Syft accounting REST API on the HTTP port (local backend only).
    pub accounting_api: bool,
    /// `Some`: backend = hosted, transfers are made on this remote accounting service.
    pub hosted: Option<HostedConfig>,
    /// TLS on the gRPC and HTTP listeners; with a client CA, clients must present a certificate
    /// it signed.
    pub tls: Option<syft_tls::ServerTls>,
    /// After the shutdown signal, how long in-flight calls may run before they are dropped.
    pub shutdown_grace: Duration,
    /// Idle timeout and connection cap of the HTTP listener.
    pub http: syft_server::HttpLimits,
    /// Webhook alerts (docs/alerts.md); off until `alerts.key` is set.
    pub alerts: alerts::AlertsConfig,
    /// Wrong credentials one client address may send per 5 minutes before every authentication
    /// from it is refused until the window ends (`address_throttle.rs`); 0 turns this off.
    pub auth_failures_per_address: u32,
    /// Accounts one client address may create through open registration (`POST /user/create`)
    /// per 5 minutes; 0 turns this off.
    pub accounts_per_address: u32,
    /// Bearer token `GET /metrics` asks for; empty: open. Its counters include each app's
    /// captured money, which tenants of a shared ledger should not read (docs/operations.md).
    pub metrics_token: syft_server::Secret,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite://syft-ledger.db?mode=rwc".into(),
            admin_key: syft_server::Secret::default(),
            hold_ttl: Duration::from_secs(300),
            max_hold_ttl: Duration::from_secs(86_400),
            sweep_interval: Duration::from_secs(1),
            currency: "USD".into(),
            // 1,000,000 USD.
            max_amount_micros: 1_000_000_000_000,
            max_connections: 16,
            batch_workers: store::DEFAULT_BATCH_WORKERS,
            accounting_api: false,
            hosted: None,
            tls: None,
            shutdown_grace: syft_server::DEFAULT_SHUTDOWN_GRACE,
            http: syft_server::HttpLimits::default(),
            alerts: alerts::AlertsConfig::default(),
            auth_failures_per_address: DEFAULT_AUTH_FAILURES_PER_ADDRESS,
            accounts_per_address: DEFAULT_ACCOUNTS_PER_ADDRESS,
            metrics_token: syft_server::Secret::default(),
        }
    }
}

/// The default of [`LedgerConfig::auth_failures_per_address`]: a client that mistyped a secret
/// has room to retry, a spray of guesses gets 20 per address per 5 minutes (5,760 a day).
pub const DEFAULT_AUTH_FAILURES_PER_ADDRESS: u32 = 20;

/// The default of [`LedgerConfig::accounts_per_address`]: a sign-up every 5 seconds from one
/// address, sustained; clients behind one proxy share it (raise it, or 0, there).
pub const DEFAULT_ACCOUNTS_PER_ADDRESS: u32 = 60;

/// Where the ledger listens: gRPC, and optionally the HTTP port (probes, `/metrics`, and the
/// accounting REST API when `config.accounting_api`).
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
}

impl Listeners {
    pub fn grpc(grpc: TcpListener) -> Self {
        Self { grpc, http: None }
    }

    pub fn with_http(mut self, http: TcpListener) -> Self {
        self.http = Some(http);
        self
    }
}

/// Connects to the database (running migrations) and serves until `shutdown` resolves; in-flight
/// calls finish (within `config.shutdown_grace`) before this returns.
pub async fn serve(
    config: LedgerConfig,
    listeners: Listeners,
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
    let served = serve_store(store.clone(), config, listeners, shutdown).await;
    // Closed, not left to the process's exit: SQLite checkpoints its write-ahead log into the
    // database file and removes it only when the last connection closes, so a stopped ledger
    // left `ledger.db-wal` behind, and a backup copied over `ledger.db` then had that stale log
    // replayed over it (nothing restored, or a malformed database). Bounded: a connection still
    // held by a task being cut must not hold the exit.
    if tokio::time::timeout(CLOSE_WAIT, store.close())
        .await
        .is_err()
    {
        tracing::warn!("the database connections did not close within {CLOSE_WAIT:?}");
    }
    served
}

/// How long a stopped ledger waits for its database connections to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// [`serve`] over an already connected store (tests that take the database away under a running
/// ledger use it); `config.database_url` is not used.
pub async fn serve_store(
    store: Arc<Store>,
    config: LedgerConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let config = Arc::new(config);
    let mut background = syft_server::Tasks::default();
    background.spawn(run_sweeper(store.clone(), config.sweep_interval));
    // Alerts run only where they can work: local accounting and a key to open secrets.
    if config.alerts.key.is_some() && config.hosted.is_none() {
        let alerts_config = Arc::new(config.alerts.clone());
        background.spawn(alerts::evaluate::run(
            store.clone(),
            alerts_config.evaluate_interval,
        ));
        background.spawn(alerts::deliver::Worker::new(store.clone(), alerts_config).run());
    }
    let resolutions = tokio_util::task::TaskTracker::new();
    let backend: Arc<dyn backend::TransferBackend> = match &config.hosted {
        None => Arc::new(backend::LocalBackend::new(store.clone())),
        Some(hosted_config) => {
            if config.accounting_api {
                return Err(LedgerError::invalid(
                    "the accounting REST API is served over local accounting only, not with backend = hosted",
                ));
            }
            let hosted = Arc::new(
                hosted::Hosted::start(store.clone(), hosted_config.clone(), &config.currency)
                    .await?,
            );
            background.spawn(hosted::run_recovery(
                hosted.clone(),
                config.sweep_interval.max(Duration::from_secs(1)),
            ));
            Arc::new(hosted::backend::HostedBackend::new(
                hosted,
                store.clone(),
                resolutions.clone(),
            ))
        }
    };
    let ledger = Ledger::new(store.clone(), backend, config.clone());
    let (health, health_service) = health::Health::new().await;
    background.spawn(health::run_database_probe(
        store.clone(),
        health.clone(),
        health::PROBE_INTERVAL,
    ));
    let stopping = health.clone();
    let calls = syft_server::Calls::default();
    let quiet = calls.clone();
    let grace = config.shutdown_grace;
    let (open, clock) = (ledger.open_holds().clone(), store.clone());
    let stop = syft_server::Stop::on(shutdown, move || async move {
        stopping.shut_down().await;
        // Routers stopping beside this ledger still capture what they answered and void what
        // they did not (README, "Shutdown"): calls are taken (NOT_SERVING is published, so
        // routers with another replica move to it) while a hold placed here is open or calls
        // come, until neither for a second, for at most half the grace. It stopped taking calls
        // at once: a router's capture after its upstream answered was refused, and its voids
        // went nowhere (holds kept until they expired).
        let open_here = move || open.any_open(clock.now());
        quiet
            .quiet_for(QUIET_BEFORE_STOP, grace / 2, open_here)
            .await;
    });
    // Written as addresses (`127.0.0.1:50051`), not as options (`Some(127.0.0.1:50051)`).
    let text = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    let addr = text(listeners.grpc.local_addr().ok());
    let http_addr = text(listeners.http.as_ref().and_then(|l| l.local_addr().ok()));
    let tls = config.tls.as_ref();
    tracing::info!(
        %addr,
        %http_addr,
        database = ?store.backend(),
        hosted = config.hosted.is_some(),
        accounting_api = config.accounting_api,
        tls = tls.is_some(),
        client_auth = tls.is_some_and(|t| t.requires_client_cert()),
        "ledger serving"
    );
    let incoming =
        syft_server::grpc_incoming(listeners.grpc, syft_server::MAX_GRPC_CONNECTIONS, tls)
            .map_err(|e| LedgerError::Internal(format!("gRPC listener: {e}")))?;
    let body_budget = syft_server::BODY_BUDGET_BYTES;
    // Both services advertised: `grpcurl list` showed the Ledger only, though Alerts is served.
    let services = [health::LEDGER_SERVICE, health::ALERTS_SERVICE];
    let grpc = syft_server::grpc_router(health_service, &services, body_budget, calls)
        .map_err(|e| LedgerError::Internal(format!("reflection descriptors: {e}")))?
        .add_service(grpc::GrpcLedger(ledger.clone()).into_server())
        .add_service(grpc::GrpcLedger(ledger.clone()).into_alerts_server())
        .serve_with_incoming_shutdown(incoming, stop.stopped());
    let grpc = async {
        grpc.await
            .map_err(|e| LedgerError::Unavailable(format!("gRPC server failed: {e}")))
    };
    let http = async {
        let Some(listener) = listeners.http else {
            return Ok(());
        };
        let app = http::router(
            ledger.clone(),
            config.accounting_api,
            config.metrics_token.clone(),
            health.readiness(),
        );
        syft_server::serve_http(listener, app, tls, config.http, stop.stopped())
            .await
            .map_err(|e| LedgerError::Unavailable(format!("HTTP server failed: {e}")))
    };
    let result = tokio::select! {
        r = async {
            let served = tokio::try_join!(grpc, http).map(|_| ());
            // A hosted capture or void whose caller left runs on in its own task; cut here, it
            // would keep its lease and leave its retry "in progress" (hosted/backend.rs).
            resolutions.close();
            resolutions.wait().await;
            served
        } => r,
        // What is left of the grace after taking calls.
        _ = stop.deadline(grace - grace / 2) => Ok(()),
    };
    drop(background);
    tracing::info!("ledger stopped");
    result
}

/// How long a stopping ledger waits without a call before it stops taking them (`serve`).
const QUIET_BEFORE_STOP: Duration = Duration::from_secs(1);

/// Cancels expired holds, deletes answers past their retention and folds hot-recipient credits into balances, forever.
pub async fn run_sweeper(store: Arc<Store>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Failures of single holds are logged and counted inside; only the listing can fail here.
        match store.sweep_expired(500).await {
            Ok(store::SweepReport { cancelled: 0, .. }) => {}
            Ok(store::SweepReport { cancelled, .. }) => {
                tracing::info!(cancelled, "expired holds cancelled");
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        match store.purge_answers(1000).await {
            Ok(0) => {}
            Ok(purged) => tracing::debug!(purged, "expired answers deleted"),
            Err(e) => tracing::warn!(error = %e, "answer purge failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_hides_secrets() {
        let config = crate::LedgerConfig {
            admin_key: "admin-key-secret".into(),
            hosted: Some(crate::HostedConfig::new(
                "http://x",
                "o@x.io",
                "remote-password",
            )),
            ..Default::default()
        };
        let text = format!("{config:?}");
        assert!(
            !text.contains("admin-key-secret") && !text.contains("remote-password"),
            "{text}"
        );
    }
}
