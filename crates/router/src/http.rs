//! OpenAI-compatible HTTP front: `POST /v1/chat/completions` (JSON and SSE),
//! `GET /v1/models` (`discovery.rs`), `GET /healthz` (liveness), `GET /readyz` (readiness); beside it the
//! syft-llm-router endpoints `POST /chat`, `POST /search`, `GET /health` (`crate::syft_http`).
//!
//! `Authorization: Bearer <transaction token>` pays, the body's `user` is the user's email and the
//! `Idempotency-Key` header is the request id. Answers carry `"syft": {cost_micros, transfer_id,
//! currency, request_id, provider}` and the headers `x-syft-cost-micros`, `x-syft-transfer-id`,
//! `x-syft-request-id`, and `x-syft-replay: true` (and `"syft": {"replay": true}`) when the answer is
//! the stored answer of an earlier, already charged request with the same key.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use syft_proto::router::{chat_stream_event, ChatOptions, ChatRequest, Message};

use crate::config::ServiceKind;
use crate::error::{RouterError, REASON_HEADER};
use crate::limits::RateHeaders;
use crate::openai_wire::{ContentField, OaiRequest};
use crate::service::RouterService;
use crate::validate::assign_request_id;

mod body;
mod discovery;

pub(crate) use body::{read_request, Said};

pub const COST_HEADER: &str = "x-syft-cost-micros";
pub const TRANSFER_HEADER: &str = "x-syft-transfer-id";
pub const REPLAY_HEADER: &str = "x-syft-replay";
pub const REQUEST_ID_HEADER: &str = "x-syft-request-id";
/// The same id under the name the OpenAI SDKs read (`_request_id`, `error.requestID` in
/// openai-node, `request_id` in openai-python): what a support request should quote.
pub const OPENAI_REQUEST_ID_HEADER: &str = "x-request-id";

/// Names the request's id in an answer's headers, under both names.
fn name_request(h: &mut axum::http::HeaderMap, id: HeaderValue) {
    h.insert(OPENAI_REQUEST_ID_HEADER, id.clone());
    h.insert(REQUEST_ID_HEADER, id);
}

/// The largest body read: room for JSON framing around the longest prompt or query, written as
/// `\uXXXX` escapes (3× a 2-byte character or an emoji: Python's `json` module writes every
/// non-ASCII character so; twice the limit refused such a prompt from two thirds of it up).
/// Above it a body is refused (400, as `read_json` answers every body it cannot take); the
/// prompt's own limit is checked on its text.
fn body_limit(service: &RouterService) -> usize {
    service
        .config()
        .largest_text_bytes()
        .saturating_mul(3)
        .saturating_add(64 * 1024)
}

/// The axum router of the HTTP front.
pub fn http_router(service: RouterService) -> Router {
    let body_limit = body_limit(&service);
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        // The Syft endpoints refuse other methods in their own error shape, as their clients
        // read errors (`{"detail", "code"}`), not in OpenAI's.
        .route(
            "/chat",
            post(crate::syft_http::chat).fallback(not_allowed::<crate::syft_http::DetailBody>),
        )
        .route(
            "/search",
            post(crate::syft_http::search).fallback(not_allowed::<crate::syft_http::DetailBody>),
        )
        .route("/health", get(crate::syft_http::health))
        .route("/v1/models", get(discovery::list_models))
        // Model ids may hold slashes (`org/model`), as the SDKs' `models.retrieve` sends them.
        .route("/v1/models/{*id}", get(discovery::retrieve_model))
        .route("/v1/limits", get(discovery::limits_left))
        // Unknown paths and methods answer in the API's error shape (they were empty bodies).
        .fallback(|| async {
            ApiError::from(RouterError::NotFound(
                "no such endpoint: the router serves POST /v1/chat/completions, /chat and \
                 /search; GET /v1/models, /v1/models/<id>, /v1/limits, /health, /healthz, \
                 /readyz and /metrics"
                    .into(),
            ))
        })
        .method_not_allowed_fallback(not_allowed::<OpenAiBody>);
    // Before the operator's routes join: pages of an allowed origin read the APIs (errors
    // included), not the metrics or probes.
    let api = match crate::cors::layer(&service.config().cors_origins) {
        Some(cors) => api.layer(cors),
        None => api,
    };
    let ops = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async { syft_telemetry::metrics::response() }),
        )
        .method_not_allowed_fallback(not_allowed::<OpenAiBody>);
    api.merge(ops)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(syft_telemetry::RequestLayer(syft_telemetry::Server::Http(
            "router",
        )))
        .with_state(service)
}

async fn not_allowed<B: ErrorBody>(method: http::Method) -> Response {
    let mut resp = FrontError::<B>::from(RouterError::InvalidArgument(format!(
        "method {method} is not served on this path"
    )))
    .into_response();
    *resp.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
    resp
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 when the router can serve (its ledger answers, if it sells anything), else 503; the body
/// is the [`crate::health::Readiness`] as JSON.
async fn readyz(State(svc): State<RouterService>) -> Response {
    let readiness = svc.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// A refused request, and the request id its usage row is under when known (`None` for errors
/// that are not a request's, and for a request whose own id was unusable).
pub(crate) struct Refused {
    pub error: RouterError,
    pub request_id: Option<String>,
}

impl From<RouterError> for Refused {
    fn from(error: RouterError) -> Self {
        Refused {
            error,
            request_id: None,
        }
    }
}

/// `error` as the refusal of the request `request_id` names.
pub(crate) fn refused(request_id: &Option<String>) -> impl FnOnce(RouterError) -> Refused + '_ {
    move |error| Refused {
        error,
        request_id: request_id.clone(),
    }
}

/// A refusal as one front's error answer: the error's status, its body in the front's shape `B`,
/// and the error headers. Both fronts' errors are this type, so `?` takes a [`RouterError`] or a
/// [`Refused`] in either.
pub(crate) struct FrontError<B>(Refused, PhantomData<B>);

/// A front's shape of an error body.
pub(crate) trait ErrorBody {
    fn body(e: &RouterError) -> Value;
}

impl<B> From<RouterError> for FrontError<B> {
    fn from(e: RouterError) -> Self {
        FrontError(e.into(), PhantomData)
    }
}

impl<B> From<Refused> for FrontError<B> {
    fn from(e: Refused) -> Self {
        FrontError(e, PhantomData)
    }
}

impl<B: ErrorBody> IntoResponse for FrontError<B> {
    fn into_response(self) -> Response {
        let e = &self.0.error;
        if let RouterError::Internal(detail) = e {
            tracing::error!(error = %detail, "internal router error");
        }
        let resp = (e.http_status(), Json(B::body(e))).into_response();
        with_error_headers(resp, &self.0)
    }
}

/// OpenAI's error body, `{"error": {...}}`.
enum OpenAiBody {}

impl ErrorBody for OpenAiBody {
    fn body(e: &RouterError) -> Value {
        e.openai_body()
    }
}

/// An error as an OpenAI-style response.
type ApiError = FrontError<OpenAiBody>;

/// The headers of an error answer, on both HTTP APIs: the reason, the request id, `Retry-After`
/// when the refusal says when to come back (a limit, the upstream), and for a limit's refusal
/// the `x-ratelimit-*` headers.
pub(crate) fn with_error_headers(mut resp: Response, refused: &Refused) -> Response {
    let e = &refused.error;
    let h = resp.headers_mut();
    h.insert(REASON_HEADER, HeaderValue::from_static(e.reason()));
    if let Some(id) = refused.request_id.as_deref().and_then(header) {
        name_request(h, id);
    }
    if !e.retry_helps() {
        h.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
    }
    if let Some(after) = e.retry_after() {
        let secs = syft_error::retry_after_secs(after);
        if let Some(v) = header(&secs.to_string()) {
            h.insert(http::header::RETRY_AFTER, v);
        }
    }
    if let RouterError::Quota(q) = e {
        rate_limit_headers(h, &q.headers);
    }
    resp
}

/// Read by the official OpenAI SDKs: `false` stops their automatic retries, which otherwise
/// repeat every 409 and 429 (and 5xx) up to twice, each as a new request with a new id unless
/// the caller set an `Idempotency-Key`.
const SHOULD_RETRY_HEADER: &str = "x-should-retry";

fn bad(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

fn to_chat_request(body: OaiRequest, headers: &HeaderMap) -> Result<ChatRequest, RouterError> {
    if body.n.is_some_and(|n| n != 1) {
        return Err(bad("only n = 1 is supported"));
    }
    if let Some(tier) = body
        .service_tier
        .as_deref()
        .filter(|t| !matches!(*t, "auto" | "default"))
    {
        return Err(bad(format!(
            "service_tier {tier:?} is not supported: this router serves the upstream's default \
             tier, which its price is set for"
        )));
    }
    if let Some(v) = body.verbosity.as_deref().filter(|v| *v != "medium") {
        return Err(bad(format!(
            "verbosity {v:?} is not supported: this router serves the upstream's default \
             (medium)"
        )));
    }
    if let Some(option) = body.unsupported_option() {
        return Err(bad(format!(
            "{option} is not supported: this router answers with text only"
        )));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        let content = match m.content {
            // A user's, system's or developer's turn needs content (OpenAI's rule; it was
            // answered and charged). An assistant's may come without (its tool calls stood in
            // for it); other roles are refused by validation for their role.
            None if !matches!(m.role.as_str(), "user" | "system" | "developer") => String::new(),
            None => {
                return Err(bad(format!(
                    "messages[{i}]: content is required (a string or a list of text parts)"
                )))
            }
            Some(ContentField::Text(t)) => t,
            // OpenAI refuses both; read as "", they were answered and charged.
            Some(ContentField::Parts(parts)) if parts.is_empty() => {
                return Err(bad(format!(
                    "messages[{i}]: content is an empty list (a string or text parts)"
                )))
            }
            Some(ContentField::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    if part.kind != "text" {
                        return Err(bad(format!(
                            "messages[{i}]: only text content is supported (got {:?})",
                            part.kind
                        )));
                    }
                    let Some(part_text) = part.text else {
                        return Err(bad(format!("messages[{i}]: a text part without its text")));
                    };
                    text.push_str(&part_text);
                }
                text
            }
        };
        messages.push(Message {
            role: m.role,
            content,
            name: m.name,
        });
    }
    let max_tokens = match body.max_completion_tokens.or(body.max_tokens) {
        None => None,
        Some(v) => Some(u32::try_from(v).map_err(|_| bad(format!("max_tokens {v} is too large")))?),
    };
    let finite = |name: &str, v: Option<f64>| -> Result<Option<f32>, RouterError> {
        match v {
            Some(x) if !x.is_finite() || x.abs() > 1e6 => {
                Err(bad(format!("{name} is out of range")))
            }
            Some(x) => Ok(Some(x as f32)),
            None => Ok(None),
        }
    };
    let options = ChatOptions {
        max_tokens,
        temperature: finite("temperature", body.temperature)?,
        top_p: finite("top_p", body.top_p)?,
        stop_sequences: match body.stop {
            None => vec![],
            Some(stop) => stop.0,
        },
        reasoning_effort: body.reasoning_effort,
    };
    let transaction_token = bearer_token(headers)?;
    let request_id = idempotency_key(headers)?;
    Ok(ChatRequest {
        user_email: body.user.unwrap_or_default(),
        model: body.model,
        messages,
        options: Some(options),
        transaction_token,
        request_id,
    })
}

/// The transaction token of `Authorization: Bearer <token>`; empty without the header.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<String, RouterError> {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(String::new());
    };
    let v = v
        .to_str()
        .map_err(|_| RouterError::Unauthenticated("malformed Authorization header".into()))?;
    match v.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(token.trim().to_string())
        }
        _ => Err(RouterError::Unauthenticated(
            "Authorization must be `Bearer <transaction token>`".into(),
        )),
    }
}

/// The `Idempotency-Key` header (the request id); empty without it.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<String, RouterError> {
    match headers.get("idempotency-key") {
        None => Ok(String::new()),
        Some(v) => v.to_str().map(str::to_string).map_err(|_| {
            RouterError::InvalidArgument("Idempotency-Key must be visible ASCII".into())
        }),
    }
}

/// The request id a front reads: the body's when it names one (`/chat`, `/search`), else the
/// `Idempotency-Key`.
pub(crate) fn request_id_of(
    headers: &HeaderMap,
    in_body: Option<String>,
) -> Result<String, RouterError> {
    match in_body.filter(|id| !id.is_empty()) {
        Some(id) => Ok(id),
        None => idempotency_key(headers),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn header(v: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(v).ok()
}

/// OpenAI's `x-ratelimit-*` headers (sent on answers and refusals alike).
pub(crate) fn rate_limit_headers(h: &mut HeaderMap, limits: &RateHeaders) {
    for (name, value) in limits.pairs() {
        if let Some(v) = header(&value) {
            h.insert(name, v);
        }
    }
}

async fn chat_completions(
    State(svc): State<RouterService>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let read = |body: OaiRequest| {
        let include_usage = body
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage.unwrap_or(false));
        let stream = body.stream.unwrap_or(false);
        Ok((stream, include_usage, to_chat_request(body, &headers)?))
    };
    let said = |body: &OaiRequest| Said {
        user: body.user.clone(),
        request_id: None,
    };
    let (stream, include_usage, mut req) =
        read_request(&svc, ServiceKind::Chat, &headers, body, said, read).await?;
    let id = assign_request_id(&mut req.request_id);
    if stream {
        return chat_stream(svc, req, include_usage, &id).await;
    }
    let (resp, limits) = svc.chat_with_limits(req).await.map_err(refused(&id))?;
    let usage = resp.usage.unwrap_or_default();
    let content = resp.message.map(|m| m.content).unwrap_or_default();
    let provider = resp.provider_info.unwrap_or_default();
    let out = json!({
        "id": format!("chatcmpl-{}", resp.id),
        "object": "chat.completion",
        "created": unix_now(),
        "model": resp.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": resp.finish_reason,
            "logprobs": null,
        }],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "syft": {
            "request_id": resp.id,
            "cost_micros": resp.cost_micros,
            "transfer_id": resp.transfer_id,
            "currency": resp.currency,
            "provider": provider.provider,
            "upstream_model": provider.upstream_model,
            "replay": resp.replay,
        },
    });
    let mut r = Json(out).into_response();
    let h = r.headers_mut();
    if let Some(v) = header(&resp.cost_micros.to_string()) {
        h.insert(COST_HEADER, v);
    }
    if let Some(v) = header(&resp.transfer_id).filter(|_| !resp.transfer_id.is_empty()) {
        h.insert(TRANSFER_HEADER, v);
    }
    if let Some(v) = header(&resp.id) {
        name_request(h, v);
    }
    if resp.replay {
        h.insert(REPLAY_HEADER, HeaderValue::from_static("true"));
    }
    rate_limit_headers(h, &limits);
    Ok(r)
}

async fn chat_stream(
    svc: RouterService,
    req: ChatRequest,
    include_usage: bool,
    request_id: &Option<String>,
) -> Result<Response, ApiError> {
    let handle = svc.chat_stream(req).await.map_err(refused(request_id))?;
    let id = format!("chatcmpl-{}", handle.request_id);
    let model = handle.model.clone();
    let created = unix_now();
    let chunk = move |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    let request_id = handle.request_id.clone();
    let transfer_id = handle.transfer_id.clone();
    let replay = handle.replay;
    let limits = handle.rate_limits.clone();
    let events = handle.events.flat_map(move |item| {
        let mut out: Vec<Value> = Vec::new();
        let mut done = false;
        match item {
            Ok(ev) => match ev.event {
                Some(chat_stream_event::Event::Delta(d)) => {
                    out.push(chunk(json!({"content": d.content}), Value::Null));
                }
                Some(chat_stream_event::Event::Final(f)) => {
                    let usage = f.usage.unwrap_or_default();
                    let usage = json!({
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                    });
                    let provider = f.provider_info.unwrap_or_default();
                    let syft = json!({
                        "request_id": f.id,
                        "cost_micros": f.cost_micros,
                        "transfer_id": f.transfer_id,
                        "currency": f.currency,
                        "provider": provider.provider,
                        "upstream_model": provider.upstream_model,
                        "replay": f.replay,
                    });
                    let mut last = chunk(json!({}), json!(f.finish_reason));
                    // With `include_usage` the usage comes once, on its own last chunk, as
                    // OpenAI sends it: clients that add up every chunk's usage (LangChain)
                    // counted it twice when the finish chunk carried it too. So does the cost
                    // (`syft`), for clients that add up every chunk's cost.
                    if include_usage {
                        out.push(last);
                        let mut u = chunk(json!({}), Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = usage;
                        u["syft"] = syft;
                        out.push(u);
                    } else {
                        last["usage"] = usage;
                        last["syft"] = syft;
                        out.push(last);
                    }
                    done = true;
                }
                None => {}
            },
            Err(e) => out.push(e.openai_body()),
        }
        let mut events: Vec<Result<Event, Infallible>> = out
            .into_iter()
            .map(|v| Ok(Event::default().data(v.to_string())))
            .collect();
        if done {
            events.push(Ok(Event::default().data("[DONE]")));
        }
        futures::stream::iter(events)
    });
    let all = futures::stream::iter([Ok::<_, Infallible>(
        Event::default().data(first.to_string()),
    )])
    .chain(events);
    let mut resp = Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response();
    let h = resp.headers_mut();
    if let Some(v) = header(&request_id) {
        name_request(h, v);
    }
    if let Some(v) = transfer_id.as_deref().and_then(header) {
        h.insert(TRANSFER_HEADER, v);
    }
    if replay {
        h.insert(REPLAY_HEADER, HeaderValue::from_static("true"));
    }
    rate_limit_headers(h, &limits);
    Ok(resp)
}
