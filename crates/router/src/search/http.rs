//! The `http` search backend: `POST {url}/search` in the syft-llm-router JSON shape, so an
//! existing Python search router (over ChromaDB, say) can run behind this router's billing
//! unchanged. It is called without a transaction token: the router has already taken payment.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{SearchHit, SearchQuery};
use crate::config::HttpSearchConfig;
use crate::error::RouterError;
use crate::upstream::{read_limited, HttpEndpoint, UpstreamError};

#[derive(Clone)]
pub struct HttpSearch {
    config: HttpSearchConfig,
    http: HttpEndpoint,
}

/// The upstream's answer; camelCase (what syft-llm-router sends) or snake_case.
#[derive(Deserialize)]
struct WireResponse {
    results: Vec<WireResult>,
}

#[derive(Deserialize)]
struct WireResult {
    id: Value,
    score: f64,
    content: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

impl HttpSearch {
    pub fn new(config: HttpSearchConfig) -> Result<Self, RouterError> {
        let builder = reqwest::Client::builder();
        let http = HttpEndpoint::new(builder, config.connect_timeout, &config.base_url, "/search")?;
        Ok(HttpSearch { config, http })
    }

    pub async fn search(&self, q: &SearchQuery) -> Result<Vec<SearchHit>, UpstreamError> {
        let body = json!({
            "userEmail": q.user_email,
            "query": q.query,
            "options": {
                "limit": q.limit,
                "similarityThreshold": q.similarity_threshold,
                "includeMetadata": q.include_metadata,
            },
        });
        let work = async {
            let resp = self
                .http
                .post_json(&body, self.config.api_key.as_ref())
                .await?;
            let bytes = read_limited(resp).await?;
            parse(&bytes)
        };
        tokio::time::timeout(self.config.timeout, work)
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(backend_status)
    }
}

/// The user's search was validated here before it was sent, so a refusal of the backend's (404
/// for a wrong `url`, 400 or 422 for a schema it does not speak) is the backend's fault, not the
/// user's: `UNAVAILABLE`, as docs/search.md says, rather than `NOT_FOUND` or `INVALID_ARGUMENT`
/// (the chat upstream's mapping, where the user's request is passed on as it came). A 429 stays
/// the backend's rate limit.
fn backend_status(e: UpstreamError) -> UpstreamError {
    match e {
        UpstreamError::Status {
            status, message, ..
        } if status != 429 && status < 500 => {
            // Without the backend's words, which may quote the user's query: this error becomes
            // a void's reason, kept for good, and a log line at the default level.
            tracing::debug!(status, detail = %message, "search backend refusal in its words");
            UpstreamError::Unreachable(format!("search backend answered HTTP {status}"))
        }
        e => e,
    }
}

fn parse(bytes: &[u8]) -> Result<Vec<SearchHit>, UpstreamError> {
    let wire: WireResponse = serde_json::from_slice(bytes)
        .map_err(|e| UpstreamError::InvalidResponse(format!("search answer: {e}")))?;
    wire.results
        .into_iter()
        .map(|r| {
            let id = match r.id {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                other => {
                    return Err(UpstreamError::InvalidResponse(format!(
                        "result id {other} is not a string"
                    )))
                }
            };
            if !r.score.is_finite() {
                return Err(UpstreamError::InvalidResponse(
                    "result score is not a number".into(),
                ));
            }
            Ok(SearchHit {
                id,
                score: r.score.clamp(0.0, 1.0) as f32,
                content: r.content,
                metadata: r.metadata,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_syft_shape_and_refuses_garbage() {
        let hits = parse(
            br#"{"id":"00000000-0000-0000-0000-000000000000","query":"q","results":[
                {"id":"d1","score":0.9,"content":"c","metadata":{"k":1}},{"id":7,"score":1.5,"content":"x"}],
                "providerInfo":{"p":"chroma"}}"#,
        )
        .expect("valid");
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[1].id, "7");
        assert_eq!(hits[1].score, 1.0, "scores are clamped to 0..=1");
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"results":[{"id":null,"score":1,"content":""}]}"#).is_err());
    }
}
