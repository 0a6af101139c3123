//! An in-process OpenAI-compatible upstream (`POST /v1/chat/completions`, JSON and SSE) on
//! 127.0.0.1:0 that can be told to misbehave. It also answers `POST /v1/search` in the
//! syft-llm-router shape (for the router's `http` search backend), under the same [`Mode`]s.

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
use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// What the upstream answers.
pub const CONTENT: &str = "Hello from the upstream model";
/// The results `/v1/search` answers (`Mode::EmptyChoices`: none).
pub const SEARCH_HITS: usize = 2;
/// The usage it reports.
pub const UP_PROMPT: u64 = 20;
pub const UP_COMPLETION: u64 = 5;

/// How the fake upstream answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// A good answer with usage.
    Ok,
    /// A good answer without usage (the router must count tokens itself).
    NoUsage,
    /// A good answer whose usage gives the prompt tokens only (unary).
    PromptUsageOnly,
    /// A good answer reporting these prompt and completion tokens (unary): an upstream counting
    /// with another tokenizer, or adding a system prompt of its own.
    Usage(u64, u64),
    /// An HTTP error status with an OpenAI error body.
    Status(u16),
    /// An HTTP error status with this body, sent as it is (an HTML error page, a long message).
    StatusBody(u16, String),
    /// An HTTP error status whose body never ends.
    EndlessError(u16),
    /// `200` with JSON headers, then a body that never comes (also for a stream request).
    JsonThenStall,
    /// Never answers.
    Stall,
    /// Answers after a delay.
    Delay(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with `choices: []`.
    EmptyChoices,
    /// Streams: one chunk per `Duration`, 100 chunks, then the finish and `[DONE]`.
    SlowStream(Duration),
    /// [`Mode::SlowStream`] that stops before chunk `.1` until [`FakeUpstream::open_gate`] (a
    /// test's reader can catch up there); [`FakeUpstream::streams_sent`] counts the ones sent
    /// to their end.
    GatedStream(Duration, u32),
    /// Streams one chunk, then stalls.
    StreamStall,
    /// Streams one chunk, then garbage.
    StreamGarbage,
    /// Streams one chunk, then ends the body cleanly with neither a `finish_reason` nor `[DONE]`
    /// (an upstream that died mid-answer behind a close-delimited body).
    CutShort,
    /// Streams the whole answer and its `finish_reason`, then garbage instead of `[DONE]`.
    FinishThenGarbage,
    /// Streams two chunks whose `finish_reason` is `""` (not finished: Ollama, SGLang and
    /// LocalAI send it so on every chunk but the last), then ends the body without `[DONE]`.
    EmptyFinishCutShort,
    /// [`Mode::EmptyFinishCutShort`]'s two chunks, then silence (the idle timeout).
    EmptyFinishStall,
    /// An answer of this many bytes: unary, one message; streamed, one delta of that size, then
    /// `"end"` with the finish and `[DONE]`.
    BigAnswer(usize),
    /// A JSON answer of `.0` bytes whose `id` is `.1` bytes long, to a stream request too (a
    /// server that ignores `stream: true`).
    BigJsonAnswer(usize, usize),
    /// Streams every word of the answer at once, then its `finish_reason` and `[DONE]` after
    /// this long (a model whose end comes a moment after its last word).
    SlowEnd(Duration),
    /// Streams every word and the `finish_reason` at once, then `[DONE]` after this long,
    /// sending an SSE comment every 200 ms meanwhile (so the router's idle timeout does not end
    /// the stream first).
    LateDone(Duration),
    /// Search: every result's content is this many bytes.
    BigResults(usize),
    /// Search: the results worst first (scores 0.8, then 0.9).
    WorstFirst,
    /// `429` with `Retry-After: <.0>` to the next `.1` calls, then good answers.
    RateLimited(String, u32),
    /// `503` with `Retry-After: <.0>` to every call (down for maintenance).
    Unavailable(String),
}

pub struct FakeUpstream {
    pub base_url: String,
    state: Arc<UpState>,
}

struct UpState {
    mode: Mutex<Mode>,
    /// Permits for [`Mode::GatedStream`] to go on.
    gate: Arc<tokio::sync::Semaphore>,
    /// Streams of [`Mode::GatedStream`] whose last event was handed over.
    sent: Arc<AtomicUsize>,
    hits: AtomicUsize,
    last_body: Mutex<Option<Value>>,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let state = Arc::new(UpState {
            mode: Mutex::new(Mode::Ok),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            sent: Arc::new(AtomicUsize::new(0)),
            hits: AtomicUsize::new(0),
            last_body: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(upstream_handler))
            .route("/v1/search", post(search_handler))
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

    /// Lets one [`Mode::GatedStream`] past its gate.
    pub fn open_gate(&self) {
        self.state.gate.add_permits(1);
    }

    /// [`Mode::GatedStream`] streams sent to their end (`[DONE]` handed to the connection).
    pub fn streams_sent(&self) -> usize {
        self.state.sent.load(Ordering::SeqCst)
    }

    /// Waits (10 s at most) until `n` [`Mode::GatedStream`] streams were sent to their end.
    pub async fn wait_streams_sent(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.streams_sent() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} gated streams sent",
                self.streams_sent()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn last_body(&self) -> Option<Value> {
        self.state.last_body.lock().expect("lock").clone()
    }
}

fn completion_json(model: &str, mode: &Mode) -> Value {
    let mut v = json!({
        "id": "up-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT}, "finish_reason": "stop"}],
    });
    match mode {
        Mode::NoUsage => {}
        Mode::PromptUsageOnly => v["usage"] = json!({"prompt_tokens": UP_PROMPT}),
        Mode::Usage(prompt, completion) => {
            v["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
        }
        _ => {
            v["usage"] = json!({"prompt_tokens": UP_PROMPT, "completion_tokens": UP_COMPLETION, "total_tokens": UP_PROMPT + UP_COMPLETION})
        }
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

/// Counts the call, keeps its body, and answers the failure modes shared by both endpoints;
/// `None` means: answer normally (after any delay).
async fn misbehave(state: &UpState, body: &Value) -> (Mode, Option<Response>) {
    state.hits.fetch_add(1, Ordering::SeqCst);
    *state.last_body.lock().expect("lock") = Some(body.clone());
    let mode = {
        let mut mode = state.mode.lock().expect("lock");
        let now = mode.clone();
        if let Mode::RateLimited(_, left) = &mut *mode {
            *left = left.saturating_sub(1);
        }
        now
    };
    let early = match &mode {
        Mode::RateLimited(after, left) if *left > 0 => {
            let body = json!({"error": {"message": "slow down", "type": "rate_limit_error"}});
            let status = axum::http::StatusCode::TOO_MANY_REQUESTS;
            Some((status, [("retry-after", after.clone())], Json(body)).into_response())
        }
        Mode::Unavailable(after) => {
            let body =
                json!({"error": {"message": "down for maintenance", "type": "server_error"}});
            let status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
            Some((status, [("retry-after", after.clone())], Json(body)).into_response())
        }
        Mode::Status(code) => {
            let status = axum::http::StatusCode::from_u16(*code).expect("status");
            let body = json!({"error": {"message": "upstream exploded", "type": "server_error"}});
            Some((status, Json(body)).into_response())
        }
        Mode::StatusBody(code, body) => {
            let status = axum::http::StatusCode::from_u16(*code).expect("status");
            Some((status, body.clone()).into_response())
        }
        Mode::EndlessError(code) => {
            let status = axum::http::StatusCode::from_u16(*code).expect("status");
            let filler = axum::body::Bytes::from(vec![b'x'; 16 * 1024]);
            let body = futures::stream::repeat_with(move || Ok::<_, Infallible>(filler.clone()));
            Some((status, Body::from_stream(body)).into_response())
        }
        Mode::JsonThenStall => {
            let body = futures::stream::pending::<Result<axum::body::Bytes, Infallible>>();
            Some(
                (
                    [(CONTENT_TYPE, "application/json")],
                    Body::from_stream(body),
                )
                    .into_response(),
            )
        }
        Mode::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        }
        Mode::Delay(d) => {
            tokio::time::sleep(*d).await;
            None
        }
        Mode::Garbage => {
            Some(([(CONTENT_TYPE, "application/json")], "{\"choices\": [oops").into_response())
        }
        _ => None,
    };
    (mode, early)
}

async fn search_handler(State(state): State<Arc<UpState>>, Json(body): Json<Value>) -> Response {
    let (mode, early) = misbehave(&state, &body).await;
    if let Some(resp) = early {
        return resp;
    }
    let n = if mode == Mode::EmptyChoices {
        0
    } else {
        SEARCH_HITS
    };
    let content = |i: usize| match mode {
        Mode::BigResults(bytes) => "x".repeat(bytes),
        _ => format!("result {i} for {}", body["query"]),
    };
    let results: Vec<Value> = (0..n)
        .map(|i| {
            let score = match mode {
                Mode::WorstFirst => 0.8 + i as f64 * 0.1,
                _ => 0.9 - i as f64 * 0.1,
            };
            json!({"id": format!("doc-{i}"), "score": score,
                        "content": content(i),
                        "metadata": {"rank": i}, "embedding": null})
        })
        .collect();
    Json(
        json!({"id": "00000000-0000-4000-8000-000000000000", "query": body["query"],
                "results": results, "providerInfo": {"provider": "fake"}}),
    )
    .into_response()
}

async fn upstream_handler(State(state): State<Arc<UpState>>, Json(body): Json<Value>) -> Response {
    let (mode, early) = misbehave(&state, &body).await;
    if let Some(resp) = early {
        return resp;
    }
    let model = body["model"].as_str().unwrap_or("m").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    if mode == Mode::EmptyChoices && !stream {
        return Json(json!({"id": "x", "model": model, "choices": []})).into_response();
    }
    if let Mode::BigJsonAnswer(n, id) = &mode {
        let mut v = completion_json(&model, &Mode::NoUsage);
        v["choices"][0]["message"]["content"] = json!("word ".repeat(n / 5));
        v["id"] = json!("i".repeat(*id));
        return Json(v).into_response();
    }
    if let (Mode::BigAnswer(n), false) = (&mode, stream) {
        let mut v = completion_json(&model, &Mode::NoUsage);
        v["choices"][0]["message"]["content"] = json!("word ".repeat(n / 5));
        return Json(v).into_response();
    }
    if !stream {
        return Json(completion_json(&model, &mode)).into_response();
    }
    let words: Vec<String> = CONTENT.split_inclusive(' ').map(str::to_string).collect();
    let events: futures::stream::BoxStream<'static, Result<String, Infallible>> = match mode {
        Mode::EmptyChoices => Box::pin(futures::stream::iter(vec![
            Ok(sse(&chunk(&model, None, Some("stop")))),
            Ok("data: [DONE]\n\n".to_string()),
        ])),
        Mode::SlowStream(_) | Mode::GatedStream(..) => {
            let (every, gate_at) = match mode {
                Mode::GatedStream(every, at) => (every, Some(at)),
                Mode::SlowStream(every) => (every, None),
                _ => unreachable!("matched above"),
            };
            let model = model.clone();
            let (gate, sent) = (state.gate.clone(), state.sent.clone());
            let end = vec![
                Ok(sse(&chunk(&model, None, Some("stop")))),
                Ok("data: [DONE]\n\n".to_string()),
            ];
            let counted = futures::stream::once(async move {
                if gate_at.is_some() {
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            })
            .filter_map(|()| async { None::<Result<String, Infallible>> });
            Box::pin(
                futures::stream::unfold(0u32, move |i| {
                    let (model, gate) = (model.clone(), gate.clone());
                    async move {
                        if i >= 100 {
                            return None;
                        }
                        if Some(i) == gate_at {
                            // A closed gate is never closed: `open_gate` adds a permit.
                            let _ = gate.acquire().await.map(|p| p.forget());
                        }
                        tokio::time::sleep(every).await;
                        Some((Ok(sse(&chunk(&model, Some("tick "), None))), i + 1))
                    }
                })
                .chain(futures::stream::iter(end))
                .chain(counted),
            )
        }
        Mode::StreamStall => {
            let first = sse(&chunk(&model, Some("partial "), None));
            Box::pin(futures::stream::iter(vec![Ok(first)]).chain(futures::stream::pending()))
        }
        Mode::CutShort => Box::pin(futures::stream::iter(vec![Ok(sse(&chunk(
            &model,
            Some("partial "),
            None,
        )))])),
        Mode::StreamGarbage => Box::pin(futures::stream::iter(vec![
            Ok(sse(&chunk(&model, Some("partial "), None))),
            Ok("data: {not json\n\n".to_string()),
        ])),
        Mode::SlowEnd(wait) => {
            let said: Vec<Result<String, Infallible>> = words
                .iter()
                .map(|w| Ok(sse(&chunk(&model, Some(w), None))))
                .collect();
            let end = vec![
                Ok(sse(&chunk(&model, None, Some("stop")))),
                Ok("data: [DONE]\n\n".to_string()),
            ];
            let end = futures::stream::once(tokio::time::sleep(wait))
                .flat_map(move |()| futures::stream::iter(end.clone()));
            Box::pin(futures::stream::iter(said).chain(end))
        }
        Mode::LateDone(wait) => {
            let mut said: Vec<Result<String, Infallible>> = words
                .iter()
                .map(|w| Ok(sse(&chunk(&model, Some(w), None))))
                .collect();
            said.push(Ok(sse(&chunk(&model, None, Some("stop")))));
            let every = Duration::from_millis(200);
            let pings = (wait.as_millis() / every.as_millis()).max(1) as usize;
            let waiting = futures::stream::iter(0..pings).then(move |_| async move {
                tokio::time::sleep(every).await;
                Ok(": waiting\n\n".to_string())
            });
            let done = futures::stream::iter(vec![Ok("data: [DONE]\n\n".to_string())]);
            Box::pin(futures::stream::iter(said).chain(waiting).chain(done))
        }
        Mode::BigAnswer(n) => Box::pin(futures::stream::iter(vec![
            Ok(sse(&chunk(&model, Some(&"word ".repeat(n / 5)), None))),
            Ok(sse(&chunk(&model, Some("end"), Some("stop")))),
            Ok("data: [DONE]\n\n".to_string()),
        ])),
        Mode::EmptyFinishCutShort | Mode::EmptyFinishStall => {
            let part = |c: &str| {
                let mut v = chunk(&model, Some(c), None);
                v["choices"][0]["finish_reason"] = json!("");
                Ok(sse(&v))
            };
            let said = futures::stream::iter(vec![part("The answer is "), part("forty")]);
            if mode == Mode::EmptyFinishStall {
                Box::pin(said.chain(futures::stream::pending()))
            } else {
                Box::pin(said)
            }
        }
        Mode::FinishThenGarbage => {
            let mut out: Vec<Result<String, Infallible>> = words
                .iter()
                .map(|w| Ok(sse(&chunk(&model, Some(w), None))))
                .collect();
            out.push(Ok(sse(&chunk(&model, None, Some("stop")))));
            out.push(Ok("data: {not json\n\n".to_string()));
            Box::pin(futures::stream::iter(out))
        }
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
