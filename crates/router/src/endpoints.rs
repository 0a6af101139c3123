//! The ledger endpoints of a router (`--ledger-url` takes a list) and the choice between them.
//!
//! Every URL of the list is one endpoint; a DNS name that resolves to several addresses at start
//! becomes one endpoint per address (keeping the name for TLS and the `:authority`). Calls go to
//! the healthy endpoints in turn; an endpoint whose call failed in transport (or whose health
//! probe did not answer SERVING) is skipped for a short back-off, so one dead ledger costs at most
//! one failed attempt per back-off, not one per request. When every endpoint is backed off they
//! are still tried (soonest back in service first): a back-off must never turn into a refusal.

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use syft_proto::ledger::ledger_client::LedgerClient;

use crate::config::LedgerSettings;
use crate::error::RouterError;

/// First back-off of an endpoint that failed; doubled per consecutive failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest back-off: a ledger back from a restart is used again within this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One ledger endpoint.
pub(crate) struct Member {
    /// What the operator wrote (with the address, when a name was expanded), for logs.
    pub(crate) label: String,
    pub(crate) client: LedgerClient<Channel>,
    pub(crate) channel: Channel,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Skipped until then.
    down_until: Option<Instant>,
    consecutive_failures: u32,
    /// The last failure was [`Down::Unreachable`] (nothing could be sent), not a ledger that
    /// answered it is unavailable or a call cut off in flight.
    unreachable: bool,
}

/// Why an endpoint is backed off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Down {
    /// No connection could be made (a call's), or the health probe found the endpoint
    /// unreachable (no answer within its timeout included): as the router's readiness says.
    Unreachable,
    /// Anything else: a call cut off or timed out, a ledger saying it is unavailable, a probe
    /// answered NOT_SERVING.
    Failed,
}

impl Member {
    fn down_until(&self) -> Option<Instant> {
        self.health
            .lock()
            .ok()
            .and_then(|h| h.down_until)
            .filter(|t| *t > Instant::now())
    }

    /// The endpoint failed in transport (or its probe failed): skip it for a while. `detail`:
    /// what the transport said (a refused connection, an expired certificate), logged once per
    /// back-off: a router kept out of service by its probe gets no request to log it otherwise.
    pub(crate) fn mark_down(&self, why: Down, detail: &str) {
        if let Ok(mut h) = self.health.lock() {
            h.unreachable = why == Down::Unreachable;
            let shift = h.consecutive_failures.min(4);
            let backoff = (FIRST_BACKOFF * (1u32 << shift)).min(MAX_BACKOFF);
            h.consecutive_failures = h.consecutive_failures.saturating_add(1);
            if h.down_until.is_none_or(|t| t <= Instant::now()) {
                tracing::warn!(ledger = %self.label, backoff_ms = backoff.as_millis() as u64,
                    detail, "ledger endpoint failed; using the others meanwhile");
            }
            h.down_until = Some(Instant::now() + backoff);
        }
    }

    /// The endpoint answered: use it again.
    pub(crate) fn mark_up(&self) {
        if let Ok(mut h) = self.health.lock() {
            if h.down_until.is_some() {
                tracing::info!(ledger = %self.label, "ledger endpoint back in service");
            }
            *h = Health::default();
        }
    }
}

/// The endpoints of a router's ledger.
pub(crate) struct Members {
    list: Vec<Member>,
    /// Round-robin start among the healthy endpoints.
    next: AtomicUsize,
}

impl Members {
    /// One lazily dialed channel per endpoint. Must run inside a Tokio runtime.
    pub(crate) fn connect(settings: &LedgerSettings) -> Result<Self, RouterError> {
        let urls = settings.urls();
        if urls.is_empty() {
            return Err(RouterError::Internal("no ledger url given".into()));
        }
        let mut list = Vec::new();
        for url in &urls {
            for (label, endpoint) in expand(url, settings)? {
                let channel = endpoint.connect_lazy();
                list.push(Member {
                    label,
                    client: LedgerClient::new(channel.clone()),
                    channel,
                    health: Mutex::new(Health::default()),
                });
            }
        }
        if list.len() > 1 {
            let labels: Vec<&str> = list.iter().map(|m| m.label.as_str()).collect();
            tracing::info!(ledgers = ?labels, "ledger endpoints");
        }
        Ok(Members {
            list,
            next: AtomicUsize::new(0),
        })
    }

    pub(crate) fn all(&self) -> &[Member] {
        &self.list
    }

    /// Whether no endpoint can be reached now: each is backed off as [`Down::Unreachable`] (a
    /// call's connection that could not be made, or a probe that found it unreachable). A call
    /// learns this before the next health probe does.
    pub(crate) fn unreachable(&self) -> bool {
        self.list.iter().all(|m| {
            m.health
                .lock()
                .is_ok_and(|h| h.unreachable && h.down_until.is_some_and(|t| t > Instant::now()))
        })
    }

    /// The order in which a call tries the endpoints: the healthy ones (starting at a rotating
    /// one, to spread the load), then the backed-off ones, soonest back first.
    /// Whether there is more than one endpoint to fail over to.
    pub(crate) fn several(&self) -> bool {
        self.list.len() > 1
    }

    pub(crate) fn order(&self) -> Vec<&Member> {
        let n = self.list.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        let mut healthy = Vec::with_capacity(n);
        let mut down = Vec::new();
        for i in 0..n {
            let m = &self.list[(start + i) % n];
            match m.down_until() {
                None => healthy.push(m),
                Some(t) => down.push((t, m)),
            }
        }
        down.sort_by_key(|(t, _)| *t);
        healthy.extend(down.into_iter().map(|(_, m)| m));
        healthy
    }
}

/// The endpoints of one URL: itself, or one per address when its host is a name that resolves
/// to several.
fn expand(url: &str, settings: &LedgerSettings) -> Result<Vec<(String, Endpoint)>, RouterError> {
    let bad =
        |e: &dyn std::fmt::Display| RouterError::Internal(format!("bad ledger url {url:?}: {e}"));
    let uri: http::Uri = url.parse().map_err(|e| bad(&e))?;
    let addrs = resolve_all(&uri);
    if addrs.len() <= 1 {
        return Ok(vec![(url.to_string(), endpoint(url, settings, None)?)]);
    }
    let host = uri.host().unwrap_or_default().to_string();
    let scheme = uri.scheme_str().unwrap_or("http");
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let at = format!("{scheme}://{addr}");
        let e = endpoint(&at, settings, Some(&host))?.origin(uri.clone());
        out.push((format!("{url} ({addr})"), e));
    }
    Ok(out)
}

/// The addresses of a URL whose host is a DNS name (empty for an IP literal or when the name
/// does not resolve now: tonic then resolves it itself on every connect).
fn resolve_all(uri: &http::Uri) -> Vec<std::net::SocketAddr> {
    let Some(host) = uri.host() else {
        return Vec::new();
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Vec::new();
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let mut addrs: Vec<_> = match (bare, port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            tracing::warn!(host = bare, error = %e, "cannot resolve the ledger's name now; it is resolved on connect");
            return Vec::new();
        }
    };
    addrs.sort();
    addrs.dedup();
    addrs
}

/// A lazily connecting endpoint with the router's timeouts and TLS. `domain`: the name to check
/// the certificate against when `url` is an address a name resolved to.
fn endpoint(
    url: &str,
    settings: &LedgerSettings,
    domain: Option<&str>,
) -> Result<Endpoint, RouterError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| RouterError::Internal(format!("bad ledger url {url:?}: {e}")))?
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let https = url.starts_with("https://");
    let tls = match (domain, https) {
        (Some(d), true) => Some(settings.tls.clone().unwrap_or_default().with_domain(d)),
        _ => settings.tls.clone(),
    };
    syft_tls::configure_endpoint(endpoint, tls.as_ref())
        .map_err(|e| RouterError::Internal(format!("ledger TLS: {e}")))
}
