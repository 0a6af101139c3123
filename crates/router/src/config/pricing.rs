//! What a service charges: the pricing types, the pricing object of the config file, and how a
//! price is shown to clients (payment-required messages, `GetMetadata`).

use serde::Deserialize;

use super::file::NumberText;
use super::{invalid, ConfigError};
use crate::money::{self, format_micros};

/// What a paid stream whose client left before its end is charged (`left_streams`): a billing
/// rule of the whole router, kept with the prices it applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftStreams {
    /// Nothing: its hold is voided, as a failed request's (the original contract, "client gone
    /// → void"), whatever it was sent. (A client that left holding every word of an answer the
    /// upstream then finished had the whole answer: charged, and the answer kept for its retry.)
    #[default]
    Void,
    /// The text it was sent, counted by the router, at the service's price (a per-request
    /// price in full), once any text was sent, and kept as the request id's answer: a client
    /// that reads most of an answer and leaves does not get it for free, while the owner pays
    /// the upstream for it.
    ChargeDelivered,
}

impl LeftStreams {
    /// The config word, also shown to payers (`GetMetadata`, `/health`).
    pub fn as_str(self) -> &'static str {
        match self {
            LeftStreams::Void => "void",
            LeftStreams::ChargeDelivered => "charge_delivered",
        }
    }
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

/// How the price reads in messages: the owner's description, else one generated from the price.
pub fn describe_price(p: &Pricing) -> String {
    if !p.description.is_empty() {
        return p.description.clone();
    }
    match p.kind {
        PricingKind::Free => "free".into(),
        PricingKind::PerRequest { amount_micros } => {
            format!(
                "{} {} per request",
                format_micros(amount_micros),
                p.currency
            )
        }
        PricingKind::PerToken {
            input_micros_per_million,
            output_micros_per_million,
        } => format!(
            "{} {} per million input tokens and {} per million output tokens",
            format_micros(input_micros_per_million),
            p.currency,
            format_micros(output_micros_per_million)
        ),
    }
}

/// What sized a per-token hold, kept to explain a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBound {
    /// Prompt tokens as counted by the router.
    pub prompt_tokens: u64,
    /// The bound on the answer: the request's `max_tokens`, or the router's default.
    pub max_completion_tokens: u64,
    /// The request sent no `max_tokens`, so `limits.default_max_tokens` was used.
    pub defaulted: bool,
}

impl TokenBound {
    /// Where the completion bound came from, as a refusal says it.
    fn source(&self) -> &'static str {
        if self.defaulted {
            "the request set no max_tokens, so the router's default applies"
        } else {
            "the request's max_tokens"
        }
    }
}

/// What sized a per-token hold and how to reserve less, for a refusal of its amount: `None` for
/// a price per request (its hold is its price).
pub fn hold_sizing(p: &Pricing, hold_micros: i64, bound: Option<TokenBound>) -> Option<String> {
    let PricingKind::PerToken { .. } = p.kind else {
        return None;
    };
    let b = bound?;
    let source = b.source();
    Some(format!(
        "this request reserves {} {} ({} prompt tokens and up to {} completion tokens: {source}); \
         send a smaller max_tokens to reserve less (only the actual cost is charged)",
        format_micros(hold_micros),
        p.currency,
        b.prompt_tokens,
        b.max_completion_tokens,
    ))
}

/// The refusal shown when the user's balance cannot cover the hold: the hold in money, what
/// sized it, and how to reserve less. (The balance itself is not known to the router: the ledger
/// refuses without it, and the router cannot read the user's account.)
pub fn insufficient_funds_message(
    p: &Pricing,
    hold_micros: i64,
    bound: Option<TokenBound>,
) -> String {
    let cur = &p.currency;
    let hold = format_micros(hold_micros);
    match (p.kind, bound) {
        (
            PricingKind::PerToken {
                input_micros_per_million,
                output_micros_per_million,
            },
            Some(b),
        ) => {
            let source = b.source();
            format!(
                "insufficient funds: this request reserves {hold} {cur} ({} prompt tokens at {} \
                 {cur} and up to {} completion tokens at {} {cur} per million tokens; {source}); \
                 send a smaller max_tokens to reserve less, or add funds; either way with a new \
                 request id (this one's refusal stands). Only the actual cost is charged",
                b.prompt_tokens,
                format_micros(input_micros_per_million),
                b.max_completion_tokens,
                format_micros(output_micros_per_million),
            )
        }
        _ => format!(
            "insufficient funds: this request costs {hold} {cur} (the router's price per \
             request); add funds, then send it with a new request id (this one's refusal \
             stands)"
        ),
    }
}

/// The proto form of a price.
pub fn pricing_proto(p: &Pricing) -> syft_proto::router::Pricing {
    let (amount, input, output) = match p.kind {
        PricingKind::Free => (0, 0, 0),
        PricingKind::PerRequest { amount_micros } => (amount_micros, 0, 0),
        PricingKind::PerToken {
            input_micros_per_million,
            output_micros_per_million,
        } => (0, input_micros_per_million, output_micros_per_million),
    };
    syft_proto::router::Pricing {
        pricing_type: p.kind.as_str().into(),
        currency: p.currency.clone(),
        description: p.description.clone(),
        amount_micros: amount,
        input_micros_per_million: input,
        output_micros_per_million: output,
    }
}

/// The pricing as JSON, in the config file's shape with exact decimal strings:
/// `{"pricing_type", "currency", "description", "amount"}` or `input_per_million` /
/// `output_per_million` (`/health`).
pub fn pricing_json(p: &Pricing) -> serde_json::Value {
    let mut v = serde_json::json!({
        "pricing_type": p.kind.as_str(),
        "currency": p.currency,
        "description": describe_price(p),
    });
    match p.kind {
        PricingKind::Free => {}
        PricingKind::PerRequest { amount_micros } => {
            v["amount"] = format_micros(amount_micros).into()
        }
        PricingKind::PerToken {
            input_micros_per_million,
            output_micros_per_million,
        } => {
            v["input_per_million"] = format_micros(input_micros_per_million).into();
            v["output_per_million"] = format_micros(output_micros_per_million).into();
        }
    }
    v
}

/// The pricing object as router owners write it. Unknown keys are refused: a misspelt price
/// (`input_per_milion`) would otherwise bill those tokens at 0. The refusal names the key and
/// lists every accepted one, aliases included.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "N: Deserialize<'de>"))]
pub(super) struct RawPricing<N> {
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

impl<N: NumberText> RawPricing<N> {
    pub(super) fn into_pricing(self, service: &str, max: i64) -> Result<Pricing, ConfigError> {
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
        // A price the pricing type does not read was dropped without a word: per-token prices
        // with no type (or under per_request) made a free service that gave every answer away.
        // No type names the one its prices are of; a price of another type is refused.
        let token_prices = self.input_per_million.is_some() || self.output_per_million.is_some();
        let kind_name = match self.pricing_type.as_deref() {
            Some(name) => name,
            None if token_prices => "per_token",
            None => "per_request",
        };
        let stray = match kind_name {
            "per_request" if token_prices => Some("input_per_million and output_per_million"),
            "per_token" if self.amount.is_some() => Some("amount"),
            "free" if token_prices || self.amount.is_some() => Some("a price"),
            _ => None,
        };
        if let Some(stray) = stray {
            return Err(invalid(format!(
                "services.{service}.pricing: {kind_name} takes no {stray} (per_request takes \
                 amount; per_token, input_per_million and output_per_million; free, neither)"
            )));
        }
        // A price left out is refused, not read as 0: `{pricing_type = "per_request"}` (or a
        // description and currency alone) loaded as a free service quoting a price, and a
        // per-token price without its output side gave every answer's text away. Free is said.
        let missing = |field: &str| {
            invalid(format!(
                "services.{service}.pricing: {kind_name} needs {field} (write {field} = 0 for a \
                 side that is free, or pricing_type = \"free\" for a free service)"
            ))
        };
        let kind = match kind_name {
            "free" => PricingKind::Free,
            "per_request" => match amount("amount", self.amount)? {
                None => return Err(missing("amount")),
                Some(0) => PricingKind::Free,
                Some(amount_micros) => PricingKind::PerRequest { amount_micros },
            },
            "per_token" => {
                let input = amount("input_per_million", self.input_per_million)?
                    .ok_or_else(|| missing("input_per_million"))?;
                let output = amount("output_per_million", self.output_per_million)?
                    .ok_or_else(|| missing("output_per_million"))?;
                match (input, output) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{chat_pricing, RouterConfig, UpstreamConfig};

    fn json_with_pricing(pricing: &str) -> String {
        format!(
            r#"{{"name":"r","owner_email":"owner@example.com",
                "services":[{{"type":"chat","enabled":true,"pricing":{pricing}}}]}}"#
        )
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

    /// Per-token prices with no pricing type are per-token (they loaded as a free service, a
    /// pricing reviewer's finding); a price of another type than the one named is refused, and so
    /// is a price left out: not a price of 0 (each loaded as a free service, or gave the output
    /// side away, without a word). A side that is free is said as 0.
    #[test]
    fn prices_are_read_by_their_type() {
        for (pricing, input, output) in [
            (
                r#"{"input_per_million":3,"output_per_million":15}"#,
                3_000_000,
                15_000_000,
            ),
            (
                r#"{"input_per_million":0,"output_per_million":2}"#,
                0,
                2_000_000,
            ),
        ] {
            let c = RouterConfig::from_json_str(&json_with_pricing(pricing)).expect(pricing);
            let want = PricingKind::PerToken {
                input_micros_per_million: input,
                output_micros_per_million: output,
            };
            assert_eq!(chat_pricing(&c), want, "{pricing}");
        }
        for (refused, says) in [
            (
                r#"{"pricing_type":"per_request","input_per_million":3}"#,
                "takes no",
            ),
            (
                r#"{"pricing_type":"per_token","output_per_million":3,"amount":0.01}"#,
                "takes no",
            ),
            (r#"{"input_per_million":3,"amount":0.01}"#, "takes no"),
            (r#"{"pricing_type":"free","amount":0.01}"#, "takes no"),
            (r#"{"pricing_type":"per_request"}"#, "needs amount"),
            (
                r#"{"pricing_type":"per_request","amount":null}"#,
                "needs amount",
            ),
            (
                r#"{"currency":"USD","description":"$0.05 per request"}"#,
                "needs amount",
            ),
            (r#"{"pricing_type":"per_token"}"#, "needs input_per_million"),
            (r#"{"input_per_million":3}"#, "needs output_per_million"),
            (
                r#"{"pricing_type":"per_token","output_per_million":3}"#,
                "needs input_per_million",
            ),
        ] {
            let err = RouterConfig::from_json_str(&json_with_pricing(refused))
                .expect_err(refused)
                .to_string();
            assert!(err.contains(says), "{refused}: {err}");
        }
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
    fn unknown_pricing_keys_are_refused_naming_the_key_and_the_accepted_ones() {
        let typo = r#"{"pricing_type":"per_token","input_per_milion":3,"output_per_million":15}"#;
        let err = RouterConfig::from_json_str(&json_with_pricing(typo)).expect_err("typo");
        assert_eq!(
            err.to_string(),
            "invalid JSON config at services[0].pricing.input_per_milion: unknown field \
             `input_per_milion`, expected one of `pricing_type`, `amount`, `currency`, \
             `description`, `input_per_million`, `input_per_million_tokens`, `input_price`, \
             `input_price_per_million`, `output_per_million`, `output_per_million_tokens`, \
             `output_price`, `output_price_per_million` at line 2 column 114"
        );
        let toml = super::super::toml_with_pricing(
            r#"{ pricing_type = "per_token", input_per_milion = "3", output_per_million = "15" }"#,
        );
        let err = RouterConfig::from_toml_str(&toml).expect_err("typo");
        assert_eq!(
            err.to_string(),
            "invalid TOML config at services[0].pricing.input_per_milion: TOML parse error at \
             line 6, column 41
  |
6 | pricing = { pricing_type = \"per_token\", input_per_milion = \"3\", output_per_million = \"15\" }
  |                                         ^^^^^^^^^^^^^^^^
unknown field `input_per_milion`, expected one of `pricing_type`, `amount`, `currency`, \
             `description`, `input_per_million`, `input_per_million_tokens`, `input_price`, \
             `input_price_per_million`, `output_per_million`, `output_per_million_tokens`, \
             `output_price`, `output_price_per_million`
"
        );
        // Every documented key and alias still loads.
        for ok in [
            r#"{"pricing_type":"per_request","amount":1,"currency":"USD","description":"d"}"#,
            r#"{"pricing_type":"per_token","input_price":1,"output_price":2}"#,
            r#"{"pricing_type":"per_token","input_price_per_million":1,"output_price_per_million":2}"#,
            r#"{"pricing_type":"per_token","input_per_million_tokens":1,"output_per_million_tokens":2}"#,
        ] {
            RouterConfig::from_json_str(&json_with_pricing(ok)).expect(ok);
        }
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
