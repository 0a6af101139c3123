//! The binary as people use it: `demo`, client commands with `--json`, and `ledger verify`.

use std::process::Command;
use std::time::Duration;

use syft_testkit::{closed_url, wait_http_ok, Harness, ADMIN_KEY};

fn syft_router() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_syft-router"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// `text` holds every one of `parts` (the whole text is shown otherwise).
fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
}

fn run(cmd: &mut Command) -> String {
    syft_testkit::succeeded(&cmd.output().expect("run syft-router"), "syft-router")
}

#[test]
fn demo_runs_a_paid_scenario_and_exits_zero() {
    // As a user runs it: no RUST_LOG, so only warnings may be logged around the story.
    let output = syft_router()
        .env_remove("RUST_LOG")
        .arg("demo")
        .output()
        .expect("run demo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("INFO") && !stderr.contains("WARN"),
        "demo logged around its story:\n{stderr}"
    );
    let out = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(out.contains("verify: ok"), "{out}");
    assert!(
        out.contains("refused: payment required: this service costs"),
        "{out}"
    );
    assert!(out.contains("upstream_error"), "{out}");
    // Refusals in words, not gRPC code names.
    assert!(!out.contains("FailedPrecondition"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_and_verify() {
    let h = Harness::new(false).await.unwrap();
    let cli = admin_cli(h.url());
    let created: serde_json::Value = serde_json::from_str(&run(&mut cli(&[
        "account",
        "create",
        "bob@example.com",
        "--json",
    ])))
    .unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    let deposit = [
        "account",
        "deposit",
        "bob@example.com",
        "12.5",
        "--idempotency-key",
        "d1",
    ];
    let deposited: serde_json::Value =
        serde_json::from_str(&run(&mut cli(&[&deposit[..], &["--json"]].concat()))).unwrap();
    assert_eq!(deposited["balance_micros"], 12_500_000);
    // Replaying the deposit with the same key does not deposit again.
    run(&mut cli(&deposit));
    // Bad amounts are refused before anything is sent.
    for bad in ["-1", "0.0000001", "NaN", "abc"] {
        let out = cli(&["account", "deposit", "bob@example.com", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} accepted");
    }
    let shown = run(cli(&["account", "show", "bob@example.com"]).env("SYFT_SECRET", &secret));
    assert!(shown.contains("12.5 USD"), "{shown}");
    h.account("owner@router.example", 0).await;
    let token: serde_json::Value = serde_json::from_str(&run(cli(&[
        "token",
        "issue",
        "owner@router.example",
        "--limit",
        "1.5",
        "--json",
    ])
    .env("SYFT_SECRET", &secret)))
    .unwrap();
    assert_eq!(token["spend_limit_micros"], 1_500_000);
    // A per-day cap is shown when issued and in the listing (it used to be in neither).
    let capped = run(cli(&[
        "token",
        "issue",
        "owner@router.example",
        "--limit-per-day",
        "0.05",
    ])
    .env("SYFT_SECRET", &secret));
    assert_contains(&capped, &["per day    0.05 USD in any 24 hours"]);
    let listed: serde_json::Value = serde_json::from_str(&run(
        cli(&["token", "list", "--json"]).env("SYFT_SECRET", &secret)
    ))
    .unwrap();
    let caps: Vec<&serde_json::Value> = listed["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| &t["limit_per_day_micros"])
        .collect();
    assert!(caps.contains(&&serde_json::json!(50_000)), "{listed}");
    let table = run(cli(&["token", "list"]).env("SYFT_SECRET", &secret));
    assert_contains(&table, &["per day", "0.05"]);
    // Support stops a token without its owner: the admin revokes it by its id; what it paid is
    // listed by it (nothing here).
    let capped_id = (listed["tokens"].as_array().into_iter().flatten())
        .find(|t| t["limit_per_day_micros"] == 50_000)
        .and_then(|t| t["token_id"].as_str())
        .expect("the capped token's id")
        .to_string();
    run(&mut cli(&["token", "revoke", &capped_id]));
    let listed: serde_json::Value =
        serde_json::from_str(&run(
            cli(&["token", "list", "--inactive", "--json"]).env("SYFT_SECRET", &secret)
        ))
        .unwrap();
    let revoked = (listed["tokens"].as_array().into_iter().flatten())
        .find(|t| t["token_id"] == capped_id.as_str())
        .map(|t| t["revoked_at_unix_micros"].is_i64());
    assert_eq!(revoked, Some(true), "{listed}");
    let paid = run(&mut cli(&["transfers", "--token", &capped_id, "--json"]));
    assert!(paid.contains("\"transfers\":[]"), "{paid}");
    run(cli(&["token", "revoke", token["token"].as_str().unwrap()]).env("SYFT_SECRET", &secret));
    let transfers = run(&mut cli(&["transfers", "--json"]));
    assert!(transfers.contains("\"transfers\":[]"), "{transfers}");

    let db = h.config.database_url.clone();
    let report: serde_json::Value = serde_json::from_str(&run(syft_router().args([
        "ledger",
        "verify",
        "--json",
        "--database-url",
        &db,
    ])))
    .unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["total_deposits_micros"], 12_500_000);

    // A data directory with no ledger in it is refused, and left as it was (it used to get an
    // empty database, reported consistent with exit 0).
    let empty = syft_testkit::TempDir::new().expect("temp dir");
    let refused = fails(
        syft_router()
            .env_remove("DATABASE_URL")
            .args(["ledger", "verify", "--data-dir"])
            .arg(empty.path()),
    );
    assert_contains(&refused, &["no ledger database at"]);
    assert!(std::fs::read_dir(empty.path())
        .expect("dir")
        .next()
        .is_none());
    // A `--data-dir` beside a `DATABASE_URL` (another project's, left in the environment) is
    // refused: the URL used to win without a word, and verify checked another ledger.
    let refused = fails(
        syft_router()
            .env("DATABASE_URL", &h.config.database_url)
            .args(["ledger", "verify", "--data-dir"])
            .arg(empty.path()),
    );
    assert_contains(&refused, &["--data-dir and a database URL", "give one"]);
    // So is a database with no ledger in it (a mistyped name, an empty restore), and it is left
    // empty: verify used to give it the schema and report it consistent.
    let blank = empty.path().join("blank.db");
    std::fs::write(&blank, b"").expect("an empty SQLite file");
    let url = format!("sqlite://{}?mode=rw", blank.display());
    let refused = fails(syft_router().args(["ledger", "verify", "--database-url", &url]));
    assert_contains(&refused, &["no ledger in that database"]);
    assert_eq!(
        std::fs::metadata(&blank).expect("file").len(),
        0,
        "left as it was"
    );
    // A mistyped file name in the URL form the docs show (`mode=rwc`) is not created.
    let typo = empty.path().join("typo.db");
    let url = format!("sqlite://{}?mode=rwc", typo.display());
    let refused = fails(syft_router().args(["ledger", "verify", "--database-url", &url]));
    assert_contains(&refused, &["no ledger in that database"]);
    assert!(!typo.exists(), "verify created {}", typo.display());
    // A ledger some migrations behind this binary is refused too, not migrated under the older
    // replicas that may still run on it.
    let behind = empty.path().join("behind.db");
    let url = format!("sqlite://{}?mode=rwc", behind.display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
    for sql in [
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TEXT, success BOOLEAN NOT NULL, checksum BLOB NOT NULL, \
         execution_time BIGINT NOT NULL)",
        "INSERT INTO _sqlx_migrations VALUES (1, 'ledger', NULL, TRUE, x'00', 0)",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    let refused = fails(syft_router().args(["ledger", "verify", "--database-url", &url]));
    assert_contains(&refused, &["lacks migrations"]);
    let tables: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(tables, 1, "not migrated");
    pool.close().await;

    // The exit code tells a nightly job which it was: 2 when the books could not be checked (no
    // ledger there), 1 when they are wrong (both were 1). A copy of the ledger, one balance moved.
    let verify = |url: &str| {
        let mut cmd = syft_router();
        cmd.args(["ledger", "verify", "--database-url", url]);
        cmd.output().expect("run")
    };
    let out = verify(&url);
    assert_eq!(out.status.code(), Some(2), "could not check: {out:?}");
    let books = syft_testkit::TempDir::new().expect("temp dir");
    let copy = books.path().join("copy.db");
    let live = sqlx::SqlitePool::connect(&db)
        .await
        .expect("the ledger's file");
    sqlx::query(&format!("VACUUM INTO '{}'", copy.display()))
        .execute(&live)
        .await
        .expect("copy");
    live.close().await;
    let url = format!("sqlite://{}?mode=rw", copy.display());
    let moved = on_sqlite(
        &url,
        &["UPDATE accounts SET balance = balance + 1 WHERE email = 'bob@example.com'"],
    )
    .await;
    assert_eq!(moved, [1]);
    let out = verify(&url);
    assert_eq!(out.status.code(), Some(1), "wrong books: {out:?}");
    assert_contains(
        &String::from_utf8_lossy(&out.stdout),
        &["LEDGER IS INCONSISTENT"],
    );
    // A database a newer binary migrated cannot be checked by this one (its tables may hold
    // what this binary cannot read): exit 2 naming it (it said consistent, exit 0).
    on_sqlite(
        &url,
        &[
            "UPDATE accounts SET balance = balance - 1 WHERE email = 'bob@example.com'",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (9999, 'a later version', TRUE, x'00', 0)",
        ],
    )
    .await;
    let out = verify(&url);
    assert_eq!(out.status.code(), Some(2), "a newer database: {out:?}");
    assert_contains(
        &String::from_utf8_lossy(&out.stderr),
        &["migrated by a newer syft-router"],
    );
    h.finish().await;
}

/// Runs `statements` on the SQLite database at `url`; the rows each changed.
async fn on_sqlite(url: &str, statements: &[&str]) -> Vec<u64> {
    let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
    let mut changed = Vec::new();
    for sql in statements {
        let done = sqlx::query(sql).execute(&pool).await.expect(sql);
        changed.push(done.rows_affected());
    }
    pool.close().await;
    changed
}

/// Starts `syft-router args…`, waits for `ready` on stderr, sends SIGTERM, and returns the exit
/// status and what was logged.
fn sigterm_after(args: &[&str], ready: &str) -> (std::process::ExitStatus, String) {
    let mut child = syft_router()
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn syft-router");
    let rx = syft_testkit::stderr_lines(&mut child);
    let mut log = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !log.contains(ready) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("{ready:?} never logged:\n{log}");
            }
        }
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = child.wait().expect("wait");
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
        log.push_str(&line);
        log.push('\n');
    }
    (status, log)
}

/// A router pointed at an OpenAI-compatible upstream is told which models it sells: without,
/// it used to pass any model a client named (the dearest there is) at its price. With
/// `--models` it serves.
#[test]
fn a_router_on_an_upstream_names_its_models() {
    let args = [
        "router",
        "--owner-email",
        "owner@example.com",
        "--upstream-url",
        "http://127.0.0.1:9/v1",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ];
    let refused = fails(
        syft_router()
            .args(args)
            .env_remove("SYFT_ROUTER_MODELS")
            .env_remove("SYFT_ROUTER_CONFIG"),
    );
    assert_contains(&refused, &["models: list the models this router sells"]);
    let models = ["--models", "gpt-4o-mini", "--shutdown-grace", "1s"];
    let (status, log) = sigterm_after(&[&args[..], &models[..]].concat(), "router serving");
    assert!(status.success(), "{status:?}:\n{log}");
    // A file's model_map names them too, and `--upstream-url` keeps it (it used to replace the
    // file's whole upstream, dropping the map).
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("router.toml");
    std::fs::write(
        &file,
        "name = \"r\"\nowner_email = \"owner@example.com\"\n[upstream]\nkind = \"openai\"\n\
         base_url = \"http://127.0.0.1:8/v1\"\nmodel_map = { mini = \"gpt-4o-mini\" }\n",
    )
    .expect("config");
    let file = file.display().to_string();
    let mapped = ["--config", &file, "--shutdown-grace", "1s"];
    let (status, log) = sigterm_after(&[&args[..], &mapped[..]].concat(), "router serving");
    assert!(status.success(), "{status:?}:\n{log}");
}

#[test]
fn ledger_and_router_exit_zero_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}/ledger.db?mode=rwc", dir.path().display());
    let ledger = ["ledger", "--accounting-api", "--database-url", &db];
    let router = ["router", "--owner-email", "owner@example.com"];
    for (args, name) in [(&ledger[..], "ledger"), (&router[..], "router")] {
        let listen = ["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
        let grace = ["--shutdown-grace", "5s"];
        let args = [args, &listen[..], &grace[..]].concat();
        let (status, log) = sigterm_after(&args, &format!("{name} serving"));
        assert!(status.success(), "{name} exited {status:?}:\n{log}");
        assert!(log.contains(&format!("{name} stopped")), "{log}");
        // Addresses as addresses, not as Rust options (`addr=Some(127.0.0.1:…)`).
        assert!(!log.contains("Some("), "{log}");
        if name == "ledger" {
            // Its connections closed on the way out, so SQLite folded its write-ahead log into
            // `ledger.db`: the file alone is the whole ledger (a backup copied over it is not
            // overwritten by a stale log). A stopped ledger used to leave the log, and a copy of
            // the file alone held no migrations.
            let wal = dir.path().join("ledger.db-wal");
            assert!(!wal.exists(), "{} left behind", wal.display());
            let copy = tempfile::tempdir().expect("tempdir");
            std::fs::copy(dir.path().join("ledger.db"), copy.path().join("ledger.db"))
                .expect("copy");
            let url = format!("sqlite://{}/ledger.db", copy.path().display());
            let out = run(syft_router().args(["ledger", "verify", "--database-url", &url]));
            assert_contains(&out, &["consistent"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_command_and_idempotent_owner_setup() {
    let h = Harness::new(false).await.unwrap();
    let url = h.url();
    // SERVING once the first database probe ran.
    let mut served = None;
    for _ in 0..50 {
        let out = syft_router()
            .args([
                "health",
                "--url",
                &url,
                "--service",
                "syft.ledger.v1.Ledger",
            ])
            .output()
            .expect("run health");
        if out.status.success() {
            served = Some(String::from_utf8_lossy(&out.stdout).to_string());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(served.as_deref().map(str::trim), Some("SERVING"));
    // Nothing listening: non-zero exit.
    let out = syft_router()
        .args(["health", "--url", &closed_url(), "--timeout", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // The compose setup job: a chosen secret, and a re-run is a no-op.
    let setup = || {
        let mut cmd = syft_router();
        cmd.args([
            "account",
            "create",
            "owner@example.com",
            "--organization",
            "router",
            "--exists-ok",
        ])
        .env("SYFT_LEDGER_URL", &url)
        .env("SYFT_LEDGER_ADMIN_KEY", ADMIN_KEY)
        .env("SYFT_ACCOUNT_SECRET", "owner-secret-0123456789");
        cmd
    };
    let first = run(&mut setup());
    assert!(
        !first.contains("owner-secret-0123456789"),
        "a secret the caller gave is printed: {first}"
    );
    let json = run(syft_router()
        .args(["account", "create", "second@example.com", "--json"])
        .env("SYFT_LEDGER_URL", &url)
        .env("SYFT_LEDGER_ADMIN_KEY", ADMIN_KEY)
        .env("SYFT_ACCOUNT_SECRET", "second-secret-0123456789"));
    assert!(json.contains("second@example.com"), "{json}");
    assert!(!json.contains("second-secret-0123456789"), "{json}");
    let again = run(&mut setup());
    assert!(again.contains("already exists"), "{again}");
    // Run again with another secret (the README's "set it before publishing", after a first
    // run): it said "nothing to do" and exited 0, and the router given the new secret was
    // refused by the ledger for good. Another account's secret does not open it either.
    for other in ["a-new-owner-secret-0123456789", "second-secret-0123456789"] {
        let refused = fails(setup().env("SYFT_ACCOUNT_SECRET", other));
        assert_contains(&refused, &["the secret given does not open it"]);
    }
    let shown = run(syft_router()
        .args(["account", "show", "owner@example.com", "--json"])
        .env("SYFT_LEDGER_URL", &url)
        .env("SYFT_SECRET", "owner-secret-0123456789"));
    assert!(shown.contains("owner@example.com"), "{shown}");
    h.finish().await;
}

/// Support gives a user's money back from the command line: the owner refunds part, then the
/// rest with `all`; the same command run twice refunds once, and nothing is left to refund after
/// all. The user sees the refunds.
#[tokio::test(flavor = "multi_thread")]
async fn a_refund_from_the_command_line_is_made_once() {
    use syft_proto::ledger as pb;
    let h = Harness::new(false).await.unwrap();
    let (owner, alice, token) = h
        .payer("owner@router.example", "alice@example.com", 10_000_000)
        .await;
    let mut router = h.client(&owner);
    let held = router
        .authorize(syft_testkit::req::hold(
            "alice@example.com",
            1_000_000,
            &token,
            "k1",
        ))
        .await
        .expect("hold")
        .into_inner();
    router
        .capture(syft_testkit::req::capture_full(&held.id))
        .await
        .expect("capture");
    let as_owner = account_cli(h.url(), &owner);
    let half = [
        "refund",
        &held.id,
        "0.5",
        "--reason",
        "wrong answer",
        "--json",
    ];
    let first: serde_json::Value = serde_json::from_str(&run(&mut as_owner(&half))).unwrap();
    assert_eq!(first["refunded_micros"], 500_000, "{first}");
    let again: serde_json::Value = serde_json::from_str(&run(&mut as_owner(&half))).unwrap();
    assert_eq!(again["refunded_micros"], 500_000, "refunded twice: {again}");
    assert_eq!(again["refund"]["id"], first["refund"]["id"]);
    assert_eq!(again["existing"], true);
    // The same amount with a corrected reason is not a second refund.
    let fixed = fails(&mut as_owner(&[
        "refund",
        &held.id,
        "0.5",
        "--reason",
        "a wrong answer",
    ]));
    assert_contains(&fixed, &["idempotency key"]);
    // The rest, of the same size as the first half: a refund of its own (it used to be taken for
    // the half's repeat, refunding nothing).
    let rest = run(&mut as_owner(&["refund", &held.id, "all"]));
    assert_contains(&rest, &["refunded 0.5 USD", "1 refunded in all"]);
    let none = run(&mut as_owner(&["refund", &held.id, "all"]));
    assert_contains(&none, &["nothing left to refund"]);
    let zero = fails(&mut as_owner(&["refund", &held.id, "0"]));
    assert_contains(&zero, &["must be above 0"]);
    let seen = run(&mut account_cli(h.url(), &alice)(&["refunds", &held.id]));
    assert_contains(
        &seen,
        &["0.5", "wrong answer", "total: 2 refunds, 1 refunded"],
    );
    // Without a transfer: every refund paid to her.
    let all_hers = run(&mut account_cli(h.url(), &alice)(&["refunds"]));
    assert_contains(
        &all_hers,
        &["alice@example.com", "total: 2 refunds, 1 refunded"],
    );
    let alice_now = h
        .client(&alice)
        .get_account(pb::GetAccountRequest {
            email: "alice@example.com".into(),
        })
        .await
        .expect("alice")
        .into_inner();
    assert_eq!(alice_now.balance_micros, 10_000_000);
    // The transfer listed says it was refunded; the owner's statistics say what was given back.
    let listed: serde_json::Value =
        serde_json::from_str(&run(&mut as_owner(&["transfers", "--json"]))).unwrap();
    assert_eq!(
        listed["transfers"][0]["refunded_micros"], 1_000_000,
        "{listed}"
    );
    assert_eq!(
        listed["transfers"][0]["captured_micros"], 1_000_000,
        "{listed}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&run(&mut as_owner(&["stats", "--json"]))).unwrap();
    assert_eq!(stats["refunded_micros"], 1_000_000, "{stats}");
    h.finish().await;
}

/// The admin lists the refunds of owners in two currencies: 0.30 USD and 0.50 EUR were one
/// total of "0.8 refunded" (and `refunded_micros` 800,000 over gRPC), money of two currencies
/// summed (a refunds reviewer's finding). Each currency is totalled on its own, in their order.
#[tokio::test(flavor = "multi_thread")]
async fn refunds_in_two_currencies_are_totalled_apart() {
    use syft_proto::ledger as pb;
    use syft_testkit::{paid, req};
    let h = Harness::new(false).await.unwrap();
    let (owner, _, token) = h
        .payer("owner@router.example", "alice@example.com", 10_000_000)
        .await;
    let owner_eur = h.account_in("owner@router.example.eu", "EUR", 0).await;
    let bob = h.account_in("bob@example.com", "EUR", 10_000_000).await;
    let token_eur = h.token(&bob, "owner@router.example.eu").await;
    let payers = [
        (&owner, "alice@example.com", &token, 300_000),
        (&owner_eur, "bob@example.com", &token_eur, 500_000),
    ];
    for (secret, payer, token, amount) in payers {
        let mut router = h.client(secret);
        let done = paid(&mut router, req::hold(payer, 1_000_000, token, "k1")).await;
        let refund = pb::RefundRequest {
            transfer_id: done.id,
            amount_micros: amount,
            reason: "test".into(),
            idempotency_key: "r1".into(),
        };
        syft_testkit::ok(router.refund(refund).await);
    }
    let listed = syft_testkit::ok(
        h.admin()
            .list_refunds(pb::ListRefundsRequest::default())
            .await,
    );
    assert_eq!((listed.refunds.len(), listed.refunded_micros), (2, 0));
    let cli = admin_cli(h.url());
    let table = run(&mut cli(&["refunds"]));
    assert_contains(&table, &["total: 2 refunds, 0.5 EUR + 0.3 USD refunded"]);
    let json: serde_json::Value =
        serde_json::from_str(&run(&mut cli(&["refunds", "--json"]))).expect("json");
    assert_eq!(json["refunded_micros"], serde_json::Value::Null, "{json}");
    assert_eq!(json["refunded_by_currency"]["EUR"], 500_000, "{json}");
    h.finish().await;
}

/// Runs a command that must fail and returns its stderr, which must be one line.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run syft-router");
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    for leak in [
        "tonic",
        "transport::Error",
        "Status {",
        "source:",
        "Unavailable",
    ] {
        assert!(!stderr.contains(leak), "leaks {leak:?}: {stderr}");
    }
    stderr
}

/// A deposit whose answer was lost (the ledger's connection dropped after the request went out)
/// may have been made: run again with a new key, it would be made twice. The error names the
/// generated key, and the same command with it deposits once; a refusal, or a ledger that could
/// not be reached, made nothing and does not ask for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deposit_whose_answer_was_lost_names_the_key_that_retries_it_once() {
    use std::io::Read;
    let h = Harness::new(false).await.unwrap();
    h.account("carol@example.com", 0).await;
    // A "ledger" that reads the request to its body, then drops the connection unanswered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dropping = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(17).any(|w| w == b"carol@example.com") {
                    break;
                }
            }
        }
    });
    let deposit = ["account", "deposit", "carol@example.com", "2"];
    let err = fails(&mut admin_cli(dropping)(&deposit));
    let key = err
        .split("--idempotency-key ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no key to retry with: {err}"));
    let live = admin_cli(h.url());
    for _ in 0..2 {
        run(&mut live(
            &[&deposit[..], &["--idempotency-key", key]].concat(),
        ));
    }
    assert_eq!(
        h.balance("carol@example.com").await.balance_micros,
        2_000_000
    );
    // Nothing was made: no key asked for.
    let refused = fails(&mut live(&[
        "account",
        "deposit",
        "nobody@example.com",
        "2",
    ]));
    let unreachable = fails(&mut admin_cli(closed_url())(&deposit));
    for err in [refused, unreachable] {
        assert!(!err.contains("--idempotency-key"), "{err}");
    }
    h.finish().await;
}

#[test]
fn client_errors_are_one_line_in_the_users_terms() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = fails(
        syft_router()
            .args(["account", "show", "alice@example.com"])
            .env("SYFT_LEDGER_URL", &url)
            .env("SYFT_SECRET", "s3cret-s3cret"),
    );
    assert!(
        err.contains(&format!("cannot reach the ledger at {url}"))
            && err.contains("is the ledger running there?"),
        "{err}"
    );
    let err = fails(syft_router().args([
        "chat",
        "hi",
        "--user",
        "alice@example.com",
        "--router-url",
        &url,
    ]));
    assert!(
        err.contains(&format!("cannot reach the router at {url}")),
        "{err}"
    );
    // A cause is printed once, not once per layer that wrapped it.
    let err = fails(syft_router().args([
        "health",
        "--url",
        "https://127.0.0.1:1",
        "--ca",
        "/no/such/ca.pem",
    ]));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // A zero amount is refused in the words typed, before any call (the ledger's refusal named
    // its gRPC field: "amount_micros must be positive, got 0").
    let zero = |args: &[&str]| {
        fails(
            syft_router()
                .args(args)
                .env("SYFT_LEDGER_URL", &url)
                .env("SYFT_LEDGER_ADMIN_KEY", "k")
                .env("SYFT_SECRET", "s3cret-s3cret"),
        )
    };
    let err = zero(&["account", "deposit", "carol@example.com", "0"]);
    assert!(err.contains("the amount must be above 0 (got 0)"), "{err}");
    let err = zero(&["token", "issue", "owner@example.com", "--limit", "0.000"]);
    assert!(err.contains("--limit must be above 0 (got 0.000)"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_page_past_500_rows_with_times_and_currency() {
    let h = Harness::new(false).await.unwrap();
    let cli = admin_cli(h.url());
    let json = |cmd: &mut Command| -> serde_json::Value {
        serde_json::from_str(&run(cmd)).expect("JSON output")
    };
    // More accounts than one page (500) holds.
    let alice = h.account("alice@example.com", 2_000_000).await;
    h.account("owner@router.example", 0).await;
    for i in 0..510 {
        h.account(&format!("user{i}@example.com"), 0).await;
    }
    let all = json(&mut cli(&["account", "list", "--all", "--json"]));
    assert_eq!(all["accounts"].as_array().unwrap().len(), 512);
    assert_eq!(all["next_page_token"], "");
    let some = json(&mut cli(&["account", "list", "--limit", "501", "--json"]));
    assert_eq!(some["accounts"].as_array().unwrap().len(), 501);
    assert_ne!(some["next_page_token"], "");
    let table = run(&mut cli(&["account", "list", "--limit", "3"]));
    assert_contains(&table, &["alice@example.com", "USD"]);
    // account list is for the admin only.
    let err = fails(
        cli(&["account", "list"])
            .env_remove("SYFT_LEDGER_ADMIN_KEY")
            .env("SYFT_SECRET", &alice),
    );
    assert!(err.contains("--secret") || err.contains("admin"), "{err}");

    // token issue echoes what it set; token list shows it, to both parties.
    let issued = run(cli(&[
        "token",
        "issue",
        "owner@router.example",
        "--limit",
        "1.5",
        "--ttl",
        "24h",
    ])
    .env("SYFT_SECRET", &alice));
    assert!(issued.contains("limit      1.5 USD"), "{issued}");
    assert_contains(&issued, &["expires    20", "UTC"]);
    run(cli(&["token", "issue", "owner@router.example"]).env("SYFT_SECRET", &alice));
    let tokens = json(cli(&["token", "list", "--json"]).env("SYFT_SECRET", &alice));
    let tokens = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert!(tokens.iter().any(|t| t["spend_limit_micros"] == 1_500_000));
    let listed = run(cli(&["token", "list"]).env("SYFT_SECRET", &alice));
    assert_contains(&listed, &["owner@router.example", "active"]);
    let received = json(&mut cli(&[
        "token",
        "list",
        "--account",
        "owner@router.example",
        "--role",
        "recipient",
        "--json",
    ]));
    assert_eq!(received["tokens"].as_array().unwrap().len(), 2);
    let revoked = tokens[0]["token_id"].as_str().unwrap();
    run(cli(&["token", "revoke", revoked]).env("SYFT_SECRET", &alice));
    let active = json(cli(&["token", "list", "--json"]).env("SYFT_SECRET", &alice));
    assert_eq!(active["tokens"].as_array().unwrap().len(), 1);
    let every = json(cli(&["token", "list", "--inactive", "--json"]).env("SYFT_SECRET", &alice));
    assert_eq!(every["tokens"].as_array().unwrap().len(), 2);

    // Time windows, timestamps and the currency of totals.
    let usage = json(&mut cli(&[
        "usage",
        "--since",
        "7d",
        "--until",
        "2999-01-01",
        "--json",
    ]));
    assert_eq!(usage["totals"]["currency"], "USD", "{usage}");
    let table = run(&mut cli(&["usage"]));
    assert_contains(&table, &["time (UTC)", "cost 0 USD"]);
    let since_2020 = ["transfers", "--since", "2020-01-01T00:00:00Z", "--all"];
    let table = run(&mut cli(&since_2020));
    assert_contains(&table, &["created (UTC)", "currency"]);
    let out = cli(&["transfers", "--since", "last tuesday"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_contains(&err, &["invalid time", "--since"]);
    // Out of the calendar's range: an error, not a panic of the subtraction.
    let out = cli(&["usage", "--since", "100000000d"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_contains(&err, &["invalid time", "--since"]);
    // A --ttl too long for the clock is refused, not wrapped into another expiry.
    let out = cli(&[
        "token",
        "issue",
        "owner@router.example",
        "--ttl",
        "99999999999999d",
    ])
    .env("SYFT_SECRET", "any")
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // Refused by the duration parser itself now (past a century), naming the flag.
    assert_contains(&err, &["--ttl <TTL>", "is too long"]);
    h.finish().await;
}

/// `syft-router ARGS` against the ledger at `url`, with the admin key and no user secret.
fn admin_cli(url: String) -> impl Fn(&[&str]) -> Command {
    ledger_cli(
        url,
        "SYFT_LEDGER_ADMIN_KEY",
        ADMIN_KEY.to_string(),
        "SYFT_SECRET",
    )
}

/// Client commands run as the account whose secret is `secret`.
fn account_cli(url: String, secret: &str) -> impl Fn(&[&str]) -> Command {
    ledger_cli(
        url,
        "SYFT_SECRET",
        secret.to_string(),
        "SYFT_LEDGER_ADMIN_KEY",
    )
}

/// Client commands against the ledger at `url` with the credential `key` = `value`; the other
/// credential variable `unset` is removed, so the caller's environment cannot change who acts.
fn ledger_cli(
    url: String,
    key: &'static str,
    value: String,
    unset: &'static str,
) -> impl Fn(&[&str]) -> Command {
    move |args: &[&str]| {
        let mut cmd = syft_router();
        cmd.args(args)
            .env("SYFT_LEDGER_URL", &url)
            .env(key, &value)
            .env_remove(unset);
        cmd
    }
}

/// `alerts add url rules… --json` as `cli`'s account: the endpoint and its secret.
fn add_alert(cli: &impl Fn(&[&str]) -> Command, url: &str, rules: &[&str]) -> serde_json::Value {
    let args = [&["alerts", "add", url], rules, &["--json"]].concat();
    serde_json::from_str(&run(&mut cli(&args))).expect("alerts add --json")
}

/// `syft-router alerts`: add (secret shown once), list, test, deliveries, a refused URL, remove;
/// the receiver gets the balance.low the new rule fires, correctly signed.
#[tokio::test(flavor = "multi_thread")]
async fn alerts_commands() {
    use syft_testkit::{alerts_on, WebhookReceiver};
    let h = Harness::with(false, alerts_on).await.unwrap();
    let secret = h.account("carol@example.com", 10_000_000).await;
    let rx = WebhookReceiver::start().await;
    let cli = account_cli(h.url(), &secret);
    let added = add_alert(
        &cli,
        &rx.url,
        &["--balance-below", "20", "--budget-steps", "50,80"],
    );
    let whsec = added["secret"].as_str().unwrap().to_string();
    let id = added["endpoint"]["id"].as_str().unwrap().to_string();
    rx.set_secrets(&[&whsec]);
    // 10 USD available is below 20: one balance.low, signed with the secret just shown.
    let got = rx
        .wait_until(Duration::from_secs(15), "balance.low", |r| !r.is_empty())
        .await;
    assert_eq!(got[0].event_type(), "balance.low");
    // Checked against the secret here, not by the receiver: the event may arrive before
    // `set_secrets` above ran (the rule fires as soon as it is added).
    let r = &got[0];
    assert!(syft_testkit::signature_matches(
        std::slice::from_ref(&whsec),
        &r.id,
        &r.timestamp,
        &r.body,
        &r.signature
    ));
    let listed: serde_json::Value =
        serde_json::from_str(&run(&mut cli(&["alerts", "list", "--json"]))).unwrap();
    assert_eq!(listed[0]["rules"][0]["below_micros"], 20_000_000);
    assert_eq!(listed[0]["rules"][1]["steps"], serde_json::json!([50, 80]));
    let table = run(&mut cli(&["alerts", "list"]));
    assert!(table.contains(&id) && table.contains("healthy"), "{table}");
    assert!(run(&mut cli(&["alerts", "test", &id])).contains("queued test event msg_"));
    rx.wait_until(Duration::from_secs(15), "test event", |r| r.len() >= 2)
        .await;
    let log: serde_json::Value =
        serde_json::from_str(&run(&mut cli(&["alerts", "deliveries", &id, "--json"]))).unwrap();
    assert_eq!(log[0]["outcome"], "DELIVERED");
    assert_eq!(log[0]["status_code"], 200);
    let refused = fails(&mut cli(&[
        "alerts",
        "add",
        "http://example.com/x",
        "--balance-below",
        "1",
    ]));
    assert!(refused.contains("https"), "{refused}");
    // Every action speaks JSON when asked: a rotation job parses the secret it is shown once.
    let json_of = |args: &[&str]| -> serde_json::Value {
        let out = run(&mut cli(&[args, &["--json"]].concat()));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    };
    let rotated = json_of(&["alerts", "rotate", &id, "--overlap", "1h"]);
    assert!(
        rotated["secret"]
            .as_str()
            .unwrap_or_default()
            .starts_with("whsec_"),
        "{rotated}"
    );
    assert!(
        rotated["previous_secret_until_unix_micros"].as_i64() > Some(0),
        "{rotated}"
    );
    let queued = json_of(&["alerts", "test", &id]);
    assert!(
        queued["event_id"]
            .as_str()
            .unwrap_or_default()
            .starts_with("msg_"),
        "{queued}"
    );
    assert_eq!(json_of(&["alerts", "remove", &id])["removed"], id.as_str());
    assert!(run(&mut cli(&["alerts", "list"])).contains("no alert endpoints"));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_prints_tables_json_and_csv() {
    use syft_proto::ledger as pb;
    let h = Harness::new(false).await.unwrap();
    let owner = h.account("owner@router.example", 0).await;
    let mut ledger = h.client(&owner);
    for (n, status) in ["success", "success", "upstream_error"].iter().enumerate() {
        let usage = pb::Usage {
            request_id: format!("r{n}"),
            app_name: "chat-app".into(),
            endpoint: "/chat".into(),
            user_email: "alice@example.com".into(),
            model: "echo".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            status: status.to_string(),
            latency_ms: 20,
            upstream_latency_ms: 10,
            ..Default::default()
        };
        ledger
            .record_usage(pb::RecordUsageRequest { usage: Some(usage) })
            .await
            .unwrap();
    }
    let cli = account_cli(h.url(), &owner);
    let stats: serde_json::Value =
        serde_json::from_str(&run(&mut cli(&["stats", "--by", "status", "--json"]))).unwrap();
    let groups = stats["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{stats}");
    assert_eq!(groups[0]["key"]["status"], "success");
    assert_eq!(groups[0]["requests"], 2);
    assert_eq!(groups[1]["requests"], 1);
    assert_eq!(stats["currency"], "USD");

    let csv = run(&mut cli(&["stats", "--by", "app,status", "--csv"]));
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("app,status,requests,"), "{csv}");
    assert_eq!(lines.len(), 3, "{csv}");
    // The success rate is a number (the JSON's fraction), not a percentage text.
    assert!(lines[1].starts_with("chat-app,success,2,1,"), "{csv}");
    // Its units are in its header: exact micros and unix micros, unlike the table.
    assert!(
        lines[0].contains(",revenue_micros,refunds_micros,"),
        "{csv}"
    );
    let by_day = run(&mut cli(&[
        "stats", "--by", "day", "--csv", "--since", "2d",
    ]));
    assert!(
        by_day.starts_with("day_start_unix_micros,requests,"),
        "{by_day}"
    );

    let table = run(&mut cli(&["stats", "--by", "day", "--since", "7d"]));
    assert!(
        table.contains("requests") && table.contains("latency_p99_ms") && table.contains("USD"),
        "{table}"
    );
    // As a user, the owner sent nothing.
    let mine = run(&mut cli(&["stats", "--as", "user"]));
    assert!(mine.contains("no requests"), "{mine}");
    // Alice's apps are named with their owner: two owners may name an app alike.
    let alice = h.account("alice@example.com", 0).await;
    let alice_cli = account_cli(h.url(), &alice);
    let table = run(&mut alice_cli(&["stats", "--as", "user", "--by", "app"]));
    let header = table.lines().next().unwrap_or_default();
    assert!(header.starts_with("app       owner "), "{table}");
    assert!(table.contains("chat-app  owner@router.example "), "{table}");
    let json = run(&mut alice_cli(&[
        "stats", "--as", "user", "--by", "app", "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["groups"][0]["key"]["owner"], "owner@router.example");
    for bad in [
        &["stats", "--by", "weekday"][..],
        &["stats", "--by", "minute", "--since", "30d"][..],
    ] {
        let out = cli(bad).output().unwrap();
        assert!(!out.status.success(), "{bad:?}");
    }
    let out = cli(&["stats", "--by", "minute", "--since", "30d"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("range too wide"), "{err}");
    h.finish().await;
}

/// `limits --user`: what is left of each window and budget of a user on a router, as a table and
/// as JSON; a wrong service is refused in one line.
#[tokio::test(flavor = "multi_thread")]
async fn limits_command_shows_what_is_left() {
    use syft_router_svc::config::Rate;
    let s = syft_testkit::Stack::start_tweaked(
        syft_router_svc::Pricing::per_request(syft_testkit::PRICE),
        |c| {
            c.rate_limits.requests = vec![Rate::parse("10/minute").unwrap()];
            c.budgets.per_day_micros = Some(1_000_000);
        },
    )
    .await;
    s.client().await.chat(s.request("hi")).await.unwrap();
    let base = [
        "limits",
        "--router-url",
        &s.router.grpc_url,
        "--user",
        &s.alice.email,
        "--token",
        &s.token,
    ];
    let table = run(syft_router().args(base));
    assert_contains(
        &table,
        &[
            "remaining",
            "10 requests per minute",
            "budget_day",
            "spend of 1 USD per user per UTC day",
            // The ledger counts the one paid request against the day's budget.
            "0.99",
        ],
    );
    let line = table
        .lines()
        .find(|l| l.starts_with("requests"))
        .expect("requests row");
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cells[..4], ["requests", "router", "10", "9"], "{line}");
    let json: serde_json::Value =
        serde_json::from_str(&run(syft_router().args(base).arg("--json"))).unwrap();
    assert_eq!(json["service"], "chat");
    assert_eq!(json["limits"][0]["remaining"], 9);
    assert_eq!(json["limits"][0]["window_seconds"], 60);
    assert_eq!(json["budgets"][0]["limit_micros"], 1_000_000);
    assert_eq!(
        json["budgets"][0]["remaining_micros"],
        1_000_000 - syft_testkit::PRICE
    );
    let reset_ms = json["budgets"][0]["reset_ms"].as_u64().unwrap_or(0);
    assert!(reset_ms > 0 && reset_ms <= 86_400_000, "{json}");
    let err = fails(syft_router().args(base).args(["--service", "images"]));
    assert_contains(&err, &["invalid request", "unknown service"]);

    // `chat` sent twice with one request id: the second answer is the stored one, and says so,
    // rather than printing a second cost line that reads like a second charge.
    let chat = |json: bool| {
        let mut cmd = syft_router();
        cmd.args(["chat", "hello", "--router-url", &s.router.grpc_url])
            .args(["--user", &s.alice.email, "--token", &s.token])
            .args(["--request-id", "cli-replay-1", "--model", "test-model"]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().expect("chat")
    };
    let first = chat(false);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!String::from_utf8_lossy(&first.stderr).contains("replay"));
    let again = chat(false);
    assert_contains(
        &String::from_utf8_lossy(&again.stderr),
        &["replay, charged once already"],
    );
    let json: serde_json::Value = serde_json::from_slice(&chat(true).stdout).expect("JSON output");
    assert_eq!(json["replay"], true);
    // The options a chat may set reach the upstream.
    run(syft_router()
        .args(["chat", "hello", "--router-url", &s.router.grpc_url])
        .args(["--user", &s.alice.email, "--token", &s.token])
        .args(["--model", "test-model", "--temperature", "0.25"])
        .args(["--reasoning-effort", "low", "--max-tokens", "7"]));
    let body = s.upstream.last_body().expect("upstream called");
    assert_eq!(body["reasoning_effort"], "low", "{body}");
    assert_eq!(body["temperature"], 0.25, "{body}");
    assert_eq!(body["max_tokens"], 7, "{body}");
    s.check_invariants().await;
}

/// A temporary folder holding `docs/` with two documents to index.
fn two_documents() -> (syft_testkit::TempDir, std::path::PathBuf) {
    let root = syft_testkit::TempDir::new().expect("temp dir");
    let docs = root.path().join("docs");
    std::fs::create_dir_all(&docs).expect("docs");
    std::fs::write(docs.join("a.md"), "two-phase transfers hold then capture").expect("a");
    std::fs::write(docs.join("b.txt"), "usage rows and verify").expect("b");
    (root, docs)
}

/// `index build` puts a whole index at `--out` (new or empty) and nothing beside it: it is built
/// in a sibling directory and renamed into place, so an interrupted build leaves no index that
/// opens empty. A non-empty `--out`, one inside the folder, and a folder of no documents are
/// refused.
#[test]
fn index_build_puts_a_whole_index_in_place() {
    let (root, docs) = two_documents();
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).expect("empty");
    for out in [root.path().join("idx"), empty] {
        let printed = run(&mut index_build(&docs, &out));
        assert_contains(&printed, &["indexed 2 documents"]);
        assert!(out.join("meta.json").is_file(), "{out:?}");
        // An existing one (perhaps a mount point: built inside it, moved up) keeps nothing else.
        for entry in std::fs::read_dir(&out).expect("list") {
            let name = entry.expect("entry").file_name();
            assert!(!name.to_string_lossy().contains("building"), "{name:?}");
        }
    }
    let mut left: Vec<String> = std::fs::read_dir(root.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["docs", "empty", "idx"], "nothing built beside them");
    let refused = fails(&mut index_build(&docs, &root.path().join("idx")));
    assert_contains(&refused, &["is not empty"]);
    // A build killed inside an existing `--out` left its `.building-<pid>` there: a retry clears
    // it (it was refused "not empty" for good, the folder looking empty).
    let killed = root.path().join("killed");
    std::fs::create_dir_all(killed.join(".building-4242")).expect("left by a killed build");
    std::fs::write(killed.join(".building-4242").join("meta.json"), "{}").expect("half");
    assert_contains(
        &run(&mut index_build(&docs, &killed)),
        &["indexed 2 documents"],
    );
    assert!(!killed.join(".building-4242").exists());
    // Only that: a folder of the user's named alike is kept, and so is a running build's (this
    // test's own pid stands for one), and `--out` is refused as not empty, nothing removed.
    for (name, dir) in [
        ("notes", root.path().join("notes")),
        ("running", root.path().join("running")),
    ] {
        let kept = match name {
            "notes" => dir.join(".building-notes"),
            _ => dir.join(format!(".building-{}", std::process::id())),
        };
        std::fs::create_dir_all(&kept).expect("kept");
        let refused = fails(&mut index_build(&docs, &dir));
        assert_contains(&refused, &["is not empty"]);
        assert!(kept.exists(), "{name}: removed");
    }
    // An index inside its folder (the next build read it back as documents and failed), and a
    // folder with no documents (an index that answers every search with nothing, free).
    for out in [
        docs.join("index"),
        docs.join("sub").join("index"),
        docs.join("a").join("..").join("b"),
    ] {
        let nested = fails(&mut index_build(&docs, &out));
        assert_contains(&nested, &["is inside"]);
    }
    let bare = root.path().join("bare");
    std::fs::create_dir_all(&bare).expect("bare");
    std::fs::write(bare.join("scan.pdf"), "%PDF").expect("pdf");
    let nothing = fails(&mut index_build(&bare, &root.path().join("idx2")));
    assert_contains(&nothing, &["holds no documents"]);
    // Documents without a word (an empty file, a line with empty content) likewise.
    std::fs::write(bare.join("a.txt"), "").expect("empty");
    std::fs::write(bare.join("b.jsonl"), "{\"id\":\"x\",\"content\":\"\"}\n").expect("jsonl");
    let wordless = fails(&mut index_build(&bare, &root.path().join("idx3")));
    assert_contains(&wordless, &["hold no text"]);
    assert!(!root.path().join("idx3").exists());
    // Punctuation only, and a word longer than the analyzer keeps (a hash): chunks without a
    // term, served as healthy and finding nothing (a search reviewer's finding). Refused, and an
    // existing `--out` is left empty.
    let symbols = root.path().join("symbols");
    std::fs::create_dir_all(&symbols).expect("symbols");
    std::fs::write(symbols.join("a.md"), "--- *** !!! ??? ... ///\n").expect("punctuation");
    std::fs::write(symbols.join("b.txt"), "f".repeat(64)).expect("hash");
    let kept = root.path().join("kept");
    std::fs::create_dir_all(&kept).expect("kept");
    let termless = fails(&mut index_build(&symbols, &kept));
    assert_contains(&termless, &["hold no text"]);
    assert_eq!(std::fs::read_dir(&kept).expect("list").count(), 0);
}

/// `syft-router index build DIR --out OUT`.
fn index_build(dir: &std::path::Path, out: &std::path::Path) -> std::process::Command {
    let mut c = syft_router();
    c.args(["index", "build"]).arg(dir).arg("--out").arg(out);
    c
}

/// A client command whose output is closed before it prints (`… | head`) ends as Unix tools do,
/// by SIGPIPE, not with a panic ("failed printing to stdout", exit 101).
#[test]
fn a_closed_output_ends_a_client_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (root, docs) = two_documents();
    let mut child = index_build(&docs, &root.path().join("idx"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// `--status` takes the statuses rows have, and names them when given another (`rejected`, which
/// the help used to list, and a typo both answered nothing, exit 0).
#[test]
fn an_unknown_status_is_refused_with_the_known_ones() {
    for command in ["usage", "stats"] {
        let out = syft_router()
            .args([command, "--status", "rejected"])
            .output()
            .expect("run");
        assert!(!out.status.success(), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_contains(&stderr, &["rate_limited", "budget_exceeded", "no_results"]);
    }
}

/// `--limit 0` is refused before anything is asked: `usage --limit 0` fetched no page and printed
/// totals of 0 ("total: 0 requests") where rows matched.
#[test]
fn a_limit_of_zero_is_refused() {
    for command in [
        &["usage", "--limit", "0"][..],
        &["transfers", "--limit", "0"],
        &["account", "list", "--limit", "0"],
        &["token", "list", "--limit", "0"],
    ] {
        let out = syft_router().args(command).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_contains(&stderr, &["--limit", "not in 1.."]);
    }
}

/// A ledger refuses at start-up a hold too short to capture anything and a pool of no
/// connections: `--hold-ttl 1us` started, and every paid request called its upstream and then
/// failed on its expired hold; `--max-connections 0` was taken as 1 without a word. So are a
/// `--max-hold-ttl` over a month, two names of its database, a largest amount below 1 micro and
/// hosted accounting's settings under the local backend.
#[test]
fn a_ledger_refuses_a_hold_ttl_under_a_second_and_no_connections() {
    let data = tempfile::tempdir().expect("tempdir");
    let dir = data.path().to_str().expect("utf-8 path");
    for (flags, says) in [
        (&["--hold-ttl", "1us"][..], "--hold-ttl must be at least 1s"),
        (&["--max-connections", "0"], "not in 1.."),
        // A ten-digit hour count wrapped the expiry clock; a month bounds every hold.
        (
            &["--max-hold-ttl", "721h"],
            "--max-hold-ttl must be at most 30 days",
        ),
        // The URL used to win over the flag without a word.
        (
            &["--database-url", "sqlite::memory:"],
            "--data-dir and a database URL",
        ),
        // A ledger that refused every amount said it was serving.
        (&["--max-amount-micros", "0"], "not in 1.."),
        // Hosted settings under the local backend were dropped: an empty local ledger.
        (
            &["--accounting-url", "https://accounting.example"],
            "SYFT_ACCOUNTING_URL (or its flag) is set but the backend is \"local\"",
        ),
    ] {
        let mut ledger = syft_router()
            .args(["ledger", "--data-dir", dir, "--admin-key", "k"])
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(flags)
            .env_remove("DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = ledger.try_wait().expect("wait") {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = ledger.kill();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(
            status.is_some_and(|s| !s.success()),
            "{flags:?} started: {status:?}"
        );
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut ledger.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert_contains(&stderr, &[says]);
    }
}

/// `dev` has webhook alerts on, for a receiver on this machine, as its dashboard's Alerts tab and
/// its printed `alerts add` command promise (it had no way to turn them on). Its key is kept in
/// the data dir, so an endpoint added before a restart is still delivered to after it.
#[tokio::test(flavor = "multi_thread")]
async fn dev_has_alerts_on_for_a_local_receiver() {
    let data = tempfile::tempdir().expect("tempdir");
    let dev = syft_testkit::DevProcess::start(env!("CARGO_BIN_EXE_syft-router"), data.path());
    let creds: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.path().join("dev-credentials.json")).expect("credentials"),
    )
    .expect("json");
    let secret = creds["user_secret"].as_str().expect("user secret");
    let rx = syft_testkit::WebhookReceiver::start().await;
    let cli = account_cli(dev.ledger_url.clone(), secret);
    let added = add_alert(&cli, &rx.url, &["--balance-below", "20"]);
    let id = added["endpoint"]["id"].as_str().expect("id").to_string();
    // The dev user's 10 USD are below 20.
    rx.wait_until(Duration::from_secs(15), "balance.low", |r| !r.is_empty())
        .await;
    dev.stop();

    let dev = syft_testkit::DevProcess::start(env!("CARGO_BIN_EXE_syft-router"), data.path());
    let cli = account_cli(dev.ledger_url.clone(), secret);
    assert!(run(&mut cli(&["alerts", "test", &id])).contains("queued test event"));
    // A balance.low the ledger had sent but not yet recorded when it stopped may come again.
    rx.wait_until(Duration::from_secs(15), "test event", |r| {
        r.iter().any(|e| e.event_type() == "test")
    })
    .await;
    dev.stop();
}

/// `syft-router dev` on `data`, its ledger's gRPC and HTTP and its router's gRPC and HTTP on
/// `ports`.
fn dev_on(data: &std::path::Path, ports: &[String]) -> Command {
    let mut dev = syft_router();
    dev.arg("dev")
        .args(["--data-dir", &data.display().to_string()])
        .args([
            "--ledger-grpc-addr",
            &ports[0],
            "--ledger-http-addr",
            &ports[1],
        ])
        .args([
            "--router-grpc-addr",
            &ports[2],
            "--router-http-addr",
            &ports[3],
        ]);
    dev
}

/// `dev` stopped (SIGTERM) while a free request waits on its upstream: the router finishes it
/// and its usage row reaches the ledger, which stops after the router. One signal stopped both:
/// the ledger, with no hold open and no call for a second, was gone when the row came, and the
/// answered request left no row.
#[tokio::test(flavor = "multi_thread")]
async fn dev_stops_its_router_before_its_ledger() {
    let data = tempfile::tempdir().expect("tempdir");
    let upstream = syft_testkit::FakeUpstream::start().await;
    upstream.set_mode(syft_testkit::Mode::Delay(Duration::from_secs(3)));
    let config = data.path().join("router.json");
    let free = serde_json::json!({
        "name": "dev-free",
        "owner_email": "owner@example.com",
        "services": [{"type": "chat", "enabled": true, "pricing": {"pricing_type": "free"}}],
    });
    std::fs::write(&config, free.to_string()).expect("config");
    let ports = syft_testkit::free_ports::<4>().map(|p| format!("127.0.0.1:{p}"));
    let mut child = dev_on(data.path(), &ports)
        .args([
            "--upstream-url",
            &upstream.base_url,
            "--models",
            "test-model",
        ])
        .arg("--config")
        .arg(&config)
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn dev");
    let base = format!("http://{}", ports[3]);
    let http = reqwest::Client::new();
    wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(60)).await;
    let chat = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "test-model",
            "user": "alice@example.com",
            "messages": [{"role": "user", "content": "hello"}],
        }))
        .send();
    let chat = tokio::spawn(chat);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let answered = chat.await.expect("task").expect("answered");
    assert_eq!(answered.status(), 200);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("task")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    let db = format!("sqlite://{}/ledger.db", data.path().display());
    let store = syft_ledger::Store::connect(&db, 1).await.expect("store");
    let rows: Vec<String> = sqlx::query_scalar("SELECT status FROM usage_records")
        .fetch_all(store.pool())
        .await
        .expect("rows");
    assert_eq!(rows, ["success"], "the answered request's row");
    syft_testkit::assert_consistent(&store).await;
}

/// `dev` whose stdout is closed (`syft-router dev | head -3`, a reader that stopped) keeps
/// serving: its banner is for a person, and printing it into a closed pipe used to panic the
/// whole process (`failed printing to stdout: Broken pipe`, exit 101) just after it started.
#[test]
fn dev_keeps_serving_when_its_stdout_is_closed() {
    let data = tempfile::tempdir().expect("tempdir");
    let ports = syft_testkit::free_ports::<4>().map(|p| format!("127.0.0.1:{p}"));
    let mut child = dev_on(data.path(), &ports)
        .env("RUST_LOG", "error")
        .env_remove("DATABASE_URL")
        .env_remove("SYFT_ROUTER_CONFIG")
        .env_remove("OPENAI_BASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn dev");
    drop(child.stdout.take());
    let router_url = format!("http://{}", ports[2]);
    let serving = || {
        syft_router()
            .args(["health", "--url", &router_url, "--timeout", "1s"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !serving() {
        assert!(std::time::Instant::now() < deadline, "dev never served");
        assert!(child.try_wait().expect("wait").is_none(), "dev exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The banner is written once the router serves: give it time to hit the closed pipe.
    std::thread::sleep(Duration::from_secs(2));
    let exited = child.try_wait().expect("wait");
    let still_serving = serving();
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    assert!(
        exited.is_none(),
        "dev died of its closed stdout ({exited:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(still_serving, "dev stopped serving");
}

/// A server that closes the connection while the client writes to it (here it reads the first
/// bytes, then closes; a TLS ledger asked in plaintext does the like) gets the client's one-line
/// error. With SIGPIPE restored to its default for client commands, a socket write (`writev`,
/// which takes no `MSG_NOSIGNAL`) killed the process silently, exit 141 and nothing printed.
#[test]
fn a_server_closing_mid_write_gets_an_error_line_not_a_silent_death() {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut first = [0u8; 10];
            let _ = conn.read(&mut first);
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    });
    for _ in 0..5 {
        let err = fails(
            syft_router()
                .args(["account", "show", "alice@example.com"])
                .env("SYFT_LEDGER_URL", &url)
                .env("SYFT_SECRET", "s3cret-s3cret"),
        );
        assert!(err.starts_with("error:"), "{err}");
    }
}

/// A ledger's currency is a 3-letter code, as routers price in (`EURO` started, and no router
/// could sell against its accounts); a lower-case one is taken upper-cased.
#[test]
fn a_ledger_currency_that_no_router_prices_in_is_refused() {
    let out = syft_router()
        // An unusable database too, so a ledger that took the currency fails at once (with
        // another message and exit 1) rather than serve.
        .args(["ledger", "--currency", "EURO", "--grpc-addr", "127.0.0.1:0"])
        .args(["--database-url", "nowhere://"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a 3-letter currency code"), "{stderr}");
}

/// A Kubernetes exec probe dials its own pod (`https://127.0.0.1:…`) while the certificate names
/// the Service: `health --server-name` checks the certificate against that name. Without it the
/// README's probe failed on every pod whose certificate did not also carry `IP:127.0.0.1`.
#[test]
fn health_checks_a_tls_server_by_the_name_its_certificate_carries() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["ledger.syft.example".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("sign");
    let path = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).expect("write");
        p.display().to_string()
    };
    let (ca_pem, cert, key) = (
        path("ca.pem", ca.pem()),
        path("cert.pem", leaf.pem()),
        path("key.pem", key.serialize_pem()),
    );
    let [grpc] = syft_testkit::free_ports::<1>();
    let data = dir.path().join("data").display().to_string();
    let mut ledger = syft_router()
        .args(["ledger", "--data-dir", &data, "--admin-key", "k"])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ])
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a ledger");
    let url = format!("https://127.0.0.1:{grpc}");
    let health = |extra: &[&str]| {
        syft_router()
            .args(["health", "--url", &url, "--ca", &ca_pem, "--timeout", "2s"])
            .args(extra)
            .output()
            .expect("run health")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let named = loop {
        let out = health(&["--server-name", "ledger.syft.example"]);
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let by_address = health(&[]);
    let _ = ledger.kill();
    let _ = ledger.wait();
    assert!(
        named.status.success(),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    assert_contains(&String::from_utf8_lossy(&named.stdout), &["SERVING"]);
    assert!(!by_address.status.success());
    assert_contains(
        &String::from_utf8_lossy(&by_address.stderr),
        &["not valid for name"],
    );
}
