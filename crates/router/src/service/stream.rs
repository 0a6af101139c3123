//! The streamed chat: the hold is taken before the first event; deltas are forwarded as they
//! arrive, and the capture (or void) happens when the upstream stream ends, before the final
//! event is sent.

use std::time::Instant;

use futures::StreamExt;
use syft_error::UsageStatus;
use syft_proto::router::{
    chat_stream_event, ChatFinal, ChatRequest, ChatStreamEvent, ContentDelta, ProviderInfo,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::hold::HoldGuard;
use super::{elapsed_ms, normalize_finish, token_usage, Prepared, RouterService, Units};
use crate::error::RouterError;
use crate::metrics;
use crate::tokens;
use crate::upstream::{UpstreamError, UpstreamStream, UpstreamUsage};

/// A started stream: ids known up front, then the events (deltas, then one final event, or an
/// error).
pub struct ChatStreamHandle {
    pub request_id: String,
    /// Set for paid requests (the hold is already authorized).
    pub transfer_id: Option<String>,
    pub model: String,
    /// The rate-limit headers of the answer.
    pub rate_limits: crate::limits::RateHeaders,
    pub events: ReceiverStream<Result<ChatStreamEvent, RouterError>>,
}

impl RouterService {
    /// A streamed chat. Errors before the stream starts (validation, payment, the upstream not
    /// answering) are returned here; later ones arrive as the stream's last item.
    pub async fn chat_stream(&self, req: ChatRequest) -> Result<ChatStreamHandle, RouterError> {
        let span = self.span(&req, true);
        self.stream(req).instrument(span).await
    }

    async fn stream(&self, req: ChatRequest) -> Result<ChatStreamHandle, RouterError> {
        let started = Instant::now();
        let (p, claim, hold) = self.admit(req).await?;
        let up_start = Instant::now();
        let upstream = match self
            .until_shutdown(self.inner.upstream.stream(&p.upstream_req))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.fail(&p, hold, &e, started, elapsed_ms(up_start)).await;
                return Err(e.into());
            }
        };
        let (tx, rx) = mpsc::channel(32);
        let handle = ChatStreamHandle {
            request_id: p.v.request_id.clone(),
            transfer_id: hold.as_ref().map(|h| h.transfer_id.clone()),
            model: p.t.model.clone(),
            rate_limits: Self::rate_headers(&p.t),
            events: ReceiverStream::new(rx),
        };
        let svc = self.clone();
        tokio::spawn(
            async move {
                let _claim = claim;
                svc.drive_stream(p, hold, upstream, tx, started, up_start)
                    .await;
            }
            .instrument(tracing::Span::current()),
        );
        Ok(handle)
    }

    async fn drive_stream(
        &self,
        p: Prepared,
        hold: Option<HoldGuard>,
        mut upstream: UpstreamStream,
        tx: mpsc::Sender<Result<ChatStreamEvent, RouterError>>,
        started: Instant,
        up_start: Instant,
    ) {
        enum End {
            Done,
            Cancelled,
            Failed(UpstreamError),
        }
        let mut content = String::new();
        let mut finish: Option<String> = None;
        let mut reported: Option<UpstreamUsage> = None;
        let mut upstream_id = String::new();
        let mut upstream_model = String::new();
        let end = loop {
            let next = tokio::select! {
                _ = tx.closed() => break End::Cancelled,
                _ = self.inner.drain.aborted() => break End::Failed(UpstreamError::ShuttingDown),
                next = upstream.next() => next,
            };
            let chunk = match next {
                None => break End::Done,
                Some(Err(e)) => break End::Failed(e),
                Some(Ok(chunk)) => chunk,
            };
            if let Some(id) = chunk.id {
                upstream_id = id;
            }
            if let Some(m) = chunk.model {
                upstream_model = m;
            }
            if chunk.finish_reason.is_some() {
                finish = chunk.finish_reason;
            }
            if chunk.usage.is_some() {
                reported = chunk.usage;
            }
            if let Some(delta) = chunk.delta {
                content.push_str(&delta);
                let event = ChatStreamEvent {
                    event: Some(chat_stream_event::Event::Delta(ContentDelta {
                        content: delta,
                    })),
                };
                if tx.send(Ok(event)).await.is_err() {
                    break End::Cancelled;
                }
            }
        };
        drop(upstream);
        let upstream_time = up_start.elapsed();
        let upstream_ms = elapsed_ms(up_start);
        let end = match end {
            End::Done if content.trim().is_empty() => End::Failed(UpstreamError::Empty),
            other => other,
        };
        match end {
            End::Cancelled => {
                tracing::info!(request_id = %p.v.request_id, "client cancelled the stream");
                let units = Units {
                    input: self.prompt_tokens(&p).await,
                    output: tokens::count_text(&content),
                };
                let usage = self.usage(&p.t, UsageStatus::Cancelled, units, started, upstream_ms);
                self.release(hold, "client cancelled", usage).await;
                metrics::observe(
                    self.provider(),
                    "stream",
                    "cancelled",
                    started,
                    upstream_time,
                );
            }
            End::Failed(e) => {
                self.fail(&p, hold, &e, started, upstream_ms).await;
                metrics::observe(
                    self.provider(),
                    "stream",
                    e.usage_status().as_str(),
                    started,
                    upstream_time,
                );
                let _ = tx.send(Err(e.into())).await;
            }
            End::Done => {
                let (prompt_tokens, completion_tokens) =
                    self.final_tokens(&p, reported, &content).await;
                Self::settle_pass(&p.t, prompt_tokens.saturating_add(completion_tokens)).await;
                let cost = self.cost(&p, prompt_tokens, completion_tokens);
                let units = Units {
                    input: prompt_tokens,
                    output: completion_tokens,
                };
                let usage = self.usage(&p.t, UsageStatus::Success, units, started, upstream_ms);
                let upstream_finish = finish.unwrap_or_else(|| "stop".into());
                let item = match self.settle(&p.t, hold, cost, usage).await {
                    Ok(transfer_id) => Ok(ChatStreamEvent {
                        event: Some(chat_stream_event::Event::Final(ChatFinal {
                            id: p.v.request_id.clone(),
                            model: p.t.model.clone(),
                            finish_reason: normalize_finish(&upstream_finish),
                            usage: Some(token_usage(prompt_tokens, completion_tokens)),
                            cost_micros: cost,
                            transfer_id,
                            provider_info: Some(ProviderInfo {
                                provider: self.provider().into(),
                                upstream_model: if upstream_model.is_empty() {
                                    p.upstream_req.model.clone()
                                } else {
                                    upstream_model
                                },
                                upstream_finish_reason: upstream_finish,
                                upstream_id,
                            }),
                            currency: p.t.pricing.currency.clone(),
                        })),
                    }),
                    Err(e) => Err(e),
                };
                let outcome = if item.is_ok() {
                    "success"
                } else {
                    "not_settled"
                };
                metrics::observe(self.provider(), "stream", outcome, started, upstream_time);
                let _ = tx.send(item).await;
            }
        }
    }
}
