//! Hold expiry across clocks that disagree (a time tester, 2026-12-06): ledger processes whose
//! wall clocks differ from their shared Postgres', run under libfaketime (Debian's `faketime`,
//! which `.ci/run` installs; without it, or without Postgres, each test prints SKIPPED). The money
//! rules: a replica whose clock runs ahead never cancels another's live hold (its stream would be
//! given away uncharged); a ledger stamps and judges holds by its database's clock, whatever its
//! own reads; a router counts a hold's life from the time left its ledger says, so its own clock
//! cuts no stream short. Every scenario ends with `verify`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use syft_ledger::client;
use syft_ledger::store::Store;
use syft_proto::ledger as pb;
use syft_testkit::{
    free_ports, ok, paid, req, wait_http_ok, Db, Harness, LedgerProcess, ADMIN_KEY, USD,
};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const OWNER: &str = "owner@router.example";
const ALICE: &str = "alice@example.com";

fn have_faketime() -> bool {
    let found = Path::new(LIBFAKETIME).exists();
    if !found {
        syft_testkit::skipped(
            syft_testkit::Need::Faketime,
            format!("{LIBFAKETIME} not found (Debian package faketime)"),
        );
    }
    found
}

/// The `syft-router` binary with a wall clock `offset` (libfaketime's form, e.g. "+600" seconds)
/// off the real one and its monotonic clock left real; warnings to the test's stderr.
fn under_fake_clock(offset: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_syft-router"));
    command
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

/// A ledger on Postgres (none, saying why, without libfaketime or Postgres) where Alice pays the
/// owner with a token: the harness, the owner's secret and the token.
async fn paying_alice() -> Option<(Harness, String, String)> {
    if !have_faketime() {
        return None;
    }
    let h = Harness::new(true).await?;
    let (owner, _alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    Some((h, owner, token))
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
    let Some((h, owner, token)) = paying_alice().await else {
        return;
    };
    let mut router = h.client(&owner);
    let held = ok(router.authorize(hold("live-1", &token, 120)).await);
    let ahead = LedgerProcess::start(under_fake_clock("+600"), &h.config.database_url).await;
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
    let captured = ok(router.capture(req::capture_full(&held.id)).await);
    assert_eq!(captured.captured_micros, USD);
    drop(ahead);
    // Verifies, then drops the database (it was left behind).
    h.finish().await;
}

/// Micros since the Unix epoch by this test's clock, which is the database's (one host).
fn real_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A ledger 10 minutes behind its database stamped a 60-s hold by its own clock while the
/// capture's guard also read the database's: the hold was expired when placed, and every paid
/// request failed (and before that, was answered "busy, retry" for the hold's whole life). The
/// ledger now stamps and judges by its database's clock: the hold lives its minute and is
/// captured, and the answer says its time left by that clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_behind_its_database_stamps_holds_by_the_databases_clock() {
    if !have_faketime() {
        return;
    }
    let Some(db) = Db::fresh(true).await else {
        return;
    };
    let store = Store::connect(&db.url, 2).await.expect("store");
    let behind = LedgerProcess::start(under_fake_clock("-600"), &db.url).await;
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
    let held = ok(router.authorize(hold("behind-1", &token, 60)).await);
    let skew = (held.created_at_unix_micros - real_now()).abs();
    assert!(
        skew < 5_000_000,
        "stamped {skew} micros off the database's clock"
    );
    let left = held
        .expires_in_micros
        .expect("a pending hold says its time left");
    assert!((50_000_000..=60_000_000).contains(&left), "{left}");
    let captured = ok(router.capture(req::capture_full(&held.id)).await);
    assert_eq!(captured.captured_micros, USD);
    drop(behind);
    syft_testkit::assert_consistent(&store).await;
    db.drop_postgres().await;
}

/// A router whose clock runs 10 minutes ahead of its ledger's read every hold's expiry as past:
/// each stream ended at once. It now counts the hold's life from the time left the ledger says,
/// on its own monotonic clock: the stream is delivered whole and charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_clock_runs_ahead_delivers_and_charges_a_stream() {
    let Some((h, owner, token)) = paying_alice().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("router.json");
    let price =
        serde_json::json!({"pricing_type": "per_request", "amount": 0.01, "currency": "USD"});
    let config_json = serde_json::json!({
        "name": "ahead",
        "owner_email": OWNER,
        "services": [{"type": "chat", "enabled": true, "pricing": price}],
        "ledger": {"hold_ttl_seconds": 30},
    });
    std::fs::write(&config, config_json.to_string()).expect("config");
    let [grpc, http] = free_ports();
    let mut router = under_fake_clock("+600")
        .arg("router")
        .env("SYFT_ROUTER_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("SYFT_ROUTER_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("SYFT_LEDGER_URL", h.url())
        .env("SYFT_ROUTER_LEDGER_SECRET", &owner)
        .env("SYFT_ROUTER_CONFIG", &config)
        .spawn()
        .expect("start a router");
    let base = format!("http://127.0.0.1:{http}");
    let http_client = reqwest::Client::new();
    wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(10)).await;
    let body = serde_json::json!({
        "model": "echo",
        "stream": true,
        "user": ALICE,
        "messages": [{"role": "user", "content": "count the seconds for me"}],
    });
    let streamed = http_client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "ahead-1")
        .json(&body)
        .send()
        .await
        .expect("stream");
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.expect("the stream's body");
    let _ = router.kill();
    let _ = router.wait();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "cut short:\n{text}"
    );
    assert!(!text.contains("\"error\""), "ended with an error:\n{text}");
    let alice_now = h.balance(ALICE).await;
    assert_eq!(
        (alice_now.balance_micros, alice_now.held_micros),
        (10 * USD - 10_000, 0),
        "charged once, nothing left held"
    );
    h.finish().await;
}

/// The `/metrics` of the ledger at `http`, then the ledger killed.
async fn scrape_and_kill(http: &str, mut ledger: std::process::Child) -> String {
    let scrape = syft_testkit::get_text(&format!("{http}/metrics")).await;
    let _ = ledger.kill();
    let _ = ledger.wait();
    scrape
}

/// The value of one series of a Prometheus text scrape (0 when absent).
fn series(scrape: &str, name_and_labels: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A ledger process under `offset` on `db`, with its HTTP port: (gRPC url, HTTP url, child).
async fn ledger_with_http(offset: &str, db: &str) -> (String, String, std::process::Child) {
    let [grpc, http] = free_ports();
    let child = under_fake_clock(offset)
        .args(["ledger", "--database-url", db, "--admin-key", ADMIN_KEY])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .spawn()
        .expect("start a ledger");
    let url = format!("http://127.0.0.1:{grpc}");
    let mut admin = client::connect_lazy(&url, ADMIN_KEY).expect("client");
    client::wait_for_ledger(&mut admin)
        .await
        .expect("ledger up");
    (url, format!("http://127.0.0.1:{http}"), child)
}

/// The hold metrics decide "this call placed / resolved it" by comparing the row's stamp with
/// the call's start, both by the database's clock on Postgres. The start was read from the
/// ledger process's wall clock (an ops reviewer's finding): a replica 10 s ahead of its database
/// counted no hold authorized or captured, nor the money captured; one behind counted a replay
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_metrics_do_not_depend_on_the_ledgers_wall_clock() {
    let Some((h, owner, token)) = paying_alice().await else {
        return;
    };
    let db = h.config.database_url.clone();
    // 10 s ahead of its database: a new hold and its capture.
    let (url, http, ahead) = ledger_with_http("+10", &db).await;
    let mut router = client::connect_lazy(&url, &owner).expect("client");
    paid(&mut router, hold("ahead-metrics-1", &token, 60)).await;
    let scrape = scrape_and_kill(&http, ahead).await;
    // 10 s behind its database: one hold, authorized twice with its key (a replay).
    let (url, http, behind) = ledger_with_http("-10", &db).await;
    let mut router = client::connect_lazy(&url, &owner).expect("client");
    for _ in 0..2 {
        router
            .authorize(hold("behind-metrics-1", &token, 60))
            .await
            .expect("hold");
    }
    let scrape_behind = scrape_and_kill(&http, behind).await;
    let authorized = r#"syft_ledger_holds_total{event="authorized"}"#;
    let captured = r#"syft_ledger_holds_total{event="captured"}"#;
    let counted = (
        series(&scrape, authorized),
        series(&scrape, captured),
        series(&scrape_behind, authorized),
    );
    h.finish().await;
    assert_eq!(
        counted,
        (1.0, 1.0, 1.0),
        "(authorized, captured) by a ledger 10 s ahead, authorized by one 10 s behind after a \
         replay:\n{scrape}"
    );
}
