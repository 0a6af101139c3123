//! Test harness: real ledger servers on 127.0.0.1:0 over a fresh SQLite file or a fresh Postgres
//! database (when DATABASE_URL is set; otherwise Postgres tests print that they skipped).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use syft_ledger::client::{connect_lazy, LedgerClient};
use syft_ledger::{LedgerConfig, Store};
use syft_proto::ledger as pb;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_KEY: &str = "test-admin-key";
pub const USD: i64 = 1_000_000;

pub enum Db {
    Sqlite(tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

/// A fresh database; `None` when Postgres is wanted but DATABASE_URL is unset.
pub async fn fresh_database(postgres: bool) -> Option<(String, Db)> {
    if !postgres {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("ledger.db").display()
        );
        return Some((url, Db::Sqlite(dir)));
    }
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        eprintln!("SKIPPED: DATABASE_URL is not set, Postgres test not run");
        return None;
    };
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let name = format!("syft_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .expect("connect to DATABASE_URL");
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create database");
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(&admin_url);
    Some((format!("{base}/{name}"), Db::Postgres { admin_url, name }))
}

pub struct LedgerServer {
    pub addr: SocketAddr,
    /// Probes, and the accounting REST API when the config enables it.
    pub http_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<syft_ledger::Result<()>>,
}

impl LedgerServer {
    pub async fn start(config: LedgerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http_addr = http.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(syft_ledger::serve(
            config,
            syft_ledger::Listeners::grpc(listener).with_http(http),
            async {
                let _ = rx.await;
            },
        ));
        let server = Self {
            addr,
            http_addr,
            shutdown: Some(tx),
            task,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            assert!(!self.task.is_finished(), "ledger exited during start");
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("ledger did not start");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .expect("join")
            .expect("ledger exited cleanly");
    }

    /// Simulates a crash: the task is killed without a graceful shutdown.
    pub fn kill(self) {
        self.task.abort();
    }
}

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

    pub async fn with(postgres: bool, tweak: impl FnOnce(&mut LedgerConfig)) -> Option<Self> {
        let (url, db) = fresh_database(postgres).await?;
        let mut config = LedgerConfig {
            database_url: url.clone(),
            admin_key: ADMIN_KEY.into(),
            sweep_interval: Duration::from_millis(200),
            max_connections: 8,
            accounting_api: true,
            ..LedgerConfig::default()
        };
        tweak(&mut config);
        // Migrate once before the server starts, so two processes never race on a new SQLite file.
        let store = Arc::new(Store::connect(&url, 4).await.expect("store"));
        let server = LedgerServer::start(config.clone()).await;
        Some(Self {
            config,
            server: Some(server),
            store,
            db: Some(db),
        })
    }

    pub fn url(&self) -> String {
        self.server.as_ref().expect("server running").url()
    }

    pub fn http_url(&self) -> String {
        self.server.as_ref().expect("server running").http_url()
    }

    pub fn admin(&self) -> LedgerClient {
        connect_lazy(&self.url(), ADMIN_KEY).expect("client")
    }

    pub fn client(&self, secret: &str) -> LedgerClient {
        connect_lazy(&self.url(), secret).expect("client")
    }

    /// Creates an account and deposits `micros` (if positive); returns its secret.
    pub async fn account(&self, email: &str, micros: i64) -> String {
        let mut admin = self.admin();
        let created = admin
            .create_account(pb::CreateAccountRequest {
                email: email.into(),
                organization: "test".into(),
                ..Default::default()
            })
            .await
            .expect("create account")
            .into_inner();
        if micros > 0 {
            admin
                .deposit(pb::DepositRequest {
                    email: email.into(),
                    amount_micros: micros,
                    idempotency_key: format!("initial-{email}"),
                })
                .await
                .expect("deposit");
        }
        created.secret
    }

    /// Issues a token from `sender` (by secret) to `recipient`.
    pub async fn token(&self, sender_secret: &str, recipient: &str) -> String {
        self.client(sender_secret)
            .issue_token(pb::IssueTokenRequest {
                recipient_email: recipient.into(),
                ..Default::default()
            })
            .await
            .expect("issue token")
            .into_inner()
            .token
    }

    pub async fn balance(&self, email: &str) -> pb::Account {
        self.admin()
            .get_account(pb::GetAccountRequest {
                email: email.into(),
            })
            .await
            .expect("get account")
            .into_inner()
    }

    pub async fn assert_consistent(&self) {
        let report = self.store.verify().await.expect("verify");
        assert!(report.is_ok(), "ledger inconsistent: {:#?}", report);
    }

    /// Verifies the ledger, stops the server and drops the database.
    pub async fn finish(mut self) {
        self.assert_consistent().await;
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        self.store.close().await;
        if let Some(Db::Postgres { admin_url, name }) = self.db.take() {
            use sqlx::Executor;
            if let Ok(mut conn) =
                <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url).await
            {
                let _ = conn
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
            }
        }
    }
}

pub fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(status) => status.code(),
    }
}

/// Runs each listed async test against SQLite and Postgres.
#[macro_export]
macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let h = $crate::common::Harness::new(false).await.expect("sqlite harness");
                    let h = super::$name(h).await;
                    h.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(h) = $crate::common::Harness::new(true).await else { return };
                    let h = super::$name(h).await;
                    h.finish().await;
                }
            )*
        }
    };
}
