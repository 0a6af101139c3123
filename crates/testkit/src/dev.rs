//! `syft-router dev` as a user starts it, for the binary's own tests (which name the binary:
//! only they know its path).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `syft-router dev`, killed if the test ends without stopping it (a failed
/// assertion): left running, it would hold the test's output open and the run would never end.
pub struct DevProcess {
    child: Child,
    /// The ledger's gRPC and HTTP URLs, read from the banner.
    pub ledger_url: String,
    pub ledger_http_url: String,
}

impl DevProcess {
    /// `bin dev` on `data` with every port picked by the system, once its banner is printed.
    pub fn start(bin: &str, data: &Path) -> DevProcess {
        let child = Command::new(bin)
            .arg("dev")
            .args(["--data-dir", &data.display().to_string()])
            .args(["--ledger-grpc-addr", "127.0.0.1:0"])
            .args(["--ledger-http-addr", "127.0.0.1:0"])
            .args(["--router-grpc-addr", "127.0.0.1:0"])
            .args(["--router-http-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .env_remove("SYFT_ROUTER_CONFIG")
            .env_remove("OPENAI_BASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn syft-router dev");
        let mut dev = DevProcess {
            child,
            ledger_url: String::new(),
            ledger_http_url: String::new(),
        };
        // The reader runs to the end, so `dev` never writes into a closed pipe.
        let rx = crate::stdout_lines(&mut dev.child);
        let url_after = |line: &str, label: &str| {
            let rest = line.trim().strip_prefix(label)?;
            rest.split_whitespace().next().map(str::to_string)
        };
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            if let Some(url) = url_after(&line, "ledger  gRPC") {
                dev.ledger_url = url;
            }
            if let Some(url) = url_after(&line, "ledger  HTTP") {
                dev.ledger_http_url = url;
            }
            if line.starts_with("Try it") {
                break;
            }
        }
        assert!(
            !dev.ledger_url.is_empty() && !dev.ledger_http_url.is_empty(),
            "dev printed no ledger addresses"
        );
        dev
    }

    /// SIGTERM; it must exit cleanly.
    pub fn stop(mut self) {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(kill.success());
        let status = self.child.wait().expect("wait for dev");
        assert!(status.success(), "dev exited {status:?}");
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `syft-router ledger` process on `database_url` (the test's own command: the binary's path,
/// and any environment such as a fake clock), on ports picked a moment before; killed with
/// SIGKILL when dropped or [`LedgerProcess::kill`]ed, as a crash.
pub struct LedgerProcess {
    child: Child,
    pub url: String,
}

impl LedgerProcess {
    /// Starts `command ledger …` and waits until its gRPC API answers the admin.
    pub async fn start(mut command: Command, database_url: &str) -> LedgerProcess {
        let [grpc, http] = crate::free_ports();
        let child = command
            .args(["ledger", "--database-url", database_url])
            .args(["--admin-key", crate::ADMIN_KEY])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--sweep-interval", "1s"])
            .spawn()
            .expect("start a ledger");
        let ledger = LedgerProcess {
            child,
            url: format!("http://127.0.0.1:{grpc}"),
        };
        let mut admin = ledger.client(crate::ADMIN_KEY);
        syft_ledger::client::wait_for_ledger(&mut admin)
            .await
            .expect("the ledger process starts");
        ledger
    }

    pub fn client(&self, secret: &str) -> syft_ledger::client::LedgerClient {
        syft_ledger::client::connect_lazy(&self.url, secret).expect("client")
    }

    /// `kill -9`: whatever it was doing is cut off where it stood.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LedgerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
