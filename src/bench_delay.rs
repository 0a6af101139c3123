//! A TCP relay that delays every byte by a fixed time each way: the benchmarks' stand-in for a
//! database on another host (`--database-delay`). This machine cannot delay packets in the kernel
//! (`tc netem` is not available), and a tokio timer fires on millisecond ticks, so the relay runs
//! on OS threads: a reader per direction stamps each chunk with its due time, and a writer sleeps
//! until then and forwards it. Order is kept, and chunks in flight do not wait for each other, so
//! the delay adds latency, not a bandwidth limit. A benchmark process exits when it is done, so
//! the threads are never stopped.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Starts relaying connections made to the returned address to `target`, each byte `one_way`
/// later in each direction.
pub(crate) fn start(target: SocketAddr, one_way: Duration) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::Builder::new()
        .name("delay-relay".into())
        .spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // A refused connection closes the client's, which then sees the error.
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                if let Err(e) = relay_both(client, server, one_way) {
                    tracing::warn!("delay relay: {e}");
                }
            }
        })?;
    Ok(addr)
}

fn relay_both(client: TcpStream, server: TcpStream, one_way: Duration) -> std::io::Result<()> {
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    relay(client.try_clone()?, server.try_clone()?, one_way)?;
    relay(server, client, one_way)
}

/// Forwards what `from` sends to `to`, `one_way` later; at the end of `from`, ends `to`'s side.
fn relay(mut from: TcpStream, mut to: TcpStream, one_way: Duration) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::Builder::new().spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if tx
                .send((Instant::now() + one_way, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    })?;
    thread::Builder::new().spawn(move || {
        for (due, bytes) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    })?;
    Ok(())
}

/// `url` with its host and port replaced by the relay's, in front of the server it names.
pub(crate) fn through_relay(url: &str, one_way: Duration) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url)?;
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("no host in the database URL"))?;
    let port = parsed.port().unwrap_or(5432);
    let target = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host}:{port} does not resolve"))?;
    let relay = start(target, one_way)?;
    parsed
        .set_ip_host(relay.ip())
        .map_err(|()| anyhow::anyhow!("cannot set the relay's host"))?;
    parsed
        .set_port(Some(relay.port()))
        .map_err(|()| anyhow::anyhow!("cannot set the relay's port"))?;
    Ok(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes arrive in order, intact, and no sooner than the delay each way.
    #[test]
    fn the_relay_delays_each_way_and_keeps_the_bytes() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = echo.local_addr().expect("addr");
        thread::spawn(move || {
            if let Ok((mut s, _)) = echo.accept() {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    let _ = s.write_all(&buf[..n]);
                }
            }
        });
        let delay = Duration::from_millis(20);
        let relay = start(target, delay).expect("relay");
        let mut c = TcpStream::connect(relay).expect("connect");
        let started = Instant::now();
        let sent: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let writer = {
            let mut c = c.try_clone().expect("clone");
            let sent = sent.clone();
            thread::spawn(move || c.write_all(&sent))
        };
        let mut got = vec![0u8; sent.len()];
        c.read_exact(&mut got).expect("read");
        writer.join().expect("join").expect("write");
        assert_eq!(got, sent);
        assert!(started.elapsed() >= 2 * delay, "{:?}", started.elapsed());
    }
}
