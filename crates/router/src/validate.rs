//! Request validation: everything is checked before any money moves.

use syft_error::MAX_USAGE_NAME;
use syft_proto::router::{ChatOptions, ChatRequest, Message, SearchRequest};

use crate::config::{Limits, SearchConfig};
use crate::error::RouterError;
use crate::search::SearchQuery;

/// Roles a chat message may have.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// At most this many stop sequences (as OpenAI).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// The most messages a request may carry (`limits.max_messages` may not be set higher): the HTTP
/// front stops reading a list past it (`openai_wire.rs`), the gRPC codec refuses a message of
/// more entries than this before decoding it (`crates/proto/src/codec.rs`).
pub const MAX_MESSAGES: usize = syft_proto::codec::MAX_LIST_ENTRIES;

/// Longest accepted client request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A pragmatic email check: one `@`, a non-empty local part, a dotted domain, no spaces or
/// control characters, at most 254 bytes. No 64-byte bound on the local part: the ledger, which
/// decides who exists, opens such accounts (as the accounting SDK's validator allows), and
/// every paid request of one was refused here.
pub fn is_valid_email(email: &str) -> bool {
    if email.len() > 254 || email.is_empty() {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || c == '@';
    !local.is_empty()
        && !domain.is_empty()
        && !local.chars().any(bad_char)
        && !domain.chars().any(bad_char)
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

/// A request that passed validation; `request_id` is filled in.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request_id: String,
    pub user_email: String,
    pub model: String,
    pub messages: Vec<Message>,
    /// The client's options, checked against the limits; forwarded to the upstream as they are
    /// (but for a defaulted `max_tokens`) and part of the replay fingerprint.
    pub options: ChatOptions,
    pub transaction_token: String,
    pub prompt_bytes: usize,
}

fn bad(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

/// Validates a chat request against the limits. `model` is resolved by the caller.
pub fn validate_chat(mut req: ChatRequest, limits: &Limits) -> Result<ValidRequest, RouterError> {
    if req.messages.is_empty() {
        return Err(bad("messages must not be empty"));
    }
    if req.messages.len() > limits.max_messages {
        return Err(bad(format!(
            "too many messages: {} (limit {})",
            req.messages.len(),
            limits.max_messages
        )));
    }
    let mut prompt_bytes = 0usize;
    for (i, m) in req.messages.iter_mut().enumerate() {
        // OpenAI's newer name for system instructions (its SDKs send it for reasoning models),
        // sent on as `system`, which every OpenAI-compatible upstream knows.
        if m.role == "developer" {
            m.role = "system".into();
        }
        if !ROLES.contains(&m.role.as_str()) {
            return Err(bad(format!(
                "messages[{i}].role {:?} is not one of {}, developer",
                truncate(&m.role, 32),
                ROLES.join(", ")
            )));
        }
        prompt_bytes = prompt_bytes
            .saturating_add(m.content.len())
            .saturating_add(m.role.len())
            .saturating_add(m.name.as_ref().map_or(0, String::len));
    }
    if prompt_bytes > limits.max_prompt_bytes {
        return Err(bad(format!(
            "prompt is too large: {prompt_bytes} bytes (limit {} bytes)",
            limits.max_prompt_bytes
        )));
    }
    let options = req.options.unwrap_or_default();
    let ChatOptions {
        max_tokens,
        temperature,
        top_p,
        ref stop_sequences,
        ref reasoning_effort,
    } = options;
    if let Some(mt) = max_tokens {
        if mt == 0 || mt > limits.max_tokens_limit {
            return Err(bad(format!(
                "max_tokens must be in 1..={} (got {mt})",
                limits.max_tokens_limit
            )));
        }
    }
    if let Some(t) = temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(bad(format!("temperature must be in 0..=2 (got {t})")));
        }
    }
    if let Some(p) = top_p {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad(format!("top_p must be in 0..=1 (got {p})")));
        }
    }
    if stop_sequences.len() > MAX_STOP_SEQUENCES {
        return Err(bad(format!(
            "at most {MAX_STOP_SEQUENCES} stop sequences are allowed"
        )));
    }
    if stop_sequences.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(bad("stop sequences must be 1..=256 bytes long"));
    }
    // A word, not a list: OpenAI adds levels now and then, and the upstream refuses one it does
    // not know (a voided request), so any short lowercase word is passed on.
    if let Some(effort) = reasoning_effort {
        if !(1..=16).contains(&effort.len()) || !effort.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(bad(format!(
                "reasoning_effort must be 1 to 16 lowercase letters, like \"low\" (got {effort:?})"
            )));
        }
    }
    let model = req.model.trim();
    // The model is stored in the request's usage row, whose limits the ledger enforces at the
    // capture or void; refused there, the hold would stay pending until it expires.
    if model.len() > MAX_USAGE_NAME || model.chars().any(char::is_control) {
        return Err(bad(format!(
            "model must be at most {MAX_USAGE_NAME} bytes without control characters"
        )));
    }
    let user_email = payer_email(&req.user_email)?;
    let request_id = request_id_or_new(req.request_id)?;
    Ok(ValidRequest {
        request_id,
        user_email,
        model: model.to_string(),
        messages: req.messages,
        options,
        transaction_token: req.transaction_token.trim().to_string(),
        prompt_bytes,
    })
}

/// Why a token cannot be one the ledger issued: longer than it accepts, or with control
/// characters (the ledger's rule for the token, `validate::text`).
pub(crate) fn malformed_token(token: &str) -> Option<String> {
    if token.len() > syft_proto::MAX_TRANSACTION_TOKEN_BYTES {
        return Some(format!(
            "{} bytes, at most {}",
            token.len(),
            syft_proto::MAX_TRANSACTION_TOKEN_BYTES
        ));
    }
    if token.chars().any(|c| c.is_control() && c != '\t') {
        return Some("control characters".into());
    }
    None
}

/// The payer's email, trimmed and lowercased as the ledger keeps it; empty (a free request) or
/// valid. Lowercased here so that one user is one user everywhere: the rate windows and request
/// ids are keyed by it, and `Alice@…` and `alice@…` were two users' windows (a way around the
/// limits) while the ledger charged the same account.
fn payer_email(email: &str) -> Result<String, RouterError> {
    let user_email = email.trim().to_ascii_lowercase();
    if !user_email.is_empty() && !is_valid_email(&user_email) {
        return Err(bad(format!(
            "the payer's email (`user` in the OpenAI API, `user_email` over gRPC) {:?} is not a valid email",
            truncate(&user_email, 64)
        )));
    }
    Ok(user_email)
}

/// Whether `id` can be a request id: 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters.
pub(crate) fn is_usable_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// What the protocol adapters do first: a request without an id gets one here rather than in
/// validation, so that a refusal can name it (`x-syft-request-id`) as an answer does, and the
/// owner find its usage row. Returns the id to name: none when the client's own is unusable
/// (its refusal is recorded under a fresh `refused-` id, `service/refusal.rs`).
pub(crate) fn assign_request_id(id: &mut String) -> Option<String> {
    if id.is_empty() {
        *id = uuid::Uuid::now_v7().to_string();
    }
    is_usable_request_id(id).then(|| id.clone())
}

/// The client's request id, checked, or a new one.
fn request_id_or_new(id: String) -> Result<String, RouterError> {
    if id.is_empty() {
        return Ok(uuid::Uuid::now_v7().to_string());
    }
    if !is_usable_request_id(&id) {
        return Err(bad(format!(
            "request_id must be 1..={MAX_REQUEST_ID_LEN} visible ASCII characters"
        )));
    }
    Ok(id)
}

/// A search request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidSearch {
    pub request_id: String,
    pub user_email: String,
    pub transaction_token: String,
    pub query: SearchQuery,
    /// The `limit` as the request sent it (`None`: the router's `default_limit`, which
    /// `query.limit` holds): what a retry is compared on, so that a changed default does not
    /// make a charged search's retry "another request".
    pub limit_asked: Option<u32>,
}

/// Validates a search request against the search service's bounds: a non-empty query of at
/// most `max_query_bytes`, `limit` in 1..=`max_limit`, `similarity_threshold` in 0..=1.
pub fn validate_search(req: SearchRequest, c: &SearchConfig) -> Result<ValidSearch, RouterError> {
    let query = req.query.trim().to_string();
    if query.is_empty() {
        return Err(bad("query must not be empty"));
    }
    if query.len() > c.max_query_bytes {
        return Err(bad(format!(
            "query is too long: {} bytes (limit {} bytes)",
            query.len(),
            c.max_query_bytes
        )));
    }
    let opts = req.options.unwrap_or_default();
    let limit = opts.limit.unwrap_or(c.default_limit);
    if limit == 0 || limit > c.max_limit {
        return Err(bad(format!(
            "limit must be in 1..={} (got {limit})",
            c.max_limit
        )));
    }
    let threshold = opts.similarity_threshold.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(bad(format!(
            "similarity_threshold must be in 0..=1 (got {threshold})"
        )));
    }
    let user_email = payer_email(&req.user_email)?;
    Ok(ValidSearch {
        request_id: request_id_or_new(req.request_id)?,
        query: SearchQuery {
            query,
            limit,
            similarity_threshold: threshold,
            include_metadata: opts.include_metadata.unwrap_or(true),
            user_email: user_email.clone(),
        },
        user_email,
        transaction_token: req.transaction_token.trim().to_string(),
        limit_asked: opts.limit,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            name: None,
        }
    }

    fn req() -> ChatRequest {
        ChatRequest {
            user_email: "alice@example.com".into(),
            model: "m".into(),
            messages: vec![msg("user", "hi")],
            options: None,
            transaction_token: String::new(),
            request_id: String::new(),
        }
    }

    fn check(f: impl FnOnce(&mut ChatRequest)) -> Result<ValidRequest, RouterError> {
        let mut r = req();
        f(&mut r);
        validate_chat(r, &Limits::default())
    }

    fn opts(f: impl FnOnce(&mut ChatOptions)) -> impl FnOnce(&mut ChatRequest) {
        move |r| {
            let mut o = ChatOptions::default();
            f(&mut o);
            r.options = Some(o);
        }
    }

    #[test]
    fn emails() {
        assert!(is_valid_email("a@b.co"));
        assert!(is_valid_email("first.last+tag@sub.example.org"));
        // A local part past 64 bytes: the ledger opens such accounts, so their payers pay here.
        assert!(is_valid_email(&format!("{}@example.com", "l".repeat(65))));
        assert!(!is_valid_email(&format!("{}@example.com", "l".repeat(243))));
        for bad in [
            "", "a", "a@", "@b.c", "a@b", "a b@c.d", "a@b..c", "a@.b.c", "a@b@c.d",
        ] {
            assert!(!is_valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn accepts_good_and_generates_id() {
        let v = check(|_| {}).expect("valid");
        assert!(!v.request_id.is_empty());
        assert_eq!(v.prompt_bytes, 6);
        let v = check(|r| r.request_id = "my-id-1".into()).expect("valid");
        assert_eq!(v.request_id, "my-id-1");
        assert!(check(|r| r.user_email.clear()).is_ok());
        let longest = "m".repeat(MAX_USAGE_NAME);
        assert_eq!(
            check(|r| r.model = longest.clone()).expect("valid").model,
            longest
        );
    }

    type Mutation = Box<dyn FnOnce(&mut ChatRequest)>;

    #[test]
    fn rejects_bad_input() {
        let cases: Vec<Mutation> = vec![
            Box::new(|r| r.messages.clear()),
            Box::new(|r| r.messages.push(msg("tool", "x"))),
            Box::new(|r| r.user_email = "not-an-email".into()),
            Box::new(|r| r.request_id = "has space".into()),
            Box::new(|r| r.request_id = "x".repeat(200)),
            // The usage row's model limits (the ledger's), checked before the hold.
            Box::new(|r| r.model = "m".repeat(MAX_USAGE_NAME + 1)),
            Box::new(|r| r.model = "gpt\n4".into()),
            Box::new(opts(|o| o.temperature = Some(3.0))),
            Box::new(opts(|o| o.temperature = Some(f32::NAN))),
            Box::new(opts(|o| o.temperature = Some(-0.1))),
            Box::new(opts(|o| o.top_p = Some(1.5))),
            Box::new(opts(|o| o.max_tokens = Some(0))),
            Box::new(opts(|o| o.max_tokens = Some(1_000_000_000))),
            Box::new(opts(|o| o.stop_sequences = vec!["a".into(); 5])),
            Box::new(opts(|o| o.reasoning_effort = Some(String::new()))),
            Box::new(opts(|o| o.reasoning_effort = Some("high\n".into()))),
            Box::new(opts(|o| o.reasoning_effort = Some("é".into()))),
            Box::new(|r| r.messages = vec![msg("user", &"x".repeat(5 * 1024 * 1024))]),
        ];
        for (i, f) in cases.into_iter().enumerate() {
            match check(f) {
                Err(RouterError::InvalidArgument(_)) => {}
                other => panic!("case {i}: expected InvalidArgument, got {other:?}"),
            }
        }
    }
}
