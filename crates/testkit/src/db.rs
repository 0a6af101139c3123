//! A database for one test: a fresh SQLite file, or a fresh database on the Postgres server of
//! `DATABASE_URL`.

use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::Connection;

/// `DATABASE_URL` when it names a Postgres server, or `None` with a `SKIPPED` line
/// ([`crate::skipped`]).
pub fn postgres_url() -> Option<String> {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        crate::skipped(crate::Need::Postgres, "DATABASE_URL is not set");
        return None;
    };
    if !url.starts_with("postgres") {
        crate::skipped(crate::Need::Postgres, "DATABASE_URL is not a Postgres URL");
        return None;
    }
    Some(url)
}

/// Runs a `syft-router bench … --json` command (`bin` with `args`) on the Postgres server `db`:
/// its output, and the totals it printed as one JSON object (panics with the output without).
pub fn bench_totals(
    bin: &str,
    args: &[&str],
    db: &str,
) -> (std::process::Output, serde_json::Value) {
    let out = std::process::Command::new(bin)
        .args(args)
        .env("DATABASE_URL", db)
        .output()
        .expect("run the bench command");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let totals = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        panic!("no totals ({e}):\n{stdout}\n{stderr}")
    });
    eprintln!("{totals}");
    (out, totals)
}

/// Asserts that a crash test's totals found nothing wrong: each of `must_be_zero` is 0 and the
/// `problems` list is empty.
pub fn assert_no_problems(totals: &serde_json::Value, must_be_zero: &[&str]) {
    for key in must_be_zero {
        assert_eq!(totals[key], 0, "{key}: {totals}");
    }
    assert_eq!(
        totals["problems"].as_array().map(Vec::len),
        Some(0),
        "{totals}"
    );
}

pub struct Db {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// (server URL, database name) of a Postgres database created for the test.
    pg: Option<(String, String)>,
    /// Set once the Postgres database is dropped; until then dropping the value drops it (a test
    /// that failed before its `finish` left its database behind on the server).
    dropped: AtomicBool,
}

impl Db {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("ledger.db").display()
        );
        Db {
            url,
            _dir: Some(dir),
            pg: None,
            dropped: AtomicBool::new(false),
        }
    }

    /// A fresh Postgres database, or `None` with a `SKIPPED: …` line ([`crate::skipped`])
    /// when `DATABASE_URL` does not name a Postgres server.
    pub async fn postgres() -> Option<Self> {
        let base = postgres_url()?;
        let name = format!("syft_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let (prefix, query) = match base.split_once('?') {
            Some((p, q)) => (p.to_string(), format!("?{q}")),
            None => (base.clone(), String::new()),
        };
        let root = match prefix.rfind('/') {
            Some(i) if i > "postgres://".len() => prefix[..i].to_string(),
            _ => prefix.clone(),
        };
        Some(Db {
            url: format!("{root}/{name}{query}"),
            _dir: None,
            pg: Some((base, name)),
            dropped: AtomicBool::new(false),
        })
    }

    /// SQLite, or Postgres (`None` when it is not available).
    pub async fn fresh(postgres: bool) -> Option<Self> {
        if postgres {
            Self::postgres().await
        } else {
            Some(Self::sqlite())
        }
    }

    /// A scenario's end: `verify` through `store` (a store of this database's), the store
    /// closed, the database dropped (Postgres).
    pub async fn finish(&self, store: &syft_ledger::Store) {
        crate::assert_consistent(store).await;
        store.close().await;
        self.drop_postgres().await;
    }

    /// Drops a Postgres test database (best effort; SQLite files go with the value).
    pub async fn drop_postgres(&self) {
        let Some((base, name)) = &self.pg else { return };
        if self.dropped.swap(true, Ordering::SeqCst) {
            return;
        }
        drop_database(base, name).await;
    }
}

async fn drop_database(base: &str, name: &str) {
    let result = match sqlx::PgConnection::connect(base).await {
        Ok(mut conn) => sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("could not drop test database {name}: {e}");
    }
}

impl Drop for Db {
    /// A test that panicked (or returned) before its `finish`: the database is dropped from a
    /// thread of its own, since the test's runtime may be the one unwinding.
    fn drop(&mut self) {
        let Some((base, name)) = self.pg.clone() else {
            return;
        };
        if self.dropped.swap(true, Ordering::SeqCst) {
            return;
        }
        let dropping =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(drop_database(&base, &name)),
                    Err(e) => eprintln!("could not drop test database {name}: {e}"),
                }
            });
        let _ = dropping.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test that ends without `finish` (a failed assertion's unwinding, an early return) leaves
    /// no database behind on the server.
    #[tokio::test]
    async fn a_database_left_without_finish_is_dropped() {
        let Some(db) = Db::postgres().await else {
            return;
        };
        let (base, name) = db.pg.clone().expect("a Postgres database");
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .expect("connect to DATABASE_URL");
        let exists = "SELECT COUNT(*) FROM pg_database WHERE datname = $1";
        let count = sqlx::query_scalar::<_, i64>(exists).bind(&name);
        assert_eq!(count.fetch_one(&mut conn).await.expect("count"), 1);
        drop(db);
        let count = sqlx::query_scalar::<_, i64>(exists).bind(&name);
        assert_eq!(count.fetch_one(&mut conn).await.expect("count"), 0);
    }
}
