//! A watched folder: indexed in memory at start, then rescanned periodically; when a document
//! file was added, removed or changed (size, modification or status-change time) and the folder
//! then held still for a moment (and through the build), it is re-indexed in the background and
//! the new index replaces the old one in one step. A failed re-index keeps the old index (and is
//! logged); the next change retries, and so does a rescan after a growing pause ([`Retry`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::chunk::{document_files, read_folder};
use super::{DocIndex, EmbeddedSearch, IndexError};

/// Size, modification time and status-change time of every document file. The last changes with
/// a file's mode or owner too: a file that did not read, made readable with `chmod`, was never
/// indexed (its size and modification time stay).
type Manifest = BTreeMap<PathBuf, (u64, Option<SystemTime>, (i64, i64))>;

fn manifest(dir: &Path) -> Result<Manifest, IndexError> {
    use std::os::unix::fs::MetadataExt;
    Ok(document_files(dir)?
        .into_iter()
        .map(|p| {
            // One that cannot be read (a dangling link) is listed as such: indexing it fails.
            let meta = std::fs::metadata(&p).ok();
            let entry = meta.map_or((u64::MAX, None, (0, 0)), |m| {
                (m.len(), m.modified().ok(), (m.ctime(), m.ctime_nsec()))
            });
            (p, entry)
        })
        .collect())
}

/// How long a changed folder must hold still before it is indexed again (or one rescan interval,
/// if shorter): a deploy that empties it and copies the new files in (or copies a large file) is
/// not indexed halfway, which swapped in an empty index until the next rescan.
const SETTLE: Duration = Duration::from_secs(2);

fn build(dir: &Path) -> Result<(DocIndex, Manifest), IndexError> {
    // The manifest is taken first: a file changed during the build is seen again next scan.
    let m = manifest(dir)?;
    Ok((index_folder(dir)?, m))
}

/// The folder's index; one with no text is refused: a router does not start on it, and a
/// rescan keeps the previous index (it swapped in an empty one, served as healthy, every search
/// a free `no_results`).
fn index_folder(dir: &Path) -> Result<DocIndex, IndexError> {
    let index = DocIndex::build(read_folder(dir)?, None)?;
    if !index.searchable() {
        return Err(IndexError::NoText {
            path: dir.display().to_string(),
        });
    }
    Ok(index)
}

/// What one rescan found.
enum Scan {
    Unchanged,
    Rebuilt(DocIndex),
    /// The folder changed and could not be indexed (a file that does not read): the old index
    /// stays, and the folder is indexed again when it changes again or its [`Retry`] is due (it
    /// used to be re-read at every rescan, with a warning each time).
    Failed(IndexError),
}

/// How many rescans in a row may find the folder changing during their wait before it is
/// indexed as it is: a folder with a file that changes all the time (a feed) is still indexed.
const UNSETTLED_SCANS: u32 = 3;

/// Rescans `dir` against `seen`, which it moves to what it saw. A folder that changed is looked
/// at again after `wait` and indexed only if it held still meanwhile and during the build; else
/// it is left for the next rescan, up to [`UNSETTLED_SCANS`] times in a row (`unsettled` counts
/// them).
fn scan(
    dir: &Path,
    seen: &mut Manifest,
    unsettled: &mut u32,
    wait: impl FnOnce(),
) -> Result<Scan, IndexError> {
    scan_with(dir, seen, unsettled, wait, index_folder)
}

/// [`scan`], indexing with `index`.
fn scan_with(
    dir: &Path,
    seen: &mut Manifest,
    unsettled: &mut u32,
    wait: impl FnOnce(),
    index: impl FnOnce(&Path) -> Result<DocIndex, IndexError>,
) -> Result<Scan, IndexError> {
    let m = manifest(dir)?;
    if m == *seen {
        *unsettled = 0;
        return Ok(Scan::Unchanged);
    }
    // Whether a folder that changed again is left for the next rescan (counted), or, the
    // rescans in a row used up, indexed as it is.
    let mut put_off = || {
        let left = *unsettled + 1 < UNSETTLED_SCANS;
        *unsettled += u32::from(left);
        left
    };
    wait();
    let later = manifest(dir)?;
    if later != m {
        if put_off() {
            return Ok(Scan::Unchanged);
        }
        tracing::warn!(dir = %dir.display(), "the search folder keeps changing; indexing it as it is");
    }
    let m = later;
    let built = index(dir);
    // Changed while it was read (a deploy that began during the build): the index may hold part
    // of either version, so it is dropped and the folder indexed at a later rescan. (The check
    // before the build alone let such an index be served until the next rescan.)
    if manifest(dir)? != m && put_off() {
        return Ok(Scan::Unchanged);
    }
    *unsettled = 0;
    *seen = m;
    Ok(match built {
        Ok(index) => Scan::Rebuilt(index),
        Err(e) => Scan::Failed(e),
    })
}

/// The longest pause, in rescans, before a failed re-index of an unchanged folder is tried again.
const MAX_RETRY_GAP: u32 = 64;

/// When a folder whose re-index failed is indexed again although its manifest did not change:
/// after 1, 2, 4, … and then every [`MAX_RETRY_GAP`] rescans. A failure can pass without a change
/// a manifest sees (a network file system's I/O error), and the folder then stayed unindexed,
/// the old corpus served, until some file changed.
#[derive(Debug, Default)]
struct Retry {
    gap: u32,
    left: u32,
}

impl Retry {
    fn failed(&mut self) {
        self.gap = (self.gap * 2).clamp(1, MAX_RETRY_GAP);
        self.left = self.gap;
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// Counts one rescan: true when it is to index the folder whatever it finds.
    fn due(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        self.left == 0
    }
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
    let settle = SETTLE.min(every);
    let (mut unsettled, mut retry) = (0, Retry::default());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if search.strong_count() == 0 {
            return;
        }
        if retry.due() {
            // Nothing matches an empty manifest but an empty folder, which is refused anyway.
            seen.clear();
        }
        let d = dir.clone();
        let (mut next, mut waited) = (seen.clone(), unsettled);
        let scanned = tokio::task::spawn_blocking(move || {
            let wait = || std::thread::sleep(settle);
            (scan(&d, &mut next, &mut waited, wait), next, waited)
        })
        .await
        .map(|(scan, m, waited)| {
            unsettled = waited;
            (scan, m)
        });
        match scanned {
            Ok((Ok(Scan::Unchanged), _)) => {}
            Ok((Ok(Scan::Rebuilt(index)), m)) => {
                let Some(s) = search.upgrade() else { return };
                tracing::info!(dir = %dir.display(), chunks = index.chunks(), "search folder re-indexed");
                s.replace(index);
                seen = m;
                retry.succeeded();
            }
            Ok((Ok(Scan::Failed(e)), m)) => {
                retry.failed();
                tracing::warn!(dir = %dir.display(), error = %e, retry_in_rescans = retry.left,
                    "re-indexing failed; keeping the previous index until the folder changes or the retry");
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

    /// A fresh folder holding `a.md`, "ledger capture".
    fn a_folder() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("syft-watch-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a.md"), "ledger capture").expect("write");
        dir
    }

    /// A folder that changed into one that does not index fails once, and is not indexed again
    /// until it changes again; then it is.
    #[test]
    fn a_failed_reindex_waits_for_the_next_change() {
        let dir = a_folder();
        let (_, mut seen) = build(&dir).expect("first index");
        let mut unsettled = 0;
        let mut scan = |seen: &mut Manifest| scan(&dir, seen, &mut unsettled, || ());
        assert!(matches!(scan(&mut seen), Ok(Scan::Unchanged)));
        std::fs::write(dir.join("bad.txt"), [0xff, 0xfe, 0x00]).expect("write");
        assert!(matches!(scan(&mut seen), Ok(Scan::Failed(_))));
        assert!(matches!(scan(&mut seen), Ok(Scan::Unchanged)));
        std::fs::remove_file(dir.join("bad.txt")).expect("remove");
        assert!(matches!(scan(&mut seen), Ok(Scan::Rebuilt(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A folder that changes while it is indexed (a deploy that began during the build) is not
    /// swapped in: the build is dropped and the folder indexed at the next rescan, as it is then.
    #[test]
    fn a_folder_changed_during_its_build_is_indexed_again() {
        let dir = a_folder();
        let (_, mut seen) = build(&dir).expect("first index");
        std::fs::write(dir.join("b.md"), "void").expect("write");
        let mut unsettled = 0;
        let during = |d: &Path| {
            let index = index_folder(d);
            std::fs::write(dir.join("c.md"), "refund").expect("written during the build");
            index
        };
        let first = scan_with(&dir, &mut seen, &mut unsettled, || (), during);
        assert!(matches!(first, Ok(Scan::Unchanged)), "the build is dropped");
        match scan(&dir, &mut seen, &mut unsettled, || ()) {
            Ok(Scan::Rebuilt(index)) => assert_eq!(index.chunks(), 3),
            _ => panic!("the folder is indexed at the next rescan"),
        }
        assert!(matches!(
            scan(&dir, &mut seen, &mut unsettled, || ()),
            Ok(Scan::Unchanged)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file's mode changed (`chmod` on a file that did not read) is a change: its size and
    /// modification time stay, and the folder was never indexed again.
    #[test]
    fn a_changed_mode_is_a_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = a_folder();
        let doc = dir.join("a.md");
        let before = manifest(&dir).expect("manifest");
        // Status-change times are kept in nanoseconds, but some file systems tick coarser.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::set_permissions(&doc, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_ne!(manifest(&dir).expect("manifest"), before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A failed re-index is tried again after 1, 2, 4, … rescans, at most 64 apart, and the
    /// pauses start over after a success.
    #[test]
    fn a_failed_reindex_is_retried_after_growing_pauses() {
        let mut retry = Retry::default();
        let due_after = |retry: &mut Retry| (1..).find(|_| retry.due()).unwrap_or(0);
        let mut gaps = Vec::new();
        for _ in 0..9 {
            retry.failed();
            gaps.push(due_after(&mut retry));
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
        retry.succeeded();
        assert!((0..200).all(|_| !retry.due()), "none due after a success");
        retry.failed();
        assert_eq!(due_after(&mut retry), 1);
    }

    /// A folder with no text is not indexed: refused at start, and a rescan that finds it
    /// emptied keeps the previous index (it swapped in an empty one, served as healthy).
    #[test]
    fn a_folder_with_no_text_is_not_indexed() {
        let dir = std::env::temp_dir().join(format!("syft-watch-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        // Empty; punctuation only; words longer than the analyzer keeps (hashes): chunks
        // without a term (the last two were indexed and served, a search reviewer's finding).
        for text in ["", "--- *** !!! ??? ... ///", &"f".repeat(64)] {
            std::fs::write(dir.join("a.md"), text).expect("write");
            assert!(
                matches!(build(&dir), Err(IndexError::NoText { .. })),
                "{text:?}"
            );
        }
        std::fs::write(dir.join("a.md"), "ledger capture").expect("write");
        let (_, mut seen) = build(&dir).expect("first index");
        std::fs::remove_file(dir.join("a.md")).expect("emptied");
        let emptied = scan(&dir, &mut seen, &mut 0, || ());
        assert!(matches!(
            emptied,
            Ok(Scan::Failed(IndexError::NoText { .. }))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A folder caught between a deploy's two steps (emptied, not yet filled again) is not
    /// indexed: it changed again while the scan waited for it to hold still. One that keeps
    /// changing is indexed as it is on the third rescan in a row.
    #[test]
    fn a_folder_is_indexed_only_once_it_holds_still() {
        let dir = a_folder();
        let doc = dir.join("a.md");
        let (_, mut seen) = build(&dir).expect("first index");
        let mut unsettled = 0;
        std::fs::remove_file(&doc).expect("emptied");
        let refill = || std::fs::write(&doc, "ledger capture, version two").expect("filled again");
        let first = scan(&dir, &mut seen, &mut unsettled, refill);
        assert!(
            matches!(first, Ok(Scan::Unchanged)),
            "the empty folder was not indexed"
        );
        match scan(&dir, &mut seen, &mut unsettled, || ()) {
            Ok(Scan::Rebuilt(index)) => assert_eq!(index.chunks(), 1),
            _ => panic!("the refilled folder is indexed"),
        }
        // A file that changes during every wait.
        let mut version = 2;
        let mut change = || {
            version += 1;
            std::fs::write(&doc, "x".repeat(version)).expect("changed");
        };
        change();
        let mut results = Vec::new();
        for _ in 0..UNSETTLED_SCANS {
            let got = scan(&dir, &mut seen, &mut unsettled, &mut change);
            results.push(matches!(got, Ok(Scan::Rebuilt(_))));
        }
        assert_eq!(results, [false, false, true], "indexed on the third rescan");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Links are followed (a linked folder's documents are indexed, a loop ends), and a dangling
    /// one fails the index once, saying which, instead of failing every rescan.
    #[test]
    fn links_are_followed_and_a_dangling_one_is_named() {
        let root = std::env::temp_dir().join(format!("syft-watch-{}", uuid::Uuid::new_v4()));
        let (dir, other) = (root.join("docs"), root.join("other"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::create_dir_all(&other).expect("dir");
        std::fs::write(dir.join("a.md"), "ledger").expect("write");
        std::fs::write(other.join("b.md"), "capture").expect("write");
        std::os::unix::fs::symlink(&other, dir.join("linked")).expect("link");
        std::os::unix::fs::symlink(&dir, dir.join("loop")).expect("link");
        // A folder reached directly and through a link ("a-link" sorts first) keeps its own path.
        std::fs::create_dir_all(dir.join("z")).expect("dir");
        std::fs::write(dir.join("z/c.md"), "void").expect("write");
        std::os::unix::fs::symlink(dir.join("z"), dir.join("a-link")).expect("link");
        let files = document_files(&dir).expect("files");
        let rel: Vec<_> = files
            .iter()
            .filter_map(|f| f.strip_prefix(&dir).ok())
            .collect();
        let names = ["a.md", "linked/b.md", "z/c.md"].map(Path::new);
        assert_eq!(
            rel, names,
            "each file once, by its own path where it has one"
        );
        let (index, mut seen) = build(&dir).expect("index");
        assert_eq!(index.chunks(), 3);
        std::os::unix::fs::symlink(root.join("gone.md"), dir.join("x.md")).expect("link");
        let mut unsettled = 0;
        let mut scan = |seen: &mut Manifest| scan(&dir, seen, &mut unsettled, || ());
        match scan(&mut seen) {
            Ok(Scan::Failed(e)) => assert!(e.to_string().contains("x.md"), "{e}"),
            _ => panic!("a dangling document fails the index"),
        }
        assert!(matches!(scan(&mut seen), Ok(Scan::Unchanged)));
        let _ = std::fs::remove_dir_all(&root);
    }
}
