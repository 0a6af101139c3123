//! `syft.ledger.v1.Ledger` over gRPC: a thin adapter that turns protobuf messages into the
//! core's domain inputs and store rows back into messages.

use syft_proto::ledger as pb;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::core::{
    AnswerInput, HoldRequest, Ledger, NewAccount, NewToken, Role, TokenQuery, TransferQuery,
    UsageQuery,
};
use crate::domain::{Micros, TransferStatus};
use crate::error::{LedgerError, Result};
use crate::store::{AccountRow, CaptureAmount, TokenRow, TransferRow, UsageInput, UsageRow};

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
        self.0.authenticate(header).await
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::ledger_server::Ledger for GrpcLedger {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Reply<pb::CreateAccountResponse> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (account, secret) = self
            .0
            .create_account(
                &caller,
                NewAccount {
                    email: req.email,
                    organization: req.organization,
                    currency: req.currency,
                    secret: req.secret,
                },
            )
            .await?;
        Ok(Response::new(pb::CreateAccountResponse {
            account: Some(account_pb(&account)),
            secret,
        }))
    }

    async fn get_account(&self, request: Request<pb::GetAccountRequest>) -> Reply<pb::Account> {
        let caller = self.caller(&request).await?;
        let account = self.0.account(&caller, &request.get_ref().email).await?;
        Ok(Response::new(account_pb(&account)))
    }

    async fn deposit(&self, request: Request<pb::DepositRequest>) -> Reply<pb::Account> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let account = self
            .0
            .deposit(&caller, &req.email, req.amount_micros, &req.idempotency_key)
            .await?;
        Ok(Response::new(account_pb(&account)))
    }

    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Reply<pb::IssueTokenResponse> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (issued, recipient_email) = self
            .0
            .issue_token(
                &caller,
                NewToken {
                    recipient_email: req.recipient_email,
                    expires_at: req.expires_at_unix_micros,
                    spend_limit: req.spend_limit_micros,
                    limit_per_day: req.limit_per_day_micros,
                },
            )
            .await?;
        Ok(Response::new(pb::IssueTokenResponse {
            token: issued.token,
            token_id: issued.id,
            sender_email: caller.account()?.email.clone(),
            recipient_email,
            expires_at_unix_micros: issued.expires_at,
            spend_limit_micros: issued.spend_limit.map(Micros::get),
            limit_per_day_micros: req.limit_per_day_micros,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Reply<pb::RevokeTokenResponse> {
        let caller = self.caller(&request).await?;
        let (token_id, revoked_at) = self
            .0
            .revoke_token(&caller, &request.get_ref().token)
            .await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            token_id,
            revoked_at_unix_micros: revoked_at,
        }))
    }

    async fn authorize(&self, request: Request<pb::AuthorizeRequest>) -> Reply<pb::Transfer> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let hold = HoldRequest {
            sender_email: req.sender_email,
            amount: req.amount_micros,
            token: req.token,
            app_name: req.app_name,
            app_ep_path: req.app_ep_path,
            idempotency_key: req.idempotency_key,
            hold_ttl_seconds: req.hold_ttl_seconds,
            budget_per_day_micros: req.budget_per_day_micros,
            budget_per_month_micros: req.budget_per_month_micros,
        };
        let transfer = self.0.authorize(&caller, &hold).await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn capture(&self, request: Request<pb::CaptureRequest>) -> Reply<pb::Transfer> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let amount = match req.amount {
            Some(pb::capture_request::Amount::Full(true)) => CaptureAmount::Full,
            Some(pb::capture_request::Amount::AmountMicros(m)) => CaptureAmount::Micros(m),
            Some(pb::capture_request::Amount::Full(false)) | None => {
                return Err(LedgerError::invalid(
                    "capture needs full = true or amount_micros (there is no implicit full capture)",
                )
                .into())
            }
        };
        let usage = req.usage.map(usage_input);
        let answer = req.answer.map(|a| AnswerInput {
            body: a.body,
            retention_seconds: a.retention_seconds,
        });
        let transfer = self
            .0
            .capture(&caller, &req.transfer_id, amount, usage, answer)
            .await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn void(&self, request: Request<pb::VoidRequest>) -> Reply<pb::Transfer> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let usage = req.usage.map(usage_input);
        let transfer = self
            .0
            .void(&caller, &req.transfer_id, &req.reason, usage)
            .await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn get_transfer(&self, request: Request<pb::GetTransferRequest>) -> Reply<pb::Transfer> {
        let caller = self.caller(&request).await?;
        let transfer = self
            .0
            .transfer(&caller, &request.get_ref().transfer_id)
            .await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn extend_hold(&self, request: Request<pb::ExtendHoldRequest>) -> Reply<pb::Transfer> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let transfer = self
            .0
            .extend_hold(&caller, &req.transfer_id, req.ttl_seconds)
            .await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn get_answer(&self, request: Request<pb::GetAnswerRequest>) -> Reply<pb::StoredAnswer> {
        let caller = self.caller(&request).await?;
        let answer = self
            .0
            .answer(&caller, &request.get_ref().transfer_id)
            .await?;
        Ok(Response::new(pb::StoredAnswer {
            transfer_id: answer.transfer_id,
            body: answer.body,
            expires_at_unix_micros: answer.expires_at,
        }))
    }

    async fn list_transfers(
        &self,
        request: Request<pb::ListTransfersRequest>,
    ) -> Reply<pb::ListTransfersResponse> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let role = role(req.role)?;
        let status = match pb::TransferStatus::try_from(req.status) {
            Ok(pb::TransferStatus::Unspecified) => None,
            Ok(s) => TransferStatus::try_from(s).ok(),
            Err(_) => return Err(LedgerError::invalid("unknown status").into()),
        };
        let query = TransferQuery {
            account_email: req.account_email,
            role,
            status,
            since: req.since_unix_micros,
            until: req.until_unix_micros,
            app_name: req.app_name,
            page_token: req.page_token,
            page_size: req.page_size,
        };
        let page = self.0.list_transfers(&caller, &query).await?;
        Ok(Response::new(pb::ListTransfersResponse {
            transfers: page.items.iter().map(transfer_pb).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Reply<pb::ListTokensResponse> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let query = TokenQuery {
            account_email: req.account_email,
            role: role(req.role)?,
            include_inactive: req.include_inactive,
            page_token: req.page_token,
            page_size: req.page_size,
        };
        let page = self.0.list_tokens(&caller, &query).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: page.items.iter().map(token_pb).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Reply<pb::ListAccountsResponse> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let page = self
            .0
            .list_accounts_page(&caller, &req.page_token, req.page_size)
            .await?;
        Ok(Response::new(pb::ListAccountsResponse {
            accounts: page.items.iter().map(account_pb).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn record_usage(
        &self,
        request: Request<pb::RecordUsageRequest>,
    ) -> Reply<pb::UsageRecord> {
        let caller = self.caller(&request).await?;
        let usage = request
            .into_inner()
            .usage
            .ok_or_else(|| LedgerError::invalid("usage is required"))?;
        let row = self.0.record_usage(&caller, usage_input(usage)).await?;
        Ok(Response::new(usage_pb(&row)))
    }

    async fn record_usage_batch(
        &self,
        request: Request<pb::RecordUsageBatchRequest>,
    ) -> Reply<pb::RecordUsageBatchResponse> {
        let caller = self.caller(&request).await?;
        let usages = request
            .into_inner()
            .usages
            .into_iter()
            .map(usage_input)
            .collect();
        let rows = self.0.record_usage_batch(&caller, usages).await?;
        Ok(Response::new(pb::RecordUsageBatchResponse {
            records: rows.iter().map(usage_pb).collect(),
        }))
    }

    async fn get_usage_stats(
        &self,
        request: Request<pb::GetUsageStatsRequest>,
    ) -> Reply<pb::GetUsageStatsResponse> {
        let caller = self.caller(&request).await?;
        let query = crate::grpc_stats::stats_query(request.into_inner())?;
        let stats = self.0.usage_stats(&caller, &query).await?;
        Ok(Response::new(crate::grpc_stats::stats_pb(stats)))
    }

    async fn query_usage(
        &self,
        request: Request<pb::QueryUsageRequest>,
    ) -> Reply<pb::QueryUsageResponse> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let query = UsageQuery {
            user_email: req.user_email,
            app_name: req.app_name,
            endpoint: req.endpoint,
            status: req.status,
            since: req.since_unix_micros,
            until: req.until_unix_micros,
            page_token: req.page_token,
            page_size: req.page_size,
        };
        let page = self.0.query_usage(&caller, &query).await?;
        let t = &page.items.totals;
        Ok(Response::new(pb::QueryUsageResponse {
            records: page.items.rows.iter().map(usage_pb).collect(),
            next_page_token: page.next_page_token,
            totals: Some(pb::UsageTotals {
                requests: t.requests,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                total_tokens: t.total_tokens,
                cost_micros: t.cost.get(),
                currency: self.0.usage_currency(&caller),
            }),
        }))
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

pub fn transfer_pb(t: &TransferRow) -> pb::Transfer {
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
        }),
        transfer_id: u.transfer_id.clone().unwrap_or_default(),
        recipient_email: u.recipient_email.clone(),
        cost_micros: u.cost.get(),
        created_at_unix_micros: u.created_at,
    }
}
