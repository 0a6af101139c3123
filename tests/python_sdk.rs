//! Compatibility with the published Python client: `tests/python/sdk_compat.py` drives a ledger's
//! accounting REST API with `syft-accounting-sdk` 0.1.1 from PyPI, in a virtualenv made by
//! `tests/python/setup-venv.sh` (`.ci/run` makes it first; this test makes it if it is missing).

use std::path::{Path, PathBuf};
use std::process::Command;

use syft_testkit::{Harness, ADMIN_KEY};

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

/// The `dev` stack's own defaults (its owner and user accounts, its token) work with the SDK:
/// `syft-router dev` runs as a user starts it, and `tests/python/sdk_dev_defaults.py` reads the
/// accounts it created (`dev-credentials.json`) through every SDK call that parses an email.
#[test]
fn syft_accounting_sdk_works_with_the_dev_stack_defaults() {
    use std::io::{BufRead, BufReader};
    let Some(python) = venv_python() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir().expect("tempdir");
    let mut dev = Command::new(env!("CARGO_BIN_EXE_syft-router"))
        .arg("dev")
        .args(["--data-dir", &data.path().display().to_string()])
        .args(["--ledger-grpc-addr", "127.0.0.1:0"])
        .args(["--ledger-http-addr", "127.0.0.1:0"])
        .args(["--router-grpc-addr", "127.0.0.1:0"])
        .args(["--router-http-addr", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env_remove("SYFT_ROUTER_CONFIG")
        .env_remove("OPENAI_BASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn syft-router dev");
    // The banner names the ledger's HTTP address. Its reader runs to the end, so `dev` never
    // writes into a closed pipe.
    let stdout = dev.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut http_url = None;
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) {
        if let Some(rest) = line.trim().strip_prefix("ledger  HTTP") {
            http_url = rest.split_whitespace().next().map(str::to_string);
        }
        if line.starts_with("Try it") {
            break;
        }
    }
    let result = http_url.map(|url| {
        Command::new(python)
            .arg(root.join("tests/python/sdk_dev_defaults.py"))
            .arg(url)
            .arg(data.path().join("dev-credentials.json"))
            .output()
            .expect("run python")
    });
    let _ = Command::new("kill")
        .args(["-TERM", &dev.id().to_string()])
        .status();
    let status = dev.wait().expect("wait for dev");
    let output = result.expect("dev printed its ledger HTTP address");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "SDK against the dev defaults failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("dev defaults: ok"), "{stdout}");
    assert!(status.success(), "dev exited {status:?}");
}
