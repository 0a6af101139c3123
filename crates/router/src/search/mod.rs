//! Search backends of the `search` service: the embedded tantivy index (a prebuilt index
//! directory, or a watched folder indexed in memory) and an `http` upstream that speaks the
//! syft-llm-router `/search` JSON shape. The paid flow around them is in `service::search`.

pub mod chunk;
mod http;
pub mod index;
mod watch;

use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};
use thiserror::Error;

pub use chunk::{read_folder, SourceDoc, CHUNK_CHARS, CHUNK_OVERLAP_CHARS};
pub use http::HttpSearch;
pub use index::DocIndex;

use crate::config::{SearchBackendConfig, SearchConfig};
use crate::error::RouterError;
use crate::upstream::UpstreamError;

/// Why an index could not be built or opened.
#[derive(Debug, Error)]
pub enum IndexError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message} (expected {{\"id\", \"content\", \"metadata\"}})")]
    BadLine {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot open index {path}: {message}")]
    Open { path: String, message: String },
    #[error("index: {0}")]
    Index(String),
    /// Documents, but not a word in them: served, the index answers every search with nothing,
    /// free (most likely the wrong folder, or files emptied by a deploy).
    #[error("{path} holds no text to index (no word a search could find)")]
    NoText { path: String },
}

impl IndexError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// One search, validated.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub query: String,
    /// 1..=`search.max_limit`.
    pub limit: u32,
    /// 0..=1; results scoring below are dropped.
    pub similarity_threshold: f32,
    pub include_metadata: bool,
    /// Forwarded to an `http` upstream (may be empty).
    pub user_email: String,
}

/// One result.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub id: String,
    /// 0..=1, higher is better.
    pub score: f32,
    pub content: String,
    /// Present when asked for and known.
    pub metadata: Option<Map<String, Value>>,
}

/// The configured search backend. Cheap to clone.
#[derive(Clone)]
pub enum SearchBackend {
    Embedded(Arc<EmbeddedSearch>),
    Http(HttpSearch),
}

impl SearchBackend {
    /// Opens (or, for a watched folder, builds) the index, or prepares the HTTP client. A watched
    /// folder is rescanned by a task that ends when the backend is dropped.
    pub fn from_config(config: &SearchConfig) -> Result<Self, RouterError> {
        let setup = |e: IndexError| RouterError::InvalidArgument(format!("search: {e}"));
        Ok(match &config.backend {
            SearchBackendConfig::Index(dir) => {
                let index = DocIndex::open(dir).map_err(setup)?;
                // As a watched folder without a word is (an index built before `index build`
                // refused one, or by other means, was served as healthy and found nothing).
                if !index.searchable() {
                    return Err(setup(IndexError::NoText {
                        path: dir.display().to_string(),
                    }));
                }
                SearchBackend::Embedded(Arc::new(EmbeddedSearch::new(index)))
            }
            SearchBackendConfig::Docs { dir, rescan } => {
                let search = watch::watched(dir, *rescan).map_err(setup)?;
                SearchBackend::Embedded(search)
            }
            SearchBackendConfig::Http(h) => SearchBackend::Http(HttpSearch::new(h.clone())?),
        })
    }

    /// `provider_info.provider` and the usage rows' `model`: `embedded` or `http`.
    pub fn provider(&self) -> &'static str {
        match self {
            SearchBackend::Embedded(_) => "embedded",
            SearchBackend::Http(_) => "http",
        }
    }

    /// Runs one search. The result respects the query's limit and threshold whatever the
    /// backend answered.
    pub async fn search(&self, q: &SearchQuery) -> Result<Vec<SearchHit>, UpstreamError> {
        let mut hits = match self {
            SearchBackend::Embedded(e) => {
                let index = e.current();
                let q = q.clone();
                tokio::task::spawn_blocking(move || {
                    index.search(
                        &q.query,
                        q.limit as usize,
                        q.similarity_threshold,
                        q.include_metadata,
                    )
                })
                .await
                .map_err(|e| UpstreamError::Unreachable(format!("search task: {e}")))?
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))?
            }
            SearchBackend::Http(h) => h.search(q).await?,
        };
        // Best first (a stable sort: ties keep the backend's order), so `limit`, and the answer's
        // size cap after it, keep the best results: an HTTP backend may answer in any order, and
        // its worst results were kept and charged for.
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.retain(|h| h.score >= q.similarity_threshold);
        hits.truncate(q.limit as usize);
        if !q.include_metadata {
            for h in &mut hits {
                h.metadata = None;
            }
        }
        Ok(hits)
    }
}

/// The embedded index; swapped whole when a watched folder is re-indexed, so a search always
/// sees one complete index.
pub struct EmbeddedSearch {
    current: RwLock<Arc<DocIndex>>,
}

impl EmbeddedSearch {
    pub fn new(index: DocIndex) -> Self {
        EmbeddedSearch {
            current: RwLock::new(Arc::new(index)),
        }
    }

    /// The index searches use now.
    pub fn current(&self) -> Arc<DocIndex> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, index: DocIndex) {
        let index = Arc::new(index);
        match self.current.write() {
            Ok(mut g) => *g = index,
            Err(poisoned) => *poisoned.into_inner() = index,
        }
    }
}
