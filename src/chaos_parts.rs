//! The moving parts of `bench chaos`: ledger and router child processes that can be killed,
//! paused and restarted on the same address, a faulty in-process upstream, and a tiny random
//! source (reproducible from `--seed`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use tokio::net::TcpListener;

/// xorshift64*: enough to choose faults and request kinds, and reproducible.
pub(crate) struct Rng(u64);

/// The flags of both crash tests (`bench chaos`, `bench spool`).
#[derive(clap::Args, Debug, Clone)]
pub struct CrashRun {
    #[command(flatten)]
    pub server: crate::bench::BenchServer,
    /// Random seed (default: from the clock); printed, so a run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the totals as one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl CrashRun {
    /// `--seed`, or one from the clock (the caller prints it, so a run can be repeated).
    pub(crate) fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
    }

    /// Prints a crash test's totals (one JSON object with `--json`; else `summary` and each of
    /// `problems`), and fails with `failure` unless they are `clean`.
    pub(crate) fn report<T: serde::Serialize>(
        &self,
        totals: &T,
        summary: &str,
        problems: &[String],
        clean: bool,
        failure: &str,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(totals)?);
        } else {
            println!("{summary}");
            for p in problems {
                println!("  problem: {p}");
            }
        }
        anyhow::ensure!(clean, "{failure}");
        Ok(())
    }
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi` (`lo` when empty).
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next() % (hi - lo)
    }

    pub(crate) fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// True with probability `percent`/100.
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }
}

/// A free TCP port on 127.0.0.1 (a restarted process binds the same one again).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One `syft-router` child process: started with `args`, serving gRPC on `port`.
pub(crate) struct Proc {
    pub(crate) name: String,
    args: Vec<String>,
    pub(crate) port: u16,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl Proc {
    fn new(name: &str, args: Vec<String>, port: u16, dir: &Path) -> Self {
        Proc {
            name: name.to_string(),
            args,
            port,
            log: dir.join(format!("{name}.log")),
            child: None,
            stopped: false,
        }
    }

    /// Starts `syft-router args…` on a free gRPC port (HTTP on any port, 1 s shutdown grace).
    pub(crate) async fn spawn(name: &str, args: &[&str], dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend([
            "--shutdown-grace".to_string(),
            "1s".into(),
            "--grpc-addr".into(),
            format!("127.0.0.1:{port}"),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
        ]);
        let mut p = Proc::new(name, args, port, dir);
        p.start().await?;
        Ok(p)
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until its gRPC port accepts (30 s at most).
    pub(crate) async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.name))?;
        self.child = Some(child);
        self.stopped = false;
        for _ in 0..600 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                anyhow::bail!(
                    "{} exited during start ({status}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("{} did not start; see {}", self.name, self.log.display())
    }

    /// `kill -9`: no shutdown, no flush, connections reset.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    /// SIGSTOP (`pause = true`) or SIGCONT: the process holds its sockets but answers nothing.
    pub(crate) fn signal_pause(&mut self, pause: bool) {
        let Some(c) = &self.child else { return };
        let sig = if pause { "-STOP" } else { "-CONT" };
        let _ = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status();
        self.stopped = pause;
    }

    /// Back to running: continued if paused, restarted if dead.
    pub(crate) async fn ensure_running(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            self.signal_pause(false);
        }
        let dead = match &mut self.child {
            None => true,
            Some(c) => c.try_wait().ok().flatten().is_some(),
        };
        if dead {
            self.child = None;
            self.start().await?;
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.stopped {
            self.signal_pause(false);
        }
        self.kill();
    }
}

/// The text every answer has (streams send it in chunks).
pub(crate) const ANSWER: &str = "chaos answer: the quick brown fox jumps over the lazy dog";

/// An OpenAI-compatible upstream that misbehaves at random: transient 503s (the router retries
/// them), slow answers, and streams that stop half-way. Returns its base URL.
pub(crate) async fn start_faulty_upstream(seed: u64) -> anyhow::Result<String> {
    use axum::routing::post;
    let rng = std::sync::Arc::new(std::sync::Mutex::new(Rng::new(seed)));
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let rng = rng.clone();
            async move {
                let (fault, delay, cut) = match rng.lock() {
                    Ok(mut r) => (r.chance(8), r.chance(15).then(|| r.ms(200, 1200)), r.chance(5)),
                    Err(_) => (false, None, false),
                };
                if fault {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response();
                }
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                if body["stream"].as_bool() == Some(true) {
                    return sse(cut);
                }
                axum::Json(serde_json::json!({
                    "id": "chatcmpl-chaos", "object": "chat.completion", "created": 0, "model": "chaos",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}
                }))
                .into_response()
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// The answer as server-sent events, one word per chunk 20 ms apart; `cut`: the connection
/// breaks after three chunks (an upstream that died).
fn sse(cut: bool) -> Response {
    let words: Vec<String> = ANSWER.split_inclusive(' ').map(str::to_string).collect();
    let n = words.len();
    let chunks = futures::stream::iter(words.into_iter().enumerate())
        .then(|(i, w)| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            (i, w)
        })
        .map(move |(i, w)| {
            if cut && i == 3 {
                // An upstream that dies mid-answer: the connection breaks.
                return Err(std::io::Error::other("upstream died"));
            }
            let mut ev = serde_json::json!({"id": "chatcmpl-chaos", "object": "chat.completion.chunk",
                "created": 0, "model": "chaos",
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
            let mut text = format!("data: {ev}\n\n");
            if i + 1 == n {
                ev["choices"] = serde_json::json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]);
                ev["usage"] = serde_json::json!({"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22});
                text.push_str(&format!("data: {ev}\n\ndata: [DONE]\n\n"));
            }
            Ok(text)
        })
        .take_while({
            let mut failed = false;
            move |item| {
                let go = !failed;
                failed |= item.is_err();
                std::future::ready(go)
            }
        });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
