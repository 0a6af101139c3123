//! The config file format (JSON or TOML) and its parsing into a [`RouterConfig`].
//!
//! Every object refuses unknown keys, so a typo fails at load instead of silently falling back
//! to a default; the error names the key, where it is (`services[0].pricing`) and the accepted
//! keys. The one open map is `upstream.model_map`, whose keys are model names.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::pricing::RawPricing;
use super::rate::{RawBudgets, RawLimiter, RawRateLimits};
use super::search::RawSearch;
use super::{
    invalid, ConfigError, LedgerSettings, Limits, MaxTokensField, OpenAiConfig, Pricing,
    RouterConfig, ServiceConfig, ServiceKind, UpstreamConfig, DEFAULT_SHUTDOWN_GRACE,
};
use crate::money;

/// Parses a JSON config file's text.
pub(super) fn parse_json(text: &str) -> Result<RouterConfig, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: RawConfig<Box<RawValue>> =
        with_path(&mut de).map_err(|(path, source)| ConfigError::Json { path, source })?;
    de.end().map_err(|source| ConfigError::Json {
        path: String::new(),
        source,
    })?;
    raw.into_config()
}

/// Parses a TOML config file's text.
pub(super) fn parse_toml(text: &str) -> Result<RouterConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|source| ConfigError::Toml {
        path: String::new(),
        source,
    })?;
    let raw: RawConfig<toml::Value> =
        with_path(de).map_err(|(path, source)| ConfigError::Toml { path, source })?;
    raw.into_config()
}

/// Deserializes `T`, keeping where in the file an error happened (`services[0].pricing`).
fn with_path<'de, D, T>(de: D) -> Result<T, (String, D::Error)>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // `.` is the path of the document itself.
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner())
    })
}

/// A number as written in the file, before exact parsing.
pub(super) trait NumberText {
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
    search: Option<RawSearch>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    rate_limits: RawRateLimits,
    #[serde(default)]
    budgets: RawBudgets,
    #[serde(default)]
    limiter: RawLimiter,
    #[serde(default)]
    ledger: RawLedger,
    #[serde(default)]
    cors_origins: Vec<String>,
    #[serde(default)]
    left_streams: super::LeftStreams,
}

fn default_services<N>() -> Vec<RawService<N>> {
    vec![RawService {
        service_type: "chat".into(),
        enabled: true,
        pricing: None,
        rate_limits: None,
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
    #[serde(default)]
    rate_limits: Option<RawRateLimits>,
}

fn yes() -> bool {
    true
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
    #[serde(default)]
    max_tokens_field: Option<MaxTokensField>,
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

/// The ledger's URL(s): a string or a list of strings.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a URL, a comma-separated list of URLs, or an array of URLs"
)]
enum RawUrls {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    /// One URL, a comma-separated list, or an array of URLs.
    url: Option<RawUrls>,
    timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    hold_ttl_seconds: Option<i64>,
    /// Directory of the free usage rows' spool (`LedgerSettings::usage_spool`).
    usage_spool: Option<std::path::PathBuf>,
    /// `LedgerSettings::usage_spool_sync` (default on).
    usage_spool_sync: Option<bool>,
}

impl<N: NumberText> RawConfig<N> {
    fn into_config(self) -> Result<RouterConfig, ConfigError> {
        let mut limits = Limits::default();
        let rl = self.limits;
        set(&mut limits.max_prompt_bytes, rl.max_prompt_bytes);
        set(&mut limits.max_messages, rl.max_messages);
        set(&mut limits.max_tokens_limit, rl.max_tokens_limit);
        if let Some(v) = rl.default_max_tokens {
            limits.default_max_tokens = v;
            limits.bound_every_chat = true;
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
            .enumerate()
            .map(|(i, s)| {
                let kind = ServiceKind::parse(&s.service_type).ok_or_else(|| {
                    invalid(format!(
                        "service type {:?}: expected chat or search",
                        s.service_type
                    ))
                })?;
                let rate_limits = match s.rate_limits {
                    None => Default::default(),
                    Some(r) => r.into_limits(&format!("services[{i}].rate_limits"))?,
                };
                let pricing = match s.pricing {
                    None => Pricing::free(),
                    Some(p) => p.into_pricing(&s.service_type, max)?,
                };
                Ok(ServiceConfig {
                    kind,
                    enabled: s.enabled,
                    pricing,
                    rate_limits,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let upstream = match self.upstream {
            None => UpstreamConfig::Echo,
            Some(u) => u.into_upstream()?,
        };
        let search = self.search.map(RawSearch::into_config).transpose()?;
        let mut ledger = LedgerSettings::default();
        if let Some(url) = self.ledger.url {
            ledger.url = match url {
                RawUrls::One(u) => u,
                RawUrls::Many(list) => list.join(","),
            };
        }
        set_ms(&mut ledger.timeout, self.ledger.timeout_ms);
        set_ms(&mut ledger.connect_timeout, self.ledger.connect_timeout_ms);
        ledger.hold_ttl_seconds = self.ledger.hold_ttl_seconds;
        ledger.usage_spool = self.ledger.usage_spool;
        if let Some(sync) = self.ledger.usage_spool_sync {
            ledger.usage_spool_sync = sync;
        }
        let config = RouterConfig {
            name: self.name,
            description: self.description,
            owner_email: self.owner_email,
            services,
            models: self.models,
            upstream,
            search,
            limits,
            rate_limits: self.rate_limits.into_limits("rate_limits")?,
            budgets: self.budgets.into_budgets(max)?,
            limiter: self.limiter.into_config()?,
            ledger,
            replay: super::ReplaySettings::default(),
            max_stream_duration: super::DEFAULT_MAX_STREAM_DURATION,
            tls: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            http: syft_server::HttpLimits::default(),
            cors_origins: self.cors_origins,
            left_streams: self.left_streams,
        };
        // The models are checked when the router starts: `--models` may still be given.
        config.validate_settings()?;
        Ok(config)
    }
}

impl RawUpstream {
    fn into_upstream(self) -> Result<UpstreamConfig, ConfigError> {
        match self.kind.as_str() {
            "echo" => {
                // The built-in model reads none of them: one given was a mistake the owner
                // should hear of (a search section refuses the other backend's keys the same way).
                let ignored = [
                    ("base_url", self.base_url.is_some()),
                    ("api_key", self.api_key.is_some()),
                    ("api_key_env", self.api_key_env.is_some()),
                    ("model_map", !self.model_map.is_empty()),
                    ("connect_timeout_ms", self.connect_timeout_ms.is_some()),
                    ("request_timeout_ms", self.request_timeout_ms.is_some()),
                    ("idle_timeout_ms", self.idle_timeout_ms.is_some()),
                    ("max_retries", self.max_retries.is_some()),
                    ("retry_backoff_ms", self.retry_backoff_ms.is_some()),
                    ("max_tokens_field", self.max_tokens_field.is_some()),
                ];
                match ignored.iter().find(|(_, set)| *set) {
                    Some((key, _)) => Err(invalid(format!(
                        "upstream.{key} is not read by upstream kind echo (the built-in model)"
                    ))),
                    None => Ok(UpstreamConfig::Echo),
                }
            }
            "openai" => {
                let base_url = self
                    .base_url
                    .ok_or_else(|| invalid("upstream.base_url is required for kind openai"))?;
                let mut o = OpenAiConfig::new(base_url);
                o.api_key = api_key("upstream", self.api_key, self.api_key_env)?;
                o.model_map = self.model_map;
                set_ms(&mut o.connect_timeout, self.connect_timeout_ms);
                set_ms(&mut o.request_timeout, self.request_timeout_ms);
                set_ms(&mut o.idle_timeout, self.idle_timeout_ms);
                set(&mut o.max_retries, self.max_retries);
                set_ms(&mut o.retry_backoff, self.retry_backoff_ms);
                set(&mut o.max_tokens_field, self.max_tokens_field);
                Ok(UpstreamConfig::OpenAi(o))
            }
            other => Err(invalid(format!(
                "upstream.kind {other:?}: expected openai or echo"
            ))),
        }
    }
}

/// The key `section` gives: its `api_key`, or the environment variable its `api_key_env` names.
/// One that is not set (a typo, a unit file without it) was taken for no key, and the upstream
/// refused every call; both given, `api_key` won without a word (a placeholder left beside the
/// variable was sent).
pub(super) fn api_key(
    section: &str,
    key: Option<String>,
    env: Option<String>,
) -> Result<Option<syft_server::Secret>, ConfigError> {
    match (key, env) {
        (Some(_), Some(_)) => Err(invalid(format!(
            "{section}: give api_key or api_key_env, not both"
        ))),
        (Some(k), None) => Ok(Some(k.into())),
        (None, Some(var)) => match std::env::var(&var) {
            Ok(key) if !key.is_empty() => Ok(Some(key.into())),
            _ => Err(invalid(format!(
                "{section}.api_key_env names {var}, which is not set"
            ))),
        },
        (None, None) => Ok(None),
    }
}

/// Overrides a default with the file's value, when the file gives one (absent keys keep it).
pub(super) fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// [`set`] for a duration the file gives in milliseconds (`*_ms` keys).
pub(super) fn set_ms(slot: &mut Duration, ms: Option<u64>) {
    set(slot, ms.map(Duration::from_millis));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{chat_pricing, PricingKind};

    #[test]
    fn ledger_url_list() {
        let c = RouterConfig::from_json_str(
            r#"{"name":"r","owner_email":"o@example.com",
                "ledger":{"url":["http://10.0.0.1:50051","http://10.0.0.2:50051"]}}"#,
        )
        .expect("array");
        assert_eq!(
            c.ledger.urls(),
            ["http://10.0.0.1:50051", "http://10.0.0.2:50051"]
        );
        let c = RouterConfig::from_toml_str(
            "name = \"r\"\nowner_email = \"o@example.com\"\n[ledger]\nurl = \"http://a:1, http://b:2,\"\n",
        )
        .expect("comma list");
        assert_eq!(c.ledger.urls(), ["http://a:1", "http://b:2"]);
        // Not an http(s) endpoint: refused at start (it was taken, and failed at each call).
        for url in [
            "not-a-url",
            "ftp://10.0.0.1:50051",
            "http://a:1,127.0.0.1:2",
            ",",
        ] {
            let json = format!(
                r#"{{"name":"r","owner_email":"o@example.com","ledger":{{"url":"{url}"}}}}"#
            );
            let err = RouterConfig::from_json_str(&json).expect_err(url);
            assert!(err.to_string().contains("ledger"), "{url}: {err}");
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
            max_tokens_field = "max_completion_tokens"

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
        assert_eq!(o.max_tokens_field, MaxTokensField::MaxCompletionTokens);
        assert_eq!(
            o.model_map.get("gpt-4o-mini").map(String::as_str),
            Some("upstream-mini")
        );
        assert_eq!(c.limits.max_prompt_bytes, 1000);
        // The default bound goes to every chat only when the file sets it.
        assert!(!c.limits.bound_every_chat);
        let bounded =
            r#"{"name":"r","owner_email":"o@example.com","limits":{"default_max_tokens":512}}"#;
        let c = RouterConfig::from_json_str(bounded).expect("bounded");
        assert_eq!(c.limits.default_max_tokens, 512);
        assert!(c.limits.bound_every_chat);
        let toml =
            super::super::toml_with_pricing(r#"{ pricing_type = "per_request", amount = 0.01 }"#);
        let c = RouterConfig::from_toml_str(&toml).expect("toml float amount");
        assert_eq!(
            chat_pricing(&c),
            PricingKind::PerRequest {
                amount_micros: 10_000
            }
        );
    }

    /// `left_streams` is one of its two words; anything else is refused at start, naming them
    /// (a mistyped policy must not fall back to another way of charging).
    #[test]
    fn left_streams_is_void_or_charge_delivered() {
        let parse = |value: &str| {
            RouterConfig::from_json_str(&format!(
                r#"{{"name":"r","owner_email":"o@example.com","left_streams":{value}}}"#
            ))
        };
        assert_eq!(
            parse(r#""charge_delivered""#).expect("valid").left_streams,
            super::super::LeftStreams::ChargeDelivered
        );
        assert_eq!(
            parse(r#""void""#).expect("valid").left_streams,
            super::super::LeftStreams::Void
        );
        let err = parse(r#""charge""#).expect_err("unknown").to_string();
        assert!(
            err.contains("void") && err.contains("charge_delivered"),
            "{err}"
        );
    }

    /// A router selling chat from an OpenAI-compatible upstream names what it sells: `models`,
    /// a `model_map`, or `["*"]` for any. With none it passed any model a client named (the
    /// dearest there is) to the upstream at its prices.
    #[test]
    fn an_upstream_router_names_its_models() {
        let config = |extra: &str| {
            RouterConfig::from_json_str(&format!(
                r#"{{"name":"r","owner_email":"o@example.com",
                    "upstream":{{"kind":"openai","base_url":"http://up/v1"{extra}}}}}"#
            ))
            .expect("parses")
        };
        let err = config("").validate().expect_err("no models").to_string();
        assert!(
            err.contains("models: list the models this router sells"),
            "{err}"
        );
        let mapped = config(r#","model_map":{"mini":"gpt-4o-mini"}"#);
        assert!(mapped.validate().is_ok());
        let mut any = config("");
        any.models = vec!["*".into()];
        assert!(any.validate().is_ok());
        any.models.push("gpt-4o".into());
        let err = any.validate().expect_err("* with names").to_string();
        assert!(err.contains("stands alone"), "{err}");
        let mut listed = config("");
        listed.models = vec!["gpt-4o-mini".into()];
        assert!(listed.validate().is_ok());
        for (models, says) in [
            (vec![""], "is not a model name"),
            (vec![" b"], "is not a model name"),
            (vec!["a", "a"], "listed twice"),
        ] {
            listed.models = models.into_iter().map(String::from).collect();
            let err = listed.validate().expect_err(says).to_string();
            assert!(err.contains(says), "{err}");
        }
        // Not selling chat (a search-only router), or on the built-in echo: nothing to name.
        let mut search_only = config("");
        search_only.services.retain(|s| s.kind != ServiceKind::Chat);
        assert!(search_only.validate().is_ok());
        let echo = RouterConfig::from_json_str(r#"{"name":"r","owner_email":"o@example.com"}"#);
        assert!(echo.expect("parses").validate().is_ok());
    }

    /// An answer cap above what the ledger stores would fail captures after the upstream
    /// answered: refused at start-up.
    #[test]
    fn answer_cap_is_within_the_ledgers() {
        let mut c = RouterConfig::from_json_str(r#"{"name":"r","owner_email":"o@example.com"}"#)
            .expect("config");
        c.replay.max_bytes = syft_error::MAX_ANSWER_BYTES;
        assert!(c.validate().is_ok());
        c.replay.max_bytes += 1;
        let err = c.validate().expect_err("over the ledger's limit");
        assert!(err.to_string().contains("answer max bytes"), "{err}");
    }

    /// A hold life no ledger grants is refused at start, not at every paid request as the
    /// user's "invalid request".
    #[test]
    fn a_hold_life_no_ledger_grants_is_refused() {
        let with = |ttl: &str| {
            RouterConfig::from_json_str(&format!(
                r#"{{"name":"r","owner_email":"o@example.com","ledger":{{"hold_ttl_seconds":{ttl}}}}}"#
            ))
        };
        for ttl in ["1", "300", "2592000"] {
            assert!(with(ttl).is_ok(), "{ttl}");
        }
        for ttl in ["0", "-1", "2592001", "999999999999"] {
            let err = with(ttl).expect_err(ttl).to_string();
            assert!(err.contains("ledger.hold_ttl_seconds"), "{ttl}: {err}");
        }
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
    fn unknown_keys_anywhere_are_refused_with_their_place() {
        let base = r#""name":"r","owner_email":"o@example.com""#;
        for (extra, want) in [
            (
                r#""services":[{"type":"chat","enabld":true}]"#,
                "invalid JSON config at services[0].enabld: unknown field `enabld`, expected one \
                 of `type`, `enabled`, `pricing`, `rate_limits` at line 1 column 77",
            ),
            (
                r#""upstream":{"kind":"echo","base_ulr":"x"}"#,
                "invalid JSON config at upstream.base_ulr: unknown field `base_ulr`, expected one \
                 of `kind`, `base_url`, `api_key`, `api_key_env`, `model_map`, \
                 `connect_timeout_ms`, `request_timeout_ms`, `idle_timeout_ms`, `max_retries`, \
                 `retry_backoff_ms`, `max_tokens_field` at line 1 column 78",
            ),
            (
                r#""limits":{"max_token":5}"#,
                "invalid JSON config at limits.max_token: unknown field `max_token`, expected one \
                 of `max_prompt_bytes`, `max_messages`, `max_tokens_limit`, \
                 `default_max_tokens`, `max_amount` at line 1 column 63",
            ),
            (
                r#""ledger":{"hold_ttl":5}"#,
                "invalid JSON config at ledger.hold_ttl: unknown field `hold_ttl`, expected one \
                 of `url`, `timeout_ms`, `connect_timeout_ms`, `hold_ttl_seconds`, `usage_spool`, \
                 `usage_spool_sync` at line 1 column 62",
            ),
            (
                r#""modles":["m"]"#,
                "invalid JSON config at modles: unknown field `modles`, expected one of `name`, \
                 `description`, `owner_email`, `services`, `models`, `upstream`, `search`, \
                 `limits`, `rate_limits`, `budgets`, `limiter`, `ledger`, `cors_origins`, \
                 `left_streams` at line 1 column 50",
            ),
        ] {
            let err = RouterConfig::from_json_str(&format!("{{{base},{extra}}}")).expect_err(extra);
            assert_eq!(err.to_string(), want);
        }
        // Model names are the keys of `model_map`, so any key is accepted there.
        RouterConfig::from_json_str(&format!(
            r#"{{{base},"upstream":{{"kind":"openai","base_url":"http://h/v1","model_map":{{"any name":"x"}}}}}}"#
        ))
        .expect("model_map is open");
    }

    #[test]
    fn a_usage_spool_is_synced_unless_told_otherwise() {
        let base = r#""name":"r","owner_email":"o@x.org""#;
        let c = RouterConfig::from_json_str(&format!("{{{base}}}")).expect("no spool");
        assert_eq!(
            (c.ledger.usage_spool, c.ledger.usage_spool_sync),
            (None, true)
        );
        let c =
            RouterConfig::from_json_str(&format!(r#"{{{base},"ledger":{{"usage_spool":"/s"}}}}"#))
                .expect("spool");
        assert_eq!(
            c.ledger.usage_spool.as_deref(),
            Some(std::path::Path::new("/s"))
        );
        assert!(c.ledger.usage_spool_sync);
        let c = RouterConfig::from_json_str(&format!(
            r#"{{{base},"ledger":{{"usage_spool":"/s","usage_spool_sync":false}}}}"#
        ))
        .expect("spool without sync");
        assert!(!c.ledger.usage_spool_sync);
    }

    #[test]
    fn cors_origins_are_origins() {
        let with = |origins: &str| {
            RouterConfig::from_json_str(&format!(
                r#"{{"name":"r","owner_email":"o@x.org","cors_origins":{origins}}}"#
            ))
        };
        let c = with(r#"["https://app.example","http://localhost:3000","http://[::1]:8080","*"]"#)
            .expect("origins");
        assert_eq!(c.cors_origins.len(), 4);
        // A path or trailing slash never equals a browser's `Origin`; the rest are not origins.
        for bad in [
            "https://app.example/",
            "https://app.example/chat",
            "app.example",
            "ftp://app.example",
            "https://",
            "https://u@app.example",
            "https://App.Example",
            "https://app.example:443",
            "https://app.example:abc",
            "https://*.app.example",
        ] {
            let err = with(&format!("[{bad:?}]")).expect_err(bad);
            assert!(err.to_string().contains("cors_origins"), "{bad}: {err}");
        }
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
        // Its key comes from `OPENAI_API_KEY`, which must be set (an unset one is refused):
        // read as the owner's environment would give it.
        let text = std::fs::read_to_string(dir.join("router.example.toml")).expect("toml example");
        let text = text.replace(
            "api_key_env = \"OPENAI_API_KEY\"",
            "api_key = \"sk-from-the-environment\"",
        );
        assert!(
            text.contains("sk-from-the-environment"),
            "the example reads its key"
        );
        let toml = RouterConfig::from_toml_str(&text).expect("toml example");
        assert_eq!(
            chat_pricing(&toml),
            PricingKind::PerToken {
                input_micros_per_million: 150_000,
                output_micros_per_million: 600_000
            }
        );
        assert_eq!(toml.ledger.hold_ttl_seconds, Some(300));
    }
}
