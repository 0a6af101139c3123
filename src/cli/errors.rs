//! Errors of client commands in the user's terms: one line, the cause once, and a hint, instead
//! of gRPC code names and transport internals (`tonic::transport::Error(…)`).

use std::error::Error as _;

/// Which server a client command talked to, to name it and the flag that points at it.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    Ledger,
    Router,
}

impl Server {
    /// Its name, and the flag (with its variable) that points at it.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Server::Ledger => ("ledger", "--ledger-url (SYFT_LEDGER_URL)"),
            Server::Router => ("router", "--router-url (SYFT_ROUTER_URL)"),
        }
    }
}

/// One line for a failed call to `server` at `url`.
pub fn describe(status: &tonic::Status, server: Server, url: &str) -> String {
    use tonic::Code;
    let msg = status.message();
    let (name, url_flag) = server.names();
    let reason = status
        .metadata()
        .get("x-syft-error-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match status.code() {
        Code::Unavailable if is_transport(status) => format!(
            "cannot reach the {name} at {url} ({}): is the {name} running there? (set {})",
            root_cause(status).unwrap_or_else(|| status.message().to_string()),
            url_flag
        ),
        Code::Unavailable => format!("unavailable: {msg}"),
        Code::DeadlineExceeded => format!("the {name} at {url} did not answer in time"),
        Code::Unauthenticated => format!(
            "the {name} refused the credentials: {msg} (check --secret / SYFT_SECRET, or --admin-key / SYFT_LEDGER_ADMIN_KEY)"
        ),
        Code::PermissionDenied => format!("not allowed: {msg}"),
        Code::NotFound => format!("not found: {msg}"),
        Code::AlreadyExists => format!("already exists: {msg}"),
        Code::InvalidArgument => format!("invalid request: {msg}"),
        Code::ResourceExhausted => format!("too many requests: {msg}"),
        Code::FailedPrecondition if reason == "PAYMENT_REQUIRED" => {
            // The router's message may already say it.
            let msg = msg.strip_prefix("payment required: ").unwrap_or(msg);
            format!("payment required: {msg}")
        }
        Code::FailedPrecondition => format!("refused: {msg}"),
        Code::Unimplemented => format!("the server at {url} is not a {name} ({msg})"),
        _ if msg.is_empty() => format!("the {name} failed ({})", status.code().description()),
        _ => format!("the {name} failed: {msg}"),
    }
}

/// `ledger verify` found the books wrong: exit 1. Any other failure of `verify` (the database
/// unreachable, a statement cancelled, no ledger there) is "could not check", exit 2, so that a
/// nightly job tells broken books from a check that did not run (both were 1).
#[derive(Debug)]
pub struct Inconsistent(pub usize);

impl std::fmt::Display for Inconsistent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} problems found", self.0)
    }
}

impl std::error::Error for Inconsistent {}

/// The exit code of a failed command: 2 for a `verify` that could not check, 1 otherwise.
pub fn exit_code(err: &anyhow::Error, verifying: bool) -> u8 {
    if verifying && !err.is::<Inconsistent>() {
        2
    } else {
        1
    }
}

/// [`describe`] as an error.
pub fn rpc(status: tonic::Status, server: Server, url: &str) -> anyhow::Error {
    anyhow::anyhow!(describe(&status, server, url))
}

/// Whether the call never reached the server (the status was made by the client's transport).
fn is_transport(status: &tonic::Status) -> bool {
    status.source().is_some()
        || [
            "tcp connect error",
            "error trying to connect",
            "transport error",
        ]
        .iter()
        .any(|m| status.message().contains(m))
}

/// Whether the call failed while connecting, so the server never saw it.
pub fn never_sent(status: &tonic::Status) -> bool {
    let connect =
        |text: &str| text.contains("error trying to connect") || text.contains("tcp connect error");
    connect(status.message())
        || std::iter::successors(status.source(), |e| (*e).source())
            .any(|e| connect(&e.to_string()))
}

/// The innermost cause of a transport failure, e.g. `connection refused`; `None` when `err` has
/// no cause below it.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = err.source()?;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    // `Connection refused (os error 111)` → `connection refused`: the OS code adds nothing here.
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    let first = chars.next()?;
    Some(first.to_lowercase().chain(chars).collect())
}

/// An error and its causes on one line, each cause once: a context that already quotes its
/// source (`cannot read x: No such file or directory (os error 2)`) is not followed by it again.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = anyhow::Error::new(io)
            .context("cannot read ca.pem: No such file or directory")
            .context("client TLS configuration");
        assert_eq!(
            one_line(&err),
            "client TLS configuration: cannot read ca.pem: No such file or directory"
        );
    }

    #[test]
    fn refusals_in_words() {
        let mut status = tonic::Status::failed_precondition("payment required: send a token");
        status
            .metadata_mut()
            .insert("x-syft-error-reason", "PAYMENT_REQUIRED".parse().unwrap());
        assert_eq!(
            describe(&status, Server::Router, "http://r"),
            "payment required: send a token"
        );
        let status = tonic::Status::failed_precondition("insufficient funds");
        assert_eq!(
            describe(&status, Server::Ledger, "http://l"),
            "refused: insufficient funds"
        );
        let status = tonic::Status::unauthenticated("invalid credentials");
        assert!(describe(&status, Server::Ledger, "http://l").contains("SYFT_SECRET"));
    }
}
