//! `syft-router index build DIR --out INDEX`: the embedded search backend's index, built ahead of
//! time (docs/search.md), and the small document set `demo` and `dev` search.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use syft_router_svc::search::{read_folder, DocIndex, SourceDoc};

#[derive(Args, Debug)]
pub struct IndexArgs {
    #[command(subcommand)]
    command: IndexCommand,
}

#[derive(Subcommand, Debug)]
enum IndexCommand {
    /// Index a folder of .txt, .md and JSON-lines (.jsonl/.json: {"id","content","metadata"})
    /// documents; serve it with `search.index = "INDEX"` in the router config.
    Build {
        /// The folder to index (recursively; hidden files are skipped).
        dir: PathBuf,
        /// Where to write the index: a new or empty directory.
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn run(args: IndexArgs) -> anyhow::Result<()> {
    match args.command {
        IndexCommand::Build { dir, out } => {
            let (docs, chunks) = tokio::task::spawn_blocking(move || build(&dir, &out)).await??;
            println!("indexed {docs} documents into {chunks} chunks");
            Ok(())
        }
    }
}

/// Whether `out` (which may not exist yet, nor its parents) is `dir` or below it: its parts
/// walked from the current directory, resolved (links, `..`) while they exist, and taken as
/// written once one does not (a part that does not exist is no link). Only the parent was
/// resolved, so `--out docs/sub/idx` (no `docs/sub` yet) and `docs/a/../b` were let through.
fn inside(out: &Path, dir: &Path) -> bool {
    use std::path::Component;
    let (Ok(dir), Ok(mut at)) = (dir.canonicalize(), std::env::current_dir()) else {
        return false;
    };
    let mut exists = true;
    for part in out.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                at.pop();
            }
            other => at.push(other),
        }
        if exists {
            match at.canonicalize() {
                Ok(real) => at = real,
                Err(_) => exists = false,
            }
        }
    }
    at.starts_with(dir)
}

/// Whether `.building-<pid>` was left by a build that is gone: no such process, or this one
/// (which has not begun building: a build run as a container's first process is always pid 1,
/// so its retry found its own pid running and refused `--out` as not empty for good).
fn stale_build(pid: &str, own: u32) -> bool {
    pid == own.to_string() || !Path::new("/proc").join(pid).exists()
}

fn build(dir: &Path, out: &Path) -> anyhow::Result<(usize, u64)> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    if out.exists() {
        let entries = std::fs::read_dir(out)
            .with_context(|| format!("--out {} is not a directory", out.display()))?;
        // A build killed inside `--out` left its `.building-<pid>` there (and a mount point
        // cannot be removed): the only thing a retry clears, once nothing else is there and
        // that process is gone (a running build's is its own).
        let mut leftovers = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix(".building-").filter(|p| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && entry.path().is_dir()
            });
            match pid {
                Some(pid) if stale_build(pid, std::process::id()) => leftovers.push(entry.path()),
                _ => anyhow::bail!(
                    "--out {} is not empty; remove it or choose a new directory",
                    out.display()
                ),
            }
        }
        for leftover in leftovers {
            std::fs::remove_dir_all(&leftover)
                .with_context(|| format!("removing {}", leftover.display()))?;
        }
    }
    // An index inside its own folder is read back as documents by the next build (its
    // `meta.json` is not JSON lines), which then fails.
    anyhow::ensure!(
        !inside(out, dir),
        "--out {} is inside {}: the next build would read the index as documents; write it \
         elsewhere",
        out.display(),
        dir.display()
    );
    let docs = read_folder(dir)?;
    let n = docs.len();
    // Served, an empty index answers every search with nothing, free: most likely a folder of
    // other file types, or the wrong folder.
    anyhow::ensure!(
        n > 0,
        "{} holds no documents (.txt, .md, or JSON lines in .jsonl/.json; hidden files are \
         skipped): nothing to index",
        dir.display()
    );
    // Built aside and moved into place once complete: tantivy writes its metadata first and
    // commits last, so a build interrupted in `out` itself (a kill, a full disk) left an index
    // that opened fine and held nothing, and a router served it as healthy. A new `out` is built
    // beside it and renamed; an existing (empty) one is built inside it and its files moved up,
    // `meta.json` last: it may be a mount point (a container's volume), which cannot be removed
    // or renamed over, nor reached by a rename from another file system.
    let exists = out.exists();
    let building = if exists {
        out.join(format!(".building-{}", std::process::id()))
    } else {
        let name = out
            .file_name()
            .with_context(|| format!("--out {} names no directory", out.display()))?;
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        parent.join(format!(
            ".{}.building-{}",
            name.to_string_lossy(),
            std::process::id()
        ))
    };
    let _ = std::fs::remove_dir_all(&building);
    let placed = place(docs, dir, &building, out, exists);
    // Whatever failed, nothing is left behind (each retry, under a new pid, left a whole index).
    let _ = std::fs::remove_dir_all(&building);
    let chunks = placed?;
    Ok((n, chunks))
}

/// Builds the index of `docs` in `building` and moves it to `out` (into it when it `exists`).
fn place(
    docs: Vec<SourceDoc>,
    dir: &Path,
    building: &Path,
    out: &Path,
    exists: bool,
) -> anyhow::Result<u64> {
    let n = docs.len();
    let index = DocIndex::build(docs, Some(building))?;
    // Documents without a word in them (punctuation only, words longer than the analyzer keeps)
    // index into nothing, served as healthy: refused as a folder with no documents is (it was
    // built, "indexed 2 documents into 0 chunks").
    anyhow::ensure!(
        index.searchable(),
        "the {n} documents in {} hold no text (no word a search could find): nothing to index",
        dir.display()
    );
    let chunks = index.chunks();
    drop(index);
    let moving = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .with_context(|| format!("moving the index into {}", out.display()))
    };
    if !exists {
        moving(building, out)?;
        return Ok(chunks);
    }
    let mut meta = None;
    for entry in std::fs::read_dir(building)? {
        let entry = entry?;
        if entry.file_name() == "meta.json" {
            meta = Some(entry.path());
        } else {
            moving(&entry.path(), &out.join(entry.file_name()))?;
        }
    }
    let meta = meta.context("the built index has no meta.json")?;
    moving(&meta, &out.join("meta.json"))?;
    Ok(chunks)
}

/// The documents `demo` and `dev` search (`examples/docs/`), embedded so an installed binary
/// needs no checkout.
pub const BUNDLED_DOCS: [(&str, &str); 4] = [
    (
        "two-phase-transfers.md",
        include_str!("../../examples/docs/two-phase-transfers.md"),
    ),
    (
        "delegation-tokens.md",
        include_str!("../../examples/docs/delegation-tokens.md"),
    ),
    ("pricing.md", include_str!("../../examples/docs/pricing.md")),
    (
        "usage-and-verify.md",
        include_str!("../../examples/docs/usage-and-verify.md"),
    ),
];

/// Writes the bundled documents into `dir` (created), leaving files that already exist alone:
/// `dev` keeps a user's edits across restarts.
pub fn write_bundled_docs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in BUNDLED_DOCS {
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build's own pid names a leftover, not a running build: a container's build is pid 1 at
    /// every try. Another live process's is a running build.
    #[test]
    fn a_builds_own_pid_is_a_leftover() {
        let own = std::process::id();
        assert!(stale_build(&own.to_string(), own));
        assert!(!stale_build("1", own), "a live process");
        assert!(stale_build("999999999", own), "no such process");
    }
}
