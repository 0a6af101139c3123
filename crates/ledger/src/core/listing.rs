//! Listing delegation tokens and accounts (admin), and the currency usage totals are in.

use crate::auth::Caller;
use crate::error::{LedgerError, Result};
use crate::store::{AccountRow, Parties, TokenFilter, TokenRow};
use crate::validate;

use super::{keyset_page, page_size, Ledger, Page, PageRequest, Role};

/// A page of delegation tokens to list (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct TokenQuery {
    /// Empty: the caller's own (admin: every account's).
    pub account_email: String,
    pub role: Role,
    /// Revoked and expired tokens too.
    pub include_inactive: bool,
    pub page: PageRequest,
}

impl Ledger {
    /// Whose rows a listing shows: `account_email`'s (the admin may name anyone, an account only
    /// itself), or when empty the caller's own (the admin's: everyone's), on the `role` side.
    pub(super) async fn listed_parties(
        &self,
        caller: &Caller,
        account_email: &str,
        role: Role,
        what: &str,
    ) -> Result<Parties> {
        let account_id = if account_email.is_empty() {
            match caller {
                Caller::Admin => None,
                Caller::Account(a) => Some(a.id),
            }
        } else {
            let email = validate::email("account_email", account_email)?;
            match caller {
                Caller::Admin => Some(self.backend.account(&email).await?.id),
                Caller::Account(a) if a.email == email => Some(a.id),
                Caller::Account(_) => {
                    return Err(LedgerError::PermissionDenied(format!(
                        "you may list only your own {what}"
                    )))
                }
            }
        };
        Ok(Parties {
            account_id,
            as_sender: role == Role::Sender,
            as_recipient: role == Role::Recipient,
        })
    }

    /// Tokens the caller issued or received (the admin: anyone's), newest first.
    pub async fn list_tokens(
        &self,
        caller: &Caller,
        q: &TokenQuery,
    ) -> Result<Page<Vec<TokenRow>>> {
        let page = q.page.keyset()?;
        let filter = TokenFilter {
            parties: self
                .listed_parties(caller, &q.account_email, q.role, "tokens")
                .await?,
            include_inactive: q.include_inactive,
            now: self.backend.now(),
            page,
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
