//! A watched folder: indexed in memory at start, then rescanned periodically; when a document
//! file was added, removed or changed (size or modification time), the folder is re-indexed in
//! the background and the new index replaces the old one in one step. A failed re-index keeps
//! the old index (and is logged); the next change retries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::chunk::{document_files, read_folder};
use super::{DocIndex, EmbeddedSearch, IndexError};

/// Size and modification time of every document file.
type Manifest = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

fn manifest(dir: &Path) -> Result<Manifest, IndexError> {
    document_files(dir)?
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).map_err(|e| IndexError::io(&p, e))?;
            Ok((p, (meta.len(), meta.modified().ok())))
        })
        .collect()
}

fn build(dir: &Path) -> Result<(DocIndex, Manifest), IndexError> {
    // The manifest is taken first: a file changed during the build is seen again next scan.
    let m = manifest(dir)?;
    let index = DocIndex::build(read_folder(dir)?, None)?;
    Ok((index, m))
}

/// What one rescan found.
enum Scan {
    Unchanged,
    Rebuilt(DocIndex),
    /// The folder changed and could not be indexed (a file that does not read): the old index
    /// stays, and the folder is not indexed again until it changes again (it used to be re-read
    /// at every rescan, with a warning each time).
    Failed(IndexError),
}

/// Rescans `dir` against `seen`, which it moves to what it saw.
fn scan(dir: &Path, seen: &mut Manifest) -> Result<Scan, IndexError> {
    let m = manifest(dir)?;
    if m == *seen {
        return Ok(Scan::Unchanged);
    }
    let built = read_folder(dir).and_then(|docs| DocIndex::build(docs, None));
    *seen = m;
    Ok(match built {
        Ok(index) => Scan::Rebuilt(index),
        Err(e) => Scan::Failed(e),
    })
}

/// Indexes `dir` now and starts its rescans (when inside a Tokio runtime).
pub(super) fn watched(dir: &Path, every: Duration) -> Result<Arc<EmbeddedSearch>, IndexError> {
    let (index, m) = build(dir)?;
    tracing::info!(dir = %dir.display(), chunks = index.chunks(), "search folder indexed");
    let search = Arc::new(EmbeddedSearch::new(index));
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(rescan(Arc::downgrade(&search), dir.to_path_buf(), every, m));
    }
    Ok(search)
}

async fn rescan(search: Weak<EmbeddedSearch>, dir: PathBuf, every: Duration, mut seen: Manifest) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if search.strong_count() == 0 {
            return;
        }
        let d = dir.clone();
        let mut next = seen.clone();
        let scanned = tokio::task::spawn_blocking(move || (scan(&d, &mut next), next)).await;
        match scanned {
            Ok((Ok(Scan::Unchanged), _)) => {}
            Ok((Ok(Scan::Rebuilt(index)), m)) => {
                let Some(s) = search.upgrade() else { return };
                tracing::info!(dir = %dir.display(), chunks = index.chunks(), "search folder re-indexed");
                s.replace(index);
                seen = m;
            }
            Ok((Ok(Scan::Failed(e)), m)) => {
                tracing::warn!(dir = %dir.display(), error = %e,
                    "re-indexing failed; keeping the previous index until the folder changes");
                seen = m;
            }
            Ok((Err(e), _)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "rescan failed; keeping the previous index")
            }
            Err(e) => tracing::warn!(error = %e, "re-index task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder that changed into one that does not index fails once, and is not indexed again
    /// until it changes again; then it is.
    #[test]
    fn a_failed_reindex_waits_for_the_next_change() {
        let dir = std::env::temp_dir().join(format!("syft-watch-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a.md"), "ledger capture").expect("write");
        let (_, mut seen) = build(&dir).expect("first index");
        assert!(matches!(scan(&dir, &mut seen), Ok(Scan::Unchanged)));
        std::fs::write(dir.join("bad.txt"), [0xff, 0xfe, 0x00]).expect("write");
        assert!(matches!(scan(&dir, &mut seen), Ok(Scan::Failed(_))));
        assert!(matches!(scan(&dir, &mut seen), Ok(Scan::Unchanged)));
        std::fs::remove_file(dir.join("bad.txt")).expect("remove");
        assert!(matches!(scan(&dir, &mut seen), Ok(Scan::Rebuilt(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
