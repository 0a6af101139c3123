//! The group `fdatasync` of a synced usage spool (`ledger.usage_spool_sync`, the default): an
//! append returns only once a sync that covers its row returned, and one sync serves every row
//! appended while the previous one ran, like a database's group commit.

use std::fs::File;
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::{written, Inner};

/// The longest an append waits for the sync that covers its row. A healthy disk flushes in well
/// under a millisecond here, and in a few hundred at its worst behind a database's checkpoint
/// (docs/benchmarks.md); a sync running longer is a stalled disk (a network volume gone, a
/// failing device), and the row goes the waiting way instead of holding its free answer.
pub(super) const SYNC_PATIENCE: Duration = Duration::from_secs(2);

/// The group `fdatasync` of a synced spool: appenders wait on `synced`, the syncer task
/// ([`sync_forever`]) publishes it.
pub(super) struct Durable {
    synced: watch::Sender<Synced>,
    /// Wakes the syncer after an append (shared with it, outside `Inner`).
    kick: Arc<Notify>,
    /// Tests: the next round's sync takes this many milliseconds longer (a stalled disk).
    #[cfg(test)]
    pub(super) stall_next_ms: AtomicU64,
    /// Tests: the next round fails as a failed `fdatasync` would (a disk fault cannot be made
    /// on demand).
    #[cfg(test)]
    pub(super) fail_next: std::sync::atomic::AtomicBool,
}

/// Positions are (segment, bytes of whole records), compared in that order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Synced {
    /// Every record up to here is on disk.
    through: (u64, u64),
    /// A sync up to here failed: its rows may be lost whatever later syncs report (the kernel may
    /// have dropped the dirty pages), so their appends fail and their rows go the waiting way.
    failed_through: Option<(u64, u64)>,
    /// When the round running now started (`None` between rounds), so that appends stop waiting
    /// at once for a sync already past [`SYNC_PATIENCE`]. Set without waking the waiters.
    round_since: Option<Instant>,
}

impl Durable {
    pub(super) fn new() -> Self {
        Durable {
            synced: watch::Sender::new(Synced::default()),
            kick: Arc::new(Notify::new()),
            #[cfg(test)]
            stall_next_ms: AtomicU64::new(0),
            #[cfg(test)]
            fail_next: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The syncer's wake-up, for [`sync_forever`].
    pub(super) fn kick(&self) -> Arc<Notify> {
        self.kick.clone()
    }

    /// Waits until the record ending at `at` is on disk; an error when the sync that covered it
    /// failed, when syncs stall (a round running past [`SYNC_PATIENCE`]), or when the spool
    /// closed. A row refused so is still written: the ledger records it once, whichever way
    /// reaches it first.
    pub(super) async fn wait(&self, at: (u64, u64)) -> std::io::Result<()> {
        let stalled = || std::io::Error::other("fdatasync stalled");
        let round_since = self.synced.borrow().round_since;
        if round_since.is_some_and(|since| since.elapsed() >= SYNC_PATIENCE) {
            return Err(stalled());
        }
        self.kick.notify_one();
        let mut synced = self.synced.subscribe();
        let covered =
            synced.wait_for(|s| s.through >= at || s.failed_through.is_some_and(|f| f >= at));
        let seen = *tokio::time::timeout(SYNC_PATIENCE, covered)
            .await
            .map_err(|_| stalled())?
            .map_err(|_| std::io::Error::other("usage spool closed"))?;
        // A failure covering the row wins over a later success (see `Synced`).
        if seen.failed_through.is_some_and(|f| f >= at) {
            return Err(std::io::Error::other("fdatasync failed"));
        }
        Ok(())
    }

    /// Where every record is on disk, for tests.
    #[cfg(test)]
    pub(super) fn through(&self) -> (u64, u64) {
        self.synced.borrow().through
    }
}

/// The syncer of a synced spool: each round makes everything written so far durable with one
/// `fdatasync` of the current segment (after the segments finished since the last round, and the
/// directory when it gained an entry), then publishes the position. Appends made while a round
/// runs wait for the next one, which they all share. Runs until the spool is dropped.
pub(super) async fn sync_forever(spool: Weak<Inner>, kick: Arc<Notify>) {
    loop {
        // The timeout lets the syncer notice a dropped spool.
        if tokio::time::timeout(Duration::from_secs(1), kick.notified())
            .await
            .is_err()
        {
            if spool.strong_count() == 0 {
                return;
            }
            continue;
        }
        let Some(inner) = spool.upgrade() else { return };
        let round = {
            let Ok(mut w) = inner.writer.lock() else {
                // A writer that panicked appends nothing more: fail whoever still waits.
                if let Some(durable) = &inner.durable {
                    durable
                        .synced
                        .send_modify(|s| s.failed_through = Some((u64::MAX, u64::MAX)));
                }
                return;
            };
            let dir = std::mem::take(&mut w.dir_dirty).then(|| inner.dir.clone());
            let retired = std::mem::take(&mut w.retired);
            w.file
                .try_clone()
                .map(|file| (w.seg, w.len, file, retired, dir))
        };
        let Some(durable) = &inner.durable else {
            return;
        };
        #[cfg(test)]
        let stall = Duration::from_millis(durable.stall_next_ms.swap(0, Ordering::SeqCst));
        durable.synced.send_if_modified(|s| {
            s.round_since = Some(Instant::now());
            false
        });
        let result = match round {
            Ok((seg, len, file, retired, dir)) => {
                tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64)> {
                    #[cfg(test)]
                    std::thread::sleep(stall);
                    for f in retired.iter().chain(std::iter::once(&file)) {
                        f.sync_data()?;
                    }
                    if let Some(dir) = dir {
                        File::open(dir)?.sync_all()?;
                    }
                    Ok((seg, len))
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|e| (e, (seg, len)))
            }
            Err(e) => Err((e, written(&inner))),
        };
        #[cfg(test)]
        let result = match durable
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            true => result.and_then(|at| Err((std::io::Error::other("injected fault"), at))),
            false => result,
        };
        match result {
            Ok(at) => durable.synced.send_modify(|s| {
                s.through = s.through.max(at);
                s.round_since = None;
            }),
            Err((e, at)) => {
                tracing::error!(dir = %inner.dir.display(), error = %e,
                    "usage spool: fdatasync failed; these rows are sent the waiting way");
                // Nothing more is appended after rows that may be lost: a new segment starts.
                // Rows appended to this file after the round's snapshot are suspect too: the
                // failed sync wrote their pages back with the rest, and the kernel reports a
                // failure once, so the next round's sync of the same file would succeed over
                // them. They fail with the round, up to where the writer stands now.
                let through = match inner.writer.lock() {
                    Ok(mut w) => {
                        w.broken = true;
                        w.dir_dirty = true;
                        at.max((w.seg, w.len))
                    }
                    Err(_) => (u64::MAX, u64::MAX),
                };
                durable.synced.send_modify(|s| {
                    s.failed_through = s.failed_through.max(Some(through));
                    s.round_since = None;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::SYNC_PATIENCE;
    use crate::usage_spool::tests::{synced_spool, usage};

    /// A stalled disk (a network volume gone) holds a free answer at most [`SYNC_PATIENCE`], then
    /// the row goes the waiting way; while the sync stays stuck, later rows do not wait at all.
    #[tokio::test]
    async fn a_stalled_sync_holds_rows_for_its_patience_only() {
        let (spool, dir) = synced_spool("stall");
        let durable = spool.inner.durable.as_ref().expect("a synced spool");
        spool.append(&usage("before")).await.expect("a synced row");
        let stall = SYNC_PATIENCE + Duration::from_secs(3);
        durable
            .stall_next_ms
            .store(stall.as_millis() as u64, Ordering::SeqCst);
        let started = Instant::now();
        let err = spool.append(&usage("stalled")).await.expect_err("stalled");
        assert!(format!("{err:?}").contains("fdatasync stalled"), "{err:?}");
        let waited = started.elapsed();
        assert!(
            waited >= SYNC_PATIENCE && waited < stall,
            "waited {waited:?}"
        );
        let next = Instant::now();
        spool
            .append(&usage("meanwhile"))
            .await
            .expect_err("still stalled");
        // Not another patience's wait (a bound well under it, for a loaded machine).
        assert!(next.elapsed() < SYNC_PATIENCE / 2, "{:?}", next.elapsed());
        // The disk comes back: rows are synced again. The stall began when the syncer's blocking
        // task started, a little after `started` on a loaded machine, so the first append after
        // it may still meet it: retried for a while.
        tokio::time::sleep(stall - waited + Duration::from_millis(200)).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = spool.append(&usage("after")).await {
            assert!(Instant::now() < deadline, "never synced again: {e:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
