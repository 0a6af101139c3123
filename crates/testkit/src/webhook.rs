//! A webhook receiver in-process on 127.0.0.1:0: a real HTTP/1.1 server (raw sockets, so it can
//! also drop a connection mid-request, which a framework would not let a handler do) that checks
//! every request's Standard Webhooks signature with its own HMAC code and answers as scripted:
//! 200, any status (with `Retry-After`), hang past the sender's timeout, or drop the connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Status(u16),
    /// A status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Never answers (the sender times out).
    Hang,
    /// Closes the connection without an answer.
    Drop,
    /// A status with this body.
    Body(u16, &'static str),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub headers: HashMap<String, String>,
    pub body: String,
    /// A `v1,` signature matched one of the receiver's secrets.
    pub valid: bool,
    pub reply: Reply,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }

    pub fn event_type(&self) -> String {
        self.json()["type"].as_str().unwrap_or_default().to_string()
    }
}

#[derive(Default)]
struct State {
    secrets: Vec<String>,
    script: VecDeque<Reply>,
    default: Option<Reply>,
    delay: Duration,
    received: Vec<Received>,
    in_flight: HashMap<String, usize>,
    max_parallel_same_id: usize,
}

#[derive(Clone)]
pub struct WebhookReceiver {
    pub url: String,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, shared.clone()));
            }
        });
        Self { url, state }
    }

    /// Secrets signatures are checked against (any one may match).
    pub fn set_secrets(&self, secrets: &[&str]) {
        lock(&self.state).secrets = secrets.iter().map(|s| s.to_string()).collect();
    }

    /// Answers the next requests with `replies`, in order, then with the default.
    pub fn script(&self, replies: &[Reply]) {
        lock(&self.state).script.extend(replies.iter().copied());
    }

    /// The answer once the script is used up (200 unless set).
    pub fn set_default(&self, reply: Reply) {
        lock(&self.state).default = Some(reply);
    }

    /// Time taken before answering (to make parallel deliveries visible).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    pub fn received(&self) -> Vec<Received> {
        lock(&self.state).received.clone()
    }

    /// The most requests carrying one `webhook-id` that were in flight at the same moment.
    pub fn max_parallel_same_id(&self) -> usize {
        lock(&self.state).max_parallel_same_id
    }

    /// Waits until `pred` holds for what was received (panics after `timeout`).
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if pred(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received: {:#?}",
                received
                    .iter()
                    .map(|r| (&r.id, r.event_type(), r.reply))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether `signature` (space-separated `v1,<b64>` entries) matches any secret.
pub fn signature_matches(
    secrets: &[String],
    id: &str,
    ts: &str,
    body: &str,
    signature: &str,
) -> bool {
    secrets.iter().any(|secret| {
        let Ok(key) = STANDARD.decode(secret.trim_start_matches("whsec_")) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
            return false;
        };
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        signature.split(' ').any(|s| s == expected)
    })
}

async fn serve(mut socket: TcpStream, state: Arc<Mutex<State>>) {
    let Some((headers, body)) = read_request(&mut socket).await else {
        return;
    };
    let get = |name: &str| headers.get(name).cloned().unwrap_or_default();
    let (id, ts, signature) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    );
    let (reply, delay) = {
        let mut s = lock(&state);
        let reply = s.script.pop_front().or(s.default).unwrap_or(Reply::Ok);
        let valid = signature_matches(&s.secrets, &id, &ts, &body, &signature);
        s.received.push(Received {
            id: id.clone(),
            timestamp: ts,
            signature,
            headers: headers.clone(),
            body,
            valid,
            reply,
            at: Instant::now(),
        });
        let n = s.in_flight.entry(id.clone()).or_default();
        *n += 1;
        let n = *n;
        s.max_parallel_same_id = s.max_parallel_same_id.max(n);
        (reply, s.delay)
    };
    tokio::time::sleep(delay).await;
    let answer = match reply {
        Reply::Ok => Some("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string()),
        Reply::Status(code) => Some(format!(
            "HTTP/1.1 {code} X\r\ncontent-length: 4\r\n\r\nfail"
        )),
        Reply::RetryAfter(code, secs) => Some(format!(
            "HTTP/1.1 {code} X\r\nretry-after: {secs}\r\ncontent-length: 0\r\n\r\n"
        )),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            None
        }
        Reply::Drop => None,
        Reply::Body(code, body) => Some(format!(
            "HTTP/1.1 {code} X\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )),
    };
    if let Some(answer) = answer {
        let answer = answer.replacen("\r\n", "\r\nconnection: close\r\n", 1);
        let _ = socket.write_all(answer.as_bytes()).await;
        let _ = socket.shutdown().await;
    }
    if let Some(n) = lock(&state).in_flight.get_mut(&id) {
        *n -= 1;
    }
}

/// Reads one HTTP/1.1 request with a `content-length` body; header names lowercased.
async fn read_request(socket: &mut TcpStream) -> Option<(HashMap<String, String>, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
    Some((headers, body))
}
