//! `syft-router ledger`: serve, and `verify`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use syft_ledger::{LedgerConfig, Store};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LedgerArgs {
    #[command(subcommand)]
    pub action: Option<LedgerAction>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum LedgerAction {
    /// Recompute every balance from the journal and check conservation; exits 1 when the books
    /// are wrong, 2 when they could not be checked (no database, no ledger there, a statement
    /// cancelled).
    Verify {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// postgres://user@host/db or sqlite://path?mode=rwc (default: a SQLite file in the data dir).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Directory for the embedded SQLite database [env: SYFT_DATA_DIR] [default: data].
    /// Refused beside a database URL: give one.
    // The variable is read in `named`, not by clap: an image sets it for the case without a URL
    // (Dockerfile), so only the flag conflicts with one.
    #[arg(long)]
    pub data_dir: Option<String>,
}

/// The longest `--max-hold-ttl` accepted.
const MAX_HOLD_TTL_CEILING: Duration = Duration::from_secs(30 * 86_400);

/// The database a ledger command was given.
enum Named {
    Url(String),
    /// The directory of the embedded SQLite database.
    Dir(String),
}

/// Where the embedded SQLite database lives when neither flag names one.
const DEFAULT_DATA_DIR: &str = "data";

impl DatabaseArgs {
    /// The one database the flags name. `--data-dir` beside a URL is refused: the URL used to
    /// win silently, so a `--data-dir` given with `DATABASE_URL` left in the environment
    /// (another project's) ran the ledger, or checked one, somewhere else. A URL beside
    /// `SYFT_DATA_DIR` wins, as the image's default directory is meant to give way to one.
    fn named(&self) -> anyhow::Result<Named> {
        match (&self.database_url, &self.data_dir) {
            (Some(_), Some(_)) => anyhow::bail!(
                "--data-dir and a database URL (--database-url or DATABASE_URL) both name the \
                 ledger's database: give one"
            ),
            (Some(url), None) => Ok(Named::Url(url.clone())),
            (None, Some(dir)) => Ok(Named::Dir(dir.clone())),
            (None, None) => Ok(Named::Dir(
                std::env::var("SYFT_DATA_DIR")
                    .ok()
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| DEFAULT_DATA_DIR.to_owned()),
            )),
        }
    }

    pub fn url(&self) -> anyhow::Result<String> {
        let dir = match self.named()? {
            Named::Url(url) => return Ok(url),
            Named::Dir(dir) => dir,
        };
        super::create_private_dir(&dir)?;
        Ok(format!("sqlite://{dir}/ledger.db?mode=rwc"))
    }

    /// [`Self::url`] of a ledger that must already exist: a check of a data directory with no
    /// ledger in it (a typo, the wrong working directory) is refused. It used to create an empty
    /// database there and report it consistent, exit 0.
    pub fn existing_url(&self) -> anyhow::Result<String> {
        let dir = match self.named()? {
            Named::Url(url) => return Ok(url),
            Named::Dir(dir) => dir,
        };
        let file = std::path::Path::new(&dir).join("ledger.db");
        anyhow::ensure!(
            file.is_file(),
            "no ledger database at {} (pass the ledger's --data-dir, or --database-url)",
            file.display()
        );
        Ok(format!("sqlite://{}?mode=rw", file.display()))
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub listen: super::serve::LedgerServe,
    /// Serve the Syft accounting REST API (what syft-accounting-sdk speaks) on the HTTP port.
    #[arg(long, env = "SYFT_LEDGER_ACCOUNTING_API", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub accounting_api: bool,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Admin bearer key (create accounts, deposit, read everything). Unset: admin calls are refused.
    #[arg(
        long,
        env = "SYFT_LEDGER_ADMIN_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_key: String,
    /// File holding the admin key (Docker/Kubernetes secrets), instead of the value.
    #[arg(long, env = "SYFT_LEDGER_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<std::path::PathBuf>,
    /// Accounting backend: `local` (balances in the database) or `hosted` (a remote service that
    /// speaks the Syft accounting REST API; see docs/hosted.md).
    #[arg(long, env = "SYFT_LEDGER_BACKEND", default_value = "local", value_parser = ["local", "hosted"])]
    pub backend: String,
    /// hosted: base URL of the accounting service.
    #[arg(long, env = "SYFT_ACCOUNTING_URL")]
    pub accounting_url: Option<String>,
    /// hosted: the router owner's email there.
    #[arg(long, env = "SYFT_ACCOUNTING_EMAIL")]
    pub accounting_email: Option<String>,
    /// hosted: the router owner's password there (prefer the env var). Routers authenticate to
    /// this ledger with the same password.
    #[arg(long, env = "SYFT_ACCOUNTING_PASSWORD", hide_env_values = true)]
    pub accounting_password: Option<String>,
    /// hosted: file holding that password, instead of the value.
    #[arg(long, env = "SYFT_ACCOUNTING_PASSWORD_FILE")]
    pub accounting_password_file: Option<std::path::PathBuf>,
    /// hosted: timeout of one call to the accounting service.
    #[arg(long, env = "SYFT_ACCOUNTING_TIMEOUT", default_value = "10s", value_parser = super::parse_duration)]
    pub accounting_timeout: Duration,
    /// Default lifetime of a hold (e.g. 300s, 5m).
    #[arg(long, env = "SYFT_LEDGER_HOLD_TTL", default_value = "5m", value_parser = super::parse_duration)]
    pub hold_ttl: Duration,
    /// Longest hold a caller may request.
    #[arg(long, env = "SYFT_LEDGER_MAX_HOLD_TTL", default_value = "24h", value_parser = super::parse_duration)]
    pub max_hold_ttl: Duration,
    /// How often expired holds are cancelled and expired answers purged.
    #[arg(long, env = "SYFT_LEDGER_SWEEP_INTERVAL", default_value = "1s", value_parser = super::parse_duration)]
    pub sweep_interval: Duration,
    /// Currency of new accounts: a 3-letter code, as routers price in.
    #[arg(long, env = "SYFT_LEDGER_CURRENCY", default_value = "USD", value_parser = parse_currency)]
    pub currency: String,
    /// Largest single amount in micros (deposit, hold, spend limit).
    #[arg(
        long,
        env = "SYFT_LEDGER_MAX_AMOUNT_MICROS",
        default_value_t = 1_000_000_000_000,
        value_parser = clap::value_parser!(i64).range(1..)
    )]
    pub max_amount_micros: i64,
    /// Postgres connection pool size.
    #[arg(long, env = "SYFT_LEDGER_DB_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Postgres write batches in flight at once: fewer = bigger batches and fewer commits.
    #[arg(long, env = "SYFT_LEDGER_BATCH_WORKERS", default_value_t = syft_ledger::store::DEFAULT_BATCH_WORKERS)]
    pub batch_workers: usize,
    /// PEM CA: require client certificates signed by it (mutual TLS, e.g. with the router).
    #[arg(long, env = "SYFT_LEDGER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Wrong credentials one client address may send per 5 minutes; past that, every
    /// authentication from the address is refused (429 / RESOURCE_EXHAUSTED) until the window
    /// ends. Clients behind one proxy share its address. 0: no limit.
    #[arg(long, env = "SYFT_LEDGER_AUTH_FAILURES_PER_ADDRESS", default_value_t = syft_ledger::DEFAULT_AUTH_FAILURES_PER_ADDRESS)]
    pub auth_failures_per_address: u32,
    /// Accounts one client address may create through open registration (`POST /user/create`)
    /// per 5 minutes; past that, 429 / RATE_LIMITED until the window ends. Clients behind one
    /// proxy share its address. 0: no limit.
    #[arg(long, env = "SYFT_LEDGER_ACCOUNTS_PER_ADDRESS", default_value_t = syft_ledger::DEFAULT_ACCOUNTS_PER_ADDRESS)]
    pub accounts_per_address: u32,
    /// Bearer token `GET /metrics` asks for (Prometheus: `authorization: {credentials: …}`).
    /// Unset: open to whoever reaches the HTTP port, which on a ledger shared by several owners
    /// shows each app's captured money to all of them.
    #[arg(
        long,
        env = "SYFT_LEDGER_METRICS_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub metrics_token: String,
    /// File holding the metrics token, instead of the value.
    #[arg(long, env = "SYFT_LEDGER_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub alerts: AlertsFlags,
}

/// Webhook alerts (docs/alerts.md); off until an alerts key is given.
#[derive(Args, Debug, Clone)]
pub struct AlertsFlags {
    /// Seals webhook signing secrets at rest (at least 16 characters); alerts are off without
    /// it. Changing it makes existing endpoints undeliverable (remove and add them again).
    #[arg(long, env = "SYFT_LEDGER_ALERTS_KEY", hide_env_values = true)]
    pub alerts_key: Option<String>,
    /// File holding the alerts key, instead of the value.
    #[arg(long, env = "SYFT_LEDGER_ALERTS_KEY_FILE")]
    pub alerts_key_file: Option<PathBuf>,
    /// Hosts webhooks may reach over http and at private or loopback addresses (comma list,
    /// e.g. 127.0.0.1,localhost), for local use; every other endpoint must be public https.
    #[arg(long, env = "SYFT_LEDGER_ALERTS_ALLOW_HOSTS", value_delimiter = ',', value_parser = syft_ledger::alerts::target::parse_allowed_host)]
    pub alerts_allow_host: Vec<String>,
    /// Delay before each retry of a failed delivery; after the last the event is given up.
    #[arg(long, env = "SYFT_LEDGER_ALERTS_RETRY_SCHEDULE", default_value = "5s,30s,2m,10m,30m,1h,2h,4h,8h,8h,8h", value_parser = syft_ledger::alerts::parse_schedule)]
    pub alerts_retry_schedule: std::vec::Vec<Duration>,
    /// Time budget of one delivery attempt.
    #[arg(long, env = "SYFT_LEDGER_ALERTS_TIMEOUT", default_value = "5s", value_parser = super::parse_duration)]
    pub alerts_timeout: Duration,
    /// An endpoint failing without any success for this long is disabled (its owner is told).
    #[arg(long, env = "SYFT_LEDGER_ALERTS_DISABLE_AFTER", default_value = "72h", value_parser = super::parse_duration)]
    pub alerts_disable_after: Duration,
    /// How often alert rules are evaluated.
    #[arg(long, env = "SYFT_LEDGER_ALERTS_EVALUATE_INTERVAL", default_value = "5s", value_parser = super::parse_duration)]
    pub alerts_evaluate_interval: Duration,
    /// Default cap of delivery attempts per endpoint per minute (1 to 600).
    #[arg(long, env = "SYFT_LEDGER_ALERTS_RATE_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub alerts_rate_per_minute: u32,
    /// Random spread of each retry delay, in percent either side (0 to 100; 0: none).
    #[arg(long, env = "SYFT_LEDGER_ALERTS_JITTER_PERCENT", default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub alerts_jitter_percent: u8,
}

impl AlertsFlags {
    pub fn config(&self) -> anyhow::Result<syft_ledger::alerts::AlertsConfig> {
        let key = super::secret(
            self.alerts_key.as_deref(),
            self.alerts_key_file.as_ref(),
            "--alerts-key",
        )?
        .map(|k| syft_ledger::alerts::SealKey::from_passphrase(&k).map(std::sync::Arc::new))
        .transpose()?;
        Ok(syft_ledger::alerts::AlertsConfig {
            key,
            allowed_hosts: self.alerts_allow_host.clone(),
            retry_schedule: self.alerts_retry_schedule.clone(),
            request_timeout: self.alerts_timeout,
            disable_after: self.alerts_disable_after,
            evaluate_interval: self.alerts_evaluate_interval,
            rate_per_minute: self.alerts_rate_per_minute,
            jitter_percent: self.alerts_jitter_percent,
            ..Default::default()
        })
    }
}

impl ServeArgs {
    pub fn config(&self) -> anyhow::Result<LedgerConfig> {
        let hosted = match self.backend.as_str() {
            "hosted" => {
                let password = super::secret(
                    self.accounting_password.as_deref(),
                    self.accounting_password_file.as_ref(),
                    "--accounting-password",
                )?;
                let (Some(url), Some(email), Some(password)) =
                    (&self.accounting_url, &self.accounting_email, &password)
                else {
                    anyhow::bail!("backend hosted needs SYFT_ACCOUNTING_URL, SYFT_ACCOUNTING_EMAIL and SYFT_ACCOUNTING_PASSWORD");
                };
                if self.accounting_api {
                    anyhow::bail!("--accounting-api serves local accounting; it cannot be combined with backend hosted");
                }
                let mut hosted = syft_ledger::HostedConfig::new(url, email, password);
                hosted.timeout = self.accounting_timeout;
                // A driver must finish every remote step of one resolution within its lease.
                hosted.lease = (self.accounting_timeout * 12).max(Duration::from_secs(30));
                Some(hosted)
            }
            _ => {
                // Set for a hosted ledger and left under the local backend, they were dropped
                // without a word: the operator got an empty local ledger.
                let set = [
                    ("SYFT_ACCOUNTING_URL", self.accounting_url.is_some()),
                    ("SYFT_ACCOUNTING_EMAIL", self.accounting_email.is_some()),
                    (
                        "SYFT_ACCOUNTING_PASSWORD",
                        self.accounting_password.is_some(),
                    ),
                    (
                        "SYFT_ACCOUNTING_PASSWORD_FILE",
                        self.accounting_password_file.is_some(),
                    ),
                ];
                if let Some((name, _)) = set.iter().find(|(_, given)| *given) {
                    anyhow::bail!(
                        "{name} (or its flag) is set but the backend is {:?}: hosted accounting \
                         needs --backend hosted (SYFT_LEDGER_BACKEND=hosted); unset it for a \
                         local ledger",
                        self.backend
                    );
                }
                None
            }
        };
        // A hold shorter than a second expires before any answer can be captured: every paid
        // request would call its upstream and then fail (a request may ask for 1 s to the max).
        if self.hold_ttl < Duration::from_secs(1) {
            anyhow::bail!("--hold-ttl must be at least 1s");
        }
        if self.hold_ttl > self.max_hold_ttl {
            anyhow::bail!("--hold-ttl must not exceed --max-hold-ttl");
        }
        // Money held for a month is money its payer cannot spend for a month; a bound also keeps
        // every expiry far inside the micros clock (a ten-digit hour count wrapped it).
        if self.max_hold_ttl > MAX_HOLD_TTL_CEILING {
            anyhow::bail!("--max-hold-ttl must be at most 30 days (720h)");
        }
        Ok(LedgerConfig {
            database_url: self.db.url()?,
            admin_key: super::secret(
                Some(&self.admin_key),
                self.admin_key_file.as_ref(),
                "--admin-key",
            )?
            .unwrap_or_default()
            .into(),
            hold_ttl: self.hold_ttl,
            max_hold_ttl: self.max_hold_ttl,
            sweep_interval: self.sweep_interval,
            currency: self.currency.clone(),
            max_amount_micros: self.max_amount_micros,
            max_connections: self.max_connections,
            batch_workers: self.batch_workers,
            accounting_api: self.accounting_api,
            hosted,
            tls: self.listen.tls(self.tls_client_ca.as_ref())?,
            shutdown_grace: self.listen.shutdown_grace,
            http: self.listen.http_limits(),
            alerts: self.alerts.config()?,
            auth_failures_per_address: self.auth_failures_per_address,
            accounts_per_address: self.accounts_per_address,
            metrics_token: super::secret(
                Some(&self.metrics_token),
                self.metrics_token_file.as_ref(),
                "--metrics-token",
            )?
            .unwrap_or_default()
            .into(),
        })
    }
}

pub async fn run(args: LedgerArgs) -> anyhow::Result<()> {
    match args.action {
        Some(LedgerAction::Verify { db, json }) => verify(&db, json).await,
        None => serve(&args.serve).await,
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if config.admin_key.is_empty() {
        tracing::warn!("no admin key set (SYFT_LEDGER_ADMIN_KEY): admin calls will be refused");
    }
    let (grpc, http) = args.listen.bind().await?;
    let listeners = syft_ledger::Listeners::grpc(grpc).with_http(http);
    syft_ledger::serve(config, listeners, super::shutdown_signal()).await?;
    Ok(())
}

/// A 3-letter currency code, upper-cased ([`syft_money::currency_code`]).
fn parse_currency(text: &str) -> Result<String, String> {
    syft_money::currency_code(text.trim()).ok_or_else(|| {
        format!("{text:?} is not a 3-letter currency code (USD, EUR, …), as routers price in")
    })
}

async fn verify(db: &DatabaseArgs, json: bool) -> anyhow::Result<()> {
    let url = db.existing_url()?;
    // Read as it is: an empty or mistyped database used to be given the schema (a "verify" that
    // wrote) and reported consistent, and a ledger one migration behind was migrated under the
    // older replicas still running on it.
    let state = syft_ledger::store::migration_state(&url)
        .await
        .context("cannot open the database")?;
    let Some(state) = state else {
        anyhow::bail!(
            "no ledger in that database (it has no migrations table): check --database-url"
        );
    };
    // A newer binary's database: tables and columns this one cannot read (it said consistent).
    if !state.unknown.is_empty() {
        return Err(syft_ledger::store::newer_database(&state.unknown).into());
    }
    let missing = state.missing;
    anyhow::ensure!(
        missing.is_empty(),
        "the database lacks migrations {missing:?} of this binary: verify it with the binary its \
         ledger runs, or start the upgraded ledger first (verify does not migrate; \
         docs/operations.md, \"Upgrades\")"
    );
    let store = Store::inspect(&url).await?;
    let report = store.verify().await?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": report.is_ok(),
                "accounts": report.accounts,
                "transfers": report.transfers,
                "pending_transfers": report.pending_transfers,
                "hosted_transfers": report.hosted_transfers,
                "hosted_pending": report.hosted_pending,
                "total_deposits_micros": report.total_deposits,
                "total_balances_micros": report.total_balances,
                "total_held_micros": report.total_held,
                "problems": report.problems,
            })
        );
    } else {
        use syft_ledger::money::format_micros;
        println!("accounts            {}", report.accounts);
        println!(
            "transfers           {} ({} pending)",
            report.transfers, report.pending_transfers
        );
        println!(
            "deposits            {}",
            format_micros(report.total_deposits)
        );
        println!(
            "balances            {}",
            format_micros(report.total_balances)
        );
        println!("held                {}", format_micros(report.total_held));
        if report.hosted_transfers > 0 {
            // Hosted accounting: the money is on the remote service; only its record is here.
            println!(
                "hosted transfers    {} ({} pending; their money is on the accounting service, \
                 its balances are not checked here)",
                report.hosted_transfers, report.hosted_pending
            );
        }
        for p in &report.problems {
            println!("PROBLEM  {p}");
        }
        println!(
            "{}",
            if report.is_ok() {
                "ledger is consistent"
            } else {
                "LEDGER IS INCONSISTENT"
            }
        );
    }
    store.close().await;
    if !report.is_ok() {
        return Err(super::errors::Inconsistent(report.problems.len()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    /// The alerts settings `syft-router ledger ARGS` would run with, or the refusal.
    fn alerts(args: &[&str]) -> Result<syft_ledger::alerts::AlertsConfig, String> {
        let argv = ["syft-router", "ledger"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Ledger(ledger) = cli.command else {
            return Err("not the ledger command".into());
        };
        ledger.serve.alerts.config().map_err(|e| e.to_string())
    }

    #[test]
    fn alerts_flags_parse_and_bad_values_are_refused() {
        let on = alerts(&[
            "--alerts-key",
            "a-key-of-16-chars-or-more",
            "--alerts-allow-host",
            "127.0.0.1,LocalHost",
            "--alerts-retry-schedule",
            "1s,10s,5m",
            "--alerts-jitter-percent",
            "0",
        ])
        .expect("valid flags");
        assert!(on.key.is_some());
        assert_eq!(on.allowed_hosts, ["127.0.0.1", "localhost"]);
        assert_eq!(
            on.retry_schedule,
            [1, 10, 300].map(std::time::Duration::from_secs)
        );
        assert_eq!((on.jitter_percent, on.rate_per_minute), (0, 60));
        let off = alerts(&[]).expect("defaults");
        assert!(off.key.is_none());
        assert_eq!(off.retry_schedule.len(), 11);
        assert_eq!(off.jitter_percent, 20);

        for (bad, says) in [
            (&["--alerts-key", "short"][..], "16 characters"),
            (
                &["--alerts-key", "k", "--alerts-key-file", "/dev/null"],
                "not both",
            ),
            (&["--alerts-retry-schedule", "5x"], "unit"),
            (&["--alerts-retry-schedule", "5s,0s"], "more than 0"),
            (&["--alerts-retry-schedule", ""], "needs a unit"),
            (&["--alerts-allow-host", "http://localhost"], "bare host"),
            (&["--alerts-allow-host", "127.0.0.1,"], "empty"),
            (&["--alerts-allow-host", "*.internal"], "wildcard"),
            (&["--alerts-rate-per-minute", "0"], "0"),
            (&["--alerts-rate-per-minute", "601"], "601"),
            (&["--alerts-jitter-percent", "101"], "101"),
            (&["--alerts-timeout", "0"], "0"),
        ] {
            match alerts(bad) {
                Ok(_) => panic!("{bad:?} accepted"),
                Err(e) => assert!(e.contains(says), "{bad:?}: {e}"),
            }
        }
    }
}
