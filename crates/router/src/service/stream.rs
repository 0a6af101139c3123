//! The streamed chat: the hold is taken before the first event; deltas are forwarded as they
//! arrive, and the capture (or void) happens once the upstream stream ended and the client has
//! taken every delta, before the final event is sent.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use syft_error::UsageStatus;
use syft_proto::ledger::Usage;
use syft_proto::router::{
    chat_stream_event, ChatRequest, ChatResponse, ChatStreamEvent, ContentDelta,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::hold::HoldGuard;
use super::replay::{chat_record, final_event};
use super::{elapsed_ms, Admission, Prepared, RouterService, Units};
use crate::config::LeftStreams;
use crate::error::RouterError;
use crate::metrics;
use crate::tokens;
use crate::upstream::{Completion, UpstreamError, UpstreamStream, UpstreamUsage};

/// A started stream: ids known up front, then the events (deltas, then one final event, or an
/// error).
pub struct ChatStreamHandle {
    pub request_id: String,
    /// Set for paid requests (the hold is already authorized).
    pub transfer_id: Option<String>,
    pub model: String,
    /// The stored answer of an earlier, already charged attempt (no upstream call, no charge).
    pub replay: bool,
    /// The rate-limit headers of the answer.
    pub rate_limits: crate::limits::RateHeaders,
    pub events: Events,
}

/// A stream's events as the front takes them, counting the answer's bytes it took (handed to
/// the connection): what a client that left was sent (`left_streams = "charge_delivered"`),
/// without the deltas still queued for it.
pub struct Events {
    rx: ReceiverStream<Result<ChatStreamEvent, RouterError>>,
    taken: Arc<AtomicUsize>,
}

impl Stream for Events {
    type Item = Result<ChatStreamEvent, RouterError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.rx).poll_next(cx);
        if let Poll::Ready(Some(Ok(ChatStreamEvent {
            event: Some(chat_stream_event::Event::Delta(d)),
        }))) = &polled
        {
            // Read by the driver after the client's side closed, which the channel orders.
            self.taken.fetch_add(d.content.len(), Ordering::Release);
        }
        polled
    }
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
        let (p, claim, mut hold) = match self.admit(req).await? {
            Admission::Run(p, claim, hold) => (p, claim, hold),
            Admission::Replay(r, headers) => {
                self.observe_replay("stream", started);
                return Ok(replayed(*r, headers));
            }
        };
        // From here the upstream has the prompt: a client that leaves before the stream opened
        // keeps it in its token windows, as a unary chat's does (a failure sets it back to 0).
        if let (Some(pass), Some(prompt)) = (&p.t.pass, p.prompt_tokens) {
            pass.keep_if_dropped(prompt);
        }
        let up_start = Instant::now();
        // The upstream may take long to start answering (up to its request timeout): the hold is
        // extended meanwhile, as for a unary answer, so the stream starts with its life ahead.
        let waiting = metrics::UpstreamWait::start(self.provider());
        let opened = self.until_shutdown(self.inner.upstream.stream(&p.upstream_req));
        let opened = super::hold::keeping_alive(&mut hold, opened).await;
        drop(waiting);
        let upstream = match opened {
            Ok(s) => s,
            Err(e) => {
                // A stream refused before it opened (an upstream's 429 comes here) is counted as
                // a failed call, as a unary one is.
                metrics::observe_failure(
                    self.provider(),
                    "stream",
                    &e,
                    started,
                    up_start.elapsed(),
                );
                self.fail(&p, hold, &e, started, elapsed_ms(up_start)).await;
                let mut claim = claim;
                claim.recorded();
                return Err(e.into());
            }
        };
        let (tx, rx) = mpsc::channel(32);
        let taken = Arc::new(AtomicUsize::new(0));
        let handle = ChatStreamHandle {
            request_id: p.v.request_id.clone(),
            transfer_id: hold.as_ref().map(|h| h.transfer_id.clone()),
            model: p.t.model.clone(),
            replay: false,
            rate_limits: Self::rate_headers(&p.t),
            events: Events {
                rx: ReceiverStream::new(rx),
                taken: taken.clone(),
            },
        };
        let svc = self.clone();
        tokio::spawn(
            async move {
                let mut claim = claim;
                // Every way the stream ends records its row (or resolves its hold).
                let sent = (tx, taken);
                svc.drive_stream(p, hold, upstream, sent, started, up_start)
                    .await;
                claim.recorded();
            }
            .instrument(tracing::Span::current()),
        );
        Ok(handle)
    }

    async fn drive_stream(
        &self,
        p: Prepared,
        mut hold: Option<HoldGuard>,
        mut upstream: UpstreamStream,
        (tx, taken): (
            mpsc::Sender<Result<ChatStreamEvent, RouterError>>,
            Arc<AtomicUsize>,
        ),
        started: Instant,
        up_start: Instant,
    ) {
        enum End {
            Done,
            /// Ended by the router: the stream reached `--max-stream-duration`, or its hold could
            /// not be extended and is about to expire. What was delivered is charged.
            Cut,
            Cancelled,
            Failed(UpstreamError),
        }
        // A slot kept from the start for the last event (the final one, or the error): it is
        // queued whatever the client does, so a stream never ends without it and this task never
        // waits to send it. (It used to wait up to 10 s for a reader that had fallen behind, and a
        // shutdown dropped the error of such a stream, which then ended as if complete.) `None`:
        // the client is already gone, which the loop sees at once.
        let last = tx.clone().try_reserve_owned().ok();
        let max_end = tokio::time::Instant::now() + self.inner.config.max_stream_duration;
        let mut keep_alive = hold.as_ref().map(|h| {
            let every = h.keep_alive_every();
            tokio::time::interval_at(tokio::time::Instant::now() + every, every)
        });
        let mut content = String::new();
        let mut ttft_ms: Option<i64> = None;
        let mut finish: Option<String> = None;
        let mut reported: Option<UpstreamUsage> = None;
        let mut upstream_id = String::new();
        let mut upstream_model = String::new();
        // A delta the client has no room for yet. While one waits, the upstream is not read (its
        // backpressure reaches the upstream) and the branches above it keep running: a client
        // that stops reading used to block this task in `send`, where its hold was no longer
        // extended and no bound applied, so the hold expired and the text it then read was free.
        let mut pending: Option<String> = None;
        let end = loop {
            let cut_at = hold
                .as_ref()
                .map_or(max_end, |h| h.capture_by().min(max_end));
            let next = tokio::select! {
                _ = tx.closed() => break End::Cancelled,
                _ = self.inner.drain.aborted() => break End::Failed(UpstreamError::ShuttingDown),
                _ = tokio::time::sleep_until(cut_at) => break End::Cut,
                _ = tick(&mut keep_alive) => {
                    extend(&mut hold, &mut keep_alive).await;
                    continue;
                }
                permit = tx.reserve(), if pending.is_some() => {
                    let Ok(permit) = permit else { break End::Cancelled };
                    if let Some(delta) = pending.take() {
                        content.push_str(&delta);
                        permit.send(Ok(delta_event(delta)));
                    }
                    continue;
                }
                next = upstream.next(), if pending.is_none() => next,
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
                // Time to first token: from the request's start to the first content delta.
                if ttft_ms.is_none() && !delta.is_empty() {
                    ttft_ms = Some(elapsed_ms(started));
                }
                // Only text handed to the client's queue is delivered, and so charged.
                match tx.try_reserve() {
                    Ok(permit) => {
                        content.push_str(&delta);
                        permit.send(Ok(delta_event(delta)));
                    }
                    Err(mpsc::error::TrySendError::Full(())) => pending = Some(delta),
                    // Not delivered: kept as the delta the client never got, so a client that
                    // left as it arrived is not taken for one that had the whole answer.
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        if !delta.is_empty() {
                            pending = Some(delta);
                        }
                        break End::Cancelled;
                    }
                }
            }
        };
        // A paid stream's client that left holding every delta may have left at the very end:
        // after the last delta, before the upstream's finish and the final event that follows
        // the capture. Voided, that was a whole answer free (a client that knows where its
        // answer ends, a marker it asked for or its own `max_tokens`, could do it every time).
        // The upstream is read on for a moment: if it ends without another word, the client
        // had the whole answer, which is charged and kept for the id's retry; more text means
        // the client left mid-way (voided, or charged for what it took, as the owner chose).
        let left_at_the_end = matches!(end, End::Cancelled)
            && hold.is_some()
            && pending.is_none()
            && !content.trim().is_empty()
            && taken.load(Ordering::Acquire) == content.len()
            && {
                // Within the hold's life too: the capture must still find it.
                let capture_by = hold
                    .as_ref()
                    .map_or(max_end, |h| h.capture_by().min(max_end));
                let until = (tokio::time::Instant::now() + LEFT_AT_THE_END).min(capture_by);
                let rest = read_to_the_end(&mut upstream, finish.clone(), until).await;
                let ended = rest.is_some();
                if let Some(rest) = rest {
                    finish = rest.finish.or(finish);
                    reported = rest.usage.or(reported);
                }
                ended
            };
        let end = if left_at_the_end { End::Done } else { end };
        drop(upstream);
        let undelivered = pending.is_some();
        if undelivered {
            // A delta the client never got is neither in `content` nor charged: the upstream's
            // count would include it, so the router counts what was delivered instead.
            reported = None;
        }
        // The upstream's share ends here, whatever the client's reading takes next.
        let upstream_time = up_start.elapsed();
        let upstream_ms = elapsed_ms(up_start);
        // An answer the router cut is settled at once (its hold is about to expire, or its time
        // is up); one the upstream finished waits for its reader first (below).
        let cut = matches!(end, End::Cut);
        let end = match end {
            End::Done | End::Cut if content.trim().is_empty() => End::Failed(UpstreamError::Empty),
            // The upstream said the answer was finished, and the client has all of it: a fault
            // after that (a reset before `[DONE]`, silence, a bad trailing event, shutdown) does
            // not undo a delivered answer, which is charged as if the stream had ended there.
            End::Failed(e) if finish.is_some() && !undelivered && !content.trim().is_empty() => {
                tracing::warn!(request_id = %p.v.request_id, error = %e.summary(), "stream failed after its finish; the delivered answer is charged");
                End::Done
            }
            End::Cut => {
                tracing::warn!(request_id = %p.v.request_id, "stream ended by the router (duration bound or hold expiring); delivered text is charged");
                finish = Some("length".into());
                End::Done
            }
            other => other,
        };
        // The finished answer sits in the client's queue. A paid one is charged once the client has
        // taken all of it, so that a client leaving before it read its answer is not charged for
        // it, as one leaving mid-stream is not (a capture on the upstream's end charged a client
        // that dropped with up to 32 events unread and no final event). A free one moves no money
        // and does not keep its slot for a reader that stalled.
        let end = match end {
            End::Done if !cut && !left_at_the_end && hold.is_some() => {
                match self
                    .read_by_client(&tx, &mut hold, &mut keep_alive, max_end)
                    .await
                {
                    Reading::Done => End::Done,
                    Reading::Left => End::Cancelled,
                    // The router stopped it, not the client: a failure (voided, its rate-window
                    // reservation given back, and the client told why if it is still there).
                    Reading::Aborted => End::Failed(UpstreamError::ShuttingDown),
                }
            }
            other => other,
        };
        let charge_left = self.inner.config.left_streams == LeftStreams::ChargeDelivered;
        // The answer as far as the client took it (deltas arrive whole and in order).
        let taken = taken.load(Ordering::Acquire);
        // Out of step (it cannot be: `taken` counts whole deltas of `content`), nothing is taken:
        // a charge must never exceed what was sent.
        let delivered = content.get(..taken).unwrap_or_default();
        match end {
            End::Cancelled if charge_left && hold.is_some() && !delivered.trim().is_empty() => {
                // The owner's choice (`left_streams = "charge_delivered"`): the text sent is
                // charged, counted by the router (the upstream's count would include what was
                // not sent), under the `cancelled` status. That text is stored as the answer, so
                // the payer can get what it paid for: a retry of the id is given it, marked as a
                // replay with `finish_reason = "cancelled"` (not as if complete). It used to be
                // told it was charged, with no way to read the text (bytes in the connection's
                // buffers count as sent, so a client that read none of it paid for all of it).
                tracing::info!(request_id = %p.v.request_id, "client left the stream; the text it was sent is charged");
                let charge = self.charge(&p, None, delivered, started, upstream_ms).await;
                let (input, output) = charge.tokens;
                let units = Units { input, output };
                let status = UsageStatus::Cancelled;
                let usage = self.usage(&p.t, status, units, started, upstream_ms);
                let usage = Usage { ttft_ms, ..usage };
                let taken_text = Completion {
                    id: upstream_id,
                    model: upstream_model,
                    content: delivered.to_string(),
                    finish_reason: "cancelled".into(),
                    usage: None,
                };
                let transfer_id = hold.as_ref().map(|h| h.transfer_id.clone());
                let response =
                    self.response(&p, taken_text, charge.tokens, charge.cost, transfer_id);
                let answer = self.answer_to_store(&p.v.request_id, chat_record(&p, &response));
                let outcome = match self.settle(&p.t, hold, charge.cost, usage, answer).await {
                    Ok(_) => "cancelled",
                    Err(_) => "not_settled",
                };
                metrics::observe(self.provider(), "stream", outcome, started, upstream_time);
            }
            End::Cancelled => {
                tracing::info!(request_id = %p.v.request_id, "client cancelled the stream");
                let units = Units {
                    input: self.prompt_tokens(&p).await,
                    output: super::at_most_the_limit(&p, tokens::count_text(&content)),
                };
                let times = (started, upstream_ms, upstream_time);
                self.void_left(&p, hold, units, ttft_ms, times).await;
            }
            End::Failed(e) => {
                // The money is voided (the contract), but the text the client was sent counts
                // in its token windows, as a stream it left does (`void_left`): refunded, a
                // stream that failed after most of its answer counted in no window.
                if !delivered.trim().is_empty() {
                    let input = self.prompt_tokens(&p).await;
                    let output = super::at_most_the_limit(&p, tokens::count_text(delivered));
                    Self::settle_pass(&p.t, input.saturating_add(output)).await;
                }
                self.fail(&p, hold, &e, started, upstream_ms).await;
                metrics::observe_failure(self.provider(), "stream", &e, started, upstream_time);
                if let Some(last) = last {
                    last.send(Err(e.into()));
                }
            }
            // `Cut` was turned into `Done` above.
            End::Done | End::Cut => {
                let charge = self
                    .charge(&p, reported, &content, started, upstream_ms)
                    .await;
                let usage = Usage {
                    ttft_ms,
                    ..charge.usage
                };
                let upstream_finish = finish.unwrap_or_else(|| "stop".into());
                let completion = Completion {
                    id: upstream_id,
                    model: upstream_model,
                    content,
                    finish_reason: upstream_finish,
                    usage: None,
                };
                let transfer_id = hold.as_ref().map(|h| h.transfer_id.clone());
                let response =
                    self.response(&p, completion, charge.tokens, charge.cost, transfer_id);
                let answer = self.answer_to_store(&p.v.request_id, chat_record(&p, &response));
                if left_at_the_end && answer.is_none() {
                    // A client that left is charged for the whole answer only if its retry can
                    // read it: without storage (replay off, or an answer above
                    // `--answer-max-bytes`) it is treated as any client that left.
                    let (input, output) = charge.tokens;
                    let units = Units { input, output };
                    if charge_left {
                        let usage =
                            self.usage(&p.t, UsageStatus::Cancelled, units, started, upstream_ms);
                        let usage = Usage { ttft_ms, ..usage };
                        let _ = self.settle(&p.t, hold, charge.cost, usage, None).await;
                        let outcome = "cancelled";
                        metrics::observe(
                            self.provider(),
                            "stream",
                            outcome,
                            started,
                            upstream_time,
                        );
                    } else {
                        let times = (started, upstream_ms, upstream_time);
                        self.void_left(&p, hold, units, ttft_ms, times).await;
                    }
                    return;
                }
                let item = self
                    .settle(&p.t, hold, charge.cost, usage, answer)
                    .await
                    .map(|_| final_event(response).1);
                let outcome = if item.is_ok() {
                    "success"
                } else {
                    "not_settled"
                };
                metrics::observe(self.provider(), "stream", outcome, started, upstream_time);
                if let Some(last) = last {
                    last.send(item);
                }
            }
        }
    }
}

impl RouterService {
    /// Voids a stream its client left (`cancelled`). The client chose to stop: the token windows
    /// keep what it was sent (refunding all of it let a client read most of an answer, leave,
    /// and never be counted).
    async fn void_left(
        &self,
        p: &Prepared,
        hold: Option<HoldGuard>,
        units: Units,
        ttft_ms: Option<i64>,
        (started, upstream_ms, upstream_time): (Instant, i64, Duration),
    ) {
        Self::settle_pass(&p.t, units.input.saturating_add(units.output)).await;
        let usage = self.usage(&p.t, UsageStatus::Cancelled, units, started, upstream_ms);
        let usage = Usage { ttft_ms, ..usage };
        self.release(hold, "client cancelled", usage).await;
        let outcome = "cancelled";
        metrics::observe(self.provider(), "stream", outcome, started, upstream_time);
    }

    /// Waits until the client has taken every event queued for it, keeping the hold alive
    /// meanwhile. A shutdown's abort ends the wait (the connection is closed within seconds, the
    /// answer unread); a stream bound reached while waiting settles the answer as it is (the hold
    /// must be resolved before it expires).
    async fn read_by_client(
        &self,
        tx: &mpsc::Sender<Result<ChatStreamEvent, RouterError>>,
        hold: &mut Option<HoldGuard>,
        keep_alive: &mut Option<tokio::time::Interval>,
        max_end: tokio::time::Instant,
    ) -> Reading {
        loop {
            let cut_at = hold
                .as_ref()
                .map_or(max_end, |h| h.capture_by().min(max_end));
            tokio::select! {
                // A queue the client emptied wins over everything else that is ready.
                biased;
                // Every slot free but the last event's: the queue is empty (the permits go back
                // when dropped).
                all = tx.reserve_many(tx.max_capacity() - 1) => {
                    return if all.is_ok() { Reading::Done } else { Reading::Left };
                }
                _ = self.inner.drain.aborted() => return Reading::Aborted,
                _ = tokio::time::sleep_until(cut_at) => return Reading::Done,
                _ = tick(keep_alive) => extend(hold, keep_alive).await,
            }
        }
    }
}

/// How the wait for a stream's reader ended.
enum Reading {
    /// The client took every event (or a stream bound says to settle now).
    Done,
    /// The client left.
    Left,
    /// The router is shutting down and cannot wait longer.
    Aborted,
}

/// Extends the hold on a keep-alive tick; a hold that cannot be extended stops the ticks (the
/// stream's bound, `HoldGuard::capture_by`, then ends it before the hold expires).
async fn extend(hold: &mut Option<HoldGuard>, keep_alive: &mut Option<tokio::time::Interval>) {
    if let Some(h) = hold.as_mut() {
        if !h.extend().await {
            *keep_alive = None;
        }
    }
}

/// A stream that replays a stored answer: the whole text as one delta, then the final event.
fn replayed(r: ChatResponse, rate_limits: crate::limits::RateHeaders) -> ChatStreamHandle {
    let request_id = r.id.clone();
    let transfer_id = Some(r.transfer_id.clone()).filter(|t| !t.is_empty());
    let model = r.model.clone();
    let (delta, last) = final_event(r);
    let (tx, rx) = mpsc::channel(2);
    for event in [delta, last] {
        // The channel has room for both events and its receiver is alive: this cannot fail.
        let _ = tx.try_send(Ok(event));
    }
    ChatStreamHandle {
        request_id,
        transfer_id,
        model,
        replay: true,
        rate_limits,
        events: Events {
            rx: ReceiverStream::new(rx),
            taken: Arc::default(),
        },
    }
}

fn delta_event(content: String) -> ChatStreamEvent {
    ChatStreamEvent {
        event: Some(chat_stream_event::Event::Delta(ContentDelta { content })),
    }
}

/// The next keep-alive tick; never, without one.
async fn tick(keep_alive: &mut Option<tokio::time::Interval>) {
    match keep_alive {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How long the upstream of a stream whose client left holding every delta is read on, to see
/// whether the client had the whole answer (`drive_stream`).
const LEFT_AT_THE_END: Duration = Duration::from_secs(2);

/// What the end of an upstream stream said after its client left.
struct Rest {
    finish: Option<String>,
    usage: Option<UpstreamUsage>,
}

/// Reads `upstream` until it ends, at most until `until`: `None` if it sends more text, or
/// fails or is still going before saying it finished (`finish`: what it said before). Once it
/// said so, nothing more can come: a `[DONE]` late past `until` does not undo the answer.
async fn read_to_the_end(
    upstream: &mut UpstreamStream,
    finish: Option<String>,
    until: tokio::time::Instant,
) -> Option<Rest> {
    let mut rest = Rest {
        finish,
        usage: None,
    };
    loop {
        let Ok(next) = tokio::time::timeout_at(until, upstream.next()).await else {
            return rest.finish.is_some().then_some(rest);
        };
        match next {
            None => return Some(rest),
            Some(Err(_)) => return rest.finish.is_some().then_some(rest),
            Some(Ok(chunk)) => {
                if chunk.delta.as_deref().is_some_and(|d| !d.is_empty()) {
                    return None;
                }
                rest.finish = chunk.finish_reason.or(rest.finish);
                rest.usage = chunk.usage.or(rest.usage);
            }
        }
    }
}
