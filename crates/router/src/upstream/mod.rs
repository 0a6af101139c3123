//! Where answers come from: an OpenAI-compatible server, or the built-in echo model.

mod echo;
mod endpoint;
mod openai;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use syft_error::{QuotaDetails, Reason, UsageStatus};
use syft_proto::router::{ChatOptions, Message};
use thiserror::Error;

pub use echo::{EchoUpstream, ECHO_FAIL_TRIGGER, ECHO_MODEL};
pub(crate) use endpoint::HttpEndpoint;
pub use openai::OpenAiUpstream;
pub(crate) use openai::{read_limited, status_error};

use crate::config::UpstreamConfig;
use crate::error::{QuotaRefusal, RouterError};
use crate::log_throttle::LogThrottle;

/// What the router asks the upstream for.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The upstream's model name (after the model map).
    pub model: String,
    pub messages: Vec<Message>,
    /// Sampling options; `max_tokens` is always set for per-token pricing (the hold bounds it).
    pub options: ChatOptions,
    /// Sent as the OpenAI `user` field (abuse tracking upstream): [`user_pseudonym`] of the
    /// payer; may be empty.
    pub user: String,
}

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A whole (unary) answer.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: String,
    pub model: String,
    pub content: String,
    pub finish_reason: String,
    pub usage: Option<UpstreamUsage>,
}

/// One piece of a streamed answer. Fields are independent: a chunk may carry a delta, a finish
/// reason, usage, or several.
#[derive(Debug, Clone, Default)]
pub struct StreamChunk {
    pub id: Option<String>,
    pub model: Option<String>,
    pub delta: Option<String>,
    pub finish_reason: Option<String>,
    pub usage: Option<UpstreamUsage>,
}

pub type UpstreamStream = Pin<Box<dyn Stream<Item = Result<StreamChunk, UpstreamError>> + Send>>;

/// Why an upstream call failed.
#[derive(Debug, Clone, Error)]
pub enum UpstreamError {
    #[error("upstream timed out")]
    Timeout,
    /// The transport's words, never its URL (`reqwest::Error::without_url`): the upstream's
    /// address, path and query (a gateway's key) went into the void's reason, which the ledger
    /// keeps for good and shows the payer.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream returned HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// When the upstream said to come back (`Retry-After`), if it did.
        retry_after: Option<Duration>,
    },
    #[error("upstream returned an invalid response: {0}")]
    InvalidResponse(String),
    #[error("upstream returned an empty answer")]
    Empty,
    /// The router's shutdown grace period ended before the upstream finished.
    #[error("router shutting down before the upstream finished")]
    ShuttingDown,
}

/// Logs, at most once a minute, an upstream's 403: one user's flagged prompt, or, when every
/// request gets it, the router's setup.
pub(crate) fn request_refused(provider: &str) {
    static LINE: LogThrottle = LogThrottle::new();
    if LINE.allow() {
        tracing::warn!(provider, "the upstream refused a request with HTTP 403: a moderation flag of one user's prompt, or, when every request gets it, the key's access to the model or a firewall in front of the upstream");
    }
}

/// Logs, at most once a minute, an upstream's refusal of the router's own credentials (HTTP 401:
/// a key revoked or expired). Each request said so only in its own warning while `/readyz`
/// stayed green, and every user got 503s.
pub(crate) fn key_refused(provider: &str) {
    static LINE: LogThrottle = LogThrottle::new();
    if LINE.allow() {
        tracing::error!(provider, "the upstream refuses the router's credentials (HTTP 401): every chat fails until they are fixed (--upstream-api-key, or the config file's api_key / api_key_env)");
    }
}

impl UpstreamError {
    /// The failure without the upstream's own words: what the ledger keeps as the void's reason
    /// (for good) and what is logged at the default level. An upstream's error text (and a
    /// parser's, which quotes what it could not read) often quotes the prompt; it goes back to
    /// the caller, whose prompt it is, and to the log at debug only (docs/operations.md,
    /// "Personal data").
    pub fn summary(&self) -> String {
        match self {
            UpstreamError::Status { status, .. } => format!("upstream returned HTTP {status}"),
            UpstreamError::InvalidResponse(_) => "upstream returned an invalid response".into(),
            other => other.to_string(),
        }
    }

    /// The usage row `status` for this failure.
    pub fn usage_status(&self) -> UsageStatus {
        match self {
            UpstreamError::Timeout => UsageStatus::Timeout,
            UpstreamError::InvalidResponse(_) | UpstreamError::Empty => {
                UsageStatus::InvalidResponse
            }
            UpstreamError::Unreachable(_) | UpstreamError::Status { .. } => {
                UsageStatus::UpstreamError
            }
            UpstreamError::ShuttingDown => UsageStatus::Cancelled,
        }
    }

    /// The upstream is out (unreachable, or a 502, 503 or 504), or this router cut the request
    /// at its shutdown: the operator's doing, not the user's request, which gives its place in
    /// the request windows back (a shutdown's cut kept it). Not a 500, which some servers answer
    /// to an input they cannot take (a user could then send such requests past the windows), nor
    /// a 429, the owner's quota at the upstream, which users' windows guard.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) | UpstreamError::ShuttingDown => true,
            UpstreamError::Status { status, .. } => matches!(status, 402 | 502..=504),
            _ => false,
        }
    }

    /// When the upstream said to come back, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether a retry (before the first token) may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) => true,
            UpstreamError::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// How long clients are told to wait when the upstream refuses the router's account for billing:
/// an operator tops it up in minutes, not seconds.
const UPSTREAM_BILLING_WAIT: Duration = Duration::from_secs(300);

impl From<UpstreamError> for RouterError {
    fn from(e: UpstreamError) -> Self {
        match e {
            // A failed request is voided: each says so, as the clients' first question is
            // whether they paid (a stream's error comes after text they may take for an answer).
            UpstreamError::Timeout => {
                RouterError::DeadlineExceeded("upstream timed out; nothing was charged".into())
            }
            UpstreamError::Unreachable(_) => {
                RouterError::Unavailable("upstream unavailable; nothing was charged".into())
            }
            UpstreamError::Status {
                status,
                message,
                retry_after,
            } => match status {
                400 | 413 | 422 => RouterError::InvalidArgument(format!(
                    "upstream rejected the request: {message}"
                )),
                404 => RouterError::NotFound(format!("upstream: {message}")),
                // The upstream's own rate limit, passed on with its `Retry-After` (as `RetryInfo`
                // and the HTTP header): clients back off as long as the provider asked.
                429 => {
                    // Whole seconds, at least one, as `Retry-After` goes over HTTP: gRPC clients
                    // get the same wait (a past date asked for none).
                    let retry_after =
                        retry_after.map(|d| Duration::from_secs(syft_error::retry_after_secs(d)));
                    RouterError::Quota(Box::new(QuotaRefusal {
                        reason: Reason::UpstreamRateLimited,
                        message: match retry_after {
                            Some(after) => format!(
                            "the upstream's rate limit refused the request; nothing was charged, \
                             retry in {} s",
                            syft_error::retry_after_secs(after)
                        ),
                            None => "the upstream's rate limit refused the request; nothing was \
                                 charged, retry later"
                                .into(),
                        },
                        details: QuotaDetails {
                            retry_after,
                            violations: vec![(
                                "upstream".into(),
                                "the upstream's rate limit".into(),
                            )],
                        },
                        headers: Default::default(),
                        never_fits: false,
                    }))
                }
                401 => {
                    RouterError::Unavailable("upstream rejected the router's credentials".into())
                }
                // The router's upstream account is out of credit (a 402, or OpenAI's 429
                // `insufficient_quota`): the operator's to fix, so clients are told to wait
                // minutes, past the SDKs' patience (`x-should-retry: false`), not to retry.
                402 => RouterError::UnavailableFor {
                    message: "the upstream refuses the router's account for billing (out of \
                              credit); nothing was charged"
                        .into(),
                    retry_after: UPSTREAM_BILLING_WAIT,
                },
                // A gateway's refusal of this request (a moderation flag) or of the router's
                // setup (a model not open to the key, a firewall): said as the upstream's
                // refusal of the request, not retried (as a 400), and logged for the operator
                // (`request_refused`). It was told as the router's credentials refused, a 503 the
                // SDKs sent twice more, each with a hold, an upstream call and a row;
                // `PERMISSION_DENIED` would read as the user's token refused.
                403 => RouterError::InvalidArgument(format!(
                    "upstream refused the request (HTTP 403): {message}"
                )),
                // A 5xx that said when to come back (a 503 in maintenance, an overloaded
                // provider): passed on, in whole seconds like the 429's.
                _ => match retry_after.filter(|_| (500..=599).contains(&status)) {
                    Some(after) => {
                        let secs = syft_error::retry_after_secs(after);
                        RouterError::UnavailableFor {
                            message: format!(
                                "upstream error (HTTP {status}); nothing was charged, retry in \
                                 {secs} s"
                            ),
                            retry_after: Duration::from_secs(secs),
                        }
                    }
                    None => RouterError::Unavailable(format!(
                        "upstream error (HTTP {status}); nothing was charged"
                    )),
                },
            },
            UpstreamError::InvalidResponse(_) => RouterError::BadGateway(
                "upstream returned an invalid response; nothing was charged".into(),
            ),
            UpstreamError::Empty => RouterError::BadGateway(
                "upstream returned an empty answer; nothing was charged".into(),
            ),
            UpstreamError::ShuttingDown => RouterError::Unavailable(
                "the router is shutting down; nothing was charged, retry".into(),
            ),
        }
    }
}

/// The configured upstream.
#[derive(Debug, Clone)]
pub enum Upstream {
    Echo(EchoUpstream),
    OpenAi(OpenAiUpstream),
}

impl Upstream {
    pub fn from_config(config: &UpstreamConfig) -> Result<Self, RouterError> {
        Ok(match config {
            UpstreamConfig::Echo => Upstream::Echo(EchoUpstream),
            UpstreamConfig::OpenAi(o) => Upstream::OpenAi(OpenAiUpstream::new(o.clone())?),
        })
    }

    /// `provider_info.provider`: `echo` or `openai`.
    pub fn provider(&self) -> &'static str {
        match self {
            Upstream::Echo(_) => "echo",
            Upstream::OpenAi(_) => "openai",
        }
    }

    /// The model used when a request names none.
    pub fn default_model(&self) -> Option<String> {
        match self {
            Upstream::Echo(_) => Some(echo::ECHO_MODEL.to_string()),
            Upstream::OpenAi(o) => o.config().model_map.keys().next().cloned(),
        }
    }

    /// Models this upstream is known to serve (for listings).
    pub fn known_models(&self) -> Vec<String> {
        match self {
            Upstream::Echo(_) => vec![echo::ECHO_MODEL.to_string()],
            Upstream::OpenAi(o) => o.config().model_map.keys().cloned().collect(),
        }
    }

    /// Router model name -> upstream model name.
    pub fn upstream_model(&self, model: &str) -> String {
        match self {
            Upstream::Echo(_) => model.to_string(),
            Upstream::OpenAi(o) => o
                .config()
                .model_map
                .get(model)
                .cloned()
                .unwrap_or_else(|| model.to_string()),
        }
    }

    pub async fn complete(&self, req: &UpstreamRequest) -> Result<Completion, UpstreamError> {
        match self {
            Upstream::Echo(e) => e.complete(req),
            Upstream::OpenAi(o) => o.complete(req).await,
        }
    }

    /// Opens a stream; errors before the first chunk are returned here (after retries).
    pub async fn stream(&self, req: &UpstreamRequest) -> Result<UpstreamStream, UpstreamError> {
        match self {
            Upstream::Echo(e) => e.stream(req),
            Upstream::OpenAi(o) => o.stream(req).await,
        }
    }
}

/// An f32 as JSON: its shortest decimal (0.3, as the client sent it, or 0.9 as a search backend
/// said), not its exact f64 widening (0.30000001192092896). `null` for NaN or infinity.
pub fn f32_json(v: f32) -> serde_json::Value {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// A stable pseudonym of a router's user for the upstream's `user` field: `syft-` and 32 hex
/// digits of SHA-256 over the router's ledger secret, its name and the email. The upstream can
/// still tell one user's requests from another's (what OpenAI asks the field for), but the
/// payer's email, which the router used to send as it was, no longer leaves for a third party;
/// keyed by the secret, it cannot be reversed by hashing guessed emails. The owner maps it back
/// by computing it for an email (`user_pseudonym_is_stable_and_keyed` shows the recipe). Empty
/// for an empty email.
pub fn user_pseudonym(secret: &str, router: &str, email: &str) -> String {
    use sha2::{Digest, Sha256};
    if email.is_empty() {
        return String::new();
    }
    let mut h = Sha256::new();
    for part in [secret, router, email] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = hex::encode(h.finalize());
    format!("syft-{}", &digest[..32])
}

#[cfg(test)]
mod tests {
    use super::{user_pseudonym, UpstreamError};

    /// The failure kept for good and logged by default says the status, never the upstream's
    /// words (which may quote the prompt).
    #[test]
    fn a_summary_leaves_the_upstreams_words_out() {
        let e = UpstreamError::Status {
            status: 400,
            message: "cannot process: patient Jane Roe".into(),
            retry_after: None,
        };
        assert_eq!(e.summary(), "upstream returned HTTP 400");
        let e = UpstreamError::InvalidResponse("invalid type: string \"Jane Roe\"".into());
        assert!(!e.summary().contains("Jane"), "{}", e.summary());
        assert!(
            e.to_string().contains("Jane"),
            "the caller still gets it: {e}"
        );
    }

    /// What gives a request's place in its windows back: an outage, and a cut at this router's
    /// shutdown (the user retries elsewhere: it kept the place, a graceful drain spent the
    /// requests per minute of every user it cut); never what a user's request may cause.
    #[test]
    fn an_outage_or_a_shutdown_is_not_the_users_doing() {
        let status = |status| UpstreamError::Status {
            status,
            message: String::new(),
            retry_after: None,
        };
        assert!(UpstreamError::ShuttingDown.is_outage());
        assert!(UpstreamError::Unreachable("refused".into()).is_outage());
        assert!(status(503).is_outage());
        for not in [status(500), status(429), status(400)] {
            assert!(!not.is_outage(), "{not:?}");
        }
    }

    #[test]
    fn user_pseudonym_is_stable_and_keyed() {
        let a = user_pseudonym("secret", "router", "alice@example.com");
        assert_eq!(a, user_pseudonym("secret", "router", "alice@example.com"));
        assert!(a.starts_with("syft-") && a.len() == 37, "{a}");
        // The recipe, for an owner mapping a pseudonym back to an email.
        let mut input = Vec::new();
        for part in ["secret", "router", "alice@example.com"] {
            input.extend_from_slice(part.as_bytes());
            input.push(0);
        }
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&input));
        assert_eq!(a, format!("syft-{}", &digest[..32]));
        for other in [
            user_pseudonym("other secret", "router", "alice@example.com"),
            user_pseudonym("secret", "other router", "alice@example.com"),
            user_pseudonym("secret", "router", "bob@example.com"),
        ] {
            assert_ne!(a, other);
        }
        assert_eq!(user_pseudonym("secret", "router", ""), "");
    }
}
