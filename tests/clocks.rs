//! Hold expiry across clocks that disagree (a time tester, 2026-12-06): ledger processes whose
//! wall clocks differ from their shared Postgres', run under libfaketime (Debian's `faketime`,
//! which `.ci/run` installs; without it, or without Postgres, each test prints SKIPPED). The money
//! rules: a replica whose clock runs ahead never cancels another's live hold (its stream would be
//! given away uncharged), and a capture the database's clock refuses is answered `HOLD_EXPIRED`
//! at once (not "busy, retry" for the hold's whole life). Every scenario ends with `verify`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use syft_ledger::client::{self, connect_lazy, LedgerClient};
use syft_ledger::store::Store;
use syft_proto::ledger as pb;
use syft_testkit::{free_ports, reason, req, Db, Harness, ADMIN_KEY, USD};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const OWNER: &str = "owner@router.example";
const ALICE: &str = "alice@example.com";

fn have_faketime() -> bool {
    let found = Path::new(LIBFAKETIME).exists();
    if !found {
        println!("SKIPPED: {LIBFAKETIME} not found (Debian package faketime)");
    }
    found
}

/// A `syft-router ledger` process whose wall clock is `offset` (libfaketime's form, e.g. "+600"
/// seconds) off the real one; killed when dropped.
struct FakeClockLedger {
    child: Child,
    url: String,
}

impl FakeClockLedger {
    async fn start(offset: &str, database_url: &str) -> Self {
        let [grpc, http] = free_ports();
        let child = Command::new(env!("CARGO_BIN_EXE_syft-router"))
            .args([
                "ledger",
                "--database-url",
                database_url,
                "--admin-key",
                ADMIN_KEY,
            ])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--sweep-interval", "1s"])
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME", offset)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a ledger");
        let ledger = Self {
            child,
            url: format!("http://127.0.0.1:{grpc}"),
        };
        let mut admin = ledger.client(ADMIN_KEY);
        client::wait_for_ledger(&mut admin)
            .await
            .expect("the ledger under a fake clock starts");
        ledger
    }

    fn client(&self, secret: &str) -> LedgerClient {
        connect_lazy(&self.url, secret).expect("client")
    }
}

impl Drop for FakeClockLedger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hold of one dollar from Alice under `key`, living `ttl_seconds` by the ledger's clock.
fn hold(key: &str, token: &str, ttl_seconds: i64) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        hold_ttl_seconds: Some(ttl_seconds),
        ..req::hold(ALICE, USD, token, key)
    }
}

/// A replica started 10 minutes ahead (the docs allowed replicas an hour apart) sweeps at its
/// start and every second: it cancelled the other replica's live hold at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_runs_ahead_cancels_no_live_hold() {
    if !have_faketime() {
        return;
    }
    let Some(h) = Harness::new(true).await else {
        return;
    };
    let owner = h.account(OWNER, 0).await;
    let alice = h.account(ALICE, 10 * USD).await;
    let token = h.token(&alice, OWNER).await;
    let mut router = h.client(&owner);
    let held = router
        .authorize(hold("live-1", &token, 120))
        .await
        .expect("hold")
        .into_inner();
    let ahead = FakeClockLedger::start("+600", &h.config.database_url).await;
    // Its start-up sweep and two more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = router
        .get_transfer(pb::GetTransferRequest {
            transfer_id: held.id.clone(),
        })
        .await
        .expect("transfer")
        .into_inner();
    assert_eq!(
        now.status(),
        pb::TransferStatus::Pending,
        "a live hold cancelled by a replica ahead: {now:?}"
    );
    let captured = router
        .capture(req::capture_full(&held.id))
        .await
        .expect("captured");
    assert_eq!(captured.into_inner().captured_micros, USD);
    drop(ahead);
    // Verifies, then drops the database (it was left behind).
    h.finish().await;
}

/// A ledger 10 minutes behind its database places a 60-s hold that the database's clock calls
/// expired: its capture is refused `HOLD_EXPIRED` at once. It answered "transfer is busy, retry"
/// (UNAVAILABLE), which a router asks again until the hold's end by the ledger's own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_behind_its_database_says_a_hold_expired_at_once() {
    if !have_faketime() {
        return;
    }
    let Some(db) = Db::fresh(true).await else {
        return;
    };
    let store = Store::connect(&db.url, 2).await.expect("store");
    let behind = FakeClockLedger::start("-600", &db.url).await;
    let mut admin = behind.client(ADMIN_KEY);
    let owner = client::create_account(&mut admin, OWNER, "test")
        .await
        .expect("owner");
    let alice = client::create_account(&mut admin, ALICE, "test")
        .await
        .expect("alice");
    client::deposit(&mut admin, ALICE, 10 * USD, "d1")
        .await
        .expect("deposit");
    let token = client::issue_token(&mut behind.client(&alice), OWNER)
        .await
        .expect("token");
    let mut router = behind.client(&owner);
    let held = router
        .authorize(hold("behind-1", &token, 60))
        .await
        .expect("hold")
        .into_inner();
    let started = Instant::now();
    let refused = router
        .capture(req::capture_full(&held.id))
        .await
        .expect_err("expired by the database's clock");
    assert_eq!(
        (refused.code(), reason(&refused).as_deref()),
        (tonic::Code::FailedPrecondition, Some("HOLD_EXPIRED")),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Nothing was charged; the hold is released.
    router
        .void(pb::VoidRequest {
            transfer_id: held.id,
            reason: "expired".into(),
            usage: None,
        })
        .await
        .expect("void");
    drop(behind);
    syft_testkit::assert_consistent(&store).await;
    db.drop_postgres().await;
}
