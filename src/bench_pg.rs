//! Postgres' own hot-row update rate, measured with `pgbench` in the same run as `bench ledger`, so
//! the ledger's pairs/s on one hot recipient can be compared with what Postgres itself does when
//! every transaction updates one row (the ceiling of a design that updates the recipient's row on
//! every capture, which this ledger avoids by journaling credits).

use std::time::Duration;

use anyhow::Context;
use sqlx::Executor;

/// Runs `pgbench` with a custom script (`UPDATE hot SET n = n + 1 WHERE id = 1`, 8 clients,
/// 2 threads) against a throwaway database on `server_url`; returns its tps.
pub async fn hot_row_tps(server_url: &str, duration: Duration) -> anyhow::Result<f64> {
    let db = crate::bench::fresh_db(server_url).await?;
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&db.url).await?;
    conn.execute(
        "CREATE TABLE hot (id INT PRIMARY KEY, n BIGINT NOT NULL); INSERT INTO hot VALUES (1, 0)",
    )
    .await?;
    drop(conn);
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("hot.sql");
    std::fs::write(&script, "UPDATE hot SET n = n + 1 WHERE id = 1;\n")?;
    let (url, secs) = (db.url.clone(), duration.as_secs().max(1).to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("pgbench")
            .args(["-n", "-c", "8", "-j", "2", "-T", &secs, "-f"])
            .arg(&script)
            .arg(&url)
            .output()
    })
    .await?
    .context("run pgbench (install the postgresql client package)")?;
    db.drop_db().await;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_tps(&text).with_context(|| format!("no tps in pgbench output: {text}"))
}

/// `tps = 1234.5 (without initial connection time)` → 1234.5.
fn parse_tps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_tps_line() {
        let out = "latency average = 5.1 ms\ninitial connection time = 3.2 ms\n\
                   tps = 1567.123456 (without initial connection time)\n";
        assert_eq!(super::parse_tps(out), Some(1567.123456));
        assert_eq!(super::parse_tps("nothing"), None);
    }
}
