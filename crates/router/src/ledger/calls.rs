//! Calls to the ledger: each fails over between its endpoints ([`Calls::call`]), and a call whose
//! outcome is unknown is settled by asking again ([`Calls::settled`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use syft_proto::ledger::ledger_client::LedgerClient;
use syft_proto::ledger::Transfer;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::Code;

use super::map_status;
use crate::config::LedgerSettings;
use crate::endpoints::{Down, Members};
use crate::error::RouterError;

/// The ledger endpoints and the router's credential: every call goes through [`Calls::call`],
/// which fails over between endpoints. Shared by the router's `Ledger` and the usage sender.
#[derive(Clone)]
pub(crate) struct Calls {
    pub(super) members: Arc<Members>,
    /// `None` without a secret: no header at all, which the ledger does not count against this
    /// machine's address (an empty `Bearer` was counted as a wrong secret, and a router started
    /// without one locked every client on its machine out of the ledger within 20 s).
    auth: Option<AsciiMetadataValue>,
    /// Calls refused for this router's credential (`UNAUTHENTICATED`): a secret changed or
    /// revoked while the router runs. The router stops sending it at the first, not at the owner
    /// check's next minute: each call would be one more wrong credential counted against this
    /// machine's address (`RouterService::ledger_refuses_us`).
    refusals: Arc<AtomicU64>,
    /// The refusals an owner check that accepted the secret has seen past: only those counted
    /// before it asked, so a refusal that arrives while it is under way is not cleared by it.
    accepted_upto: Arc<AtomicU64>,
}

/// The ledger RPC `$method` as the closure [`Calls::call`] and its callers take (a client and a
/// request in, the client method's future out): every call site names only its method.
macro_rules! rpc {
    ($method:ident) => {
        |mut client, req| async move { client.$method(req).await }
    };
}
pub(crate) use rpc;

/// Which ledger call failed, for error mapping and logs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Authorize,
    Capture,
    Void,
    RecordUsage,
    GetAnswer,
    ExtendHold,
    GetAccount,
    GetTransfer,
    GetBudgetUse,
    CheckToken,
}

/// How long [`Calls::settled`] asks again, and when it stops early.
pub(crate) enum Patience<'a> {
    /// A capture or void: asked again until `until` however long the ledger is away, also after
    /// a round in which no attempt can have reached it (its hold exists and must hear it).
    Resolution { until: Instant },
    /// An authorization: fails at once after a round in which no attempt can have been applied
    /// (nothing to settle), else asked again until `until` while `asker` is open. `asker` closes
    /// once the request the call is for is gone: a retry of that request may meanwhile have
    /// placed the key's hold, which a later round would return as this call's own (it may have
    /// been applied) and its owner void under the retry.
    Authorization {
        until: Instant,
        asker: &'a watch::Sender<()>,
    },
}

/// What one round of [`Calls::try_call`] learnt of the endpoints it tried, by label.
#[derive(Default)]
struct Round<'a> {
    /// Failed in flight: the call may have been applied there.
    maybe_applied: Vec<&'a str>,
    /// Refused this router's TLS handshake: nothing ran there, in this round or an earlier one.
    /// (A first refusal can look like a call cut off in flight: TLS 1.3 sends the request
    /// before the server has judged the client's certificate.)
    refused_tls: Vec<&'a str>,
}

impl Round<'_> {
    /// Adds this round to the endpoints at which an attempt may have been applied.
    fn fold_into(self, maybe_applied: &mut Vec<String>) {
        maybe_applied.retain(|m| !self.refused_tls.contains(&m.as_str()));
        for m in self.maybe_applied {
            if !maybe_applied.iter().any(|known| known == m) {
                maybe_applied.push(m.to_string());
            }
        }
    }
}

/// Longest wait between two attempts to settle an unknown outcome.
const MAX_SETTLE_BACKOFF: Duration = Duration::from_secs(2);

/// Whether a failed call may nevertheless have been applied by the ledger.
fn outcome_unknown(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

/// A refusal of the router itself, not of the call: its credential, or its address locked.
fn refused_here(s: &tonic::Status) -> bool {
    s.code() == Code::Unauthenticated
        || (s.code() == Code::ResourceExhausted
            && super::status::ledger_reason(s) == Some(syft_error::Reason::AuthLocked))
}

/// Whether a failed call certainly never reached a ledger (the connection could not be made), so
/// it cannot have been applied. Anything else that failed in flight may have been. The transport
/// says so only in its message (hyper's connector: "tcp connect error", "error trying to
/// connect", "Connection refused"); a bare "connect" also matched "connection reset", which a
/// call sent and then cut off gets. (A TLS handshake the ledger refused carried no call either:
/// [`Calls::try_call`] tells it apart first, as [`Round::refused_tls`].)
fn never_sent(s: &tonic::Status) -> bool {
    let message = s.message().to_ascii_lowercase();
    s.code() == Code::Unavailable
        && ["connect error", "trying to connect", "connection refused"]
            .iter()
            .any(|m| message.contains(m))
}

impl Calls {
    /// Connects lazily to every endpoint of `settings` (the first call dials).
    pub(crate) fn connect(settings: &LedgerSettings) -> Result<Self, RouterError> {
        let secret = settings.secret.expose();
        let auth =
            match secret.is_empty() {
                true => None,
                false => Some(MetadataValue::try_from(format!("Bearer {secret}")).map_err(
                    |_| RouterError::Internal("ledger secret is not valid header text".into()),
                )?),
            };
        Ok(Calls {
            members: Arc::new(Members::connect(settings)?),
            auth,
            refusals: Arc::new(AtomicU64::new(0)),
            accepted_upto: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Whether a call was refused for the router's credential since an owner check accepted it.
    pub(crate) fn credential_refused(&self) -> bool {
        self.refusals.load(Ordering::Acquire) > self.accepted_upto.load(Ordering::Acquire)
    }

    /// The refusals so far, read before an owner check asks (see [`Calls::accepted`]).
    pub(crate) fn refusals_seen(&self) -> u64 {
        self.refusals.load(Ordering::Acquire)
    }

    /// An owner check that started after `seen` refusals accepted the credential: those are past.
    pub(crate) fn accepted(&self, seen: u64) {
        self.accepted_upto.fetch_max(seen, Ordering::AcqRel);
    }

    fn request<T>(&self, msg: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(auth) = &self.auth {
            req.metadata_mut().insert("authorization", auth.clone());
        }
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        syft_telemetry::inject_grpc(req.metadata_mut());
        req
    }

    /// [`Calls::call`] without a deadline, when only the answer matters (not whether an earlier
    /// attempt may have been applied); its failure in the router's terms.
    pub(crate) async fn answer<M, R, F, Fut>(
        &self,
        op: Op,
        msg: M,
        call: F,
    ) -> Result<R, RouterError>
    where
        M: Clone,
        F: Fn(LedgerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.call(op, None, msg, call)
            .await
            .map(|(r, _)| r)
            .map_err(|s| map_status(op, s))
    }

    /// One call, failing over: the endpoints are tried in [`Members::order`] until one answers
    /// (success, or a definite refusal). A transport failure (or a ledger saying it is
    /// unavailable) backs its endpoint off and moves on to the next; only calls that are safe to
    /// repeat go through here (all ledger calls are idempotent or reads). Also returns whether
    /// an attempt before the answering one may have been applied (its outcome unknown).
    pub(crate) async fn call<M, R, F, Fut>(
        &self,
        op: Op,
        timeout: Option<Duration>,
        msg: M,
        call: F,
    ) -> Result<(R, bool), tonic::Status>
    where
        M: Clone,
        F: Fn(LedgerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        match self.try_call(op, timeout, msg, call).await {
            Ok((r, round)) => Ok((r, !round.maybe_applied.is_empty())),
            Err((s, _)) => Err(s),
        }
    }

    /// [`Calls::call`], which also says what it learnt of the endpoints it tried.
    async fn try_call<M, R, F, Fut>(
        &self,
        op: Op,
        timeout: Option<Duration>,
        msg: M,
        call: F,
    ) -> Result<(R, Round<'_>), (tonic::Status, Round<'_>)>
    where
        M: Clone,
        F: Fn(LedgerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut round = Round::default();
        // How a round that no endpoint answered ends: an attempt that may have been applied
        // first (its outcome must be settled: a capture that committed at a slow replica was
        // reported failed when the next one refused the router), then a refusal of the router
        // (a rejected secret must be seen as such, not as the unreachable replica tried after
        // it: the router went on sending it, and the ledger locked its machine's address), then
        // whatever failed last.
        let (mut unknown, mut refusal, mut last) = (None, None, None);
        for m in self.members.order() {
            match call(m.client.clone(), self.request(msg.clone(), timeout)).await {
                Ok(r) => {
                    m.mark_up();
                    return Ok((r.into_inner(), round));
                }
                Err(s) if outcome_unknown(s.code()) => {
                    tracing::debug!(ledger = %m.label, ?op, code = ?s.code(), detail = %s.message(), "ledger call failed; next endpoint");
                    if syft_tls::handshake_failed(&s) {
                        m.mark_down(Down::Failed, s.message());
                        round.refused_tls.push(&m.label);
                    } else if never_sent(&s) {
                        m.mark_down(Down::Unreachable, s.message());
                    } else {
                        m.mark_down(Down::Failed, s.message());
                        round.maybe_applied.push(&m.label);
                        unknown = Some(s);
                        continue;
                    }
                    last = Some(s);
                }
                // Refused before anything ran, and by this replica alone as far as the router
                // knows: its lock on the router's address (counted per ledger process), or a
                // credential it does not know (a replica on another database). Another may take
                // the call: the refusal was answered at once, so a neighbour's wrong secrets at
                // one replica failed most paid requests, upstreams already paid and holds left.
                Err(s) if self.members.several() && refused_here(&s) => {
                    tracing::warn!(ledger = %m.label, ?op, code = ?s.code(), detail = %s.message(), "ledger endpoint refused the router; next endpoint");
                    m.mark_down(Down::Failed, s.message());
                    refusal = Some(s);
                }
                Err(s) => {
                    m.mark_up();
                    self.refused(op, &s);
                    return Err((s, round));
                }
            }
        }
        let status = (unknown.or(refusal).or(last))
            .unwrap_or_else(|| tonic::Status::unavailable("no ledger endpoint"));
        self.refused(op, &status);
        Err((status, round))
    }

    /// Logs a refusal of the router's credential once each time the refusals start again.
    fn refused(&self, op: Op, s: &tonic::Status) {
        if s.code() == Code::Unauthenticated
            && self.refusals.fetch_add(1, Ordering::AcqRel)
                == self.accepted_upto.load(Ordering::Acquire)
        {
            tracing::error!(?op, "the ledger refused the router's credential; no more calls until it accepts it again");
        }
    }

    /// A capture or void: [`Calls::settled`] until `until`, its refusal in the router's terms.
    pub(crate) async fn resolved<M, F, Fut>(
        &self,
        op: Op,
        id: &str,
        until: Instant,
        call: F,
        msg: M,
    ) -> Result<Transfer, RouterError>
    where
        M: Clone,
        F: Fn(LedgerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Transfer>, tonic::Status>>,
    {
        let patience = Patience::Resolution { until };
        self.settled(op, id, patience, call, msg, &mut Vec::new())
            .await
            .map(|(t, _)| t)
            .map_err(|s| map_status(op, s))
    }

    /// Runs a call that places or resolves a hold until its outcome is known. A call whose result
    /// is unknown (connection reset, timeout, `UNKNOWN`, a ledger restarting) may or may not have
    /// committed, so it is sent again: these calls are idempotent (an authorization by its key),
    /// so the repeat returns the committed transfer, or a definite refusal
    /// (`TRANSFER_NOT_PENDING`, `HOLD_EXPIRED`) when it did not commit and can no longer.
    /// Repeated with backoff as `patience` says (for a resolution until the hold's expiry plus a
    /// margin: past it the ledger answers definitely whenever it answers at all). Each round tries every endpoint (see
    /// [`Calls::call`]), so a retry goes to another ledger when one is down. Also returns whether
    /// an attempt before the answering one may have been applied. Fails with the ledger's status.
    /// `maybe_applied` carries the endpoints at which an earlier call under the same key may
    /// have been applied (an Authorize asked again with another hold life after a refusal, whose
    /// first rounds may have placed the hold it finds); a fresh call passes an empty one.
    pub(crate) async fn settled<M, F, Fut>(
        &self,
        op: Op,
        id: &str,
        patience: Patience<'_>,
        call: F,
        msg: M,
        maybe_applied: &mut Vec<String>,
    ) -> Result<(Transfer, bool), tonic::Status>
    where
        M: Clone,
        F: Fn(LedgerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Transfer>, tonic::Status>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            let status = match self.try_call(op, None, msg.clone(), &call).await {
                Ok((t, round)) => {
                    round.fold_into(maybe_applied);
                    return Ok((t, !maybe_applied.is_empty()));
                }
                Err((s, round)) if outcome_unknown(s.code()) => {
                    round.fold_into(maybe_applied);
                    s
                }
                Err((s, _)) => return Err(s),
            };
            // Nothing to settle when no endpoint may have applied an attempt: a ledger that
            // refuses this router's TLS handshake (mutual TLS without the right client
            // certificate) ran nothing and will not be reached by asking again either. Another
            // endpoint's unknown outcome in the same round is still settled (a round used to
            // give up when its last endpoint refused the handshake, leaving a hold the other may
            // have placed until it expired).
            let unreachable = maybe_applied.is_empty();
            let until = match patience {
                Patience::Resolution { until } => until,
                Patience::Authorization { .. } if unreachable => return Err(status),
                Patience::Authorization { asker, .. } if asker.is_closed() => {
                    tracing::warn!(id, ?op, code = ?status.code(), "outcome unknown and its request gone; not asking again");
                    return Err(status);
                }
                Patience::Authorization { until, .. } => until,
            };
            attempt += 1;
            let now = Instant::now();
            if now + delay >= until {
                tracing::error!(id, ?op, attempt, code = ?status.code(), "outcome still unknown; giving up");
                return Err(status);
            }
            tracing::warn!(id, ?op, attempt, code = ?status.code(), "outcome unknown, asking again");
            if let Patience::Authorization { asker, .. } = patience {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = asker.closed() => {
                        tracing::warn!(id, ?op, "outcome unknown and its request gone; not asking again");
                        return Err(status);
                    }
                }
            } else {
                tokio::time::sleep(delay).await;
            }
            delay = (delay * 2).min(MAX_SETTLE_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syft_proto::ledger::GetTransferRequest;

    /// What the transport really says when nothing listens: never sent. A connection cut off
    /// after the call went out may have been applied.
    #[tokio::test]
    async fn only_a_refused_connection_was_never_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect_lazy();
        let refused = LedgerClient::new(channel)
            .get_transfer(GetTransferRequest::default())
            .await
            .expect_err("nothing listens");
        assert!(never_sent(&refused), "{refused:?}");
        for cut in [
            "connection reset by peer",
            "transport error",
            "connection closed",
        ] {
            assert!(!never_sent(&tonic::Status::unavailable(cut)), "{cut}");
        }
    }
}
