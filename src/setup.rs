//! Account setup shared by `dev`, `demo` and the benchmarks: wait for a ledger, create funded
//! accounts, issue tokens. The ledger calls themselves live in `syft_ledger::client`, which the
//! test kit uses too.

use syft_ledger::client::{self, LedgerClient};
use syft_proto::router as rpb;

/// Waits until the ledger answers (any answer but `UNAVAILABLE`).
pub async fn wait_for_ledger(client: &mut LedgerClient) -> anyhow::Result<()> {
    client::wait_for_ledger(client)
        .await
        .map_err(|_| anyhow::anyhow!("the ledger did not start"))
}

/// Creates an account and deposits `deposit` micros (if positive); returns its secret.
pub async fn create_account(
    admin: &mut LedgerClient,
    email: &str,
    deposit: i64,
) -> anyhow::Result<String> {
    let secret = client::create_account(admin, email, "demo").await?;
    if deposit > 0 {
        client::deposit(admin, email, deposit, &format!("welcome-{email}")).await?;
    }
    Ok(secret)
}

/// Issues a token from the client's account to `recipient`.
pub async fn issue_token(sender: &mut LedgerClient, recipient: &str) -> anyhow::Result<String> {
    Ok(client::issue_token(sender, recipient).await?)
}

/// Connects to a ledger database, runs `verify`, and fails unless the ledger is consistent.
/// After a benchmark run with `--rollups false`: rollups back on and recomputed from the rows, so
/// the run still ends with a full `verify`.
pub async fn restore_rollups(database_url: &str, were_on: bool) -> anyhow::Result<()> {
    if !were_on {
        syft_ledger::store::rollup::set_enabled(true);
        let store = syft_ledger::Store::connect(database_url, 2).await?;
        let rebuilt = store.rebuild_rollups().await;
        store.close().await;
        println!("  rollups rebuilt from {} rows", rebuilt?);
    }
    Ok(())
}

pub async fn verify_ledger(database_url: &str) -> anyhow::Result<syft_ledger::store::VerifyReport> {
    let store = syft_ledger::Store::connect(database_url, 2).await?;
    let report = store.verify().await;
    store.close().await;
    let report = report?;
    anyhow::ensure!(report.is_ok(), "ledger inconsistent: {:?}", report.problems);
    Ok(report)
}

/// A chat of one user message asking for at most `max_tokens`, as `demo` and the benchmarks send
/// it; the caller adds its token and request id.
pub fn user_chat(
    user_email: &str,
    model: &str,
    content: &str,
    max_tokens: u32,
) -> rpb::ChatRequest {
    rpb::ChatRequest {
        user_email: user_email.into(),
        model: model.into(),
        messages: vec![rpb::Message {
            role: "user".into(),
            content: content.into(),
            name: None,
        }],
        options: Some(rpb::ChatOptions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}
