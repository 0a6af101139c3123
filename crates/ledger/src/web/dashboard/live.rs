//! Live updates: `GET /dashboard/events`, one server-sent event stream per open page, at most one
//! `usage` event a second carrying the usage rows the caller may see that it has not been sent.
//!
//! What wakes the streams must see rows written by any ledger replica, so it comes from the
//! database, not from this process's writes: one check of the newest usage row every 500 ms per
//! ledger process, only while a page is open, fanned out through a `tokio::sync::broadcast`
//! channel. Not `LISTEN/NOTIFY`: a transaction that notifies takes a database-wide lock for its
//! commit, so notifying from the usage-writing commits serialised every writer's fsync (measured:
//! 3,600 → 200 one-row commits/s with 8 writers; migration 0018 drops that trigger).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::watch;

use super::api::usage_json;
use super::session::Session;
use super::{Dash, DashError};
use crate::auth::Caller;
use crate::error::{LedgerError, Result};
use crate::store::{now_micros, Backend, Store};

/// At most one update a second per page.
const MIN_GAP: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(500);
/// Rows are read back this far before the newest row sent: a row stamped earlier can commit
/// later (group commit), and must not be skipped.
const SLACK_MICROS: i64 = 10_000_000;
const TAIL_PAGE: u32 = 100;
/// Pages a stream reads at most per update (rows beyond that, in one second, are not pushed).
const TAIL_PAGES: usize = 20;
/// A stream looks at its session at least this often, so one signed out or expired on a quiet
/// ledger (no row to wake it) still ends.
const RECHECK: Duration = Duration::from_secs(30);
/// Live streams one account may hold open on one ledger process (a page per browser tab). Each
/// is woken by every committed row and then reads the database: unbounded, one account's
/// thousands of streams tied up the connections that payments use.
pub(crate) const MAX_STREAMS_PER_ACCOUNT: usize = 8;

/// Live streams open per account on this process (`None`: the admin).
#[derive(Default)]
pub(crate) struct OpenStreams(Mutex<HashMap<Option<i64>, usize>>);

/// A stream's place in [`OpenStreams`], given back when the stream ends.
struct StreamSlot {
    streams: Arc<OpenStreams>,
    key: Option<i64>,
}

impl OpenStreams {
    fn take(self: &Arc<Self>, key: Option<i64>) -> Option<StreamSlot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(key).or_default();
        if *n >= MAX_STREAMS_PER_ACCOUNT {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            streams: self.clone(),
            key,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = (self.streams.0)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// This process's fan-out of "usage rows were committed".
pub(crate) struct Hub {
    tx: broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Hub {
    pub fn start(store: Arc<Store>) -> Self {
        let (tx, _) = broadcast::channel(16);
        let task = tokio::spawn(watch(store, tx.clone()));
        Self { tx, task }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.tx.subscribe()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch(store: Arc<Store>, tx: broadcast::Sender<()>) {
    loop {
        // Nothing is watched (no database connection held) until a page subscribes.
        while tx.receiver_count() == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Err(e) = poll(&store, &tx).await {
            tracing::warn!(error = %e, "dashboard live updates: watching usage rows failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The newest usage row (an index lookup: SQLite's rowid, Postgres' primary key), checked every
/// `POLL` while anyone watches. A change wakes the streams, and so does the check `POLL` × 2
/// after it: on Postgres the key is a UUIDv7 chosen before commit, so a row committed just after
/// a newer one need not move the maximum; the streams re-read `SLACK_MICROS` behind what they
/// sent, so that second wake brings it.
async fn poll(store: &Store, tx: &broadcast::Sender<()>) -> Result<()> {
    let sql = match store.backend() {
        Backend::Postgres => "SELECT COALESCE(MAX(id), '') FROM usage_records",
        Backend::Sqlite => "SELECT CAST(COALESCE(MAX(rowid), 0) AS TEXT) FROM usage_records",
    };
    let newest = || async {
        sqlx::query_scalar::<_, String>(sql)
            .fetch_one(store.pool())
            .await
    };
    let mut last = newest().await?;
    // Rows written between a page's subscription and this first read changed nothing `last`
    // will show: the streams look once now.
    let _ = tx.send(());
    let mut trailing = 0u8;
    while tx.receiver_count() > 0 {
        tokio::time::sleep(POLL).await;
        let now = newest().await?;
        if now != last {
            last = now;
            trailing = 2;
            let _ = tx.send(());
        } else if trailing > 0 {
            trailing -= 1;
            if trailing == 0 {
                let _ = tx.send(());
            }
        }
    }
    Ok(())
}

/// One page's stream: what it was sent, and when.
struct Tail {
    d: Dash,
    session: Session,
    rx: broadcast::Receiver<()>,
    ready: watch::Receiver<bool>,
    /// Ids sent with `created_at >= since`.
    seen: HashMap<String, i64>,
    since: i64,
    /// The newest id read: new rows are read from there on.
    last_id: Option<String>,
    last_sent: Option<Instant>,
    /// The first call reads at once: rows written between the page's own load and its
    /// subscription raised their signal before this stream listened.
    look_now: bool,
    _slot: StreamSlot,
}

impl Tail {
    async fn next(&mut self) -> Option<Event> {
        // One deadline for the whole wait: the readiness signal changes every second (health
        // probes), and a sleep started anew after each change never ended, so an expired or
        // signed-out page stayed live as long as nothing was written.
        let mut recheck = tokio::time::Instant::now() + RECHECK;
        loop {
            if !std::mem::take(&mut self.look_now) {
                tokio::select! {
                    signal = self.rx.recv() => match signal {
                        Ok(()) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return None,
                    },
                    // Nothing written for a while: look at the session anyway (below).
                    _ = tokio::time::sleep_until(recheck) => {}
                    // Turned not ready (shutting down): the stream ends and the page reconnects,
                    // to another replica or to this one once it is back.
                    changed = self.ready.changed() => {
                        if changed.is_err() || !*self.ready.borrow_and_update() {
                            return None;
                        }
                        continue;
                    }
                }
            }
            if let Some(last) = self.last_sent {
                tokio::time::sleep(MIN_GAP.saturating_sub(last.elapsed())).await;
            }
            // Signals that came while waiting are answered by the read below.
            while !matches!(
                self.rx.try_recv(),
                Err(TryRecvError::Empty | TryRecvError::Closed)
            ) {}
            // Signed out (here or on another replica) or expired: the stream ends.
            if !self.session.alive(&self.d).await.unwrap_or(false) {
                return None;
            }
            recheck = tokio::time::Instant::now() + RECHECK;
            let rows = match self.fresh().await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard live updates: reading usage failed");
                    continue;
                }
            };
            if rows.is_empty() {
                continue;
            }
            self.last_sent = Some(Instant::now());
            return Event::default()
                .event("usage")
                .json_data(json!({ "rows": rows }))
                .ok();
        }
    }

    /// Rows not sent yet, newest first, by the core's usage rule (the caller's rows only). New
    /// rows are read oldest first from the newest id read so far, page after page (up to
    /// [`TAIL_PAGES`]): the newest page alone dropped the rows under it when more than a page
    /// came between two reads (a router's batch of 150). The last [`SLACK_MICROS`] are read
    /// again, newest first, for rows that committed after newer ones.
    async fn fresh(&mut self) -> Result<Vec<serde_json::Value>> {
        let ledger = &self.d.ledger;
        let caller = &self.session.caller;
        let mut rows = ledger.usage_since(caller, self.since, TAIL_PAGE).await?;
        for _ in 0..TAIL_PAGES {
            let after = self.last_id.as_deref();
            let page = ledger
                .usage_tail(caller, self.since, after, TAIL_PAGE)
                .await?;
            let full = page.len() == TAIL_PAGE as usize;
            if let Some(last) = page.last() {
                self.last_id = Some(last.id.clone());
            }
            rows.extend(page);
            if !full {
                break;
            }
        }
        rows.sort_by(|a, b| b.id.cmp(&a.id));
        let mut out = Vec::new();
        for row in &rows {
            if self.seen.insert(row.id.clone(), id_micros(row)).is_none() {
                out.push(usage_json(row));
            }
        }
        if let Some(newest) = self.seen.values().max() {
            self.since = self.since.max(newest - SLACK_MICROS);
        }
        let since = self.since;
        self.seen.retain(|_, at| *at >= since);
        Ok(out)
    }
}

/// When a row's id was made (UUIDv7 ids start with their millisecond), or its date if later. The
/// stream reads by id, so it remembers what it sent by this time: a row dated before its id (a
/// spooled row that shipped late, dated when it was answered) was forgotten at once and sent
/// again at every read until the window passed its id.
fn id_micros(row: &crate::store::UsageRow) -> i64 {
    uuid::Uuid::parse_str(&row.id)
        .ok()
        .and_then(|id| id.get_timestamp())
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            i64::try_from(secs).unwrap_or(i64::MAX / 2) * 1_000_000 + i64::from(nanos / 1000)
        })
        .map_or(row.created_at, |at| at.max(row.created_at))
}

/// `GET /dashboard/events`: `usage` events with `{"rows": [...]}` (as `/dashboard/api/usage`).
pub(super) async fn events(
    State(d): State<Dash>,
    session: Session,
) -> std::result::Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>, DashError>
{
    let key = match &session.caller {
        Caller::Admin => None,
        Caller::Account(a) => Some(a.id),
    };
    let slot = d.streams.take(key).ok_or_else(|| {
        LedgerError::ResourceExhausted(format!(
            "at most {MAX_STREAMS_PER_ACCOUNT} live streams per account; close a page"
        ))
    })?;
    let tail = Tail {
        rx: d.live.subscribe(),
        ready: d.ready.clone(),
        d,
        session,
        seen: HashMap::new(),
        since: now_micros() - SLACK_MICROS,
        last_id: None,
        last_sent: None,
        look_now: true,
        _slot: slot,
    };
    let stream = futures::stream::unfold(tail, |mut tail| async move {
        let event = tail.next().await?;
        Some((Ok(event), tail))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
