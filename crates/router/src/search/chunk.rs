//! Documents and their chunks: reading a folder (`.txt`, `.md`, JSON lines) and cutting text into
//! overlapping chunks of whole words (docs/search.md, "Index building").

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::IndexError;

/// Longest chunk, in characters. A longer word (a URL, base64, text written without spaces) is
/// cut into pieces of this many characters.
pub const CHUNK_CHARS: usize = 800;
/// Characters of whole words repeated from the end of one chunk at the start of the next, so a
/// phrase cut by a boundary is still found in one piece.
pub const CHUNK_OVERLAP_CHARS: usize = 100;

/// One document before chunking.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceDoc {
    /// A file's path relative to the folder, or a JSON line's `id`.
    pub id: String,
    pub content: String,
    pub metadata: Map<String, Value>,
}

/// One indexed chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The document id, plus `#n` when the document has more than one chunk.
    pub id: String,
    pub content: String,
    /// The document's metadata plus `chunk` (its index) and, for files, `source`.
    pub metadata: Map<String, Value>,
}

/// Splits `text` into chunks of at most [`CHUNK_CHARS`] characters of whole words (whitespace
/// collapsed to single spaces), each starting with up to [`CHUNK_OVERLAP_CHARS`] characters of the
/// previous one's last words, as long as the word that ended the previous chunk still fits after
/// them: each chunk holds at least one word the previous one did not.
pub fn chunk_text(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().flat_map(pieces).collect();
    let len = |w: &str| w.chars().count();
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < words.len() {
        let mut end = start;
        let mut used = 0;
        while end < words.len() {
            let add = len(words[end]) + usize::from(end > start);
            if end > start && used + add > CHUNK_CHARS {
                break;
            }
            used += add;
            end += 1;
        }
        chunks.push(words[start..end].join(" "));
        if end == words.len() {
            break;
        }
        // Step back over the last words that fit in the overlap and still leave room for the
        // next new word. (A full overlap before a long word made a run of chunks that were each
        // the previous one less its first word.)
        let room = CHUNK_CHARS.saturating_sub(len(words[end]) + 1);
        let budget = CHUNK_OVERLAP_CHARS.min(room);
        let mut next = end;
        let mut overlap = 0;
        while next > start + 1 {
            let w = len(words[next - 1]) + 1;
            if overlap + w > budget {
                break;
            }
            overlap += w;
            next -= 1;
        }
        start = next;
    }
    chunks
}

/// `word` cut into pieces of at most [`CHUNK_CHARS`] characters (on character boundaries).
fn pieces(word: &str) -> impl Iterator<Item = &str> {
    let mut rest = word;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = rest
            .char_indices()
            .nth(CHUNK_CHARS)
            .map_or(rest.len(), |(i, _)| i);
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// The chunks of one document.
pub fn chunk_doc(doc: SourceDoc) -> Vec<Chunk> {
    let parts = chunk_text(&doc.content);
    let many = parts.len() > 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, content)| {
            let mut metadata = doc.metadata.clone();
            metadata.insert("chunk".into(), Value::from(i));
            Chunk {
                id: if many {
                    format!("{}#{i}", doc.id)
                } else {
                    doc.id.clone()
                },
                content,
                metadata,
            }
        })
        .collect()
}

/// A JSON line of a `.jsonl`/`.json` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDoc {
    id: Value,
    content: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

/// The documents of a folder, recursively, in path order: `.txt` and `.md` files whole (id = the
/// path relative to the folder), `.jsonl` and `.json` files as JSON lines `{id, content,
/// metadata}`. Other files and hidden entries are skipped.
pub fn read_folder(dir: &Path) -> Result<Vec<SourceDoc>, IndexError> {
    let mut docs = Vec::new();
    for path in document_files(dir)? {
        let rel = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            // A subfolder that could not be listed is named with the listing's own error (its
            // permission), not "Is a directory".
            let e = match std::fs::read_dir(&path) {
                Err(listing) if path.is_dir() => listing,
                _ => e,
            };
            IndexError::io(&path, e)
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json") => docs.extend(json_lines(&path, &rel, &text)?),
            _ => {
                let mut metadata = Map::new();
                metadata.insert("source".into(), Value::from(rel.clone()));
                docs.push(SourceDoc {
                    id: rel,
                    content: text,
                    metadata,
                });
            }
        }
    }
    Ok(docs)
}

fn json_lines(path: &Path, rel: &str, text: &str) -> Result<Vec<SourceDoc>, IndexError> {
    let mut docs = Vec::new();
    // A byte-order mark (Windows tools and spreadsheet exports write one) is not JSON: the
    // first line failed with "expected value at line 1 column 1".
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| IndexError::BadLine {
            path: path.display().to_string(),
            line: n + 1,
            message,
        };
        let d: JsonDoc = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let id = match d.id {
            Value::String(s) if !s.is_empty() => s,
            Value::Number(n) => n.to_string(),
            _ => return Err(bad("`id` must be a non-empty string or a number".into())),
        };
        let mut metadata = d.metadata.unwrap_or_default();
        metadata
            .entry("source")
            .or_insert_with(|| Value::from(rel.to_string()));
        docs.push(SourceDoc {
            id,
            content: d.content,
            metadata,
        });
    }
    Ok(docs)
}

/// Document files under `dir`, sorted, skipping hidden names. Links are followed, to files and to
/// folders outside `dir` (a link to a folder inside it is skipped: that folder is walked under its
/// own path, so each is read once and a link loop ends); a file reached by more than one path is
/// listed once, by its path without links when it has one (else the first in order), so its id
/// does not depend on the order a folder is listed in. A dangling link
/// named like a document, or a subfolder that cannot be listed, is listed too: indexing it then
/// fails and says which (it used to make every rescan fail, and a change elsewhere went unseen;
/// a linked folder was skipped without a word).
pub fn document_files(dir: &Path) -> Result<Vec<PathBuf>, IndexError> {
    let mut found = Vec::new();
    let root = std::fs::canonicalize(dir).map_err(|e| IndexError::io(dir, e))?;
    walk(dir, &root, &mut vec![root.clone()], &mut found)?;
    // One path per file: the one that is the file's own place under the folder, else the first.
    found.sort();
    let mut by_file: std::collections::BTreeMap<PathBuf, PathBuf> = Default::default();
    for path in found {
        let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let own = path
            .strip_prefix(dir)
            .is_ok_and(|rel| root.join(rel) == real);
        match by_file.entry(real) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(path);
            }
            std::collections::btree_map::Entry::Occupied(mut e) if own => {
                e.insert(path);
            }
            std::collections::btree_map::Entry::Occupied(_) => {}
        }
    }
    let mut out: Vec<PathBuf> = by_file.into_values().collect();
    out.sort();
    Ok(out)
}

/// Adds the document files under `d` to `out`. `inside` holds the real paths of the folders being
/// walked (`d`'s own last): a linked folder outside `root` that links back to one of them is not
/// entered again.
fn walk(
    d: &Path,
    root: &Path,
    inside: &mut Vec<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<(), IndexError> {
    let entries = match std::fs::read_dir(d) {
        Ok(entries) => entries,
        Err(e) if inside.len() == 1 => return Err(IndexError::io(d, e)),
        Err(_) => {
            out.push(d.to_path_buf());
            return Ok(());
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| IndexError::io(d, e))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            paths.push(entry.path());
        }
    }
    paths.sort();
    for path in paths {
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                let Ok(real) = std::fs::canonicalize(&path) else {
                    continue;
                };
                let linked = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_symlink());
                if inside.contains(&real) || (linked && real.starts_with(root)) {
                    continue;
                }
                inside.push(real);
                walk(&path, root, inside, out)?;
                inside.pop();
            }
            _ if is_document(&path) => out.push(path),
            _ => {}
        }
    }
    Ok(())
}

fn is_document(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("txt" | "md" | "jsonl" | "json")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON lines saved with a byte-order mark (Windows tools, spreadsheet exports) are read.
    #[test]
    fn json_lines_after_a_byte_order_mark_are_read() {
        let text = "\u{feff}{\"id\": \"a\", \"content\": \"ledger\"}\n";
        let docs = json_lines(Path::new("d.jsonl"), "d.jsonl", text).expect("read");
        assert_eq!(docs.len(), 1);
        assert_eq!(
            (docs[0].id.as_str(), docs[0].content.as_str()),
            ("a", "ledger")
        );
    }

    #[test]
    fn chunks_are_bounded_overlapping_and_cover_every_word() {
        let text: String = (0..1000).map(|i| format!("word{i} ")).collect();
        let chunks = chunk_text(&text);
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(c.chars().count() <= CHUNK_CHARS, "{}", c.len());
        }
        for pair in chunks.windows(2) {
            let last_word = pair[0].split(' ').next_back().expect("a word");
            assert!(pair[1].starts_with(pair[1].split(' ').next().expect("word")));
            assert!(
                pair[1].contains(last_word),
                "overlap keeps the boundary word"
            );
        }
        let all: std::collections::HashSet<&str> =
            chunks.iter().flat_map(|c| c.split(' ')).collect();
        assert_eq!(all.len(), 1000);
        assert!(chunk_text("  \n ").is_empty());
        assert_eq!(chunk_text("a  b\nc"), vec!["a b c"]);
    }

    /// A word longer than a chunk (base64, a URL, text without spaces) is cut into pieces on
    /// character boundaries, and the words before it are not repeated chunk after chunk.
    #[test]
    fn long_words_are_cut_and_do_not_repeat_their_neighbours() {
        let words: String = (0..150).map(|i| format!("word{i} ")).collect();
        // 3,000 characters, some of two bytes, no piece like another.
        let long: String = (0..3_000u32)
            .map(|i| match i % 7 {
                0 => 'é',
                _ => char::from(b'a' + u8::try_from(i % 26).unwrap_or(0)),
            })
            .collect();
        let chunks = chunk_text(&format!("{words}{long} tail"));
        for c in &chunks {
            assert!(c.chars().count() <= CHUNK_CHARS, "{}", c.chars().count());
        }
        // 150 short words (about 1,140 characters) need two chunks, the 3,000-character word
        // four pieces; nothing else.
        assert!(chunks.len() <= 7, "{} chunks: {chunks:?}", chunks.len());
        let cut: String = chunks
            .iter()
            .flat_map(|c| c.split(' '))
            .filter(|w| w.contains('é'))
            .collect();
        assert_eq!(
            cut, long,
            "every character of the long word, once, in order"
        );
        assert!(chunks.last().is_some_and(|c| c.ends_with("tail")));
        // Each chunk adds a word the one before did not have.
        for pair in chunks.windows(2) {
            assert!(!pair[0].ends_with(pair[1].as_str()), "{pair:?}");
        }
    }

    #[test]
    fn a_single_chunk_keeps_the_document_id() {
        let doc = SourceDoc {
            id: "a.md".into(),
            content: "short".into(),
            metadata: Map::new(),
        };
        let chunks = chunk_doc(doc);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].id, "a.md");
        assert_eq!(chunks[0].metadata["chunk"], 0);
    }
}
