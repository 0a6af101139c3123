//! Request bodies bounded in memory and in time, for the gRPC servers.
//!
//! tonic reads a request's whole message into memory before the handler runs, and nothing
//! bounded how many such messages were being received at once or for how long: a client could
//! open streams on a connection (tonic sets no limit on streams per connection), send each a
//! message of almost the size limit (5 MiB to a router, 4 MiB to a ledger) and never finish it,
//! and the server held every one of them, unauthenticated, for as long as the client kept the
//! connection. [`BodyBudgetLayer`] gives each server a budget of request bytes being received
//! ([`BODY_BUDGET_BYTES`]) and each request body a deadline ([`BODY_DEADLINE`]): a body that
//! would go over the budget fails with `UNAVAILABLE` (it never reached a handler, so any client
//! may send it again, and the router's ledger client does), one that has not ended within the
//! deadline with `DEADLINE_EXCEEDED`, and the bytes a body holds return to the budget when it is
//! dropped (tonic drops a unary request's body once its message is decoded).
//!
//! A body's first [`UNCOUNTED_BYTES`] are not taken from the budget: while large bodies hold all
//! of it (an attack, or a burst of long prompts), calls of ordinary size (every call a router
//! makes to its ledger but its larger usage batches and answers, most chats) still go through.
//! What those cost is bounded by the deadline and the streams a connection may have.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::Status;

/// Request bytes one server holds while receiving them, over all requests (at least: a router
/// whose prompt limit is above 63 MiB takes four of its largest messages): 50 requests of the
/// default largest size at once, or thousands of ordinary ones.
pub const BODY_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// The first bytes of each body, not counted against the budget (see the module's documentation).
pub const UNCOUNTED_BYTES: usize = 16 * 1024;

/// How long a request body may take to arrive in full. A unary message of the largest size
/// arrives in well under a second on any link a router is served over.
pub const BODY_DEADLINE: Duration = Duration::from_secs(60);

/// Bounds every request body of the service it wraps (see the module's documentation).
#[derive(Clone)]
pub struct BodyBudgetLayer {
    budget: Arc<Semaphore>,
    uncounted: usize,
    deadline: Duration,
}

impl BodyBudgetLayer {
    /// A budget of `bytes` shared by every request the layered service receives (each body's
    /// first `uncounted` bytes apart), and `deadline` for each body.
    pub fn new(bytes: usize, uncounted: usize, deadline: Duration) -> Self {
        BodyBudgetLayer {
            budget: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
            uncounted,
            deadline,
        }
    }
}

impl<S> tower::Layer<S> for BodyBudgetLayer {
    type Service = BodyBudget<S>;

    fn layer(&self, inner: S) -> BodyBudget<S> {
        BodyBudget {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`BodyBudgetLayer`].
#[derive(Clone)]
pub struct BodyBudget<S> {
    inner: S,
    layer: BodyBudgetLayer,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for BodyBudget<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let layer = &self.layer;
        let request = request.map(|body| {
            tonic::body::Body::new(Budgeted {
                inner: body,
                budget: layer.budget.clone(),
                held: None,
                uncounted: layer.uncounted,
                deadline: Box::pin(tokio::time::sleep(layer.deadline)),
                within: layer.deadline,
            })
        });
        self.inner.call(request)
    }
}

/// A request body that takes its bytes from the budget as they arrive and gives them back when
/// dropped, and fails once its deadline passed while it waited for more.
struct Budgeted {
    inner: tonic::body::Body,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    /// Bytes still to receive before the budget counts them.
    uncounted: usize,
    deadline: Pin<Box<Sleep>>,
    within: Duration,
}

impl Body for Budgeted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(refused) = this.take(data.len()) {
                        return Poll::Ready(Some(Err(refused)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the request did not arrive in full within {:?}",
                    this.within
                ))))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Budgeted {
    /// Takes `bytes` that arrived (those past the uncounted ones) from the budget, for as long
    /// as this body lives.
    fn take(&mut self, bytes: usize) -> Result<(), Status> {
        let free = bytes.min(self.uncounted);
        self.uncounted -= free;
        let bytes = bytes - free;
        if bytes == 0 {
            return Ok(());
        }
        let taken = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok());
        let Some(taken) = taken else {
            return Err(Status::unavailable(
                "the server is receiving too many request bytes at once; try again shortly",
            ));
        };
        match &mut self.held {
            Some(held) => held.merge(taken),
            None => self.held = Some(taken),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tower::{Layer, Service};

    type Frames = mpsc::Sender<Result<Frame<Bytes>, Status>>;

    /// A service that answers with the body it was handed, to be read as tonic's would.
    struct Echo;

    impl Service<http::Request<tonic::body::Body>> for Echo {
        type Response = tonic::body::Body;
        type Error = Status;
        type Future = std::future::Ready<Result<tonic::body::Body, Status>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            std::future::ready(Ok(request.into_body()))
        }
    }

    /// A request whose body the test feeds, passed through `layer`.
    async fn request(layer: &BodyBudgetLayer) -> (Frames, tonic::body::Body) {
        let (tx, rx) = mpsc::channel(4);
        let body = tonic::body::Body::new(StreamBody::new(ReceiverStream::new(rx)));
        let body = (layer.layer(Echo).call(http::Request::new(body)).await).expect("called");
        (tx, body)
    }

    async fn send(tx: &Frames, bytes: usize) {
        let data = Bytes::from(vec![0u8; bytes]);
        tx.send(Ok(Frame::data(data))).await.expect("send");
    }

    /// Whether `body`'s next frame is data it let through.
    async fn passes(body: &mut tonic::body::Body) -> bool {
        matches!(body.frame().await, Some(Ok(_)))
    }

    /// The code `body` fails with at its next frame, if it fails.
    async fn fails(body: &mut tonic::body::Body) -> Option<tonic::Code> {
        match body.frame().await {
            Some(Err(status)) => Some(status.code()),
            _ => None,
        }
    }

    /// Bytes being received count against the server's budget until their body is dropped; a
    /// body that would go over it fails, and the bytes are there again once the others went.
    #[tokio::test]
    async fn bodies_share_one_budget_until_they_are_dropped() {
        let layer = BodyBudgetLayer::new(10, 0, Duration::from_secs(60));
        let (a_tx, mut a) = request(&layer).await;
        let (b_tx, mut b) = request(&layer).await;
        send(&a_tx, 6).await;
        assert!(passes(&mut a).await);
        send(&b_tx, 3).await;
        assert!(passes(&mut b).await);
        send(&b_tx, 3).await;
        assert_eq!(fails(&mut b).await, Some(tonic::Code::Unavailable));
        drop((a, b));
        let (c_tx, mut c) = request(&layer).await;
        send(&c_tx, 10).await;
        assert!(passes(&mut c).await, "the budget is whole again");
    }

    /// A body that stops sending fails once its deadline passed; one that ends in time is read
    /// to its end.
    #[tokio::test]
    async fn a_body_that_stalls_past_its_deadline_fails() {
        let layer = BodyBudgetLayer::new(1 << 20, 0, Duration::from_millis(200));
        let (tx, mut stalled) = request(&layer).await;
        send(&tx, 100).await;
        assert!(passes(&mut stalled).await);
        let started = std::time::Instant::now();
        assert_eq!(
            fails(&mut stalled).await,
            Some(tonic::Code::DeadlineExceeded)
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        let (tx, mut complete) = request(&layer).await;
        send(&tx, 100).await;
        drop(tx);
        assert!(passes(&mut complete).await);
        assert!(complete.frame().await.is_none(), "ended");
    }

    /// A body's first uncounted bytes take nothing from the budget: small calls pass while large
    /// ones hold all of it.
    #[tokio::test]
    async fn small_bodies_pass_when_the_budget_is_spent() {
        let layer = BodyBudgetLayer::new(10, 4, Duration::from_secs(60));
        let (large_tx, mut large) = request(&layer).await;
        send(&large_tx, 14).await;
        assert!(passes(&mut large).await, "4 free, 10 taken");
        let (small_tx, mut small) = request(&layer).await;
        send(&small_tx, 4).await;
        assert!(passes(&mut small).await, "within its free bytes");
        send(&small_tx, 1).await;
        assert_eq!(fails(&mut small).await, Some(tonic::Code::Unavailable));
    }
}
