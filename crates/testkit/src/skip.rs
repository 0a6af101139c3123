//! Tests that need something of the machine (a Postgres, a Redis, a browser) and may do without
//! it elsewhere. Each says so with a `SKIPPED` line, also appended to the file `SYFT_SKIPPED_LOG`
//! names: the test harness hides a passing test's output, so `.ci/run` counted none of the lines
//! it printed. Where `SYFT_TESTS_REQUIRE` lists what a test needs (`.ci/run` lists what it made
//! available), the test fails instead of skipping.

use std::io::Write;

/// What a test needs of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A Postgres server at `DATABASE_URL`.
    Postgres,
    /// That Postgres serving TLS.
    PostgresTls,
    /// `initdb` and `pg_ctl`, to run a private cluster.
    PostgresCluster,
    /// A Redis at `127.0.0.1:6379`.
    Redis,
    /// A `redis-server` binary, to start one of the test's own.
    RedisServer,
    /// A `redis-cli` binary.
    RedisCli,
    /// `chromedriver` and Chromium.
    Chromedriver,
    /// libfaketime.
    Faketime,
    /// A Docker engine.
    Docker,
    /// The Python test virtualenv.
    Python,
    /// A kernel that leaves connections past a listener's backlog unanswered.
    Backlog,
}

impl Need {
    /// The name `SYFT_TESTS_REQUIRE` lists it by.
    pub const fn as_str(self) -> &'static str {
        match self {
            Need::Postgres => "postgres",
            Need::PostgresTls => "postgres-tls",
            Need::PostgresCluster => "postgres-cluster",
            Need::Redis => "redis",
            Need::RedisServer => "redis-server",
            Need::RedisCli => "redis-cli",
            Need::Chromedriver => "chromedriver",
            Need::Faketime => "faketime",
            Need::Docker => "docker",
            Need::Python => "python",
            Need::Backlog => "backlog",
        }
    }
}

/// Whether `SYFT_TESTS_REQUIRE` lists `need`.
pub fn required(need: Need) -> bool {
    std::env::var("SYFT_TESTS_REQUIRE")
        .is_ok_and(|r| r.split(',').any(|n| n.trim() == need.as_str()))
}

/// The calling test does without `need`, for the reason `why`: says so, or fails where it is
/// required.
pub fn skipped(need: Need, why: impl std::fmt::Display) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let line = format!("SKIPPED ({}) {test}: {why}", need.as_str());
    assert!(
        !required(need),
        "{line}; SYFT_TESTS_REQUIRE lists {}",
        need.as_str()
    );
    eprintln!("{line}");
    if let Ok(path) = std::env::var("SYFT_SKIPPED_LOG") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        // One write per line: lines of tests running at once do not interleave.
        if let Err(e) = file.and_then(|mut f| f.write_all(format!("{line}\n").as_bytes())) {
            eprintln!("cannot append to SYFT_SKIPPED_LOG {path}: {e}");
        }
    }
}
