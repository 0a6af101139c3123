//! The syft-llm-router HTTP API, served beside the OpenAI-compatible front: `POST /chat`,
//! `POST /search`, `GET /health`, in its JSON shapes. Bodies are read in camelCase (what its
//! Pydantic models send) or snake_case (which they also accept); unknown fields are ignored, as
//! Pydantic does. Answers are camelCase plus a `cost` object. Errors are JSON `{"detail", "code"}`
//! with the status of the error's code (400, 402, 403, 409, 503, ...), never a bare 500.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use syft_proto::router::{
    ChatOptions, ChatRequest, Message, ProviderInfo, SearchOptions, SearchRequest,
};

use crate::config::ServiceKind;
use crate::error::RouterError;
use crate::http::{
    bearer_token, rate_limit_headers, read_request, refused, request_id_of, with_error_headers,
    Refused, Said,
};
use crate::money::format_micros;
use crate::service::RouterService;
use crate::validate::assign_request_id;

/// An error as `{"detail": message, "code": REASON}` (FastAPI's `detail`, plus our reason).
pub struct SyftError(Refused);

impl From<RouterError> for SyftError {
    fn from(e: RouterError) -> Self {
        SyftError(e.into())
    }
}

impl From<Refused> for SyftError {
    fn from(e: Refused) -> Self {
        SyftError(e)
    }
}

impl IntoResponse for SyftError {
    fn into_response(self) -> Response {
        let e = &self.0.error;
        if let RouterError::Internal(detail) = e {
            tracing::error!(error = %detail, "internal router error");
        }
        let body = json!({"detail": e.public_message(), "code": e.reason()});
        let resp = (e.http_status(), Json(body)).into_response();
        with_error_headers(resp, &self.0)
    }
}

#[derive(Deserialize)]
struct SyftMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize, Default)]
struct SyftChatOptions {
    #[serde(default, alias = "maxTokens")]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default, alias = "topP")]
    top_p: Option<f64>,
    #[serde(default, alias = "stopSequences")]
    stop_sequences: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct SyftChatRequest {
    #[serde(default, alias = "userEmail")]
    user_email: String,
    #[serde(default)]
    model: String,
    messages: Vec<SyftMessage>,
    #[serde(default)]
    options: Option<SyftChatOptions>,
    #[serde(default, alias = "transactionToken")]
    transaction_token: Option<String>,
    /// Our extension (also `Idempotency-Key`): the request id.
    #[serde(default, alias = "requestId")]
    request_id: Option<String>,
}

#[derive(Deserialize, Default)]
struct SyftSearchOptions {
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default, alias = "similarityThreshold")]
    similarity_threshold: Option<f64>,
    #[serde(default, alias = "includeMetadata")]
    include_metadata: Option<bool>,
}

#[derive(Deserialize)]
struct SyftSearchRequest {
    #[serde(default, alias = "userEmail")]
    user_email: String,
    query: String,
    #[serde(default)]
    options: Option<SyftSearchOptions>,
    #[serde(default, alias = "transactionToken")]
    transaction_token: Option<String>,
    #[serde(default, alias = "requestId")]
    request_id: Option<String>,
}

/// The body's token, else `Authorization: Bearer`; the body's request id, else
/// `Idempotency-Key`.
fn payment(
    headers: &HeaderMap,
    token: Option<String>,
    request_id: Option<String>,
) -> Result<(String, String), RouterError> {
    let token = match token.filter(|t| !t.trim().is_empty()) {
        Some(t) => t,
        None => bearer_token(headers)?,
    };
    Ok((token, request_id_of(headers, request_id)?))
}

/// A float option as the proto's `f32`; out-of-range values stay out of range (validation says
/// so with the accepted range).
fn float(v: Option<f64>) -> Option<f32> {
    v.map(|x| if x.is_finite() { x as f32 } else { f32::NAN })
}

fn cost_json(cost_micros: i64, currency: &str, transfer_id: &str) -> Value {
    json!({
        "amount": format_micros(cost_micros),
        "amountMicros": cost_micros,
        "currency": currency,
        "transferId": if transfer_id.is_empty() { Value::Null } else { json!(transfer_id) },
    })
}

fn provider_json(p: Option<ProviderInfo>) -> Value {
    let p = p.unwrap_or_default();
    let mut out = Map::new();
    out.insert("provider".into(), json!(p.provider));
    for (k, v) in [
        ("upstreamModel", p.upstream_model),
        ("upstreamFinishReason", p.upstream_finish_reason),
        ("upstreamId", p.upstream_id),
    ] {
        if !v.is_empty() {
            out.insert(k.into(), json!(v));
        }
    }
    Value::Object(out)
}

/// A `/chat` body as the service's request.
fn chat_request(body: SyftChatRequest, headers: &HeaderMap) -> Result<ChatRequest, RouterError> {
    let (transaction_token, request_id) =
        payment(headers, body.transaction_token, body.request_id)?;
    let opts = body.options.unwrap_or_default();
    let max_tokens = match opts.max_tokens {
        None => None,
        Some(v) => Some(
            u32::try_from(v)
                .map_err(|_| RouterError::InvalidArgument(format!("maxTokens {v} is too large")))?,
        ),
    };
    Ok(ChatRequest {
        user_email: body.user_email,
        model: body.model,
        messages: body
            .messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
                name: m.name,
            })
            .collect(),
        options: Some(ChatOptions {
            max_tokens,
            temperature: float(opts.temperature),
            top_p: float(opts.top_p),
            stop_sequences: opts.stop_sequences.unwrap_or_default(),
        }),
        transaction_token,
        request_id,
    })
}

/// A `/search` body as the service's request.
fn search_request(
    body: SyftSearchRequest,
    headers: &HeaderMap,
) -> Result<SearchRequest, RouterError> {
    let (transaction_token, request_id) =
        payment(headers, body.transaction_token, body.request_id)?;
    let opts = body.options.unwrap_or_default();
    // Negative or huge limits are refused by validation, with the accepted range.
    let limit = opts
        .limit
        .map(|v| u32::try_from(v).unwrap_or(if v < 0 { 0 } else { u32::MAX }));
    Ok(SearchRequest {
        user_email: body.user_email,
        query: body.query,
        options: Some(SearchOptions {
            limit,
            similarity_threshold: float(opts.similarity_threshold),
            include_metadata: opts.include_metadata,
        }),
        transaction_token,
        request_id,
    })
}

/// `POST /chat`.
pub async fn chat(
    State(svc): State<RouterService>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SyftError> {
    let said = |b: &SyftChatRequest| Said::by(&b.user_email, &b.request_id);
    let read = |b| chat_request(b, &headers);
    let mut req = read_request(&svc, ServiceKind::Chat, &headers, body, said, read).await?;
    let id = assign_request_id(&mut req.request_id);
    let (r, limits) = svc.chat_with_limits(req).await.map_err(refused(&id))?;
    let usage = r.usage.unwrap_or_default();
    let message = r.message.unwrap_or_default();
    let mut resp = Json(json!({
        "id": r.id,
        "model": r.model,
        "message": {"role": message.role, "content": message.content, "name": message.name},
        "finishReason": r.finish_reason,
        "usage": {
            "promptTokens": usage.prompt_tokens,
            "completionTokens": usage.completion_tokens,
            "totalTokens": usage.total_tokens,
        },
        "providerInfo": provider_json(r.provider_info),
        "logprobs": null,
        "cost": cost_json(r.cost_micros, &r.currency, &r.transfer_id),
        "replay": r.replay,
    }))
    .into_response();
    mark_replay(&mut resp, r.replay);
    rate_limit_headers(resp.headers_mut(), &limits);
    Ok(resp)
}

/// The stored answer of a request id already charged says so, as on the OpenAI front: its `cost`
/// is the first attempt's, not a second charge.
fn mark_replay(resp: &mut Response, replay: bool) {
    if replay {
        resp.headers_mut().insert(
            crate::http::REPLAY_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
    }
}

/// `POST /search`.
pub async fn search(
    State(svc): State<RouterService>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SyftError> {
    let said = |b: &SyftSearchRequest| Said::by(&b.user_email, &b.request_id);
    let read = |b| search_request(b, &headers);
    let mut req = read_request(&svc, ServiceKind::Search, &headers, body, said, read).await?;
    let id = assign_request_id(&mut req.request_id);
    let (r, limits) = svc.search_with_limits(req).await.map_err(refused(&id))?;
    let results: Vec<Value> = r
        .results
        .into_iter()
        .map(|h| {
            let metadata = serde_json::from_str::<Value>(&h.metadata_json).unwrap_or(Value::Null);
            json!({
                "id": h.id, "score": h.score, "content": h.content,
                "metadata": metadata, "embedding": null,
            })
        })
        .collect();
    let mut resp = Json(json!({
        "id": r.id,
        "query": r.query,
        "results": results,
        "providerInfo": provider_json(r.provider_info),
        "cost": cost_json(r.cost_micros, &r.currency, &r.transfer_id),
        "replay": r.replay,
    }))
    .into_response();
    mark_replay(&mut resp, r.replay);
    rate_limit_headers(resp.headers_mut(), &limits);
    Ok(resp)
}

/// `GET /health`: `{status, project_name, services}` (the field names syft-llm-router's
/// `HealthResponse` uses). 200 `healthy` when the router can serve, else 503 `unhealthy`.
pub async fn health(State(svc): State<RouterService>) -> Response {
    let readiness = svc.readiness();
    let config = svc.config();
    let mut services = Map::new();
    for kind in [ServiceKind::Chat, ServiceKind::Search] {
        let Some(s) = config.service(kind) else {
            continue;
        };
        let status = if !s.enabled {
            "stopped"
        } else if readiness.ready {
            "running"
        } else {
            "failed"
        };
        let provider = match kind {
            ServiceKind::Chat => svc.provider(),
            ServiceKind::Search => svc.search_provider().unwrap_or(""),
        };
        services.insert(
            kind.as_str().into(),
            json!({
                "status": status,
                "provider": provider,
                "pricing": crate::config::pricing_json(&s.pricing),
            }),
        );
    }
    let (code, status) = if readiness.ready {
        (StatusCode::OK, "healthy")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    let body = json!({"status": status, "project_name": config.name, "services": services});
    (code, Json(body)).into_response()
}
