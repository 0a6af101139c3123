//! `syft-router dev`: ledger + router in one long-running process on the embedded defaults, and
//! the stack it shares with `demo` (`demo.rs`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use syft_ledger::client::{connect_lazy, LedgerClient};
use syft_ledger::LedgerConfig;
use syft_proto::ledger as lpb;
use syft_router_svc::{Pricing, RouterConfig, SearchBackendConfig, SearchConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::router::RouterSetup;
use super::serve::bind;
use crate::setup::{create_account, issue_token, wait_for_ledger};

const DEV_OWNER: &str = "owner@example.com";
pub(super) const DEV_USER: &str = "alice@example.com";

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Directory for the SQLite database, dev-credentials.json and docs/ (the search service's
    /// documents, watched); kept across restarts.
    #[arg(long, env = "SYFT_DATA_DIR", default_value = "data")]
    data_dir: String,
    /// Database URL, postgres://… or sqlite://… (default: a SQLite file in the data dir).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// The ledger's gRPC listen address.
    #[arg(long, env = "SYFT_LEDGER_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    ledger_grpc_addr: String,
    /// The ledger's HTTP listen address: health and the Syft accounting REST API.
    #[arg(long, env = "SYFT_LEDGER_HTTP_ADDR", default_value = "127.0.0.1:8081")]
    ledger_http_addr: String,
    /// The router's gRPC listen address.
    #[arg(long, env = "SYFT_ROUTER_GRPC_ADDR", default_value = "127.0.0.1:50052")]
    router_grpc_addr: String,
    /// The router's HTTP listen address: the OpenAI-compatible front and health.
    #[arg(long, env = "SYFT_ROUTER_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    router_http_addr: String,
    /// Router config file (default: chat at $0.01 per request on the echo model, and search at
    /// $0.01 per query over DATA_DIR/docs/).
    #[arg(long, env = "SYFT_ROUTER_CONFIG")]
    config: Option<String>,
    /// OpenAI-compatible upstream base URL, e.g. http://127.0.0.1:11434/v1 (default: the
    /// built-in echo model).
    #[arg(long = "upstream-url", env = "OPENAI_BASE_URL")]
    upstream_url: Option<String>,
    /// The models the router sells, comma-separated (with --upstream-url, unless the config
    /// file lists them); `*` passes any model a client names to the upstream.
    #[arg(long, env = "SYFT_ROUTER_MODELS", value_delimiter = ',')]
    models: Vec<String>,
    /// The upstream's API key.
    #[arg(
        long = "upstream-api-key",
        env = "OPENAI_API_KEY",
        hide_env_values = true
    )]
    upstream_api_key: Option<String>,
}

/// What `dev` creates on a new database; kept in the data dir so a restart can reuse it.
#[derive(Serialize, Deserialize)]
struct DevCredentials {
    admin_key: String,
    owner_email: String,
    owner_secret: String,
    user_email: String,
    user_secret: String,
    user_token: String,
    /// Seals the ledger's webhook secrets (alerts are on in `dev`); made on first start, and
    /// added to a data dir made before `dev` had alerts.
    #[serde(default)]
    alerts_key: Option<String>,
}

/// The servers of one process (a ledger, a router), stopped in order by [`Running::shutdown`].
pub(super) struct Running {
    ledgers: Stage,
    routers: Stage,
}

/// Servers stopped together: a signal, and their tasks to wait for.
struct Stage {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Stage {
    fn new() -> Self {
        Self {
            stop: tokio::sync::watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    fn signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

impl Running {
    pub(super) fn new() -> Self {
        Self {
            ledgers: Stage::new(),
            routers: Stage::new(),
        }
    }

    /// Serves a ledger on `addr` (and the accounting REST API on `http_addr`) and returns its
    /// gRPC URL, its HTTP URL and an admin client, once it answers. With `alerts_key`, webhook
    /// alerts are on and may reach this machine (`dev` is for local use: a receiver on
    /// 127.0.0.1 or localhost, over http).
    pub(super) async fn start_ledger(
        &mut self,
        addr: &str,
        http_addr: Option<&str>,
        database_url: &str,
        admin_key: &str,
        alerts_key: Option<&str>,
    ) -> anyhow::Result<(String, Option<String>, LedgerClient)> {
        let listener = bind(addr).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let http_listener = match http_addr {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let http_url = match &http_listener {
            Some(l) => Some(format!("http://{}", l.local_addr()?)),
            None => None,
        };
        let mut alerts = syft_ledger::alerts::AlertsConfig::default();
        if let Some(key) = alerts_key {
            alerts.key = Some(std::sync::Arc::new(
                syft_ledger::alerts::SealKey::from_passphrase(key)?,
            ));
            alerts.allowed_hosts = vec!["127.0.0.1".into(), "localhost".into()];
        }
        let config = LedgerConfig {
            database_url: database_url.to_string(),
            admin_key: admin_key.into(),
            accounting_api: http_listener.is_some(),
            alerts,
            ..LedgerConfig::default()
        };
        let signal = self.ledgers.signal();
        self.ledgers.tasks.push(tokio::spawn(async move {
            let listeners = syft_ledger::Listeners {
                grpc: listener,
                http: http_listener,
            };
            Ok(syft_ledger::serve(config, listeners, signal).await?)
        }));
        let mut admin = connect_lazy(&url, admin_key)?;
        wait_for_ledger(&mut admin).await?;
        Ok((url, http_url, admin))
    }

    pub(super) fn start_router(
        &mut self,
        config: RouterConfig,
        grpc: TcpListener,
        http: TcpListener,
    ) {
        let signal = self.routers.signal();
        self.routers.tasks.push(tokio::spawn(async move {
            Ok(syft_router_svc::serve(config, grpc, http, signal).await?)
        }));
    }

    /// The routers first, then the ledger they record to: a router's requests in flight finish
    /// (within its grace) with the ledger still there to capture, void and take their usage
    /// rows. One signal stopped both, and a free request answered after the ledger had stopped
    /// lost its row (the ledger's drain waits for holds, and a free request has none).
    pub(super) async fn shutdown(self) -> anyhow::Result<()> {
        let routers = self.routers.stop().await;
        let ledgers = self.ledgers.stop().await;
        routers.and(ledgers)
    }
}

/// The price of `demo`'s and `dev`'s search service.
pub(super) fn search_pricing() -> Pricing {
    Pricing {
        description: "$0.01 per search query".into(),
        ..Pricing::per_request(10_000)
    }
}

/// The embedded search backend over the bundled documents written to `docs`.
pub(super) fn bundled_search(docs: &Path, rescan_seconds: u64) -> SearchConfig {
    SearchConfig::new(SearchBackendConfig::Docs {
        dir: docs.to_path_buf(),
        rescan: std::time::Duration::from_secs(rescan_seconds),
    })
}

pub(super) fn random_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    super::create_private_dir(&args.data_dir)?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/ledger.db?mode=rwc", args.data_dir));
    let creds_path = PathBuf::from(&args.data_dir).join("dev-credentials.json");
    let saved: Option<DevCredentials> = std::fs::read_to_string(&creds_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let admin_key = saved
        .as_ref()
        .map(|c| c.admin_key.clone())
        .unwrap_or_else(random_key);
    let alerts_key = saved
        .as_ref()
        .and_then(|c| c.alerts_key.clone())
        .unwrap_or_else(random_key);

    let mut running = Running::new();
    let (ledger_url, ledger_http_url, mut admin) = running
        .start_ledger(
            &args.ledger_grpc_addr,
            Some(&args.ledger_http_addr),
            &database_url,
            &admin_key,
            Some(&alerts_key),
        )
        .await?;

    // A data dir made by an older version keeps its owner (its email may predate today's default).
    let owner_email = saved
        .as_ref()
        .map_or(DEV_OWNER.to_string(), |c| c.owner_email.clone());
    let owner_exists = admin
        .get_account(lpb::GetAccountRequest {
            email: owner_email.clone(),
        })
        .await
        .is_ok();
    let creds = match saved {
        Some(mut c) if owner_exists => {
            if c.alerts_key.is_none() {
                c.alerts_key = Some(alerts_key);
                write_private(&creds_path, &serde_json::to_string_pretty(&c)?)?;
            }
            c
        }
        _ if owner_exists => anyhow::bail!(
            "{} already has dev accounts but {} is missing; delete the data dir to start over",
            without_password(&database_url),
            creds_path.display()
        ),
        _ => {
            let owner_secret = create_account(&mut admin, DEV_OWNER, 0).await?;
            let user_secret = create_account(&mut admin, DEV_USER, 10_000_000).await?;
            let user_token =
                issue_token(&mut connect_lazy(&ledger_url, &user_secret)?, DEV_OWNER).await?;
            let c = DevCredentials {
                admin_key,
                owner_email: DEV_OWNER.into(),
                owner_secret,
                user_email: DEV_USER.into(),
                user_secret,
                user_token,
                alerts_key: Some(alerts_key),
            };
            write_private(&creds_path, &serde_json::to_string_pretty(&c)?)?;
            c
        }
    };

    let setup = RouterSetup {
        ledger_url: vec![ledger_url.clone()],
        ledger_secret: creds.owner_secret.clone(),
        config: args.config.clone(),
        owner_email: args.config.is_none().then(|| creds.owner_email.clone()),
        upstream_url: args.upstream_url.clone(),
        models: args.models.clone(),
        upstream_api_key: args.upstream_api_key.clone(),
        ledger_secret_file: None,
        upstream_api_key_file: None,
        ledger_ca: None,
        ledger_client_cert: None,
        ledger_client_key: None,
        usage_spool: None,
        usage_spool_sync: None,
        answer_retention: syft_router_svc::ReplaySettings::default().retention,
        answer_max_bytes: syft_router_svc::ReplaySettings::default().max_bytes,
    };
    let mut router_config = setup.config()?;
    if args.config.is_none() {
        router_config.name = "dev-router".into();
        router_config = router_config.with_chat_pricing(Pricing {
            description: "$0.01 per chat request".into(),
            ..Pricing::per_request(10_000)
        });
        let docs = PathBuf::from(&args.data_dir).join("docs");
        super::index::write_bundled_docs(&docs)?;
        router_config = router_config.with_search(search_pricing(), bundled_search(&docs, 5));
    }
    let grpc = bind(&args.router_grpc_addr).await?;
    let http = bind(&args.router_http_addr).await?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    running.start_router(router_config, grpc, http);

    let ledger_http_url = ledger_http_url.unwrap_or_default();
    let me = self_command();
    // One write, whose failure is ignored: the banner is for a person at a terminal, and a
    // closed stdout (`dev | head`, a test that stopped reading) must not stop the servers.
    let mut banner = String::new();
    // Writing to a String cannot fail.
    macro_rules! say {
        ($($arg:tt)*) => {
            let _ = std::fmt::Write::write_fmt(&mut banner, format_args!("{}\n", format_args!($($arg)*)));
        };
    }
    say!("syft-router dev is running (Ctrl-C to stop)");
    say!(
        "  ledger  gRPC  {ledger_url}   database {}",
        without_password(&database_url)
    );
    say!("  ledger  HTTP  {ledger_http_url}   (Syft accounting REST API)");
    say!("  router  gRPC  http://{grpc_addr}");
    say!("  router  HTTP  http://{http_addr}/v1/chat/completions   (OpenAI-compatible)");
    say!("                http://{http_addr}/chat /search /health   (syft-llm-router API)");
    say!("  dashboard     {ledger_http_url}/dashboard   (sign in with a secret from the credentials file)");
    say!("  credentials   {}", creds_path.display());
    say!("  logs          warnings only; RUST_LOG=info shows every request");
    say!("");
    say!("Try it (in another terminal):");
    say!(
        "  {me} chat --router-url http://{grpc_addr} --user {} --token {} \"hello\"",
        creds.user_email,
        creds.user_token
    );
    say!("      prints the echoed answer, then its cost (0.01 USD) on stderr");
    say!(
        "  curl -s http://{http_addr}/v1/chat/completions -H 'Authorization: Bearer {}' \\\n       -H 'Content-Type: application/json' -d '{{\"model\":\"echo\",\"user\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'",
        creds.user_token, creds.user_email
    );
    if args.config.is_none() {
        say!(
            "  curl -s http://{http_addr}/search -H 'Content-Type: application/json' \\\n       -d '{{\"userEmail\":\"{}\",\"transactionToken\":\"{}\",\"query\":\"delegation token\"}}'",
            creds.user_email, creds.user_token
        );
        say!(
            "      searches {}/docs ($0.01 per query with results; edit the folder, it is re-indexed)",
            args.data_dir
        );
    }
    say!(
        "  SYFT_LEDGER_URL={ledger_url} SYFT_SECRET={} {me} account show {}",
        creds.user_secret,
        creds.user_email
    );
    say!(
        "      {}'s balance: 10 USD at first, 0.01 less per chat",
        creds.user_email
    );
    say!(
        "  SYFT_LEDGER_URL={ledger_url} SYFT_SECRET={} {me} usage",
        creds.owner_secret
    );
    say!("      one row per chat the router answered, with its cost");
    say!(
        "  curl -s -u {}:{} {ledger_http_url}/user/my-info",
        creds.user_email,
        creds.user_secret
    );
    say!(
        "  SYFT_LEDGER_URL={ledger_url} SYFT_SECRET={} {me} alerts add http://127.0.0.1:9000/hook --balance-below 9.99",
        creds.user_secret
    );
    say!(
        "      webhook alerts to a receiver on this machine (dev allows 127.0.0.1 and localhost over http)"
    );
    say!("");
    let _ = std::io::Write::write_all(&mut std::io::stdout(), banner.as_bytes());
    super::shutdown_signal().await;
    running.shutdown().await
}

/// `url` with the password of its user info (`postgres://user:secret@host/db`) masked: the banner
/// names the database (a `DATABASE_URL` left in the environment is used, and should be seen), not
/// its credentials.
fn without_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let host_start = rest.find('/').unwrap_or(rest.len());
            match rest[..host_start].rfind('@') {
                Some(at) => match rest[..at].split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
                    None => base.to_string(),
                },
                None => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    let Some(query) = query else {
        return base;
    };
    // The password may come as a parameter too (`?password=…`).
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// How to run this binary from a shell: `syft-router` when that name on PATH is this very file
/// (e.g. after `cargo install --path .`), else its path (e.g. `target/release/syft-router` under
/// `cargo run`), so the printed commands run as pasted.
fn self_command() -> String {
    let Ok(exe) = std::env::current_exe().and_then(|p| p.canonicalize()) else {
        return "syft-router".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            dir.join("syft-router")
                .canonicalize()
                .is_ok_and(|p| p == exe)
        })
    });
    if on_path {
        return "syft-router".into();
    }
    // Relative to the working directory when below it: shorter, and what `cargo run` users see.
    let shown = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(|p| Path::new(".").join(p)))
        .unwrap_or(exe);
    let text = shown.display().to_string();
    if text.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
        format!("'{}'", text.replace('\'', "'\\''"))
    } else {
        text
    }
}

/// Writes `text` to `path`, readable by its owner only, whole or not at all: a file written
/// beside it and renamed over it, so a crash while an existing file is rewritten (adding a key)
/// cannot leave it empty and its accounts' secrets lost.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let next = path.with_extension("json.new");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&next)
        .with_context(|| format!("cannot write {}", next.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&next, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The banner names the database without its password.
    #[test]
    fn the_banner_hides_the_database_password() {
        for (url, shown) in [
            (
                "postgres://syft:s3cret@db.example:5432/syft?sslmode=require",
                "postgres://syft:***@db.example:5432/syft?sslmode=require",
            ),
            (
                "postgres://postgres@127.0.0.1/postgres",
                "postgres://postgres@127.0.0.1/postgres",
            ),
            (
                "sqlite://data/ledger.db?mode=rwc",
                "sqlite://data/ledger.db?mode=rwc",
            ),
            (
                "postgres://syft@db/syft?password=s3cret&sslmode=require",
                "postgres://syft@db/syft?password=***&sslmode=require",
            ),
        ] {
            assert_eq!(super::without_password(url), shown);
        }
    }

    /// The commands `dev` prints start with something a shell can run as pasted: here (a test
    /// binary, not named `syft-router` nor on PATH) that is this binary's own path, relative to
    /// the working directory when below it.
    #[test]
    fn printed_command_runs_this_binary() {
        let shown = super::self_command();
        let exe = std::env::current_exe()
            .and_then(|p| p.canonicalize())
            .expect("current exe");
        let path = std::path::Path::new(shown.trim_matches('\''));
        let resolved = std::env::current_dir()
            .expect("cwd")
            .join(path)
            .canonicalize()
            .expect("the printed command names a file that exists");
        assert_eq!(resolved, exe, "{shown}");
    }
}
