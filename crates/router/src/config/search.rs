//! The `search` section: which backend answers the `search` service, and its request bounds.
//!
//! ```toml
//! [search]
//! backend = "embedded"      # or "http"
//! docs = "docs/"            # a folder indexed in memory and re-indexed when it changes, or
//! index = "data/index"      # an index built by `syft-router index build`
//! rescan_seconds = 30       # how often `docs` is checked for changes
//! # backend = "http": url = "http://127.0.0.1:8000" (POST /search is appended), timeout_ms
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use syft_server::Secret;

use super::file::{set, set_ms};
use super::{invalid, ConfigError, RouterConfig};

impl RouterConfig {
    /// The longest text one request may carry: a chat's prompt or, where search is configured,
    /// a query. The fronts size the bodies they read by it: sized by the prompt alone, a query
    /// within `search.max_query_bytes` was refused over HTTP when the prompt limit was lower.
    pub fn largest_text_bytes(&self) -> usize {
        let query = self.search.as_ref().map_or(0, |s| s.max_query_bytes);
        self.limits.max_prompt_bytes.max(query)
    }
}

/// How often a watched `docs` folder is checked for changes, by default.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(30);

/// The search service's backend and bounds.
#[derive(Debug, Clone)]
pub struct SearchConfig {
    pub backend: SearchBackendConfig,
    /// Results returned when a request sets no `limit`.
    pub default_limit: u32,
    /// The largest `limit` a request may ask for.
    pub max_limit: u32,
    /// The longest query, in bytes.
    pub max_query_bytes: usize,
}

impl SearchConfig {
    pub fn new(backend: SearchBackendConfig) -> Self {
        SearchConfig {
            backend,
            default_limit: 5,
            max_limit: 100,
            max_query_bytes: 4096,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_limit == 0 || self.default_limit == 0 || self.default_limit > self.max_limit {
            return Err(invalid(
                "search: need 1 <= default_limit <= max_limit (and max_limit >= 1)",
            ));
        }
        if self.max_query_bytes == 0 {
            return Err(invalid("search.max_query_bytes must be positive"));
        }
        match &self.backend {
            SearchBackendConfig::Docs { rescan, .. } if rescan.is_zero() => {
                Err(invalid("search.rescan_seconds must be positive"))
            }
            SearchBackendConfig::Http(h)
                if !(h.base_url.starts_with("http://") || h.base_url.starts_with("https://")) =>
            {
                Err(invalid(format!(
                    "search.url {:?} must start with http:// or https://",
                    h.base_url
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Where search answers come from.
#[derive(Debug, Clone)]
pub enum SearchBackendConfig {
    /// An index directory built by `syft-router index build` (opened read-only).
    Index(PathBuf),
    /// A folder of documents indexed in memory at start and re-indexed when a periodic rescan
    /// sees a file added, removed or changed (size or modification time).
    Docs { dir: PathBuf, rescan: Duration },
    /// An upstream that speaks the syft-llm-router `POST /search` JSON shape.
    Http(HttpSearchConfig),
}

/// Settings of the `http` search backend. `Debug` hides the API key.
#[derive(Debug, Clone)]
pub struct HttpSearchConfig {
    /// `POST {base_url}/search`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    /// Deadline of the whole upstream call.
    pub timeout: Duration,
}

impl HttpSearchConfig {
    pub fn new(base_url: impl Into<String>) -> Self {
        HttpSearchConfig {
            base_url: base_url.into(),
            api_key: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        }
    }
}

/// The `search` section as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSearch {
    #[serde(default = "default_backend")]
    backend: String,
    #[serde(default)]
    index: Option<PathBuf>,
    #[serde(default)]
    docs: Option<PathBuf>,
    #[serde(default)]
    rescan_seconds: Option<u64>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    default_limit: Option<u32>,
    #[serde(default)]
    max_limit: Option<u32>,
    #[serde(default)]
    max_query_bytes: Option<usize>,
}

fn default_backend() -> String {
    "embedded".into()
}

impl RawSearch {
    /// A setting the chosen backend does not read, if any: it would be ignored, and a file that
    /// names one (an `index` with `backend = "http"`, say) means something else than it does.
    fn misplaced(&self) -> Option<&'static str> {
        let set = match self.backend.as_str() {
            "embedded" => vec![
                ("url", self.url.is_some()),
                ("api_key", self.api_key.is_some()),
                ("api_key_env", self.api_key_env.is_some()),
                ("connect_timeout_ms", self.connect_timeout_ms.is_some()),
                ("timeout_ms", self.timeout_ms.is_some()),
                (
                    "rescan_seconds",
                    self.docs.is_none() && self.rescan_seconds.is_some(),
                ),
            ],
            "http" => vec![
                ("index", self.index.is_some()),
                ("docs", self.docs.is_some()),
                ("rescan_seconds", self.rescan_seconds.is_some()),
            ],
            _ => Vec::new(),
        };
        set.into_iter().find(|(_, is_set)| *is_set).map(|(k, _)| k)
    }

    pub(super) fn into_config(self) -> Result<SearchConfig, ConfigError> {
        if let Some(key) = self.misplaced() {
            let means = match self.backend.as_str() {
                "http" => "the embedded backend's (`index` or `docs`)",
                _ if key == "rescan_seconds" => "a watched `docs` folder's",
                _ => "the http backend's",
            };
            return Err(invalid(format!(
                "search.{key} is {means} setting, and search.backend is {:?}: remove it or set \
                 the backend it belongs to",
                self.backend
            )));
        }
        let backend = match (self.backend.as_str(), self.index, self.docs) {
            ("embedded", Some(index), None) => SearchBackendConfig::Index(index),
            ("embedded", None, Some(dir)) => SearchBackendConfig::Docs {
                dir,
                rescan: self
                    .rescan_seconds
                    .map_or(DEFAULT_RESCAN, Duration::from_secs),
            },
            ("embedded", _, _) => {
                return Err(invalid(
                    "search: the embedded backend needs exactly one of `index` (built with \
                     `syft-router index build`) or `docs` (a folder indexed at start)",
                ))
            }
            ("http", _, _) => {
                let url = self
                    .url
                    .ok_or_else(|| invalid("search.url is required for backend http"))?;
                let mut h = HttpSearchConfig::new(url.trim_end_matches('/'));
                h.api_key = super::file::api_key("search", self.api_key, self.api_key_env)?;
                set_ms(&mut h.connect_timeout, self.connect_timeout_ms);
                set_ms(&mut h.timeout, self.timeout_ms);
                SearchBackendConfig::Http(h)
            }
            (other, _, _) => {
                return Err(invalid(format!(
                    "search.backend {other:?}: expected embedded or http"
                )))
            }
        };
        let mut c = SearchConfig::new(backend);
        set(&mut c.default_limit, self.default_limit);
        set(&mut c.max_limit, self.max_limit);
        set(&mut c.max_query_bytes, self.max_query_bytes);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::RouterConfig;

    fn with_search(search: &str) -> Result<RouterConfig, String> {
        let json = format!(r#"{{"name":"r","owner_email":"o@example.com","search":{search}}}"#);
        RouterConfig::from_json_str(&json).map_err(|e| e.to_string())
    }

    /// A setting of the other backend was ignored: `{"backend":"http","url":…,"index":…}`
    /// started, serving the http backend, as if the index were in use.
    #[test]
    fn a_setting_of_the_other_backend_is_refused() {
        for (search, key) in [
            (
                r#"{"backend":"http","url":"http://x","index":"idx"}"#,
                "search.index",
            ),
            (
                r#"{"backend":"http","url":"http://x","docs":"d"}"#,
                "search.docs",
            ),
            (r#"{"index":"idx","url":"http://x"}"#, "search.url"),
            (r#"{"docs":"d","timeout_ms":5}"#, "search.timeout_ms"),
            (
                r#"{"index":"idx","rescan_seconds":5}"#,
                "search.rescan_seconds",
            ),
        ] {
            let err = with_search(search).expect_err(search);
            assert!(err.contains(key), "{search}: {err}");
        }
        for fine in [
            r#"{"backend":"http","url":"http://x","timeout_ms":5}"#,
            r#"{"docs":"d","rescan_seconds":5}"#,
            r#"{"index":"idx"}"#,
        ] {
            with_search(fine).expect(fine);
        }
    }
}
