//! Idempotent replay of paid answers (docs/router.md "Replay of paid answers").
//!
//! A paid answer is stored by the ledger with its capture (`CaptureRequest.answer`), encoded as a
//! `ReplayRecord`: the response as sent, and a fingerprint of the request. A retry with the same
//! request id finds its transfer COMPLETED at Authorize; the router then fetches the stored answer
//! and, if the retry is the same request, returns it marked `replay`: no upstream call, no charge.

use prost::Message as _;
use sha2::{Digest, Sha256};
use syft_proto::ledger::{AnswerToStore, Transfer};
use syft_proto::router::{
    chat_stream_event, ChatFinal, ChatRequest, ChatResponse, ChatStreamEvent, ContentDelta,
    Message, ProviderInfo, ReplayRecord, SearchOptions, SearchRequest, SearchResponse,
};

use super::admission::already_processed;
use super::{normalize_finish, token_usage, Prepared, RouterService};
use crate::error::RouterError;
use crate::upstream::Completion;
use crate::validate::{ValidRequest, ValidSearch};

/// What identifies "the same request": everything that shapes the answer and its price, not the
/// token (a retry may carry a fresh one) nor the request id (the key itself).
pub(super) fn fingerprint(v: &ValidRequest, model: &str) -> String {
    let canonical = ChatRequest {
        user_email: v.user_email.clone(),
        model: model.to_string(),
        messages: v.messages.clone(),
        options: Some(v.options.clone()),
        transaction_token: String::new(),
        request_id: String::new(),
    };
    // prost encodes fields in tag order, so equal requests have equal bytes.
    hex::encode(Sha256::digest(canonical.encode_to_vec()))
}

impl RouterService {
    /// The response to a request answered by the upstream with `c` (unary, or a stream's
    /// assembled text): what the client gets and what is stored for replay.
    pub(super) fn response(
        &self,
        p: &Prepared,
        c: Completion,
        (prompt_tokens, completion_tokens): (u64, u64),
        cost: i64,
        transfer_id: Option<String>,
    ) -> ChatResponse {
        ChatResponse {
            id: p.v.request_id.clone(),
            model: p.t.model.clone(),
            message: Some(Message {
                role: "assistant".into(),
                content: c.content,
                name: None,
            }),
            finish_reason: normalize_finish(&c.finish_reason),
            usage: Some(token_usage(prompt_tokens, completion_tokens)),
            cost_micros: cost,
            transfer_id: transfer_id.unwrap_or_default(),
            provider_info: Some(ProviderInfo {
                provider: self.provider().into(),
                upstream_model: if c.model.is_empty() {
                    p.upstream_req.model.clone()
                } else {
                    c.model
                },
                upstream_finish_reason: c.finish_reason,
                upstream_id: c.id,
            }),
            currency: p.t.pricing.currency.clone(),
            replay: false,
        }
    }

    /// The answer to store with the capture, unless storage is off or the answer is too large.
    pub(super) fn answer_to_store(
        &self,
        request_id: &str,
        record: ReplayRecord,
    ) -> Option<AnswerToStore> {
        let settings = &self.inner.config.replay;
        if !settings.enabled() {
            return None;
        }
        // Sized before it is encoded: a search answer may be 4 MiB, most of which is not kept.
        let bytes = record.encoded_len();
        if bytes > settings.max_bytes {
            tracing::info!(request_id = %request_id, bytes, max = settings.max_bytes,
                "answer above --answer-max-bytes; not kept for replay");
            return None;
        }
        Some(AnswerToStore {
            body: record.encode_to_vec(),
            retention_seconds: i64::try_from(settings.retention.as_secs().max(1))
                .unwrap_or(i64::MAX),
        })
    }

    /// A retry of a request whose transfer is already resolved: the stored answer when the
    /// transfer was captured, an answer is stored, and the retry is the same request; otherwise
    /// `ALREADY_EXISTS` (409), saying whether the user was charged.
    pub(super) async fn replay(
        &self,
        p: &Prepared,
        transfer: &Transfer,
    ) -> Result<ChatResponse, RouterError> {
        let fingerprint = fingerprint(&p.v, &p.t.model);
        let record = self
            .stored_record(&p.v.request_id, transfer, &[fingerprint])
            .await?;
        let refused = |detail: &str| already_processed(&p.v.request_id, transfer, detail);
        let mut response = record
            .response
            .ok_or_else(|| refused(", and its stored answer is empty"))?;
        response.replay = true;
        tracing::info!(request_id = %p.v.request_id, transfer_id = %transfer.id, "replayed a paid answer");
        Ok(response)
    }

    /// [`RouterService::replay`] of a search.
    pub(super) async fn replay_search(
        &self,
        v: &ValidSearch,
        transfer: &Transfer,
    ) -> Result<SearchResponse, RouterError> {
        // Also as it was stored before 2026-12-07, with the limit the router resolved.
        let fingerprints = [
            search_fingerprint(v, v.limit_asked),
            search_fingerprint(v, Some(v.query.limit)),
        ];
        let record = self
            .stored_record(&v.request_id, transfer, &fingerprints)
            .await?;
        let refused = |detail: &str| already_processed(&v.request_id, transfer, detail);
        let mut response = record
            .search_response
            .ok_or_else(|| refused(", and its stored answer is empty"))?;
        response.replay = true;
        tracing::info!(request_id = %v.request_id, transfer_id = %transfer.id, "replayed a paid search");
        Ok(response)
    }

    /// The stored record of a captured transfer, if the retry is the request it answers (its
    /// fingerprint one of `fingerprints`); else the refusal saying why not, and whether the user
    /// was charged.
    async fn stored_record(
        &self,
        request_id: &str,
        transfer: &Transfer,
        fingerprints: &[String],
    ) -> Result<ReplayRecord, RouterError> {
        use syft_proto::ledger::TransferStatus;
        let refused = |detail: &str| already_processed(request_id, transfer, detail);
        if transfer.status() != TransferStatus::Completed || !self.inner.config.replay.enabled() {
            return Err(refused(""));
        }
        // The ledger scopes a request id to the owner and the payer, not to the service: another
        // router of this owner (another corpus, backend or price) answered it, and its answer is
        // not this service's, whatever the fingerprint says.
        if transfer.app_name != self.inner.config.name {
            return Err(refused(&format!(
                " by another service of this owner ({:?})",
                transfer.app_name
            )));
        }
        let Some(body) = self.inner.ledger.answer(&transfer.id).await? else {
            return Err(refused(
                ", and its answer is not kept (past retention, not stored, or above the size kept)",
            ));
        };
        let record = ReplayRecord::decode(body.as_slice()).map_err(|e| {
            tracing::error!(transfer_id = %transfer.id, error = %e, "stored answer unreadable");
            refused(", and its stored answer is unreadable")
        })?;
        if !fingerprints.contains(&record.request_fingerprint) {
            return Err(refused(
                " for a different request (same request id, other content)",
            ));
        }
        Ok(record)
    }
}

/// What a chat answer is stored as, for [`RouterService::answer_to_store`].
pub(super) fn chat_record(p: &Prepared, response: &ChatResponse) -> ReplayRecord {
    ReplayRecord {
        request_fingerprint: fingerprint(&p.v, &p.t.model),
        response: Some(response.clone()),
        ..ReplayRecord::default()
    }
}

/// What a paid search's results are stored as (a retry gets them again, marked `replay`).
pub(super) fn search_record(v: &ValidSearch, response: &SearchResponse) -> ReplayRecord {
    ReplayRecord {
        request_fingerprint: search_fingerprint(v, v.limit_asked),
        search_response: Some(response.clone()),
        ..ReplayRecord::default()
    }
}

/// [`fingerprint`] of a search: the payer, the query and its options, with `limit` (as asked;
/// records stored before 2026-12-07 hold the limit the router resolved, which made a retry of a
/// search without one "another request" once `default_limit` changed).
fn search_fingerprint(v: &ValidSearch, limit: Option<u32>) -> String {
    let q = &v.query;
    let canonical = SearchRequest {
        user_email: v.user_email.clone(),
        query: q.query.clone(),
        options: Some(SearchOptions {
            limit,
            similarity_threshold: Some(q.similarity_threshold),
            include_metadata: Some(q.include_metadata),
        }),
        transaction_token: String::new(),
        request_id: String::new(),
    };
    // Prefixed so a search and a chat can never share a fingerprint.
    format!(
        "search:{}",
        hex::encode(Sha256::digest(canonical.encode_to_vec()))
    )
}

/// A response as stream events: its text as one delta, and the final event.
pub(super) fn final_event(r: ChatResponse) -> (ChatStreamEvent, ChatStreamEvent) {
    let content = r.message.map(|m| m.content).unwrap_or_default();
    let delta = ChatStreamEvent {
        event: Some(chat_stream_event::Event::Delta(ContentDelta { content })),
    };
    let last = ChatFinal {
        id: r.id,
        model: r.model,
        finish_reason: r.finish_reason,
        usage: r.usage,
        cost_micros: r.cost_micros,
        transfer_id: r.transfer_id,
        provider_info: r.provider_info,
        currency: r.currency,
        replay: r.replay,
    };
    let last = ChatStreamEvent {
        event: Some(chat_stream_event::Event::Final(last)),
    };
    (delta, last)
}
