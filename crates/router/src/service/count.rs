//! A chat's tokens: the prompt counted before its hold (which anyone may ask for, so large ones
//! wait their turn) and again, at once, when it is settled; the answer's, as the upstream
//! reported them or counted here; and the cost they come to, never above the hold.

use std::time::Instant;

use syft_error::UsageStatus;

use super::{Charge, Prepared, RouterService, Units};
use crate::error::RouterError;
use crate::tokens;
use crate::upstream::UpstreamUsage;

/// Prompts above this size are tokenized on the blocking pool.
const INLINE_TOKENIZE_BYTES: usize = 64 * 1024;

impl RouterService {
    /// The prompt's tokens once the request is admitted (its row, its charge): counted at once,
    /// never queued behind admissions, so a settling request does not wait while its hold runs.
    pub(super) async fn prompt_tokens(&self, p: &Prepared) -> u64 {
        if let Some(n) = p.prompt_tokens {
            return n;
        }
        if p.v.prompt_bytes <= INLINE_TOKENIZE_BYTES {
            return tokens::count_prompt(&p.v.messages);
        }
        tokens::count_prompt_settling(p.v.messages.clone()).await
    }

    /// The prompt's tokens before the hold, which anyone may ask for: large prompts are counted
    /// a core's worth at a time, and refused as busy (503, retryable) while too many wait.
    pub(super) async fn admission_prompt_tokens(&self, p: &Prepared) -> Result<u64, RouterError> {
        if p.v.prompt_bytes <= INLINE_TOKENIZE_BYTES {
            return Ok(tokens::count_prompt(&p.v.messages));
        }
        tokens::count_prompt_admitting(p.v.messages.clone(), p.v.prompt_bytes)
            .await
            .ok_or_else(|| {
                RouterError::Unavailable(
                    "too many large prompts are being counted; send the request again shortly"
                        .into(),
                )
            })
    }

    /// Upstream-reported usage where present, each side counted with the tokenizer where it is
    /// missing (or 0: a prompt, and an answer with text, are never 0 tokens). An upstream that
    /// reported only its prompt tokens had the answer charged as 0 output tokens.
    pub(super) async fn final_tokens(
        &self,
        p: &Prepared,
        reported: Option<UpstreamUsage>,
        content: &str,
    ) -> (u64, u64) {
        let (prompt, completion) =
            reported.map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
        let prompt = match (prompt, p.prompt_tokens) {
            (0, _) => self.prompt_tokens(p).await,
            // Counted before the hold (the request is priced per token or has a token window):
            // the upstream's count is believed within an allowance for its own tokenizer and
            // chat template, and counted at the allowance above it (a prompt it added or a
            // broken count is not the user's, and no hold or window reserved for it).
            (n, Some(counted)) if n > prompt_allowance(counted) => {
                tracing::warn!(
                    request_id = %p.v.request_id,
                    reported = n,
                    counted,
                    "upstream counted far more prompt tokens than the router; counted at the allowance"
                );
                prompt_allowance(counted)
            }
            (n, _) => n,
        };
        let completion = match completion {
            0 => tokens::count_text(content),
            n => n,
        };
        // An upstream never writes more than the limit it was sent (reasoning tokens included),
        // so a larger count is a broken or lying one (or our tokenizer counting its text apart
        // from its own). Counted at the limit: the row, the owner's analytics and the user's
        // token windows then show what the hold paid for, not a billion tokens nobody was sold.
        let capped = at_most_the_limit(p, completion);
        if capped < completion {
            tracing::warn!(
                request_id = %p.v.request_id,
                reported = completion,
                max_tokens = capped,
                "upstream counted more completion tokens than its limit; counted at the limit"
            );
        }
        (prompt, capped)
    }

    /// What an answered request is charged (unary, or a stream's end): its final token counts,
    /// the cost and its success usage row. Settles its rate-limit pass with the tokens used.
    pub(super) async fn charge(
        &self,
        p: &Prepared,
        reported: Option<UpstreamUsage>,
        content: &str,
        started: Instant,
        upstream_ms: i64,
    ) -> Charge {
        let (prompt_tokens, completion_tokens) = self.final_tokens(p, reported, content).await;
        Self::settle_pass(&p.t, prompt_tokens.saturating_add(completion_tokens)).await;
        let units = Units {
            input: prompt_tokens,
            output: completion_tokens,
        };
        Charge {
            tokens: (prompt_tokens, completion_tokens),
            cost: self.cost(p, prompt_tokens, completion_tokens),
            usage: self.usage(&p.t, UsageStatus::Success, units, started, upstream_ms),
        }
    }

    /// The actual cost, never above the hold.
    pub(super) fn cost(&self, p: &Prepared, prompt_tokens: u64, completion_tokens: u64) -> i64 {
        let cost = p.t.pricing.cost_micros(prompt_tokens, completion_tokens);
        if cost > p.t.hold_micros {
            tracing::warn!(request_id = %p.v.request_id, cost, hold = p.t.hold_micros, "cost above hold; capped");
        }
        cost.min(p.t.hold_micros)
    }
}

/// The most prompt tokens believed of an upstream for a prompt the router counted as `counted`
/// (cl100k, with OpenAI's framing of each message): a quarter more, for another tokenizer, and
/// 64 tokens, for a chat template and a short default system prompt.
pub(super) fn prompt_allowance(counted: u64) -> u64 {
    counted.saturating_add(counted / 4).saturating_add(64)
}

/// `completion` tokens, at most the limit the upstream was sent (when one was): it writes no
/// more, so a larger count (its own, or our tokenizer's of its text) is counted at the limit.
pub(super) fn at_most_the_limit(p: &Prepared, completion: u64) -> u64 {
    match p.upstream_req.options.max_tokens {
        Some(max) => completion.min(u64::from(max)),
        None => completion,
    }
}
