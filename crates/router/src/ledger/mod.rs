//! The router's ledger client: authenticated calls with deadlines, ledger errors mapped to
//! router errors.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use syft_proto::ledger::{
    capture_request, AnswerToStore, AuthorizeRequest, BudgetUse, CaptureRequest, CheckTokenRequest,
    ExtendHoldRequest, GetAccountRequest, GetAnswerRequest, GetBudgetUseRequest,
    GetTransferRequest, RecordUsageRequest, Transfer, Usage, VoidRequest,
};
use tonic::Code;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::config::LedgerSettings;
use crate::endpoints::{Down, Member};
use crate::error::RouterError;
use crate::health::{LedgerEndpoint, LedgerState, OwnerCheck};
use crate::metrics::SpoolEvent;
use crate::usage_send::UsageSender;
use crate::usage_spool::UsageSpool;
use syft_error::{Reason, UsageStatus};

mod calls;
pub(crate) use calls::{rpc, Calls, Op, Patience};
mod status;
pub(crate) use status::map_status;
use status::{keyed_transfer, ledger_reason};

/// The shortest hold life a router takes from its ledger's refusal (`Ledger::granted_ttl`).
const MIN_LEARNED_HOLD_TTL: i64 = 10;

/// The ledger's gRPC service name, as its health service reports it.
const LEDGER_SERVICE: &str = "syft.ledger.v1.Ledger";

#[derive(Clone)]
pub(crate) struct Ledger {
    calls: Calls,
    /// Free requests' usage rows, grouped into `RecordUsageBatch` calls (`usage_send.rs`).
    usage: UsageSender,
    /// The local spool of free rows, when configured (`usage_spool.rs`): free answers then wait
    /// for a local append instead of the ledger's commit.
    spool: Option<UsageSpool>,
    /// `ledger.hold_ttl_seconds`: asked through [`Ledger::hold_ttl_seconds`].
    hold_ttl_seconds: Option<i64>,
    /// The longest hold the ledger said it grants when it refused a longer one
    /// (`HOLD_TTL_OUT_OF_RANGE`); `i64::MAX` until then.
    hold_ttl_cap: Arc<AtomicI64>,
    /// No `--ledger-secret` was given (a refusal then says so, not that a secret was wrong).
    no_secret: bool,
}

/// What an authorization returned, and whether this request placed the hold.
pub(crate) struct Authorization {
    pub(crate) transfer: Transfer,
    /// The ledger answered with a transfer an earlier call with the same key created (another
    /// router's, or another attempt of this request's).
    pub(crate) existing: bool,
}

impl Ledger {
    /// Connects lazily to every endpoint (the first call dials). Must run inside a Tokio runtime.
    /// `owner_email`: the router's owner, whose account records the spooled rows.
    pub(crate) fn connect(
        settings: &LedgerSettings,
        owner_email: &str,
    ) -> Result<Self, RouterError> {
        let calls = Calls::connect(settings)?;
        let sync = settings.usage_spool_sync;
        let spool = settings
            .usage_spool
            .as_deref()
            .map(|dir| UsageSpool::open(dir, owner_email, calls.clone(), sync))
            .transpose()?;
        crate::metrics::at_zero();
        if spool.is_some() {
            crate::metrics::spool_opened();
        }
        Ok(Ledger {
            usage: UsageSender::start(calls.clone()),
            spool,
            calls,
            hold_ttl_seconds: settings.hold_ttl_seconds,
            hold_ttl_cap: Arc::new(AtomicI64::new(i64::MAX)),
            no_secret: settings.secret.is_empty(),
        })
    }

    /// The ledgers' own gRPC health status, each endpoint's and overall: serving when at least
    /// one endpoint is. Each endpoint's verdict also sets whether calls skip it.
    pub(crate) async fn probe(&self, timeout: Duration) -> (LedgerState, Vec<LedgerEndpoint>) {
        let states = futures::future::join_all(
            self.calls
                .members
                .all()
                .iter()
                .map(|m| probe_one(m, timeout)),
        )
        .await;
        let endpoints = self
            .calls
            .members
            .all()
            .iter()
            .zip(&states)
            .map(|(m, (state, detail))| {
                if *state == LedgerState::Serving {
                    m.mark_up();
                } else {
                    // As the readiness this probe publishes says (`ledger_is_out` reads both).
                    let why = match state {
                        LedgerState::Unreachable => Down::Unreachable,
                        _ => Down::Failed,
                    };
                    m.mark_down(why, detail);
                }
                LedgerEndpoint {
                    url: m.label.clone(),
                    state: *state,
                }
            })
            .collect();
        let overall = [
            LedgerState::Serving,
            LedgerState::NotServing,
            LedgerState::Unreachable,
        ]
        .into_iter()
        .find(|s| states.iter().any(|(state, _)| state == s))
        .unwrap_or(LedgerState::Unknown);
        (overall, endpoints)
    }

    /// Whether no ledger endpoint could be connected to by the latest calls (see
    /// `Members::unreachable`).
    pub(crate) fn unreachable(&self) -> bool {
        self.calls.members.unreachable()
    }

    /// Whether a call was refused for the router's credential since the owner check last
    /// accepted it (see `Calls::credential_refused`).
    pub(crate) fn credential_refused(&self) -> bool {
        self.calls.credential_refused()
    }

    /// Reads `owner_email`'s account with the router's secret: only that account (or the admin)
    /// may, so success shows the secret is the owner's. `None` when the ledger did not answer.
    /// `priced_in`: the currencies of the router's paid services, which must be the account's.
    pub(crate) async fn check_owner(
        &self,
        owner_email: &str,
        priced_in: &[&str],
        budgets: bool,
        timeout: Duration,
    ) -> Option<OwnerCheck> {
        let msg = GetAccountRequest {
            email: owner_email.to_string(),
        };
        let seen = self.calls.refusals_seen();
        let call = self
            .calls
            .call(Op::GetAccount, Some(timeout), msg, rpc!(get_account));
        let verdict = match tokio::time::timeout(timeout, call).await {
            // A ledger that does not say its currency is taken at its word on each hold instead
            // (the authorization compares the hold's currency, `service/admission.rs`).
            Ok(Ok((account, _))) => match priced_in
                .iter()
                .find(|c| !account.currency.is_empty() && **c != account.currency)
            {
                Some(priced) => {
                    tracing::debug!(account_currency = %account.currency, priced_in = %priced, "prices and account in different currencies");
                    Some(OwnerCheck::CurrencyMismatch)
                }
                None if budgets => self.check_budgets(owner_email, timeout).await,
                None => Some(OwnerCheck::Verified),
            },
            Ok(Err(s)) => match s.code() {
                Code::Unauthenticated if self.no_secret => Some(OwnerCheck::NoSecret),
                Code::Unauthenticated => Some(OwnerCheck::SecretRejected),
                Code::PermissionDenied => Some(OwnerCheck::NotOwner),
                Code::ResourceExhausted if ledger_reason(&s) == Some(Reason::AuthLocked) => {
                    Some(OwnerCheck::AddressLocked)
                }
                Code::NotFound | Code::InvalidArgument => Some(OwnerCheck::OwnerUnknown),
                code => {
                    tracing::debug!(?code, detail = %s.message(), "owner check failed");
                    None
                }
            },
            Err(_) => None,
        };
        // Any verdict but a refused credential or a locked address means the ledger took the
        // secret: a request's refusal before it is past.
        if verdict.is_some_and(|v| v.took_the_secret()) {
            self.calls.accepted(seen);
        }
        verdict
    }

    /// Places (or finds, for a repeated key) the hold, and says whether another attempt placed
    /// it. The ledger names the attempt that placed the key's hold (`Transfer.attempt_id`, as
    /// `msg.attempt_id` named this one), so an earlier round of this call is told from another
    /// router's duplicate or a retry of the request. A ledger that names none (an older
    /// version, a hold placed before it kept attempts) says only `existing`, and an attempt
    /// whose outcome was unknown may have placed it, so then the hold counts as this call's
    /// own. An unknown outcome is settled by asking again (the key makes it idempotent) until
    /// `settle_until`, while `asker` is open (its request still waits): given up at once, it
    /// left a hold that nothing owned, the user's money held for the hold's whole life.
    pub(crate) async fn authorize(
        &self,
        msg: AuthorizeRequest,
        settle_until: Instant,
        asker: &tokio::sync::watch::Sender<()>,
    ) -> Result<Authorization, RouterError> {
        let (key, attempt) = (msg.idempotency_key.clone(), msg.attempt_id.clone());
        let patience = |until| Patience::Authorization { until, asker };
        let asked = msg.hold_ttl_seconds;
        let again = asked.is_some().then(|| msg.clone());
        // Shared by both calls: a round of the first whose outcome was unknown may have placed
        // the hold the second finds, which is then this request's own.
        let mut maybe_applied = Vec::new();
        let mut settled = (self.calls)
            .settled(
                Op::Authorize,
                &key,
                patience(settle_until),
                rpc!(authorize),
                msg,
                &mut maybe_applied,
            )
            .await;
        // Asked a longer hold than the ledger grants (the router's setting, not the user's
        // input): every paid request failed as the user's invalid request. Asked again, once,
        // for the ledger's longest (the refused call placed nothing), and so from now on.
        if let (Err(s), Some(again)) = (&settled, again) {
            if let Some(max) = self.granted_ttl(s, asked) {
                let msg = AuthorizeRequest {
                    hold_ttl_seconds: Some(max),
                    ..again
                };
                // Never asked again past the life of the hold it may place.
                let life = Instant::now() + Duration::from_secs(max.unsigned_abs());
                settled = (self.calls)
                    .settled(
                        Op::Authorize,
                        &key,
                        patience(settle_until.min(life)),
                        rpc!(authorize),
                        msg,
                        &mut maybe_applied,
                    )
                    .await;
            }
        }
        let (resp, maybe_ours) = match settled {
            Ok(settled) => settled,
            Err(s) => match keyed_transfer(&s) {
                // The key holds this user's earlier request, placed with other parameters (the
                // router's price or name changed since): a retry is answered from that request's
                // transfer (a completed one's stored answer, when the request's fingerprint
                // matches, `service/replay.rs`), not with a 409 for a request already charged.
                // Never this call's hold: `existing`, so a pending one is waited for, not used.
                Some(id) => {
                    let keyed = self.transfer(&id).await?;
                    (
                        Transfer {
                            existing: true,
                            ..keyed
                        },
                        false,
                    )
                }
                None => return Err(map_status(Op::Authorize, s)),
            },
        };
        let existing = placed_by_another(&resp, &attempt, maybe_ours);
        Ok(Authorization {
            transfer: resp,
            existing,
        })
    }

    /// The hold life to ask for: `ledger.hold_ttl_seconds` (`None`: the ledger's default), at most
    /// what the ledger said it grants.
    pub(crate) fn hold_ttl_seconds(&self) -> Option<i64> {
        let cap = self.hold_ttl_cap.load(Ordering::Relaxed);
        self.hold_ttl_seconds.map(|asked| asked.min(cap))
    }

    /// The ledger's longest hold, when `s` refused `asked` as longer than that: remembered for
    /// every later hold (the lowest said), and logged when it drops as the configuration error
    /// it is.
    fn granted_ttl(&self, s: &tonic::Status, asked: Option<i64>) -> Option<i64> {
        if ledger_reason(s) != Some(Reason::HoldTtlOutOfRange) {
            return None;
        }
        let max = syft_error::info_metadata(s, syft_error::MAX_HOLD_TTL_SECONDS)?
            .parse::<i64>()
            .ok()
            .filter(|&max| asked.is_some_and(|asked| asked > max))?;
        if max < MIN_LEARNED_HOLD_TTL {
            // A ledger saying 1 s would pin every later hold at that (extended three times a
            // second, cut at every slow upstream): refused as the deployment problem it is.
            tracing::error!(
                asked,
                granted = max,
                "the ledger grants holds too short to sell with; raise its --max-hold-ttl"
            );
            return None;
        }
        // The lowest any replica said: two replicas of different maximums answering at once
        // must not leave the higher one, refused again by the other.
        if self.hold_ttl_cap.fetch_min(max, Ordering::Relaxed) > max {
            tracing::error!(
                asked,
                granted = max,
                "ledger.hold_ttl_seconds is longer than the ledger grants (its --max-hold-ttl): \
                 holds are placed for the ledger's longest; lower the setting"
            );
        }
        Some(max)
    }

    /// The transfer with that id, failing over.
    pub(crate) async fn transfer(&self, transfer_id: &str) -> Result<Transfer, RouterError> {
        let msg = GetTransferRequest {
            transfer_id: transfer_id.to_string(),
        };
        self.calls
            .answer(Op::GetTransfer, msg, rpc!(get_transfer))
            .await
    }

    /// Captures, storing `answer` with it. The outcome is settled: see [`Calls::settled`].
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
        self.calls
            .resolved(Op::Capture, transfer_id, settle_until, rpc!(capture), msg)
            .await
    }

    /// Voids; settled like a capture.
    pub(crate) async fn void(
        &self,
        transfer_id: &str,
        reason: &str,
        usage: Option<Usage>,
        settle_until: Instant,
    ) -> Result<Transfer, RouterError> {
        let msg = VoidRequest {
            transfer_id: transfer_id.to_string(),
            reason: void_reason(reason),
            usage,
        };
        self.calls
            .resolved(Op::Void, transfer_id, settle_until, rpc!(void), msg)
            .await
    }

    /// Moves a pending hold's expiry to now + `ttl_seconds`.
    pub(crate) async fn extend_hold(
        &self,
        transfer_id: &str,
        ttl_seconds: i64,
    ) -> Result<Transfer, RouterError> {
        let msg = ExtendHoldRequest {
            transfer_id: transfer_id.to_string(),
            ttl_seconds,
        };
        self.calls
            .answer(Op::ExtendHold, msg, rpc!(extend_hold))
            .await
    }

    /// The answer stored with a capture; `None` when there is none (not stored, expired, or the
    /// transfer is not captured).
    pub(crate) async fn answer(&self, transfer_id: &str) -> Result<Option<Vec<u8>>, RouterError> {
        let msg = GetAnswerRequest {
            transfer_id: transfer_id.to_string(),
        };
        let call = self.calls.call(Op::GetAnswer, None, msg, rpc!(get_answer));
        match call.await {
            Ok((a, _)) => Ok(Some(a.body)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(map_status(Op::GetAnswer, s)),
        }
    }

    /// Whether the ledger keeps the spend budgets the router's config sets: one with hosted
    /// accounting refuses every hold that carries them (`NOT_SUPPORTED`), so such a router would
    /// say ready and fail every paid request. `None` without an answer.
    async fn check_budgets(&self, owner_email: &str, timeout: Duration) -> Option<OwnerCheck> {
        let msg = GetBudgetUseRequest {
            sender_email: owner_email.to_string(),
        };
        let call = self
            .calls
            .call(Op::GetBudgetUse, Some(timeout), msg, rpc!(get_budget_use));
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(_)) => Some(OwnerCheck::Verified),
            Ok(Err(s)) if ledger_reason(&s) == Some(Reason::NotSupported) => {
                Some(OwnerCheck::BudgetsUnsupported)
            }
            // An older ledger without the call: its holds are the judge, as before.
            Ok(Err(s)) if s.code() == Code::Unimplemented => Some(OwnerCheck::Verified),
            Ok(Err(s)) => {
                tracing::debug!(code = ?s.code(), detail = %s.message(), "budget check failed");
                None
            }
            Err(_) => None,
        }
    }

    /// What `user` has used of this router's per-user budgets (`GetBudgetUse`).
    pub(crate) async fn budget_use(&self, user: &str) -> Result<BudgetUse, RouterError> {
        let msg = GetBudgetUseRequest {
            sender_email: user.to_string(),
        };
        self.calls
            .answer(Op::GetBudgetUse, msg, rpc!(get_budget_use))
            .await
    }

    /// The sender of a token this router's owner may charge (`CheckToken`): who a request that
    /// holds it comes from. Refused as `Authorize` refuses the token otherwise.
    pub(crate) async fn token_sender(&self, token: &str) -> Result<String, RouterError> {
        let msg = CheckTokenRequest {
            token: token.to_string(),
        };
        let checked = (self.calls)
            .answer(Op::CheckToken, msg, rpc!(check_token))
            .await?;
        Ok(checked.sender_email)
    }

    /// A free request's row: appended to the local spool when there is one (shipped later), else
    /// grouped with the rows ready at the same moment and sent, returning after its commit
    /// (`usage_send.rs`). Refusal rows never go through the spool (usage_spool.rs says why);
    /// they carry a row key, which the ledger records once however often they are sent.
    pub(crate) async fn record_free_usage(&self, mut usage: Usage) -> Result<(), RouterError> {
        // Dated now, when it was answered: a spooled row may ship long after (a ledger outage),
        // and was dated then, in the analytics and the alerts' windows.
        // The limits' clock, to the millisecond: a row's time needs no finer.
        usage.answered_at_unix_micros.get_or_insert_with(|| {
            i64::try_from(crate::limits::now_ms()).map_or(i64::MAX, |ms| ms.saturating_mul(1000))
        });
        let refusal = UsageStatus::parse(&usage.status).is_some_and(UsageStatus::is_refusal);
        if let (Some(spool), false) = (&self.spool, refusal) {
            match spool.append(&usage).await {
                Ok(()) => return Ok(()),
                // Full disk, a failed flush or the like: this row goes the waiting way instead
                // (the ledger records a row it gets from both ways once).
                Err(e) => {
                    tracing::warn!(error = ?e.error, "usage spool: append failed, sending directly");
                    let sent = self.usage.send(usage).await;
                    if sent.is_err() {
                        // Neither way took it (a full disk or a stalled one while the ledger is
                        // away): the free answer still goes out, and the row is counted, to
                        // alert on; one written but not synced may still ship.
                        let event = if e.written {
                            SpoolEvent::RowUnsynced
                        } else {
                            SpoolEvent::RowLost
                        };
                        crate::metrics::spool_event(event);
                    }
                    return sent;
                }
            }
        }
        self.usage.send(usage).await
    }

    /// Whether free rows go through a local spool (which keeps them while the ledger refuses).
    pub(crate) fn has_spool(&self) -> bool {
        self.spool.is_some()
    }

    /// After a shutdown: waits up to `timeout` until the spool shipped every row (what is left is
    /// shipped by the next router started on the same directory). `true` without a spool.
    pub(crate) async fn drain_spool(&self, timeout: Duration) -> bool {
        match &self.spool {
            Some(spool) => spool.drain(timeout).await,
            None => true,
        }
    }

    pub(crate) async fn record_usage(&self, usage: Usage) -> Result<(), RouterError> {
        let msg = RecordUsageRequest { usage: Some(usage) };
        self.calls
            .answer(Op::RecordUsage, msg, rpc!(record_usage))
            .await
            .map(|_| ())
    }
}

/// Whether the hold an Authorize answered with was placed by another attempt than `attempt` (this
/// request's). By the attempt the ledger names; a ledger that names none (an older version, a
/// hold placed before migration 0029, or 0031 on a hosted ledger) says only whether this call
/// inserted it, and then a hold an earlier round of this call `maybe_ours` placed counts as this
/// request's.
fn placed_by_another(resp: &Transfer, attempt: &str, maybe_ours: bool) -> bool {
    match resp.attempt_id.as_str() {
        "" => resp.existing && !maybe_ours,
        placed_by => placed_by != attempt,
    }
}

/// One endpoint's own gRPC health status, and what went wrong when it did not answer serving.
/// A ledger without the health service (`UNIMPLEMENTED`) answered, so it counts as serving.
async fn probe_one(m: &Member, timeout: Duration) -> (LedgerState, String) {
    let mut client = HealthClient::new(m.channel.clone());
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: LEDGER_SERVICE.into(),
    });
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.check(req)).await {
        Ok(Ok(resp)) => match resp.into_inner().status() {
            ServingStatus::Serving => (LedgerState::Serving, String::new()),
            _ => (
                LedgerState::NotServing,
                "the ledger says NOT_SERVING".into(),
            ),
        },
        Ok(Err(s)) if s.code() == Code::Unimplemented => (LedgerState::Serving, String::new()),
        Ok(Err(s)) => (LedgerState::Unreachable, s.message().to_string()),
        Err(_) => (
            LedgerState::Unreachable,
            format!("no health answer within {timeout:?}"),
        ),
    }
}

/// Bytes of a void's reason sent: the ledger refuses one over 500 bytes or with control
/// characters.
const MAX_VOID_REASON: usize = 256;

/// A void's reason as the ledger takes it. Reasons carry upstream error text (an HTML error page,
/// a long JSON message), and a void the ledger refused for its reason left the hold pending until
/// it expired and the request without a usage row: control characters become spaces and the
/// text is cut at a character boundary.
pub(crate) fn void_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(MAX_VOID_REASON));
    for c in reason.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_VOID_REASON {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hold life a router takes from its ledger's `HOLD_TTL_OUT_OF_RANGE`: only below what it
    /// asked, never under 10 s, the lowest any replica said (two replicas of 120 s and 60 s
    /// answering in either order leave 60), and nothing from another refusal or a maximum that
    /// does not parse.
    #[tokio::test]
    async fn the_hold_life_learnt_is_the_lowest_sane_one_said() {
        let settings = crate::config::LedgerSettings {
            hold_ttl_seconds: Some(3_600),
            ..Default::default()
        };
        let ledger = Ledger::connect(&settings, "owner@example.com").expect("lazy");
        let refusal = |reason: Reason, max: &str| {
            let metadata = [(
                syft_error::MAX_HOLD_TTL_SECONDS.to_string(),
                max.to_string(),
            )];
            syft_error::grpc_status_with(
                reason.code(),
                reason.as_str(),
                "syft.ledger",
                "hold_ttl_seconds 3600 must be between 1 and …".into(),
                metadata.into(),
            )
        };
        let ttl = Reason::HoldTtlOutOfRange;
        assert_eq!(ledger.granted_ttl(&refusal(ttl, "5"), Some(3_600)), None);
        assert_eq!(ledger.granted_ttl(&refusal(ttl, "x"), Some(3_600)), None);
        let other = refusal(Reason::InsufficientFunds, "60");
        assert_eq!(ledger.granted_ttl(&other, Some(3_600)), None);
        assert_eq!(ledger.hold_ttl_seconds(), Some(3_600));
        assert_eq!(
            ledger.granted_ttl(&refusal(ttl, "60"), Some(3_600)),
            Some(60)
        );
        assert_eq!(
            ledger.granted_ttl(&refusal(ttl, "120"), Some(3_600)),
            Some(120)
        );
        assert_eq!(ledger.hold_ttl_seconds(), Some(60));
        // Not above what was asked: nothing to learn.
        assert_eq!(ledger.granted_ttl(&refusal(ttl, "90"), Some(60)), None);
    }

    /// The attempt the ledger names decides; without one, `existing` and whether an earlier
    /// round may have placed the hold do.
    #[test]
    fn a_hold_is_anothers_by_the_attempt_named_else_by_existing() {
        let answer = |attempt_id: &str, existing: bool| Transfer {
            attempt_id: attempt_id.into(),
            existing,
            ..Transfer::default()
        };
        let mine = "01-mine";
        for maybe_ours in [false, true] {
            assert!(!placed_by_another(&answer(mine, true), mine, maybe_ours));
            assert!(!placed_by_another(&answer(mine, false), mine, maybe_ours));
            assert!(placed_by_another(
                &answer("02-a-retry", true),
                mine,
                maybe_ours
            ));
            assert!(!placed_by_another(&answer("", false), mine, maybe_ours));
        }
        assert!(placed_by_another(&answer("", true), mine, false));
        assert!(!placed_by_another(&answer("", true), mine, true));
    }
}
