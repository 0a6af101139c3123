//! The delivery worker: claims due events under a lease, signs and sends them, records every
//! attempt, schedules retries (exponential backoff with jitter, `Retry-After` honoured), gives up
//! after the schedule, and disables endpoints that fail for `disable_after` (telling the account's
//! other endpoints with an `endpoint.disabled` event, in the same transaction).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use super::payload::Fired;
use super::rules::{EventKind, Format};
use super::seal::{signature_header, SealKey};
use super::store::{self as db, Attempt, ClaimedEvent, EndpointRecord, Outcome};
use super::target;
use super::AlertsConfig;
use crate::error::{LedgerError, Result};
use crate::store::{now_micros, Store};

/// Events a worker sends at once. A claim takes no more than the free slots, and each claimed
/// event's send starts at once, so one attempt's lease covers it (see `claim`).
const PARALLEL_SENDS: usize = 8;
/// How often a worker deletes the events past their retention.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// The window of an endpoint's rate cap (`rate_per_minute`).
const RATE_WINDOW_MICROS: i64 = 60_000_000;
/// Bytes of a response read (then dropped); at most this much of an error body is kept.
const RESPONSE_CAP: usize = 1024;
const ERROR_TEXT_CAP: usize = 256;
/// A `Retry-After` longer than this is cut to it (a receiver cannot park an event for a week).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// One delivery worker; `id` names it in leases and in the delivery log.
#[derive(Clone)]
pub struct Worker {
    store: Arc<Store>,
    config: Arc<AlertsConfig>,
    id: String,
}

impl Worker {
    pub fn new(store: Arc<Store>, config: Arc<AlertsConfig>) -> Self {
        let id = format!("worker-{}", uuid::Uuid::new_v4().simple());
        Self { store, config, id }
    }

    /// Delivers due events every `deliver_interval`, forever. Each event is sent in a task of its
    /// own that holds one of [`PARALLEL_SENDS`] slots, and every tick claims as many events as
    /// slots are free: a slow endpoint holds its slot, not the others. (Sent in claimed batches,
    /// each claim waited for its slowest send, up to twice the timeout, before the next.)
    pub async fn run(self) {
        let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL_SENDS));
        let mut tick = tokio::time::interval(self.config.deliver_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut purged_at: Option<Instant> = None;
        loop {
            tick.tick().await;
            if purged_at.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
                purged_at = Some(Instant::now());
                if let Err(e) = self.purge_finished().await {
                    tracing::warn!(error = %e, "old alert events not purged");
                }
            }
            // A full claim may have left more due: claim again at once, not a tick later.
            loop {
                let free = slots.available_permits();
                if free == 0 {
                    break;
                }
                let (claimed, events) = match self.claim(free).await {
                    Ok(claim) => claim,
                    Err(e) => {
                        tracing::warn!(error = %e, "alert delivery round failed");
                        break;
                    }
                };
                for event in events {
                    // Only this loop takes slots, and it claimed no more than were free.
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    let worker = self.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(e) = worker.deliver(&event).await {
                            tracing::warn!(event = %event.id, error = %e, "alert delivery failed");
                        }
                    });
                }
                if claimed < free {
                    break;
                }
            }
        }
    }

    /// Deletes the events finished longer ago than the retention (`purge::RETENTION_MICROS`),
    /// with their attempts; returns how many events.
    pub async fn purge_finished(&self) -> Result<u64> {
        db::purge_finished(self.store.pool(), now_micros()).await
    }

    /// Claims one batch of due events and sends them, returning once every attempt is recorded;
    /// returns how many it claimed (tests that look at each claim).
    pub async fn deliver_due(&self) -> Result<usize> {
        let (claimed, events) = self.claim(PARALLEL_SENDS).await?;
        futures::stream::iter(events)
            .for_each_concurrent(PARALLEL_SENDS, |event| async move {
                if let Err(e) = self.deliver(&event).await {
                    tracing::warn!(event = %event.id, error = %e, "alert delivery failed");
                }
            })
            .await;
        Ok(claimed)
    }

    /// Leases up to `slots` due events (each account's share, `store::ACCOUNT_IN_FLIGHT`) and
    /// returns how many it leased and those its endpoints' rate caps let through now; the sends
    /// must start at once.
    async fn claim(&self, slots: usize) -> Result<(usize, Vec<ClaimedEvent>)> {
        let now = now_micros();
        // The lease outlives one attempt: the lookup and the send (each bounded by the timeout)
        // and the bookkeeping (the margin). A claim takes only as many events as are sent at
        // once, so every attempt of the claim starts now and ends within its lease: two workers
        // never send one event at the same time. (A claim of 32 sent 8 at a time outlived a
        // one-attempt lease against a slow endpoint, and another replica could claim its last
        // events and send them too.) A crashed worker's lease lapses and its events are claimed
        // again.
        let lease = self.config.request_timeout * 2 + Duration::from_secs(5);
        let lease_until = now + lease.as_micros() as i64;
        let limit = i64::try_from(slots).unwrap_or(i64::MAX);
        let events = db::claim_due(&self.store, &self.id, now, lease_until, limit).await?;
        let claimed = events.len();
        Ok((
            claimed,
            self.within_rate_caps(events, (now, lease_until)).await?,
        ))
    }

    /// Keeps the claimed events each endpoint's cap (attempts in the last minute) still allows
    /// and gives the others back, without spending an attempt, for when the endpoint's window
    /// has room again (its oldest attempt in the window is a minute old). Decided for the whole
    /// batch before any send: a batch is sent in parallel, so a check per send would let every
    /// event of a burst through before the first attempt is recorded.
    ///
    /// The rest of a capped endpoint's due backlog is put off to the same moment in one
    /// statement. Postponed a second at a time and one claim at a time, a backlog of thousands
    /// filled every claim of every second with events that could not be sent: other accounts'
    /// events waited behind it, and each of its events was written again every second.
    async fn within_rate_caps(
        &self,
        events: Vec<ClaimedEvent>,
        (now, lease_until): (i64, i64),
    ) -> Result<Vec<ClaimedEvent>> {
        let pool = self.store.pool();
        // Per endpoint: the sends left in its window, and when it has room again.
        let mut room: HashMap<String, (i64, i64)> = HashMap::new();
        let mut capped: HashMap<String, i64> = HashMap::new();
        let mut allowed = Vec::with_capacity(events.len());
        for event in events {
            let (left, free_at) = match room.get_mut(&event.endpoint_id) {
                Some(entry) => entry,
                None => {
                    let cap = match db::endpoint(pool, &event.endpoint_id).await? {
                        Some(endpoint) => endpoint.rate_per_minute,
                        None => 0,
                    };
                    let since = now - RATE_WINDOW_MICROS;
                    let claim = (now, lease_until);
                    let (recent, oldest) =
                        db::attempts_since(pool, &event.endpoint_id, since, claim).await?;
                    // The window's oldest attempt, or the one this batch is about to make.
                    let free_at = oldest.unwrap_or(now).min(now) + RATE_WINDOW_MICROS + 1;
                    room.entry(event.endpoint_id.clone())
                        .or_insert((cap - recent, free_at))
                }
            };
            if *left > 0 {
                *left -= 1;
                allowed.push(event);
            } else {
                super::metrics::rate_capped();
                db::postpone(pool, &event.id, &self.id, *free_at).await?;
                capped.insert(event.endpoint_id.clone(), *free_at);
            }
        }
        for (endpoint_id, free_at) in capped {
            let backlog = db::postpone_backlog(pool, &endpoint_id, now, free_at).await?;
            super::metrics::rate_capped_by(backlog);
        }
        Ok(allowed)
    }

    async fn deliver(&self, event: &ClaimedEvent) -> Result<()> {
        let pool = self.store.pool();
        let Some(endpoint) = db::endpoint(pool, &event.endpoint_id).await? else {
            return Ok(());
        };
        let now = now_micros();
        let started = Instant::now();
        let answer = match self.key().and_then(|k| live_secrets(k, &endpoint, now)) {
            Ok(secrets) => send(&self.config, &endpoint.url, event, &secrets).await,
            // A key that cannot open the secret (`--alerts-key` changed, a damaged row) fails
            // the attempt like a network error: logged, retried on the schedule, then given up,
            // so the endpoint is flagged and disabled. Returning the error instead left the
            // event to be claimed again every lease, for ever, with nothing recorded.
            Err(e) => Answer {
                error: format!("cannot sign the delivery: {e}"),
                retryable_failure: true,
                ..Answer::default()
            },
        };
        let latency_ms = started.elapsed().as_millis() as i64;
        let (outcome, next) = self.decide(event, &answer);
        let attempt = Attempt {
            event,
            worker: &self.id,
            started_at: now,
            latency_ms,
            status_code: answer.status,
            outcome,
            error: &answer.error,
            next_attempt_at: next,
        };
        let quiet = longest_retry_gap(&self.config).as_micros() as i64;
        let failing_since = db::record_attempt(pool, &attempt, now_micros(), quiet).await?;
        super::metrics::attempted(outcome, event.attempts + 1);
        tracing::info!(event = %event.id, endpoint = %endpoint.id, status = ?answer.status,
            outcome = outcome.as_str(), error = %answer.error, "alert delivery attempt");
        if let Some(since) = failing_since {
            if now_micros() - since >= self.config.disable_after.as_micros() as i64 {
                disable(&self.store, &endpoint, since).await?;
            }
        }
        Ok(())
    }

    fn key(&self) -> Result<&SealKey> {
        self.config.key.as_deref().ok_or_else(|| {
            LedgerError::FailedPrecondition("alerts need --alerts-key to open secrets".into())
        })
    }

    /// Delivered, retried (when), or given up.
    fn decide(&self, event: &ClaimedEvent, answer: &Answer) -> (Outcome, Option<i64>) {
        let retryable = match answer.status {
            Some(code) if (200..300).contains(&code) => return (Outcome::Delivered, None),
            Some(code) => code == 408 || code == 429 || code >= 500,
            None => answer.retryable_failure,
        };
        let delay = usize::try_from(event.attempts)
            .ok()
            .and_then(|n| self.config.retry_schedule.get(n));
        match (retryable, delay) {
            (true, Some(delay)) => {
                let delay = jitter(*delay, self.config.jitter_percent)
                    .max(answer.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
                (
                    Outcome::Retry,
                    Some(now_micros() + delay.as_micros() as i64),
                )
            }
            _ => (Outcome::GaveUp, None),
        }
    }
}

/// The secrets that sign now: the current one, and the previous one during a rotation's overlap.
/// A previous secret this key cannot open (sealed under an `--alerts-key` changed since) is left
/// out: the current one still signs, where failing the whole attempt sent nothing for the overlap.
fn live_secrets(key: &SealKey, endpoint: &EndpointRecord, now: i64) -> Result<Vec<String>> {
    let mut secrets = vec![key.open(&endpoint.id, &endpoint.secret_sealed)?];
    let previous = &endpoint.previous_secret;
    if let (Some(sealed), Some(until)) = (&previous.sealed, previous.until) {
        if now < until {
            match key.open(&endpoint.id, sealed) {
                Ok(secret) => secrets.push(secret),
                Err(e) => tracing::warn!(
                    endpoint = %endpoint.id,
                    "the previous signing secret is not signed with: {e}"
                ),
            }
        }
    }
    Ok(secrets)
}

/// The longest a failing endpoint waits between two attempts: the schedule's longest delay at its
/// largest jitter, or the longest `Retry-After` taken, with ten minutes for the rate cap and the
/// worker's turns. An endpoint not tried for longer (no events, the ledger down) was not seen
/// failing meanwhile: its failure clock starts again at its next failure.
fn longest_retry_gap(config: &AlertsConfig) -> Duration {
    let longest = config
        .retry_schedule
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    let jittered = longest.saturating_mul(100 + u32::from(config.jitter_percent)) / 100;
    jittered.max(MAX_RETRY_AFTER) + Duration::from_secs(600)
}

fn jitter(delay: Duration, percent: u8) -> Duration {
    use rand::Rng;
    if percent == 0 {
        return delay;
    }
    let spread = i64::from(percent.min(100));
    let factor = 100 + rand::thread_rng().gen_range(-spread..=spread);
    delay * factor as u32 / 100
}

/// What one attempt got back.
#[derive(Debug, Default)]
struct Answer {
    status: Option<u16>,
    retry_after: Option<Duration>,
    /// Without a status: whether the failure is one to retry (timeouts, refused or dropped
    /// connections) or not (the endpoint now resolves to a forbidden address).
    retryable_failure: bool,
    error: String,
}

async fn send(
    config: &AlertsConfig,
    url: &str,
    event: &ClaimedEvent,
    secrets: &[String],
) -> Answer {
    match try_send(config, url, event, secrets).await {
        Ok(answer) => answer,
        Err(SendError::Refused(msg)) => Answer {
            error: msg,
            ..Answer::default()
        },
        Err(SendError::Transport(msg)) => Answer {
            error: msg,
            retryable_failure: true,
            ..Answer::default()
        },
    }
}

enum SendError {
    Refused(String),
    Transport(String),
}

async fn try_send(
    config: &AlertsConfig,
    url: &str,
    event: &ClaimedEvent,
    secrets: &[String],
) -> std::result::Result<Answer, SendError> {
    let refused = |e: LedgerError| SendError::Refused(e.to_string());
    let url = target::parse_url(url, &config.allowed_hosts).map_err(refused)?;
    // Checked now, and the connection pinned to the checked addresses (no DNS rebinding).
    let addrs = match target::lookup(&url, &config.allowed_hosts, config.request_timeout).await {
        target::Resolved::Addrs(addrs) => addrs,
        target::Resolved::Unresolved(e) => return Err(SendError::Transport(e)),
        target::Resolved::Refused(e) => return Err(SendError::Refused(e)),
    };
    let mut client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.request_timeout)
        .no_proxy()
        .user_agent("syft-router-webhooks/1");
    if let Some(host) = url.domain() {
        client = client.resolve_to_addrs(host, &addrs);
    }
    let client = client
        .build()
        .map_err(|e| SendError::Refused(format!("http client: {e}")))?;
    let timestamp = now_micros() / 1_000_000;
    let signature = signature_header(secrets, &event.id, timestamp, event.payload.as_bytes())
        .map_err(refused)?;
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &event.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(event.payload.clone())
        .send()
        .await
        .map_err(|e| SendError::Transport(transport_error(&e)))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let head = read_capped(response).await;
    let error = if (200..300).contains(&status) {
        String::new()
    } else if (300..400).contains(&status) {
        format!("HTTP {status}: redirects are not followed")
    } else {
        format!(
            "HTTP {status}: {}",
            head.chars().take(ERROR_TEXT_CAP).collect::<String>()
        )
    };
    Ok(Answer {
        status: Some(status),
        retry_after,
        retryable_failure: false,
        error,
    })
}

/// Reads at most [`RESPONSE_CAP`] bytes of the body (the rest is never read, never stored).
async fn read_capped(mut response: reqwest::Response) -> String {
    let mut head = Vec::new();
    while head.len() < RESPONSE_CAP {
        match response.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            _ => break,
        }
    }
    head.truncate(RESPONSE_CAP);
    String::from_utf8_lossy(&head).into_owned()
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "connection dropped before an answer".into()
    }
}

/// Disables an endpoint (once, whichever replica gets there) and tells the account's other
/// enabled endpoints, in one transaction.
async fn disable(store: &Store, endpoint: &EndpointRecord, failing_since: i64) -> Result<()> {
    let now = now_micros();
    // Read before the transaction: SQLite has one connection, which the transaction takes.
    let others = db::endpoints(store.pool(), Some(endpoint.account_id)).await?;
    let mut tx = store.pool().begin().await?;
    if !db::disable(&mut tx, &endpoint.id, now).await? {
        return Ok(());
    }
    // Its scheme and host only: an incoming-webhook URL (Slack's, Discord's) is a credential,
    // which the notice carried in full to the account's other receivers.
    let url = match reqwest::Url::parse(&endpoint.url) {
        Ok(u) => match u.port() {
            Some(port) => format!(
                "{}://{}:{port}",
                u.scheme(),
                u.host_str().unwrap_or_default()
            ),
            None => format!("{}://{}", u.scheme(), u.host_str().unwrap_or_default()),
        },
        Err(_) => String::new(),
    };
    let fired = Fired {
        kind: EventKind::EndpointDisabled,
        data: json!({
            "endpoint_id": endpoint.id,
            "url": url,
            "failing_since": super::payload::rfc3339(failing_since),
        }),
        summary: format!(
            "webhook endpoint {} ({url}) was disabled after failing since {}",
            endpoint.id,
            super::payload::rfc3339(failing_since)
        ),
    };
    let mut told = 0;
    for other in others {
        if other.id == endpoint.id || other.disabled_at.is_some() {
            continue;
        }
        told += 1;
        let format = Format::parse(&other.format)?;
        db::insert_event(&mut tx, &other.id, format, &fired, now).await?;
    }
    tx.commit().await?;
    super::metrics::disabled();
    super::metrics::written(EventKind::EndpointDisabled, told);
    tracing::warn!(endpoint = %endpoint.id, "alert endpoint disabled after persistent failure");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Retries spread (so endpoints failing together are not retried in lockstep), within the
    /// configured percentage either side, and not at all when jitter is off.
    #[test]
    fn jitter_is_bounded_and_spreads() {
        let delay = Duration::from_secs(100);
        let samples: Vec<Duration> = (0..2000).map(|_| jitter(delay, 20)).collect();
        let (min, max) = (
            samples.iter().min().copied().unwrap_or_default(),
            samples.iter().max().copied().unwrap_or_default(),
        );
        assert!(min >= Duration::from_secs(80), "{min:?}");
        assert!(max <= Duration::from_secs(120), "{max:?}");
        assert!(
            max - min >= Duration::from_secs(30),
            "spread {min:?}..{max:?}"
        );
        let below = samples.iter().filter(|d| **d < delay).count();
        assert!(
            (600..1400).contains(&below),
            "{below} of 2000 below: not centred"
        );
        assert!((0..100).all(|_| jitter(delay, 0) == delay));
        // More than 100 % is treated as 100 %: never negative, never more than double.
        assert!((0..200).all(|_| jitter(delay, 250) <= delay * 2));
    }
}
