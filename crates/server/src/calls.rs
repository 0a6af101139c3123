//! The calls a gRPC server is serving, for a shutdown that waits for its clients: a ledger asked
//! to stop keeps taking calls while they come (routers stopping beside it still capture what
//! they answered and void what they did not), and stops once it has been quiet a moment.
//! Health checks and reflection are not counted: a router probes its ledger every second.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// Counts the calls in flight and when the last one ended. Cheap to clone.
#[derive(Clone)]
pub struct Calls(Arc<Inner>);

struct Inner {
    in_flight: AtomicUsize,
    /// Since `origin`, in microseconds, when a call last started or ended: an atomic, not a
    /// lock, since every call of the server passes here twice.
    last: AtomicU64,
    origin: Instant,
}

impl Default for Calls {
    fn default() -> Self {
        Calls(Arc::new(Inner {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            origin: Instant::now(),
        }))
    }
}

impl Calls {
    fn touch(&self) {
        let since = self.0.origin.elapsed().as_micros();
        self.0
            .last
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    fn last(&self) -> Instant {
        self.0.origin + Duration::from_micros(self.0.last.load(Ordering::SeqCst))
    }

    fn enter(&self) -> Entered {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Entered(self.clone())
    }

    /// Resolves once no call has been in flight or started for `quiet` and `waiting` says no
    /// call is awaited (a ledger's open holds), or after `most`.
    pub async fn quiet_for(&self, quiet: Duration, most: Duration, waiting: impl Fn() -> bool) {
        let until = Instant::now() + most;
        loop {
            let now = Instant::now();
            let busy = self.0.in_flight.load(Ordering::SeqCst) > 0 || waiting();
            let last = self.last();
            let quiet_at = if busy { now + quiet } else { last + quiet };
            if now >= until || (!busy && now >= quiet_at) {
                return;
            }
            // A call in flight (or awaited) is looked at again a little later (its end is not
            // signalled).
            let next = if busy {
                now + Duration::from_millis(50)
            } else {
                quiet_at
            };
            tokio::time::sleep_until(next.min(until)).await;
        }
    }
}

/// A call in flight, until dropped.
struct Entered(Calls);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0 .0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

/// Counts the calls of a server in [`Calls`].
#[derive(Clone)]
pub struct CallsLayer(pub Calls);

impl<S> tower::Layer<S> for CallsLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            calls: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    calls: Calls,
}

impl<S, B> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let probe = request.uri().path().starts_with("/grpc.");
        let entered = (!probe).then(|| self.calls.enter());
        let call = self.inner.call(request);
        Box::pin(async move {
            let answer = call.await;
            drop(entered);
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_waits_for_the_calls_and_a_quiet_moment_within_its_bound() {
        let calls = Calls::default();
        let started = Instant::now();
        calls
            .quiet_for(Duration::from_secs(1), Duration::from_secs(10), || false)
            .await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "quiet from the start"
        );
        // A call in flight for 3 s: quiet a second after it ended.
        let call = calls.enter();
        let ends = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(call);
        });
        let started = Instant::now();
        calls
            .quiet_for(Duration::from_secs(1), Duration::from_secs(10), || false)
            .await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(4) && waited < Duration::from_millis(4100),
            "{waited:?}"
        );
        ends.await.expect("call");
        // A call awaited (an open hold) for 2 s, the last call long over: done once it is not.
        // (An awaited call that comes, a capture, starts a quiet second of its own.)
        let awaited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = awaited.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            flag.store(false, Ordering::SeqCst);
        });
        let started = Instant::now();
        calls
            .quiet_for(Duration::from_secs(1), Duration::from_secs(10), || {
                awaited.load(Ordering::SeqCst)
            })
            .await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_millis(2100),
            "{waited:?}"
        );
        // Never quiet: `most` bounds the wait.
        let _busy = calls.enter();
        let started = Instant::now();
        calls
            .quiet_for(Duration::from_secs(1), Duration::from_secs(5), || false)
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
