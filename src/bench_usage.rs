//! `syft-router bench usage`: usage rows (free requests, refusals) ingested per second through the
//! ledger's group-commit writer (`crates/ledger/src/store/usage_batch.rs`), against a fresh database.
//!
//! Each of `--concurrency` producers records rows one at a time and waits for each to be committed,
//! as the router does for every answer: the figure is acknowledged, durable rows per second. The
//! ledger core is called in-process (no gRPC hop), so this measures the storage path itself; the
//! router benchmark measures the same path end to end (`bench router`, free service).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use syft_error::UsageStatus;
use syft_ledger::store::{Store, UsageInput};
use tokio::sync::Mutex;

use crate::setup::{restore_rollups, verify_ledger};

#[derive(Args, Debug)]
pub struct UsageBench {
    #[command(flatten)]
    server: crate::bench::BenchServer,
    /// Producers, each with one row in flight (a router's concurrent requests).
    #[arg(long, default_value_t = 4_000)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    duration: Duration,
    /// Every n-th row is a refusal (`payment_required`); 0: none.
    #[arg(long, default_value_t = 4)]
    refusal_every: u64,
    /// Maintain the usage rollups while writing (false: measures what they cost; they are
    /// rebuilt from the rows before `verify`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    rollups: bool,
}

/// The target for acknowledged usage rows per second on the 2-core benchmark machine.
const TARGET_ROWS_PER_S: f64 = 50_000.0;

pub async fn run(b: &UsageBench) -> anyhow::Result<()> {
    let db = b.server.fresh_db().await?;
    syft_ledger::store::rollup::set_enabled(b.rollups);
    let store = Arc::new(Store::connect(&db.url, 8).await?);
    let recipient = store
        .create_account("router@bench.example", "bench", "USD", "-")
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        2,
    )?));
    let mut producers = Vec::new();
    for _ in 0..b.concurrency.max(1) {
        let (store, stop, measuring, rows, errors, next, latency) = (
            store.clone(),
            stop.clone(),
            measuring.clone(),
            rows.clone(),
            errors.clone(),
            next.clone(),
            latency.clone(),
        );
        let (recipient, refusal_every) = (recipient.identity(), b.refusal_every);
        producers.push(tokio::spawn(async move {
            // Two significant digits up to 10 minutes: a few kB per producer, not hundreds.
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2).expect("histogram");
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let status = if refusal_every > 0 && n % refusal_every == 0 {
                    UsageStatus::PaymentRequired
                } else {
                    UsageStatus::Success
                };
                let usage = UsageInput {
                    request_id: format!("req-{n}"),
                    app_name: "bench".into(),
                    endpoint: "/chat".into(),
                    user_email: format!("user{}@bench.example", n % 1000),
                    model: "echo".into(),
                    prompt_tokens: 12,
                    completion_tokens: 6,
                    total_tokens: 18,
                    status: status.as_str().into(),
                    latency_ms: 1,
                    upstream_latency_ms: 0,
                    ttft_ms: None,
                    // As a router sends them: a refusal with a key of its own.
                    row_key: if status.is_refusal() {
                        format!("refusal-{n}")
                    } else {
                        String::new()
                    },
                    // As a router sends them: a refusal with its reason.
                    reason: if status.is_refusal() {
                        "RATE_LIMITED".into()
                    } else {
                        String::new()
                    },
                };
                let t0 = Instant::now();
                let r = store.record_usage(&recipient, &usage, None).await;
                if r.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                } else if measuring.load(Ordering::Relaxed) {
                    rows.fetch_add(1, Ordering::Relaxed);
                    let _ = h.record(t0.elapsed().as_micros() as u64);
                }
            }
            let _ = latency.lock().await.add(&h);
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(b.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await?;
    }
    let done = rows.load(Ordering::Relaxed);
    let rate = done as f64 / elapsed;
    let h = latency.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "usage bench backend={} producers={} rollups={} duration={elapsed:.1}s: {rate:.0} rows/s \
         acknowledged after commit ({done} rows, {} errors); per-row wait p50 {:.2} ms p99 {:.2} ms",
        if db.url.starts_with("postgres") { "postgres" } else { "sqlite" },
        b.concurrency,
        b.rollups,
        errors.load(Ordering::Relaxed),
        ms(0.5),
        ms(0.99),
    );
    println!(
        "  target >= {TARGET_ROWS_PER_S:.0} rows/s: {} ({:.2}x)",
        if rate >= TARGET_ROWS_PER_S {
            "met"
        } else {
            "NOT met"
        },
        rate / TARGET_ROWS_PER_S
    );
    drop(h);
    if let Ok(store) = Arc::try_unwrap(store) {
        store.close().await;
    }
    restore_rollups(&db.url, b.rollups).await?;
    let report = verify_ledger(&db.url).await?;
    println!("  verify: ok ({} transfers)", report.transfers);
    db.drop_db().await;
    Ok(())
}
