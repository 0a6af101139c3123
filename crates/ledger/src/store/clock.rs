//! The ledger's clock: the "now" a hold is stamped with and judged by, and every other time the
//! store decides by (budget days, a token's 24 hours, analytics ranges, usage rows).
//!
//! On Postgres it is the database's clock, the one every replica shares. Each ledger reads it when
//! it opens the store and every [`REFRESH`], and in between advances the reading by its own
//! monotonic clock. With each replica stamping by its own wall clock and the capture guard also
//! reading the database's, clocks that disagreed moved money: a ledger behind its database placed
//! holds the guard had already expired, and a router, which can only count a hold's life from the
//! ledger's figures, either ended streams early or gave them away uncharged (a time tester,
//! 2026-12-06; docs/operations.md, "Clocks"). Read so, the ledger's wall clock, and any step it
//! takes, decides nothing.
//!
//! On SQLite the database is a file read by this process: its clock is this process's wall clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::AnyPool;
use tokio::sync::oneshot;

use super::{now_micros, Backend};

/// How often a Postgres ledger reads its database's clock again. Between reads only the drift of
/// this host's monotonic clock (NTP slews it; parts per million) separates the two.
const REFRESH: Duration = Duration::from_secs(10);

/// Round trips per reading; the shortest one is kept, its midpoint taken as the moment the
/// database read its clock (off by at most half that round trip).
const SAMPLES: usize = 3;

/// A refresh that takes longer is given up (the last reading stays).
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A later reading replaces the one in use only if its round trip is no worse than twice that
/// one's plus this (a loaded moment's slow reading would be the less exact one), or once the one
/// in use is [`KEEP_AT_MOST`] old.
const ROUND_TRIP_SLACK: Duration = Duration::from_millis(1);
const KEEP_AT_MOST: Duration = Duration::from_secs(60);

/// One reading: its shortest round trip and the database's clock minus the origin's elapsed
/// time at that round trip's midpoint.
struct Reading {
    round_trip: Duration,
    offset: i64,
}

pub(crate) struct Clock {
    /// Postgres only: the database's clock minus [`Shared::origin`]'s elapsed time, in micros.
    shared: Option<Arc<Shared>>,
    /// Stops the refresher when the store is dropped.
    _stop: Option<oneshot::Sender<()>>,
}

struct Shared {
    origin: Instant,
    offset: AtomicI64,
}

impl Shared {
    fn now(&self) -> i64 {
        let elapsed = i64::try_from(self.origin.elapsed().as_micros()).unwrap_or(i64::MAX);
        self.offset.load(Ordering::Relaxed).saturating_add(elapsed)
    }
}

impl Clock {
    /// This process's wall clock (SQLite).
    pub(crate) fn system() -> Self {
        Self {
            shared: None,
            _stop: None,
        }
    }

    /// The database's clock (Postgres), read now and every [`REFRESH`] while the store lives.
    /// A failed reading later keeps the last one (the monotonic clock carries it on).
    pub(crate) async fn database(pool: AnyPool) -> Result<Self, sqlx::Error> {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            offset: AtomicI64::new(0),
        });
        let first = read(&pool, &shared.origin).await?;
        shared.offset.store(first.offset, Ordering::Relaxed);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let refreshed = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut in_use = (first.round_trip, Instant::now());
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tick.tick() => {}
                }
                let reading = tokio::time::timeout(READ_TIMEOUT, read(&pool, &refreshed.origin));
                match reading.await {
                    Ok(Ok(r)) => {
                        let (round_trip, since) = in_use;
                        if r.round_trip <= round_trip * 2 + ROUND_TRIP_SLACK
                            || since.elapsed() >= KEEP_AT_MOST
                        {
                            refreshed.offset.store(r.offset, Ordering::Relaxed);
                            in_use = (r.round_trip, Instant::now());
                        }
                    }
                    Ok(Err(sqlx::Error::PoolClosed)) => return,
                    Ok(Err(e)) => tracing::warn!(error = %e, "reading the database's clock failed"),
                    Err(_) => tracing::warn!("reading the database's clock timed out"),
                }
            }
        });
        Ok(Self {
            shared: Some(shared),
            _stop: Some(stop),
        })
    }

    /// Now, in micros since the Unix epoch.
    pub(crate) fn now(&self) -> i64 {
        self.shared.as_ref().map_or_else(now_micros, |s| s.now())
    }
}

/// Reads the database's clock [`SAMPLES`] times on one connection (taken before timing, so a wait
/// for the pool is no part of a round trip) and keeps the reading of the shortest round trip.
async fn read(pool: &AnyPool, origin: &Instant) -> Result<Reading, sqlx::Error> {
    let sql = format!("SELECT {}", Backend::Postgres.clock_micros_sql());
    let mut conn = pool.acquire().await?;
    let mut best: Option<Reading> = None;
    for _ in 0..SAMPLES {
        let sent = origin.elapsed();
        let database: i64 = sqlx::query_scalar(&sql).fetch_one(&mut *conn).await?;
        let round_trip = origin.elapsed().saturating_sub(sent);
        let midpoint = i64::try_from((sent + round_trip / 2).as_micros()).unwrap_or(i64::MAX);
        let offset = database.saturating_sub(midpoint);
        if best.as_ref().is_none_or(|b| round_trip < b.round_trip) {
            best = Some(Reading { round_trip, offset });
        }
    }
    best.ok_or(sqlx::Error::RowNotFound)
}
