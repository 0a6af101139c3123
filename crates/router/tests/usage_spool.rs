//! The router-local usage spool (issue 16, `ledger.usage_spool`): free answers are released after
//! a local append, the rows reach the ledger in the background, once each; a router answers free
//! requests while the ledger is unreachable and a later router on the same directory ships their
//! rows; two routers never share a directory. Synced (the default) and not synced alike; the sync
//! itself is tested in `crates/router/src/usage_spool.rs`. (The kill -9 version with real processes is
//! `syft-router bench spool`, tests/spool.rs at the workspace root.)

use std::path::Path;
use std::time::Duration;

use syft_router_svc::{Pricing, RouterService};
use syft_testkit::*;

/// A spool in `dir`, synced to disk (the default) or not.
fn spooled(dir: &Path, sync: bool) -> impl FnOnce(&mut syft_router_svc::RouterConfig) + '_ {
    move |c| {
        c.ledger.usage_spool = Some(dir.to_path_buf());
        c.ledger.usage_spool_sync = sync;
        c.shutdown_grace = Duration::from_secs(1);
    }
}

/// A free router of `s` spooling in `spool` whose ledger is a port nothing listens on.
async fn offline_router(s: &Stack, spool: &Path) -> RouterHandle {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let mut config = s.router_config(Pricing::free());
    spooled(spool, true)(&mut config);
    config.ledger.url = closed;
    RouterHandle::start(config).await
}

/// Alice's free rows, by request id, once `n` of them arrived (10 s at most).
async fn rows_once(s: &Stack, n: usize) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        counts.clear();
        for r in s.answered_usage().await {
            if let Some(u) = r.usage {
                *counts.entry(u.request_id).or_default() += 1;
            }
        }
        if counts.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    counts.into_iter().collect()
}

#[tokio::test]
async fn spooled_rows_reach_the_ledger_once_and_the_directory_is_locked() {
    rows_reach_the_ledger_once(true).await;
}

#[tokio::test]
async fn rows_spooled_without_sync_reach_the_ledger_once() {
    rows_reach_the_ledger_once(false).await;
}

async fn rows_reach_the_ledger_once(sync: bool) {
    let dir = docs_dir(&[]); // an empty temporary directory
    let spool = dir.path().join("spool");
    let s = Stack::start_tweaked(Pricing::free(), spooled(&spool, sync)).await;
    let mut c = s.client().await;
    for i in 0..20 {
        let mut req = s.request("hi");
        req.request_id = format!("free-{i}");
        c.chat(req).await.expect("free answer");
    }
    let rows = rows_once(&s, 20).await;
    assert_eq!(rows.len(), 20, "{rows:?}");
    assert!(rows.iter().all(|(_, n)| *n == 1), "{rows:?}");
    // Rows name users: the directory and its files are the router's user's only (they were
    // 0755 and 0644, from the umask).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&spool), 0o700, "the spool directory");
        let files: Vec<_> = std::fs::read_dir(&spool)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        assert!(files.len() >= 3, "{files:?}"); // LOCK, OWNER and a segment at least
        for f in files {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }

    // A second router on the same directory refuses to start.
    let mut config = s.router_config(Pricing::free());
    config.ledger.usage_spool = Some(spool.clone());
    let err = RouterService::new(config)
        .err()
        .expect("the spool is locked");
    assert!(
        err.to_string().contains("in use by another router"),
        "{err}"
    );
}

#[tokio::test]
async fn rows_spooled_while_the_ledger_is_unreachable_ship_from_the_next_router() {
    let dir = docs_dir(&[]); // an empty temporary directory
    let spool = dir.path().join("spool");
    let s = Stack::start(Pricing::free()).await;
    // A router whose ledger is a port nothing listens on: free answers still come at once.
    let offline = offline_router(&s, &spool).await;
    let mut c = offline.client().await;
    for i in 0..5 {
        let mut req = s.request("hi");
        req.request_id = format!("offline-{i}");
        let started = std::time::Instant::now();
        c.chat(req).await.expect("free answer without a ledger");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // The shipper's failed calls are counted, so a spool that cannot ship can be alerted on;
    // every spool event is shown from the start, at zero until it happens (an `increase()` rule
    // sees nothing of a series that does not exist yet).
    let metrics = format!("{}/metrics", offline.http_url);
    let count = |text: &str, event: &str| {
        let series = format!(r#"syft_router_usage_spool_events_total{{event="{event}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let line = "ship_failed ≥ 1";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(&metrics).await.expect("metrics").text().await;
        let text = text.expect("text");
        assert_eq!(count(&text, "row_lost"), Some(0.0), "{text}");
        if count(&text, "ship_failed").is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{line} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut offline = offline;
    offline.shutdown();
    offline.join().await.expect("router stopped");
    assert!(s.answered_usage().await.is_empty());

    // The next router on the directory reaches the ledger and ships the rows left.
    let shipped_from = syft_ledger::store::now_micros();
    let mut config = s.router_config(Pricing::free());
    spooled(&spool, true)(&mut config);
    let _next = RouterHandle::start(config).await;
    let rows = rows_once(&s, 5).await;
    assert_eq!(
        rows,
        (0..5)
            .map(|i| (format!("offline-{i}"), 1))
            .collect::<Vec<_>>()
    );
    // Dated when they were answered, not when they shipped (they used to be).
    for row in s.answered_usage().await {
        assert!(row.created_at_unix_micros < shipped_from, "{row:?}");
    }
}

/// A router started on a spool another router still uses (the one it replaces, draining) waits
/// for it to stop, then serves, and its rows and the old one's reach the ledger once each. It
/// used to exit at once ("in use by another router").
#[tokio::test]
async fn a_router_started_on_a_spool_in_use_waits_for_it() {
    let dir = docs_dir(&[]); // an empty temporary directory
    let spool = dir.path().join("spool");
    let s = Stack::start(Pricing::free()).await;
    let config = || {
        let mut c = s.router_config(Pricing::free());
        spooled(&spool, true)(&mut c);
        c
    };
    let mut old = RouterHandle::start(config()).await;
    let mut c = old.client().await;
    let mut req = s.request("hi");
    req.request_id = "before".into();
    c.chat(req).await.expect("free answer");
    let next = RouterHandle::start(config()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!next.is_finished(), "the next router waits for the spool");
    old.shutdown();
    old.join().await.expect("old router stopped");
    let mut c = next.client().await;
    let mut req = s.request("hi");
    req.request_id = "after".into();
    c.chat(req).await.expect("the next router serves");
    let rows = rows_once(&s, 2).await;
    assert_eq!(rows, [("after".to_string(), 1), ("before".to_string(), 1)]);
}

/// Damage inside a spool file (a page a host crash did not write back with sync off, a flipped
/// bit) loses only the rows it hit: the next router ships every whole row after it, and keeps
/// the file as `.corrupt` for an operator. Until 2026-12-07 damage within the last 256 KiB of a
/// file (the largest record allowed; a row is a few hundred bytes) was taken for a torn tail, and
/// the file deleted with every row after it (here 298 of 300).
#[tokio::test]
async fn damage_inside_a_spool_file_loses_only_the_rows_it_hit() {
    let dir = docs_dir(&[]); // an empty temporary directory
    let spool = dir.path().join("spool");
    let s = Stack::start(Pricing::free()).await;
    let mut offline = offline_router(&s, &spool).await;
    let mut c = offline.client().await;
    for i in 0..300 {
        let mut req = s.request("hi");
        req.request_id = format!("offline-{i}");
        c.chat(req).await.expect("free answer without a ledger");
    }
    offline.shutdown();
    offline.join().await.expect("router stopped");
    // The second record's checksum, flipped: `[len u32][checksum u32][payload]` per record.
    let file = std::fs::read_dir(&spool)
        .expect("spool")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "spool"))
        .expect("a segment");
    let mut bytes = std::fs::read(&file).expect("read");
    let first = 8 + u32::from_le_bytes(bytes[..4].try_into().expect("len")) as usize;
    bytes[first + 4] ^= 0xff;
    std::fs::write(&file, &bytes).expect("damage");

    let mut config = s.router_config(Pricing::free());
    spooled(&spool, true)(&mut config);
    let _next = RouterHandle::start(config).await;
    let rows = rows_once(&s, 299).await;
    let mut want: Vec<_> = (0..300)
        .filter(|i| *i != 1)
        .map(|i| (format!("offline-{i}"), 1))
        .collect();
    want.sort();
    assert_eq!(rows.len(), 299, "rows shipped after the damage");
    assert_eq!(rows, want);
    let kept = file.with_extension("spool.corrupt");
    for _ in 0..100 {
        if kept.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(kept.exists(), "the damaged file is kept for an operator");
}
