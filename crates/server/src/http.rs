//! The HTTP serve loop of both services. axum's own `serve` runs hyper without a timer, so a
//! connection that never finishes its request head, or sits idle between keep-alive requests,
//! holds a descriptor for ever, and nothing bounds how many connections are open. This loop is
//! axum's with the three things a public listener needs: a timer (idle and slow-head connections
//! are closed), a connection cap (past it, new connections wait in the kernel's backlog instead of
//! taking the process' last descriptors) and HTTP/2 pings that find dead peers.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt;

use crate::accepted::{Accepted, Slots};

/// What one HTTP listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; past this, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// How long a connection may take to send a request's head, counted from the end of its
    /// previous answer (or from its opening): an idle HTTP/1 keep-alive connection is closed
    /// after this, and so is one that sends its head a byte at a time; one that sends nothing at
    /// all after [`FIRST_BYTES_TIMEOUT`] already. (An HTTP/2 connection is closed when its peer
    /// stops answering pings; a live idle one stays open.)
    pub idle_timeout: Duration,
}

/// [`HttpLimits::max_connections`] unless configured: well under the usual descriptor limits
/// (the database pools, spool files and gRPC connections need theirs too).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// [`HttpLimits::idle_timeout`] unless configured: longer than the idle timeout of every common
/// load balancer (AWS 60 s, Google Cloud 600 s) and client pool (5 – 15 s in the OpenAI SDKs'
/// HTTP clients), so that they, not the server, close idle connections. A server that closes
/// first races the balancer's next request on that connection, which then fails with a 502.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(620);

/// How long a new connection may stay silent (at most the idle timeout): clients and balancers
/// send their first request as soon as they connect, so this can be much shorter than the idle
/// timeout, and it is what frees a connection that was opened and never used.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Serves `app` to every connection `listener` accepts until `stopped` resolves, then stops
/// accepting, closes idle connections and waits for the open requests to finish (the caller
/// bounds that wait with its grace). Each request carries its client's address as
/// `ConnectInfo<SocketAddr>`.
pub(crate) async fn serve<L>(
    mut listener: L,
    app: axum::Router,
    limits: HttpLimits,
    stopped: impl Future<Output = ()> + Send + 'static,
) where
    L: Listener<Addr = SocketAddr>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(syft_tls::HTTP2_PING_INTERVAL))
        .keep_alive_timeout(syft_tls::HTTP2_PING_TIMEOUT);
    let mut slots = Slots::new(limits.max_connections, "http");
    let graceful = GracefulShutdown::new();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let slot = tokio::select! {
            slot = slots.take() => match slot {
                Some(slot) => slot,
                None => break,
            },
            () = &mut stopped => break,
        };
        let (io, addr) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut stopped => break,
        };
        let service = app
            .clone()
            .map_request(move |mut request: axum::http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(addr));
                request.map(axum::body::Body::new)
            });
        let io = Accepted::new(io, slot, limits.idle_timeout.min(FIRST_BYTES_TIMEOUT));
        let connection = builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(peer = %addr, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    // No new connections from here (the listener is closed); idle ones close now, the others
    // after their request.
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const ANSWER: &str = "HTTP/1.1 200";

    async fn start(
        limits: HttpLimits,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async {
            let _ = rx.await;
        }));
        (addr, tx, server)
    }

    async fn request(stream: &mut TcpStream, path: &str) -> String {
        let head = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Reads until the server closes the connection; false if it stays open for `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(within, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    #[tokio::test]
    async fn requests_see_their_client_address() {
        let (addr, _stop, _server) = start(HttpLimits::default()).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let answer = request(&mut client, "/peer").await;
        let mine = client.local_addr().expect("local").to_string();
        assert!(answer.starts_with(ANSWER), "{answer}");
        assert!(answer.ends_with(&mine), "{answer} should name {mine}");
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed() {
        let limits = HttpLimits {
            idle_timeout: Duration::from_millis(200),
            ..HttpLimits::default()
        };
        let (addr, _stop, _server) = start(limits).await;
        // Half a request head, then nothing.
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /peer HTTP/1.1\r\nhos")
            .await
            .expect("write");
        // A finished request, then an idle keep-alive connection.
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        assert!(request(&mut idle, "/peer").await.starts_with(ANSWER));
        // Nothing at all, and part of HTTP/2's preface: hyper is still telling the protocol.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut preface = TcpStream::connect(addr).await.expect("connect");
        preface
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("write");
        for (name, conn) in [
            ("half a head", &mut slow),
            ("idle", &mut idle),
            ("silent", &mut silent),
            ("half a preface", &mut preface),
        ] {
            assert!(closed_within(conn, Duration::from_secs(5)).await, "{name}");
        }
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_free_slot() {
        let limits = HttpLimits {
            max_connections: 1,
            ..HttpLimits::default()
        };
        let (addr, _stop, _server) = start(limits).await;
        let mut first = TcpStream::connect(addr).await.expect("connect");
        assert!(request(&mut first, "/peer").await.starts_with(ANSWER));
        // The second is accepted by the kernel but not served while the first is open.
        let mut second = TcpStream::connect(addr).await.expect("connect");
        second
            .write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
        assert!(early.is_err(), "served past the cap");
        drop(first);
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("served once the first closed")
            .expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with(ANSWER));
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_finishes_open_requests() {
        let (addr, stop, server) = start(HttpLimits::default()).await;
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        assert!(request(&mut idle, "/peer").await.starts_with(ANSWER));
        let mut busy = TcpStream::connect(addr).await.expect("connect");
        busy.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = stop.send(());
        assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), busy.read_to_string(&mut answer))
            .await
            .expect("the open request finished");
        assert!(
            answer.starts_with(ANSWER) && answer.ends_with("done"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returned after its last request")
            .expect("no panic");
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
