//! Reading past damage inside a finished segment. A record that cannot be read (a page a host
//! crash did not write back with sync off, a failed sync, a flipped bit) stopped the segment's
//! reading there, and every whole row after it was deleted with the segment unless more than the
//! largest record's worth followed (a real row is a few hundred bytes: the last thousand or more
//! rows of a segment were lost). The shipper now looks for the next readable record and ships on
//! from it; the segment is then kept for an operator (`ship.rs`, `retire_segment`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use prost::Message;
use syft_proto::ledger::Usage;

use super::{fnv1a, MAX_RECORD};

/// The most of a segment searched past damage: a segment of ordinary rows is about 1 MB.
const MAX_SEARCH: u64 = 64 * 1024 * 1024;

/// The row of the record at `at` of `buf` and the record's length, when one is whole there: a
/// length within [`MAX_RECORD`], the payload inside `buf`, its checksum and a `Usage` decoded.
pub(super) fn record_at(buf: &[u8], at: usize) -> Option<(Usage, usize)> {
    let head = buf.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let sum = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD {
        return None;
    }
    let payload = buf.get(at + 8..at + 8 + usize::try_from(len).ok()?)?;
    if fnv1a(payload) != sum {
        return None;
    }
    let usage = Usage::decode(payload).ok()?;
    Some((usage, 8 + payload.len()))
}

/// The offset of the first readable record of segment `path` after an unreadable one at
/// `damaged`, if any. A place counts when its record is followed by another readable one or ends
/// the file, so that stray bytes passing one 32-bit checksum are not taken for a row.
pub(super) fn next_readable(path: &Path, damaged: u64) -> std::io::Result<Option<u64>> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let from = damaged.saturating_add(1);
    if from >= size {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.take(MAX_SEARCH).read_to_end(&mut buf)?;
    let whole = from + buf.len() as u64 == size;
    for at in 0..buf.len() {
        let Some((_, len)) = record_at(&buf, at) else {
            continue;
        };
        let next = at + len;
        if (next == buf.len() && whole) || record_at(&buf, next).is_some() {
            return Ok(Some(from + at as u64));
        }
    }
    Ok(None)
}
