//! Account setup shared by `dev`, `demo` and the benchmarks: wait for a ledger, create funded
//! accounts, issue tokens.

use std::time::Duration;

use syft_ledger::client::LedgerClient;
use syft_proto::ledger as pb;

/// Waits until the ledger answers (any answer but `UNAVAILABLE`).
pub async fn wait_for_ledger(client: &mut LedgerClient) -> anyhow::Result<()> {
    for _ in 0..100 {
        match client
            .get_account(pb::GetAccountRequest {
                email: "probe@ledger.local".into(),
            })
            .await
        {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            _ => return Ok(()),
        }
    }
    anyhow::bail!("the ledger did not start")
}

/// Creates an account and deposits `deposit` micros (if positive); returns its secret.
pub async fn create_account(
    admin: &mut LedgerClient,
    email: &str,
    deposit: i64,
) -> anyhow::Result<String> {
    let created = admin
        .create_account(pb::CreateAccountRequest {
            email: email.into(),
            organization: "demo".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    if deposit > 0 {
        admin
            .deposit(pb::DepositRequest {
                email: email.into(),
                amount_micros: deposit,
                idempotency_key: format!("welcome-{email}"),
            })
            .await?;
    }
    Ok(created.secret)
}

/// Issues a token from the client's account to `recipient`.
pub async fn issue_token(sender: &mut LedgerClient, recipient: &str) -> anyhow::Result<String> {
    Ok(sender
        .issue_token(pb::IssueTokenRequest {
            recipient_email: recipient.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token)
}

/// Connects to a ledger database, runs `verify`, and fails unless the ledger is consistent.
pub async fn verify_ledger(database_url: &str) -> anyhow::Result<syft_ledger::store::VerifyReport> {
    let store = syft_ledger::Store::connect(database_url, 2).await?;
    let report = store.verify().await;
    store.close().await;
    let report = report?;
    anyhow::ensure!(report.is_ok(), "ledger inconsistent: {:?}", report.problems);
    Ok(report)
}
