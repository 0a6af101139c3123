//! A router-local durable spool for free requests' usage rows (issue 16), on when
//! `ledger.usage_spool` names a directory.
//!
//! Without it a free answer waits until its row's batch committed in the ledger (`usage_send.rs`),
//! so at high concurrency a free service runs at the speed of the ledger's commits, and rows of
//! answers given while the ledger is down are lost (logged). With it the row is appended to a
//! local file with one `write(2)` and the answer is released once that (and, synced, its flush) is
//! done; a shipper task (`usage_spool/ship.rs`) reads the spool back and sends its rows in
//! `RecordUsageBatch` calls, retrying until the ledger acknowledged them (after their commit), and
//! deletes a file once all of its rows are acknowledged.
//!
//! What it keeps: a row is in the kernel's page cache before its answer leaves, so a router
//! process killed at any moment (kill -9, panic, OOM) loses no row: the next router started on
//! the same directory ships what is left. The ledger inserts usage rows idempotently by their
//! row key (fixed when the row is made), so rows shipped twice (acknowledged, but their file not
//! yet deleted when the router died) are recorded once. What it can lose depends on
//! `ledger.usage_spool_sync`:
//!
//! - on (the default): nothing, host crashes included. An answer is released only after an
//!   `fdatasync` covering its row returned (`usage_spool/sync.rs`). One sync covers every row
//!   appended while the previous one ran (group commit, like the ledger's commits), so under load
//!   one sync serves many rows; a new segment's directory entry is synced before any row in it
//!   counts as durable.
//! - off: rows not yet written back to disk when the *host* crashes or loses power, at most the
//!   last few seconds of the kernel's writeback (`vm.dirty_expire_centisecs`, 30 s by default) of
//!   rows not yet acknowledged by the ledger.
//!
//! Refusals never go through the spool: their rows are written before the refusal is answered,
//! as paid rows are (a refusal costs the ledger nothing else).
//!
//! Layout: `LOCK` (held with `flock` while a router uses the directory, so two routers never share
//! one) and segment files `usage-<n>.spool`, each a sequence of records
//! `[payload length u32 LE][FNV-1a 32 of the payload, u32 LE][Usage, protobuf]`. The writer
//! appends to the newest segment and starts a new one every [`SEGMENT_ROWS`] rows; a started
//! router always starts a new segment, so a torn tail (a host crash mid-write) is only ever at the
//! end of an old segment, where the reader stops.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use syft_proto::ledger::Usage;
use tokio::sync::Notify;

use crate::error::RouterError;
use crate::ledger::Calls;

mod owner;
mod resync;
mod ship;
mod sync;
use owner::claim_owner;
pub(crate) use owner::wait_until_free;
use ship::ship_forever;
use sync::Durable;

/// Rows per segment file: a restarted router re-sends at most this many acknowledged rows (the
/// ledger ignores them), and a file is deleted this often.
const SEGMENT_ROWS: u64 = 4_096;

/// Largest record (a `Usage` is a few hundred bytes): a larger row is sent the waiting way, and a
/// larger length read back means a torn or foreign file. Below [`MAX_READ`], so one read always
/// holds at least one whole record.
const MAX_RECORD: u32 = 256 * 1024;

/// Most bytes read back at once (a thousand rows are ~200 KB); a record cut by this bound is read
/// whole by the next read, from its start.
const MAX_READ: u64 = 512 * 1024;

/// The spool of one router; cheap to clone.
#[derive(Clone)]
pub(crate) struct UsageSpool {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Held (`flock`) for the life of the process; closing it releases the lock.
    _lock: File,
    writer: Mutex<Writer>,
    /// Where the shipper has acknowledged up to: (segment, byte offset).
    shipped: Mutex<(u64, u64)>,
    /// Wakes the shipper after an append (shared with it, outside `Inner`).
    wake: Arc<Notify>,
    /// With `usage_spool_sync`: what the syncer has made durable.
    durable: Option<Durable>,
}

struct Writer {
    seg: u64,
    file: File,
    rows: u64,
    /// Bytes of whole records in `file`: the shipper reads no further.
    len: u64,
    /// A write failed part-way: the next append starts a new segment, so nothing follows the torn
    /// record.
    broken: bool,
    /// Finished segments not yet synced, and whether the directory gained an entry since the last
    /// sync (synced spools only; the syncer takes both).
    retired: Vec<File>,
    dir_dirty: bool,
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("usage-{seg:020}.spool"))
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut segs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("usage-")
            .and_then(|n| n.strip_suffix(".spool"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            segs.push(n);
        }
    }
    segs.sort_unstable();
    Ok(segs)
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn io_err(what: &str, dir: &Path, e: std::io::Error) -> RouterError {
    RouterError::Internal(format!("usage spool {}: {what}: {e}", dir.display()))
}

/// An append that failed, and whether its row is in the spool file all the same (its sync failed
/// or stalled): such a row may still ship, if the disk kept it.
#[derive(Debug)]
pub(crate) struct AppendFailed {
    pub error: RouterError,
    pub written: bool,
}

impl UsageSpool {
    /// Opens (creating) the spool directory, takes its lock, starts a new segment and the shipper
    /// (which first ships what an earlier process left). Must run inside a Tokio runtime.
    /// With `sync`, an append returns only once its row is on disk (see the module docs).
    /// `owner`: the router's `owner_email`, whose account records the rows (empty: not checked).
    pub(crate) fn open(
        dir: &Path,
        owner: &str,
        calls: Calls,
        sync: bool,
    ) -> Result<Self, RouterError> {
        // Readable by the router's user only: rows name users.
        syft_server::create_private_dir(dir).map_err(|e| io_err("cannot create", dir, e))?;
        if sync {
            // The directory may be new: its own entry must survive a host crash too (the syncer
            // flushes the directory's entries, its parent holds the directory's).
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(parent)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("cannot sync its parent directory", dir, e))?;
        }
        let lock = syft_server::private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| io_err("cannot open LOCK", dir, e))?;
        lock.try_lock().map_err(|_| {
            RouterError::InvalidArgument(format!(
                "usage spool {} is in use by another router (each router needs its own directory)",
                dir.display()
            ))
        })?;
        let existing = segments(dir).map_err(|e| io_err("cannot list", dir, e))?;
        let has_rows = existing
            .iter()
            .any(|s| std::fs::metadata(segment_path(dir, *s)).is_ok_and(|m| m.len() > 0));
        claim_owner(dir, owner, has_rows)?;
        let seg = existing.last().map_or(0, |s| s + 1);
        let file = create_segment(dir, seg)?;
        let first = existing.first().copied().unwrap_or(seg);
        if !existing.is_empty() {
            tracing::info!(dir = %dir.display(), segments = existing.len(),
                "usage spool: shipping rows left by an earlier process");
        }
        let wake = Arc::new(Notify::new());
        let durable = sync.then(Durable::new);
        let kick = durable.as_ref().map(Durable::kick);
        let spool = UsageSpool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                _lock: lock,
                writer: Mutex::new(Writer {
                    seg,
                    file,
                    rows: 0,
                    len: 0,
                    broken: false,
                    retired: Vec::new(),
                    dir_dirty: true,
                }),
                shipped: Mutex::new((first, 0)),
                wake: wake.clone(),
                durable,
            }),
        };
        if let Some(kick) = kick {
            tokio::spawn(sync::sync_forever(Arc::downgrade(&spool.inner), kick));
        }
        tokio::spawn(ship_forever(
            Arc::downgrade(&spool.inner),
            wake,
            calls,
            first,
        ));
        Ok(spool)
    }

    /// Appends one row (one `write(2)`); once this returns `Ok` the row survives this process,
    /// and with `usage_spool_sync` the host too.
    pub(crate) async fn append(&self, usage: &Usage) -> Result<(), AppendFailed> {
        let at = self.write(usage).map_err(|error| AppendFailed {
            error,
            written: false,
        })?;
        let Some(durable) = &self.inner.durable else {
            return Ok(());
        };
        durable.wait(at).await.map_err(|e| AppendFailed {
            error: io_err("cannot sync", &self.inner.dir, e),
            written: true,
        })
    }

    /// Writes one record; returns the position just after it.
    fn write(&self, usage: &Usage) -> Result<(u64, u64), RouterError> {
        let payload = usage.encode_to_vec();
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD)
            .ok_or_else(|| RouterError::Internal("usage row too large to spool".into()))?;
        let mut record = Vec::with_capacity(8 + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&fnv1a(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        let dir = &self.inner.dir;
        let mut w = self
            .inner
            .writer
            .lock()
            .map_err(|_| RouterError::Internal("usage spool writer poisoned".into()))?;
        if w.broken || w.rows >= SEGMENT_ROWS {
            let seg = w.seg + 1;
            let old = std::mem::replace(&mut w.file, create_segment(dir, seg)?);
            if self.inner.durable.is_some() {
                w.retired.push(old);
                w.dir_dirty = true;
            }
            w.seg = seg;
            w.rows = 0;
            w.len = 0;
            w.broken = false;
        }
        if let Err(e) = w.file.write_all(&record) {
            w.broken = true;
            drop(w);
            // The next append starts a new segment and retires this one; only the syncer closes
            // retired files, and it runs when an append waits for it, which a failed one does
            // not: while the disk is full every request would leave an open file behind.
            if let Some(durable) = &self.inner.durable {
                durable.kick().notify_one();
            }
            return Err(io_err("cannot append", dir, e));
        }
        w.rows += 1;
        w.len += record.len() as u64;
        let at = (w.seg, w.len);
        drop(w);
        self.inner.wake.notify_one();
        Ok(at)
    }

    /// Whether every row appended so far (and left by earlier processes) is acknowledged.
    pub(crate) fn drained(&self) -> bool {
        let end = written(&self.inner);
        self.inner.shipped.lock().is_ok_and(|s| *s >= end)
    }

    /// Waits until [`UsageSpool::drained`], at most `timeout`; returns whether it is.
    pub(crate) async fn drain(&self, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        while !self.drained() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

fn create_segment(dir: &Path, seg: u64) -> Result<File, RouterError> {
    syft_server::private_file()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, seg))
        .map_err(|e| io_err("cannot create a segment", dir, e))
}

/// Rows read from a segment, and the offset after the last one.
struct ReadBack {
    rows: Vec<Usage>,
    end: u64,
    /// The segment ended in a torn or unreadable record: nothing after `end` is read.
    torn: bool,
}

/// Reads up to `max` records of segment `path` from `from`, not past `limit` (the writer's
/// length for the segment it writes; `None` for a finished segment: to its end).
fn read_rows(path: &Path, from: u64, limit: Option<u64>, max: usize) -> std::io::Result<ReadBack> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let end = limit.map_or(size, |l| l.min(size)).min(from + MAX_READ);
    let mut out = ReadBack {
        rows: Vec::new(),
        end: from,
        torn: false,
    };
    if end <= from {
        return Ok(out);
    }
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity(usize::try_from(end - from).unwrap_or(0).min(1 << 20));
    file.take(end - from).read_to_end(&mut buf)?;
    let mut at = 0usize;
    while out.rows.len() < max && at < buf.len() {
        // A record cut by `MAX_READ` is torn here too; the shipper reads on from `end`, where
        // the next read holds it whole.
        let Some((row, len)) = resync::record_at(&buf, at) else {
            out.torn = true;
            break;
        };
        out.rows.push(row);
        at += len;
        out.end = from + at as u64;
    }
    Ok(out)
}

/// The writer's position: (segment, bytes of whole records).
fn written(inner: &Inner) -> (u64, u64) {
    match inner.writer.lock() {
        Ok(w) => (w.seg, w.len),
        // A poisoned writer appends nothing more; what it wrote is on disk.
        Err(p) => (p.get_ref().seg, p.get_ref().len),
    }
}

#[cfg(test)]
mod tests {
    use super::ship::MAX_SHIP;
    use super::*;

    pub(super) fn usage(id: &str) -> Usage {
        Usage {
            request_id: id.into(),
            app_name: "r".into(),
            status: "success".into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_read_back_and_a_torn_tail_stops_the_reader() {
        let dir = std::env::temp_dir().join(format!("spool-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = segment_path(&dir, 7);
        let mut f = create_segment(&dir, 7).expect("segment");
        for id in ["a", "b", "c"] {
            let p = usage(id).encode_to_vec();
            let mut rec = (p.len() as u32).to_le_bytes().to_vec();
            rec.extend_from_slice(&fnv1a(&p).to_le_bytes());
            rec.extend_from_slice(&p);
            f.write_all(&rec).expect("write");
        }
        let whole = std::fs::metadata(&path).expect("meta").len();
        // Half a record, as a host crash mid-write could leave.
        f.write_all(&[9, 0, 0, 0, 1, 2]).expect("write");
        let r = read_rows(&path, 0, None, 2).expect("read");
        assert_eq!(r.rows.len(), 2);
        assert!(!r.torn);
        let r = read_rows(&path, r.end, None, 10).expect("read");
        assert_eq!(
            r.rows
                .iter()
                .map(|u| u.request_id.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(r.end, whole);
        assert!(r.torn);
        // The writer's length bounds the read: nothing past it, and no torn flag.
        let r = read_rows(&path, 0, Some(whole), 10).expect("read");
        assert_eq!((r.rows.len(), r.end, r.torn), (3, whole, false));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A finished segment is deleted after a torn tail, but kept as `.corrupt` when it stops
    /// reading before records that may still be whole (damage inside, not at the end).
    #[test]
    fn damage_inside_a_segment_keeps_it() {
        let dir = std::env::temp_dir().join(format!("spool-damage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let record = |id: &str, pad: usize| {
            let p = Usage {
                model: "m".repeat(pad),
                ..usage(id)
            }
            .encode_to_vec();
            let mut rec = (p.len() as u32).to_le_bytes().to_vec();
            rec.extend_from_slice(&fnv1a(&p).to_le_bytes());
            rec.extend_from_slice(&p);
            rec
        };
        // Segment 1: a good record, a torn tail. Segment 2: a good record, a damaged one (its
        // checksum), then records filling more than one record's worth.
        let mut f = create_segment(&dir, 1).expect("segment");
        f.write_all(&record("a", 0)).expect("write");
        f.write_all(&[9, 0, 0, 0, 1, 2]).expect("write");
        let mut f = create_segment(&dir, 2).expect("segment");
        f.write_all(&record("a", 0)).expect("write");
        let mut bad = record("b", 0);
        bad[4] ^= 0xff;
        f.write_all(&bad).expect("write");
        for n in 0..3 {
            f.write_all(&record(&format!("c{n}"), 100_000))
                .expect("write");
        }
        for (seg, want) in [(1, "deleted"), (2, "quarantined")] {
            let path = segment_path(&dir, seg);
            let r = read_rows(&path, 0, None, 10).expect("read");
            assert_eq!((r.rows.len(), r.torn), (1, true), "segment {seg}");
            let r = read_rows(&path, r.end, None, 10).expect("read");
            assert!(r.rows.is_empty());
            assert_eq!(
                ship::retire_segment(&path, r.end, r.torn, false),
                want,
                "segment {seg}"
            );
            assert!(!path.exists());
        }
        assert!(segment_path(&dir, 2)
            .with_extension("spool.corrupt")
            .exists());
        assert_eq!(segments(&dir).expect("list"), Vec::<u64>::new());
        let _ = std::fs::remove_dir_all(&dir);
    }

    const OWNER: &str = "owner@example.com";

    /// A spool holding rows names its owner: another owner's router refuses it (its rows would
    /// be recorded as that owner's), its own reopens it, and an empty one is taken over.
    #[tokio::test]
    async fn a_spool_with_rows_opens_only_for_its_owner() {
        let (spool, dir) = synced_spool("owner");
        spool.append(&usage("r1")).await.expect("append");
        drop(spool);
        let settings = crate::LedgerSettings {
            url: "http://127.0.0.1:9".into(),
            ..Default::default()
        };
        let calls = || Calls::connect(&settings).expect("calls");
        let other = UsageSpool::open(&dir, "other@example.com", calls(), true);
        let err = other.err().expect("another owner's router is refused");
        assert!(err.to_string().contains(OWNER), "{err}");
        drop(UsageSpool::open(&dir, OWNER, calls(), true).expect("its own owner"));
        // Emptied (as once every row shipped), the spool is another owner's to take.
        for seg in segments(&dir).expect("list") {
            std::fs::remove_file(segment_path(&dir, seg)).expect("remove");
        }
        drop(UsageSpool::open(&dir, "other@example.com", calls(), true).expect("taken over"));
        let owner = std::fs::read_to_string(dir.join("OWNER")).expect("OWNER");
        assert_eq!(owner, "other@example.com");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A synced spool whose ledger is unreachable (the shipper only retries), in a fresh directory.
    pub(super) fn synced_spool(name: &str) -> (UsageSpool, PathBuf) {
        let dir = std::env::temp_dir().join(format!("spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = crate::LedgerSettings {
            url: "http://127.0.0.1:9".into(),
            ..Default::default()
        };
        let calls = Calls::connect(&settings).expect("calls");
        (
            UsageSpool::open(&dir, OWNER, calls, true).expect("open"),
            dir,
        )
    }

    fn synced_through(spool: &UsageSpool) -> (u64, u64) {
        spool
            .inner
            .durable
            .as_ref()
            .expect("a synced spool")
            .through()
    }

    #[tokio::test]
    async fn a_synced_append_returns_after_the_sync_that_covers_its_row() {
        let (spool, dir) = synced_spool("sync");
        for i in 0..20 {
            spool
                .append(&usage(&format!("r{i}")))
                .await
                .expect("append");
            // Alone, a row is the last one written: the sync must have reached the writer.
            assert_eq!(synced_through(&spool), written(&spool.inner), "row {i}");
        }
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_rows_for_good_and_the_spool_moves_to_a_new_segment() {
        let (spool, dir) = synced_spool("fail");
        let durable = spool.inner.durable.as_ref().expect("a synced spool");
        spool.append(&usage("before")).await.expect("a synced row");
        let first = written(&spool.inner).0;

        durable
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let lost = spool.write(&usage("lost")).expect("written");
        let err = durable.wait(lost).await.expect_err("its sync failed");
        assert!(err.to_string().contains("fdatasync failed"), "{err}");

        // The next row starts a new segment and syncs; the failed row's position stays failed
        // although a later sync now reaches past it (the kernel may have dropped its pages).
        spool.append(&usage("after")).await.expect("a synced row");
        assert_eq!(written(&spool.inner).0, first + 1);
        assert!(synced_through(&spool) > lost);
        durable
            .wait(lost)
            .await
            .expect_err("a failure wins over a later success");
        // Both segments still hold their rows for the shipper (the ledger records each once).
        let rows = |seg| {
            read_rows(&segment_path(&dir, seg), 0, None, 10)
                .expect("read")
                .rows
        };
        let ids = |seg| {
            rows(seg)
                .into_iter()
                .map(|u| u.request_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(first), ["before", "lost"]);
        assert_eq!(ids(first + 1), ["after"]);
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_synced_appends_share_syncs_across_a_new_segment() {
        let (spool, dir) = synced_spool("group");
        let rows = SEGMENT_ROWS as usize + 500;
        let appends = (0..rows).map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move { spool.append(&usage(&format!("g{i}"))).await })
        });
        for a in futures::future::join_all(appends).await {
            a.expect("task").expect("append");
        }
        let (seg, len) = written(&spool.inner);
        assert_eq!(synced_through(&spool), (seg, len));
        // The rows went into two segments, both read back whole.
        let segs = segments(&dir).expect("list");
        assert_eq!(segs.len(), 2, "{segs:?}");
        let mut back = 0;
        for s in segs {
            let mut off = 0;
            loop {
                let r = read_rows(&segment_path(&dir, s), off, None, MAX_SHIP).expect("read");
                assert!(!r.torn);
                if r.rows.is_empty() {
                    break;
                }
                back += r.rows.len();
                off = r.end;
            }
        }
        assert_eq!(back, rows);
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
