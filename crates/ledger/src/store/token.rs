//! Delegation tokens: issue, resolve (cached), revoke, and why one cannot pay.

use std::sync::Arc;
use syft_error::Reason;

use super::{
    insert_bounded, new_id, read_lock, sha256_hex, AccountRow, Identity, IssuedToken, Micros,
    Store, TokenInfo, TokenLimits,
};
use crate::error::{LedgerError, Result};

/// A token to issue (checked by the core): `recipient` may charge `sender` within the limits.
#[derive(Debug, Clone, Copy)]
pub struct TokenGrant<'a> {
    pub sender: &'a Identity,
    pub recipient: &'a AccountRow,
    pub expires_at: Option<i64>,
    pub spend_limit: Option<Micros>,
    pub limit_per_day: Option<Micros>,
}

/// How every delegation token begins: what tells a token from its id where either is taken.
pub const TOKEN_PREFIX: &str = "syft_tok_";

impl Store {
    pub async fn issue_token(&self, grant: &TokenGrant<'_>) -> Result<IssuedToken> {
        let TokenGrant {
            sender,
            recipient,
            expires_at,
            spend_limit,
            limit_per_day,
        } = *grant;
        use base64::Engine;
        use rand::RngCore;
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let id = new_id();
        sqlx::query(
            "INSERT INTO tokens (id, token_hash, sender_id, recipient_id, expires_at, spend_limit, \
             created_at, limit_per_day) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(sha256_hex(&token))
        .bind(sender.id)
        .bind(recipient.id)
        .bind(expires_at)
        .bind(spend_limit)
        .bind(self.now())
        .bind(limit_per_day)
        .execute(&self.pool)
        .await?;
        Ok(IssuedToken {
            token,
            id,
            expires_at,
            spend_limit,
        })
    }

    /// Resolves a token string to its immutable facts (cached by hash).
    pub async fn token_info(&self, token: &str) -> Result<Option<Arc<TokenInfo>>> {
        let hash = sha256_hex(token);
        if let Some(info) = read_lock(&self.tokens).get(&hash) {
            return Ok(Some(info.clone()));
        }
        let info: Option<TokenInfo> = sqlx::query_as(
            "SELECT k.id, k.sender_id, k.recipient_id, s.email AS sender_email, s.currency, \
             k.limit_per_day \
             FROM tokens k JOIN accounts s ON s.id = k.sender_id WHERE k.token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(info) = info.map(Arc::new) else {
            return Ok(None);
        };
        insert_bounded(&self.tokens, hash, info.clone());
        Ok(Some(info))
    }

    /// Revokes a token (by string or id) that `by` may revoke: its sender, or its recipient (an
    /// owner stopping a token used against its service); any token when `by` is `None` (the
    /// admin, for support). Revoking twice keeps the first time; a token the party may not revoke
    /// is answered as an unknown one.
    pub async fn revoke_token(&self, by: Option<i64>, token_or_id: &str) -> Result<(String, i64)> {
        let hash = sha256_hex(token_or_id);
        let now = self.now();
        let party = match by {
            Some(_) => "AND (sender_id = $4 OR recipient_id = $4)",
            None => "AND $4 IS NULL",
        };
        sqlx::query(&format!(
            "UPDATE tokens SET revoked_at = $1 WHERE (token_hash = $2 OR id = $3) {party} \
             AND revoked_at IS NULL"
        ))
        .bind(now)
        .bind(&hash)
        .bind(token_or_id)
        .bind(by)
        .execute(&self.pool)
        .await?;
        let party = party.replace("$4", "$3");
        let (id, revoked_at): (String, Option<i64>) = sqlx::query_as(&format!(
            "SELECT id, revoked_at FROM tokens WHERE (token_hash = $1 OR id = $2) {party}"
        ))
        .bind(&hash)
        .bind(token_or_id)
        .bind(by)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| LedgerError::NotFound("token not found".into()))?;
        Ok((id, revoked_at.unwrap_or(now)))
    }

    /// Why a token cannot pay `amount` now, if it cannot.
    pub(crate) async fn token_rejection(
        &self,
        token_id: &str,
        amount: Micros,
        now: i64,
    ) -> Result<Option<LedgerError>> {
        let limits = self.token_limits(token_id).await?;
        Ok(rejection(&limits, amount, now))
    }

    /// Why the database refused a hold of `amount` on a token. Read after the refusing statement
    /// and without its lock, holds pending then may have been resolved since; revocation and
    /// expiry do not undo themselves, so a token with a spend limit refused for neither was
    /// refused for its limit (it used to be told, and the key to keep, `TOKEN_INVALID`).
    pub(crate) async fn token_refusal(
        &self,
        token_id: &str,
        amount: Micros,
        now: i64,
    ) -> Result<LedgerError> {
        let limits = self.token_limits(token_id).await?;
        Ok(
            match (rejection(&limits, amount, now), limits.spend_limit) {
                (Some(refusal), _) => refusal,
                (None, Some(limit)) => LedgerError::refused(
                    Reason::TokenLimitExceeded,
                    format!(
                        "token spend limit exceeded: limit {limit}, requested {amount} with the \
                         holds pending on it when it was decided"
                    ),
                ),
                (None, None) => LedgerError::refused(Reason::TokenInvalid, "token cannot be used"),
            },
        )
    }

    async fn token_limits(&self, token_id: &str) -> Result<TokenLimits> {
        Ok(sqlx::query_as(
            "SELECT revoked_at, expires_at, spend_limit, spent, held FROM tokens WHERE id = $1",
        )
        .bind(token_id)
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Why a token with these facts cannot pay `amount` at `now`, if it cannot.
fn rejection(limits: &TokenLimits, amount: Micros, now: i64) -> Option<LedgerError> {
    let TokenLimits {
        revoked_at,
        expires_at,
        spend_limit,
        spent,
        held,
    } = limits.clone();
    if revoked_at.is_some() {
        return Some(LedgerError::refused(
            Reason::TokenRevoked,
            "token has been revoked",
        ));
    }
    if expires_at.is_some_and(|e| e <= now) {
        return Some(LedgerError::refused(
            Reason::TokenExpired,
            "token has expired",
        ));
    }
    let committed = spent.checked_add(held).and_then(|c| c.checked_add(amount));
    spend_limit
        .filter(|l| committed.is_none_or(|c| c > *l))
        .map(|limit| {
            LedgerError::refused(
                Reason::TokenLimitExceeded,
                format!(
                    // In currency units, as the budgets' refusals (`Micros` shows itself so).
                    "token spend limit exceeded: limit {limit}, spent {spent}, held {held}, \
                     requested {amount}"
                ),
            )
        })
}
