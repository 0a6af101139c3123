//! An independent implementation verifies the ledger's webhook signatures: the `standardwebhooks`
//! Python package (the Standard Webhooks reference library) in the test virtualenv made by
//! `tests/python/setup-venv.sh`. SKIPPED without Python or PyPI, unless SYFT_SDK_REQUIRED is set.

mod alerts_support;

use std::path::{Path, PathBuf};

use alerts_support::*;
use syft_proto::ledger as pb;
use syft_testkit::{Harness, WebhookReceiver, USD};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv_python() -> Option<PathBuf> {
    syft_testkit::python_venv(&repo())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standardwebhooks_verifies_our_signatures() {
    let Some(python) = venv_python() else { return };
    let h = Harness::with(false, alerts_on).await.expect("harness");
    let rx = WebhookReceiver::start().await;
    let alice = h.account(ALICE, 10 * USD).await;
    let (ep, old) = add_balance_low(&h, &alice, &rx.url).await;
    let new = rotate(&h, &alice, &ep, 600).await.secret;
    alerts(&h, &alice)
        .send_test_alert(pb::SendTestAlertRequest { endpoint_id: ep })
        .await
        .expect("test event");
    let got = rx
        .wait_until(WAIT, "the test event", |r| !r.is_empty())
        .await;
    let hit = &got[0];
    let entry = |secret: &str, body: &str, expect: &str| serde_json::json!({"secret": secret, "headers": hit.headers, "body": body, "expect": expect});
    let tampered = hit.body.replace("test event", "tampered");
    let captured = serde_json::json!([
        entry(&old, &hit.body, "valid"),
        entry(&new, &hit.body, "valid"),
        entry(&new, &tampered, "invalid"),
        entry(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            &hit.body,
            "invalid"
        ),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("captured.json");
    std::fs::write(&file, captured.to_string()).expect("write");
    let script = repo().join("tests/python/verify_webhook.py");
    let output = syft_testkit::run_python(python, script, [file]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("webhooks: ok (4 checked)"), "{stdout}");
    h.finish().await;
}
