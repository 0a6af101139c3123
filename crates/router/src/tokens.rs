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
