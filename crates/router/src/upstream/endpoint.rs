//! The one URL the router posts JSON to on an HTTP backend (the chat upstream's
//! `/chat/completions`, the search backend's `/search`): how the client is built and how a call
//! is made and classified, shared so both backends fail the same way.

use std::time::Duration;

use syft_server::Secret;

use super::{status_error, UpstreamError};
use crate::error::RouterError;

#[derive(Debug, Clone)]
pub(crate) struct HttpEndpoint {
    client: reqwest::Client,
    /// Parsed once: parsing it per request (host, IDNA) was ~2 % of a free router's CPU. Boxed:
    /// a `Url` is four times a `String`, and the upstream enum carries it inline.
    url: Box<reqwest::Url>,
}

impl HttpEndpoint {
    /// `path` under `base_url` (a trailing `/` on it is ignored; a base that already ends in
    /// `path` is taken as the whole URL; its query, e.g. Azure's `api-version`, is kept). No
    /// Nagle delay: requests are small and the router's added latency is what it is judged by. A
    /// URL that does not parse fails here, at start-up, rather than on every request.
    pub(crate) fn new(
        builder: reqwest::ClientBuilder,
        connect_timeout: Duration,
        base_url: &str,
        path: &str,
    ) -> Result<Self, RouterError> {
        let client = builder
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| RouterError::Internal(format!("building HTTP client: {e}")))?;
        let mut url = reqwest::Url::parse(base_url)
            .map_err(|e| RouterError::InvalidArgument(format!("upstream URL {base_url:?}: {e}")))?;
        // Joined as text, `/search` landed inside a query (`/api?x=1/search`), and a base
        // naming the endpoint itself got it twice (`/search/search`).
        let base = url.path().trim_end_matches('/');
        if !base.ends_with(path) {
            let joined = format!("{base}{path}");
            url.set_path(&joined);
        }
        url.set_fragment(None);
        Ok(HttpEndpoint {
            client,
            url: Box::new(url),
        })
    }

    /// Posts `body` with the trace context and, if set, `api_key` as a bearer token. A response
    /// with a success status, else the error it amounts to (status, timeout, unreachable).
    pub(crate) async fn post_json(
        &self,
        body: &serde_json::Value,
        api_key: Option<&Secret>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut trace = reqwest::header::HeaderMap::new();
        syft_telemetry::inject_http(&mut trace);
        let mut rb = self
            .client
            .post(self.url.as_ref().clone())
            .headers(trace)
            .json(body);
        if let Some(key) = api_key {
            rb = rb.bearer_auth(key.expose());
        }
        match rb.send().await {
            Ok(resp) if resp.status().is_success() => Ok(resp),
            Ok(resp) => Err(status_error(resp).await),
            // A connection not made within `connect_timeout` is a connect error (the request
            // never reached the upstream: retried), not the upstream's timeout.
            Err(e) if e.is_timeout() && !e.is_connect() => Err(UpstreamError::Timeout),
            Err(e) => Err(UpstreamError::Unreachable(e.without_url().to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_parsed_once_at_start_up() {
        let new = |base: &str| {
            HttpEndpoint::new(
                reqwest::Client::builder(),
                Duration::from_secs(1),
                base,
                "/chat/completions",
            )
        };
        let ok = new("http://127.0.0.1:8080/v1/").expect("a valid base URL");
        assert_eq!(ok.url.as_str(), "http://127.0.0.1:8080/v1/chat/completions");
        for (base, url) in [
            (
                "http://h:8080/openai/deployments/d?api-version=2024-02-01",
                "http://h:8080/openai/deployments/d/chat/completions?api-version=2024-02-01",
            ),
            (
                "http://h:8080/v1/chat/completions",
                "http://h:8080/v1/chat/completions",
            ),
            ("http://h:8080", "http://h:8080/chat/completions"),
        ] {
            assert_eq!(new(base).expect(base).url.as_str(), url);
        }
        // Before, such a URL started and then failed every request as "unreachable".
        let err = new("127.0.0.1:8080/v1").expect_err("no scheme");
        assert!(
            matches!(&err, RouterError::InvalidArgument(m) if m.contains("upstream URL")),
            "{err:?}"
        );
    }
}
