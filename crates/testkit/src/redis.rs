//! Redis for the limiter's tests: a server of a test's own that can be paused or restarted, and a
//! relay in front of one whose connections can be made to go silent.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::free_port;

/// Whether a Redis answers at `url` (tests that need one print SKIPPED otherwise).
pub async fn redis_up(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let conn = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await;
    matches!(conn, Ok(Ok(_)))
}

/// Whether the shared Redis at `url` answers, asked up to five times over a second: a test that
/// skips without one fails in CI instead (`skip.rs`), so one slow answer on a loaded machine must
/// not read as no Redis.
pub async fn shared_redis_answers(url: &str) -> bool {
    for _ in 0..5 {
        if redis_up(url).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Waits for `child` off the runtime; whether it exited successfully.
pub async fn exited_ok(mut child: Child) -> bool {
    let status = tokio::task::spawn_blocking(move || child.wait()).await;
    matches!(status, Ok(Ok(s)) if s.success())
}

/// A Redis of a test's own, on a free port; killed on drop.
pub struct OwnRedis {
    child: Child,
    pub url: String,
    pub port: u16,
}

impl OwnRedis {
    /// `None` without a `redis-server` that starts. Tried on three ports: the free port can be
    /// taken by another test between its choice and the server's bind, and CI requires these
    /// tests to run (`skip.rs`), so a lost race is tried again rather than skipped.
    pub async fn start() -> Option<Self> {
        for _ in 0..3 {
            let port = free_port();
            let child = spawn_redis(port)?;
            let url = format!("redis://127.0.0.1:{port}");
            let me = OwnRedis { child, url, port };
            if me.up().await {
                return Some(me);
            }
        }
        None
    }

    /// Started again on its port after [`OwnRedis::kill`] (empty: it keeps nothing); whether it
    /// answers.
    pub async fn restart(&mut self) -> bool {
        self.kill();
        match spawn_redis(self.port) {
            Some(child) => self.child = child,
            None => return false,
        }
        self.up().await
    }

    async fn up(&self) -> bool {
        for _ in 0..50 {
            if redis_up(&self.url).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Runs `redis-cli` against this Redis to its end, off the runtime; `false` without one (a
    /// command that fails fails the test).
    pub async fn cli(&self, args: &[&str]) -> bool {
        let Ok(child) = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
        else {
            return false;
        };
        assert!(exited_ok(child).await, "redis-cli {args:?} failed");
        true
    }

    /// Holds every client's commands for `ms` (they queue, unanswered, and run after it, in
    /// order): a store too slow to answer, begun before this returns.
    pub async fn pause(&self, ms: u64) -> bool {
        self.cli(&["CLIENT", "PAUSE", &ms.to_string()]).await
    }

    /// Its scripts flushed, as by a restart, and paused for 2 s (longer than a check of the
    /// limiter tests waits); `false` (SKIPPED printed) without `redis-cli`.
    pub async fn restarted_and_paused(&self) -> bool {
        let done = self.cli(&["SCRIPT", "FLUSH"]).await && self.pause(2_000).await;
        if !done {
            crate::skipped(crate::Need::RedisCli, "no redis-cli");
        }
        done
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` on `port` that keeps nothing on disk.
fn spawn_redis(port: u16) -> Option<Child> {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// A TCP relay in front of a server whose connections can be made to go silent: what either side
/// sends on them vanishes while both sockets stay open, as on a network path that died without a
/// word (a peer host gone, a NAT that dropped the flow; this machine's kernel cannot drop packets
/// on demand). Connections made later are relayed as usual. Stops on drop.
pub struct SilentRelay {
    pub addr: SocketAddr,
    /// Connections numbered below this are silent.
    silent_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentRelay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let silent_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (silent, counter) = (Arc::clone(&silent_below), Arc::clone(&next));
        let task = tokio::spawn(async move {
            // Dropped with the accept loop, which aborts every connection's task.
            let mut links = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let id = counter.fetch_add(1, Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                links.spawn(pass(client_read, server_write, id, Arc::clone(&silent)));
                links.spawn(pass(server_read, client_write, id, Arc::clone(&silent)));
            }
        });
        SilentRelay {
            addr,
            silent_below,
            next,
            task,
        }
    }

    /// `redis://` URL of the relay.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Every connection made so far goes silent, for good.
    pub fn silence_existing(&self) {
        let made = self.next.load(Ordering::SeqCst);
        self.silent_below.store(made, Ordering::SeqCst);
    }

    /// How many connections were made through the relay.
    pub fn connections(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }
}

impl Drop for SilentRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while connection `id` is not silent; then reads on and drops it all.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    silent_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if id >= silent_below.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
