//! Listing delegation tokens (`ListTokens`) and accounts (`ListAccounts`, admin), and the currency
//! usage totals are in. Kept apart from the transfer flow: each gRPC handler is one call here.

use base64::Engine;
use syft_proto::ledger as pb;

use crate::auth::Caller;
use crate::error::{LedgerError, Result};
use crate::service::{account_pb, LedgerService};
use crate::store::{now_micros, TokenFilter, TokenRow};
use crate::validate;

/// Rows per page when the caller does not say, and the most it may ask for.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 500;

fn page_size(requested: u32) -> Result<i64> {
    match requested {
        0 => Ok(i64::from(DEFAULT_PAGE)),
        n if n <= MAX_PAGE => Ok(i64::from(n)),
        n => Err(LedgerError::invalid(format!(
            "page_size {n} exceeds the maximum of {MAX_PAGE}"
        ))),
    }
}

fn encode(cursor: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(cursor)
}

fn decode(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| s.len() <= 64)
        .map(Some)
        .ok_or_else(|| LedgerError::invalid("invalid page_token"))
}

/// Accounts, tokens and their listings live in the remote service when the backend is hosted.
fn local_only(service: &LedgerService, what: &str) -> Result<()> {
    match service.config().hosted {
        Some(_) => Err(LedgerError::FailedPrecondition(format!(
            "{what} is managed by the hosted accounting service (this ledger runs backend = hosted)"
        ))),
        None => Ok(()),
    }
}

pub(crate) async fn list_tokens(
    service: &LedgerService,
    caller: &Caller,
    req: pb::ListTokensRequest,
) -> Result<pb::ListTokensResponse> {
    local_only(service, "token listing")?;
    let limit = page_size(req.page_size)?;
    let account_id = match (caller, req.account_email.is_empty()) {
        (Caller::Admin, true) => None,
        (Caller::Admin, false) => {
            let email = validate::email("account_email", &req.account_email)?;
            Some(service.account(&email).await?.id)
        }
        (Caller::Account(a), true) => Some(a.id),
        (Caller::Account(a), false) => {
            if validate::email("account_email", &req.account_email)? != a.email {
                return Err(LedgerError::PermissionDenied(
                    "you may list only your own tokens".into(),
                ));
            }
            Some(a.id)
        }
    };
    let role = pb::Role::try_from(req.role).map_err(|_| LedgerError::invalid("unknown role"))?;
    let before_id = decode(&req.page_token)?;
    if before_id
        .as_deref()
        .is_some_and(|id| uuid::Uuid::parse_str(id).is_err())
    {
        return Err(LedgerError::invalid("invalid page_token"));
    }
    let filter = TokenFilter {
        account_id,
        as_sender: role == pb::Role::Sender,
        as_recipient: role == pb::Role::Recipient,
        include_inactive: req.include_inactive,
        now: now_micros(),
        before_id,
        limit,
    };
    let (rows, has_more) = service.store().list_tokens(&filter).await?;
    let next_page_token = match (has_more, rows.last()) {
        (true, Some(last)) => encode(&last.id),
        _ => String::new(),
    };
    Ok(pb::ListTokensResponse {
        tokens: rows.iter().map(token_pb).collect(),
        next_page_token,
    })
}

pub(crate) async fn list_accounts(
    service: &LedgerService,
    caller: &Caller,
    req: pb::ListAccountsRequest,
) -> Result<pb::ListAccountsResponse> {
    LedgerService::require_admin(caller)?;
    local_only(service, "account listing")?;
    let limit = page_size(req.page_size)?;
    let after_id = decode(&req.page_token)?
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| LedgerError::invalid("invalid page_token"))
        })
        .transpose()?;
    let (rows, has_more) = service.store().list_accounts_page(after_id, limit).await?;
    let next_page_token = match (has_more, rows.last()) {
        (true, Some(last)) => encode(&last.id.to_string()),
        _ => String::new(),
    };
    Ok(pb::ListAccountsResponse {
        accounts: rows.iter().map(account_pb).collect(),
        next_page_token,
    })
}

/// The currency of usage costs: usage rows carry none, and a ledger keeps one currency per
/// account, so an account sees its own; the admin, the ledger's default.
pub(crate) fn usage_currency(service: &LedgerService, caller: &Caller) -> String {
    match caller {
        Caller::Account(a) => a.currency.clone(),
        Caller::Admin => service.config().currency.clone(),
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
        spend_limit_micros: t.spend_limit,
        spent_micros: t.spent,
        held_micros: t.held,
        revoked_at_unix_micros: t.revoked_at,
    }
}
