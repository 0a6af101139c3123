//! The embedded full-text index (tantivy): building it from chunks, opening it, and BM25 search
//! with scores normalised to 0–1 (docs/search.md, "Scoring").

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};
use tantivy::collector::TopDocs;
use tantivy::directory::error::{DeleteError, LockError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    Directory, DirectoryLock, FileHandle, Lock, MmapDirectory, WatchCallback, WatchHandle, WritePtr,
};
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, Value as _, STORED, STRING, TEXT};
use tantivy::{doc, Index, IndexReader, ReloadPolicy, TantivyDocument, Term};

use super::chunk::{chunk_doc, SourceDoc};
use super::{IndexError, SearchHit};

/// tantivy's BM25 `k1`: a term's score tends to `idf × (1 + k1)` as its frequency grows.
const BM25_K1: f32 = 1.2;

/// Query terms beyond this many distinct ones are ignored (a query is at most a few KiB).
const MAX_QUERY_TERMS: usize = 64;

/// Memory the index writer may use before it flushes a segment.
const WRITER_MEMORY: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    content: Field,
    metadata: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let fields = Fields {
        id: b.add_text_field("id", STRING | STORED),
        content: b.add_text_field("content", TEXT | STORED),
        // JSON text, only stored (never searched).
        metadata: b.add_text_field("metadata", STORED),
    };
    (b.build(), fields)
}

fn tantivy_err(e: tantivy::TantivyError) -> IndexError {
    IndexError::Index(e.to_string())
}

/// An open index, ready to search.
pub struct DocIndex {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    chunks: u64,
}

impl DocIndex {
    /// Chunks and indexes `docs`, in memory (`dir = None`) or in `dir` (created; must be empty
    /// or absent).
    pub fn build(
        docs: impl IntoIterator<Item = SourceDoc>,
        dir: Option<&Path>,
    ) -> Result<Self, IndexError> {
        let (schema, fields) = schema();
        let index = match dir {
            None => Index::create_in_ram(schema),
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| IndexError::io(d, e))?;
                Index::create_in_dir(d, schema).map_err(tantivy_err)?
            }
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4);
        let mut writer = index
            .writer_with_num_threads::<TantivyDocument>(threads, WRITER_MEMORY * threads)
            .map_err(tantivy_err)?;
        for d in docs {
            for c in chunk_doc(d) {
                let metadata = Value::Object(c.metadata).to_string();
                writer
                    .add_document(doc!(
                        fields.id => c.id,
                        fields.content => c.content,
                        fields.metadata => metadata,
                    ))
                    .map_err(tantivy_err)?;
            }
        }
        writer.commit().map_err(tantivy_err)?;
        writer.wait_merging_threads().map_err(tantivy_err)?;
        Self::ready(index, fields)
    }

    /// Opens an index built by [`DocIndex::build`] (`syft-router index build`), read-only: it
    /// may sit on a read-only mount or in a folder the router cannot write to.
    pub fn open(dir: &Path) -> Result<Self, IndexError> {
        let open_err = |message: String| IndexError::Open {
            path: dir.display().to_string(),
            message,
        };
        let files = MmapDirectory::open(dir).map_err(|e| open_err(e.to_string()))?;
        let index = Index::open(ReadOnly(files)).map_err(|e| open_err(e.to_string()))?;
        let (expected, _) = schema();
        let schema = index.schema();
        let field = |name: &str| {
            schema
                .get_field(name)
                .map_err(|_| open_err(format!("not a syft-router index (no `{name}` field)")))
        };
        let fields = Fields {
            id: field("id")?,
            content: field("content")?,
            metadata: field("metadata")?,
        };
        if schema.num_fields() != expected.num_fields() {
            return Err(open_err(
                "not a syft-router index (unexpected fields)".into(),
            ));
        }
        Self::ready(index, fields)
    }

    fn ready(index: Index, fields: Fields) -> Result<Self, IndexError> {
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(tantivy_err)?;
        let chunks = reader.searcher().num_docs();
        Ok(DocIndex {
            index,
            reader,
            fields,
            chunks,
        })
    }

    /// Chunks in the index.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Whether any word can be found. Chunks of punctuation only, or of words longer than the
    /// analyzer keeps (hashes, base64), index into no term: every search would find nothing.
    pub fn searchable(&self) -> bool {
        let searcher = self.reader.searcher();
        searcher.segment_readers().iter().any(|segment| {
            segment
                .inverted_index(self.fields.content)
                .is_ok_and(|terms| terms.terms().num_terms() > 0)
        })
    }

    /// The best `limit` chunks for `query` with a normalised score of at least `threshold`.
    ///
    /// Every query word is a BM25 term (no query syntax, so user text cannot form operators).
    /// A chunk's BM25 score is divided by the query's largest possible score, `Σ idf(t) × (1 +
    /// k1)` over its distinct terms that occur in the index: 1 would mean every such term occurs
    /// very often in a very short chunk, a term a chunk lacks adds nothing to its score, a term no
    /// chunk has is left out, and the score of one chunk does not depend on what else matched
    /// (unlike dividing by the top score).
    pub fn search(
        &self,
        query: &str,
        limit: usize,
        threshold: f32,
        include_metadata: bool,
    ) -> Result<Vec<SearchHit>, IndexError> {
        let searcher = self.reader.searcher();
        let mut analyzer = self
            .index
            .tokenizer_for_field(self.fields.content)
            .map_err(tantivy_err)?;
        let mut words = BTreeSet::new();
        let mut stream = analyzer.token_stream(query);
        while stream.advance() && words.len() < MAX_QUERY_TERMS {
            words.insert(stream.token().text.clone());
        }
        if words.is_empty() || limit == 0 || self.chunks == 0 {
            return Ok(Vec::new());
        }
        let total: u64 = searcher
            .segment_readers()
            .iter()
            .map(|r| u64::from(r.max_doc()))
            .sum();
        let mut best = 0.0f32;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::with_capacity(words.len());
        for w in &words {
            let term = Term::from_field_text(self.fields.content, w);
            let df = searcher.doc_freq(&term).map_err(tantivy_err)?.min(total);
            // A word no chunk contains (a typo) can match nothing anywhere: counted, it lowered
            // every score, and a threshold then emptied the answer.
            if df > 0 {
                best += idf(df, total) * (1.0 + BM25_K1);
            }
            clauses.push((
                Occur::Should,
                Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)),
            ));
        }
        let top = searcher
            // tantivy sizes its collector by the limit, whatever the index holds: a large
            // configured `max_limit` must not allocate more than there are chunks.
            .search(
                &BooleanQuery::new(clauses),
                &TopDocs::with_limit(limit.min(usize::try_from(self.chunks).unwrap_or(usize::MAX))),
            )
            .map_err(tantivy_err)?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let score = if best > 0.0 {
                (score / best).clamp(0.0, 1.0)
            } else {
                0.0
            };
            if score < threshold {
                // Sorted by score: nothing further qualifies.
                break;
            }
            let d: TantivyDocument = searcher.doc(addr).map_err(tantivy_err)?;
            let text = |f: Field| {
                d.get_first(f)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let metadata = if include_metadata {
                serde_json::from_str::<Map<String, Value>>(&text(self.fields.metadata)).ok()
            } else {
                None
            };
            hits.push(SearchHit {
                id: text(self.fields.id),
                score,
                content: text(self.fields.content),
                metadata,
            });
        }
        Ok(hits)
    }
}

/// A built index's folder, read and never written. tantivy's reader takes a lock file while it
/// opens segments (so that a writer's clean-up does not delete them meanwhile), and creating that
/// file failed on a read-only mount although docs/search.md promised the index is opened
/// read-only. Nothing writes to a served index, so there is nothing to lock against.
#[derive(Debug, Clone)]
struct ReadOnly(MmapDirectory);

fn read_only(path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("the index is opened read-only: {}", path.display()),
    )
}

impl Directory for ReadOnly {
    fn get_file_handle(&self, path: &Path) -> Result<Arc<dyn FileHandle>, OpenReadError> {
        self.0.get_file_handle(path)
    }

    fn delete(&self, path: &Path) -> Result<(), DeleteError> {
        Err(DeleteError::IoError {
            io_error: Arc::new(read_only(path)),
            filepath: path.to_path_buf(),
        })
    }

    fn exists(&self, path: &Path) -> Result<bool, OpenReadError> {
        self.0.exists(path)
    }

    fn open_write(&self, path: &Path) -> Result<WritePtr, OpenWriteError> {
        Err(OpenWriteError::IoError {
            io_error: Arc::new(read_only(path)),
            filepath: path.to_path_buf(),
        })
    }

    fn atomic_read(&self, path: &Path) -> Result<Vec<u8>, OpenReadError> {
        self.0.atomic_read(path)
    }

    fn atomic_write(&self, path: &Path, _data: &[u8]) -> std::io::Result<()> {
        Err(read_only(path))
    }

    fn sync_directory(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn acquire_lock(&self, _lock: &Lock) -> Result<DirectoryLock, LockError> {
        Ok(DirectoryLock::from(Box::new(())))
    }

    fn watch(&self, callback: WatchCallback) -> tantivy::Result<WatchHandle> {
        self.0.watch(callback)
    }
}

/// tantivy's BM25 idf.
fn idf(doc_freq: u64, doc_count: u64) -> f32 {
    let x = ((doc_count - doc_freq) as f32 + 0.5) / (doc_freq as f32 + 0.5);
    (1.0 + x).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, content: &str) -> SourceDoc {
        SourceDoc {
            id: id.into(),
            content: content.into(),
            metadata: Map::new(),
        }
    }

    #[test]
    fn scores_are_normalised_and_thresholded() {
        let idx = DocIndex::build(
            [
                doc("a", "the ledger holds money in two phases"),
                doc("b", "routers sell chat completions"),
                doc("c", "ledger ledger ledger"),
            ],
            None,
        )
        .expect("build");
        assert_eq!(idx.chunks(), 3);
        let hits = idx.search("ledger phases", 10, 0.0, true).expect("search");
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].id, "a", "both terms beat one repeated term");
        for h in &hits {
            assert!(h.score > 0.0 && h.score <= 1.0, "{}", h.score);
            assert_eq!(
                h.metadata.as_ref().map(|m| m["chunk"].clone()),
                Some(0.into())
            );
        }
        let strict = idx
            .search("ledger phases", 10, hits[0].score, false)
            .expect("search");
        assert_eq!(strict.len(), 1);
        assert!(strict[0].metadata.is_none());
        assert!(idx
            .search("nothing-matches", 10, 0.0, true)
            .expect("s")
            .is_empty());
        assert!(idx.search("!!! ???", 10, 0.0, true).expect("s").is_empty());
        // A word no chunk has (a typo) changes no score.
        let typo = idx.search("ledger phases hodl", 10, 0.0, true).expect("s");
        let scores = |h: &[SearchHit]| h.iter().map(|h| h.score).collect::<Vec<_>>();
        assert_eq!(scores(&typo), scores(&hits));
        // Query syntax is not interpreted.
        assert_eq!(
            idx.search("ledger AND -chat\"", 10, 0.0, true)
                .expect("s")
                .len(),
            3
        );
    }

    /// An index the router cannot write to opens and answers: here its reader's lock file cannot
    /// be created (a folder stands in its place, which no user can open for writing, root
    /// included), as on a read-only mount.
    #[test]
    fn an_index_that_cannot_be_written_opens() {
        let dir = std::env::temp_dir().join(format!("syft-index-{}", uuid::Uuid::new_v4()));
        DocIndex::build([doc("x", "persisted words")], Some(&dir)).expect("build");
        let lock = dir.join(".tantivy-meta.lock");
        let _ = std::fs::remove_file(&lock);
        std::fs::create_dir(&lock).expect("a folder where the lock file would go");
        let opened = DocIndex::open(&dir);
        let found = opened.map(|idx| idx.search("persisted", 5, 0.1, true));
        std::fs::remove_dir_all(&dir).ok();
        let hits = found.expect("opened read-only").expect("search");
        assert_eq!(hits[0].id, "x");
    }

    #[test]
    fn an_index_on_disk_reopens() {
        let dir = std::env::temp_dir().join(format!("syft-index-{}", uuid::Uuid::new_v4()));
        DocIndex::build([doc("x", "persisted words")], Some(&dir)).expect("build");
        let idx = DocIndex::open(&dir).expect("open");
        assert_eq!(idx.search("persisted", 5, 0.1, true).expect("s")[0].id, "x");
        std::fs::remove_dir_all(&dir).ok();
        assert!(DocIndex::open(&dir).is_err());
    }
}
