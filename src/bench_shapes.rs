//! The shapes of issue 16, over the OpenAI HTTP front (as users call it), each closed loop for
//! `--duration`, then the ratios the issue sets as targets:
//!
//! - paid, by payer count (`--payers`, 1 and 64): one busy payer must not be serialised;
//! - free service with the ledger (a usage row per request), with a usage spool (synced to disk
//!   and not) and with no ledger reachable: the usage row's cost;
//! - paid and free with one client: the latency a paid request adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use syft_router_svc::Pricing;
use tokio::sync::Mutex;

use crate::bench_router::{
    start_configured, start_router, RouterBench, RouterTask, User, OWNER, PAID_PRICE,
};

pub(crate) struct Shapes {
    pub ledger_url: String,
    pub owner_secret: String,
    pub upstream_url: String,
    pub paid_http_url: String,
    pub users: Arc<Vec<User>>,
    /// The spooled free router's usage spool (lives as long as the routers).
    pub spool_dir: tempfile::TempDir,
}

/// One closed-loop run.
struct Measured {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
}

/// Who sends: a paid request of one of the first `payers` users, or a free one.
#[derive(Clone)]
struct Sender {
    http: reqwest::Client,
    url: String,
    users: Arc<Vec<User>>,
    payers: usize,
    paid: bool,
    counter: Arc<AtomicU64>,
}

impl Sender {
    async fn send(&self) -> bool {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let user = &self.users[(n % self.payers.clamp(1, self.users.len()) as u64) as usize];
        let body = serde_json::json!({"model": "bench", "user": user.email, "max_tokens": 32,
            "messages": [{"role": "user", "content": "hello there"}]});
        let mut req = self
            .http
            .post(&self.url)
            .header("Idempotency-Key", format!("shape-{n}"))
            .json(&body);
        if self.paid {
            req = req.bearer_auth(&user.token);
        }
        match req.send().await {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        }
    }
}

async fn closed_loop(sender: &Sender, clients: usize, duration: Duration) -> Measured {
    let warm_until = Instant::now() + Duration::from_secs(1);
    let deadline = warm_until + duration;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new(3).expect("3 significant figures are valid"),
    ));
    let mut workers = Vec::new();
    for _ in 0..clients.max(1) {
        let (sender, ok, failed, hist) = (sender.clone(), ok.clone(), failed.clone(), hist.clone());
        workers.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("3 significant figures are valid");
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let good = sender.send().await;
                if t0 < warm_until {
                    continue;
                }
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                    let _ = h.record(t0.elapsed().as_micros() as u64);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = hist.lock().await.add(&h);
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let h = hist.lock().await;
    Measured {
        rps: ok.load(Ordering::Relaxed) as f64 / duration.as_secs_f64(),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        failed: failed.load(Ordering::Relaxed),
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

impl Shapes {
    /// Runs every shape and prints a table and the ratios; returns the extra routers it started
    /// (they stop with `signal`).
    pub async fn run<F, Fut>(&self, b: &RouterBench, signal: F) -> anyhow::Result<Vec<RouterTask>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (_, free_url, free_router) = start_router(
            Pricing::free(),
            Default::default(),
            &self.ledger_url,
            &self.owner_secret,
            &self.upstream_url,
            None,
            signal(),
        )
        .await?;
        // The same free router with a local usage spool (`ledger.usage_spool`): answers are
        // released once the row is appended locally (and synced, by default), rows ship in the
        // background.
        let synced = self.start_spooled("synced", true, signal()).await?;
        let unsynced = self.start_spooled("unsynced", false, signal()).await?;
        // A port nothing listens on: the free router answers without recording usage.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            format!("http://{}", l.local_addr()?)
        };
        let (_, no_ledger_url, no_ledger_router) = start_router(
            Pricing::free(),
            Default::default(),
            &closed,
            &self.owner_secret,
            &self.upstream_url,
            None,
            signal(),
        )
        .await?;
        let counter = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let sender = |url: &str, payers: usize, paid: bool| Sender {
            http: http.clone(),
            url: url.to_string(),
            users: self.users.clone(),
            payers,
            paid,
            counter: counter.clone(),
        };
        let c = b.concurrency;
        println!(
            "shapes over HTTP, {:.0}s each after 1 s warm-up:",
            b.duration.as_secs_f64()
        );
        let row = |name: String, m: &Measured| {
            println!(
                "  {name:<38} {:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} failed)",
                m.rps, m.p50_ms, m.p99_ms, m.failed
            );
        };
        let mut paid = Vec::new();
        for &payers in &b.payers {
            let m = closed_loop(&sender(&self.paid_http_url, payers, true), c, b.duration).await;
            row(format!("paid, {payers} payer(s), c={c}"), &m);
            paid.push((payers, m));
        }
        let free = closed_loop(&sender(&free_url, 64, false), c, b.duration).await;
        row(format!("free (usage row only), c={c}"), &free);
        let mut spooled = Vec::new();
        for (label, (url, service, _)) in [("synced", &synced), ("not synced", &unsynced)] {
            let m = closed_loop(&sender(url, 64, false), c, b.duration).await;
            row(format!("free, usage spool ({label}), c={c}"), &m);
            // The spooled rows still shipping must not slow the next shape down.
            let t0 = Instant::now();
            let drained = service.drain_usage_spool(Duration::from_secs(60)).await;
            println!(
                "  (spool {} {:.0} ms after the spooled run)",
                if drained { "empty" } else { "NOT empty" },
                t0.elapsed().as_secs_f64() * 1000.0
            );
            spooled.push((label, m));
        }
        let no_ledger = closed_loop(&sender(&no_ledger_url, 64, false), c, b.duration).await;
        row(format!("free, no ledger reachable, c={c}"), &no_ledger);
        // (paid, free) at c=1, per round; the order flips every round.
        let mut rounds = Vec::new();
        for round in 0..b.latency_rounds.max(1) {
            let paid_sender = sender(&self.paid_http_url, 64, true);
            let free_sender = sender(&free_url, 64, false);
            let (paid_one, free_one) = if round % 2 == 0 {
                let p = closed_loop(&paid_sender, 1, b.duration).await;
                (p, closed_loop(&free_sender, 1, b.duration).await)
            } else {
                let f = closed_loop(&free_sender, 1, b.duration).await;
                (closed_loop(&paid_sender, 1, b.duration).await, f)
            };
            row(
                format!("paid, one client (c=1), round {}", round + 1),
                &paid_one,
            );
            row(
                format!("free, one client (c=1), round {}", round + 1),
                &free_one,
            );
            rounds.push((paid_one, free_one));
        }

        println!("ratios (targets of issue 16):");
        let by = |n: usize| paid.iter().find(|(p, _)| *p == n).map(|(_, m)| m.rps);
        if let (Some(one), Some(many)) = (by(1), by(64)) {
            let r = one / many;
            println!(
                "  one payer / 64 payers: {r:.2} (>= 0.8: {})",
                verdict(r >= 0.8)
            );
        }
        let r = free.rps / no_ledger.rps;
        println!(
            "  free with ledger / without: {r:.2} (>= 0.7: {})",
            verdict(r >= 0.7)
        );
        for (label, m) in &spooled {
            let r = m.rps / no_ledger.rps;
            println!(
                "  free with ledger and usage spool ({label}) / without ledger: {r:.2} (>= 0.7: {})",
                verdict(r >= 0.7)
            );
        }
        if let Some(many) = by(64) {
            let r = many / free.rps;
            println!(
                "  paid (64 payers) / free: {r:.2} (>= 0.5: {})",
                verdict(r >= 0.5)
            );
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let p50 = median(rounds.iter().map(|(p, f)| p.p50_ms - f.p50_ms).collect());
        let p99 = median(rounds.iter().map(|(p, f)| p.p99_ms - f.p99_ms).collect());
        let free_p50 = median(rounds.iter().map(|(_, f)| f.p50_ms).collect());
        println!(
            "  paid - free at c=1 (median of {} round(s), free p50 {free_p50:.2} ms): p50 {p50:+.2} ms \
             (<= 1.5 ms: {}), p99 {p99:+.2} ms (<= 5 ms: {})",
            rounds.len(),
            verdict(p50 <= 1.5),
            verdict(p99 <= 5.0)
        );
        if let Some(rss) = peak_rss_mb() {
            println!("  peak RSS of this process (client, routers, ledger together): {rss:.0} MB");
        }
        Ok(vec![free_router, synced.2, unsynced.2, no_ledger_router])
    }

    /// A free router with a usage spool in `spool_dir/<name>`, `sync` or not
    /// (`ledger.usage_spool_sync`): its chat URL, its service (to drain the spool) and its task.
    async fn start_spooled<S>(
        &self,
        name: &str,
        sync: bool,
        signal: S,
    ) -> anyhow::Result<(String, syft_router_svc::RouterService, RouterTask)>
    where
        S: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut config = syft_router_svc::RouterConfig::new(format!("bench-spool-{name}"), OWNER)
            .with_chat_pricing(Pricing::free());
        config.ledger.usage_spool = Some(self.spool_dir.path().join(name));
        config.ledger.usage_spool_sync = sync;
        config.ledger.url = self.ledger_url.clone();
        config.ledger.secret = self.owner_secret.clone().into();
        config.upstream = syft_router_svc::UpstreamConfig::OpenAi(
            syft_router_svc::OpenAiConfig::new(self.upstream_url.clone()),
        );
        config.models = vec![syft_router_svc::ANY_MODEL.into()];
        let service = syft_router_svc::RouterService::new(config)?;
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/chat/completions", http.local_addr()?);
        let task = tokio::spawn(service.clone().serve(grpc, http, signal));
        Ok((url, service, task))
    }
}

impl Shapes {
    /// The cost of admission through the limits: `rounds` interleaved rounds (the order flips
    /// each round) of the paid shape at `--concurrency` clients (throughput) and at one client
    /// (p50), against the paid router and against one like it with generous limits of every kind
    /// (never refusing). Prints each run, the medians and the ratios.
    pub async fn compare_limits(
        &self,
        b: &RouterBench,
        rounds: usize,
        signal: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<RouterTask> {
        let config = generous_limits(&b.limits_store)?;
        let (_, limited_url, limited_router) = start_configured(
            config,
            &self.ledger_url,
            &self.owner_secret,
            &self.upstream_url,
            signal,
        )
        .await?;
        let counter = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let sender = |url: &str| Sender {
            http: http.clone(),
            url: url.to_string(),
            users: self.users.clone(),
            payers: 64,
            paid: true,
            counter: counter.clone(),
        };
        let (plain, limited) = (sender(&self.paid_http_url), sender(&limited_url));
        let c = b.concurrency;
        println!(
            "limits: paid HTTP, 64 payers, without and with limits (store {}), {rounds} rounds, \
             {:.0}s each after 1 s warm-up:",
            b.limits_store,
            b.duration.as_secs_f64()
        );
        // (throughput at c, p50 at c=1) of each run, per router.
        let mut runs: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let s = if which == 0 { &plain } else { &limited };
                let many = closed_loop(s, c, b.duration).await;
                let one = closed_loop(s, 1, b.duration).await;
                println!(
                    "  round {} {:<14} {:>8.0} req/s at c={c} ({} failed)  p50 at c=1 {:>6.3} ms \
                     ({} failed)",
                    round + 1,
                    if which == 0 {
                        "no limits"
                    } else {
                        "with limits"
                    },
                    many.rps,
                    many.failed,
                    one.p50_ms,
                    one.failed
                );
                runs[which].push((many.rps, one.p50_ms));
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let col = |which: usize, f: fn(&(f64, f64)) -> f64| {
            median(&mut runs[which].iter().map(f).collect::<Vec<_>>())
        };
        let (rps_plain, rps_limited) = (col(0, |r| r.0), col(1, |r| r.0));
        let (p50_plain, p50_limited) = (col(0, |r| r.1), col(1, |r| r.1));
        let ratio = rps_limited / rps_plain;
        let added = p50_limited - p50_plain;
        println!(
            "  medians: {rps_plain:.0} vs {rps_limited:.0} req/s, p50 {p50_plain:.3} vs \
             {p50_limited:.3} ms"
        );
        println!(
            "  with / without limits: throughput {ratio:.3} (>= 0.9: {}), p50 added {added:+.3} ms \
             (<= 0.3 ms: {})",
            verdict(ratio >= 0.9),
            verdict(added <= 0.3)
        );
        Ok(limited_router)
    }
}

/// A paid router like the benchmark's with every kind of limit, generous enough never to refuse:
/// request and token windows, per-user and router-wide concurrency, counted in `store` (`memory`
/// or a Redis URL).
fn generous_limits(store: &str) -> anyhow::Result<syft_router_svc::RouterConfig> {
    use syft_router_svc::config::{LimiterBackend, Rate};
    let mut c = syft_router_svc::RouterConfig::new("bench-limited", OWNER)
        .with_chat_pricing(Pricing::per_request(PAID_PRICE));
    let rate = |r: &str| Rate::parse(r).map_err(anyhow::Error::msg);
    c.rate_limits.requests = vec![rate("1000000000/minute")?, rate("1000000000/day")?];
    c.rate_limits.tokens = vec![rate("1000000000/minute")?];
    c.rate_limits.concurrent = Some(1_000_000);
    c.limiter.max_concurrent_requests = Some(1_000_000);
    if store != "memory" {
        c.limiter.backend = LimiterBackend::Redis { url: store.into() };
    }
    Ok(c)
}

/// `VmHWM` of this process (Linux), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
