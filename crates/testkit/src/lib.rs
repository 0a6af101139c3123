//! The workspace's test kit, used by the ledger's, the router's and the binary's tests: real parts
//! only. A fresh SQLite file or Postgres database per test ([`Db`]), the ledger and the router
//! served on 127.0.0.1:0 ([`LedgerServer`], [`RouterHandle`]), an in-process OpenAI-compatible
//! upstream that can be told to misbehave ([`FakeUpstream`]), account and token set-up over the
//! ledger's gRPC API, and the money checks every test ends with ([`assert_consistent`]).
//!
//! The ledger and the router are started in one place each ([`serve_ledger`], [`serve_router`]).

mod db;
mod dev;
mod ledger;
mod probe;
mod redis;
pub mod req;
mod router;
mod skip;
mod suites;
mod upstream;
mod webhook;

pub use db::{assert_no_problems, bench_totals, postgres_url, Db};
pub use dev::{DevProcess, LedgerProcess};
pub use ledger::{
    account, alerts_on, all_usage, create_account, deposit, issue_token, ledger_config, paid,
    revoke_token, serve_ledger, transfers_of, usage_of, usage_rows_seen_by, Account, Harness,
    LedgerServer, ALERTS_KEY,
};
pub use ledger::{backdate_transfers, lock_transfers, lock_transfers_for, store_token};
pub use probe::{get_json, get_json_as, get_text, succeeded, wait_http_ok};
pub use redis::{exited_ok, redis_up, shared_redis_answers, OwnRedis, SilentRelay};
pub use router::{
    chat_given_up, chat_request, docs_dir, read_answer, readyz, router_config, search_request,
    serve_router, wait_readyz, Funded, KillableRouter, RouterHandle, Stack, FUNDS, PRICE,
};
pub use skip::{required, skipped, Need};
pub use tempfile::TempDir;
pub use upstream::{FakeUpstream, Mode, CONTENT, SEARCH_HITS, UP_COMPLETION, UP_PROMPT};
pub use webhook::{signature_matches, Received, Reply, WebhookReceiver};

use syft_ledger::Store;

/// The admin key of every ledger the kit starts.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
/// One dollar in micros.
pub const USD: i64 = 1_000_000;

/// The lines a child process writes to `pipe`, read on a thread until the pipe closes (so the
/// child never writes into a closed pipe), as a channel a test can wait on with a deadline.
pub fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end even once nobody listens: a reader that stopped closed the pipe, and
        // the child's next line (`dev` prints after the banner its callers wait for) killed it
        // with a broken pipe.
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// [`lines_of`] a child's stdout, which must be piped.
pub fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    lines_of(child.stdout.take().expect("stdout is piped"))
}

/// [`lines_of`] a child's stderr, which must be piped.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    lines_of(child.stderr.take().expect("stderr is piped"))
}

/// A port that was free a moment ago (for processes that bind it themselves).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct ports that were free a moment ago. All `N` are held at once while they are chosen:
/// separate [`free_port`] calls release each port before the next is picked, so two of them can be
/// the same port, and a second process then fails to bind while the first answers in its place.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port"));
    held.map(|l| l.local_addr().expect("bound port").port())
}

/// The Python of the test virtualenv (`SYFT_SDK_VENV`, default `<repo>/target/sdk-venv`), made
/// by `tests/python/setup-venv.sh` if missing. `None` (with a `SKIPPED` line) when it cannot be
/// made, which fails the test instead when `SYFT_SDK_REQUIRED` is set (CI).
pub fn python_venv(repo: &std::path::Path) -> Option<std::path::PathBuf> {
    let dir = std::env::var("SYFT_SDK_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo.join("target/sdk-venv"));
    let status = std::process::Command::new(repo.join("tests/python/setup-venv.sh"))
        .arg(&dir)
        .status();
    match status {
        Ok(s) if s.success() => Some(dir.join("bin/python")),
        other => {
            // CI (.ci/run sets SYFT_SDK_REQUIRED) must run these tests; elsewhere (no python3 or
            // no PyPI access) they may skip.
            assert!(
                std::env::var("SYFT_SDK_REQUIRED").is_err(),
                "cannot create the Python test virtualenv: {other:?}"
            );
            crate::skipped(
                crate::Need::Python,
                format!("cannot create the Python test virtualenv ({other:?})"),
            );
            None
        }
    }
}

/// Runs `python script args...` on a blocking thread, so the test's servers keep answering it.
pub async fn run_python<I>(
    python: std::path::PathBuf,
    script: std::path::PathBuf,
    args: I,
) -> std::process::Output
where
    I: IntoIterator + Send + 'static,
    I::Item: AsRef<std::ffi::OsStr>,
{
    let run = move || {
        std::process::Command::new(python)
            .arg(script)
            .args(args)
            .output()
    };
    tokio::task::spawn_blocking(run)
        .await
        .expect("join")
        .expect("run python")
}

/// An `http://` URL nothing listens on.
pub fn closed_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// The message of a call that must succeed (the status is in the panic message otherwise).
pub fn ok<T>(result: Result<tonic::Response<T>, tonic::Status>) -> T {
    match result {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("expected success, got {status:?}"),
    }
}

/// The code of a call that must fail.
pub fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(status) => status.code(),
    }
}

/// The status of a call that must fail with `want` (the whole status is shown otherwise).
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    want: tonic::Code,
) -> tonic::Status {
    match result {
        Ok(v) => panic!("expected {want:?}, got {v:?}"),
        Err(status) => {
            assert_eq!(status.code(), want, "{status:?}");
            status
        }
    }
}

/// Starts every call at once, each on a task of its own, and counts the ones that succeeded.
/// Every failure must be one that `expected` accepts: the test fails with the status otherwise.
pub async fn count_succeeded<T, F>(
    calls: impl IntoIterator<Item = F>,
    expected: impl Fn(&tonic::Status) -> bool,
) -> usize
where
    F: std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let mut succeeded = 0;
    for task in tasks {
        match task.await.expect("call task") {
            Ok(_) => succeeded += 1,
            Err(status) => assert!(expected(&status), "unexpected refusal: {status:?}"),
        }
    }
    succeeded
}

/// The `google.rpc.ErrorInfo` reason of a status.
pub fn reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|i| i.reason)
}

/// A limit's refusal (docs/limits.md): `RESOURCE_EXHAUSTED` with the `ErrorInfo` reason `want`
/// and a `QuotaFailure`. Returns the `RetryInfo` delay (`None`: no retry can succeed).
pub fn quota_refusal(status: &tonic::Status, want: &str) -> Option<std::time::Duration> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status).as_deref(), Some(want), "{status:?}");
    assert!(
        status.get_details_quota_failure().is_some(),
        "no QuotaFailure: {status:?}"
    );
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// The money invariants `ledger verify` checks: conservation (deposits = balances), held =
/// pending holds, available >= 0, at most one keyless free usage row per request id and
/// endpoint (a keyed one is one per key) and one row per transfer (refusals aside).
pub async fn assert_consistent(store: &Store) {
    let report = store.verify().await.expect("verify");
    assert!(
        report.is_ok(),
        "ledger inconsistent: {:#?}",
        report.problems
    );
}

/// `ledger verify` reports a problem that says `problem` (after `change`, which made it).
pub async fn assert_verify_sees(store: &Store, problem: &str, change: &dyn std::fmt::Debug) {
    let report = store.verify().await.expect("verify");
    assert!(
        report.problems.iter().any(|p| p.contains(problem)),
        "{change:?}: want {problem:?} in {:?}",
        report.problems
    );
}
