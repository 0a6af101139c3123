//! Compatibility with the published Python client: `tests/python/sdk_compat.py` drives a ledger's
//! accounting REST API with `syft-accounting-sdk` 0.1.1 from PyPI, in a virtualenv made by
//! `tests/python/setup-venv.sh` (`.ci/run` makes it first; this test makes it if it is missing).

use std::path::{Path, PathBuf};
use std::process::Command;

use syft_testkit::{Harness, ADMIN_KEY};

fn venv_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var("SYFT_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/sdk-venv"));
    let status = Command::new(root.join("tests/python/setup-venv.sh"))
        .arg(&dir)
        .status();
    match status {
        Ok(s) if s.success() => Some(dir.join("bin/python")),
        other => {
            // CI (.ci/run sets SYFT_SDK_REQUIRED) must run this test; elsewhere (no python3 or no
            // PyPI access) it may skip.
            assert!(
                std::env::var("SYFT_SDK_REQUIRED").is_err(),
                "cannot create the SDK virtualenv: {other:?}"
            );
            eprintln!("SKIPPED: cannot create the syft-accounting-sdk virtualenv ({other:?})");
            None
        }
    }
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
        let python = python.clone();
        let script = script.clone();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(python)
                .arg(script)
                .arg(url)
                .arg(ADMIN_KEY)
                .output()
        })
        .await
        .expect("join")
        .expect("run python");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("{stdout}");
        assert!(
            output.status.success(),
            "SDK compatibility script failed (postgres: {postgres}):\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains("compatibility: ok"));
        h.finish().await;
    }
}
