//! A tower layer for servers: each request gets a span whose parent is the caller's W3C trace
//! context (or, with `SYFT_TRACE_INCOMING=link`, that links to it), and is counted and timed in
//! the request metrics.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{GRPC_DURATION, GRPC_REQUESTS, HTTP_DURATION, HTTP_REQUESTS};
use crate::propagation;

/// What the layer serves, for span and metric names.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    /// A tonic server: the path is `/package.Service/Method`.
    Grpc,
    /// An axum server, named (`ledger`, `router`); routes come from axum's `MatchedPath`.
    Http(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub struct RequestLayer(pub Server);

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            server: self.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestService<S> {
    inner: S,
    server: Server,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RequestService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let parent = propagation::extract(req.headers());
        let started = Instant::now();
        let server = self.server;
        let method = method_label(req.method()).to_string();
        let (span, labels) = match server {
            Server::Grpc => {
                let path = req.uri().path().trim_start_matches('/');
                let (service, rpc) = path.split_once('/').unwrap_or((path, ""));
                let span = tracing::info_span!(
                    "grpc",
                    otel.name = %path,
                    otel.kind = "server",
                    rpc.system = "grpc",
                    rpc.service = %service,
                    rpc.method = %rpc,
                    rpc.grpc.status_code = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                );
                (span, [service.to_string(), rpc.to_string()])
            }
            Server::Http(name) => {
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "unmatched".into());
                let span = tracing::info_span!(
                    "http",
                    otel.name = %format!("{method} {route}"),
                    otel.kind = "server",
                    http.request.method = %method,
                    http.route = %route,
                    http.response.status_code = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                    server = name,
                );
                (span, [name.to_string(), route])
            }
        };
        match crate::incoming() {
            crate::Incoming::Follow => {
                let _ = span.set_parent(parent);
            }
            crate::Incoming::Link => {
                use opentelemetry::trace::TraceContextExt as _;
                span.add_link(parent.span().span_context().clone());
            }
        }
        let future = self.inner.call(req).instrument(span.clone());
        // Recorded when the request ends, or when its future is dropped first (the client left,
        // or a deadline cut it): counted only on completion, the requests that took too long
        // were missing from every error rate and latency built on these series.
        let mut record = Record {
            server,
            method,
            labels,
            started,
            span,
            done: false,
        };
        Box::pin(async move {
            let result = future.await;
            match &result {
                Ok(response) => record.response(response),
                Err(_) => record.left(),
            }
            result
        })
    }
}

/// One request's metrics and span status, written once.
struct Record {
    server: Server,
    method: String,
    labels: [String; 2],
    started: Instant,
    span: tracing::Span,
    done: bool,
}

impl Record {
    fn response<RB>(&mut self, response: &http::Response<RB>) {
        match self.server {
            // Errors come as a trailers-only answer (the code in the headers); a success puts
            // it in the trailers, after the body.
            Server::Grpc => self.grpc(
                response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0),
            ),
            Server::Http(_) => self.http(response.status().as_u16()),
        }
    }

    /// The request ended without a response: counted as the client's (HTTP `499`, as nginx
    /// logs it; gRPC `CANCELLED`).
    fn left(&mut self) {
        match self.server {
            Server::Grpc => self.grpc(1),
            Server::Http(_) => self.http(499),
        }
    }

    fn grpc(&mut self, code: i32) {
        self.done = true;
        let elapsed = self.started.elapsed().as_secs_f64();
        self.span.record("rpc.grpc.status_code", code);
        // The server's faults, as OpenTelemetry's conventions mark a gRPC server span: UNKNOWN,
        // DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            self.span.record("otel.status_code", "ERROR");
        }
        // A path no service knows is answered UNIMPLEMENTED: counted under one label, since the
        // path is whatever a caller sent (no authentication is needed to send it, and each new
        // label is a new series).
        let (service, rpc) = if code == 12 {
            ("unimplemented", "unimplemented")
        } else {
            (self.labels[0].as_str(), self.labels[1].as_str())
        };
        GRPC_REQUESTS
            .with_label_values(&[service, rpc, code_name(code)])
            .inc();
        GRPC_DURATION
            .with_label_values(&[service, rpc])
            .observe(elapsed);
    }

    fn http(&mut self, status: u16) {
        self.done = true;
        let elapsed = self.started.elapsed().as_secs_f64();
        self.span.record("http.response.status_code", status);
        if status >= 500 {
            self.span.record("otel.status_code", "ERROR");
        }
        let [name, route] = &self.labels;
        HTTP_REQUESTS
            .with_label_values(&[name, &self.method, route, &status.to_string()])
            .inc();
        HTTP_DURATION
            .with_label_values(&[name, &self.method, route])
            .observe(elapsed);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            self.left();
        }
    }
}

/// The canonical name of a gRPC status code, as grpc-prometheus labels it.
fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// The request method as a metric label: the standard methods by name, any other as `other`
/// (a client may send any token as a method, and each would be a new series).
fn method_label(method: &http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service};

    use super::*;

    /// A service that never answers: its client leaves first.
    fn never() -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<()>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<()>, Infallible>> + Send + 'static,
    > {
        tower::service_fn(|_req: http::Request<()>| {
            std::future::pending::<Result<http::Response<()>, Infallible>>()
        })
    }

    /// A request whose future is dropped before it answers (the client left, a deadline cut it)
    /// is counted as the client's: HTTP `499`, gRPC `CANCELLED`. It was not counted at all.
    #[tokio::test]
    async fn a_request_whose_client_left_is_counted() {
        let mut http = RequestLayer(Server::Http("left-test")).layer(never());
        let started = http.call(http::Request::new(()));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), started).await;
        assert!(waited.is_err(), "never answers");
        let left = HTTP_REQUESTS.with_label_values(&["left-test", "GET", "unmatched", "499"]);
        assert_eq!(left.get(), 1);
        // Dropped before it was ever polled, as well.
        drop(http.call(http::Request::new(())));
        assert_eq!(left.get(), 2);

        let mut grpc = RequestLayer(Server::Grpc).layer(never());
        let request = http::Request::builder()
            .uri("/left.Test/Call")
            .body(())
            .expect("request");
        drop(grpc.call(request));
        let cancelled = GRPC_REQUESTS.with_label_values(&["left.Test", "Call", "CANCELLED"]);
        assert_eq!(cancelled.get(), 1);
    }
}
