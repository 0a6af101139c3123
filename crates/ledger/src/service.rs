//! The `syft.ledger.v1.Ledger` gRPC service: authentication, validation, then the store.

use std::sync::Arc;

use base64::Engine;
use syft_proto::ledger as pb;
use tonic::{Request, Response, Status};

use crate::auth::{authenticate, generate_secret, Caller};
use crate::error::{LedgerError, Result};
use crate::hosted::{Hosted, HostedAuthorize};
use crate::metrics;
use crate::money::check_positive;
use crate::store::{
    now_micros, sha256_hex, AccountRow, AuthorizeInput, CaptureAmount, Resolution, ResolveInput,
    Store, TransferFilter, TransferRow, UsageFilter, UsageInput, UsageRow,
};
use crate::validate::{self, MAX_KEY, MAX_NAME, MAX_PATH, MAX_REASON};
use crate::LedgerConfig;

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 500;

#[derive(Clone)]
pub struct LedgerService {
    store: Arc<Store>,
    config: Arc<LedgerConfig>,
    /// `backend = hosted`: transfers live on the remote accounting service.
    hosted: Option<Arc<Hosted>>,
}

impl LedgerService {
    pub fn new(store: Arc<Store>, config: Arc<LedgerConfig>) -> Self {
        Self {
            store,
            config,
            hosted: None,
        }
    }

    pub fn with_hosted(mut self, hosted: Arc<Hosted>) -> Self {
        self.hosted = Some(hosted);
        self
    }

    /// Accounts, deposits and tokens belong to the remote service when the backend is hosted.
    fn local_only(&self, what: &str) -> Result<()> {
        match &self.hosted {
            Some(_) => Err(LedgerError::FailedPrecondition(format!(
                "{what} is managed by the hosted accounting service (this ledger runs backend = hosted)"
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn config(&self) -> &LedgerConfig {
        &self.config
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| {
                v.to_str().map_err(|_| {
                    LedgerError::Unauthenticated("invalid authorization header".into())
                })
            })
            .transpose()?;
        authenticate(&self.store, &self.config.admin_key, header).await
    }

    pub(crate) fn require_admin(caller: &Caller) -> Result<()> {
        if caller.is_admin() {
            Ok(())
        } else {
            Err(LedgerError::PermissionDenied("admin only".into()))
        }
    }

    pub(crate) async fn account(&self, email: &str) -> Result<AccountRow> {
        self.store
            .account_by_email(email)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("account {email} not found")))
    }

    fn usage(&self, usage: &pb::Usage) -> Result<UsageInput> {
        let user_email = if usage.user_email.is_empty() {
            String::new()
        } else {
            validate::email("usage.user_email", &usage.user_email)?
        };
        let prompt = validate::count("usage.prompt_tokens", usage.prompt_tokens)?;
        let completion = validate::count("usage.completion_tokens", usage.completion_tokens)?;
        let total = if usage.total_tokens == 0 {
            prompt + completion
        } else {
            validate::count("usage.total_tokens", usage.total_tokens)?
        };
        Ok(UsageInput {
            request_id: validate::text("usage.request_id", &usage.request_id, MAX_KEY, true)?
                .to_string(),
            app_name: validate::text("usage.app_name", &usage.app_name, MAX_NAME, false)?
                .to_string(),
            endpoint: validate::text("usage.endpoint", &usage.endpoint, MAX_PATH, false)?
                .to_string(),
            user_email,
            model: validate::text("usage.model", &usage.model, MAX_NAME, false)?.to_string(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            status: validate::text("usage.status", &usage.status, 64, true)?.to_string(),
            latency_ms: validate::count("usage.latency_ms", usage.latency_ms)?,
            upstream_latency_ms: validate::count(
                "usage.upstream_latency_ms",
                usage.upstream_latency_ms,
            )?,
        })
    }

    pub(crate) async fn create_account(
        &self,
        caller: &Caller,
        req: pb::CreateAccountRequest,
    ) -> Result<pb::CreateAccountResponse> {
        Self::require_admin(caller)?;
        self.local_only("account creation")?;
        let email = validate::new_account_email("email", &req.email)?;
        let organization = validate::text("organization", &req.organization, MAX_NAME, false)?;
        let currency = match &req.currency {
            Some(c) => validate_currency(c)?,
            None => self.config.currency.clone(),
        };
        let secret = match req.secret {
            Some(s) => {
                if s.len() < 8 || s.len() > 256 || s.chars().any(char::is_control) {
                    return Err(LedgerError::invalid(
                        "secret must be 8 to 256 printable characters",
                    ));
                }
                s
            }
            None => generate_secret(),
        };
        let account = self
            .store
            .create_account(&email, organization, &currency, &sha256_hex(&secret))
            .await?;
        tracing::info!(account = %account.email, "account created");
        Ok(pb::CreateAccountResponse {
            account: Some(account_pb(&account)),
            secret,
        })
    }

    pub(crate) async fn deposit(
        &self,
        caller: &Caller,
        req: pb::DepositRequest,
    ) -> Result<AccountRow> {
        Self::require_admin(caller)?;
        self.local_only("depositing")?;
        let email = validate::email("email", &req.email)?;
        let amount = check_positive(
            "amount_micros",
            req.amount_micros,
            self.config.max_amount_micros,
        )?;
        let key = validate::text("idempotency_key", &req.idempotency_key, MAX_KEY, true)?;
        let account = self.store.deposit(&email, amount, key).await?;
        tracing::info!(account = %email, amount, "deposit");
        Ok(account)
    }

    pub(crate) async fn issue_token(
        &self,
        caller: &Caller,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssueTokenResponse> {
        let sender = caller.account()?;
        self.local_only("issuing tokens")?;
        let recipient_email = validate::email("recipient_email", &req.recipient_email)?;
        if recipient_email == sender.email {
            return Err(LedgerError::invalid(
                "a token must be issued to another account",
            ));
        }
        if let Some(expires) = req.expires_at_unix_micros {
            if expires <= now_micros() {
                return Err(LedgerError::invalid("expires_at must be in the future"));
            }
        }
        if let Some(limit) = req.spend_limit_micros {
            check_positive("spend_limit_micros", limit, self.config.max_amount_micros)?;
        }
        let recipient = self.account(&recipient_email).await?;
        if recipient.currency != sender.currency {
            return Err(LedgerError::FailedPrecondition(format!(
                "currencies differ: {} pays in {}, {} is paid in {}",
                sender.email, sender.currency, recipient.email, recipient.currency
            )));
        }
        let issued = self
            .store
            .issue_token(
                sender,
                &recipient,
                req.expires_at_unix_micros,
                req.spend_limit_micros,
            )
            .await?;
        Ok(pb::IssueTokenResponse {
            token: issued.token,
            token_id: issued.id,
            sender_email: sender.email.clone(),
            recipient_email,
            expires_at_unix_micros: issued.expires_at,
            spend_limit_micros: issued.spend_limit,
        })
    }

    /// Places a hold (counted in the metrics once, not on replays).
    pub(crate) async fn authorize(
        &self,
        caller: &Caller,
        req: pb::AuthorizeRequest,
    ) -> Result<TransferRow> {
        let started = metrics::now();
        let transfer = self.place_hold(caller, req).await?;
        metrics::authorized(&transfer, started);
        Ok(transfer)
    }

    pub(crate) async fn capture(
        &self,
        caller: &Caller,
        req: pb::CaptureRequest,
    ) -> Result<TransferRow> {
        let started = metrics::now();
        let transfer = self.capture_hold(caller, req).await?;
        metrics::resolved(&transfer, started);
        Ok(transfer)
    }

    pub(crate) async fn void(&self, caller: &Caller, req: pb::VoidRequest) -> Result<TransferRow> {
        let started = metrics::now();
        let transfer = self.void_hold(caller, req).await?;
        metrics::resolved(&transfer, started);
        Ok(transfer)
    }

    async fn place_hold(&self, caller: &Caller, req: pb::AuthorizeRequest) -> Result<TransferRow> {
        let recipient = caller.account()?;
        let sender_email = validate::email("sender_email", &req.sender_email)?;
        let amount = check_positive(
            "amount_micros",
            req.amount_micros,
            self.config.max_amount_micros,
        )?;
        let token = validate::text("token", &req.token, 512, true)?;
        let app_name = validate::text("app_name", &req.app_name, MAX_NAME, false)?;
        let app_ep_path = validate::text("app_ep_path", &req.app_ep_path, MAX_PATH, false)?;
        let key = validate::text("idempotency_key", &req.idempotency_key, MAX_KEY, true)?;
        let max_ttl = self.config.max_hold_ttl.as_secs() as i64;
        let ttl = match req.hold_ttl_seconds {
            None => self.config.hold_ttl.as_micros() as i64,
            Some(s) if (1..=max_ttl).contains(&s) => s * 1_000_000,
            Some(s) => {
                return Err(LedgerError::invalid(format!(
                    "hold_ttl_seconds {s} must be between 1 and {max_ttl}"
                )))
            }
        };
        if let Some(hosted) = &self.hosted {
            return hosted
                .authorize(&HostedAuthorize {
                    sender_email: &sender_email,
                    amount,
                    token,
                    app_name,
                    app_ep_path,
                    idempotency_key: key,
                    ttl_micros: ttl,
                })
                .await;
        }
        let transfer = self
            .store
            .authorize(&AuthorizeInput {
                recipient_id: recipient.id,
                recipient_email: &recipient.email,
                sender_email: &sender_email,
                amount,
                token,
                app_name,
                app_ep_path,
                idempotency_key: key,
                ttl_micros: ttl,
            })
            .await?;
        tracing::debug!(transfer = %transfer.id, sender = %transfer.sender_email, amount, "authorized");
        Ok(transfer)
    }

    async fn capture_hold(&self, caller: &Caller, req: pb::CaptureRequest) -> Result<TransferRow> {
        let recipient = caller.account()?;
        let transfer_id = validate::text("transfer_id", &req.transfer_id, MAX_KEY, true)?;
        let amount = match req.amount {
            Some(pb::capture_request::Amount::Full(true)) => CaptureAmount::Full,
            Some(pb::capture_request::Amount::Full(false)) | None => {
                return Err(LedgerError::invalid(
                    "capture needs full = true or amount_micros (there is no implicit full capture)",
                ))
            }
            Some(pb::capture_request::Amount::AmountMicros(m)) => {
                if m == 0 {
                    return Err(LedgerError::invalid("capture amount 0: use Void to release a hold"));
                }
                CaptureAmount::Micros(check_positive("amount_micros", m, self.config.max_amount_micros)?)
            }
        };
        let usage = req.usage.as_ref().map(|u| self.usage(u)).transpose()?;
        if let Some(hosted) = &self.hosted {
            return hosted.capture(transfer_id, amount, usage.as_ref()).await;
        }
        self.store
            .resolve(&ResolveInput {
                transfer_id,
                recipient_id: Some(recipient.id),
                resolution: Resolution::Capture(amount),
                usage: usage.as_ref(),
                by_sender: false,
            })
            .await
    }

    async fn void_hold(&self, caller: &Caller, req: pb::VoidRequest) -> Result<TransferRow> {
        let recipient = caller.account()?;
        let transfer_id = validate::text("transfer_id", &req.transfer_id, MAX_KEY, true)?;
        let reason = validate::text("reason", &req.reason, MAX_REASON, false)?;
        let reason = if reason.is_empty() {
            "voided by recipient"
        } else {
            reason
        };
        let usage = req.usage.as_ref().map(|u| self.usage(u)).transpose()?;
        if let Some(hosted) = &self.hosted {
            return hosted
                .void(transfer_id, reason, "RECIPIENT", usage.as_ref())
                .await;
        }
        self.store
            .resolve(&ResolveInput {
                transfer_id,
                recipient_id: Some(recipient.id),
                resolution: Resolution::Void {
                    reason: reason.to_string(),
                },
                usage: usage.as_ref(),
                by_sender: false,
            })
            .await
    }

    async fn list_transfers(
        &self,
        caller: &Caller,
        req: pb::ListTransfersRequest,
    ) -> Result<pb::ListTransfersResponse> {
        let limit = page_size(req.page_size)?;
        let account_id = match (caller, req.account_email.is_empty()) {
            (Caller::Admin, true) => None,
            (Caller::Admin, false) => {
                let email = validate::email("account_email", &req.account_email)?;
                Some(self.account(&email).await?.id)
            }
            (Caller::Account(a), true) => Some(a.id),
            (Caller::Account(a), false) => {
                let email = validate::email("account_email", &req.account_email)?;
                if email != a.email {
                    return Err(LedgerError::PermissionDenied(
                        "you may list only your own transfers".into(),
                    ));
                }
                Some(a.id)
            }
        };
        let role =
            pb::Role::try_from(req.role).map_err(|_| LedgerError::invalid("unknown role"))?;
        let status = match pb::TransferStatus::try_from(req.status) {
            Ok(pb::TransferStatus::Unspecified) => None,
            Ok(s) => Some(status_name(s).to_string()),
            Err(_) => return Err(LedgerError::invalid("unknown status")),
        };
        let filter = TransferFilter {
            account_id,
            as_sender: role == pb::Role::Sender,
            as_recipient: role == pb::Role::Recipient,
            status,
            since: req.since_unix_micros,
            until: req.until_unix_micros,
            app_name: non_empty(validate::text("app_name", &req.app_name, MAX_NAME, false)?),
            before_id: decode_page_token(&req.page_token)?,
            limit,
        };
        let (rows, has_more) = match &self.hosted {
            Some(hosted) => {
                hosted
                    .list(
                        filter.status.as_deref(),
                        filter.before_id.as_deref(),
                        filter.limit,
                    )
                    .await?
            }
            None => self.store.list_transfers(&filter).await?,
        };
        let next_page_token = match (has_more, rows.last()) {
            (true, Some(last)) => encode_page_token(&last.id),
            _ => String::new(),
        };
        Ok(pb::ListTransfersResponse {
            transfers: rows.iter().map(transfer_pb).collect(),
            next_page_token,
        })
    }

    async fn query_usage(
        &self,
        caller: &Caller,
        req: pb::QueryUsageRequest,
    ) -> Result<pb::QueryUsageResponse> {
        let limit = page_size(req.page_size)?;
        let account = match caller {
            Caller::Admin => None,
            Caller::Account(a) => Some((a.id, a.email.clone())),
        };
        let user_email = if req.user_email.is_empty() {
            None
        } else {
            Some(validate::email("user_email", &req.user_email)?)
        };
        let filter = UsageFilter {
            account,
            since: req.since_unix_micros,
            until: req.until_unix_micros,
            user_email,
            app_name: non_empty(validate::text("app_name", &req.app_name, MAX_NAME, false)?),
            endpoint: non_empty(validate::text("endpoint", &req.endpoint, MAX_PATH, false)?),
            status: non_empty(validate::text("status", &req.status, 64, false)?),
            before_id: decode_page_token(&req.page_token)?,
            limit,
        };
        let page = self.store.query_usage(&filter).await?;
        let next_page_token = match (page.has_more, page.rows.last()) {
            (true, Some(last)) => encode_page_token(&last.id),
            _ => String::new(),
        };
        let t = &page.totals;
        Ok(pb::QueryUsageResponse {
            records: page.rows.iter().map(usage_pb).collect(),
            next_page_token,
            totals: Some(pb::UsageTotals {
                requests: t.requests,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                total_tokens: t.total_tokens,
                cost_micros: t.cost,
                currency: crate::listing::usage_currency(self, caller),
            }),
        })
    }
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(
            self.create_account(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let caller = self.caller(&request).await?;
        let email = validate::email("email", &request.get_ref().email)?;
        if !caller.may_see(&email) {
            return Err(
                LedgerError::PermissionDenied("you may read only your own account".into()).into(),
            );
        }
        if let Some(hosted) = &self.hosted {
            if email != hosted.owner_email() {
                return Err(LedgerError::NotFound(format!(
                    "account {email} is not known to this hosted ledger"
                ))
                .into());
            }
            return Ok(Response::new(hosted.account().await?));
        }
        Ok(Response::new(account_pb(&self.account(&email).await?)))
    }

    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let caller = self.caller(&request).await?;
        let account = self.deposit(&caller, request.into_inner()).await?;
        Ok(Response::new(account_pb(&account)))
    }

    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(
            self.issue_token(&caller, request.into_inner()).await?,
        ))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let sender = caller.account()?;
        self.local_only("revoking tokens")?;
        let token = validate::text("token", &request.get_ref().token, 512, true)?;
        let (token_id, revoked_at) = self.store.revoke_token(sender.id, token).await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            token_id,
            revoked_at_unix_micros: revoked_at,
        }))
    }

    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        let caller = self.caller(&request).await?;
        let transfer = self.authorize(&caller, request.into_inner()).await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn capture(
        &self,
        request: Request<pb::CaptureRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        let caller = self.caller(&request).await?;
        let transfer = self.capture(&caller, request.into_inner()).await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn void(
        &self,
        request: Request<pb::VoidRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        let caller = self.caller(&request).await?;
        let transfer = self.void(&caller, request.into_inner()).await?;
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn get_transfer(
        &self,
        request: Request<pb::GetTransferRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        let caller = self.caller(&request).await?;
        let id = validate::text("transfer_id", &request.get_ref().transfer_id, MAX_KEY, true)?;
        let not_found = || LedgerError::NotFound(format!("transfer {id} not found"));
        let transfer = match &self.hosted {
            Some(hosted) => hosted.transfer(id).await?,
            None => self.store.transfer_by_id(id).await?,
        }
        .ok_or_else(not_found)?;
        if !(caller.may_see(&transfer.sender_email) || caller.may_see(&transfer.recipient_email)) {
            return Err(not_found().into());
        }
        Ok(Response::new(transfer_pb(&transfer)))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let caller = self.caller(&request).await?;
        let page = crate::listing::list_tokens(self, &caller, request.into_inner()).await?;
        Ok(Response::new(page))
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let page = crate::listing::list_accounts(self, &caller, request.into_inner()).await?;
        Ok(Response::new(page))
    }

    async fn list_transfers(
        &self,
        request: Request<pb::ListTransfersRequest>,
    ) -> Result<Response<pb::ListTransfersResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(
            self.list_transfers(&caller, request.into_inner()).await?,
        ))
    }

    async fn record_usage(
        &self,
        request: Request<pb::RecordUsageRequest>,
    ) -> Result<Response<pb::UsageRecord>, Status> {
        let caller = self.caller(&request).await?;
        let recipient = caller.account()?;
        let usage = request
            .get_ref()
            .usage
            .as_ref()
            .ok_or_else(|| LedgerError::invalid("usage is required"))?;
        let usage = self.usage(usage)?;
        let row = self.store.record_usage(recipient.id, &usage).await?;
        Ok(Response::new(usage_pb(&row)))
    }

    async fn query_usage(
        &self,
        request: Request<pb::QueryUsageRequest>,
    ) -> Result<Response<pb::QueryUsageResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(
            self.query_usage(&caller, request.into_inner()).await?,
        ))
    }
}

fn validate_currency(c: &str) -> Result<String> {
    if c.len() == 3 && c.chars().all(|ch| ch.is_ascii_alphabetic()) {
        Ok(c.to_ascii_uppercase())
    } else {
        Err(LedgerError::invalid(format!(
            "currency {c:?} must be a 3-letter code such as USD"
        )))
    }
}

fn page_size(requested: u32) -> Result<i64> {
    match requested {
        0 => Ok(DEFAULT_PAGE as i64),
        n if n <= MAX_PAGE => Ok(n as i64),
        n => Err(LedgerError::invalid(format!(
            "page_size {n} exceeds the maximum of {MAX_PAGE}"
        ))),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn encode_page_token(last_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id)
}

fn decode_page_token(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| s.len() <= 64 && uuid::Uuid::parse_str(s).is_ok())
        .map(Some)
        .ok_or_else(|| LedgerError::invalid("invalid page_token"))
}

pub fn status_name(s: pb::TransferStatus) -> &'static str {
    match s {
        pb::TransferStatus::Pending => "PENDING",
        pb::TransferStatus::Completed => "COMPLETED",
        pb::TransferStatus::Cancelled => "CANCELLED",
        pb::TransferStatus::Unspecified => "",
    }
}

fn status_pb(s: &str) -> pb::TransferStatus {
    match s {
        "PENDING" => pb::TransferStatus::Pending,
        "COMPLETED" => pb::TransferStatus::Completed,
        "CANCELLED" => pb::TransferStatus::Cancelled,
        _ => pb::TransferStatus::Unspecified,
    }
}

fn actor_pb(s: Option<&str>) -> pb::Actor {
    match s {
        Some("SYSTEM") => pb::Actor::System,
        Some("SENDER") => pb::Actor::Sender,
        Some("RECIPIENT") => pb::Actor::Recipient,
        _ => pb::Actor::Unspecified,
    }
}

pub fn account_pb(a: &AccountRow) -> pb::Account {
    pb::Account {
        email: a.email.clone(),
        organization: a.organization.clone(),
        currency: a.currency.clone(),
        balance_micros: a.balance,
        held_micros: a.held,
        available_micros: a.available(),
        created_at_unix_micros: a.created_at,
    }
}

pub fn transfer_pb(t: &TransferRow) -> pb::Transfer {
    pb::Transfer {
        id: t.id.clone(),
        sender_email: t.sender_email.clone(),
        recipient_email: t.recipient_email.clone(),
        amount_micros: t.amount,
        captured_micros: t.captured,
        currency: t.currency.clone(),
        status: status_pb(&t.status).into(),
        created_by: actor_pb(Some(&t.created_by)).into(),
        resolved_by: actor_pb(t.resolved_by.as_deref()).into(),
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
        }),
        transfer_id: u.transfer_id.clone().unwrap_or_default(),
        recipient_email: u.recipient_email.clone(),
        cost_micros: u.cost,
        created_at_unix_micros: u.created_at,
    }
}
