//! The syft-llm-router HTTP API, served beside the OpenAI-compatible front: `POST /chat`,
//! `POST /search`, `GET /health`, in its JSON shapes. Bodies are read in camelCase (what its
//! Pydantic models send) or snake_case (which they also accept); unknown fields are ignored, as
//! Pydantic does. Answers are camelCase plus a `cost` object. Errors are JSON `{"detail", "code"}`
//! with the status of the error's code (400, 402, 403, 409, 503, ...), never a bare 500.

use std::future::Future;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use syft_proto::router::{
    ChatOptions, ChatRequest, ChatResponse, Message, ProviderInfo, SearchOptions, SearchRequest,
    SearchResponse,
};

use crate::config::ServiceKind;
use crate::error::RouterError;
use crate::http::{
    bearer_token, rate_limit_headers, read_request, refused, request_id_of, ErrorBody, FrontError,
    Said,
};
use crate::limits::RateHeaders;
use crate::money::format_micros;
use crate::openai_wire::bounded_list;
use crate::service::RouterService;
use crate::validate::{assign_request_id, MAX_STOP_SEQUENCES};

/// `{"detail": message, "code": REASON}` (FastAPI's `detail`, plus our reason).
pub enum DetailBody {}

impl ErrorBody for DetailBody {
    fn body(e: &RouterError) -> Value {
        json!({"detail": e.public_message(), "code": e.reason()})
    }
}

/// An error as this API answers it.
pub type SyftError = FrontError<DetailBody>;

#[derive(Deserialize)]
// `expecting`: serde names the type in a body of the wrong shape, and its name is ours, not
// the client's ("expected struct SyftSearchRequest with 5 elements").
#[serde(expecting = "a message object")]
struct SyftMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(expecting = "a JSON object (the chat options)")]
struct SyftChatOptions {
    #[serde(default, alias = "maxTokens")]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default, alias = "topP")]
    top_p: Option<f64>,
    #[serde(default, alias = "stopSequences", deserialize_with = "stop_sequences")]
    stop_sequences: Option<Vec<String>>,
    #[serde(default, alias = "reasoningEffort")]
    reasoning_effort: Option<String>,
}

// The lists of a Syft body are refused as they are read, as the OpenAI front's are
// (`openai_wire::bounded_list`): plain serde read them whole before validation counted them.
fn stop_sequences<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    bounded_list(d, MAX_STOP_SEQUENCES, "stop sequences").map(Some)
}

#[derive(Deserialize)]
#[serde(expecting = "a JSON object (the /chat request)")]
struct SyftChatRequest {
    #[serde(default, alias = "userEmail")]
    user_email: String,
    #[serde(default)]
    model: String,
    #[serde(deserialize_with = "crate::openai_wire::messages")]
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
#[serde(expecting = "a JSON object (the search options)")]
struct SyftSearchOptions {
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default, alias = "similarityThreshold")]
    similarity_threshold: Option<f64>,
    #[serde(default, alias = "includeMetadata")]
    include_metadata: Option<bool>,
}

#[derive(Deserialize)]
#[serde(expecting = "a JSON object (the /search request)")]
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
        // Two tokens in one request: which payer to charge is not the router's guess (the
        // body's silently won). A header that is no bearer token (a proxy's own) is not one.
        Some(t) if bearer_token(headers).is_ok_and(|h| !h.is_empty() && h != t.trim()) => {
            return Err(RouterError::InvalidArgument(
                "transactionToken in the body and the Authorization header name different \
                 tokens: send one"
                    .into(),
            ))
        }
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

/// A body of this API (`/chat`, `/search`): the service it asks and the request it reads as.
trait SyftBody: DeserializeOwned {
    const KIND: ServiceKind;
    type Request;
    /// Who the body says asks, and the request id it names (for a refusal's row).
    fn said(&self) -> Said;
    /// The body as the service's request.
    fn request(self, headers: &HeaderMap) -> Result<Self::Request, RouterError>;
    /// The request's id, named before the call (`assign_request_id`).
    fn request_id(request: &mut Self::Request) -> &mut String;
}

impl SyftBody for SyftChatRequest {
    const KIND: ServiceKind = ServiceKind::Chat;
    type Request = ChatRequest;

    fn said(&self) -> Said {
        Said::by(&self.user_email, &self.request_id)
    }

    fn request(self, headers: &HeaderMap) -> Result<ChatRequest, RouterError> {
        let (transaction_token, request_id) =
            payment(headers, self.transaction_token, self.request_id)?;
        let opts = self.options.unwrap_or_default();
        let max_tokens = match opts.max_tokens {
            None => None,
            Some(v) => Some(u32::try_from(v).map_err(|_| {
                RouterError::InvalidArgument(format!("maxTokens {v} is too large"))
            })?),
        };
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            // A user's, system's or developer's turn needs content, as on the OpenAI front (it
            // was read as "" and answered and charged); other roles are judged by validation.
            let content = match m.content {
                Some(text) => text,
                None if !matches!(m.role.as_str(), "user" | "system" | "developer") => {
                    String::new()
                }
                None => {
                    return Err(RouterError::InvalidArgument(format!(
                        "messages[{i}]: content is required"
                    )))
                }
            };
            messages.push(Message {
                role: m.role,
                content,
                name: m.name,
            });
        }
        Ok(ChatRequest {
            user_email: self.user_email,
            model: self.model,
            messages,
            options: Some(ChatOptions {
                max_tokens,
                temperature: float(opts.temperature),
                top_p: float(opts.top_p),
                stop_sequences: opts.stop_sequences.unwrap_or_default(),
                reasoning_effort: opts.reasoning_effort,
            }),
            transaction_token,
            request_id,
        })
    }

    fn request_id(request: &mut ChatRequest) -> &mut String {
        &mut request.request_id
    }
}

impl SyftBody for SyftSearchRequest {
    const KIND: ServiceKind = ServiceKind::Search;
    type Request = SearchRequest;

    fn said(&self) -> Said {
        Said::by(&self.user_email, &self.request_id)
    }

    fn request(self, headers: &HeaderMap) -> Result<SearchRequest, RouterError> {
        let (transaction_token, request_id) =
            payment(headers, self.transaction_token, self.request_id)?;
        let opts = self.options.unwrap_or_default();
        // Validation refuses a limit out of the router's range, with the range; one that is not
        // even a u32 is refused here, with the value sent (a negative one was reported as 0, a
        // huge one as 4294967295).
        let limit = match opts.limit.map(u32::try_from) {
            Some(Err(_)) => {
                return Err(RouterError::InvalidArgument(format!(
                    "limit must be a positive number of results, at most the router's max_limit \
                     (got {})",
                    opts.limit.unwrap_or_default()
                )))
            }
            Some(Ok(v)) => Some(v),
            None => None,
        };
        Ok(SearchRequest {
            user_email: self.user_email,
            query: self.query,
            options: Some(SearchOptions {
                limit,
                similarity_threshold: float(opts.similarity_threshold),
                include_metadata: opts.include_metadata,
            }),
            transaction_token,
            request_id,
        })
    }

    fn request_id(request: &mut SearchRequest) -> &mut String {
        &mut request.request_id
    }
}

/// What `/chat` and `/search` share. The body is read as `B` (a refusal on the way is recorded,
/// `read_request`), the request named so that a refusal names it too, and passed to `call`; its
/// answer goes out as the JSON `answer` makes of it (with whether it is a replay), with the
/// rate-limit headers.
async fn serve<B: SyftBody, A, F>(
    svc: &RouterService,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    call: impl FnOnce(B::Request) -> F,
    answer: fn(A) -> (Value, bool),
) -> Result<Response, SyftError>
where
    F: Future<Output = Result<(A, RateHeaders), RouterError>>,
{
    let read = |b: B| b.request(headers);
    let mut req = read_request(svc, B::KIND, headers, body, B::said, read).await?;
    let id = assign_request_id(B::request_id(&mut req));
    let (r, limits) = call(req).await.map_err(refused(&id))?;
    let (json, replay) = answer(r);
    let mut resp = Json(json).into_response();
    // The stored answer of a request id already charged says so, as on the OpenAI front: its
    // `cost` is the first attempt's, not a second charge.
    if replay {
        resp.headers_mut().insert(
            crate::http::REPLAY_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    rate_limit_headers(resp.headers_mut(), &limits);
    Ok(resp)
}

/// `POST /chat`.
pub async fn chat(
    State(svc): State<RouterService>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SyftError> {
    let call = |req| svc.chat_with_limits(req);
    serve::<SyftChatRequest, _, _>(&svc, &headers, body, call, chat_json).await
}

/// A `/chat` answer as JSON, and whether it is a replay.
fn chat_json(r: ChatResponse) -> (Value, bool) {
    let usage = r.usage.unwrap_or_default();
    let message = r.message.unwrap_or_default();
    let body = json!({
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
    });
    (body, r.replay)
}

/// `POST /search`.
pub async fn search(
    State(svc): State<RouterService>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SyftError> {
    let call = |req| svc.search_with_limits(req);
    serve::<SyftSearchRequest, _, _>(&svc, &headers, body, call, search_json).await
}

/// A `/search` answer as JSON, and whether it is a replay.
fn search_json(r: SearchResponse) -> (Value, bool) {
    let results: Vec<Value> = r
        .results
        .into_iter()
        .map(|h| {
            let metadata = serde_json::from_str::<Value>(&h.metadata_json).unwrap_or(Value::Null);
            json!({
                "id": h.id, "score": crate::upstream::f32_json(h.score), "content": h.content,
                "metadata": metadata, "embedding": null,
            })
        })
        .collect();
    let body = json!({
        "id": r.id,
        "query": r.query,
        "results": results,
        "providerInfo": provider_json(r.provider_info),
        "cost": cost_json(r.cost_micros, &r.currency, &r.transfer_id),
        "replay": r.replay,
    });
    (body, r.replay)
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
        let mut entry = json!({
            "status": status,
            "provider": provider,
            "pricing": crate::config::pricing_json(&s.pricing),
        });
        if kind == ServiceKind::Chat {
            entry["left_streams"] = config.left_streams.as_str().into();
        }
        services.insert(kind.as_str().into(), entry);
    }
    let (code, status) = if readiness.ready {
        (StatusCode::OK, "healthy")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    let body = json!({"status": status, "project_name": config.name, "services": services});
    (code, Json(body)).into_response()
}
