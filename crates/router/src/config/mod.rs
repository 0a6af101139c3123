//! Router configuration: identity, services with pricing, upstream, limits, ledger connection.
//!
//! This module holds the typed configuration; `pricing` the price types and how prices read;
//! `file` the JSON/TOML file format.
//!
//! The file format (JSON or TOML) is documented in `docs/router.md`. Amounts are decimal numbers
//! of currency units and are parsed exactly into micros: in JSON the number's own text is parsed
//! (never through a float); in TOML write them as strings (`"0.01"`) for the same guarantee, or as
//! numbers, which are read through their shortest exact decimal form (exact for every amount with
//! at most 6 decimals).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use syft_server::Secret;
use thiserror::Error;

use crate::money::{AmountError, DEFAULT_MAX_AMOUNT_MICROS};

mod bounds;
mod file;
mod pricing;
mod rate;
mod search;

pub use pricing::{
    describe_price, hold_sizing, insufficient_funds_message, pricing_json, pricing_proto,
    LeftStreams, Pricing, PricingKind, TokenBound,
};
pub use rate::{
    Budgets, LimiterBackend, LimiterConfig, OnFailure, Rate, RateLimits, RateUnit, MAX_CONCURRENCY,
    MAX_RATE_COUNT,
};
pub use search::{HttpSearchConfig, SearchBackendConfig, SearchConfig, DEFAULT_RESCAN};

/// Why a configuration was rejected.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// `path` is where in the file (`services[0].pricing`), empty for the document itself.
    #[error("invalid JSON config{}: {source}", at(.path))]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid TOML config{}: {source}", at(.path))]
    Toml {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid amount in {field}: {source}")]
    Amount { field: String, source: AmountError },
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at {path}")
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The kinds of service a router sells. Each has its own endpoint, pricing and usage rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// Chat generation against the upstream model.
    Chat,
    /// Document search over the configured search backend.
    Search,
}

impl ServiceKind {
    /// The config file's `type` and the metadata's service type.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Chat => "chat",
            ServiceKind::Search => "search",
        }
    }

    /// `app_ep_path` of its transfers and `endpoint` of its usage rows.
    pub fn endpoint(self) -> &'static str {
        match self {
            ServiceKind::Chat => "/chat",
            ServiceKind::Search => "/search",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "chat" => Some(ServiceKind::Chat),
            "search" => Some(ServiceKind::Search),
            _ => None,
        }
    }
}

/// One service the router offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub kind: ServiceKind,
    pub enabled: bool,
    pub pricing: Pricing,
    /// Per-user limits of this service, checked in addition to the router's own.
    pub rate_limits: RateLimits,
}

/// Where answers come from.
#[derive(Debug, Clone, Default)]
pub enum UpstreamConfig {
    /// The built-in deterministic echo model (offline).
    #[default]
    Echo,
    /// Any OpenAI-compatible `/v1/chat/completions` server.
    OpenAi(OpenAiConfig),
}

/// Settings of the `openai` upstream.
/// `Debug` shows every field but the API key.
#[derive(Clone, Debug)]
pub struct OpenAiConfig {
    /// e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`; `/chat/completions` is
    /// appended.
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// Router model name -> upstream model name. Unmapped names pass through unchanged.
    pub model_map: BTreeMap<String, String>,
    pub connect_timeout: Duration,
    /// Deadline for a whole unary request, and for a stream to produce its first event.
    pub request_timeout: Duration,
    /// Longest silence allowed between two stream events.
    pub idle_timeout: Duration,
    /// Retries before the first token (connect errors, 429, 502, 503, 504).
    pub max_retries: u32,
    /// First retry delay; doubles each retry.
    pub retry_backoff: Duration,
    /// The request field the answer's token limit is sent in.
    pub max_tokens_field: MaxTokensField,
}

/// Where an upstream takes the answer's token limit. OpenAI's reasoning models (o-series, gpt-5)
/// refuse `max_tokens` and take `max_completion_tokens`, which OpenAI accepts for its other chat
/// models too; most other OpenAI-compatible servers (vLLM, llama.cpp) read `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    #[default]
    MaxTokens,
    MaxCompletionTokens,
}

impl MaxTokensField {
    pub const fn as_str(self) -> &'static str {
        match self {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

impl OpenAiConfig {
    pub fn new(base_url: impl Into<String>) -> Self {
        OpenAiConfig {
            base_url: base_url.into(),
            api_key: None,
            model_map: BTreeMap::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            max_retries: 2,
            retry_backoff: Duration::from_millis(200),
            max_tokens_field: MaxTokensField::MaxTokens,
        }
    }
}

/// Request limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of all message contents, names and roles.
    pub max_prompt_bytes: usize,
    pub max_messages: usize,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens_limit: u32,
    /// `max_tokens` used for per-token holds (and sent upstream) when a request gives none.
    pub default_max_tokens: u32,
    /// Send `default_max_tokens` upstream for every chat that names none, whatever its price
    /// (set by a file that gives `limits.default_max_tokens`): by default only per-token prices
    /// and token windows, which are sized by it, send it (service/mod.rs says why).
    pub bound_every_chat: bool,
    /// Upper bound for configured prices.
    pub max_amount_micros: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_prompt_bytes: 4 * 1024 * 1024,
            max_messages: 10_000,
            max_tokens_limit: 1_000_000,
            default_max_tokens: 4096,
            bound_every_chat: false,
            max_amount_micros: DEFAULT_MAX_AMOUNT_MICROS,
        }
    }
}

/// How the router reaches the ledger.
#[derive(Clone, Debug)]
pub struct LedgerSettings {
    /// gRPC URL, e.g. `http://127.0.0.1:50051`, or several separated by commas (replicas of
    /// one ledger: calls fail over between them; see [`LedgerSettings::urls`]).
    pub url: String,
    /// The router owner's account secret (sent as `authorization: Bearer <secret>`).
    pub secret: Secret,
    /// Deadline of each ledger call.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Hold TTL requested on Authorize; `None` uses the ledger's default.
    pub hold_ttl_seconds: Option<i64>,
    /// TLS for an `https://` ledger URL: the CA to trust and, for mutual TLS, the router's
    /// client certificate. `None` with `https://` trusts the public web PKI roots.
    pub tls: Option<syft_tls::ClientTls>,
    /// Directory of the router-local spool of free requests' usage rows (`usage_spool.rs`):
    /// a free answer is released once its row is appended there, and the rows are shipped to the
    /// ledger in the background. `None` (the default): a free answer waits until its row
    /// committed in the ledger.
    pub usage_spool: Option<std::path::PathBuf>,
    /// With a spool: release a free answer only once its row is on disk (`fdatasync`, shared by
    /// the rows appended meanwhile), so a host crash loses no row either. Off: once the row is in
    /// the kernel (a router crash loses nothing, a power loss may lose the last seconds).
    pub usage_spool_sync: bool,
}

impl LedgerSettings {
    /// The ledger endpoints: `url` split at commas, blanks dropped.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Default for LedgerSettings {
    fn default() -> Self {
        LedgerSettings {
            url: "http://127.0.0.1:50051".into(),
            secret: Secret::default(),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            hold_ttl_seconds: None,
            tls: None,
            usage_spool: None,
            usage_spool_sync: true,
        }
    }
}

/// Idempotent replay of paid answers (docs/router.md "Replay of paid answers").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplaySettings {
    /// How long the ledger keeps a paid answer for replay; zero turns storage off (a retry of a
    /// charged request id is then refused with 409 and gets no answer).
    pub retention: Duration,
    /// Answers whose stored form is larger are not stored (their retries get the 409).
    pub max_bytes: usize,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        ReplaySettings {
            retention: Duration::from_secs(24 * 3600),
            max_bytes: 1024 * 1024,
        }
    }
}

impl ReplaySettings {
    pub fn enabled(&self) -> bool {
        !self.retention.is_zero() && self.max_bytes > 0
    }
}

/// The whole router configuration. Load it with [`RouterConfig::from_file`] (or build it in
/// code), then override `ledger` and `upstream` from flags.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Router (app) name; the `app_name` of its transfers and usage rows.
    pub name: String,
    pub description: String,
    /// The account that receives payments; must match the ledger secret's account.
    pub owner_email: String,
    pub services: Vec<ServiceConfig>,
    /// Models offered (`GET /v1/models`, metadata). Empty: the upstream's `model_map` names (or
    /// any model, on `echo`); `["*"]` ([`ANY_MODEL`]): any model is passed through. An
    /// OpenAI-compatible upstream selling chat needs one or the other (`validate`).
    pub models: Vec<String>,
    pub upstream: UpstreamConfig,
    /// The search backend of the `search` service; required when that service is listed.
    pub search: Option<SearchConfig>,
    pub limits: Limits,
    /// Per-user request, token and concurrency limits over all services (docs/limits.md).
    pub rate_limits: RateLimits,
    /// Per-user spend budgets, enforced by the ledger when it places a hold.
    pub budgets: Budgets,
    /// Where the rate-limit windows are counted, and what happens when that store fails.
    pub limiter: LimiterConfig,
    pub ledger: LedgerSettings,
    /// Storage of paid answers for replay (not read from the config file).
    pub replay: ReplaySettings,
    /// Longest a stream may run; it is then ended and what was delivered is charged (not read
    /// from the config file).
    pub max_stream_duration: Duration,
    /// TLS on the router's gRPC and HTTP listeners (not read from the config file).
    pub tls: Option<syft_tls::ServerTls>,
    /// After a shutdown signal, how long in-flight requests (streams included) may run before
    /// they are cancelled and their holds voided (not read from the config file).
    pub shutdown_grace: Duration,
    /// Idle timeout and connection cap of the HTTP listener (not read from the config file).
    pub http: syft_server::HttpLimits,
    /// Web origins (`https://app.example`, or `*` for any) whose pages may call the HTTP APIs from
    /// a browser (CORS). Empty: none, and browsers keep cross-origin pages out.
    pub cors_origins: Vec<String>,
    /// What a paid stream whose client left before its end is charged (docs/router.md).
    pub left_streams: LeftStreams,
}

/// `models = ["*"]`: any model a client names is passed to the upstream.
pub const ANY_MODEL: &str = "*";

/// Default [`RouterConfig::max_stream_duration`].
pub const DEFAULT_MAX_STREAM_DURATION: Duration = Duration::from_secs(15 * 60);

/// The longest hold life any ledger grants (the ceiling of its `--max-hold-ttl`, 30 days).
pub const MAX_HOLD_TTL_SECONDS: i64 = 30 * 86_400;

/// Default [`RouterConfig::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = syft_server::DEFAULT_SHUTDOWN_GRACE;

impl RouterConfig {
    /// A router with one free chat service on the echo upstream.
    pub fn new(name: impl Into<String>, owner_email: impl Into<String>) -> Self {
        RouterConfig {
            name: name.into(),
            description: String::new(),
            owner_email: owner_email.into(),
            services: vec![ServiceConfig {
                kind: ServiceKind::Chat,
                enabled: true,
                pricing: Pricing::free(),
                rate_limits: RateLimits::default(),
            }],
            models: Vec::new(),
            upstream: UpstreamConfig::Echo,
            search: None,
            limits: Limits::default(),
            rate_limits: RateLimits::default(),
            budgets: Budgets::default(),
            limiter: LimiterConfig::default(),
            ledger: LedgerSettings::default(),
            replay: ReplaySettings::default(),
            max_stream_duration: DEFAULT_MAX_STREAM_DURATION,
            tls: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            http: syft_server::HttpLimits::default(),
            cors_origins: Vec::new(),
            left_streams: LeftStreams::default(),
        }
    }

    /// Sets the chat service's pricing (adding the service when missing).
    pub fn with_chat_pricing(self, pricing: Pricing) -> Self {
        self.with_service_pricing(ServiceKind::Chat, pricing)
    }

    /// Adds (or reprices) the search service over `search`.
    pub fn with_search(mut self, pricing: Pricing, search: SearchConfig) -> Self {
        self.search = Some(search);
        self.with_service_pricing(ServiceKind::Search, pricing)
    }

    fn with_service_pricing(mut self, kind: ServiceKind, pricing: Pricing) -> Self {
        match self.services.iter_mut().find(|s| s.kind == kind) {
            Some(s) => s.pricing = pricing,
            None => self.services.push(ServiceConfig {
                kind,
                enabled: true,
                pricing,
                rate_limits: RateLimits::default(),
            }),
        }
        self
    }

    /// The service of that kind, if configured.
    pub fn service(&self, kind: ServiceKind) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.kind == kind)
    }

    /// The chat service, if configured.
    pub fn chat_service(&self) -> Option<&ServiceConfig> {
        self.service(ServiceKind::Chat)
    }

    /// Loads a `.json` or `.toml` file (other extensions: JSON, then TOML).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json_str(&text),
            Some("toml") => Self::from_toml_str(&text),
            _ => Self::from_json_str(&text).or_else(|json_err| {
                Self::from_toml_str(&text).map_err(|toml_err| {
                    invalid(format!("neither JSON ({json_err}) nor TOML ({toml_err})"))
                })
            }),
        }
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        file::parse_json(text)
    }

    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        file::parse_toml(text)
    }

    /// Checks everything the service relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_settings()?;
        self.validate_models()
    }

    /// Whether a router selling chat from an OpenAI-compatible upstream says what it sells:
    /// `models`, a `model_map`, or `["*"]`. Apart from [`RouterConfig::validate_settings`]: a
    /// file is read before `--models` and `--upstream-url` apply.
    fn validate_models(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if m.trim().is_empty() || m.trim() != m || m.len() > 200 {
                return Err(invalid(format!(
                    "models: {m:?} is not a model name (no blank, no spaces around, at most 200 \
                     bytes)"
                )));
            }
            if !seen.insert(m) {
                return Err(invalid(format!("models: {m:?} is listed twice")));
            }
        }
        if self.models.len() > 1 && self.models.iter().any(|m| m == ANY_MODEL) {
            return Err(invalid(
                "models: \"*\" (any model) stands alone; it cannot be listed with names",
            ));
        }
        let UpstreamConfig::OpenAi(o) = &self.upstream else {
            return Ok(());
        };
        let sells_chat = self.chat_service().is_some_and(|s| s.enabled);
        if sells_chat && self.models.is_empty() && o.model_map.is_empty() {
            return Err(invalid(
                "models: list the models this router sells (models = [\"gpt-4o-mini\"], or \
                 --models / SYFT_ROUTER_MODELS), or give a model_map; models = [\"*\"] passes \
                 any model a client names to the upstream at this router's prices, the dearest \
                 included",
            ));
        }
        Ok(())
    }

    /// Everything [`RouterConfig::validate`] checks but the models.
    pub(crate) fn validate_settings(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name must not be empty"));
        }
        self.validate_bounds()?;
        for origin in &self.cors_origins {
            validate_origin(origin)?;
        }
        if !crate::validate::is_valid_email(&self.owner_email) {
            return Err(invalid(format!(
                "owner_email {:?} is not a valid email",
                self.owner_email
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.services {
            if !seen.insert(s.kind) {
                return Err(invalid(format!(
                    "service {:?} is listed twice",
                    s.kind.as_str()
                )));
            }
            validate_currency(&s.pricing.currency)?;
            let max = self.limits.max_amount_micros;
            let amounts: &[i64] = match &s.pricing.kind {
                PricingKind::Free => &[],
                PricingKind::PerRequest { amount_micros } => &[*amount_micros],
                PricingKind::PerToken {
                    input_micros_per_million,
                    output_micros_per_million,
                } => &[*input_micros_per_million, *output_micros_per_million],
            };
            for &a in amounts {
                if !(0..=max).contains(&a) {
                    return Err(invalid(format!(
                        "service {:?}: amount {a} micros is outside 0..={max}",
                        s.kind.as_str()
                    )));
                }
            }
        }
        self.validate_budgets()?;
        // A hold's life the ledger can never grant (0, negative, past the ledger's ceiling of 30
        // days) was taken, the router reported ready, and every paid request was refused as the
        // user's "invalid request".
        if let Some(ttl) = self.ledger.hold_ttl_seconds {
            if !(1..=MAX_HOLD_TTL_SECONDS).contains(&ttl) {
                return Err(invalid(format!(
                    "ledger.hold_ttl_seconds {ttl} must be between 1 and {MAX_HOLD_TTL_SECONDS} \
                     (and at most the ledger's --max-hold-ttl, 86400 by default)"
                )));
            }
        }
        // An endpoint that is not an http(s) URL (`not-a-url`, `ftp://…`) was taken and only
        // failed at each call, logged as warnings, on a router that had started.
        let urls = self.ledger.urls();
        if urls.is_empty() {
            return Err(invalid("ledger.url names no endpoint"));
        }
        for url in urls {
            let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
            if !matches!(scheme.as_deref(), Some("http" | "https")) {
                return Err(invalid(format!(
                    "ledger url {url:?} must start with http:// or https://"
                )));
            }
            // One that does not parse failed the start with "internal error"; one without a
            // host (`http://:50051`) was taken, and the ledger never reached.
            match url.parse::<http::Uri>() {
                Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) => {}
                _ => return Err(invalid(format!("ledger url {url:?} names no host"))),
            }
        }
        self.validate_limits()?;
        if let Some(s) = self.service(ServiceKind::Search) {
            if let PricingKind::PerToken { .. } = s.pricing.kind {
                return Err(invalid(
                    "the search service is priced per request (or free), not per token",
                ));
            }
            if self.search.is_none() {
                return Err(invalid(
                    "the search service needs a `search` section (backend, index or docs, or url)",
                ));
            }
        }
        // Checked whenever present: its backend is built (a folder watched) even when no search
        // service is listed, and `rescan_seconds = 0` then stopped the router's rescan task.
        if let Some(s) = &self.search {
            s.validate()?;
        }
        if self.replay.retention > bounds::MAX_SPAN {
            return Err(invalid("answer retention must be at most 30 days"));
        }
        if self.replay.max_bytes > syft_error::MAX_ANSWER_BYTES {
            return Err(invalid(format!(
                "answer max bytes must be at most {} (the largest answer the ledger stores)",
                syft_error::MAX_ANSWER_BYTES
            )));
        }
        if let UpstreamConfig::OpenAi(o) = &self.upstream {
            let ok = o.base_url.starts_with("http://") || o.base_url.starts_with("https://");
            if !ok {
                return Err(invalid(format!(
                    "upstream base_url {:?} must start with http:// or https://",
                    o.base_url
                )));
            }
        }
        Ok(())
    }
}

/// `*`, or an origin exactly as browsers send it in `Origin`, which the CORS layer compares byte
/// for byte: `http` or `https`, a lower-case host, a port only when not the scheme's default, and
/// nothing after. Anything else (a trailing `/`, a path, upper case, `:443`, a wildcard host)
/// could never match, and would fail in the browser without a word.
fn validate_origin(origin: &str) -> Result<(), ConfigError> {
    if origin == "*" {
        return Ok(());
    }
    let serialized = reqwest::Url::parse(origin)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .map(|u| u.origin().ascii_serialization());
    match serialized {
        Some(s) if s == origin && !origin.contains('*') => Ok(()),
        Some(s) => Err(invalid(format!(
            "cors_origins: {origin:?} is not an origin as browsers send it; write {s:?}"
        ))),
        None => Err(invalid(format!(
            "cors_origins: {origin:?} is not an origin like \"https://app.example\" (scheme and \
             host, maybe a port, no path) or \"*\""
        ))),
    }
}

/// Written upper-case in the file, as the ledger stores it ([`syft_money::currency_code`]).
fn validate_currency(c: &str) -> Result<(), ConfigError> {
    if syft_money::currency_code(c).is_some_and(|code| code == c) {
        Ok(())
    } else {
        Err(invalid(format!(
            "currency {c:?} must be a 3-letter upper-case code"
        )))
    }
}

/// The chat service's pricing kind (free when there is no chat service).
#[cfg(test)]
fn chat_pricing(c: &RouterConfig) -> PricingKind {
    c.chat_service()
        .map(|s| s.pricing.kind)
        .unwrap_or(PricingKind::Free)
}

/// A TOML config of one chat service priced `pricing` (an inline table), for the format's tests;
/// the pricing is on line 6 (error positions in the tests depend on it).
#[cfg(test)]
fn toml_with_pricing(pricing: &str) -> String {
    format!(
        "\nname = \"r\"\nowner_email = \"owner@example.com\"\n[[services]]\ntype = \"chat\"\n\
         pricing = {pricing}\n"
    )
}
