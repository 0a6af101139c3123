//! Small probes the scenarios repeat: a JSON `GET`, a service coming up, a process's success,
//! waiting for a hold.
//! One copy each, so a change of how we probe (a timeout, what a failure prints) is made once.

use std::process::Output;
use std::time::Duration;

use syft_proto::ledger as lpb;

use crate::Stack;

/// `GET url` with `http` (plain or TLS) and its body as JSON; panics naming the URL otherwise.
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    json_of(http.get(url), url).await
}

/// `GET url`'s body as text (a Prometheus scrape); panics naming the URL otherwise.
pub async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("body of {url}: {e}"))
}

/// [`get_json`] with `Authorization: Bearer <token>` (a user's transaction token).
pub async fn get_json_as(http: &reqwest::Client, url: &str, token: &str) -> serde_json::Value {
    json_of(http.get(url).bearer_auth(token), url).await
}

async fn json_of(request: reqwest::RequestBuilder, url: &str) -> serde_json::Value {
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("JSON body of {url}: {e}"))
}

/// Waits until `GET url` answers 2xx (a process started from the command line coming up), at
/// most `within`; panics naming the URL otherwise.
pub async fn wait_http_ok(url: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let answer = reqwest::get(url).await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered 2xx within {within:?}");
}

/// The stdout of a finished process (a Python script, the binary), after asserting it exited 0
/// (`what` names it in the failure, printed with both outputs).
pub fn succeeded(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

impl Stack {
    /// Waits until alice has a pending transfer (a hold was placed), at most `within`; panics
    /// when none came. Scenarios that act between the hold and its capture start with this.
    pub async fn wait_pending(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let transfers = self.transfers().await;
            if transfers
                .iter()
                .any(|t| t.status() == lpb::TransferStatus::Pending)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no hold was placed within {within:?}");
    }
}
