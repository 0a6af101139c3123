//! The router in tests: a server on 127.0.0.1:0 (gRPC and HTTP), its test configuration, and a
//! [`Stack`] of ledger, funded user, upstream and router.

use std::time::Duration;

use syft_proto::ledger::{self as lpb, Transfer, TransferStatus, UsageRecord};
use syft_proto::router::router_client::RouterClient;
use syft_proto::router::{
    chat_stream_event, ChatFinal, ChatOptions, ChatRequest, ChatStreamEvent, Message,
    SearchOptions, SearchRequest,
};
use syft_router_svc::{
    LedgerSettings, OpenAiConfig, Pricing, RouterConfig, ServeError, UpstreamConfig,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::{
    account, assert_consistent, create_account, deposit, issue_token, ledger_config, transfers_of,
    usage_of, Account, Db, FakeUpstream, LedgerServer,
};
use syft_ledger::LedgerConfig;

/// The per-request price of the stack's router: $0.01.
pub const PRICE: i64 = 10_000;
/// What the stack's user starts with: $1.
pub const FUNDS: i64 = 1_000_000;

/// Serves a router on the given listeners until `shutdown`. The only place the kit starts a
/// router.
pub async fn serve_router(
    config: RouterConfig,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    syft_router_svc::serve(config, grpc, http, shutdown).await
}

/// A router on a runtime of its own, so that a test can kill it as kill -9 would: no release,
/// no void, no cleanup of any kind ([`KillableRouter::kill`]).
pub struct KillableRouter {
    pub grpc_url: String,
    rt: tokio::runtime::Runtime,
}

impl KillableRouter {
    /// Serves `config` on fresh listeners (blocking binds: callable from any runtime).
    pub fn start(config: RouterConfig) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        grpc.set_nonblocking(true).expect("nonblocking");
        http.set_nonblocking(true).expect("nonblocking");
        let grpc_url = format!("http://{}", grpc.local_addr().expect("addr"));
        rt.spawn(async move {
            let grpc = TcpListener::from_std(grpc).expect("listener");
            let http = TcpListener::from_std(http).expect("listener");
            let _ = serve_router(config, grpc, http, std::future::pending()).await;
        });
        KillableRouter { grpc_url, rt }
    }

    /// Stops every task of the router where it stands.
    pub fn kill(self) {
        self.rt.shutdown_background();
    }
}

/// A router served in-process; dropping the handle shuts it down.
pub struct RouterHandle {
    /// `http://` or, with TLS configured, `https://` addresses.
    pub grpc_url: String,
    pub http_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl RouterHandle {
    pub async fn start(config: RouterConfig) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let grpc_url = format!("{scheme}://{}", grpc.local_addr().expect("addr"));
        let http_url = format!("{scheme}://{}", http.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let served = serve_router(config, grpc, http, async {
                let _ = rx.await;
            })
            .await;
            if let Err(e) = &served {
                eprintln!("router stopped: {e}");
            }
            served
        });
        RouterHandle {
            grpc_url,
            http_url,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The OpenAI-compatible front's `POST /v1/chat/completions`.
    pub fn chat_completions_url(&self) -> String {
        format!("{}/v1/chat/completions", self.http_url)
    }

    /// A plaintext gRPC client, once the router accepts.
    pub async fn client(&self) -> RouterClient<Channel> {
        for _ in 0..100 {
            if let Ok(c) = RouterClient::connect(self.grpc_url.clone()).await {
                return c.max_decoding_message_size(64 * 1024 * 1024);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("router did not start");
    }

    /// A client behind a slow link: a 64-byte HTTP/2 flow-control window, so the router can send
    /// a few events and must then wait for this client to read.
    pub async fn slow_link_client(&self) -> RouterClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(self.grpc_url.clone())
            .expect("url")
            .initial_stream_window_size(64)
            .connect()
            .await
            .expect("connect");
        RouterClient::new(channel)
    }

    /// Signals a graceful shutdown (in-flight requests get the configured grace).
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `serve` has returned (the router stopped, or never started).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the router to stop (after [`Self::shutdown`]) and returns how `serve` ended.
    pub async fn join(mut self) -> Result<(), ServeError> {
        let task = self.task.take().expect("router task");
        task.await.expect("join")
    }
}

/// One user message from `user` paying with `token`; default model, options and request id.
/// Reads a chat stream to its end: the text of its deltas and its final event. Every event must
/// arrive (an error event panics).
pub async fn read_answer(
    events: &mut tonic::Streaming<ChatStreamEvent>,
) -> (String, Option<ChatFinal>) {
    use futures::StreamExt as _;
    let (mut text, mut last) = (String::new(), None);
    while let Some(event) = events.next().await {
        match event.expect("every event").event {
            Some(chat_stream_event::Event::Delta(d)) => text.push_str(&d.content),
            Some(chat_stream_event::Event::Final(f)) => last = Some(f),
            None => {}
        }
    }
    (text, last)
}

/// Sends `req` with a client deadline of `deadline`, which it must not meet (the upstream or the
/// ledger is held up): the client gives up with `DEADLINE_EXCEEDED` (or `CANCELLED`).
pub async fn chat_given_up(c: &mut RouterClient<Channel>, req: ChatRequest, deadline: Duration) {
    let mut request = tonic::Request::new(req);
    request.set_timeout(deadline);
    let err = c.chat(request).await.expect_err("past its deadline");
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
}

pub fn chat_request(user: &str, token: &str, content: &str) -> ChatRequest {
    ChatRequest {
        user_email: user.into(),
        messages: vec![Message {
            role: "user".into(),
            content: content.into(),
            name: None,
        }],
        transaction_token: token.into(),
        ..Default::default()
    }
}

/// A search for `query` from `user` paying with `token`; default options and request id.
pub fn search_request(user: &str, token: &str, query: &str) -> SearchRequest {
    SearchRequest {
        user_email: user.into(),
        query: query.into(),
        options: Some(SearchOptions::default()),
        transaction_token: token.into(),
        ..Default::default()
    }
}

/// A temporary folder holding `files` (relative path, text): documents for the embedded search
/// backend. The folder is removed when the returned value is dropped.
pub fn docs_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, text).expect("write doc");
    }
    dir
}

/// A router named `name`, owned by `owner`, paying through `ledger_url`, priced `pricing`, with
/// short timeouts; the echo upstream unless `upstream_url` names an OpenAI-compatible one.
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
        // Tests name the models they like; the upstream answers any.
        config.models = vec![syft_router_svc::ANY_MODEL.into()];
    }
    config
}

/// A ledger on `db` with a router owner and a user (alice) funded with [`FUNDS`], holding a token
/// for the owner.
pub struct Funded {
    pub ledger: LedgerServer,
    pub owner: Account,
    pub alice: Account,
    pub token: String,
}

impl Funded {
    pub async fn start(db: &Db, hold_ttl: Duration) -> Self {
        Self::start_tweaked(db, hold_ttl, |_| {}).await
    }

    /// [`Funded::start`] with the ledger's configuration changed by `tweak`.
    pub async fn start_tweaked(
        db: &Db,
        hold_ttl: Duration,
        tweak: impl FnOnce(&mut LedgerConfig),
    ) -> Self {
        let mut config = LedgerConfig {
            hold_ttl,
            ..ledger_config(&db.url)
        };
        tweak(&mut config);
        let ledger = LedgerServer::start(config).await;
        let owner = create_account(&ledger.url, "owner").await;
        let alice = create_account(&ledger.url, "alice").await;
        deposit(&ledger.url, &alice.email, FUNDS).await;
        let token = issue_token(&ledger.url, &alice, &owner.email).await;
        Funded {
            ledger,
            owner,
            alice,
            token,
        }
    }

    /// [`router_config`] for a router of the owner's, paying through this ledger.
    pub fn router_config(
        &self,
        name: &str,
        pricing: Pricing,
        upstream_url: Option<&str>,
    ) -> RouterConfig {
        router_config(
            name,
            &self.owner.email,
            &self.owner.secret,
            &self.ledger.url,
            pricing,
            upstream_url,
        )
    }
}

/// The hold lifetime of a [`Stack`] unless a test asks for another: longer than any test.
const HOLD_TTL: Duration = Duration::from_secs(300);

/// [`Funded`], a fake upstream, and a router priced `pricing` in front of both.
pub struct Stack {
    pub db: Db,
    pub ledger: LedgerServer,
    pub owner: Account,
    pub alice: Account,
    pub token: String,
    pub upstream: FakeUpstream,
    pub router: RouterHandle,
}

impl Stack {
    /// [`Stack::start_on`] a fresh Postgres database; `None` (the test skips, saying so) without
    /// one.
    pub async fn on_postgres(pricing: Pricing) -> Option<Self> {
        Some(Self::start_on(Db::postgres().await?, pricing).await)
    }

    pub async fn start(pricing: Pricing) -> Self {
        Self::start_on(Db::sqlite(), pricing).await
    }

    /// [`Stack::start`], an HTTP client and the router's `/v1/chat/completions` URL: the
    /// OpenAI front's scenarios begin so.
    pub async fn start_http(pricing: Pricing) -> (Self, reqwest::Client, String) {
        let stack = Self::start(pricing).await;
        let url = stack.router.chat_completions_url();
        (stack, reqwest::Client::new(), url)
    }

    /// [`Stack::start`] and a client of its router, as most scenarios begin.
    pub async fn start_with_client(pricing: Pricing) -> (Self, RouterClient<Channel>) {
        let stack = Self::start(pricing).await;
        let client = stack.client().await;
        (stack, client)
    }

    /// [`Stack::start`] on a database of the caller's (Postgres, for the scenarios run on both).
    pub async fn start_on(db: Db, pricing: Pricing) -> Self {
        Self::start_with(db, pricing, HOLD_TTL, |_| {}).await
    }

    /// [`Stack::start`] with the router's configuration changed by `tweak`.
    pub async fn start_tweaked(pricing: Pricing, tweak: impl FnOnce(&mut RouterConfig)) -> Self {
        Self::start_with(Db::sqlite(), pricing, HOLD_TTL, tweak).await
    }

    pub async fn start_with(
        db: Db,
        pricing: Pricing,
        hold_ttl: Duration,
        tweak: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        let funded = Funded::start(&db, hold_ttl).await;
        Self::on_funded(db, funded, pricing, tweak).await
    }

    /// [`Stack::start`] with the ledger's configuration changed by `tweak`.
    pub async fn start_with_ledger(
        pricing: Pricing,
        tweak: impl FnOnce(&mut LedgerConfig),
    ) -> Self {
        Self::start_with_configs(pricing, tweak, |_| {}).await
    }

    /// [`Stack::start`] with the ledger's and the router's configurations changed.
    pub async fn start_with_configs(
        pricing: Pricing,
        ledger: impl FnOnce(&mut LedgerConfig),
        router: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        let db = Db::sqlite();
        let funded = Funded::start_tweaked(&db, HOLD_TTL, ledger).await;
        Self::on_funded(db, funded, pricing, router).await
    }

    async fn on_funded(
        db: Db,
        funded: Funded,
        pricing: Pricing,
        tweak: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        let upstream = FakeUpstream::start().await;
        let mut config = funded.router_config("test-router", pricing, Some(&upstream.base_url));
        tweak(&mut config);
        Stack {
            router: RouterHandle::start(config).await,
            db,
            ledger: funded.ledger,
            owner: funded.owner,
            alice: funded.alice,
            token: funded.token,
            upstream,
        }
    }

    /// A chat from alice with her token, for `test-model`, at most 100 tokens.
    pub fn request(&self, content: &str) -> ChatRequest {
        ChatRequest {
            model: "test-model".into(),
            options: Some(ChatOptions {
                max_tokens: Some(100),
                ..Default::default()
            }),
            ..chat_request(&self.alice.email, &self.token, content)
        }
    }

    /// Sends a chat that sets no `max_tokens` and answers the `max_tokens` the upstream was sent
    /// for it (`Null` for none).
    pub async fn max_tokens_sent_for_a_chat_without_one(&self) -> serde_json::Value {
        let mut req = self.request("hi");
        req.options = None;
        self.client().await.chat(req).await.expect("answered");
        let body = self.upstream.last_body().expect("upstream called");
        body["max_tokens"].clone()
    }

    /// `POST /v1/chat/completions` of "hi" from alice for `test-model`, paid with her token, with
    /// `extra` fields merged into the body (add headers, or send it, as the test needs).
    pub fn openai_chat(&self, extra: serde_json::Value) -> reqwest::RequestBuilder {
        let mut body = serde_json::json!({"model": "test-model", "user": self.alice.email,
                                          "messages": [{"role": "user", "content": "hi"}]});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        reqwest::Client::new()
            .post(self.router.chat_completions_url())
            .bearer_auth(&self.token)
            .json(&body)
    }

    /// syft-llm-router's `POST /chat` of "hi" from alice for `test-model`, paid with her token in
    /// the body, with `extra` fields merged into it.
    pub fn syft_chat(&self, extra: serde_json::Value) -> reqwest::RequestBuilder {
        let mut body = serde_json::json!({"userEmail": self.alice.email, "model": "test-model",
                                          "transactionToken": self.token,
                                          "messages": [{"role": "user", "content": "hi"}]});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        reqwest::Client::new()
            .post(format!("{}/chat", self.router.http_url))
            .json(&body)
    }

    /// Alice spent `micros` (and holds nothing).
    pub async fn assert_spent(&self, micros: i64) {
        assert_eq!(
            self.alice_money().await,
            (FUNDS - micros, 0, FUNDS - micros)
        );
    }

    /// The stack's one request was captured at `price`, once, and the ledger is consistent.
    pub async fn assert_captured_once(&self, price: i64) {
        let t = self.transfers().await;
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].status(), TransferStatus::Completed, "{t:?}");
        assert_eq!(t[0].captured_micros, price);
        self.assert_spent(price).await;
        self.check_invariants().await;
    }

    /// A search from alice with her token.
    pub fn search(&self, query: &str) -> SearchRequest {
        search_request(&self.alice.email, &self.token, query)
    }

    pub async fn client(&self) -> RouterClient<Channel> {
        self.router.client().await
    }

    /// The configuration of another router like the stack's (same owner, ledger and upstream).
    pub fn router_config(&self, pricing: Pricing) -> RouterConfig {
        router_config(
            "test-router",
            &self.owner.email,
            &self.owner.secret,
            &self.ledger.url,
            pricing,
            Some(&self.upstream.base_url),
        )
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

    /// The statuses of alice's usage rows, newest first.
    pub async fn usage_statuses(&self) -> Vec<String> {
        let rows = self.usage().await;
        rows.into_iter()
            .filter_map(|r| r.usage.map(|u| u.status))
            .collect()
    }

    /// Alice's usage rows except refusals (requests refused before any hold or upstream call).
    pub async fn answered_usage(&self) -> Vec<UsageRecord> {
        let mut rows = self.usage().await;
        rows.retain(|r| {
            r.usage.as_ref().is_none_or(|u| {
                !syft_error::UsageStatus::parse(&u.status).is_some_and(|s| s.is_refusal())
            })
        });
        rows
    }

    /// Money invariants: conservation, available >= 0, one free usage row per request id,
    /// endpoint and attempt and one paid row per transfer at most (refusals aside: each refused
    /// attempt has its own row).
    pub async fn check_invariants(&self) {
        assert_consistent(&self.ledger.store).await;
        let (_, _, available) = self.alice_money().await;
        assert!(available >= 0, "available below zero: {available}");
        // A free request's row is one per request id, endpoint and attempt (its row key: a
        // retry of a failed one is another attempt); a paid one's one per transfer (a failed
        // request's id is tried again under a hold of its own).
        let mut ids: Vec<_> = self
            .answered_usage()
            .await
            .into_iter()
            .filter_map(|r| match r.transfer_id.is_empty() {
                true => r.usage.map(|u| (u.request_id, u.endpoint, u.row_key)),
                false => Some((r.transfer_id, String::new(), String::new())),
            })
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            n,
            "more than one usage row for a request or transfer"
        );
    }

    /// The end of a scenario: the money invariants hold (`check_invariants`), then a Postgres
    /// test database is dropped.
    pub async fn finish(&self) {
        self.check_invariants().await;
        self.db.drop_postgres().await;
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

    /// The one request made so far was voided (within `within`): its only transfer is cancelled
    /// and alice has all her funds back, none held.
    pub async fn assert_voided_once(&self, within: Duration) -> Transfer {
        let t = self.wait_no_pending(within).await;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].status(), lpb::TransferStatus::Cancelled);
        assert_eq!(self.alice_money().await, (FUNDS, 0, FUNDS));
        t.into_iter().next().expect("one transfer")
    }

    /// The one usage row recorded so far has `status`.
    pub async fn assert_one_usage(&self, status: &str) {
        let rows = self.usage().await;
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].usage.as_ref().map(|u| u.status.as_str()),
            Some(status)
        );
    }
}

/// `GET /readyz` of a router: the status code and the JSON body.
/// Waits (10 s at most) until `/readyz` shows `field` = `want`; its status and body then.
pub async fn wait_readyz(http_url: &str, field: &str, want: &str) -> (u16, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = readyz(http_url).await;
        if body[field] == want {
            return (code, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "want {field} {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn readyz(http_url: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(format!("{http_url}/readyz"))
        .await
        .expect("GET /readyz");
    let code = resp.status().as_u16();
    (code, resp.json().await.expect("json body"))
}
