//! The ledger in tests: a server on 127.0.0.1:0 over a test database, the [`Harness`] the
//! ledger's own tests run in, and account set-up through the ledger's gRPC API.

use std::sync::Arc;

use std::time::Duration;
use syft_ledger::alerts::{parse_schedule, AlertsConfig, SealKey};

use syft_ledger::client::{self, connect_lazy, LedgerClient};
use syft_ledger::store::{AccountRow, TokenGrant};
use syft_ledger::{LedgerConfig, Store};
use syft_proto::ledger as pb;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{assert_consistent, req, Db, ADMIN_KEY};

/// The ledger configuration of tests: the kit's admin key, sweeps every 200 ms (so expiry tests
/// are quick), eight database connections, the accounting REST API on the HTTP port, and a
/// 2 s shutdown grace (a stopping ledger waits up to half its grace for holds still open, and
/// many tests stop one with holds their crashed routers left).
pub fn ledger_config(database_url: &str) -> LedgerConfig {
    LedgerConfig {
        database_url: database_url.into(),
        admin_key: ADMIN_KEY.into(),
        sweep_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(2),
        max_connections: 8,
        accounting_api: true,
        ..LedgerConfig::default()
    }
}

/// The alerts key of ledgers the kit starts with [`alerts_on`].
pub const ALERTS_KEY: &str = "test-alerts-key-0123456789";

/// Alerts on, every retry 200 ms apart (five retries), answers within 500 ms, evaluated every
/// 100 ms: the production code paths on a schedule that runs in seconds.
pub fn alerts_on(c: &mut LedgerConfig) {
    c.alerts = AlertsConfig {
        key: Some(Arc::new(SealKey::from_passphrase(ALERTS_KEY).expect("key"))),
        allowed_hosts: vec!["127.0.0.1".into()],
        retry_schedule: parse_schedule("200ms,200ms,200ms,200ms,200ms").expect("schedule"),
        jitter_percent: 0,
        request_timeout: Duration::from_millis(500),
        disable_after: Duration::from_secs(3600),
        evaluate_interval: Duration::from_millis(100),
        deliver_interval: Duration::from_millis(50),
        rate_per_minute: 600,
        // Tests queue backlogs of test events (up to 300 for one endpoint).
        max_pending_tests: 1_000,
    };
}

/// Serves a ledger over `store` on the given listeners until `shutdown`. The only place the kit
/// starts a ledger.
pub async fn serve_ledger(
    store: Arc<Store>,
    config: LedgerConfig,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> syft_ledger::Result<()> {
    let listeners = syft_ledger::Listeners::grpc(grpc).with_http(http);
    syft_ledger::serve_store(store, config, listeners, shutdown).await
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// A ledger served in-process on 127.0.0.1:0 (gRPC, and HTTP for probes and the REST API).
pub struct LedgerServer {
    /// `http://` or, with TLS configured, `https://` address of the gRPC API.
    pub url: String,
    pub http_url: String,
    /// The server's own store: closing it takes the database away from the server.
    pub store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<syft_ledger::Result<()>>,
}

impl LedgerServer {
    /// Connects to the database (migrating it), starts serving, and waits until the port accepts.
    pub async fn start(config: LedgerConfig) -> Self {
        Self::start_on(config, bind().await).await
    }

    /// [`LedgerServer::start`] on the gRPC address of `url` (a ledger restarted where routers
    /// already point).
    pub async fn start_at(config: LedgerConfig, url: &str) -> Self {
        let addr = url.rsplit("://").next().unwrap_or(url);
        let grpc = TcpListener::bind(addr).await.expect("bind the old address");
        Self::start_on(config, grpc).await
    }

    async fn start_on(config: LedgerConfig, grpc: TcpListener) -> Self {
        let store = Arc::new(
            Store::connect_with(
                &config.database_url,
                config.max_connections,
                config.batch_workers,
            )
            .await
            .expect("connect store"),
        );
        let http = bind().await;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let addr = grpc.local_addr().expect("addr");
        let url = format!("{scheme}://{addr}");
        let http_url = format!("{scheme}://{}", http.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_ledger(store.clone(), config, grpc, http, async {
            let _ = rx.await;
        }));
        for _ in 0..200 {
            assert!(!task.is_finished(), "ledger exited during start");
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Self {
                    url,
                    http_url,
                    store,
                    shutdown: Some(tx),
                    task,
                };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("ledger did not start");
    }

    /// Sends the shutdown signal (SIGTERM) without waiting: the ledger drains within its grace.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `serve` has returned (the process would have exited).
    pub fn has_exited(&self) -> bool {
        self.task.is_finished()
    }

    /// A graceful shutdown that must end cleanly.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .expect("join")
            .expect("ledger exited cleanly");
    }

    /// Takes the ledger away at once (it becomes unreachable), keeping the value in place.
    pub async fn stop_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Simulates a crash: the task is killed without a graceful shutdown.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A ledger on a fresh database, as the ledger's tests use it: a server, a store of its own on
/// the same database (for `verify`), and helpers that act as the admin.
pub struct Harness {
    pub config: LedgerConfig,
    pub server: Option<LedgerServer>,
    pub store: Arc<Store>,
    db: Option<Db>,
}

impl Harness {
    pub async fn new(postgres: bool) -> Option<Self> {
        Self::with(postgres, |_| {}).await
    }

    /// `None` when Postgres is wanted but not available (a `SKIPPED` line says so).
    pub async fn with(postgres: bool, tweak: impl FnOnce(&mut LedgerConfig)) -> Option<Self> {
        let db = Db::fresh(postgres).await?;
        let mut config = ledger_config(&db.url);
        tweak(&mut config);
        // Migrate once before the server starts, so two processes never race on a new SQLite file.
        let store = Arc::new(Store::connect(&db.url, 4).await.expect("store"));
        let server = LedgerServer::start(config.clone()).await;
        Some(Self {
            config,
            server: Some(server),
            store,
            db: Some(db),
        })
    }

    fn running(&self) -> &LedgerServer {
        self.server.as_ref().expect("server running")
    }

    pub fn url(&self) -> String {
        self.running().url.clone()
    }

    pub fn http_url(&self) -> String {
        self.running().http_url.clone()
    }

    pub fn admin(&self) -> LedgerClient {
        self.client(ADMIN_KEY)
    }

    pub fn client(&self, secret: &str) -> LedgerClient {
        connect_lazy(&self.url(), secret).expect("client")
    }

    /// Creates an account and deposits `micros` (if positive); returns its secret.
    /// A new account keeping `currency` (not the ledger's), funded with `micros`; its secret.
    pub async fn account_in(&self, email: &str, currency: &str, micros: i64) -> String {
        let request = pb::CreateAccountRequest {
            currency: Some(currency.into()),
            ..req::create_account(email)
        };
        let secret = crate::ok(self.admin().create_account(request).await).secret;
        if micros > 0 {
            deposit(&self.url(), email, micros).await;
        }
        secret
    }

    pub async fn account(&self, email: &str, micros: i64) -> String {
        let mut admin = self.admin();
        let secret = client::create_account(&mut admin, email, "test")
            .await
            .expect("create account");
        if micros > 0 {
            client::deposit(&mut admin, email, micros, &format!("initial-{email}"))
                .await
                .expect("deposit");
        }
        secret
    }

    /// Issues a token from `sender` (by secret) to `recipient`.
    pub async fn token(&self, sender_secret: &str, recipient: &str) -> String {
        client::issue_token(&mut self.client(sender_secret), recipient)
            .await
            .expect("issue token")
    }

    /// Issues a token from `sender` (by secret) to `recipient` that may spend at most
    /// `spend_limit` micros in all.
    pub async fn limited_token(
        &self,
        sender_secret: &str,
        recipient: &str,
        spend_limit: i64,
    ) -> String {
        let request = pb::IssueTokenRequest {
            recipient_email: recipient.into(),
            spend_limit_micros: Some(spend_limit),
            ..Default::default()
        };
        let issued = self.client(sender_secret).issue_token(request).await;
        issued.expect("issue token").into_inner().token
    }

    /// The accounts of a paid flow: `recipient` (no funds), `sender` funded with `funds`, and a
    /// token of the sender's for the recipient. Returns (recipient secret, sender secret, token).
    pub async fn payer(
        &self,
        recipient: &str,
        sender: &str,
        funds: i64,
    ) -> (String, String, String) {
        let recipient_secret = self.account(recipient, 0).await;
        let sender_secret = self.account(sender, funds).await;
        let token = self.token(&sender_secret, recipient).await;
        (recipient_secret, sender_secret, token)
    }

    pub async fn balance(&self, email: &str) -> pb::Account {
        account(&self.url(), email).await
    }

    pub async fn assert_consistent(&self) {
        assert_consistent(&self.store).await;
    }

    /// Every usage row (first 500), as the admin reads them.
    pub async fn usage_rows(&self) -> Vec<pb::UsageRecord> {
        usage_rows_seen_by(&mut self.admin()).await
    }

    /// Every transfer (first 500), as the admin reads them.
    pub async fn transfers(&self) -> Vec<pb::Transfer> {
        let all = pb::ListTransfersRequest {
            page_size: 500,
            ..Default::default()
        };
        crate::ok(self.admin().list_transfers(all).await).transfers
    }

    /// Verifies the ledger, stops the server and drops the database.
    pub async fn finish(mut self) {
        self.assert_consistent().await;
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        self.store.close().await;
        if let Some(db) = self.db.take() {
            db.drop_postgres().await;
        }
    }
}

/// The first 500 usage rows `client`'s caller may see.
pub async fn usage_rows_seen_by(client: &mut LedgerClient) -> Vec<pb::UsageRecord> {
    let first = pb::QueryUsageRequest {
        page_size: 500,
        ..Default::default()
    };
    crate::ok(client.query_usage(first).await).records
}

// Set-up by ledger URL, acting as the admin (or as the sender, for tokens).

fn admin(ledger: &str) -> LedgerClient {
    connect_lazy(ledger, ADMIN_KEY).expect("ledger client")
}

/// An account with a unique email and its secret.
pub struct Account {
    pub email: String,
    pub secret: String,
}

/// A new, empty account whose email starts with `prefix`.
pub async fn create_account(ledger: &str, prefix: &str) -> Account {
    let email = format!("{prefix}-{}@example.com", uuid::Uuid::new_v4().simple());
    let secret = client::create_account(&mut admin(ledger), &email, "test")
        .await
        .expect("create account");
    Account { email, secret }
}

pub async fn deposit(ledger: &str, email: &str, amount: i64) {
    let key = uuid::Uuid::new_v4().to_string();
    client::deposit(&mut admin(ledger), email, amount, &key)
        .await
        .expect("deposit");
}

pub async fn issue_token(ledger: &str, sender: &Account, recipient: &str) -> String {
    let mut sender = connect_lazy(ledger, &sender.secret).expect("ledger client");
    client::issue_token(&mut sender, recipient)
        .await
        .expect("issue token")
}

/// Revokes `token`, as its sender.
pub async fn revoke_token(ledger: &str, sender: &Account, token: &str) {
    let mut c = connect_lazy(ledger, &sender.secret).expect("client");
    let revoke = pb::RevokeTokenRequest {
        token: token.to_string(),
    };
    crate::ok(c.revoke_token(revoke).await);
}

/// `hold` placed and captured in full, as a router's paid request is: the captured transfer.
pub async fn paid(router: &mut LedgerClient, hold: pb::AuthorizeRequest) -> pb::Transfer {
    let held = crate::ok(router.authorize(hold).await);
    crate::ok(router.capture(req::capture_full(&held.id)).await)
}

pub async fn account(ledger: &str, email: &str) -> pb::Account {
    admin(ledger)
        .get_account(req::get_account(email))
        .await
        .expect("get account")
        .into_inner()
}

pub async fn transfers_of(ledger: &str, email: &str) -> Vec<pb::Transfer> {
    let listed = admin(ledger).list_transfers(req::transfers_of(email)).await;
    listed.expect("list transfers").into_inner().transfers
}

pub async fn usage_of(ledger: &str, user_email: &str) -> Vec<pb::UsageRecord> {
    let usage = admin(ledger).query_usage(req::usage_of(user_email)).await;
    usage.expect("query usage").into_inner().records
}

/// Every usage row with `status` (any status when empty), whoever's, refusals recorded without a
/// user included.
pub async fn all_usage(ledger: &str, status: &str) -> Vec<pb::Usage> {
    let query = pb::QueryUsageRequest {
        status: status.into(),
        page_size: 500,
        ..Default::default()
    };
    let usage = admin(ledger).query_usage(query).await;
    let records = usage.expect("query usage").into_inner().records;
    records.into_iter().filter_map(|r| r.usage).collect()
}

/// Moves every transfer in `store` back by `by`, as if that much time had passed since they were
/// made (the budget windows read `created_at`): tests of a window's reset without waiting a day.
pub async fn backdate_transfers(store: &Store, by: Duration) {
    let micros = i64::try_from(by.as_micros()).expect("duration fits in i64 micros");
    sqlx::query("UPDATE transfers SET created_at = created_at - $1")
        .bind(micros)
        .execute(store.pool())
        .await
        .expect("backdate transfers");
    // Settled budget days are fixed by history that never moves outside a test; moving it
    // unsettles them.
    sqlx::query("DELETE FROM budget_days")
        .execute(store.pool())
        .await
        .expect("unsettle budget days");
}

/// Makes the ledger's writes of transfers wait (a table lock in a transaction of the test's own,
/// Postgres only) until the returned transaction ends: a ledger slow to place or resolve holds.
pub async fn lock_transfers(store: &Store) -> sqlx::Transaction<'static, sqlx::Any> {
    let mut lock = store.pool().begin().await.expect("begin");
    sqlx::query("LOCK TABLE transfers IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    lock
}

/// A delegation token from `sender` to `recipient` issued on the store itself, with no expiry and
/// no limits: the token of tests that drive the store without a server.
pub async fn store_token(store: &Store, sender: &AccountRow, recipient: &AccountRow) -> String {
    let grant = TokenGrant {
        sender: &sender.identity(),
        recipient,
        expires_at: None,
        spend_limit: None,
        limit_per_day: None,
    };
    store.issue_token(&grant).await.expect("token").token
}

/// [`lock_transfers`] for `hold`, released by a task of its own (join it to know it ended).
pub async fn lock_transfers_for(store: &Store, hold: Duration) -> JoinHandle<()> {
    let lock = lock_transfers(store).await;
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        lock.rollback().await.expect("unlock");
    })
}
