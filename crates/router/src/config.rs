//! Router configuration: identity, services with pricing, upstream, limits, ledger connection.
//!
//! The file format (JSON or TOML) is documented in `docs/router.md`. Amounts are decimal numbers
//! of currency units and are parsed exactly into micros: in JSON the number's own text is parsed
//! (never through a float); in TOML write them as strings (`"0.01"`) for the same guarantee, or as
//! numbers, which are read through their shortest exact decimal form (exact for every amount with
//! at most 6 decimals).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::money::{self, AmountError, DEFAULT_MAX_AMOUNT_MICROS};

/// Why a configuration was rejected.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid JSON config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid TOML config: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid amount in {field}: {source}")]
    Amount { field: String, source: AmountError },
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// What a service charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PricingKind {
    /// No charge; a usage row is still recorded.
    Free,
    /// A fixed price per request.
    PerRequest { amount_micros: i64 },
    /// Micros per million prompt (input) and completion (output) tokens.
    PerToken {
        input_micros_per_million: i64,
        output_micros_per_million: i64,
    },
}

impl PricingKind {
    /// The wire name: `free`, `per_request` or `per_token`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PricingKind::Free => "free",
            PricingKind::PerRequest { .. } => "per_request",
            PricingKind::PerToken { .. } => "per_token",
        }
    }

    pub fn is_free(&self) -> bool {
        matches!(self, PricingKind::Free)
    }
}

/// A service's price, with its currency and a human description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    pub kind: PricingKind,
    pub currency: String,
    pub description: String,
}

impl Pricing {
    pub fn free() -> Self {
        Pricing {
            kind: PricingKind::Free,
            currency: "USD".into(),
            description: String::new(),
        }
    }

    pub fn per_request(amount_micros: i64) -> Self {
        Pricing {
            kind: if amount_micros == 0 {
                PricingKind::Free
            } else {
                PricingKind::PerRequest { amount_micros }
            },
            currency: "USD".into(),
            description: String::new(),
        }
    }

    pub fn per_token(input_micros_per_million: i64, output_micros_per_million: i64) -> Self {
        Pricing {
            kind: if input_micros_per_million == 0 && output_micros_per_million == 0 {
                PricingKind::Free
            } else {
                PricingKind::PerToken {
                    input_micros_per_million,
                    output_micros_per_million,
                }
            },
            currency: "USD".into(),
            description: String::new(),
        }
    }

    /// The most a request can cost: the hold. `prompt_tokens` counted by the router,
    /// `max_completion_tokens` the request's bound on the answer.
    pub fn hold_micros(&self, prompt_tokens: u64, max_completion_tokens: u64) -> i64 {
        self.cost_micros(prompt_tokens, max_completion_tokens)
    }

    /// The actual cost of a request with the given usage.
    pub fn cost_micros(&self, prompt_tokens: u64, completion_tokens: u64) -> i64 {
        match self.kind {
            PricingKind::Free => 0,
            PricingKind::PerRequest { amount_micros } => amount_micros,
            PricingKind::PerToken {
                input_micros_per_million,
                output_micros_per_million,
            } => money::token_cost_micros(prompt_tokens, input_micros_per_million).saturating_add(
                money::token_cost_micros(completion_tokens, output_micros_per_million),
            ),
        }
    }
}

/// One service the router offers (today: `chat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// `chat`, ...
    pub service_type: String,
    pub enabled: bool,
    pub pricing: Pricing,
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
#[derive(Clone)]
pub struct OpenAiConfig {
    /// e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`; `/chat/completions` is
    /// appended.
    pub base_url: String,
    pub api_key: Option<String>,
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
        }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model_map", &self.model_map)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .finish()
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
            max_amount_micros: DEFAULT_MAX_AMOUNT_MICROS,
        }
    }
}

/// How the router reaches the ledger.
#[derive(Clone)]
pub struct LedgerSettings {
    /// gRPC URL, e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// The router owner's account secret (sent as `authorization: Bearer <secret>`).
    pub secret: String,
    /// Deadline of each ledger call.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Hold TTL requested on Authorize; `None` uses the ledger's default.
    pub hold_ttl_seconds: Option<i64>,
    /// TLS for an `https://` ledger URL: the CA to trust and, for mutual TLS, the router's
    /// client certificate. `None` with `https://` trusts the public web PKI roots.
    pub tls: Option<syft_tls::ClientTls>,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        LedgerSettings {
            url: "http://127.0.0.1:50051".into(),
            secret: String::new(),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            hold_ttl_seconds: None,
            tls: None,
        }
    }
}

impl fmt::Debug for LedgerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerSettings")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("hold_ttl_seconds", &self.hold_ttl_seconds)
            .field("tls", &self.tls)
            .finish()
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
    /// Models offered (`GET /v1/models`, metadata). Empty: any model is passed through and the
    /// list shows the upstream's mapped names (or `echo`).
    pub models: Vec<String>,
    pub upstream: UpstreamConfig,
    pub limits: Limits,
    pub ledger: LedgerSettings,
    /// TLS on the router's gRPC and HTTP listeners (not read from the config file).
    pub tls: Option<syft_tls::ServerTls>,
    /// After a shutdown signal, how long in-flight requests (streams included) may run before
    /// they are cancelled and their holds voided (not read from the config file).
    pub shutdown_grace: Duration,
}

/// Default [`RouterConfig::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

impl RouterConfig {
    /// A router with one free chat service on the echo upstream.
    pub fn new(name: impl Into<String>, owner_email: impl Into<String>) -> Self {
        RouterConfig {
            name: name.into(),
            description: String::new(),
            owner_email: owner_email.into(),
            services: vec![ServiceConfig {
                service_type: "chat".into(),
                enabled: true,
                pricing: Pricing::free(),
            }],
            models: Vec::new(),
            upstream: UpstreamConfig::Echo,
            limits: Limits::default(),
            ledger: LedgerSettings::default(),
            tls: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// Sets the chat service's pricing (adding the service when missing).
    pub fn with_chat_pricing(mut self, pricing: Pricing) -> Self {
        match self.services.iter_mut().find(|s| s.service_type == "chat") {
            Some(s) => s.pricing = pricing,
            None => self.services.push(ServiceConfig {
                service_type: "chat".into(),
                enabled: true,
                pricing,
            }),
        }
        self
    }

    /// The chat service, if configured.
    pub fn chat_service(&self) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.service_type == "chat")
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
        let raw: RawConfig<Box<RawValue>> = serde_json::from_str(text)?;
        raw.into_config()
    }

    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig<toml::Value> = toml::from_str(text)?;
        raw.into_config()
    }

    /// Checks everything the service relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name must not be empty"));
        }
        if !crate::validate::is_valid_email(&self.owner_email) {
            return Err(invalid(format!(
                "owner_email {:?} is not a valid email",
                self.owner_email
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.services {
            if !seen.insert(s.service_type.as_str()) {
                return Err(invalid(format!(
                    "service {:?} is listed twice",
                    s.service_type
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
                        s.service_type
                    )));
                }
            }
        }
        let l = &self.limits;
        if l.max_prompt_bytes == 0 || l.max_messages == 0 || l.max_tokens_limit == 0 {
            return Err(invalid("limits must be positive"));
        }
        if l.default_max_tokens == 0 || l.default_max_tokens > l.max_tokens_limit {
            return Err(invalid(
                "limits.default_max_tokens must be in 1..=max_tokens_limit",
            ));
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

fn validate_currency(c: &str) -> Result<(), ConfigError> {
    if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(invalid(format!(
            "currency {c:?} must be a 3-letter upper-case code"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// File format

/// A number as written in the file, before exact parsing.
trait NumberText {
    fn number_text(&self) -> Result<String, String>;
}

impl NumberText for Box<RawValue> {
    fn number_text(&self) -> Result<String, String> {
        let raw = self.get().trim();
        if raw.starts_with('"') {
            serde_json::from_str::<String>(raw).map_err(|e| e.to_string())
        } else if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            Ok(raw.to_string())
        } else {
            Err(format!("expected a number, got {raw}"))
        }
    }
}

impl NumberText for toml::Value {
    fn number_text(&self) -> Result<String, String> {
        match self {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            // Display prints the shortest decimal that reads back as the same float.
            toml::Value::Float(f) if f.is_finite() => Ok(format!("{f}")),
            toml::Value::Float(f) => Ok(f.to_string()),
            other => Err(format!("expected a number, got {}", other.type_str())),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "N: Deserialize<'de>"))]
struct RawConfig<N> {
    name: String,
    #[serde(default)]
    description: String,
    owner_email: String,
    #[serde(default = "default_services")]
    services: Vec<RawService<N>>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    upstream: Option<RawUpstream>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    ledger: RawLedger,
}

fn default_services<N>() -> Vec<RawService<N>> {
    vec![RawService {
        service_type: "chat".into(),
        enabled: true,
        pricing: None,
    }]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "N: Deserialize<'de>"))]
struct RawService<N> {
    #[serde(rename = "type")]
    service_type: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    pricing: Option<RawPricing<N>>,
}

fn yes() -> bool {
    true
}

/// The pricing object exactly as router owners write it; unknown keys are ignored.
#[derive(Deserialize)]
#[serde(bound(deserialize = "N: Deserialize<'de>"))]
struct RawPricing<N> {
    #[serde(default)]
    pricing_type: Option<String>,
    #[serde(default)]
    amount: Option<N>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(
        default,
        alias = "input_price",
        alias = "input_price_per_million",
        alias = "input_per_million_tokens"
    )]
    input_per_million: Option<N>,
    #[serde(
        default,
        alias = "output_price",
        alias = "output_price_per_million",
        alias = "output_per_million_tokens"
    )]
    output_per_million: Option<N>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default = "default_upstream_kind")]
    kind: String,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    /// Name of an environment variable holding the API key.
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    model_map: BTreeMap<String, String>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
    #[serde(default)]
    idle_timeout_ms: Option<u64>,
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default)]
    retry_backoff_ms: Option<u64>,
}

fn default_upstream_kind() -> String {
    "openai".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_prompt_bytes: Option<usize>,
    max_messages: Option<usize>,
    max_tokens_limit: Option<u32>,
    default_max_tokens: Option<u32>,
    max_amount: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    url: Option<String>,
    timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    hold_ttl_seconds: Option<i64>,
}

impl<N: NumberText> RawConfig<N> {
    fn into_config(self) -> Result<RouterConfig, ConfigError> {
        let mut limits = Limits::default();
        let rl = self.limits;
        if let Some(v) = rl.max_prompt_bytes {
            limits.max_prompt_bytes = v;
        }
        if let Some(v) = rl.max_messages {
            limits.max_messages = v;
        }
        if let Some(v) = rl.max_tokens_limit {
            limits.max_tokens_limit = v;
        }
        if let Some(v) = rl.default_max_tokens {
            limits.default_max_tokens = v;
        } else if limits.default_max_tokens > limits.max_tokens_limit {
            limits.default_max_tokens = limits.max_tokens_limit;
        }
        if let Some(v) = rl.max_amount {
            limits.max_amount_micros =
                money::parse_decimal_micros(&v, i64::MAX).map_err(|source| {
                    ConfigError::Amount {
                        field: "limits.max_amount".into(),
                        source,
                    }
                })?;
        }
        let max = limits.max_amount_micros;
        let services = self
            .services
            .into_iter()
            .map(|s| {
                let pricing = match s.pricing {
                    None => Pricing::free(),
                    Some(p) => p.into_pricing(&s.service_type, max)?,
                };
                Ok(ServiceConfig {
                    service_type: s.service_type,
                    enabled: s.enabled,
                    pricing,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let upstream = match self.upstream {
            None => UpstreamConfig::Echo,
            Some(u) => u.into_upstream()?,
        };
        let mut ledger = LedgerSettings::default();
        if let Some(url) = self.ledger.url {
            ledger.url = url;
        }
        if let Some(ms) = self.ledger.timeout_ms {
            ledger.timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.ledger.connect_timeout_ms {
            ledger.connect_timeout = Duration::from_millis(ms);
        }
        ledger.hold_ttl_seconds = self.ledger.hold_ttl_seconds;
        let config = RouterConfig {
            name: self.name,
            description: self.description,
            owner_email: self.owner_email,
            services,
            models: self.models,
            upstream,
            limits,
            ledger,
            tls: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        };
        config.validate()?;
        Ok(config)
    }
}

impl<N: NumberText> RawPricing<N> {
    fn into_pricing(self, service: &str, max: i64) -> Result<Pricing, ConfigError> {
        let amount = |field: &str, n: Option<N>| -> Result<Option<i64>, ConfigError> {
            let Some(n) = n else { return Ok(None) };
            let field = format!("services.{service}.pricing.{field}");
            let text = n
                .number_text()
                .map_err(|e| invalid(format!("{field}: {e}")))?;
            money::parse_decimal_micros(&text, max)
                .map(Some)
                .map_err(|source| ConfigError::Amount { field, source })
        };
        let currency = self.currency.unwrap_or_else(|| "USD".into());
        let description = self.description.unwrap_or_default();
        let kind = match self.pricing_type.as_deref().unwrap_or("per_request") {
            "free" => PricingKind::Free,
            "per_request" => match amount("amount", self.amount)?.unwrap_or(0) {
                0 => PricingKind::Free,
                amount_micros => PricingKind::PerRequest { amount_micros },
            },
            "per_token" => {
                let input = amount("input_per_million", self.input_per_million)?;
                let output = amount("output_per_million", self.output_per_million)?;
                if input.is_none() && output.is_none() {
                    return Err(invalid(format!(
                        "services.{service}.pricing: per_token needs input_per_million and/or \
                         output_per_million"
                    )));
                }
                match (input.unwrap_or(0), output.unwrap_or(0)) {
                    (0, 0) => PricingKind::Free,
                    (i, o) => PricingKind::PerToken {
                        input_micros_per_million: i,
                        output_micros_per_million: o,
                    },
                }
            }
            other => {
                return Err(invalid(format!(
                    "services.{service}.pricing.pricing_type {other:?}: expected per_request, \
                     per_token or free"
                )))
            }
        };
        Ok(Pricing {
            kind,
            currency,
            description,
        })
    }
}

impl RawUpstream {
    fn into_upstream(self) -> Result<UpstreamConfig, ConfigError> {
        match self.kind.as_str() {
            "echo" => Ok(UpstreamConfig::Echo),
            "openai" => {
                let base_url = self
                    .base_url
                    .ok_or_else(|| invalid("upstream.base_url is required for kind openai"))?;
                let mut o = OpenAiConfig::new(base_url);
                o.api_key = match (self.api_key, self.api_key_env) {
                    (Some(k), _) => Some(k),
                    (None, Some(var)) => std::env::var(&var).ok(),
                    (None, None) => None,
                };
                o.model_map = self.model_map;
                if let Some(ms) = self.connect_timeout_ms {
                    o.connect_timeout = Duration::from_millis(ms);
                }
                if let Some(ms) = self.request_timeout_ms {
                    o.request_timeout = Duration::from_millis(ms);
                }
                if let Some(ms) = self.idle_timeout_ms {
                    o.idle_timeout = Duration::from_millis(ms);
                }
                if let Some(n) = self.max_retries {
                    o.max_retries = n;
                }
                if let Some(ms) = self.retry_backoff_ms {
                    o.retry_backoff = Duration::from_millis(ms);
                }
                Ok(UpstreamConfig::OpenAi(o))
            }
            other => Err(invalid(format!(
                "upstream.kind {other:?}: expected openai or echo"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_with_pricing(pricing: &str) -> String {
        format!(
            r#"{{"name":"r","owner_email":"owner@example.com",
                "services":[{{"type":"chat","enabled":true,"pricing":{pricing}}}]}}"#
        )
    }

    fn chat_pricing(c: &RouterConfig) -> PricingKind {
        c.chat_service()
            .map(|s| s.pricing.kind)
            .unwrap_or(PricingKind::Free)
    }

    #[test]
    fn accepts_owner_pricing_object_exactly() {
        let c = RouterConfig::from_json_str(&json_with_pricing(
            r#"{"pricing_type":"per_request","amount":0.01,"currency":"USD","description":"$0.01 per search query"}"#,
        ))
        .expect("valid");
        let s = c.chat_service().expect("chat");
        assert_eq!(
            s.pricing.kind,
            PricingKind::PerRequest {
                amount_micros: 10_000
            }
        );
        assert_eq!(s.pricing.currency, "USD");
        assert_eq!(s.pricing.description, "$0.01 per search query");
        assert!(matches!(c.upstream, UpstreamConfig::Echo));
    }

    #[test]
    fn per_token_and_free() {
        let c = RouterConfig::from_json_str(&json_with_pricing(
            r#"{"pricing_type":"per_token","input_per_million":3,"output_per_million":"15.5"}"#,
        ))
        .expect("valid");
        assert_eq!(
            chat_pricing(&c),
            PricingKind::PerToken {
                input_micros_per_million: 3_000_000,
                output_micros_per_million: 15_500_000
            }
        );
        let c = RouterConfig::from_json_str(&json_with_pricing(
            r#"{"pricing_type":"per_token","input_price":0.15,"output_price":0.6}"#,
        ))
        .expect("aliases");
        assert_eq!(
            chat_pricing(&c),
            PricingKind::PerToken {
                input_micros_per_million: 150_000,
                output_micros_per_million: 600_000
            }
        );
        for free in [
            r#"{"pricing_type":"per_request","amount":0}"#,
            r#"{"pricing_type":"free"}"#,
            r#"null"#,
        ] {
            let c = RouterConfig::from_json_str(&json_with_pricing(free)).expect(free);
            assert_eq!(chat_pricing(&c), PricingKind::Free, "{free}");
        }
        let c = RouterConfig::from_json_str(r#"{"name":"r","owner_email":"o@example.com"}"#)
            .expect("minimal");
        assert_eq!(chat_pricing(&c), PricingKind::Free);
    }

    #[test]
    fn rejects_inexact_or_bad_amounts() {
        for bad in [
            r#"{"pricing_type":"per_request","amount":0.0000001}"#,
            r#"{"pricing_type":"per_request","amount":0.0100000000000000001}"#,
            r#"{"pricing_type":"per_request","amount":-1}"#,
            r#"{"pricing_type":"per_request","amount":1e30}"#,
            r#"{"pricing_type":"per_request","amount":"NaN"}"#,
            r#"{"pricing_type":"per_request","amount":true}"#,
            r#"{"pricing_type":"per_month","amount":1}"#,
            r#"{"pricing_type":"per_token"}"#,
            r#"{"pricing_type":"per_request","amount":1,"currency":"usd"}"#,
        ] {
            assert!(
                RouterConfig::from_json_str(&json_with_pricing(bad)).is_err(),
                "accepted {bad}"
            );
        }
    }

    #[test]
    fn toml_config() {
        let c = RouterConfig::from_toml_str(
            r#"
            name = "my-router"
            description = "demo"
            owner_email = "owner@example.com"
            models = ["gpt-4o-mini"]

            [[services]]
            type = "chat"
            pricing = { pricing_type = "per_token", input_per_million = "0.15", output_per_million = 0.6 }

            [upstream]
            kind = "openai"
            base_url = "http://127.0.0.1:9/v1"
            model_map = { "gpt-4o-mini" = "upstream-mini" }
            request_timeout_ms = 1500

            [limits]
            max_prompt_bytes = 1000
            "#,
        )
        .expect("valid toml");
        assert_eq!(
            chat_pricing(&c),
            PricingKind::PerToken {
                input_micros_per_million: 150_000,
                output_micros_per_million: 600_000
            }
        );
        let UpstreamConfig::OpenAi(o) = &c.upstream else {
            panic!("expected openai upstream")
        };
        assert_eq!(o.request_timeout, Duration::from_millis(1500));
        assert_eq!(
            o.model_map.get("gpt-4o-mini").map(String::as_str),
            Some("upstream-mini")
        );
        assert_eq!(c.limits.max_prompt_bytes, 1000);
        let c = RouterConfig::from_toml_str(
            r#"
            name = "r"
            owner_email = "owner@example.com"
            [[services]]
            type = "chat"
            pricing = { pricing_type = "per_request", amount = 0.01 }
            "#,
        )
        .expect("toml float amount");
        assert_eq!(
            chat_pricing(&c),
            PricingKind::PerRequest {
                amount_micros: 10_000
            }
        );
    }

    #[test]
    fn rejects_bad_config() {
        assert!(RouterConfig::from_json_str(r#"{"name":"r","owner_email":"nope"}"#).is_err());
        assert!(RouterConfig::from_json_str(r#"{"name":"","owner_email":"o@e.com"}"#).is_err());
        assert!(
            RouterConfig::from_json_str(r#"{"name":"r","owner_email":"o@e.com","typo":1}"#)
                .is_err()
        );
    }

    #[test]
    fn shipped_examples_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let json = RouterConfig::from_file(dir.join("router.example.json")).expect("json example");
        assert_eq!(
            chat_pricing(&json),
            PricingKind::PerRequest {
                amount_micros: 10_000
            }
        );
        let toml = RouterConfig::from_file(dir.join("router.example.toml")).expect("toml example");
        assert_eq!(
            chat_pricing(&toml),
            PricingKind::PerToken {
                input_micros_per_million: 150_000,
                output_micros_per_million: 600_000
            }
        );
        assert_eq!(toml.ledger.hold_ttl_seconds, Some(300));
    }

    #[test]
    fn costs() {
        let p = Pricing::per_token(3_000_000, 15_000_000);
        assert_eq!(p.cost_micros(10, 5), 30 + 75);
        assert_eq!(p.hold_micros(10, 100), 30 + 1500);
        assert_eq!(Pricing::per_request(10_000).cost_micros(1000, 1000), 10_000);
        assert_eq!(Pricing::free().cost_micros(1000, 1000), 0);
    }
}
