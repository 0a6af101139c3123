//! The binary as people use it: `demo`, client commands with `--json`, and `ledger verify`.

mod common;

use std::process::Command;

use common::{Harness, ADMIN_KEY};

fn syft_router() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_syft-router"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run syft-router");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_runs_a_paid_scenario_and_exits_zero() {
    let out = run(syft_router().arg("demo"));
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
    let url = h.url();
    let cli = |args: &[&str]| {
        let mut cmd = syft_router();
        cmd.args(args)
            .env("SYFT_LEDGER_URL", &url)
            .env("SYFT_LEDGER_ADMIN_KEY", ADMIN_KEY)
            .env_remove("SYFT_SECRET");
        cmd
    };
    let created: serde_json::Value = serde_json::from_str(&run(&mut cli(&[
        "account",
        "create",
        "bob@example.com",
        "--json",
    ])))
    .unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    let deposited: serde_json::Value = serde_json::from_str(&run(&mut cli(&[
        "account",
        "deposit",
        "bob@example.com",
        "12.5",
        "--idempotency-key",
        "d1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(deposited["balance_micros"], 12_500_000);
    // Replaying the deposit with the same key does not deposit again.
    run(&mut cli(&[
        "account",
        "deposit",
        "bob@example.com",
        "12.5",
        "--idempotency-key",
        "d1",
    ]));
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
    h.finish().await;
}

/// Starts `syft-router args…`, waits for `ready` on stderr, sends SIGTERM, and returns the exit
/// status and what was logged.
fn sigterm_after(args: &[&str], ready: &str) -> (std::process::ExitStatus, String) {
    use std::io::{BufRead, BufReader};
    let mut child = syft_router()
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn syft-router");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
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

#[test]
fn ledger_and_router_exit_zero_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}/ledger.db?mode=rwc", dir.path().display());
    let (status, log) = sigterm_after(
        &[
            "ledger",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--accounting-api",
            "--database-url",
            &db,
            "--shutdown-grace",
            "5s",
        ],
        "ledger serving",
    );
    assert!(status.success(), "ledger exited {status:?}:\n{log}");
    assert!(log.contains("ledger stopped"), "{log}");

    let (status, log) = sigterm_after(
        &[
            "router",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--owner-email",
            "owner@example.com",
            "--shutdown-grace",
            "5s",
        ],
        "router serving",
    );
    assert!(status.success(), "router exited {status:?}:\n{log}");
    assert!(log.contains("router stopped"), "{log}");
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
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = syft_router()
        .args(["health", "--url", &closed_url, "--timeout", "1s"])
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
    run(&mut setup());
    let again = run(&mut setup());
    assert!(again.contains("already exists"), "{again}");
    let shown = run(syft_router()
        .args(["account", "show", "owner@example.com", "--json"])
        .env("SYFT_LEDGER_URL", &url)
        .env("SYFT_SECRET", "owner-secret-0123456789"));
    assert!(shown.contains("owner@example.com"), "{shown}");
    h.finish().await;
}
