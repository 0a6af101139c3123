//! Who uses a spool directory: the `LOCK` a running router holds (and a starting one waits for),
//! and the `OWNER` whose account records its rows.

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use super::io_err;
use crate::error::RouterError;

/// Waits up to `patience` until no other process holds `dir`'s lock: a router started while the
/// one it replaces still drains its spool (a rolling restart on one host) waits for it, where it
/// used to exit at once. `true` once free (a directory without a `LOCK` is free).
pub(crate) async fn wait_until_free(dir: &Path, patience: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + patience;
    let mut told = false;
    loop {
        let free = match OpenOptions::new().write(true).open(dir.join("LOCK")) {
            // Dropping the file releases the lock taken to test it.
            Ok(lock) => lock.try_lock().is_ok(),
            Err(_) => true,
        };
        if free {
            return true;
        }
        if !told {
            tracing::info!(dir = %dir.display(), patience_s = patience.as_secs(),
                "usage spool in use by another router (draining?): waiting for it");
            told = true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows carry no recipient: the ledger records them as the account of whichever router ships
/// them. So a spool names its owner in `OWNER`, and one still holding rows of another owner
/// refuses to open (they would be recorded as this owner's, and the rows the other had shipped
/// but not yet deleted a second time). An empty spool is taken over.
pub(super) fn claim_owner(dir: &Path, owner: &str, has_rows: bool) -> Result<(), RouterError> {
    if owner.is_empty() {
        return Ok(());
    }
    let path = dir.join("OWNER");
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim() == owner => return Ok(()),
        // A claim cut short by a power loss (written, not yet on disk): it was made on an empty
        // spool, or one of rows naming no owner, so it is made again, as with no file at all.
        Ok(found) if found.trim().is_empty() => {}
        Ok(found) if has_rows => {
            return Err(RouterError::InvalidArgument(format!(
                "usage spool {} holds rows of {}, not of this router's owner {owner}: start that \
                 router on it until it has shipped them, or give this one its own directory",
                dir.display(),
                found.trim()
            )))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot read OWNER", dir, e)),
    }
    syft_server::private_file()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, owner.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| io_err("cannot write OWNER", dir, e))
}

#[cfg(test)]
mod tests {
    use super::claim_owner;

    /// An `OWNER` left empty by a power loss between its write and the disk (a crash reviewer's
    /// finding: the router then refused to open its spool of synced rows) is claimed again.
    #[test]
    fn an_empty_owner_file_is_claimed_again() {
        let dir = syft_testkit::TempDir::new().expect("dir");
        std::fs::write(dir.path().join("OWNER"), "").expect("an empty OWNER");
        claim_owner(dir.path(), "owner@example.com", true).expect("claimed");
        let written = std::fs::read_to_string(dir.path().join("OWNER")).expect("read");
        assert_eq!(written, "owner@example.com");
        let other = claim_owner(dir.path(), "other@example.com", true);
        assert!(other.is_err(), "rows of another owner: {other:?}");
    }
}
