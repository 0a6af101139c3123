//! Compatibility with the published Python client: `tests/python/sdk_compat.py` drives a ledger's
//! accounting REST API with `syft-accounting-sdk` 0.1.1 from PyPI, in a virtualenv made by
//! `tests/python/setup-venv.sh` (`.ci/run` makes it first; this test makes it if it is missing).

use std::path::{Path, PathBuf};
use std::process::Command;

use syft_testkit::{run_python, succeeded, Harness, ADMIN_KEY};

fn venv_python() -> Option<PathBuf> {
    syft_testkit::python_venv(Path::new(env!("CARGO_MANIFEST_DIR")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syft_accounting_sdk_works_unchanged() {
    let Some(python) = venv_python() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_compat.py");
    for postgres in [false, true] {
        let Some(h) = Harness::new(postgres).await else {
            continue;
        };
        let url = h.http_url();
        let what = format!("SDK compatibility script (postgres: {postgres})");
        let args = vec![url, ADMIN_KEY.to_string()];
        let stdout = succeeded(
            &run_python(python.clone(), script.clone(), args).await,
            &what,
        );
        println!("{stdout}");
        assert!(stdout.contains("compatibility: ok"));
        h.finish().await;
    }
}

/// The `dev` stack's own defaults (its owner and user accounts, its token) work with the SDK:
/// `syft-router dev` runs as a user starts it, and `tests/python/sdk_dev_defaults.py` reads the
/// accounts it created (`dev-credentials.json`) through every SDK call that parses an email.
#[test]
fn syft_accounting_sdk_works_with_the_dev_stack_defaults() {
    let Some(python) = venv_python() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir().expect("tempdir");
    let dev = syft_testkit::DevProcess::start(env!("CARGO_BIN_EXE_syft-router"), data.path());
    let output = Command::new(python)
        .arg(root.join("tests/python/sdk_dev_defaults.py"))
        .arg(&dev.ledger_http_url)
        .arg(data.path().join("dev-credentials.json"))
        .output()
        .expect("run python");
    let stdout = succeeded(&output, "SDK against the dev defaults");
    assert!(stdout.contains("dev defaults: ok"), "{stdout}");
    dev.stop();
}

/// The router's syft-llm-router endpoints (`/chat`, `/search`, `/health`) with a Python client
/// that builds its bodies from syft-llm-router's field names, camelCase and snake_case
/// (`tests/python/syft_router_api.py`, standard library only). Paid search and chat, an empty
/// search (voided), and refusals (402, 403, 409, 400) that charge nothing; `ledger verify` after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syft_llm_router_clients_work_against_chat_search_and_health() {
    use syft_router_svc::{Pricing, SearchBackendConfig, SearchConfig};
    use syft_testkit::*;
    let Some(python) = venv_python() else { return };
    let docs = docs_dir(&[
        (
            "ledger.md",
            "The ledger holds money: authorize, then capture or void.",
        ),
        ("router.md", "The router sells chat and search."),
    ]);
    let search = SearchConfig::new(SearchBackendConfig::Docs {
        dir: docs.path().to_path_buf(),
        rescan: std::time::Duration::from_secs(60),
    });
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), move |c| {
        *c = c.clone().with_search(Pricing::per_request(PRICE), search)
    })
    .await;
    let bob = create_account(&s.ledger.url, "bob").await;
    deposit(&s.ledger.url, &bob.email, PRICE / 2).await;
    let bob_token = issue_token(&s.ledger.url, &bob, &s.owner.email).await;
    // /health says "healthy" once the router is ready (its ledger accepted the owner's secret).
    let readyz = format!("{}/readyz", s.router.http_url);
    for _ in 0..100 {
        match reqwest::get(&readyz).await {
            Ok(r) if r.status().is_success() => break,
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/syft_router_api.py");
    let args = vec![
        s.router.http_url.clone(),
        s.alice.email.clone(),
        s.token.clone(),
        bob.email.clone(),
        bob_token,
        PRICE.to_string(),
    ];
    let stdout = succeeded(&run_python(python, script, args).await, "router API script");
    assert!(stdout.contains("router api: ok"), "{stdout}");
    // Two paid searches and two paid chats; the empty search and every refusal cost nothing.
    assert_eq!(
        s.alice_money().await,
        (FUNDS - 4 * PRICE, 0, FUNDS - 4 * PRICE)
    );
    assert_eq!(
        account(&s.ledger.url, &bob.email).await.balance_micros,
        PRICE / 2
    );
    s.check_invariants().await;
}
