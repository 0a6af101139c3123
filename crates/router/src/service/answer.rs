//! Small shapes of an answer: elapsed milliseconds, token usage, finish reasons.

use std::time::Instant;

use syft_proto::router::TokenUsage;

pub(super) fn elapsed_ms(since: Instant) -> i64 {
    i64::try_from(since.elapsed().as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn token_usage(prompt: u64, completion: u64) -> TokenUsage {
    let p = i64::try_from(prompt).unwrap_or(i64::MAX);
    let c = i64::try_from(completion).unwrap_or(i64::MAX);
    TokenUsage {
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: p.saturating_add(c),
    }
}

pub(super) fn normalize_finish(reason: &str) -> String {
    match reason {
        "" => "stop".into(),
        r => r.to_string(),
    }
}
