//! Token counting with a real tokenizer (`cl100k_base`, bundled with tiktoken-rs: no download).

use syft_proto::router::Message;
use tiktoken_rs::CoreBPE;

fn bpe() -> &'static CoreBPE {
    tiktoken_rs::cl100k_base_singleton()
}

/// Tokens in a piece of text.
pub fn count_text(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe().encode_ordinary(text).len() as u64
}

/// Prompt tokens of a chat, following OpenAI's accounting for chat models: 3 tokens of framing
/// per message, 1 more for a name, and 3 to prime the reply.
pub fn count_prompt(messages: &[Message]) -> u64 {
    let mut total = 3u64;
    for m in messages {
        total += 3 + count_text(&m.role) + count_text(&m.content);
        if let Some(name) = &m.name {
            total += 1 + count_text(name);
        }
    }
    total
}

/// Large prompts counted at once before their hold, at most: one per core. Counting is about a
/// microsecond and fifty bytes of memory per prompt byte, and it comes before the ledger has
/// seen the request's token, so anyone could send it: 30 unauthenticated 4 MiB prompts at once
/// took a router from 130 MB to 6 GB and every core for 30 s (the blocking pool runs up to 512
/// threads).
static ADMITTING: std::sync::LazyLock<(tokio::sync::Semaphore, usize)> =
    std::sync::LazyLock::new(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (tokio::sync::Semaphore::new(cores), cores * WAITING_PER_CORE)
    });
/// Large prompts that may wait for their count per core; past them an admission is refused as
/// busy rather than queued, so the queue's memory (the prompts) stays bounded too.
const WAITING_PER_CORE: usize = 8;
/// Large prompts counting or waiting to, before their hold.
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// [`count_prompt`] of a large prompt before its hold, on the blocking pool, one per core at a
/// time. `None`: too many are waiting (the caller refuses the request as busy). Should the count
/// fail (a panic in the tokenizer), `prompt_bytes` plus the framing stands in: no token is
/// shorter than a byte, so it is never below the count, and a hold sized on it still bounds what
/// the request can cost.
pub async fn count_prompt_admitting(messages: Vec<Message>, prompt_bytes: usize) -> Option<u64> {
    use std::sync::atomic::Ordering;
    let (turns, most) = &*ADMITTING;
    if WAITING.fetch_add(1, Ordering::AcqRel) >= *most {
        WAITING.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    struct Leaving;
    impl Drop for Leaving {
        fn drop(&mut self) {
            WAITING.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _leaving = Leaving;
    let bound = (prompt_bytes as u64).saturating_add(4 * (messages.len() as u64 + 1));
    let Ok(_turn) = turns.acquire().await else {
        return Some(bound);
    };
    Some(
        tokio::task::spawn_blocking(move || count_prompt(&messages))
            .await
            .unwrap_or(bound),
    )
}

/// [`count_prompt`] of a large prompt of an admitted request (its usage row, its charge), on the
/// blocking pool at once: it must not wait behind admissions while its hold runs. A failed count
/// is 0 here (the upstream's count, or none, is charged), never an upper bound that would
/// overcharge.
pub async fn count_prompt_settling(messages: Vec<Message>) -> u64 {
    tokio::task::spawn_blocking(move || count_prompt(&messages))
        .await
        .unwrap_or(0)
}

/// The first `max_tokens` tokens of `text`, and whether it was cut.
pub fn truncate_to_tokens(text: &str, max_tokens: usize) -> (String, bool) {
    let tokens = bpe().encode_ordinary(text);
    if tokens.len() <= max_tokens {
        return (text.to_string(), false);
    }
    // Decoding a prefix can split a multi-byte character; back off until it decodes.
    let mut n = max_tokens;
    while n > 0 {
        if let Ok(s) = bpe().decode(&tokens[..n]) {
            return (s, true);
        }
        n -= 1;
    }
    (String::new(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_cl100k() {
        assert_eq!(count_text("hello world"), 2);
        assert_eq!(count_text(""), 0);
        let msgs = vec![Message {
            role: "user".into(),
            content: "hello world".into(),
            name: None,
        }];
        // 3 (priming) + 3 (framing) + 1 ("user") + 2
        assert_eq!(count_prompt(&msgs), 9);
    }

    /// Large prompts are counted as small ones are, one core's worth at a time.
    #[tokio::test]
    async fn a_large_prompt_is_counted_exactly_off_the_runtime() {
        let messages = vec![Message {
            role: "user".into(),
            content: "lorem ipsum dolor ".repeat(10_000),
            name: None,
        }];
        let exact = count_prompt(&messages);
        let counts = futures::future::join_all(
            (0..8).map(|_| count_prompt_admitting(messages.clone(), 180_004)),
        )
        .await;
        assert!(
            counts.iter().all(|&n| n == Some(exact)),
            "{counts:?} vs {exact}"
        );
        assert_eq!(count_prompt_settling(messages).await, exact);
    }

    #[test]
    fn truncates() {
        let (s, cut) = truncate_to_tokens("one two three four", 2);
        assert!(cut);
        assert_eq!(s, "one two");
        let (s, cut) = truncate_to_tokens("one", 5);
        assert!(!cut);
        assert_eq!(s, "one");
    }
}
