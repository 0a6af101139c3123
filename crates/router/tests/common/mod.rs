//! End-to-end harness: a real ledger (SQLite temp file, or Postgres when `DATABASE_URL` is set),
//! a real in-process OpenAI-compatible upstream that can be told to misbehave, and the router
//! serving gRPC and HTTP on 127.0.0.1:0.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Json;
use serde_json::{json, Value};
use syft_ledger::{LedgerConfig, Store};
use syft_proto::ledger::ledger_client::LedgerClient;
use syft_proto::ledger::{
    self as lpb, CreateAccountRequest, DepositRequest, GetAccountRequest, IssueTokenRequest,
    ListTransfersRequest, QueryUsageRequest, Transfer, UsageRecord,
};
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::{ChatOptions, ChatRequest, Message};
use syft_router_svc::{LedgerSettings, OpenAiConfig, Pricing, RouterConfig, UpstreamConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const PRICE: i64 = 10_000; // $0.01
pub const CONTENT: &str = "Hello from the upstream model";
pub const UP_PROMPT: u64 = 20;
pub const UP_COMPLETION: u64 = 5;

// ---------------------------------------------------------------------------------------------
// fake upstream

/// How the fake upstream answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// A good answer with usage.
    Ok,
    /// A good answer without usage (the router must count tokens itself).
    NoUsage,
    /// An HTTP error status with an OpenAI error body.
    Status(u16),
    /// Never answers.
    Stall,
    /// Answers after a delay.
    Delay(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with `choices: []`.
    EmptyChoices,
    /// Streams: one chunk per `Duration`, 100 chunks.
    SlowStream(Duration),
    /// Streams one chunk, then stalls.
    StreamStall,
    /// Streams one chunk, then garbage.
    StreamGarbage,
}

pub struct FakeUpstream {
    pub base_url: String,
    state: Arc<UpState>,
}

struct UpState {
    mode: Mutex<Mode>,
    hits: AtomicUsize,
    last_body: Mutex<Option<Value>>,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let state = Arc::new(UpState {
            mode: Mutex::new(Mode::Ok),
            hits: AtomicUsize::new(0),
            last_body: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(upstream_handler))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream {
            base_url: format!("http://{addr}/v1"),
            state,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("lock") = mode;
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn last_body(&self) -> Option<Value> {
        self.state.last_body.lock().expect("lock").clone()
    }
}

fn completion_json(model: &str, usage: bool) -> Value {
    let mut v = json!({
        "id": "up-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT}, "finish_reason": "stop"}],
    });
    if usage {
        v["usage"] = json!({"prompt_tokens": UP_PROMPT, "completion_tokens": UP_COMPLETION, "total_tokens": UP_PROMPT + UP_COMPLETION});
    }
    v
}

fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

fn chunk(model: &str, content: Option<&str>, finish: Option<&str>) -> Value {
    let delta = match content {
        Some(c) => json!({"content": c}),
        None => json!({}),
    };
    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

async fn upstream_handler(State(state): State<Arc<UpState>>, Json(body): Json<Value>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    *state.last_body.lock().expect("lock") = Some(body.clone());
    let mode = state.mode.lock().expect("lock").clone();
    let model = body["model"].as_str().unwrap_or("m").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    match mode {
        Mode::Status(code) => {
            let status = axum::http::StatusCode::from_u16(code).expect("status");
            return (
                status,
                Json(json!({"error": {"message": "upstream exploded", "type": "server_error"}})),
            )
                .into_response();
        }
        Mode::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Mode::Delay(d) => tokio::time::sleep(d).await,
        Mode::Garbage => {
            return ([(CONTENT_TYPE, "application/json")], "{\"choices\": [oops").into_response();
        }
        Mode::EmptyChoices if !stream => {
            return Json(json!({"id": "x", "model": model, "choices": []})).into_response();
        }
        _ => {}
    }
    if !stream {
        return Json(completion_json(&model, mode != Mode::NoUsage)).into_response();
    }
    let words: Vec<String> = CONTENT.split_inclusive(' ').map(str::to_string).collect();
    let events: futures::stream::BoxStream<'static, Result<String, Infallible>> = match mode {
        Mode::EmptyChoices => Box::pin(futures::stream::iter(vec![
            Ok(sse(&chunk(&model, None, Some("stop")))),
            Ok("data: [DONE]\n\n".to_string()),
        ])),
        Mode::SlowStream(every) => {
            let model = model.clone();
            Box::pin(futures::stream::unfold(0u32, move |i| {
                let model = model.clone();
                async move {
                    if i >= 100 {
                        return None;
                    }
                    tokio::time::sleep(every).await;
                    Some((Ok(sse(&chunk(&model, Some("tick "), None))), i + 1))
                }
            }))
        }
        Mode::StreamStall => {
            let first = sse(&chunk(&model, Some("partial "), None));
            Box::pin(futures::stream::iter(vec![Ok(first)]).chain(futures::stream::pending()))
        }
        Mode::StreamGarbage => Box::pin(futures::stream::iter(vec![
            Ok(sse(&chunk(&model, Some("partial "), None))),
            Ok("data: {not json\n\n".to_string()),
        ])),
        _ => {
            let mut out: Vec<Result<String, Infallible>> = words
                .iter()
                .map(|w| Ok(sse(&chunk(&model, Some(w), None))))
                .collect();
            out.push(Ok(sse(&chunk(&model, None, Some("stop")))));
            if include_usage && mode != Mode::NoUsage {
                out.push(Ok(sse(&json!({"id": "up-1", "object": "chat.completion.chunk", "model": model, "choices": [],
                    "usage": {"prompt_tokens": UP_PROMPT, "completion_tokens": UP_COMPLETION, "total_tokens": UP_PROMPT + UP_COMPLETION}}))));
            }
            out.push(Ok("data: [DONE]\n\n".to_string()));
            Box::pin(futures::stream::iter(out))
        }
    };
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(events))
        .expect("response")
}

use futures::StreamExt as _;

// ---------------------------------------------------------------------------------------------
// ledger

/// A database for one test: a fresh SQLite file, or a fresh Postgres database.
pub struct Db {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// (server URL, database name) of a database created for the test.
    pg: Option<(String, String)>,
}

impl Db {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("ledger.db").display()
        );
        Db {
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A fresh database on the Postgres server of `DATABASE_URL`, or `None` (with a message)
    /// when it is not set.
    pub async fn postgres(test: &str) -> Option<Self> {
        let Ok(base) = std::env::var("DATABASE_URL") else {
            eprintln!("SKIP {test}: DATABASE_URL is not set (Postgres variant)");
            return None;
        };
        if !base.starts_with("postgres") {
            eprintln!("SKIP {test}: DATABASE_URL is not a Postgres URL");
            return None;
        }
        use sqlx::Connection;
        let name = format!("syft_router_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .expect("connect postgres");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let (prefix, query) = match base.split_once('?') {
            Some((p, q)) => (p.to_string(), format!("?{q}")),
            None => (base.clone(), String::new()),
        };
        let root = match prefix.rfind('/') {
            Some(i) if i > "postgres://".len() => prefix[..i].to_string(),
            _ => prefix.clone(),
        };
        Some(Db {
            url: format!("{root}/{name}{query}"),
            _dir: None,
            pg: Some((base, name)),
        })
    }

    /// Drops a Postgres test database (best effort).
    pub async fn drop_postgres(&self) {
        use sqlx::Connection;
        let Some((base, name)) = &self.pg else { return };
        let result = match sqlx::PgConnection::connect(base).await {
            Ok(mut conn) => sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            eprintln!("could not drop test database {name}: {e}");
        }
    }
}

pub struct LedgerHandle {
    pub url: String,
    pub store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl LedgerHandle {
    pub async fn start(db: &Db, hold_ttl: Duration) -> Self {
        let store = Arc::new(Store::connect(&db.url, 8).await.expect("connect store"));
        let config = LedgerConfig {
            database_url: db.url.clone(),
            admin_key: ADMIN_KEY.into(),
            hold_ttl,
            sweep_interval: Duration::from_millis(200),
            ..LedgerConfig::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ledger");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel();
        let s = store.clone();
        let task = tokio::spawn(async move {
            let _ = syft_ledger::serve_store(
                s,
                config,
                syft_ledger::Listeners::grpc(listener),
                async {
                    let _ = rx.await;
                },
            )
            .await;
        });
        LedgerHandle {
            url,
            store,
            shutdown: Some(tx),
            task,
        }
    }

    /// Stops serving (the ledger becomes unreachable).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn authed<T>(msg: T, secret: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {secret}").parse().expect("header"),
    );
    req
}

pub async fn ledger_client(url: &str) -> LedgerClient<Channel> {
    LedgerClient::connect(url.to_string())
        .await
        .expect("ledger client")
}

pub struct Account {
    pub email: String,
    pub secret: String,
}

pub async fn create_account(ledger: &str, prefix: &str) -> Account {
    let email = format!("{prefix}-{}@example.com", uuid::Uuid::new_v4().simple());
    let resp = ledger_client(ledger)
        .await
        .create_account(authed(
            CreateAccountRequest {
                email: email.clone(),
                organization: "test".into(),
                secret: None,
                currency: None,
            },
            ADMIN_KEY,
        ))
        .await
        .expect("create account")
        .into_inner();
    Account {
        email,
        secret: resp.secret,
    }
}

pub async fn deposit(ledger: &str, email: &str, amount: i64) {
    ledger_client(ledger)
        .await
        .deposit(authed(
            DepositRequest {
                email: email.into(),
                amount_micros: amount,
                idempotency_key: uuid::Uuid::new_v4().to_string(),
            },
            ADMIN_KEY,
        ))
        .await
        .expect("deposit");
}

pub async fn issue_token(ledger: &str, sender: &Account, recipient: &str) -> String {
    ledger_client(ledger)
        .await
        .issue_token(authed(
            IssueTokenRequest {
                recipient_email: recipient.into(),
                expires_at_unix_micros: None,
                spend_limit_micros: None,
            },
            &sender.secret,
        ))
        .await
        .expect("issue token")
        .into_inner()
        .token
}

pub async fn account(ledger: &str, email: &str) -> lpb::Account {
    ledger_client(ledger)
        .await
        .get_account(authed(
            GetAccountRequest {
                email: email.into(),
            },
            ADMIN_KEY,
        ))
        .await
        .expect("get account")
        .into_inner()
}

pub async fn transfers_of(ledger: &str, email: &str) -> Vec<Transfer> {
    ledger_client(ledger)
        .await
        .list_transfers(authed(
            ListTransfersRequest {
                account_email: email.into(),
                page_size: 500,
                ..Default::default()
            },
            ADMIN_KEY,
        ))
        .await
        .expect("list transfers")
        .into_inner()
        .transfers
}

pub async fn usage_of(ledger: &str, user_email: &str) -> Vec<UsageRecord> {
    ledger_client(ledger)
        .await
        .query_usage(authed(
            QueryUsageRequest {
                user_email: user_email.into(),
                page_size: 500,
                ..Default::default()
            },
            ADMIN_KEY,
        ))
        .await
        .expect("query usage")
        .into_inner()
        .records
}

// ---------------------------------------------------------------------------------------------
// router

pub struct RouterHandle {
    pub grpc_url: String,
    pub http_url: String,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl RouterHandle {
    pub async fn start(config: RouterConfig) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let grpc_url = format!("http://{}", grpc.local_addr().expect("addr"));
        let http_url = format!("http://{}", http.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            if let Err(e) = syft_router_svc::serve(config, grpc, http, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("router stopped: {e}");
            }
        });
        RouterHandle {
            grpc_url,
            http_url,
            shutdown: Some(tx),
        }
    }

    pub async fn client(&self) -> RouterClient<Channel> {
        for _ in 0..50 {
            if let Ok(c) = RouterClient::connect(self.grpc_url.clone()).await {
                return c.max_decoding_message_size(64 * 1024 * 1024);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("router did not start");
    }
}

pub fn router_config(
    name: &str,
    owner: &str,
    owner_secret: &str,
    ledger_url: &str,
    pricing: Pricing,
    upstream_url: Option<&str>,
) -> RouterConfig {
    let mut config = RouterConfig::new(name, owner).with_chat_pricing(pricing);
    config.ledger = LedgerSettings {
        url: ledger_url.into(),
        secret: owner_secret.into(),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(500),
        hold_ttl_seconds: None,
        ..LedgerSettings::default()
    };
    if let Some(url) = upstream_url {
        let mut o = OpenAiConfig::new(url);
        o.request_timeout = Duration::from_millis(1500);
        o.idle_timeout = Duration::from_millis(800);
        o.max_retries = 1;
        o.retry_backoff = Duration::from_millis(20);
        o.api_key = Some("upstream-key".into());
        config.upstream = UpstreamConfig::OpenAi(o);
    }
    config
}

/// A funded user with a token, an owner, a fake upstream and a router priced `pricing`.
pub struct Stack {
    pub db: Db,
    pub ledger: LedgerHandle,
    pub owner: Account,
    pub alice: Account,
    pub token: String,
    pub upstream: FakeUpstream,
    pub router: RouterHandle,
}

pub const FUNDS: i64 = 1_000_000; // $1

impl Stack {
    pub async fn start(pricing: Pricing) -> Self {
        Self::start_with(Db::sqlite(), pricing, Duration::from_secs(300), |_| {}).await
    }

    pub async fn start_with(
        db: Db,
        pricing: Pricing,
        hold_ttl: Duration,
        tweak: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        let ledger = LedgerHandle::start(&db, hold_ttl).await;
        let owner = create_account(&ledger.url, "owner").await;
        let alice = create_account(&ledger.url, "alice").await;
        deposit(&ledger.url, &alice.email, FUNDS).await;
        let token = issue_token(&ledger.url, &alice, &owner.email).await;
        let upstream = FakeUpstream::start().await;
        let mut config = router_config(
            "test-router",
            &owner.email,
            &owner.secret,
            &ledger.url,
            pricing,
            Some(&upstream.base_url),
        );
        tweak(&mut config);
        let router = RouterHandle::start(config).await;
        Stack {
            db,
            ledger,
            owner,
            alice,
            token,
            upstream,
            router,
        }
    }

    pub fn request(&self, content: &str) -> ChatRequest {
        ChatRequest {
            user_email: self.alice.email.clone(),
            model: "test-model".into(),
            messages: vec![Message {
                role: "user".into(),
                content: content.into(),
                name: None,
            }],
            options: Some(ChatOptions {
                max_tokens: Some(100),
                ..Default::default()
            }),
            transaction_token: self.token.clone(),
            request_id: String::new(),
        }
    }

    pub async fn client(&self) -> RouterClient<Channel> {
        self.router.client().await
    }

    /// (balance, held, available) of alice.
    pub async fn alice_money(&self) -> (i64, i64, i64) {
        let a = account(&self.ledger.url, &self.alice.email).await;
        (a.balance_micros, a.held_micros, a.available_micros)
    }

    pub async fn owner_balance(&self) -> i64 {
        account(&self.ledger.url, &self.owner.email)
            .await
            .balance_micros
    }

    pub async fn transfers(&self) -> Vec<Transfer> {
        transfers_of(&self.ledger.url, &self.alice.email).await
    }

    pub async fn usage(&self) -> Vec<UsageRecord> {
        usage_of(&self.ledger.url, &self.alice.email).await
    }

    /// Money invariants: conservation, available >= 0, one usage row per request id.
    pub async fn check_invariants(&self) {
        let report = self.ledger.store.verify().await.expect("verify");
        assert!(
            report.is_ok(),
            "ledger invariants broken: {:?}",
            report.problems
        );
        let (_, _, available) = self.alice_money().await;
        assert!(available >= 0, "available below zero: {available}");
        let usage = self.usage().await;
        let mut ids: Vec<_> = usage
            .iter()
            .filter_map(|u| u.usage.as_ref().map(|u| u.request_id.clone()))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "more than one usage row for a request");
    }

    /// Waits until alice has no pending transfer (a void or expiry happened).
    pub async fn wait_no_pending(&self, within: Duration) -> Vec<Transfer> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let t = self.transfers().await;
            if t.iter().all(|t| t.status() != lpb::TransferStatus::Pending) {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("transfers still pending: {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Extracts the ErrorInfo reason of a status.
pub fn reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|i| i.reason)
}
