//! The router's ledger client: authenticated calls with deadlines, ledger errors mapped to
//! router errors.

use std::time::Duration;

use tokio::time::Instant;

use syft_proto::ledger::ledger_client::LedgerClient;
use syft_proto::ledger::{
    capture_request, AnswerToStore, AuthorizeRequest, CaptureRequest, ExtendHoldRequest,
    GetAccountRequest, GetAnswerRequest, RecordUsageRequest, Transfer, Usage, VoidRequest,
};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::config::LedgerSettings;
use crate::error::RouterError;
use crate::health::{LedgerState, OwnerCheck};
use crate::usage_send::{Calls, UsageSender};
use syft_error::Reason;
use tonic_types::StatusExt;

/// The ledger's gRPC service name, as its health service reports it.
const LEDGER_SERVICE: &str = "syft.ledger.v1.Ledger";

#[derive(Clone)]
pub(crate) struct Ledger {
    client: LedgerClient<Channel>,
    channel: Channel,
    calls: Calls,
    /// Free requests' usage rows, grouped into `RecordUsageBatch` calls (`usage_send.rs`).
    usage: UsageSender,
    pub(crate) hold_ttl_seconds: Option<i64>,
}

/// Which ledger call failed, for error mapping and logs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Authorize,
    Capture,
    Void,
    RecordUsage,
    GetAnswer,
    ExtendHold,
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

impl Ledger {
    /// Connects lazily (the first call dials). Must run inside a Tokio runtime.
    pub(crate) fn connect(settings: &LedgerSettings) -> Result<Self, RouterError> {
        let endpoint = Endpoint::from_shared(settings.url.clone())
            .map_err(|e| RouterError::Internal(format!("bad ledger url {:?}: {e}", settings.url)))?
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let endpoint = syft_tls::configure_endpoint(endpoint, settings.tls.as_ref())
            .map_err(|e| RouterError::Internal(format!("ledger TLS: {e}")))?;
        let auth: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", settings.secret.expose())).map_err(
                |_| RouterError::Internal("ledger secret is not valid header text".into()),
            )?;
        let channel = endpoint.connect_lazy();
        let client = LedgerClient::new(channel.clone());
        let calls = Calls {
            client: client.clone(),
            auth,
            timeout: settings.timeout,
        };
        Ok(Ledger {
            client,
            channel,
            usage: UsageSender::start(calls.clone()),
            calls,
            hold_ttl_seconds: settings.hold_ttl_seconds,
        })
    }

    /// The ledger's own gRPC health status. A ledger without the health service
    /// (`UNIMPLEMENTED`) answered, so it counts as serving.
    pub(crate) async fn probe(&self, timeout: Duration) -> LedgerState {
        let mut client = HealthClient::new(self.channel.clone());
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: LEDGER_SERVICE.into(),
        });
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.check(req)).await {
            Ok(Ok(resp)) => match resp.into_inner().status() {
                ServingStatus::Serving => LedgerState::Serving,
                _ => LedgerState::NotServing,
            },
            Ok(Err(s)) if s.code() == Code::Unimplemented => LedgerState::Serving,
            Ok(Err(s)) => {
                tracing::debug!(code = ?s.code(), message = %s.message(), "ledger health check failed");
                LedgerState::Unreachable
            }
            Err(_) => LedgerState::Unreachable,
        }
    }

    /// Reads `owner_email`'s account with the router's secret: only that account (or the admin)
    /// may, so success shows the secret is the owner's. `None` when the ledger did not answer.
    pub(crate) async fn check_owner(
        &self,
        owner_email: &str,
        timeout: Duration,
    ) -> Option<OwnerCheck> {
        let mut req = self.request(GetAccountRequest {
            email: owner_email.to_string(),
        });
        req.set_timeout(timeout);
        let mut client = self.client.clone();
        match tokio::time::timeout(timeout, client.get_account(req)).await {
            Ok(Ok(_)) => Some(OwnerCheck::Verified),
            Ok(Err(s)) => match s.code() {
                Code::Unauthenticated => Some(OwnerCheck::SecretRejected),
                Code::PermissionDenied => Some(OwnerCheck::NotOwner),
                Code::NotFound | Code::InvalidArgument => Some(OwnerCheck::OwnerUnknown),
                code => {
                    tracing::debug!(?code, message = %s.message(), "owner check failed");
                    None
                }
            },
            Err(_) => None,
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        self.calls.request(msg)
    }

    pub(crate) async fn authorize(&self, msg: AuthorizeRequest) -> Result<Transfer, RouterError> {
        let mut client = self.client.clone();
        client
            .authorize(self.request(msg))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| map_status(Op::Authorize, s))
    }

    /// Captures, storing `answer` with it. The outcome is settled: see [`Ledger::settled`].
    pub(crate) async fn capture(
        &self,
        transfer_id: &str,
        amount_micros: i64,
        usage: Usage,
        answer: Option<AnswerToStore>,
        settle_until: Instant,
    ) -> Result<Transfer, RouterError> {
        let msg = CaptureRequest {
            transfer_id: transfer_id.to_string(),
            amount: Some(capture_request::Amount::AmountMicros(amount_micros)),
            usage: Some(usage),
            answer,
        };
        self.settled(
            Op::Capture,
            transfer_id,
            settle_until,
            |mut client, req| async move { client.capture(req).await },
            msg,
        )
        .await
    }

    /// Voids; settled like a capture.
    pub(crate) async fn void(
        &self,
        transfer_id: &str,
        reason: &str,
        usage: Usage,
        settle_until: Instant,
    ) -> Result<Transfer, RouterError> {
        let msg = VoidRequest {
            transfer_id: transfer_id.to_string(),
            reason: reason.to_string(),
            usage: Some(usage),
        };
        self.settled(
            Op::Void,
            transfer_id,
            settle_until,
            |mut client, req| async move { client.void(req).await },
            msg,
        )
        .await
    }

    /// Runs a resolution (capture or void) until its outcome is known. A call whose result is
    /// unknown (connection reset, timeout, `UNKNOWN`, a ledger restarting) may or may not have
    /// committed, so it is sent again: resolutions are idempotent, so the repeat returns the
    /// committed transfer, or a definite refusal (`TRANSFER_NOT_PENDING`, `HOLD_EXPIRED`) when it
    /// did not commit and can no longer. Repeated with backoff until `settle_until` (the hold's
    /// expiry plus a margin: past it the ledger answers definitely whenever it answers at all).
    async fn settled<M, F, Fut>(
        &self,
        op: Op,
        transfer_id: &str,
        settle_until: Instant,
        call: F,
        msg: M,
    ) -> Result<Transfer, RouterError>
    where
        M: Clone,
        F: Fn(LedgerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Transfer>, tonic::Status>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            let status = match call(self.client.clone(), self.request(msg.clone())).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if outcome_unknown(s.code()) => s,
                Err(s) => return Err(map_status(op, s)),
            };
            attempt += 1;
            let now = Instant::now();
            if now + delay >= settle_until {
                tracing::error!(transfer_id, ?op, attempt, code = ?status.code(), "outcome still unknown; giving up");
                return Err(map_status(op, status));
            }
            tracing::warn!(transfer_id, ?op, attempt, code = ?status.code(), "outcome unknown, asking again");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_SETTLE_BACKOFF);
        }
    }

    /// Moves a pending hold's expiry to now + `ttl_seconds`.
    pub(crate) async fn extend_hold(
        &self,
        transfer_id: &str,
        ttl_seconds: i64,
    ) -> Result<Transfer, RouterError> {
        let mut client = self.client.clone();
        let req = self.request(ExtendHoldRequest {
            transfer_id: transfer_id.to_string(),
            ttl_seconds,
        });
        client
            .extend_hold(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| map_status(Op::ExtendHold, s))
    }

    /// The answer stored with a capture; `None` when there is none (not stored, expired, or the
    /// transfer is not captured).
    pub(crate) async fn answer(&self, transfer_id: &str) -> Result<Option<Vec<u8>>, RouterError> {
        let mut client = self.client.clone();
        let req = self.request(GetAnswerRequest {
            transfer_id: transfer_id.to_string(),
        });
        match client.get_answer(req).await {
            Ok(r) => Ok(Some(r.into_inner().body)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(map_status(Op::GetAnswer, s)),
        }
    }

    /// A free request's row, grouped with the rows ready at the same moment (`usage_send.rs`).
    pub(crate) async fn record_free_usage(&self, usage: Usage) -> Result<(), RouterError> {
        self.usage.send(usage).await
    }

    pub(crate) async fn record_usage(&self, usage: Usage) -> Result<(), RouterError> {
        let mut client = self.client.clone();
        client
            .record_usage(self.request(RecordUsageRequest { usage: Some(usage) }))
            .await
            .map(|_| ())
            .map_err(|s| map_status(Op::RecordUsage, s))
    }
}

/// The ledger's machine-readable reason (`ErrorInfo.reason`), if it sent one we know.
fn ledger_reason(s: &tonic::Status) -> Option<Reason> {
    syft_error::reason_of(s).and_then(|r| r.parse().ok())
}

/// Ledger status -> router error. The ledger's own messages are client-safe for business
/// errors; transport and internal failures become a generic `UNAVAILABLE`.
pub(crate) fn map_status(op: Op, s: tonic::Status) -> RouterError {
    let msg = s.message().to_string();
    match s.code() {
        Code::InvalidArgument => RouterError::InvalidArgument(msg),
        Code::FailedPrecondition => RouterError::FailedPrecondition {
            reason: ledger_reason(&s)
                .map(Reason::as_str)
                .unwrap_or("LEDGER_REJECTED"),
            message: msg,
        },
        Code::PermissionDenied => RouterError::PermissionDenied(msg),
        Code::NotFound => RouterError::NotFound(msg),
        Code::AlreadyExists => RouterError::AlreadyExists(msg),
        Code::ResourceExhausted => match ledger_reason(&s) {
            // A budget or token-window refusal: passed on with the ledger's retry time.
            Some(reason) => RouterError::Quota(Box::new(crate::error::QuotaRefusal {
                reason,
                details: syft_error::QuotaDetails {
                    retry_after: syft_error::retry_after_of(&s),
                    violations: s
                        .get_details_quota_failure()
                        .map(|q| {
                            q.violations
                                .into_iter()
                                .map(|v| (v.subject, v.description))
                                .collect()
                        })
                        .unwrap_or_default(),
                },
                message: msg,
                headers: Default::default(),
            })),
            None => RouterError::ResourceExhausted(msg),
        },
        Code::Unauthenticated => {
            // The router's own credential was refused: a deployment problem, not the user's.
            tracing::error!(?op, "ledger rejected the router's credentials");
            RouterError::Unavailable("ledger rejected the router's credentials".into())
        }
        code => {
            tracing::warn!(?op, ?code, message = %msg, "ledger call failed");
            RouterError::Unavailable("ledger unavailable".into())
        }
    }
}
