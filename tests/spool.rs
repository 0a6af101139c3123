//! The usage spool's crash test (issue 16), short version of `syft-router bench spool`: a free
//! router with `--usage-spool` killed with SIGKILL and restarted under load (once while the ledger
//! is down too); every answered request's usage row must reach the ledger exactly once, and
//! `ledger verify` must pass.

#[test]
fn spool_survives_kill_9() {
    let Some(db) = syft_testkit::postgres_url() else {
        return;
    };
    let args = ["bench", "spool", "--kills", "4", "--clients", "6", "--json"];
    let (out, totals) = syft_testkit::bench_totals(env!("CARGO_BIN_EXE_syft-router"), &args, &db);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "spool test failed: {totals}\n{stderr}"
    );
    assert_eq!(totals["kills"], 4, "{totals}");
    syft_testkit::assert_no_problems(&totals, &["answered_without_row", "duplicate_rows"]);
    assert!(totals["answered"].as_u64().unwrap_or(0) > 50, "{totals}");
    assert!(
        totals["answered_ledger_down"].as_u64().unwrap_or(0) > 0,
        "{totals}"
    );
}
