//! The usage spool's crash test (issue 16), short version of `syft-router bench spool`: a free
//! router with `--usage-spool` killed with SIGKILL and restarted under load (once while the ledger
//! is down too); every answered request's usage row must reach the ledger exactly once, and
//! `ledger verify` must pass.

use std::process::Command;

#[test]
fn spool_survives_kill_9() {
    let Ok(db) = std::env::var("DATABASE_URL") else {
        eprintln!("SKIPPED: spool_survives_kill_9: DATABASE_URL is not set, Postgres test not run");
        return;
    };
    if !db.starts_with("postgres") {
        eprintln!("SKIPPED: spool_survives_kill_9: DATABASE_URL is not a Postgres URL");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_syft-router"))
        .args(["bench", "spool", "--kills", "4", "--clients", "6", "--json"])
        .env("DATABASE_URL", &db)
        .output()
        .expect("run bench spool");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let totals: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no totals ({e}):\n{stdout}\n{stderr}"));
    eprintln!("{totals}");
    assert!(
        out.status.success(),
        "spool test failed: {totals}\n{stderr}"
    );
    assert_eq!(totals["kills"], 4, "{totals}");
    assert_eq!(totals["answered_without_row"], 0, "{totals}");
    assert_eq!(totals["duplicate_rows"], 0, "{totals}");
    assert_eq!(
        totals["problems"].as_array().map(Vec::len),
        Some(0),
        "{totals}"
    );
    assert!(totals["answered"].as_u64().unwrap_or(0) > 50, "{totals}");
    assert!(
        totals["answered_ledger_down"].as_u64().unwrap_or(0) > 0,
        "{totals}"
    );
}
