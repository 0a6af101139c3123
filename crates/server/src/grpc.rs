//! The gRPC listeners' accepted connections: Nagle off, TCP keepalive on, and at most
//! [`MAX_GRPC_CONNECTIONS`] open at once. tonic applies its builder's TCP settings only to a
//! listener it binds itself, not to one handed to `serve_with_incoming`, and it serves every
//! connection it is given: a client opening connections without end took a descriptor each,
//! and one that never sent its HTTP/2 preface held it for ever (`accepted.rs`).

use std::io;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;

use crate::accepted::{Accepted, Slots};

/// Connections one gRPC listener serves at once; past this, new ones wait in the listen backlog.
/// A gRPC client multiplexes its calls over one connection, so this is thousands of clients.
pub const MAX_GRPC_CONNECTIONS: usize = 4096;

/// TCP keepalive of accepted connections: finds peers gone without a word (a NAT that dropped
/// the mapping, a host powered off) below HTTP/2's own pings.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How long a connection may take to send HTTP/2's preface; gRPC clients send it at once. After
/// it, HTTP/2 pings (every 30 s, 10 s to answer) find connections whose peer went away.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted gRPC connections with Nagle's algorithm off (small RPCs must not wait for delayed
/// ACKs), TCP keepalive on, and at most `max_connections` open at once.
pub fn grpc_incoming(
    listener: TcpListener,
    max_connections: usize,
) -> impl Stream<Item = io::Result<Accepted<TcpStream>>> + Send + 'static {
    capped_incoming(listener, max_connections, PREFACE_TIMEOUT)
}

fn capped_incoming(
    listener: TcpListener,
    max_connections: usize,
    preface_timeout: Duration,
) -> impl Stream<Item = io::Result<Accepted<TcpStream>>> + Send + 'static {
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let slots = Slots::new(max_connections, "grpc");
    futures::stream::unfold(
        (incoming, slots),
        move |(mut incoming, mut slots)| async move {
            let slot = slots.take().await?;
            let next = incoming.next().await?;
            let capped = next.map(|io| Accepted::new(io, slot, preface_timeout));
            Some((capped, (incoming, slots)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    #[tokio::test]
    async fn connections_past_the_cap_wait_and_have_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = Box::pin(grpc_incoming(listener, 1));
        let _client1 = TcpStream::connect(addr).await.expect("connect");
        let first = incoming.next().await.expect("one").expect("ok");
        assert!(SockRef::from(first.get_ref()).keepalive().expect("read"));
        assert!(first.get_ref().nodelay().expect("read"));
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
}
