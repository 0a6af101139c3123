//! The gRPC server both services run ([`grpc_router`]: keepalive, streams per connection, the
//! request layers, health and reflection) and its listeners' accepted connections
//! ([`grpc_incoming`]): Nagle off, TCP keepalive on, at most
//! [`MAX_GRPC_CONNECTIONS`] open at once, and TLS terminated here rather than by tonic. tonic
//! applies its builder's TCP settings only to a listener it binds itself, not to one handed to
//! `serve_with_incoming`, and it serves every connection it is given: a client opening
//! connections without end took a descriptor each, and one that never sent its HTTP/2 preface
//! held it for ever (`accepted.rs`). Over TLS the preface deadline ran out during the handshake
//! (its bytes counted), so a client that finished a handshake and then said nothing held its
//! slot until it went away; the deadline now starts once the handshake is done.

use std::io;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use socket2::{SockRef, TcpKeepalive};
use syft_telemetry::RequestLayer;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;
use tonic::transport::server::{Connected, Router, TcpConnectInfo, TcpIncoming};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::layer::util::{Identity, Stack};

use crate::accepted::{Accepted, Slots};
use crate::bodies::BodyBudgetLayer;
use crate::calls::{Calls, CallsLayer};

/// Connections one gRPC listener serves at once; past this, new ones wait in the listen backlog.
/// A gRPC client multiplexes its calls over one connection, so this is thousands of clients.
pub const MAX_GRPC_CONNECTIONS: usize = 4096;

/// TCP keepalive of accepted connections: finds peers gone without a word (a NAT that dropped
/// the mapping, a host powered off) below HTTP/2's own pings.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How long a connection may take to send HTTP/2's preface (after its TLS handshake, which has
/// its own limit, `syft_tls::HANDSHAKE_TIMEOUT`); gRPC clients send it at once. After it, HTTP/2
/// pings (every 30 s, 10 s to answer) find connections whose peer went away.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls one gRPC connection may have open at once (tonic sets no limit). Well above what one
/// client multiplexes (a router sends all its calls to a ledger endpoint over one connection,
/// and calls past this would queue in it), while bounding what one connection can start.
const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// The request layers of both services' gRPC servers: telemetry outside, then the body budget,
/// then the count of calls in flight.
pub type GrpcLayers = Stack<CallsLayer, Stack<BodyBudgetLayer, Stack<RequestLayer, Identity>>>;

/// The tonic server both services run, with the request layers (`body_budget` bytes for the
/// request bodies being received, at least [`crate::BODY_BUDGET_BYTES`]), the health service
/// `health`, and reflection advertising `services` (add the services themselves). It serves
/// connections from [`grpc_incoming`], TLS included, so it has no TLS configuration of its own.
/// Its calls but health checks and reflection are counted in `calls`.
pub fn grpc_router(
    health: HealthServer<impl Health>,
    services: &[&'static str],
    body_budget: usize,
    calls: Calls,
) -> Result<Router<GrpcLayers>, tonic_reflection::server::Error> {
    let (reflection_v1, reflection_v1alpha) = syft_proto::reflection(services)?;
    Ok(tonic::transport::Server::builder()
        // HTTP/2 pings find dead peers behind load balancers and NATs that drop idle connections
        // silently (TCP keepalive is set in `grpc_incoming`: tonic applies its builder's TCP
        // settings only to listeners it binds).
        .http2_keepalive_interval(Some(syft_tls::HTTP2_PING_INTERVAL))
        .http2_keepalive_timeout(Some(syft_tls::HTTP2_PING_TIMEOUT))
        // Every stream may hold a message of up to the size limit while it arrives (the body
        // budget bounds them all).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(RequestLayer(syft_telemetry::Server::Grpc))
        .layer(BodyBudgetLayer::new(
            body_budget.max(crate::BODY_BUDGET_BYTES),
            crate::UNCOUNTED_BYTES,
            crate::BODY_DEADLINE,
        ))
        .layer(CallsLayer(calls))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// A gRPC connection as served: plain TCP, or TLS terminated by [`grpc_incoming`].
pub type GrpcIo = Either<TcpStream, syft_tls::ServerTlsStream>;

/// Accepted gRPC connections (over TLS when `tls` is given, handshaken here) with Nagle's
/// algorithm off (small RPCs must not wait for delayed ACKs), TCP keepalive on, and at most
/// `max_connections` open at once. Serve them with a tonic server that has no TLS of its own.
pub fn grpc_incoming(
    listener: TcpListener,
    max_connections: usize,
    tls: Option<&syft_tls::ServerTls>,
) -> io::Result<BoxStream<'static, io::Result<Accepted<GrpcIo>>>> {
    match tls {
        None => Ok(capped_incoming(listener, max_connections, PREFACE_TIMEOUT).boxed()),
        Some(tls) => {
            // gRPC is HTTP/2 only: a client offering nothing else learns so in the handshake.
            let mut rustls = (*tls.rustls().map_err(io::Error::other)?).clone();
            rustls.alpn_protocols = vec![b"h2".to_vec()];
            let rustls = std::sync::Arc::new(rustls);
            tls_incoming(listener, rustls, max_connections, PREFACE_TIMEOUT).map(StreamExt::boxed)
        }
    }
}

fn capped_incoming(
    listener: TcpListener,
    max_connections: usize,
    preface_timeout: Duration,
) -> impl Stream<Item = io::Result<Accepted<GrpcIo>>> + Send + 'static {
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let slots = Slots::new(max_connections, "grpc");
    futures::stream::unfold(
        (incoming, slots),
        move |(mut incoming, mut slots)| async move {
            let slot = slots.take().await?;
            let next = incoming.next().await?;
            let capped = next.map(|io| Accepted::new(Either::Left(io), slot, preface_timeout));
            Some((capped, (incoming, slots)))
        },
    )
}

/// Connections whose TLS handshake is done (`syft_tls::TlsListener`: handshakes in tasks of
/// their own, each within its limit), each holding a slot from then on.
fn tls_incoming(
    listener: TcpListener,
    rustls: std::sync::Arc<syft_tls::rustls::ServerConfig>,
    max_connections: usize,
    preface_timeout: Duration,
) -> io::Result<impl Stream<Item = io::Result<Accepted<GrpcIo>>> + Send + 'static> {
    use axum::serve::Listener;
    let handshaken = syft_tls::TlsListener::new(listener, rustls, max_connections)?;
    let slots = Slots::new(max_connections, "grpc");
    Ok(futures::stream::unfold(
        (handshaken, slots),
        move |(mut handshaken, mut slots)| async move {
            let slot = slots.take().await?;
            let (io, _) = handshaken.accept().await;
            let keepalive = TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            let _ = SockRef::from(io.get_ref().0).set_tcp_keepalive(&keepalive);
            let capped = Accepted::new(Either::Right(io), slot, preface_timeout);
            Some((Ok(capped), (handshaken, slots)))
        },
    ))
}

/// The client's address for tonic (`Request::remote_addr`), over TCP or TLS alike.
impl Connected for Accepted<GrpcIo> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self.get_ref() {
            Either::Left(tcp) => tcp.connect_info(),
            Either::Right(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    #[tokio::test]
    async fn connections_past_the_cap_wait_and_have_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = grpc_incoming(listener, 1, None).expect("incoming");
        let _client1 = TcpStream::connect(addr).await.expect("connect");
        let first = incoming.next().await.expect("one").expect("ok");
        let Either::Left(tcp) = first.get_ref() else {
            panic!("a plain connection");
        };
        assert!(SockRef::from(tcp).keepalive().expect("read"));
        assert!(tcp.nodelay().expect("read"));
        let _client2 = TcpStream::connect(addr).await.expect("connect");
        let early = tokio::time::timeout(Duration::from_millis(200), incoming.next()).await;
        assert!(early.is_err(), "a second connection past the cap");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("accepted once the first closed");
        assert!(second.is_some_and(|c| c.is_ok()));
    }

    /// A gRPC connection that never sends HTTP/2's preface is closed (tonic would wait for ever).
    #[tokio::test]
    async fn a_connection_that_sends_nothing_times_out() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = Box::pin(capped_incoming(listener, 1, Duration::from_millis(100)));
        let _client = TcpStream::connect(addr).await.expect("connect");
        let mut served = incoming.next().await.expect("one").expect("ok");
        let mut buf = [0u8; 8];
        let err = served.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// Over TLS the deadline starts once the handshake is done: a client that completes its
    /// handshake and then sends nothing is closed (it held its slot until it went away, because
    /// the handshake's bytes met the deadline), and its connection has keepalive too.
    #[tokio::test]
    async fn a_tls_connection_that_sends_nothing_after_its_handshake_times_out() {
        use std::sync::Arc;
        use syft_tls::rustls;
        use tokio::io::AsyncReadExt;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let server =
            syft_tls::ServerTls::from_pem(cert.cert.pem(), cert.signing_key.serialize_pem())
                .expect("server tls");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let within = Duration::from_millis(300);
        let rustls = server.rustls().expect("rustls");
        let mut incoming = Box::pin(tls_incoming(listener, rustls, 1, within).expect("incoming"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        // The handshake takes longer than the deadline: it is not what the deadline counts.
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(within * 2).await;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let _client = connector.connect(name, tcp).await.expect("handshake");
        let mut served = incoming.next().await.expect("one").expect("ok");
        let Either::Right(tls) = served.get_ref() else {
            panic!("a TLS connection");
        };
        assert!(SockRef::from(tls.get_ref().0).keepalive().expect("read"));
        let started = std::time::Instant::now();
        let mut buf = [0u8; 8];
        let err = served.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= within / 2, "{:?}", started.elapsed());
    }
}
