//! The asynchronous hold commit (docs/design.md, "Asynchronous hold commit") under a real Postgres
//! crash: a private cluster (initdb in a temporary directory) is stopped with `pg_ctl stop -m
//! immediate` (every server process quits at once, shared WAL buffers are lost, crash recovery
//! at the next start) right after a hold committed asynchronously.
//!
//! - A hold whose WAL was not flushed vanishes whole: its capture and void are refused
//!   (`NOT_FOUND`), nothing is held or charged, `verify` passes, and a retry with the same key
//!   places a new hold that is charged once.
//! - A hold that was captured survives the crash with its capture: the capture's synchronous
//!   commit flushed the WAL up to and including the hold.
//!
//! The cluster runs with `wal_writer_delay = 10s` and no autovacuum, so nothing but a
//! synchronous commit flushes the hold in the few milliseconds before the crash. Needs `initdb`
//! and `pg_ctl` (on PATH or from `pg_config --bindir`); as root they run as the `postgres` user.
//! Skipped with a `SKIPPED` line otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use syft_error::ErrorCode;
use syft_ledger::store::{
    AccountRow, AuthorizeInput, CaptureAmount, Resolution, ResolveInput, Store, TransferRow,
};
use syft_testkit::{assert_consistent, store_token, USD};

const OWNER: &str = "owner@example.com";
const ALICE: &str = "alice@example.com";

/// A throwaway Postgres cluster of its own, so the test can crash it.
struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// `runuser -u postgres --` when running as root (initdb refuses root).
    as_postgres: bool,
}

impl Cluster {
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `None` (the test is skipped) when the server binaries cannot be found or run.
    fn create() -> Option<Cluster> {
        let bin = server_bindir()?;
        let as_postgres = is_root();
        let dir = tempfile::tempdir().ok()?;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let c = Cluster {
            bin,
            dir,
            port,
            as_postgres,
        };
        let data = c.data();
        let data = data.to_str()?;
        if let Err(e) = c.run(
            "initdb",
            &["-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
        ) {
            syft_testkit::skipped(
                syft_testkit::Need::PostgresCluster,
                format!("initdb failed: {e}"),
            );
            return None;
        }
        c.start().ok()?;
        Some(c)
    }

    fn start(&self) -> Result<(), String> {
        let data = self.data();
        let data = data.to_str().ok_or("path")?;
        let log = self.dir.path().join("log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c wal_writer_delay=10000ms \
             -c autovacuum=off -c checkpoint_timeout=3600 -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                data,
                "-o",
                &opts,
                "-l",
                log.to_str().ok_or("path")?,
                "-w",
                "start",
            ],
        )
    }

    /// Every server process quits at once: what is only in shared memory is lost, and the next
    /// start runs crash recovery from the WAL on disk.
    fn crash(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("path"),
                "-m",
                "immediate",
                "stop",
            ],
        )
        .expect("crash the cluster");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        if let Some(data) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "stop"]);
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn server_bindir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let candidates = from_pg_config.into_iter().chain(
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin")),
    );
    let mut candidates = candidates;
    candidates.find(|dir| has(dir, "initdb") && has(dir, "pg_ctl"))
}

fn has(dir: &Path, tool: &str) -> bool {
    dir.join(tool).is_file()
}

async fn connect(c: &Cluster) -> Arc<Store> {
    Arc::new(Store::connect(&c.url(), 4).await.expect("store"))
}

async fn account(store: &Store, email: &str) -> AccountRow {
    store
        .account_by_email(email)
        .await
        .expect("read")
        .expect("account")
}

async fn hold(store: &Store, owner: &AccountRow, token: &str, key: &str) -> TransferRow {
    store
        .authorize(&AuthorizeInput {
            recipient_id: owner.id,
            recipient_email: &owner.email,
            sender_email: ALICE,
            amount: 2 * USD,
            token,
            app_name: "app",
            app_ep_path: "/chat",
            idempotency_key: key,
            attempt_id: "",
            ttl_micros: 60_000_000,
            budgets: Default::default(),
        })
        .await
        .expect("hold")
}

fn resolution<'a>(id: &'a str, owner: &AccountRow, resolution: Resolution) -> ResolveInput<'a> {
    ResolveInput {
        transfer_id: id,
        recipient_id: Some(owner.id),
        resolution,
        usage: None,
        by_sender: false,
    }
}

fn capture<'a>(id: &'a str, owner: &AccountRow) -> ResolveInput<'a> {
    resolution(id, owner, Resolution::Capture(CaptureAmount::Full))
}

#[tokio::test]
async fn holds_lost_in_a_postgres_crash_are_never_charged() {
    let Some(cluster) = Cluster::create() else {
        syft_testkit::skipped(
            syft_testkit::Need::PostgresCluster,
            "no initdb/pg_ctl to run a private Postgres cluster",
        );
        return;
    };
    let store = connect(&cluster).await;
    let owner = store
        .create_account(OWNER, "", "USD", "h1")
        .await
        .expect("owner");
    let alice = store
        .create_account(ALICE, "", "USD", "h2")
        .await
        .expect("alice");
    store
        .deposit(ALICE, 10 * USD, "welcome")
        .await
        .expect("deposit");
    let token = store_token(&store, &alice, &owner).await;

    // A hold captured before the crash: durable with its capture.
    let kept = hold(&store, &owner, &token, "req-0").await;
    store
        .resolve(&capture(&kept.id, &owner))
        .await
        .expect("capture before the crash");

    // Holds placed (asynchronously committed) right before the crash. Losing the hold is what
    // this test is about; the WAL writer could in principle flush it first (a wake-up in those
    // few milliseconds), so up to three crashes are tried until one loses it.
    let mut lost = None;
    let mut store = store;
    for attempt in 0..3 {
        let key = format!("req-{}", attempt + 1);
        let h = hold(&store, &owner, &token, &key).await;
        cluster.crash();
        store.pool().close().await;
        cluster.start().expect("restart after the crash");
        store = connect(&cluster).await;
        let survived = store.transfer_by_id(&h.id).await.expect("read");
        assert_consistent(&store).await;
        match survived {
            None => {
                eprintln!("crash {}: the hold was lost", attempt + 1);
                lost = Some((h, key));
                break;
            }
            // Flushed before the crash: a durable pending hold, released for the next try.
            Some(t) => {
                eprintln!("crash {}: the hold had been flushed", attempt + 1);
                assert_eq!(t.amount.get(), 2 * USD);
                store
                    .resolve(&resolution(
                        &h.id,
                        &owner,
                        Resolution::Void {
                            reason: "test".into(),
                        },
                    ))
                    .await
                    .expect("void a surviving hold");
            }
        }
    }
    let (lost, key) = lost.expect("three crashes right after a hold never lost it");

    // The capture that kept its hold survived the crash with it.
    let kept = store
        .transfer_by_id(&kept.id)
        .await
        .expect("read")
        .expect("the captured hold survived");
    assert_eq!(kept.captured.get(), 2 * USD);
    let a = account(&store, ALICE).await;
    assert_eq!((a.balance.get(), a.held.get()), (8 * USD, 0));

    // The lost hold: capture and void are refused, nothing is held or charged.
    for r in [
        capture(&lost.id, &owner),
        resolution(
            &lost.id,
            &owner,
            Resolution::Void {
                reason: "cancelled".into(),
            },
        ),
    ] {
        let err = store.resolve(&r).await.expect_err("no such hold");
        assert_eq!(err.error_code(), ErrorCode::NotFound, "{err}");
    }
    let a = account(&store, ALICE).await;
    assert_eq!((a.balance.get(), a.held.get()), (8 * USD, 0));
    assert_consistent(&store).await;

    // The router's retry with the same key places a new hold and is charged once.
    let again = hold(&store, &owner, &token, &key).await;
    assert_ne!(again.id, lost.id);
    store
        .resolve(&capture(&again.id, &owner))
        .await
        .expect("capture of the retry");
    let a = account(&store, ALICE).await;
    assert_eq!((a.balance.get(), a.held.get()), (6 * USD, 0));
    assert_consistent(&store).await;
    store.pool().close().await;
}
