//! `syft.ledger.v1.Ledger` over gRPC: a thin adapter that turns protobuf messages into the
//! core's domain inputs and store rows back into messages.

use std::future::Future;

use syft_proto::ledger as pb;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::core::{
    AnswerInput, HoldRequest, Ledger, NewAccount, NewToken, PageRequest, RefundQuery,
    RefundRequest, Role, TokenQuery, TransferQuery, UsageDimsQuery, UsageQuery,
};
use crate::domain::{Micros, Refunder, TransferStatus};
use crate::error::{LedgerError, Result};
use crate::store::{
    AccountRow, CaptureAmount, HoldBudgets, RefundRow, TimeRange, TokenRow, TransferRow,
    UsageInput, UsageRow,
};

#[derive(Clone)]
pub struct GrpcLedger(pub Ledger);

impl GrpcLedger {
    pub fn into_server(self) -> pb::ledger_server::LedgerServer<Self> {
        pb::ledger_server::LedgerServer::new(self)
    }

    pub(crate) async fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| {
                v.to_str().map_err(|_| {
                    LedgerError::Unauthenticated("invalid authorization header".into())
                })
            })
            .transpose()?;
        let peer = request.remote_addr().map(|a| a.ip());
        self.0.authenticate(header, peer).await
    }

    /// Every method's frame: authenticate the caller, hand the message and the core to `f`, and
    /// turn its domain error into a status, so each method only converts messages.
    pub(crate) async fn call<T, R, F, Fut>(&self, request: Request<T>, f: F) -> Reply<R>
    where
        F: FnOnce(Ledger, Caller, T) -> Fut,
        Fut: Future<Output = Result<R>>,
    {
        let caller = self.caller(&request).await?;
        let reply = f(self.0.clone(), caller, request.into_inner()).await?;
        Ok(Response::new(reply))
    }
}

pub(crate) type Reply<T> = Result<Response<T>, Status>;

/// Implements a tonic service trait for [`GrpcLedger`]. Each `fn` names its request and reply
/// messages and holds only its conversion: with the core, the caller and the message bound to the
/// names given after the trait, message in, core call, message out. The macro adds the frame every
/// method shares: [`GrpcLedger::call`] (authenticate, run, error to status).
macro_rules! grpc_methods {
    (impl $service:path, |$core:ident, $caller:ident, $req:ident| {
        $(fn $name:ident($Req:ty) -> $Resp:ty $body:block)+
    }) => {
        #[tonic::async_trait]
        impl $service for $crate::grpc::GrpcLedger {
            $(
                async fn $name(
                    &self,
                    request: tonic::Request<$Req>,
                ) -> $crate::grpc::Reply<$Resp> {
                    self.call(request, |$core, $caller, $req| async move $body).await
                }
            )+
        }
    };
}
pub(crate) use grpc_methods;

grpc_methods! {
    impl pb::ledger_server::Ledger, |core, caller, req| {
        fn create_account(pb::CreateAccountRequest) -> pb::CreateAccountResponse {
            let (account, secret) = core.create_account(&caller, NewAccount::from(req)).await?;
            Ok(pb::CreateAccountResponse {
                account: Some(account_pb(&account)),
                secret,
            })
        }

        fn get_account(pb::GetAccountRequest) -> pb::Account {
            Ok(account_pb(&core.account(&caller, &req.email).await?))
        }

        fn deposit(pb::DepositRequest) -> pb::Account {
            let account = core
                .deposit(&caller, &req.email, req.amount_micros, &req.idempotency_key)
                .await?;
            Ok(account_pb(&account))
        }

        fn issue_token(pb::IssueTokenRequest) -> pb::IssueTokenResponse {
            // The issued token does not carry its per-day cap: the reply repeats the request's.
            let limit_per_day_micros = req.limit_per_day_micros;
            let (issued, recipient_email) = core.issue_token(&caller, NewToken::from(req)).await?;
            Ok(pb::IssueTokenResponse {
                token: issued.token,
                token_id: issued.id,
                sender_email: caller.account()?.email.clone(),
                recipient_email,
                expires_at_unix_micros: issued.expires_at,
                spend_limit_micros: issued.spend_limit.map(Micros::get),
                limit_per_day_micros,
            })
        }

        fn revoke_token(pb::RevokeTokenRequest) -> pb::RevokeTokenResponse {
            let (token_id, revoked_at) = core.revoke_token(&caller, &req.token).await?;
            Ok(pb::RevokeTokenResponse {
                token_id,
                revoked_at_unix_micros: revoked_at,
            })
        }

        fn check_token(pb::CheckTokenRequest) -> pb::CheckTokenResponse {
            let (sender_email, token_id) = core.check_token(&caller, &req.token).await?;
            Ok(pb::CheckTokenResponse {
                sender_email,
                token_id,
            })
        }

        fn authorize(pb::AuthorizeRequest) -> pb::Transfer {
            let placed = core.authorize_keyed(&caller, &HoldRequest::from(req)).await?;
            let mut reply = transfer_pb(&placed.row, core.expires_in(&placed.row));
            reply.existing = placed.existing;
            reply.attempt_id = placed.attempt_id;
            Ok(reply)
        }

        fn capture(pb::CaptureRequest) -> pb::Transfer {
            let amount = match req.amount {
                Some(pb::capture_request::Amount::Full(true)) => CaptureAmount::Full,
                Some(pb::capture_request::Amount::AmountMicros(m)) => CaptureAmount::Micros(m),
                Some(pb::capture_request::Amount::Full(false)) | None => {
                    return Err(LedgerError::invalid(
                        "capture needs full = true or amount_micros (there is no implicit full capture)",
                    ))
                }
            };
            let usage = req.usage.map(usage_input);
            let answer = req.answer.map(|a| AnswerInput {
                body: a.body,
                retention_seconds: a.retention_seconds,
            });
            let transfer = core
                .capture(&caller, &req.transfer_id, amount, usage, answer)
                .await?;
            Ok(transfer_pb(&transfer, core.expires_in(&transfer)))
        }

        fn void(pb::VoidRequest) -> pb::Transfer {
            let usage = req.usage.map(usage_input);
            let transfer = core
                .void(&caller, &req.transfer_id, &req.reason, usage)
                .await?;
            Ok(transfer_pb(&transfer, core.expires_in(&transfer)))
        }

        fn get_transfer(pb::GetTransferRequest) -> pb::Transfer {
            let transfer = core.transfer(&caller, &req.transfer_id).await?;
            Ok(transfer_pb(&transfer, core.expires_in(&transfer)))
        }

        fn refund(pb::RefundRequest) -> pb::RefundResponse {
            let done = core
                .refund(&caller, &RefundRequest {
                    transfer_id: req.transfer_id,
                    amount: req.amount_micros,
                    reason: req.reason,
                    idempotency_key: req.idempotency_key,
                })
                .await?;
            Ok(pb::RefundResponse {
                refund: Some(refund_pb(&done.refund)),
                transfer: Some(transfer_pb(&done.transfer, core.expires_in(&done.transfer))),
                refunded_micros: done.refunded.get(),
                existing: done.existing,
            })
        }

        fn list_refunds(pb::ListRefundsRequest) -> pb::ListRefundsResponse {
            let query = RefundQuery {
                transfer_id: req.transfer_id,
                page: PageRequest::new(req.page_token, req.page_size),
            };
            let page = core.refunds(&caller, &query).await?;
            // Money of two currencies is never summed (an admin's page may hold both).
            let one_currency = page.items.windows(2).all(|w| w[0].currency == w[1].currency);
            let refunded_micros = match one_currency {
                true => page.items.iter().map(|r| r.amount.get()).sum(),
                false => 0,
            };
            let (refunds, next_page_token) = page.convert(refund_pb);
            Ok(pb::ListRefundsResponse {
                refunds,
                refunded_micros,
                next_page_token,
            })
        }

        fn extend_hold(pb::ExtendHoldRequest) -> pb::Transfer {
            let transfer = core
                .extend_hold(&caller, &req.transfer_id, req.ttl_seconds)
                .await?;
            Ok(transfer_pb(&transfer, core.expires_in(&transfer)))
        }

        fn get_answer(pb::GetAnswerRequest) -> pb::StoredAnswer {
            let answer = core.answer(&caller, &req.transfer_id).await?;
            Ok(pb::StoredAnswer {
                transfer_id: answer.transfer_id,
                body: answer.body,
                expires_at_unix_micros: answer.expires_at,
            })
        }

        fn list_transfers(pb::ListTransfersRequest) -> pb::ListTransfersResponse {
            let page = core.list_transfers(&caller, &TransferQuery::try_from(req)?).await?;
            let (transfers, next_page_token) = page.convert(|t| transfer_pb(t, core.expires_in(t)));
            Ok(pb::ListTransfersResponse { transfers, next_page_token })
        }

        fn list_tokens(pb::ListTokensRequest) -> pb::ListTokensResponse {
            let page = core.list_tokens(&caller, &TokenQuery::try_from(req)?).await?;
            let (tokens, next_page_token) = page.convert(token_pb);
            Ok(pb::ListTokensResponse { tokens, next_page_token })
        }

        fn list_accounts(pb::ListAccountsRequest) -> pb::ListAccountsResponse {
            let page = core.list_accounts_page(&caller, &req.page_token, req.page_size).await?;
            let (accounts, next_page_token) = page.convert(account_pb);
            Ok(pb::ListAccountsResponse { accounts, next_page_token })
        }

        fn record_usage(pb::RecordUsageRequest) -> pb::UsageRecord {
            let usage = req
                .usage
                .ok_or_else(|| LedgerError::invalid("usage is required"))?;
            let answered_at = usage.answered_at_unix_micros;
            Ok(usage_pb(
                &core.record_usage(&caller, usage_input(usage), answered_at).await?,
            ))
        }

        fn record_usage_batch(pb::RecordUsageBatchRequest) -> pb::RecordUsageBatchResponse {
            let usages = (req.usages.into_iter())
                .map(|u| (u.answered_at_unix_micros, usage_input(u)))
                .collect();
            let rows = core.record_usage_batch(&caller, usages).await?;
            Ok(pb::RecordUsageBatchResponse {
                records: rows.iter().map(usage_pb).collect(),
            })
        }

        fn get_usage_stats(pb::GetUsageStatsRequest) -> pb::GetUsageStatsResponse {
            let query = crate::grpc_stats::stats_query(req)?;
            let stats = core.usage_stats(&caller, &query).await?;
            Ok(crate::grpc_stats::stats_pb(stats))
        }

        fn get_budget_use(pb::GetBudgetUseRequest) -> pb::BudgetUse {
            let u = core.budget_use(&caller, &req.sender_email).await?;
            Ok(pb::BudgetUse {
                day_used_micros: u.day_used,
                month_used_micros: u.month_used,
                day_resets_at_unix_micros: u.day_resets_at,
                month_resets_at_unix_micros: u.month_resets_at,
            })
        }

        fn query_usage(pb::QueryUsageRequest) -> pb::QueryUsageResponse {
            let page = core.query_usage(&caller, &UsageQuery::from(req)).await?;
            let t = &page.items.totals;
            Ok(pb::QueryUsageResponse {
                records: page.items.rows.iter().map(usage_pb).collect(),
                next_page_token: page.next_page_token,
                totals: Some(pb::UsageTotals {
                    requests: t.requests,
                    prompt_tokens: t.prompt_tokens,
                    completion_tokens: t.completion_tokens,
                    total_tokens: t.total_tokens,
                    cost_micros: t.cost.get(),
                    currency: core.usage_currency(&caller),
                }),
            })
        }
    }
}

// Requests into the core's inputs, kept out of the methods above so that each reads as message in,
// core call, message out.
impl From<pb::CreateAccountRequest> for NewAccount {
    fn from(req: pb::CreateAccountRequest) -> Self {
        Self {
            email: req.email,
            organization: req.organization,
            currency: req.currency,
            secret: req.secret,
        }
    }
}

impl From<pb::IssueTokenRequest> for NewToken {
    fn from(req: pb::IssueTokenRequest) -> Self {
        Self {
            recipient_email: req.recipient_email,
            expires_at: req.expires_at_unix_micros,
            spend_limit: req.spend_limit_micros,
            limit_per_day: req.limit_per_day_micros,
        }
    }
}

impl From<pb::AuthorizeRequest> for HoldRequest {
    fn from(req: pb::AuthorizeRequest) -> Self {
        Self {
            sender_email: req.sender_email,
            amount: req.amount_micros,
            token: req.token,
            app_name: req.app_name,
            app_ep_path: req.app_ep_path,
            idempotency_key: req.idempotency_key,
            attempt_id: req.attempt_id,
            hold_ttl_seconds: req.hold_ttl_seconds,
            budgets: HoldBudgets {
                per_day: req.budget_per_day_micros,
                per_month: req.budget_per_month_micros,
            },
        }
    }
}

impl From<pb::QueryUsageRequest> for UsageQuery {
    fn from(req: pb::QueryUsageRequest) -> Self {
        Self {
            dims: UsageDimsQuery {
                user_email: req.user_email,
                app_name: req.app_name,
                endpoint: req.endpoint,
                status: req.status,
                ..Default::default()
            },
            request_id: req.request_id,
            range: TimeRange::new(req.since_unix_micros, req.until_unix_micros),
            page: PageRequest::new(req.page_token, req.page_size),
        }
    }
}

impl TryFrom<pb::ListTransfersRequest> for TransferQuery {
    type Error = LedgerError;

    fn try_from(req: pb::ListTransfersRequest) -> Result<Self> {
        let status = match pb::TransferStatus::try_from(req.status) {
            Ok(pb::TransferStatus::Unspecified) => None,
            Ok(s) => TransferStatus::try_from(s).ok(),
            Err(_) => return Err(LedgerError::invalid("unknown status")),
        };
        Ok(Self {
            account_email: req.account_email,
            role: role(req.role)?,
            status,
            range: TimeRange::new(req.since_unix_micros, req.until_unix_micros),
            app_name: req.app_name,
            token_id: req.token_id,
            page: PageRequest::new(req.page_token, req.page_size),
        })
    }
}

impl TryFrom<pb::ListTokensRequest> for TokenQuery {
    type Error = LedgerError;

    fn try_from(req: pb::ListTokensRequest) -> Result<Self> {
        Ok(Self {
            account_email: req.account_email,
            role: role(req.role)?,
            include_inactive: req.include_inactive,
            page: PageRequest::new(req.page_token, req.page_size),
        })
    }
}

fn role(value: i32) -> Result<Role> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Sender) => Ok(Role::Sender),
        Ok(pb::Role::Recipient) => Ok(Role::Recipient),
        Ok(_) => Ok(Role::Any),
        Err(_) => Err(LedgerError::invalid("unknown role")),
    }
}

fn token_pb(t: &TokenRow) -> pb::Token {
    pb::Token {
        token_id: t.id.clone(),
        sender_email: t.sender_email.clone(),
        recipient_email: t.recipient_email.clone(),
        currency: t.currency.clone(),
        created_at_unix_micros: t.created_at,
        expires_at_unix_micros: t.expires_at,
        spend_limit_micros: t.spend_limit.map(Micros::get),
        spent_micros: t.spent.get(),
        held_micros: t.held.get(),
        revoked_at_unix_micros: t.revoked_at,
        limit_per_day_micros: t.limit_per_day,
    }
}

fn usage_input(u: pb::Usage) -> UsageInput {
    UsageInput {
        request_id: u.request_id,
        app_name: u.app_name,
        endpoint: u.endpoint,
        user_email: u.user_email,
        model: u.model,
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
        status: u.status,
        latency_ms: u.latency_ms,
        upstream_latency_ms: u.upstream_latency_ms,
        ttft_ms: u.ttft_ms,
        row_key: u.row_key,
        reason: u.reason,
    }
}

pub fn account_pb(a: &AccountRow) -> pb::Account {
    pb::Account {
        email: a.email.clone(),
        organization: a.organization.clone(),
        currency: a.currency.clone(),
        balance_micros: a.balance.get(),
        held_micros: a.held.get(),
        available_micros: a.available().get(),
        created_at_unix_micros: a.created_at,
    }
}

fn refund_pb(r: &RefundRow) -> pb::Refund {
    pb::Refund {
        id: r.id.clone(),
        transfer_id: r.transfer_id.clone(),
        amount_micros: r.amount.get(),
        reason: r.reason.clone(),
        by_admin: r.refunded_by == Refunder::Admin,
        idempotency_key: r.idempotency_key.clone(),
        created_at_unix_micros: r.created_at,
        sender_email: r.sender_email.clone(),
        recipient_email: r.recipient_email.clone(),
        currency: r.currency.clone(),
    }
}

/// `expires_in`: [`Ledger::expires_in`](crate::core::Ledger::expires_in) when the answer was made.
pub fn transfer_pb(t: &TransferRow, expires_in: Option<i64>) -> pb::Transfer {
    pb::Transfer {
        id: t.id.clone(),
        sender_email: t.sender_email.clone(),
        recipient_email: t.recipient_email.clone(),
        amount_micros: t.amount.get(),
        captured_micros: t.captured.get(),
        currency: t.currency.clone(),
        status: pb::TransferStatus::from(t.status).into(),
        created_by: pb::Actor::from(t.created_by).into(),
        resolved_by: t
            .resolved_by
            .map_or(pb::Actor::Unspecified, pb::Actor::from)
            .into(),
        app_name: t.app_name.clone(),
        app_ep_path: t.app_ep_path.clone(),
        created_at_unix_micros: t.created_at,
        expires_at_unix_micros: t.expires_at,
        resolved_at_unix_micros: t.resolved_at,
        cancel_reason: t.cancel_reason.clone(),
        idempotency_key: t.idempotency_key.clone(),
        existing: false,
        attempt_id: String::new(),
        token_id: t.token_id.clone().unwrap_or_default(),
        expires_in_micros: expires_in,
        refunded_micros: t.refunded.get(),
    }
}

pub fn usage_pb(u: &UsageRow) -> pb::UsageRecord {
    let x = &u.usage;
    pb::UsageRecord {
        id: u.id.clone(),
        usage: Some(pb::Usage {
            request_id: x.request_id.clone(),
            app_name: x.app_name.clone(),
            endpoint: x.endpoint.clone(),
            user_email: x.user_email.clone(),
            model: x.model.clone(),
            prompt_tokens: x.prompt_tokens,
            completion_tokens: x.completion_tokens,
            total_tokens: x.total_tokens,
            status: x.status.clone(),
            latency_ms: x.latency_ms,
            upstream_latency_ms: x.upstream_latency_ms,
            ttft_ms: x.ttft_ms,
            row_key: x.row_key.clone(),
            answered_at_unix_micros: None,
            reason: x.reason.clone(),
        }),
        transfer_id: u.transfer_id.clone().unwrap_or_default(),
        recipient_email: u.recipient_email.clone(),
        cost_micros: u.cost.get(),
        created_at_unix_micros: u.created_at,
    }
}
