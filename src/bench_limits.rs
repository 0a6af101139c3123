//! `syft-router bench limits`: checks per second of the shared rate limiter alone (the windows of
//! docs/limits.md), without a router or ledger around it. Target: ≥ 20,000 checks/s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use syft_router_svc::limits::{
    now_ms, Limiter, MemoryLimiter, RedisLimiter, Rule, RuleKind, Verdict,
};

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
}

#[derive(Args, Debug)]
pub struct LimitsBench {
    /// Which store to measure (each is measured in turn).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "memory,redis"
    )]
    backend: Vec<Backend>,
    /// Redis for the `redis` backend.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Distinct users (each with a request window, a token window and a concurrency slot).
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Checks in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to measure each backend.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "5s")]
    duration: Duration,
}

/// A request's windows, generous enough never to refuse (the bench measures admissions).
fn rules(run: &str, user: usize) -> Vec<Rule> {
    let rule = |kind, what: &str, window, cost| Rule {
        key: format!("syft:bench:{run}:{what}:{user}"),
        kind,
        scope: "router",
        limit: 1_000_000_000,
        window,
        cost,
        describe: String::new(),
    };
    vec![
        rule(RuleKind::Requests, "req", Duration::from_secs(60), 1),
        rule(RuleKind::Tokens, "tok", Duration::from_secs(60), 500),
        rule(
            RuleKind::Concurrency,
            "inflight",
            Duration::from_secs(600),
            1,
        ),
    ]
}

pub async fn run(b: &LimitsBench) -> anyhow::Result<()> {
    for backend in &b.backend {
        let limiter: Arc<dyn Limiter> = match backend {
            Backend::Memory => Arc::new(MemoryLimiter::new()),
            Backend::Redis => Arc::new(RedisLimiter::new(&b.redis_url, Duration::from_secs(2))?),
        };
        let run = uuid::Uuid::new_v4().simple().to_string();
        let done = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks: Vec<_> = (0..b.concurrency.max(1))
            .map(|t| {
                let (limiter, done, refused, stop, run) = (
                    limiter.clone(),
                    done.clone(),
                    refused.clone(),
                    stop.clone(),
                    run.clone(),
                );
                let users = b.users.max(1);
                tokio::spawn(async move {
                    let mut n = t;
                    while !stop.load(Ordering::Relaxed) {
                        let rules = rules(&run, n % users);
                        let lease = format!("{t}-{n}");
                        // One admission and its release: what a request costs the store.
                        match limiter.acquire(now_ms(), &lease, &rules).await? {
                            Verdict::Admitted(_) => {}
                            Verdict::Refused { .. } => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        let release = [(rules[2].key.clone(), 0)];
                        limiter.settle(&lease, &release).await?;
                        done.fetch_add(1, Ordering::Relaxed);
                        n += STRIDE;
                        // The memory store answers without ever awaiting: without a yield the
                        // tasks would hold both workers forever and the timer that stops the
                        // run would never fire.
                        tokio::task::yield_now().await;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        tokio::time::sleep(b.duration).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        let checks = done.load(Ordering::Relaxed);
        println!(
            "bench limits backend={backend:?} users={} concurrency={} checks={checks} \
             refused={} checks/s={:.0} (target >= 20000)",
            b.users,
            b.concurrency,
            refused.load(Ordering::Relaxed),
            checks as f64 / secs
        );
    }
    Ok(())
}

/// Tasks step through users in prime strides so they rarely meet on one key.
const STRIDE: usize = 7919;
