//! The built-in `echo` model: deterministic, offline, labelled `provider: "echo"`.
//!
//! It answers `echo: <last user message>`, cut to `max_tokens` (finish reason `length`).
//! A last user message starting with [`ECHO_FAIL_TRIGGER`] makes it fail like an upstream
//! HTTP 500, so demos can show that failed requests are not charged.

use futures::stream;

use super::{
    Completion, StreamChunk, UpstreamError, UpstreamRequest, UpstreamStream, UpstreamUsage,
};
use crate::tokens;

/// The model name echo answers as when none is given.
pub const ECHO_MODEL: &str = "echo";

/// A prompt starting with this makes echo fail (simulated upstream error).
pub const ECHO_FAIL_TRIGGER: &str = "[echo:fail]";

#[derive(Debug, Clone, Copy, Default)]
pub struct EchoUpstream;

impl EchoUpstream {
    fn answer(&self, req: &UpstreamRequest) -> Result<Completion, UpstreamError> {
        let last_user = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .unwrap_or("");
        if last_user.starts_with(ECHO_FAIL_TRIGGER) {
            return Err(UpstreamError::Status {
                status: 500,
                message: "echo: simulated upstream failure".into(),
                retry_after: None,
            });
        }
        let full = format!("echo: {last_user}");
        let (content, cut) = match req.options.max_tokens {
            Some(max) => tokens::truncate_to_tokens(&full, max as usize),
            None => (full, false),
        };
        Ok(Completion {
            id: format!("echo-{}", content.len()),
            model: req.model.clone(),
            usage: Some(UpstreamUsage {
                prompt_tokens: tokens::count_prompt(&req.messages),
                completion_tokens: tokens::count_text(&content),
            }),
            content,
            finish_reason: if cut { "length" } else { "stop" }.into(),
        })
    }

    pub fn complete(&self, req: &UpstreamRequest) -> Result<Completion, UpstreamError> {
        self.answer(req)
    }

    pub fn stream(&self, req: &UpstreamRequest) -> Result<UpstreamStream, UpstreamError> {
        let c = self.answer(req)?;
        let mut chunks: Vec<Result<StreamChunk, UpstreamError>> = c
            .content
            .split_inclusive(' ')
            .map(|piece| {
                Ok(StreamChunk {
                    id: Some(c.id.clone()),
                    model: Some(c.model.clone()),
                    delta: Some(piece.to_string()),
                    ..StreamChunk::default()
                })
            })
            .collect();
        chunks.push(Ok(StreamChunk {
            finish_reason: Some(c.finish_reason.clone()),
            usage: c.usage,
            ..StreamChunk::default()
        }));
        Ok(Box::pin(stream::iter(chunks)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use syft_proto::router::{ChatOptions, Message};

    fn req(content: &str, max_tokens: Option<u32>) -> UpstreamRequest {
        UpstreamRequest {
            model: "echo".into(),
            messages: vec![Message {
                role: "user".into(),
                content: content.into(),
                name: None,
            }],
            options: ChatOptions {
                max_tokens,
                ..Default::default()
            },
            user: String::new(),
        }
    }

    #[tokio::test]
    async fn echoes_deterministically() {
        let c = EchoUpstream
            .complete(&req("hello there", None))
            .expect("ok");
        assert_eq!(c.content, "echo: hello there");
        assert_eq!(c.finish_reason, "stop");
        let usage = c.usage.expect("usage");
        assert_eq!(
            usage.completion_tokens,
            tokens::count_text("echo: hello there")
        );
        let c = EchoUpstream
            .complete(&req("hello there friend", Some(2)))
            .expect("ok");
        assert_eq!(c.finish_reason, "length");
        assert_eq!(c.usage.map(|u| u.completion_tokens), Some(2));
        let s = EchoUpstream.stream(&req("a b c", None)).expect("stream");
        let chunks: Vec<_> = s.collect().await;
        let text: String = chunks
            .iter()
            .filter_map(|c| c.as_ref().ok().and_then(|c| c.delta.clone()))
            .collect();
        assert_eq!(text, "echo: a b c");
        assert!(EchoUpstream.complete(&req("[echo:fail] x", None)).is_err());
    }
}
