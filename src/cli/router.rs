//! `syft-router router`: serve the router; `syft-router chat`: a small client for people.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use syft_proto::router as pb;
use syft_router_svc::{OpenAiConfig, ReplaySettings, RouterConfig, UpstreamConfig};
use tokio_stream::StreamExt;

#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    #[command(flatten)]
    pub listen: super::serve::RouterServe,
    #[command(flatten)]
    pub setup: RouterSetup,
    /// Longest a streamed answer may run; it is then ended (finish reason `length`) and what was
    /// delivered is charged. Holds of running streams are extended meanwhile.
    #[arg(long, env = "SYFT_ROUTER_MAX_STREAM_DURATION", default_value = "15m", value_parser = super::parse_duration)]
    pub max_stream_duration: Duration,
}

/// Router settings shared by `router` and `dev`.
#[derive(Args, Debug, Clone)]
pub struct RouterSetup {
    /// Ledger gRPC URL; several replicas of one ledger as a comma-separated list or a repeated
    /// flag (a name resolving to several addresses counts as one each). Calls fail over between
    /// them. Default: the config file's `ledger.url`, else http://127.0.0.1:50051.
    #[arg(long, env = "SYFT_LEDGER_URL", value_delimiter = ',')]
    pub ledger_url: Vec<String>,
    /// The owner account's secret, used to authorize and capture on the ledger.
    #[arg(
        long,
        env = "SYFT_ROUTER_LEDGER_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    pub ledger_secret: String,
    /// File holding the owner account's secret (Docker/Kubernetes secrets), instead of the value.
    #[arg(long, env = "SYFT_ROUTER_LEDGER_SECRET_FILE")]
    pub ledger_secret_file: Option<PathBuf>,
    /// Config file (JSON or TOML): name, owner email, services, pricing, limits; see docs/router.md.
    #[arg(long, env = "SYFT_ROUTER_CONFIG")]
    pub config: Option<String>,
    /// Owner email when no config file is given (or to override it).
    #[arg(long, env = "SYFT_ROUTER_OWNER_EMAIL")]
    pub owner_email: Option<String>,
    /// OpenAI-compatible upstream base URL (e.g. http://127.0.0.1:11434/v1); unset: the built-in echo model.
    #[arg(long = "upstream-url", env = "OPENAI_BASE_URL")]
    pub upstream_url: Option<String>,
    /// The models this router sells, comma-separated, in place of the config file's `models`;
    /// `*` passes any model a client names to the upstream. With --upstream-url, needed unless
    /// the config file lists models or a model_map.
    #[arg(long, env = "SYFT_ROUTER_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Upstream API key.
    #[arg(
        long = "upstream-api-key",
        env = "OPENAI_API_KEY",
        hide_env_values = true
    )]
    pub upstream_api_key: Option<String>,
    /// File holding the upstream API key, instead of the value.
    #[arg(long = "upstream-api-key-file", env = "OPENAI_API_KEY_FILE")]
    pub upstream_api_key_file: Option<PathBuf>,
    /// How long paid answers are kept (in the ledger) so a retry with the same request id gets
    /// the answer again instead of a 409; `0s` stores nothing (privacy; retries then get 409).
    #[arg(long, env = "SYFT_ROUTER_ANSWER_RETENTION", default_value = "24h", value_parser = super::parse_duration_or_zero)]
    pub answer_retention: Duration,
    /// Answers whose stored form is larger than this many bytes are not kept for replay.
    #[arg(long, env = "SYFT_ROUTER_ANSWER_MAX_BYTES", default_value_t = 1024 * 1024)]
    pub answer_max_bytes: usize,
    /// PEM CA to trust for an https:// ledger URL (default: the public web PKI roots).
    #[arg(long, env = "SYFT_ROUTER_LEDGER_CA")]
    pub ledger_ca: Option<PathBuf>,
    /// PEM client certificate presented to the ledger (mutual TLS; with --ledger-client-key).
    #[arg(long, env = "SYFT_ROUTER_LEDGER_CLIENT_CERT")]
    pub ledger_client_cert: Option<PathBuf>,
    /// PEM private key of --ledger-client-cert.
    #[arg(long, env = "SYFT_ROUTER_LEDGER_CLIENT_KEY")]
    pub ledger_client_key: Option<PathBuf>,
    /// Directory of a local spool for free requests' usage rows: a free answer is released once
    /// its row is appended there (surviving a router crash) and rows ship to the ledger in the
    /// background. Default: the config file's `ledger.usage_spool`, else none (a free answer
    /// waits until its row committed in the ledger). One directory per router.
    #[arg(long, env = "SYFT_ROUTER_USAGE_SPOOL")]
    pub usage_spool: Option<PathBuf>,
    /// With --usage-spool: release a free answer only once its row is on disk (one `fdatasync`
    /// shared by the rows appended meanwhile), so that a host crash loses no row either; `false`
    /// releases it once the row is in the kernel (a router crash still loses nothing). Default:
    /// the config file's `ledger.usage_spool_sync`, else true.
    #[arg(long, env = "SYFT_ROUTER_USAGE_SPOOL_SYNC")]
    pub usage_spool_sync: Option<bool>,
}

impl RouterSetup {
    pub fn config(&self) -> anyhow::Result<RouterConfig> {
        let mut config = match &self.config {
            Some(path) => RouterConfig::from_file(path)?,
            None => RouterConfig::new(
                "syft-router",
                self.owner_email
                    .clone()
                    .context("set --config or --owner-email (SYFT_ROUTER_OWNER_EMAIL)")?,
            ),
        };
        if let Some(owner) = &self.owner_email {
            config.owner_email = owner.clone();
        }
        if !self.models.is_empty() {
            config.models = self.models.clone();
        }
        if !self.ledger_url.is_empty() {
            config.ledger.url = self.ledger_url.join(",");
        }
        config.ledger.secret = super::secret(
            Some(&self.ledger_secret),
            self.ledger_secret_file.as_ref(),
            "--ledger-secret",
        )?
        .unwrap_or_default()
        .into();
        config.ledger.tls = super::client_tls(
            self.ledger_ca.as_ref(),
            self.ledger_client_cert.as_ref(),
            self.ledger_client_key.as_ref(),
        )?;
        if let Some(dir) = &self.usage_spool {
            config.ledger.usage_spool = Some(dir.clone());
        }
        if let Some(sync) = self.usage_spool_sync {
            config.ledger.usage_spool_sync = sync;
        }
        config.replay = ReplaySettings {
            retention: self.answer_retention,
            max_bytes: self.answer_max_bytes,
        };
        if let Some(url) = &self.upstream_url {
            let api_key = super::secret(
                self.upstream_api_key.as_deref(),
                self.upstream_api_key_file.as_ref(),
                "--upstream-api-key",
            )?
            .map(Into::into);
            // The file's OpenAI settings (model_map, timeouts, retries) stay; the flag names the
            // server. They used to be dropped, the model_map's names then sent unmapped. The
            // file's key goes only to the server the file named: never to another host.
            let mut base = match &config.upstream {
                UpstreamConfig::OpenAi(o) => o.clone(),
                UpstreamConfig::Echo => OpenAiConfig::new(url.clone()),
            };
            if base.api_key.is_some() && !same_server(&base.base_url, url) {
                tracing::warn!(
                    file = %base.base_url,
                    flag = %url,
                    "--upstream-url names another server than the config file's base_url: the \
                     file's api_key is not sent to it (give --upstream-api-key)"
                );
                base.api_key = None;
            }
            config.upstream = UpstreamConfig::OpenAi(OpenAiConfig {
                base_url: url.clone(),
                api_key: api_key.or(base.api_key.clone()),
                ..base
            });
        } else if self.upstream_api_key.is_some() || self.upstream_api_key_file.is_some() {
            // Often set for other tools (OPENAI_API_KEY), and dropped without a word: an operator
            // who meant an OpenAI-compatible server got the echo model, or the file's server got
            // no key. It is not sent to the file's server: a shell's OpenAI key would go to
            // whatever server the file names. (Its own key may well be this variable:
            // `api_key_env`.)
            match &config.upstream {
                UpstreamConfig::Echo => tracing::warn!(
                    "--upstream-api-key (or OPENAI_API_KEY) is set, but no upstream is: the \
                     built-in echo model answers (give --upstream-url or a config file's upstream)"
                ),
                UpstreamConfig::OpenAi(o) => tracing::warn!(
                    upstream = %o.base_url,
                    has_key = o.api_key.is_some(),
                    "--upstream-api-key (or OPENAI_API_KEY) is set but not used: it goes to \
                     --upstream-url only; the config file's upstream takes its own key \
                     (upstream.api_key or upstream.api_key_env)"
                ),
            }
        }
        Ok(config)
    }
}

pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    let mut config = args.setup.config()?;
    config.tls = args.listen.tls(None)?;
    config.shutdown_grace = args.listen.shutdown_grace;
    config.http = args.listen.http_limits();
    config.max_stream_duration = args.max_stream_duration;
    let (grpc, http) = args.listen.bind().await?;
    syft_router_svc::serve(config, grpc, http, super::shutdown_signal()).await?;
    Ok(())
}

/// Which router a client command calls, and for whom (`chat`, `limits`).
#[derive(Args, Debug)]
pub struct RouterUser {
    /// Router gRPC URL.
    #[arg(
        long,
        env = "SYFT_ROUTER_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub router_url: String,
    /// Your email (the payer).
    #[arg(long = "user", env = "SYFT_USER_EMAIL")]
    pub user_email: String,
}

impl RouterUser {
    /// A client of the router; it connects on the first call.
    pub fn client(
        &self,
    ) -> anyhow::Result<pb::router_client::RouterClient<tonic::transport::Channel>> {
        let url = self.router_url.as_str();
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .with_context(|| format!("invalid --router-url {url:?}"))?
            .connect_timeout(Duration::from_secs(3))
            .connect_lazy();
        Ok(pb::router_client::RouterClient::new(channel))
    }

    /// A failed call to the router, in the user's terms.
    pub fn fail(&self, status: tonic::Status) -> anyhow::Error {
        super::errors::rpc(status, super::errors::Server::Router, &self.router_url)
    }
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The message to send.
    pub message: String,
    #[command(flatten)]
    pub to: RouterUser,
    /// Your delegation token for the router's owner (paid services).
    #[arg(long, env = "SYFT_TOKEN", hide_env_values = true, default_value = "")]
    pub token: String,
    /// Model to ask for (default: the first model the router lists in its metadata).
    #[arg(long)]
    pub model: Option<String>,
    /// A system message sent before yours.
    #[arg(long)]
    pub system: Option<String>,
    /// Longest answer in tokens (on a per-token router this also sizes the hold on your funds).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 to 2; the upstream's default when not given).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// How hard a reasoning model thinks (`low`, `medium`, `high`, …); passed to the upstream.
    #[arg(long)]
    pub reasoning_effort: Option<String>,
    /// Idempotency key: retrying with the same id is never charged twice.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Stream the answer as it is generated.
    #[arg(long)]
    pub stream: bool,
    /// Print the answer, usage and cost as one JSON object (not with --stream).
    #[arg(long, conflicts_with = "stream")]
    pub json: bool,
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let fail = |s: tonic::Status| args.to.fail(s);
    let mut client = args.to.client()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        // Empty if the router lists none: it then picks its upstream's default itself.
        None => client
            .get_metadata(pb::GetMetadataRequest {})
            .await
            .map_err(fail)?
            .into_inner()
            .models
            .into_iter()
            .next()
            .unwrap_or_default(),
    };
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(pb::Message {
            role: "system".into(),
            content: system.clone(),
            name: None,
        });
    }
    messages.push(pb::Message {
        role: "user".into(),
        content: args.message.clone(),
        name: None,
    });
    let request = pb::ChatRequest {
        user_email: args.to.user_email.clone(),
        model,
        messages,
        options: Some(pb::ChatOptions {
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            reasoning_effort: args.reasoning_effort.clone(),
            ..Default::default()
        }),
        transaction_token: args.token.clone(),
        request_id: args.request_id.clone().unwrap_or_default(),
    };
    if !args.stream {
        let response = client.chat(request).await.map_err(fail)?.into_inner();
        if args.json {
            let usage = response.usage.unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({"id": response.id, "model": response.model,
                    "content": response.message.map(|m| m.content).unwrap_or_default(),
                    "finish_reason": response.finish_reason, "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens, "cost_micros": response.cost_micros,
                    "currency": response.currency, "transfer_id": response.transfer_id,
                    "replay": response.replay})
            );
        } else {
            println!(
                "{}",
                response.message.map(|m| m.content).unwrap_or_default()
            );
            print_cost(
                response.cost_micros,
                &response.currency,
                &response.transfer_id,
                response.usage,
                response.replay,
            );
        }
        return Ok(());
    }
    let mut stream = client
        .chat_stream(request)
        .await
        .map_err(fail)?
        .into_inner();
    use std::io::Write;
    while let Some(event) = stream.next().await {
        match event.map_err(fail)?.event {
            Some(pb::chat_stream_event::Event::Delta(d)) => {
                print!("{}", d.content);
                // A closed output ends the command now (the stream, given up, is not charged),
                // not once `print!` next fails.
                if let Err(e) = std::io::stdout().flush() {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        super::die_of_a_closed_output();
                    }
                }
            }
            Some(pb::chat_stream_event::Event::Final(f)) => {
                println!();
                print_cost(
                    f.cost_micros,
                    &f.currency,
                    &f.transfer_id,
                    f.usage,
                    f.replay,
                );
            }
            None => {}
        }
    }
    Ok(())
}

/// The answer's cost line. A replay (the stored answer of a request id already charged) says so:
/// its cost is the first attempt's, not a second charge.
fn print_cost(
    cost: i64,
    currency: &str,
    transfer_id: &str,
    usage: Option<pb::TokenUsage>,
    replay: bool,
) {
    let usage = usage.unwrap_or_default();
    eprintln!(
        "-- {}{} prompt + {} completion tokens, cost {} {}{}",
        if replay {
            "replay, charged once already: "
        } else {
            ""
        },
        usage.prompt_tokens,
        usage.completion_tokens,
        syft_ledger::money::format_micros(cost),
        currency,
        if transfer_id.is_empty() {
            String::new()
        } else {
            format!(", transfer {transfer_id}")
        }
    );
}

/// Whether two upstream URLs name one server and path: `http://h/v1/` and `HTTP://H:80/v1` do.
/// A byte comparison dropped the file's key for a trailing slash, and every request then failed
/// with the upstream's 401 on a router that said it was ready.
fn same_server(a: &str, b: &str) -> bool {
    let key = |u: &str| {
        reqwest::Url::parse(u).ok().map(|u| {
            let path = u.path().trim_end_matches('/').to_string();
            let host = u.host_str().map(str::to_ascii_lowercase);
            (
                u.scheme().to_string(),
                host,
                u.port_or_known_default(),
                path,
                u.query().map(str::to_string),
            )
        })
    };
    match (key(a), key(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    /// `--answer-retention 0s` stores nothing, as its help and the README say (it was refused as
    /// "duration must be positive").
    #[test]
    fn zero_answer_retention_is_accepted() {
        let argv = ["syft-router", "router", "--answer-retention", "0s"];
        let cli = Cli::try_parse_from(argv).expect("0s parses");
        let Command::Router(args) = cli.command else {
            panic!("not the router command");
        };
        assert!(args.setup.answer_retention.is_zero());
        let bad = Cli::try_parse_from(["syft-router", "router", "--answer-retention", "soon"]);
        assert!(bad.is_err());
    }

    /// The file's upstream key goes to the file's server however `--upstream-url` writes it (a
    /// trailing slash, upper case, the default port), and never to another server.
    #[test]
    fn the_files_key_follows_its_server_not_its_spelling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("router.toml");
        std::fs::write(
            &file,
            "name = \"r\"\nowner_email = \"o@example.com\"\nmodels = [\"m\"]\n\
             [upstream]\nkind = \"openai\"\nbase_url = \"http://up.example/v1\"\n\
             api_key = \"sk-file\"\n",
        )
        .expect("write");
        let key_for = |url: &str| {
            let path = file.to_str().expect("utf-8");
            let argv = [
                "syft-router",
                "router",
                "--config",
                path,
                "--upstream-url",
                url,
            ];
            let cli = Cli::try_parse_from(argv).expect("parses");
            let Command::Router(args) = cli.command else {
                panic!("not the router command");
            };
            match args.setup.config().expect("config").upstream {
                syft_router_svc::UpstreamConfig::OpenAi(o) => {
                    o.api_key.map(|k| k.expose().to_string())
                }
                other => panic!("{other:?}"),
            }
        };
        for same in [
            "http://up.example/v1",
            "http://up.example/v1/",
            "HTTP://UP.EXAMPLE:80/v1",
        ] {
            assert_eq!(key_for(same).as_deref(), Some("sk-file"), "{same}");
        }
        for other in [
            "http://other.example/v1",
            "https://up.example/v1",
            "http://up.example/v2",
        ] {
            assert_eq!(key_for(other), None, "{other}");
        }
    }
}
