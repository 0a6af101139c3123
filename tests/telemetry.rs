//! Observability of the real binaries: a ledger and a router run as processes that export traces
//! over OTLP to a collector started here (an in-process gRPC server implementing the collector's
//! trace service). One paid chat must be one trace spanning router and ledger, and both services'
//! `/metrics` must count it.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use syft_ledger::client::{connect_lazy, create_account, deposit, issue_token};
use syft_proto::ledger as pb;
use syft_proto::router as rpb;
use syft_testkit::{chat_request, free_ports, wait_http_ok};

const ADMIN_KEY: &str = "telemetry-admin-key";
const OWNER: &str = "owner@router.example";
const OWNER_SECRET: &str = "owner-secret-0123456789";
const ALICE: &str = "alice@example.com";
/// A caller's trace context, not sampled (flags `00`).
const CALLER_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
/// How long a service started from the command line is given to come up.
const READY: Duration = Duration::from_secs(10);

/// Bytes of a hex string.
fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().expect("lock").push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    /// The trace ids of the spans it links to.
    links: Vec<Vec<u8>>,
    attributes: HashMap<String, String>,
    /// The span status code: 0 unset, 1 ok, 2 error.
    status: i32,
}

impl Collector {
    fn spans(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for request in self.0.lock().expect("lock").iter() {
            for rs in &request.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| a.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        let attributes = s
                            .attributes
                            .iter()
                            .map(|a| {
                                let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Value::StringValue(s)) => s.clone(),
                                    Some(Value::IntValue(i)) => i.to_string(),
                                    Some(Value::BoolValue(b)) => b.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (a.key.clone(), v)
                            })
                            .collect();
                        out.push(Span {
                            service: service.clone(),
                            name: s.name.clone(),
                            trace_id: s.trace_id.clone(),
                            span_id: s.span_id.clone(),
                            parent: s.parent_span_id.clone(),
                            links: s.links.iter().map(|l| l.trace_id.clone()).collect(),
                            attributes,
                            status: s.status.as_ref().map_or(0, |st| st.code),
                        });
                    }
                }
            }
        }
        out
    }
}

struct Process(Child);

impl Process {
    fn start(args: &[&str], envs: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_syft-router"));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Self(cmd.spawn().expect("spawn syft-router"))
    }

    /// SIGTERM, then the exit status (spans are flushed on the way out).
    fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        self.0.wait().expect("wait")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// The Prometheus text a service serves on its HTTP `port`.
async fn metrics(port: u16) -> String {
    syft_testkit::get_text(&format!("http://127.0.0.1:{port}/metrics")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_across_router_and_ledger() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let dir = tempfile::tempdir().expect("tempdir");
    // Four distinct ports: separate `free_port()` calls can return one port twice. That fits the
    // one failure seen here: the router's gRPC port refused right after its `/readyz` answered,
    // which the ledger does when it holds the router's HTTP port and the router exited on a bind
    // error.
    let [ledger_grpc, ledger_http, router_grpc, router_http] = free_ports();
    let otel = ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone());
    let ledger = Process::start(
        &["ledger", "--accounting-api"],
        &[
            otel.clone(),
            ("SYFT_LEDGER_GRPC_ADDR", format!("127.0.0.1:{ledger_grpc}")),
            ("SYFT_LEDGER_HTTP_ADDR", format!("127.0.0.1:{ledger_http}")),
            (
                "DATABASE_URL",
                format!("sqlite://{}/ledger.db?mode=rwc", dir.path().display()),
            ),
            ("SYFT_LEDGER_ADMIN_KEY", ADMIN_KEY.into()),
        ],
    );
    wait_http_ok(&format!("http://127.0.0.1:{ledger_http}/readyz"), READY).await;

    let ledger_url = format!("http://127.0.0.1:{ledger_grpc}");
    let mut admin = connect_lazy(&ledger_url, ADMIN_KEY).expect("client");
    admin
        .create_account(pb::CreateAccountRequest {
            email: OWNER.into(),
            secret: Some(OWNER_SECRET.into()),
            ..Default::default()
        })
        .await
        .expect("create owner");
    let alice_secret = create_account(&mut admin, ALICE, "")
        .await
        .expect("create alice");
    deposit(&mut admin, ALICE, 5_000_000, "fund-alice")
        .await
        .expect("deposit");
    let mut alice = connect_lazy(&ledger_url, &alice_secret).expect("client");
    let token = issue_token(&mut alice, OWNER).await.expect("token");

    let config = dir.path().join("router.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "name": "traced-router",
            "owner_email": OWNER,
            "services": [{"type": "chat", "enabled": true,
                "pricing": {"pricing_type": "per_request", "amount": 0.01, "currency": "USD"}}]
        })
        .to_string(),
    )
    .expect("config");
    let router = Process::start(
        &["router"],
        &[
            otel,
            ("SYFT_ROUTER_GRPC_ADDR", format!("127.0.0.1:{router_grpc}")),
            ("SYFT_ROUTER_HTTP_ADDR", format!("127.0.0.1:{router_http}")),
            ("SYFT_LEDGER_URL", ledger_url.clone()),
            ("SYFT_ROUTER_LEDGER_SECRET", OWNER_SECRET.into()),
            ("SYFT_ROUTER_CONFIG", config.display().to_string()),
            // Quiet logs do not turn the traces off (`SYFT_TRACE_FILTER` filters those).
            ("RUST_LOG", "error".into()),
            // The router's callers are not trusted with its sampling (the ledger, by default,
            // follows the router's).
            ("SYFT_TRACE_INCOMING", "link".into()),
        ],
    );
    wait_http_ok(&format!("http://127.0.0.1:{router_http}/readyz"), READY).await;

    let mut chat =
        rpb::router_client::RouterClient::connect(format!("http://127.0.0.1:{router_grpc}"))
            .await
            .expect("router client");
    // The caller names a trace of its own and asks for it not to be sampled: with `link`, the
    // router samples by its own sampler and links to the caller's trace.
    let mut request = tonic::Request::new(rpb::ChatRequest {
        request_id: "traced-request-1".into(),
        ..chat_request(ALICE, &token, "trace me")
    });
    request.metadata_mut().insert(
        "traceparent",
        CALLER_TRACEPARENT.parse().expect("traceparent"),
    );
    let answer = chat.chat(request).await.expect("paid chat").into_inner();
    assert_eq!(answer.cost_micros, 10_000);

    // Both services count the request in Prometheus format.
    let ledger_metrics = metrics(ledger_http).await;
    for needle in [
        "syft_grpc_server_requests_total{grpc_code=\"OK\",grpc_method=\"Authorize\",grpc_service=\"syft.ledger.v1.Ledger\"} 1",
        "syft_grpc_server_requests_total{grpc_code=\"OK\",grpc_method=\"Capture\",grpc_service=\"syft.ledger.v1.Ledger\"} 1",
        "syft_ledger_holds_total{event=\"authorized\"} 1",
        "syft_ledger_holds_total{event=\"captured\"} 1",
        "syft_ledger_captured_micros_total{app=\"traced-router\"} 10000",
        "syft_ledger_pending_holds 0",
        "syft_ledger_db_connections{state=\"idle\"}",
        // Counters at zero before their first event: a rule on `increase()` sees nothing of a
        // series that does not exist yet, so the first failure would not raise it.
        "syft_ledger_holds_total{event=\"voided\"} 0",
        "syft_ledger_holds_total{event=\"expired\"} 0",
        "syft_ledger_sweep_failures_total 0",
        "syft_ledger_auth_refusals_total{outcome=\"failed\"} 0",
        "syft_ledger_database_gauges_stale 0",
        "syft_grpc_server_request_duration_seconds_bucket",
    ] {
        assert!(ledger_metrics.contains(needle), "ledger /metrics lacks {needle}:\n{ledger_metrics}");
    }
    // The pool as each scrape found it, before its own reads: never a negative count, and an idle
    // ledger reads as idle. It was read after them, so the scrape's own connection (still on
    // its way back) was in use: an idle SQLite ledger read `idle -1, in_use 2` or `0, 1`.
    let mut in_use_seen = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let scraped = metrics(ledger_http).await;
        let gauge = |state: &str| -> i64 {
            let name = format!("syft_ledger_db_connections{{state=\"{state}\"}} ");
            scraped
                .lines()
                .find_map(|l| l.strip_prefix(name.as_str()))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(-100)
        };
        let (idle, in_use) = (gauge("idle"), gauge("in_use"));
        assert!(idle >= 0 && in_use >= 0, "idle {idle}, in use {in_use}");
        in_use_seen.push(in_use);
    }
    assert!(in_use_seen.contains(&0), "an idle ledger: {in_use_seen:?}");
    // Made-up gRPC paths and HTTP methods, which anyone can send: counted under one label each,
    // never as new series named by the caller.
    {
        use tonic::codegen::{http, Service};
        let mut channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{router_grpc}"))
                .expect("url")
                .connect()
                .await
                .expect("channel");
        let request = http::Request::post(format!(
            "http://127.0.0.1:{router_grpc}/made.up.Service/Method7"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::empty())
        .expect("request");
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .expect("ready");
        let made_up = channel.call(request).await.expect("made-up gRPC path");
        let status = made_up.headers().get("grpc-status").map(|v| v.as_bytes());
        assert_eq!(status, Some(&b"12"[..]), "UNIMPLEMENTED");
    }
    let method = reqwest::Method::from_bytes(b"RANDOM123").expect("method");
    reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:{router_http}/readyz"))
        .send()
        .await
        .expect("made-up method");
    let router_metrics = metrics(router_http).await;
    for made_up in ["made.up.Service", "Method7", "RANDOM123"] {
        assert!(
            !router_metrics.contains(made_up),
            "{made_up} in:\n{router_metrics}"
        );
    }
    for needle in [
        "grpc_method=\"unimplemented\"",
        "method=\"other\"",
        "syft_grpc_server_requests_total{grpc_code=\"OK\",grpc_method=\"Chat\",grpc_service=\"syft.router.v1.Router\"} 1",
        "syft_router_added_latency_seconds_count{mode=\"unary\",outcome=\"success\"} 1",
        "syft_router_upstream_duration_seconds_count{outcome=\"success\",provider=\"echo\"} 1",
        "syft_http_server_requests_total{method=\"GET\",route=\"/readyz\",server=\"router\",status=\"200\"}",
        // At zero before their first event, and nothing waiting on the upstream now.
        "syft_router_usage_rows_unconfirmed_total{row=\"free\"} 0",
        "syft_router_usage_rows_unconfirmed_total{row=\"refusal\"} 0",
        "syft_router_upstream_waiting{provider=\"echo\"} 0",
    ] {
        assert!(router_metrics.contains(needle), "router /metrics lacks {needle}:\n{router_metrics}");
    }
    assert!(!router_metrics.contains(&token) && !ledger_metrics.contains(&token));

    // SIGTERM flushes the spans; both exit 0. Waited for off the runtime, where the collector
    // that takes those spans runs.
    for p in [router, ledger] {
        let status = tokio::task::spawn_blocking(move || p.terminate()).await;
        assert!(status.expect("join").success());
    }

    let spans = collector.spans();
    let chat_span = spans
        .iter()
        .find(|s| s.service == "syft-router" && s.name == "chat")
        .unwrap_or_else(|| panic!("no chat span: {spans:#?}"));
    assert_eq!(
        chat_span.attributes.get("request_id").map(String::as_str),
        Some("traced-request-1")
    );
    assert_eq!(
        chat_span.attributes.get("user").map(String::as_str),
        Some(ALICE)
    );
    assert_eq!(
        chat_span.attributes.get("app").map(String::as_str),
        Some("traced-router")
    );
    assert_eq!(
        chat_span.attributes.get("transfer_id"),
        Some(&answer.transfer_id)
    );
    let trace: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == chat_span.trace_id)
        .collect();
    let router_ids: Vec<&Vec<u8>> = trace
        .iter()
        .filter(|s| s.service == "syft-router")
        .map(|s| &s.span_id)
        .collect();
    for rpc in [
        "syft.ledger.v1.Ledger/Authorize",
        "syft.ledger.v1.Ledger/Capture",
    ] {
        let ledger_span = trace
            .iter()
            .find(|s| s.service == "syft-ledger" && s.name == rpc)
            .unwrap_or_else(|| panic!("{rpc} is not in the chat's trace: {trace:#?}"));
        assert!(
            router_ids.contains(&&ledger_span.parent),
            "{rpc}'s parent is not a router span"
        );
    }
    let server_span = trace
        .iter()
        .find(|s| s.service == "syft-router" && s.name == "syft.router.v1.Router/Chat")
        .unwrap_or_else(|| panic!("the router's server span is in the trace: {trace:#?}"));
    assert!(server_span.parent.is_empty(), "and is its root");
    assert_eq!(server_span.status, 0, "a success leaves the status unset");
    // A server fault marks its span as an error, as OpenTelemetry's conventions say (UNIMPLEMENTED
    // here): every span's status was left unset, so trace backends showed no failures.
    let made_up = spans
        .iter()
        .find(|s| s.service == "syft-router" && s.name == "made.up.Service/Method7")
        .unwrap_or_else(|| panic!("no span of the made-up path: {spans:#?}"));
    assert_eq!(made_up.status, 2, "{made_up:?}");
    let caller_trace = hex(&CALLER_TRACEPARENT[3..35]);
    assert_ne!(server_span.trace_id, caller_trace, "a trace of its own");
    assert_eq!(
        server_span.links,
        vec![caller_trace],
        "linked to the caller's"
    );
    // Nothing secret in any span.
    for s in &spans {
        for v in s.attributes.values() {
            assert!(
                !v.contains(&token) && !v.contains(OWNER_SECRET),
                "secret in span {s:?}"
            );
        }
    }
}

/// The stderr of a command that must fail at start-up (exit 1) with `name=value` set.
fn start_up_error(name: &str, value: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_syft-router"))
        .args(["ledger", "verify", "--data-dir", "/nonexistent-syft-data"])
        .env(name, value)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// A collector this build cannot export to (an `https://` endpoint: no TLS feature) is an error
/// that names it, exit 1; the process used to panic dropping the exporter's runtime (exit 101).
#[test]
fn an_unusable_collector_is_a_clear_error() {
    let stderr = start_up_error("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:1");
    assert!(
        stderr.contains("OTLP exporter") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A compression this build leaves out is refused at start, as the docs say, not warned of and
/// ignored (the exporter library's own behaviour).
#[test]
fn an_unsupported_compression_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_syft-router"))
        .args(["ledger", "verify", "--data-dir", "/nonexistent-syft-data"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_COMPRESSION=\"gzip\""),
        "{stderr}"
    );
}

/// A `SYFT_TRACE_INCOMING` that is neither `follow` nor `link` is a start-up error naming it.
#[test]
fn an_unknown_trace_incoming_mode_is_a_clear_error() {
    let stderr = start_up_error("SYFT_TRACE_INCOMING", "trust-everyone");
    assert!(
        stderr.contains("SYFT_TRACE_INCOMING=\"trust-everyone\" is neither follow nor link"),
        "{stderr}"
    );
}

/// No log event names a field `message`: the event's own text is written under that key, so a
/// JSON line (`--log-format json`) carried it twice. Parsers keep one (the event's name was
/// lost), and Elasticsearch refuses such a document: the router's "ledger call failed" lines,
/// the only ones naming why the ledger could not be reached (an expired certificate), were
/// dropped by a log pipeline. A scan of every event in the workspace's sources.
#[test]
fn no_log_event_has_a_field_named_message() {
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    for krate in std::fs::read_dir(root.join("crates"))
        .expect("crates")
        .flatten()
    {
        sources(&krate.path().join("src"), &mut files);
    }
    assert!(files.len() > 100, "{} source files", files.len());
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source");
        for level in ["trace!(", "debug!(", "info!(", "warn!(", "error!("] {
            for (at, _) in text.match_indices(&format!("tracing::{level}")) {
                // The event's arguments: to its closing `);` (no event here nests one).
                let args = &text[at..];
                let args = &args[..args.find(");").unwrap_or(args.len())];
                let named = args.split([',', '(']).any(|part| {
                    let part = part.trim_start();
                    part.strip_prefix("message")
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                });
                if named {
                    found.push(format!(
                        "{}: {}",
                        file.display(),
                        &args[..args.len().min(80)]
                    ));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "events with a `message` field: {found:#?}"
    );
}
