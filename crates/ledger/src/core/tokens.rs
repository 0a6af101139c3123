//! Delegation tokens in the core: who may issue, revoke and check them (the rules of their
//! spending are the store's, `store/token.rs`).

use crate::auth::Caller;
use crate::domain::Micros;
use crate::error::{LedgerError, Result};
use crate::money::check_positive;
use crate::store::{IssuedToken, TokenGrant};
use crate::validate;
use syft_proto::MAX_TRANSACTION_TOKEN_BYTES;

use super::{same_currency, Ledger, NewToken};

impl Ledger {
    /// Issues a token; returns it with the recipient's normalised email.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        req: NewToken,
    ) -> Result<(IssuedToken, String)> {
        let sender = caller.account()?;
        let recipient_email = validate::email("recipient_email", &req.recipient_email)?;
        if recipient_email == sender.email {
            return Err(LedgerError::invalid(
                "a token must be issued to another account",
            ));
        }
        if let Some(expires) = req.expires_at {
            if expires <= self.backend.now() {
                return Err(LedgerError::invalid("expires_at must be in the future"));
            }
        }
        if let Some(limit) = req.spend_limit {
            check_positive("spend_limit_micros", limit, self.config.max_amount_micros)?;
        }
        if let Some(limit) = req.limit_per_day {
            check_positive("limit_per_day_micros", limit, self.config.max_amount_micros)?;
        }
        let recipient = self.backend.account(&recipient_email).await?;
        same_currency(sender, &recipient)?;
        let grant = TokenGrant {
            sender,
            recipient: &recipient,
            expires_at: req.expires_at,
            spend_limit: req.spend_limit.map(Micros::new),
            limit_per_day: req.limit_per_day.map(Micros::new),
        };
        let issued = self.backend.issue_token(&grant).await?;
        Ok((issued, recipient_email))
    }

    /// Revokes a token: its sender's, its recipient's (an owner stopping a token used against its
    /// service) or any (the admin, for support: a stolen token is stopped without its owner).
    pub async fn revoke_token(&self, caller: &Caller, token: &str) -> Result<(String, i64)> {
        let by = match caller {
            Caller::Admin => None,
            Caller::Account(a) => Some(a.id),
        };
        let token = validate::text("token", token, MAX_TRANSACTION_TOKEN_BYTES, true)?;
        self.backend.revoke_token(by, token).await
    }

    /// Whose `token` is (its sender's email, its id), when the caller may charge it: a router
    /// proving a user's identity before it shows their limits.
    pub async fn check_token(&self, caller: &Caller, token: &str) -> Result<(String, String)> {
        let recipient = caller.account()?;
        let token = validate::text("token", token, MAX_TRANSACTION_TOKEN_BYTES, true)?;
        self.backend.check_token(recipient.id, token).await
    }
}
