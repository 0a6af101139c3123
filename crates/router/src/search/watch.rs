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
        let current = seen.clone();
        let scan = tokio::task::spawn_blocking(move || match manifest(&d) {
            Ok(m) if m == current => Ok(None),
            Ok(_) => build(&d).map(Some),
            Err(e) => Err(e),
        })
        .await;
        match scan {
            Ok(Ok(None)) => {}
            Ok(Ok(Some((index, m)))) => {
                let Some(s) = search.upgrade() else { return };
                tracing::info!(dir = %dir.display(), chunks = index.chunks(), "search folder re-indexed");
                s.replace(index);
                seen = m;
            }
            Ok(Err(e)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "re-indexing failed; keeping the previous index")
            }
            Err(e) => tracing::warn!(error = %e, "re-index task failed"),
        }
    }
}
