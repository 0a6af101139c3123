//! Any OpenAI-compatible `/chat/completions` server, JSON and SSE.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::endpoint::HttpEndpoint;
use super::{
    Completion, StreamChunk, UpstreamError, UpstreamRequest, UpstreamStream, UpstreamUsage,
};
use crate::config::OpenAiConfig;
use crate::error::RouterError;

/// Largest upstream body (unary) or SSE event the router accepts.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct OpenAiUpstream {
    config: OpenAiConfig,
    http: HttpEndpoint,
}

impl OpenAiUpstream {
    pub fn new(config: OpenAiConfig) -> Result<Self, RouterError> {
        let builder = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(90));
        let path = "/chat/completions";
        let http = HttpEndpoint::new(builder, config.connect_timeout, &config.base_url, path)?;
        Ok(OpenAiUpstream { config, http })
    }

    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    fn body(&self, req: &UpstreamRequest, stream: bool) -> serde_json::Value {
        let messages: Vec<_> = req
            .messages
            .iter()
            .map(|m| {
                let mut v = json!({"role": m.role, "content": m.content});
                if let Some(name) = &m.name {
                    v["name"] = json!(name);
                }
                v
            })
            .collect();
        let mut body = json!({"model": req.model, "messages": messages, "stream": stream});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        let o = &req.options;
        if let Some(v) = o.max_tokens {
            body[self.config.max_tokens_field.as_str()] = json!(v);
        }
        if let Some(v) = o.temperature {
            body["temperature"] = super::f32_json(v);
        }
        if let Some(v) = o.top_p {
            body["top_p"] = super::f32_json(v);
        }
        if !o.stop_sequences.is_empty() {
            body["stop"] = json!(o.stop_sequences);
        }
        if let Some(effort) = &o.reasoning_effort {
            body["reasoning_effort"] = json!(effort);
        }
        if !req.user.is_empty() {
            body["user"] = json!(req.user);
        }
        body
    }

    /// Sends the request, retrying connect errors and 429/502/503/504 with exponential backoff,
    /// or after the upstream's `Retry-After` when it is longer. A wait longer than half the time
    /// left before `deadline` is not taken: the error is returned at once (with its
    /// `Retry-After`), rather than a timeout at the deadline. Returns a response with a success
    /// status.
    async fn send(
        &self,
        body: &serde_json::Value,
        deadline: tokio::time::Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut attempt = 0u32;
        loop {
            let err = match self
                .http
                .post_json(body, self.config.api_key.as_ref())
                .await
            {
                Ok(resp) => return Ok(resp),
                Err(err) => err,
            };
            if attempt >= self.config.max_retries || !err.is_retryable() {
                return Err(err);
            }
            let backoff = self
                .config
                .retry_backoff
                .saturating_mul(1 << attempt.min(10));
            let delay = err
                .retry_after()
                .map_or(backoff, |after| after.max(backoff));
            // A wait that leaves the retry less time than it took is not taken: the retry would
            // most likely end in a timeout, telling the client less than this error does.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if delay > left / 2 {
                return Err(err);
            }
            tracing::warn!(attempt, error = %err.summary(), delay_ms = delay.as_millis() as u64, "retrying upstream");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    pub async fn complete(&self, req: &UpstreamRequest) -> Result<Completion, UpstreamError> {
        let body = self.body(req, false);
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let work = async {
            let resp = self.send(&body, deadline).await?;
            let bytes = read_limited(resp).await?;
            parse_completion(&bytes)
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    pub async fn stream(&self, req: &UpstreamRequest) -> Result<UpstreamStream, UpstreamError> {
        let body = self.body(req, true);
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let resp = tokio::time::timeout_at(deadline, self.send(&body, deadline))
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        let is_sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if !is_sse {
            // Some servers ignore `stream: true`; accept a JSON answer as a one-chunk stream. Its
            // body is read within the request's time (only the headers were, up to here).
            let bytes = tokio::time::timeout_at(deadline, read_limited(resp))
                .await
                .map_err(|_| UpstreamError::Timeout)??;
            let c = parse_completion(&bytes)?;
            let chunk = StreamChunk {
                id: Some(c.id),
                model: Some(c.model),
                delta: Some(c.content),
                finish_reason: Some(c.finish_reason),
                usage: c.usage,
            };
            // In pieces a client can read, as a streamed answer's deltas are.
            let mut chunks = VecDeque::new();
            push_split(&mut chunks, chunk);
            return Ok(Box::pin(futures::stream::iter(chunks)));
        }
        Ok(Box::pin(sse_chunks(
            resp.bytes_stream(),
            self.config.idle_timeout,
        )))
    }
}

/// Most of an error answer's body that is read: only its message's first 500 characters are kept,
/// and an error answered with an endless body (a broken upstream or proxy) was buffered whole.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub(crate) async fn status_error(resp: reqwest::Response) -> UpstreamError {
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers(), std::time::SystemTime::now());
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while buf.len() < MAX_ERROR_BODY {
        match body.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    buf.truncate(MAX_ERROR_BODY);
    let text = String::from_utf8_lossy(&buf);
    let json = serde_json::from_str::<serde_json::Value>(&text).ok();
    let message = (json.as_ref())
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.chars().take(200).collect());
    let message: String = message.chars().take(500).collect();
    // OpenAI says an account out of credit with a 429 whose code is `insufficient_quota`: not a
    // rate, which no wait clears. Read as the 402 other providers send, it is not retried, and
    // told as the operator's outage (it was retried three times, then told as a rate limit the
    // SDKs retried: nine upstream calls and three holds for one request).
    let out_of_credit = json.as_ref().is_some_and(|v| {
        let e = &v["error"];
        e["code"] == "insufficient_quota" || e["type"] == "insufficient_quota"
    });
    UpstreamError::Status {
        status: if status == 429 && out_of_credit {
            402
        } else {
            status
        },
        message,
        retry_after,
    }
}

/// The longest `Retry-After` believed: a misconfigured upstream's "next year" would otherwise
/// tell clients never to come back.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// When an error answer says to come back: OpenAI's `retry-after-ms`, else `Retry-After` as
/// seconds or as an HTTP date (RFC 9110), at most [`MAX_RETRY_AFTER`]. `None` when neither header
/// is there or readable.
fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let millis = text("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok());
    let after = millis.or_else(|| {
        let v = text("retry-after")?;
        match v.parse::<f64>() {
            Ok(secs) => Duration::try_from_secs_f64(secs).ok(),
            Err(_) => {
                let at = httpdate::parse_http_date(v).ok()?;
                Some(at.duration_since(now).unwrap_or(Duration::ZERO))
            }
        }
    })?;
    Some(after.min(MAX_RETRY_AFTER))
}

pub(crate) async fn read_limited(resp: reqwest::Response) -> Result<Bytes, UpstreamError> {
    let mut body = resp.bytes_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(body_error)?;
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(UpstreamError::InvalidResponse(
                "response body too large".into(),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn body_error(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout
    } else {
        UpstreamError::Unreachable(format!("reading upstream body: {}", e.without_url()))
    }
}

/// The usage an upstream reported, read leniently: a count that is missing, negative,
/// fractional or not a number is left out (0), and the router counts that side itself. Read
/// strictly, a malformed usage made the whole answer unreadable: a unary answer was refused, and
/// a stream whose text was already delivered ended as failed (voided, the client told of an
/// error after the whole text).
fn usage_of(v: &serde_json::Value) -> Option<UpstreamUsage> {
    let count = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    v.is_object().then(|| UpstreamUsage {
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
    })
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    delta: Option<WireMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// An `error` object inside a 200 answer (some servers report failures that way, a stream's
/// error as an event): the 429 or 5xx its own `code` names (a number or a string of one), else a
/// 500, with the upstream's message cut to 500 characters so a huge body never reaches a client.
/// A 4xx code other than 429 is not believed: vLLM and SGLang send any failure caught
/// mid-stream, an engine's crash included, as `code: 400`, which would have told the user their
/// request was wrong, with the engine's exception text. Nor is it an outage (it was a 502): a
/// prompt that reliably draws such an error gave its request windows' place back each time.
fn error_in_body(err: &serde_json::Value) -> UpstreamError {
    let code = match &err["code"] {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    UpstreamError::Status {
        status: code
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| *c == 429 || (500..=599).contains(c))
            .unwrap_or(500),
        message: err["message"]
            .as_str()
            .unwrap_or("upstream error")
            .chars()
            .take(500)
            .collect(),
        retry_after: None,
    }
}

/// The longest upstream `id`, `model` or `finish_reason` passed on (an OpenAI id is 38 bytes):
/// the answer echoes them, and a longer one (a broken or hostile upstream, up to the body's
/// 32 MiB) made an answer whose text fits the limit one a standard gRPC client cannot read,
/// charged all the same.
const MAX_LABEL_BYTES: usize = 256;

/// `s` cut to [`MAX_LABEL_BYTES`] at a character boundary.
fn label(mut s: String) -> String {
    if s.len() > MAX_LABEL_BYTES {
        let mut at = MAX_LABEL_BYTES;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

fn parse_completion(bytes: &[u8]) -> Result<Completion, UpstreamError> {
    let wire: WireResponse = serde_json::from_slice(bytes)
        .map_err(|e| UpstreamError::InvalidResponse(format!("not a chat completion: {e}")))?;
    if let Some(err) = wire.error {
        return Err(error_in_body(&err));
    }
    let choice = wire
        .choices
        .into_iter()
        .next()
        .ok_or(UpstreamError::Empty)?;
    let content = choice.message.and_then(|m| m.content).unwrap_or_default();
    if content.is_empty() {
        return Err(UpstreamError::Empty);
    }
    Ok(Completion {
        id: label(wire.id),
        model: label(wire.model),
        content,
        finish_reason: label(choice.finish_reason.unwrap_or_else(|| "stop".into())),
        usage: wire.usage.as_ref().and_then(usage_of),
    })
}

fn parse_chunk(data: &str) -> Result<StreamChunk, UpstreamError> {
    let wire: WireResponse = serde_json::from_str(data)
        .map_err(|e| UpstreamError::InvalidResponse(format!("bad stream event: {e}")))?;
    if let Some(err) = wire.error {
        return Err(error_in_body(&err));
    }
    let mut chunk = StreamChunk {
        id: (!wire.id.is_empty()).then(|| label(wire.id)),
        model: (!wire.model.is_empty()).then(|| label(wire.model)),
        usage: wire.usage.as_ref().and_then(usage_of),
        ..StreamChunk::default()
    };
    if let Some(choice) = wire.choices.into_iter().next() {
        chunk.delta = choice
            .delta
            .and_then(|d| d.content)
            .filter(|s| !s.is_empty());
        // `""` is no finish: Ollama, SGLang and LocalAI send it on every chunk but the last, and
        // taking it for one charged a stream cut short as a whole answer.
        chunk.finish_reason = choice.finish_reason.filter(|f| !f.is_empty()).map(label);
    }
    Ok(chunk)
}

struct SseState<S> {
    body: S,
    buf: Vec<u8>,
    /// How far `buf` was searched for an event's end (the next search resumes there: searching
    /// from its start at every network chunk made one large event cost its size squared).
    scanned: usize,
    pending: VecDeque<Result<StreamChunk, UpstreamError>>,
    done: bool,
    /// A chunk with a `finish_reason` was passed on.
    finished: bool,
    idle: Duration,
}

/// Parses `data:` events of an SSE body into chunks, ending at `data: [DONE]` or end of body.
/// Silence longer than `idle` is a timeout. A body that ends with neither `[DONE]` nor a
/// `finish_reason` ends with an error: the answer was cut short (a server that died mid-answer
/// with a close-delimited body ends it cleanly), and was charged in full as finished.
fn sse_chunks<S>(
    body: S,
    idle: Duration,
) -> impl Stream<Item = Result<StreamChunk, UpstreamError>> + Send
where
    S: Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
{
    let state = SseState {
        body,
        buf: Vec::new(),
        scanned: 0,
        pending: VecDeque::new(),
        done: false,
        finished: false,
        idle,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.pending.pop_front() {
                match &item {
                    Ok(chunk) => st.finished |= chunk.finish_reason.is_some(),
                    Err(_) => {
                        st.done = true;
                        st.pending.clear();
                    }
                }
                return Some((item, st));
            }
            if st.done {
                return None;
            }
            match tokio::time::timeout(st.idle, st.body.next()).await {
                Err(_) => {
                    st.done = true;
                    return Some((Err(UpstreamError::Timeout), st));
                }
                Ok(None) => {
                    // End of body: parse a trailing event without its blank line.
                    let rest = std::mem::take(&mut st.buf);
                    let mut ended = false;
                    parse_events(&rest, &mut st.pending, &mut ended);
                    st.done = true;
                    let finished = st.finished
                        || st
                            .pending
                            .iter()
                            .any(|c| c.as_ref().is_ok_and(|c| c.finish_reason.is_some()));
                    if !ended && !finished {
                        st.pending.push_back(Err(UpstreamError::InvalidResponse(
                            "the stream ended before its finish_reason".into(),
                        )));
                    }
                }
                Ok(Some(Err(e))) => {
                    st.done = true;
                    return Some((Err(body_error(e)), st));
                }
                Ok(Some(Ok(bytes))) => {
                    st.buf.extend_from_slice(&bytes);
                    if st.buf.len() > MAX_BODY_BYTES {
                        st.done = true;
                        return Some((
                            Err(UpstreamError::InvalidResponse(
                                "stream event too large".into(),
                            )),
                            st,
                        ));
                    }
                    let mut consumed = 0;
                    // A separator (at most 4 bytes) may straddle the last search's end.
                    let mut from = st.scanned.saturating_sub(3);
                    while let Some(end) = find_event_end(&st.buf[consumed..], from) {
                        let (event_len, sep_len) = end;
                        let event = st.buf[consumed..consumed + event_len].to_vec();
                        consumed += event_len + sep_len;
                        from = 0;
                        parse_events(&event, &mut st.pending, &mut st.done);
                        if st.done {
                            break;
                        }
                    }
                    st.buf.drain(..consumed);
                    st.scanned = st.buf.len();
                }
            }
        }
    })
}

/// Finds the end of the first SSE event, searching from `from` (no separator starts before it):
/// (event length, separator length).
fn find_event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if buf[i] == b'\r' && buf.get(i + 1..i + 4) == Some(b"\n\r\n") {
            return Some((i, 4));
        }
        i += 1;
    }
    None
}

/// Parses one SSE event (or, at end of body, whatever is left) into chunks.
fn parse_events(
    event: &[u8],
    out: &mut VecDeque<Result<StreamChunk, UpstreamError>>,
    done: &mut bool,
) {
    let text = match std::str::from_utf8(event) {
        Ok(t) => t,
        Err(_) => {
            out.push_back(Err(UpstreamError::InvalidResponse(
                "stream is not UTF-8".into(),
            )));
            *done = true;
            return;
        }
    };
    let mut data = String::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    if data.is_empty() {
        return;
    }
    if data.trim() == "[DONE]" {
        *done = true;
        return;
    }
    match parse_chunk(&data) {
        Ok(chunk) => push_split(out, chunk),
        Err(e) => out.push_back(Err(e)),
    }
}

/// The longest delta passed on whole: a standard gRPC client reads messages of up to 4 MiB, an
/// upstream may send one event of up to `MAX_BODY_BYTES`, and a delta the client could not read
/// was handed to its connection, so charged.
const MAX_DELTA_BYTES: usize = 1024 * 1024;

/// Queues `chunk`, its delta split at character boundaries into pieces of at most
/// [`MAX_DELTA_BYTES`] (the text is the same; the last piece carries the finish and the usage).
fn push_split(out: &mut VecDeque<Result<StreamChunk, UpstreamError>>, mut chunk: StreamChunk) {
    let Some(delta) = chunk.delta.take_if(|d| d.len() > MAX_DELTA_BYTES) else {
        out.push_back(Ok(chunk));
        return;
    };
    let mut rest = delta.as_str();
    while rest.len() > MAX_DELTA_BYTES {
        let mut at = MAX_DELTA_BYTES;
        while !rest.is_char_boundary(at) {
            at -= 1;
        }
        let (piece, tail) = rest.split_at(at);
        // The first piece takes the id and the model.
        out.push_back(Ok(StreamChunk {
            id: chunk.id.take(),
            model: chunk.model.take(),
            delta: Some(piece.to_string()),
            ..StreamChunk::default()
        }));
        rest = tail;
    }
    chunk.delta = Some(rest.to_string());
    out.push_back(Ok(chunk));
}

#[cfg(test)]
mod tests;
