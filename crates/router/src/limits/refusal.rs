//! A refusal by the limits: its reason, its message and when the client should come back.

use std::time::Duration;

use syft_error::{QuotaDetails, Reason};

use super::headers::{format_reset, RateHeaders};
use super::{Rule, RuleKind, WindowState};
use crate::error::{QuotaRefusal, RouterError};

/// What a refused request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Enough of the window to age out, after this long.
    Time(Duration),
    /// A request still running to end: a slot to be freed, or a token reservation to be settled
    /// to its real count (the time its entry ages out can be the whole window, an hour on a
    /// `/hour` window, where the request it reserved for may end in a second).
    RequestEnd,
    /// Nothing: the request's cost never fits the window.
    Never,
}

impl Wait {
    /// From a limiter's [`super::Verdict::Refused`].
    pub(super) fn of(retry_after: Option<Duration>, awaits_running: bool) -> Wait {
        match (awaits_running, retry_after) {
            (true, _) => Wait::RequestEnd,
            (false, Some(after)) => Wait::Time(after),
            (false, None) => Wait::Never,
        }
    }
}

/// A request ending frees its place at an unknown time: a short wait is suggested rather than
/// none, so clients back off a little and try again.
const REQUEST_END_RETRY: Duration = Duration::from_secs(1);

pub(super) fn refusal(
    user: &str,
    rules: &[Rule],
    idx: usize,
    wait: Wait,
    states: &[WindowState],
) -> RouterError {
    let rule = &rules[idx];
    let reason = match rule.kind {
        RuleKind::Requests | RuleKind::Tokens => Reason::RateLimited,
        RuleKind::Concurrency | RuleKind::RouterConcurrency => Reason::ConcurrencyLimited,
    };
    let subject = match rule.kind {
        RuleKind::RouterConcurrency => "router".to_string(),
        _ => format!("user:{user}"),
    };
    // A slot's stored window is its crash lease, no wait to tell a client.
    let wait = match rule.is_concurrency() {
        true => Wait::RequestEnd,
        false => wait,
    };
    let message = match (rule.kind, wait) {
        (RuleKind::Concurrency | RuleKind::RouterConcurrency, _) => format!(
            "limit reached ({}); retry when a request in flight ends",
            rule.describe
        ),
        (RuleKind::Tokens, Wait::RequestEnd) => format!(
            "rate limit reached ({}) by what requests still running reserved; retry when one \
             ends (each is settled to the tokens it used)",
            rule.describe
        ),
        (RuleKind::Tokens, Wait::Never) => format!(
            "this request reserves {} tokens, more than the limit of {}; lower max_tokens",
            rule.cost, rule.describe
        ),
        (_, Wait::Time(after)) => format!(
            "rate limit reached ({}); retry after {}",
            rule.describe,
            format_reset(after)
        ),
        (RuleKind::Requests, _) => format!(
            "limit reached ({}); retry when a request ends",
            rule.describe
        ),
    };
    let retry_after = match wait {
        Wait::Time(after) => Some(after),
        Wait::RequestEnd => Some(REQUEST_END_RETRY),
        Wait::Never => None,
    };
    RouterError::Quota(Box::new(QuotaRefusal {
        reason,
        message,
        details: QuotaDetails {
            retry_after,
            violations: vec![(subject, rule.describe.clone())],
        },
        headers: RateHeaders::from_states(rules, states),
        never_fits: rule.kind == RuleKind::Tokens && wait == Wait::Never,
    }))
}
