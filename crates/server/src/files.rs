//! Files that hold what names users or secrets (a SQLite ledger, a usage spool): readable by the
//! process' user only, whatever the umask (0755 directories and 0644 files by default). A
//! directory or file that already exists keeps its mode: the operator's choice.

use std::fs::{DirBuilder, OpenOptions};
use std::path::Path;

/// Creates `dir` and its missing parents, new ones 0700 on Unix.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Options that create a file 0600 on Unix (add `create`, `write`, … as needed).
pub fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}
