//! Listing delegation tokens and accounts (admin), and the currency usage totals are in.

use crate::auth::Caller;
use crate::error::{LedgerError, Result};
use crate::store::{now_micros, AccountRow, TokenFilter, TokenRow};
use crate::validate;

use super::{decode_page_token, keyset_page, page_size, Ledger, Page, Role};

/// A page of delegation tokens to list (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct TokenQuery {
    /// Empty: the caller's own (admin: every account's).
    pub account_email: String,
    pub role: Role,
    /// Revoked and expired tokens too.
    pub include_inactive: bool,
    pub page_token: String,
    pub page_size: u32,
}

impl Ledger {
    /// Whose rows a listing shows: `account_email` (the admin may name anyone, an account only
    /// itself), or when empty the caller's own (the admin's: everyone's, `None`).
    pub(super) async fn listed_account(
        &self,
        caller: &Caller,
        account_email: &str,
        what: &str,
    ) -> Result<Option<i64>> {
        if account_email.is_empty() {
            return Ok(match caller {
                Caller::Admin => None,
                Caller::Account(a) => Some(a.id),
            });
        }
        let email = validate::email("account_email", account_email)?;
        match caller {
            Caller::Admin => Ok(Some(self.backend.account(&email).await?.id)),
            Caller::Account(a) if a.email == email => Ok(Some(a.id)),
            Caller::Account(_) => Err(LedgerError::PermissionDenied(format!(
                "you may list only your own {what}"
            ))),
        }
    }

    /// Tokens the caller issued or received (the admin: anyone's), newest first.
    pub async fn list_tokens(
        &self,
        caller: &Caller,
        q: &TokenQuery,
    ) -> Result<Page<Vec<TokenRow>>> {
        let limit = page_size(q.page_size)?;
        let account_id = self
            .listed_account(caller, &q.account_email, "tokens")
            .await?;
        let filter = TokenFilter {
            account_id,
            as_sender: q.role == Role::Sender,
            as_recipient: q.role == Role::Recipient,
            include_inactive: q.include_inactive,
            now: now_micros(),
            before_id: decode_page_token(&q.page_token)?,
            limit,
        };
        let (rows, has_more) = self.backend.list_tokens(&filter).await?;
        Ok(keyset_page(rows, has_more, |t| t.id.clone()))
    }

    /// Every account, oldest first, a page at a time (admin).
    pub async fn list_accounts_page(
        &self,
        caller: &Caller,
        page_token: &str,
        page_size_requested: u32,
    ) -> Result<Page<Vec<AccountRow>>> {
        if !caller.is_admin() {
            return Err(LedgerError::PermissionDenied("admin only".into()));
        }
        let limit = page_size(page_size_requested)?;
        // The cursor is an account id, not a transfer id: decoded here, not by the UUID check.
        let after_id = if page_token.is_empty() {
            None
        } else {
            use base64::Engine;
            let id = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| LedgerError::invalid("invalid page_token"))?;
            Some(id)
        };
        let (rows, has_more) = self.backend.list_accounts_page(after_id, limit).await?;
        Ok(keyset_page(rows, has_more, |a| a.id.to_string()))
    }

    /// The currency of usage costs: usage rows carry none, and a ledger keeps one currency per
    /// account, so an account sees its own; the admin, the ledger's default.
    pub fn usage_currency(&self, caller: &Caller) -> String {
        match caller {
            Caller::Account(a) => a.currency.clone(),
            Caller::Admin => self.config.currency.clone(),
        }
    }
}
