//! The gRPC health service with `Watch` streams that end at shutdown. tonic-health's streams
//! never end, and the gRPC server's graceful shutdown waits for every open call: one monitor
//! watching the health of a stopping server kept it open for its whole grace.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::HealthService;

pub(crate) struct EndingHealth {
    inner: HealthService,
    ended: watch::Receiver<bool>,
}

impl EndingHealth {
    pub(crate) fn new(inner: HealthService, ended: watch::Receiver<bool>) -> Self {
        EndingHealth { inner, ended }
    }
}

#[tonic::async_trait]
impl Health for EndingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = EndingWatch;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(EndingWatch {
            statuses,
            ended: WatchStream::new(self.ended.clone()),
        }))
    }
}

/// A health `Watch` stream that ends once its server stops, after the statuses it has not sent
/// yet (the NOT_SERVING published just before the end among them).
pub struct EndingWatch {
    statuses: tonic_health::server::WatchStream,
    ended: WatchStream<bool>,
}

impl Stream for EndingWatch {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(status) = Pin::new(&mut self.statuses).poll_next(cx) {
            return Poll::Ready(status);
        }
        // No status waiting: end if the server stopped. A publisher gone (its channel closed)
        // is not a stop; the statuses' own waker is registered above.
        while let Poll::Ready(Some(ended)) = Pin::new(&mut self.ended).poll_next(cx) {
            if ended {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    }
}
