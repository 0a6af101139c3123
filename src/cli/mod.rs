//! Command-line interface: flags with matching env vars (docs/design.md §1), dispatch to the libraries.

mod alerts;
mod client;
mod demo;
mod dev;
pub mod errors;
mod health;
pub(crate) mod index;
mod ledger;
mod limits;
mod listings;
mod paging;
mod refund;
mod router;
mod serve;
mod stats;
mod tables;
mod time;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use syft_tls::{ClientTls, ServerTls};

#[derive(Parser, Debug)]
#[command(
    name = "syft-router",
    version,
    about = "Publish a paid LLM chat service: router, ledger and tools"
)]
pub struct Cli {
    /// Log format: text or json (filter with RUST_LOG).
    #[arg(long, global = true, env = "SYFT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the ledger (gRPC), or run a ledger maintenance command.
    Ledger(Box<ledger::LedgerArgs>),
    /// Serve the router (gRPC and the OpenAI-compatible HTTP front).
    Router(router::RouterArgs),
    /// Ledger + router in one process on the embedded defaults (SQLite, echo model), with demo accounts.
    Dev(dev::DevArgs),
    /// Run a short paid-chat scenario on a throwaway embedded stack, print balances and usage, exit.
    Demo(demo::DemoArgs),
    /// Send one chat request to a router.
    Chat(router::ChatArgs),
    /// Account commands (create, show, list, deposit).
    Account(client::AccountArgs),
    /// Delegation tokens (issue, revoke, list).
    Token(client::TokenArgs),
    /// List transfers, newest first.
    Transfers(listings::TransfersArgs),
    /// Give back part or all of what a transfer captured (its recipient, or the admin).
    Refund(refund::RefundArgs),
    /// A transfer's refunds.
    Refunds(refund::RefundsArgs),
    /// Usage rows (one per request), newest first, and totals.
    Usage(listings::UsageArgs),
    /// Build the embedded search index of a folder of documents.
    Index(index::IndexArgs),
    /// Usage analytics: requests, tokens, money and latency grouped by time, app, user, ...
    Stats(stats::StatsArgs),
    /// Benchmarks that drive real servers.
    Bench(crate::bench::BenchArgs),
    /// Check a ledger's or router's gRPC health; exits 0 when SERVING (container healthchecks).
    Health(health::HealthArgs),
    /// Webhook alerts: add, list, remove, enable, test, rotate, deliveries (docs/alerts.md).
    Alerts(alerts::AlertsArgs),
    /// How much of each rate, token and concurrency limit a user has left on a router.
    Limits(limits::LimitsArgs),
}

/// Whether the command only prints what it asked for (a client), rather than serving or driving
/// servers: such a command ends quietly when its output is closed (`syft-router usage | head`).
/// Ends the process as a closed output ends Unix tools: killed by SIGPIPE (exit 141 should
/// the signal not kill it).
pub fn die_of_a_closed_output() -> ! {
    // SAFETY: `signal`, `sigemptyset`, `sigaddset`, `pthread_sigmask` and `raise` may be called
    // at any time; this sets SIGPIPE's default action (nothing in this process installs a
    // handler), unblocks it in this thread should the parent have blocked it, and raises it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(141)
}

/// `ledger verify`, whose exit code tells broken books (1) from a check that did not run (2).
pub fn is_verify(command: &Command) -> bool {
    matches!(command, Command::Ledger(args) if matches!(args.action, Some(ledger::LedgerAction::Verify { .. })))
}

pub fn prints_and_exits(command: &Command) -> bool {
    // Every command but those that serve or drive servers (listed, so a new client command is
    // one by default).
    !matches!(
        command,
        Command::Ledger(_)
            | Command::Router(_)
            | Command::Dev(_)
            | Command::Demo(_)
            | Command::Bench(_)
    )
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ledger(args) => ledger::run(*args).await,
        Command::Router(args) => router::run(args).await,
        Command::Dev(args) => dev::dev(args).await,
        Command::Demo(args) => demo::demo(args).await,
        Command::Chat(args) => router::chat(args).await,
        Command::Account(args) => client::account(args).await,
        Command::Token(args) => client::token(args).await,
        Command::Transfers(args) => listings::transfers(args).await,
        Command::Refund(args) => refund::refund(args).await,
        Command::Refunds(args) => refund::refunds(args).await,
        Command::Usage(args) => listings::usage(args).await,
        Command::Index(args) => index::run(args).await,
        Command::Stats(args) => stats::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Health(args) => health::run(args).await,
        Command::Alerts(args) => alerts::alerts(args).await,
        Command::Limits(args) => limits::run(args).await,
    }
}

/// The service name traces are exported under (unless `OTEL_SERVICE_NAME` says otherwise).
pub fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Ledger(_) => "syft-ledger",
        Command::Router(_) => "syft-router",
        Command::Dev(_) | Command::Demo(_) => "syft-dev",
        _ => "syft-cli",
    }
}

/// The log filter when `RUST_LOG` is unset: servers log requests (`info`); commands that print
/// their own output to people (`dev`'s banner, client commands) only warn; `demo`, whose story
/// prints its failures itself (the simulated upstream error), logs only errors.
pub fn default_log_filter(command: &Command) -> &'static str {
    match command {
        // sqlx warns of each statement over a second with its whole text: a verify of a large
        // ledger printed 18 KB of SQL to stderr around a 156-byte report.
        command if is_verify(command) => "warn,sqlx=error",
        Command::Ledger(_) | Command::Router(_) => syft_telemetry::SERVER_FILTER,
        Command::Demo(_) => "error",
        _ => "warn",
    }
}

/// Creates a data directory readable by its owner only (0700 on Unix): the SQLite ledger in it
/// holds stored answers, usage and secret hashes, and the process' umask left it world-readable
/// (0755, the files 0644). A directory that already exists keeps its mode: the operator's choice.
pub fn create_private_dir(dir: &str) -> anyhow::Result<()> {
    syft_server::create_private_dir(std::path::Path::new(dir))
        .with_context(|| format!("cannot create data dir {dir}"))
}

/// Parses `90`, `90s`, `5m`, `2h`, `7d` or `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(text)?;
    if d.is_zero() {
        return Err("duration must be positive".into());
    }
    Ok(d)
}

/// [`parse_duration`], at most 30 days (the router's config bound, `config/bounds.rs`):
/// `--http-idle-timeout`, which the router checked and the ledger took unbounded (the README
/// says 30 days of both).
pub fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    const MAX_IDLE: Duration = Duration::from_secs(30 * 86_400);
    let d = parse_duration(text)?;
    if d > MAX_IDLE {
        return Err(format!(
            "at most 30 days ({} s); got {} s",
            MAX_IDLE.as_secs(),
            d.as_secs()
        ));
    }
    Ok(d)
}

/// The longest duration a flag takes: a century. Past about 2.9 × 10¹¹ years a duration added to
/// the clock overflowed: a panic at start (`--shutdown-grace` with a spool) or in every HTTP
/// connection (`--http-idle-timeout`).
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// [`parse_duration`], where `0s` means "none" (`--answer-retention 0s`: nothing stored).
pub fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    let d = parse_any_duration(text)?;
    if d > MAX_DURATION {
        return Err(format!(
            "duration {:?} is too long (at most 36500d)",
            text.trim()
        ));
    }
    Ok(d)
}

fn parse_any_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let seconds = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {text:?} is too long"))
    };
    match unit {
        "" | "s" => seconds(1),
        "ms" => Ok(Duration::from_millis(n)),
        "us" => Ok(Duration::from_micros(n)),
        "m" => seconds(60),
        "h" => seconds(3600),
        // `--since 7d` takes days, so `token issue --ttl 7d` does too.
        "d" => seconds(86_400),
        _ => Err(format!(
            "invalid duration unit in {text:?}: use us, ms, s, m, h or d"
        )),
    }
}

/// Listener TLS from `--tls-cert`/`--tls-key` (both or neither) and an optional client CA.
pub fn server_tls(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    client_ca: Option<&PathBuf>,
) -> anyhow::Result<Option<ServerTls>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(
            ServerTls::from_files(cert, key, client_ca.map(PathBuf::as_path))
                .context("TLS configuration")?,
        )),
        (None, None) if client_ca.is_some() => {
            anyhow::bail!("a client CA needs TLS: set --tls-cert and --tls-key too")
        }
        (None, None) => Ok(None),
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key"),
    }
}

/// Client TLS for an `https://` URL: a CA to trust and an optional client certificate; `None`
/// when nothing is set (the public web PKI roots are then used for `https://`).
pub fn client_tls(
    ca: Option<&PathBuf>,
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
) -> anyhow::Result<Option<ClientTls>> {
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    Ok(Some(
        ClientTls::from_files(
            ca.map(PathBuf::as_path),
            cert.map(PathBuf::as_path),
            key.map(PathBuf::as_path),
        )
        .context("client TLS configuration")?,
    ))
}

/// Resolves with the first SIGINT or SIGTERM. The handlers are installed when this is called
/// (not when first polled), so a signal that arrives while the server starts is not fatal.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (mut int, mut term) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = int => {},
                _ = term => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
    }
}

/// A secret given as a value (flag or env var) or as a file, as container platforms mount them;
/// a trailing newline in the file is not part of the secret.
pub fn secret(
    value: Option<&str>,
    file: Option<&PathBuf>,
    flag: &str,
) -> anyhow::Result<Option<String>> {
    match (value.filter(|v| !v.is_empty()), file) {
        (Some(_), Some(_)) => anyhow::bail!("give {flag} or {flag}-file, not both"),
        (Some(v), None) => Ok(Some(v.to_string())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {flag}-file {}", path.display()))?;
            let text = text.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!text.is_empty(), "{flag}-file {} is empty", path.display());
            Ok(Some(text.to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// Every usage row status, for `--status` (an unknown one is refused, not answered with nothing).
pub fn usage_statuses() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        syft_error::UsageStatus::ALL.map(syft_error::UsageStatus::as_str),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_values_or_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(
            secret(None, Some(&path), "--k").unwrap(),
            Some("s3cret".into())
        );
        assert_eq!(secret(Some("v"), None, "--k").unwrap(), Some("v".into()));
        assert_eq!(secret(Some(""), None, "--k").unwrap(), None);
        assert!(secret(Some("v"), Some(&path), "--k").is_err());
        std::fs::write(&path, "\n").unwrap();
        assert!(secret(None, Some(&path), "--k").is_err());
        assert!(secret(None, Some(&dir.path().join("missing")), "--k").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_new_data_dir_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data/nested");
        create_private_dir(&data.display().to_string()).unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        // An existing one keeps its mode.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
        create_private_dir(&data.display().to_string()).unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750, "{mode:o}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        let long = parse_duration("99999999999999999999h").unwrap_err();
        assert!(long.contains("invalid duration"), "{long}");
        let long = parse_duration("9999999999999999999h").unwrap_err();
        assert!(long.contains("too long"), "{long}");
        // Past a century: it overflowed the clock where a flag's duration was added to it.
        for huge in ["18446744073709551615s", "36501d"] {
            let long = parse_duration(huge).unwrap_err();
            assert!(long.contains("too long"), "{huge}: {long}");
        }
        assert!(parse_duration("36500d").is_ok());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("-1s").is_err());
        // The ledger's and the router's --http-idle-timeout: 30 days at most, said with the value.
        assert_eq!(
            parse_idle_timeout("30d"),
            Ok(Duration::from_secs(30 * 86_400))
        );
        let long = parse_idle_timeout("40d").unwrap_err();
        assert!(
            long.contains("at most 30 days") && long.contains("got 3456000 s"),
            "{long}"
        );
        assert!(parse_idle_timeout("0s").is_err());
    }
}
