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
        .and_then(|mut f| std::io::Write::write_all(&mut f, owner.as_bytes()))
        .map_err(|e| io_err("cannot write OWNER", dir, e))
}
