//! The spool's shipper: reads the spool back in order and sends its rows to the ledger in
//! `RecordUsageBatch` calls until they are acknowledged, then deletes finished segments.

use std::sync::{Arc, Weak};
use std::time::Duration;

use syft_proto::ledger::{RecordUsageBatchRequest, RecordUsageRequest, Usage};
use tokio::sync::Notify;
use tonic::Code;

use super::{read_rows, segment_path, written, Inner};
use crate::ledger::{Calls, Op};
use crate::metrics::SpoolEvent;

/// Rows per `RecordUsageBatch` call: the ledger accepts up to 1,000 (`MAX_USAGE_BATCH`).
pub(super) const MAX_SHIP: usize = 1_000;

/// How long the shipper lets rows gather before a call when fewer than [`MAX_SHIP`] are waiting:
/// no answer waits for it, and larger batches cost the ledger less per row (one commit and one
/// rollup upsert per batch).
const LINGER: Duration = Duration::from_millis(20);

/// Longest wait between two attempts to ship while the ledger refuses or is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The shipper: ships the oldest unacknowledged rows, then deletes finished segments, until the
/// spool is dropped. It holds the spool only between its waits, so dropping the router (in-process)
/// closes the directory's lock at once; what is left ships at the next start.
pub(super) async fn ship_forever(spool: Weak<Inner>, wake: Arc<Notify>, calls: Calls, first: u64) {
    let (mut seg, mut off) = (first, 0u64);
    // The segment being read had a record it could not read, and was read on past it.
    let mut damaged = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(inner) = spool.upgrade() else { return };
        let dir = inner.dir.clone();
        let (wseg, wlen) = written(&inner);
        drop(inner);
        let limit = (seg == wseg).then_some(wlen);
        let path = segment_path(&dir, seg);
        // Read in place, not on a blocking thread: the spool is in the page cache and a read is at
        // most `MAX_READ` bytes (well under a millisecond); blocking threads each grew a malloc
        // arena of their own (a spooled router's peak RSS was 72 MB against 37 MB without).
        let read = match read_rows(&path, off, limit, MAX_SHIP) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && seg < wseg => {
                // A gap in the numbering (a segment deleted by hand): move on.
                seg += 1;
                off = 0;
                continue;
            }
            Err(e) => {
                // Everything after this segment waits for it (its rows go first): counted, so a
                // spool held back by a file it cannot read (permissions, I/O errors) is seen.
                crate::metrics::spool_event(SpoolEvent::SegmentUnreadable);
                tracing::error!(path = %path.display(), error = %e, "usage spool: cannot read");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        if read.rows.is_empty() {
            if seg < wseg {
                if read.torn {
                    // Damage, or a torn tail: whole rows after damage ship from the next record
                    // that can be read (the ledger records a row sent twice once).
                    match super::resync::next_readable(&path, read.end) {
                        Ok(Some(next)) => {
                            tracing::error!(path = %path.display(), offset = read.end, next,
                                "usage spool: unreadable record inside a segment; shipping on \
                                 from the next readable one (rows in between are lost)");
                            damaged = true;
                            off = next;
                            set_shipped(&spool, seg, off);
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e,
                                "usage spool: cannot search past damage");
                        }
                    }
                }
                // A finished segment, all acknowledged (or unreadable past its last good record).
                retire_segment(&path, read.end, read.torn, damaged);
                damaged = false;
                seg += 1;
                off = 0;
                set_shipped(&spool, seg, off);
                continue;
            }
            // Caught up: wait for the next append (the timeout is a safety net, and lets the
            // shipper notice a dropped spool).
            if tokio::time::timeout(Duration::from_secs(1), wake.notified())
                .await
                .is_ok()
            {
                // Let more rows gather, for a larger batch.
                tokio::time::sleep(LINGER).await;
            }
            continue;
        }
        let n = read.rows.len();
        match ship(&calls, read.rows).await {
            Ok(()) => {
                off = read.end;
                set_shipped(&spool, seg, off);
                backoff = Duration::from_millis(50);
                tracing::trace!(rows = n, seg, off, "usage spool: shipped");
                if n < MAX_SHIP && seg == wseg {
                    tokio::time::sleep(LINGER).await;
                }
            }
            Err(e) => {
                crate::metrics::spool_event(SpoolEvent::ShipFailed);
                // The router's own credential refused, or its address locked: each try would be
                // a wrong credential counted against this machine's address (20 in 5 minutes
                // lock every router and client on it), so they wait as the owner check does.
                let wait = if refuses_us(&e) {
                    crate::health::REJECTED_RECHECK
                } else {
                    backoff
                };
                tracing::warn!(rows = n, error = %e, retry_in = ?wait,
                    "usage spool: the ledger did not take the rows; they stay spooled");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Deletes a finished segment whose rows were all acknowledged, unless it was `damaged` (read on
/// past a record it could not read: `resync.rs`) or stopped reading before its end at more than
/// one record's worth: a torn tail (a host crash mid-write) is at most one record, but damage
/// inside (a page a crash did not write back, a failed sync, a flipped bit) may have held rows.
/// Such a segment is kept as `<name>.corrupt` for an operator (no longer shipped: its readable
/// rows were) and counted, rather than deleted. Returns what was done: `deleted`,
/// `quarantined`, or `kept` (neither worked).
pub(super) fn retire_segment(
    path: &std::path::Path,
    end: u64,
    torn: bool,
    damaged: bool,
) -> &'static str {
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    if damaged || (torn && size.saturating_sub(end) > u64::from(super::MAX_RECORD) + 8) {
        let kept = path.with_extension("spool.corrupt");
        crate::metrics::spool_event(SpoolEvent::SegmentQuarantined);
        tracing::error!(path = %path.display(), offset = end, size, kept = %kept.display(),
            "usage spool: unreadable record inside a segment; the rows it held are lost: kept for \
             inspection");
        return match std::fs::rename(path, &kept) {
            Ok(()) => "quarantined",
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "usage spool: cannot rename");
                "kept"
            }
        };
    }
    if torn {
        tracing::warn!(path = %path.display(), offset = end,
            "usage spool: torn record at the end of a segment (host crash?); skipped");
    }
    match std::fs::remove_file(path) {
        Ok(()) => "deleted",
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "usage spool: cannot delete");
            "kept"
        }
    }
}

fn set_shipped(spool: &Weak<Inner>, seg: u64, off: u64) {
    if let Some(inner) = spool.upgrade() {
        if let Ok(mut s) = inner.shipped.lock() {
            *s = (seg, off);
        }
    }
}

/// Sends rows until the ledger acknowledged every one (it answers after their commit). A batch
/// the ledger refuses as invalid, or a ledger without the batch call, is sent row by row; a row
/// refused as invalid on its own can never be recorded and is dropped (logged).
/// Whether the ledger refused the router itself: its credential, or its address.
fn refuses_us(s: &tonic::Status) -> bool {
    s.code() == Code::Unauthenticated
        || syft_error::reason_of(s).as_deref() == Some(syft_error::Reason::AuthLocked.as_str())
}

async fn ship(calls: &Calls, rows: Vec<Usage>) -> Result<(), tonic::Status> {
    let msg = RecordUsageBatchRequest {
        usages: rows.clone(),
    };
    let sent = calls
        .call(Op::RecordUsage, None, msg, |mut c, r| async move {
            c.record_usage_batch(r).await
        })
        .await;
    match sent {
        Ok(_) => return Ok(()),
        Err(s) if matches!(s.code(), Code::Unimplemented | Code::InvalidArgument) => {
            tracing::debug!(code = ?s.code(), "usage spool: batch refused, sending row by row");
        }
        Err(s) => return Err(s),
    }
    for usage in rows {
        let request_id = usage.request_id.clone();
        let msg = RecordUsageRequest { usage: Some(usage) };
        let sent = calls
            .call(Op::RecordUsage, None, msg, |mut c, r| async move {
                c.record_usage(r).await
            })
            .await;
        match sent {
            Ok(_) => {}
            Err(s) if s.code() == Code::InvalidArgument => {
                crate::metrics::spool_event(SpoolEvent::RowDropped);
                tracing::error!(request_id = %request_id, error = %s.message(),
                    "usage spool: the ledger refuses this row; dropped");
            }
            // The rows before it are recorded; re-sending them later is harmless.
            Err(s) => return Err(s),
        }
    }
    Ok(())
}
