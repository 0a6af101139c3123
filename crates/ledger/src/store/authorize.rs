//! Phase one of a two-phase transfer: the hold. A recipient's hold through a delegation token
//! (the hot path; batched on Postgres, see `batch.rs`) and a sender's own direct hold.

use sqlx::any::AnyArguments;
use sqlx::{AnyConnection, Arguments};
use syft_error::Reason;

use super::batch::{AuthJob, AuthResult};
use super::budget::{BudgetRefusal, HoldBudgets};
use super::{
    new_id, retry_transient, sha256_hex, Micros, Store, TokenInfo, TransferRow, REFUNDED,
    TRANSFER_COLUMNS, TRANSFER_JOINS,
};
use crate::error::{is_unique_violation, LedgerError, Result};

pub struct AuthorizeInput<'a> {
    pub recipient_id: i64,
    pub recipient_email: &'a str,
    pub sender_email: &'a str,
    pub amount: i64,
    pub token: &'a str,
    pub app_name: &'a str,
    pub app_ep_path: &'a str,
    pub idempotency_key: &'a str,
    /// The caller's id of this attempt (empty: none), stored with the hold it places.
    pub attempt_id: &'a str,
    pub ttl_micros: i64,
    /// The recipient's spend budgets for this sender (checked in the hold's transaction).
    pub budgets: HoldBudgets,
}

/// A hold placed by the sender itself, without a delegation token (REST compat API).
pub struct DirectInput<'a> {
    pub sender_id: i64,
    pub recipient_id: i64,
    pub amount: i64,
    pub app_name: &'a str,
    pub app_ep_path: &'a str,
    pub ttl_micros: i64,
    /// The sender's key: the same key with the same parameters returns the original transfer.
    pub idempotency_key: &'a str,
}

/// An authorization's transfer, whether an earlier call with the same key created it (a replay)
/// rather than this one, and the attempt that placed it (empty: none named, or not known).
pub struct Placed {
    pub row: TransferRow,
    pub existing: bool,
    pub attempt_id: String,
}

impl Placed {
    /// The hold this call placed, under the attempt it named.
    pub(crate) fn by_this_call(row: TransferRow, input: &AuthorizeInput<'_>) -> Self {
        Self {
            row,
            existing: false,
            attempt_id: input.attempt_id.to_string(),
        }
    }

    /// The hold an earlier call with the key placed, and the attempt it named (if any).
    pub(crate) fn earlier(row: TransferRow, attempt_id: Option<String>) -> Self {
        Self {
            row,
            existing: true,
            attempt_id: attempt_id.unwrap_or_default(),
        }
    }
}

/// Who placed an authorization's hold, as the authorization found out.
enum Origin {
    ThisCall,
    /// An earlier call with the key, and the attempt it named (if any).
    Earlier(Option<String>),
}

/// A transfer found by its idempotency key, with the hash of the request that created it.
#[derive(sqlx::FromRow)]
struct KeyedTransfer {
    #[sqlx(flatten)]
    transfer: TransferRow,
    request_hash: String,
    /// The token the hold was placed with (read only by the delegated replay).
    #[sqlx(default)]
    token_id: Option<String>,
    /// The attempt that placed it (migration 0029).
    #[sqlx(default)]
    attempt_id: Option<String>,
}

/// What a delegated hold's request is known by: sender, amount, token and app. A replay is the
/// same request; one that differs only by its token may still be (see `replay_authorize`).
fn hold_hash(input: &AuthorizeInput<'_>, token_id: &str) -> String {
    sha256_hex(&format!(
        "{}\n{}\n{}\n{}\n{}",
        input.sender_email, input.amount, token_id, input.app_name, input.app_ep_path
    ))
}

/// An authorization refused for a business reason, recorded so a replay answers the same.
#[derive(sqlx::FromRow)]
struct RecordedFailure {
    request_hash: String,
    error_kind: String,
    error_message: String,
}

enum AuthorizeOutcome {
    Created(Box<TransferRow>),
    TokenRejected,
    InsufficientFunds,
    DuplicateKey,
    BudgetExceeded(BudgetRefusal),
}

impl Store {
    /// Places a hold for `amount` on the sender's funds, keyed by `(recipient, sender,
    /// idempotency_key)`: keys are scoped per paying user, so two users of one recipient may use
    /// the same key.
    pub async fn authorize(&self, input: &AuthorizeInput<'_>) -> Result<TransferRow> {
        self.authorize_keyed(input).await.map(|p| p.row)
    }

    /// [`Store::authorize`], saying whether this call placed the hold or found the one an
    /// earlier call with the key placed.
    pub async fn authorize_keyed(&self, input: &AuthorizeInput<'_>) -> Result<Placed> {
        let mut origin = Origin::Earlier(None);
        let row = self.authorize_once(input, &mut origin).await?;
        Ok(match origin {
            Origin::ThisCall => Placed::by_this_call(row, input),
            Origin::Earlier(attempt) => Placed::earlier(row, attempt),
        })
    }

    /// Sets `origin` to `ThisCall` when this call inserted the hold; every other `Ok` is a
    /// replay, whose `origin` names the attempt that placed it.
    async fn authorize_once(
        &self,
        input: &AuthorizeInput<'_>,
        origin: &mut Origin,
    ) -> Result<TransferRow> {
        // A token that does not prove the sender (unknown, issued to another recipient, another
        // sender's) is refused before the key is looked at, and the refusal is not recorded
        // under it: the sender is only the caller's claim. Recorded, it spent the key of the
        // user it named, whose own request under it then got 409 for good, and the answer
        // (409 for a key in use, 403 for a free one) told a stranger which ids that user had
        // used (2026-12-06).
        let Some(token) = self.token_info(input.token).await? else {
            return Err(LedgerError::refused(Reason::TokenInvalid, "unknown token"));
        };
        if token.recipient_id != input.recipient_id {
            return Err(LedgerError::refused(
                Reason::TokenInvalid,
                "token was not issued to this recipient",
            ));
        }
        if token.sender_email != input.sender_email {
            return Err(LedgerError::refused(
                Reason::TokenInvalid,
                "token does not belong to this sender",
            ));
        }
        let request_hash = hold_hash(input, &token.id);
        // Replays are found without a read on the hot path: a reused key makes the insert
        // conflict, and a recorded failure makes the token step refuse (see `try_authorize`).

        let now = self.now();
        let outcome =
            retry_transient(|| self.try_authorize(input, &token, &request_hash, now)).await?;
        match outcome {
            AuthorizeOutcome::Created(row) => {
                *origin = Origin::ThisCall;
                Ok(*row)
            }
            AuthorizeOutcome::BudgetExceeded(refusal) => {
                if let Some(replayed) = self
                    .replay_authorize(input, &request_hash, true, origin)
                    .await?
                {
                    return replayed;
                }
                // Not recorded as the key's outcome: the same request may be retried once
                // the window has room again (a refusal moved no money).
                Err(refusal.into_error(now))
            }
            AuthorizeOutcome::DuplicateKey => {
                if let Some(replayed) = self
                    .replay_authorize(input, &request_hash, true, origin)
                    .await?
                {
                    return replayed;
                }
                Err(LedgerError::Unavailable(
                    "concurrent authorization, retry".into(),
                ))
            }
            AuthorizeOutcome::TokenRejected => {
                if let Some(replayed) = self
                    .replay_authorize(input, &request_hash, false, origin)
                    .await?
                {
                    return replayed;
                }
                let reason = self
                    .token_refusal(&token.id, Micros::new(input.amount), now)
                    .await?;
                self.fail_authorize(input, &request_hash, reason, origin)
                    .await
            }
            AuthorizeOutcome::InsufficientFunds => {
                if let Some(replayed) = self
                    .replay_authorize(input, &request_hash, true, origin)
                    .await?
                {
                    return replayed;
                }
                let err =
                    LedgerError::refused(Reason::InsufficientFunds, insufficient(input.amount));
                self.fail_authorize(input, &request_hash, err, origin).await
            }
        }
    }

    /// The original outcome of an earlier authorization by this sender with the same key, if
    /// there was one. The sender is looked up by email first (a refused request may carry no
    /// valid token), so the probe uses the whole `(recipient, sender, key)` unique index instead
    /// of scanning a hot recipient's transfers.
    ///
    /// `token_live`: the request's token is a live one of this sender for this recipient (it
    /// passed the token step). Then a hold that differs only by its token is the same request:
    /// a client retrying with a fresh token (its first answer lost after the capture) gets the
    /// transfer, so the router can replay the answer the user paid for, instead of 409. Never
    /// for a token that is unknown, another's, revoked or expired: the token is the credential.
    async fn replay_authorize(
        &self,
        input: &AuthorizeInput<'_>,
        request_hash: &str,
        token_live: bool,
        origin: &mut Origin,
    ) -> Result<Option<Result<TransferRow>>> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS}{REFUNDED}, t.request_hash, t.token_id, t.attempt_id \
             FROM transfers t {TRANSFER_JOINS} \
             WHERE t.recipient_id = $1 AND t.idempotency_key = $2 \
               AND t.sender_id = (SELECT id FROM accounts WHERE email = $3)"
        );
        let keyed: Option<KeyedTransfer> = sqlx::query_as(&sql)
            .bind(input.recipient_id)
            .bind(input.idempotency_key)
            .bind(input.sender_email)
            .fetch_optional(self.pool())
            .await?;
        if let Some(keyed) = keyed {
            let same_but_token = token_live
                && keyed
                    .token_id
                    .as_deref()
                    .is_some_and(|t| hold_hash(input, t) == keyed.request_hash);
            if keyed.request_hash != request_hash && !same_but_token {
                // Named only to a holder of a live token of the key's sender: the token is the
                // credential, and a router replays the transfer's stored answer to whoever it is
                // named to (a made-up or revoked token would have read the user's answer).
                if !token_live {
                    return Ok(Some(Err(key_reused(input.idempotency_key))));
                }
                return Ok(Some(Err(LedgerError::KeyTaken {
                    message: key_reused(input.idempotency_key).to_string(),
                    transfer_id: keyed.transfer.id,
                })));
            }
            *origin = Origin::Earlier(keyed.attempt_id);
            return Ok(Some(Ok(keyed.transfer)));
        }
        let failure: Option<RecordedFailure> = sqlx::query_as(
            "SELECT request_hash, error_kind, error_message FROM authorize_failures \
             WHERE recipient_id = $1 AND idempotency_key = $2 AND sender_email = $3",
        )
        .bind(input.recipient_id)
        .bind(input.idempotency_key)
        .bind(input.sender_email)
        .fetch_optional(self.pool())
        .await?;
        let Some(failure) = failure else {
            return Ok(None);
        };
        if failure.request_hash != request_hash {
            return Ok(Some(Err(key_reused(input.idempotency_key))));
        }
        Ok(Some(Err(LedgerError::from_kind(
            &failure.error_kind,
            failure.error_message,
        ))))
    }

    /// Records a business failure so that a replay of the same key returns it, then returns it.
    async fn fail_authorize(
        &self,
        input: &AuthorizeInput<'_>,
        request_hash: &str,
        err: LedgerError,
        origin: &mut Origin,
    ) -> Result<TransferRow> {
        sqlx::query(
            "INSERT INTO authorize_failures (recipient_id, idempotency_key, request_hash, error_kind, \
             error_message, created_at, sender_email) SELECT $1, $2, $3, $4, $5, $6, $7 \
             WHERE NOT EXISTS (SELECT 1 FROM transfers WHERE recipient_id = $1 AND idempotency_key = $2 \
                               AND sender_id = (SELECT id FROM accounts WHERE email = $7)) \
             ON CONFLICT (recipient_id, sender_email, idempotency_key) DO NOTHING",
        )
        .bind(input.recipient_id)
        .bind(input.idempotency_key)
        .bind(request_hash)
        .bind(err.kind())
        .bind(err.to_string())
        .bind(self.now())
        .bind(input.sender_email)
        .execute(self.pool())
        .await?;
        // A concurrent replay may have recorded a different outcome first; return that one.
        match self
            .replay_authorize(input, request_hash, false, origin)
            .await?
        {
            Some(outcome) => outcome,
            None => Err(err),
        }
    }

    async fn try_authorize(
        &self,
        input: &AuthorizeInput<'_>,
        token: &TokenInfo,
        request_hash: &str,
        now: i64,
    ) -> std::result::Result<AuthorizeOutcome, sqlx::Error> {
        let job = AuthJob {
            id: new_id(),
            sender_id: token.sender_id,
            recipient_id: input.recipient_id,
            sender_email: token.sender_email.clone(),
            recipient_email: input.recipient_email.to_string(),
            token_id: token.id.clone(),
            amount: input.amount,
            currency: token.currency.clone(),
            app_name: input.app_name.to_string(),
            app_ep_path: input.app_ep_path.to_string(),
            idempotency_key: input.idempotency_key.to_string(),
            request_hash: request_hash.to_string(),
            attempt_id: input.attempt_id.to_string(),
            now,
            expires_at: now.saturating_add(input.ttl_micros),
            budgets: input.budgets,
            token_limit_per_day: token.limit_per_day,
        };
        let budgeted = !job.budgets.is_empty() || job.token_limit_per_day.is_some();
        let result = if budgeted {
            self.budgeted.place(job.clone()).await
        } else if let Some(batcher) = &self.batcher {
            batcher.authorize(job.clone()).await
        } else {
            let mut tx = self.pool().begin().await?;
            match single_authorize(&mut tx, &job).await {
                Ok(AuthResult::Created) => tx.commit().await.map(|_| AuthResult::Created),
                other => other,
            }
        };
        match result {
            Ok(AuthResult::Created) => Ok(AuthorizeOutcome::Created(Box::new(job.pending_row()))),
            Ok(AuthResult::TokenRejected) => Ok(AuthorizeOutcome::TokenRejected),
            Ok(AuthResult::InsufficientFunds) => Ok(AuthorizeOutcome::InsufficientFunds),
            Ok(AuthResult::Deferred) => Err(sqlx::Error::Protocol(
                "a deferred hold left the batcher".into(),
            )),
            Ok(AuthResult::BudgetExceeded(r)) => Ok(AuthorizeOutcome::BudgetExceeded(r)),
            Ok(AuthResult::DuplicateKey) => Ok(AuthorizeOutcome::DuplicateKey),
            Err(e) if is_unique_violation(&e) => Ok(AuthorizeOutcome::DuplicateKey),
            Err(e) => Err(e),
        }
    }

    /// Places a hold the sender asked for itself (no token, created by SENDER). Not on the hot
    /// path, so it is one short transaction on both backends.
    pub async fn authorize_direct(&self, input: &DirectInput<'_>) -> Result<TransferRow> {
        // Namespaced per sender, and a key of the sender's whatever the recipient (migration 0025).
        let prefix = crate::validate::DIRECT_KEY_PREFIX;
        let key = format!("{prefix}{}:{}", input.sender_id, input.idempotency_key);
        let request_hash = sha256_hex(&format!(
            "direct\n{}\n{}\n{}\n{}",
            input.recipient_id, input.amount, input.app_name, input.app_ep_path
        ));
        if let Some(replayed) = self.replay_direct(input, &key, &request_hash).await? {
            return replayed;
        }
        let id = new_id();
        let now = self.now();
        let placed = retry_transient(|| async {
            let mut tx = self.pool().begin().await?;
            let currency: Option<String> = sqlx::query_scalar(
                "UPDATE accounts SET held = held + $1 WHERE id = $2 AND balance - held >= $1 \
                 RETURNING currency",
            )
            .bind(input.amount)
            .bind(input.sender_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(currency) = currency else {
                return Ok(Some(false));
            };
            let inserted = sqlx::query(
                "INSERT INTO transfers (id, sender_id, recipient_id, token_id, amount, currency, \
                 status, created_by, app_name, app_ep_path, idempotency_key, request_hash, \
                 created_at, expires_at) \
                 VALUES ($1, $2, $3, NULL, $4, $5, 'PENDING', 'SENDER', $6, $7, $8, $9, $10, $11)",
            )
            .bind(&id)
            .bind(input.sender_id)
            .bind(input.recipient_id)
            .bind(input.amount)
            .bind(&currency)
            .bind(input.app_name)
            .bind(input.app_ep_path)
            .bind(&key)
            .bind(&request_hash)
            .bind(now)
            .bind(now.saturating_add(input.ttl_micros))
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                // A concurrent request with the same key won; the hold rolls back with `tx`.
                Err(e) if is_unique_violation(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
            tx.commit().await?;
            Ok(Some(true))
        })
        .await?;
        match placed {
            Some(true) => {
                crate::metrics::hold_placed(); // this call's hold, so counted once (metrics.rs)
                self.transfer_by_id(&id)
                    .await?
                    .ok_or_else(|| LedgerError::Internal("transfer vanished".into()))
            }
            // The key's row committed first (a unique index waits for it): its answer. None
            // left to find means the key is a recipient's own key of this form, so it is taken.
            None => match self.replay_direct(input, &key, &request_hash).await? {
                Some(replayed) => replayed,
                None => Err(key_reused(input.idempotency_key)),
            },
            // A retry of the same request while the first was placing its hold meets the funds
            // that hold took: the key's transfer is its answer (it was told "insufficient funds"
            // while its transfer waited, unknown to it, until it expired).
            Some(false) => match self.replay_direct(input, &key, &request_hash).await? {
                Some(replayed) => replayed,
                None => Err(LedgerError::refused(
                    Reason::InsufficientFunds,
                    insufficient(input.amount),
                )),
            },
        }
    }

    /// The transfer an earlier direct request of this sender with this key created, if any,
    /// whatever its recipient: the key is the sender's (the request hash holds the recipient, so
    /// the same key sent to another recipient is a reused key). Migration 0025 keeps it unique.
    async fn replay_direct(
        &self,
        input: &DirectInput<'_>,
        key: &str,
        request_hash: &str,
    ) -> Result<Option<Result<TransferRow>>> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS}{REFUNDED}, t.request_hash FROM transfers t {TRANSFER_JOINS} \
             WHERE t.sender_id = $1 AND t.idempotency_key = $2 AND t.created_by = 'SENDER'"
        );
        let keyed: Option<KeyedTransfer> = sqlx::query_as(&sql)
            .bind(input.sender_id)
            .bind(key)
            .fetch_optional(self.pool())
            .await?;
        let Some(keyed) = keyed else { return Ok(None) };
        if keyed.request_hash != request_hash {
            return Ok(Some(Err(key_reused(input.idempotency_key))));
        }
        Ok(Some(Ok(keyed.transfer)))
    }
}

/// The room a token (`WHERE id = … AND` this) has for a hold: the token is live, within its
/// spend limit, and the key has no recorded failure. Takes the placeholders of the amount, now,
/// recipient, key and sender email. A macro so that every statement that decides a hold states
/// it once.
macro_rules! token_room {
    ($amount:literal, $now:literal, $recipient:literal, $key:literal, $email:literal) => {
        concat!(
            "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ",
            $now,
            ") \
             AND (spend_limit IS NULL OR spent + held + ",
            $amount,
            " <= spend_limit) \
             AND NOT EXISTS (SELECT 1 FROM authorize_failures WHERE recipient_id = ",
            $recipient,
            " AND idempotency_key = ",
            $key,
            " AND sender_email = ",
            $email,
            ")"
        )
    };
}
pub(super) use token_room;

/// Takes a hold's amount from its token's room. Binds: amount, token, now, recipient, key,
/// sender email.
const TOKEN_HOLD: &str = concat!(
    "UPDATE tokens SET held = held + $1 WHERE id = $2 AND ",
    token_room!("$1", "$3", "$4", "$5", "$6")
);
/// Holds the amount on the sender's available funds. Binds: amount, sender.
const FUNDS_HOLD: &str =
    "UPDATE accounts SET held = held + $1 WHERE id = $2 AND balance - held >= $1";

/// Takes `job`'s amount from its token's room, then from its sender's available funds (which
/// locks the sender's row). The refusal if either refuses: `TokenRejected` with nothing taken,
/// `InsufficientFunds` with the token's part taken (the caller rolls back or gives it back).
pub(super) async fn take_hold(
    conn: &mut AnyConnection,
    job: &AuthJob,
) -> std::result::Result<Option<AuthResult>, sqlx::Error> {
    let token = sqlx::query(TOKEN_HOLD)
        .bind(job.amount)
        .bind(&job.token_id)
        .bind(job.now)
        .bind(job.recipient_id)
        .bind(&job.idempotency_key)
        .bind(&job.sender_email)
        .execute(&mut *conn)
        .await?;
    if token.rows_affected() == 0 {
        return Ok(Some(AuthResult::TokenRejected));
    }
    let funds = sqlx::query(FUNDS_HOLD)
        .bind(job.amount)
        .bind(job.sender_id)
        .execute(&mut *conn)
        .await?;
    Ok((funds.rows_affected() == 0).then_some(AuthResult::InsufficientFunds))
}

/// A pending transfer's columns and their values from [`hold_args`] (`$1` … `$12`) and the
/// attempt's placeholder (`$attempt`, bound by the caller after its own arguments: empty stores
/// NULL), as `(columns) <values>`: `<values>` is `VALUES (…)` or `SELECT …` and may go on with a
/// clause.
macro_rules! hold_insert {
    ($values:literal, $attempt:literal) => {
        concat!(
            "INSERT INTO transfers (id, sender_id, recipient_id, token_id, amount, currency, \
             status, created_by, app_name, app_ep_path, idempotency_key, request_hash, \
             created_at, expires_at, attempt_id) ",
            $values,
            " $1, $2, $3, $4, $5, $6, 'PENDING', 'RECIPIENT', $7, $8, $9, $10, $11, $12, NULLIF(",
            $attempt,
            ", '')"
        )
    };
}
pub(super) use hold_insert;

/// `job`'s pending transfer as `$1` … `$12` (see [`hold_insert`]), for statements that insert
/// it; more arguments may follow.
pub(super) fn hold_args(job: &AuthJob) -> std::result::Result<AnyArguments<'_>, sqlx::Error> {
    let mut args = AnyArguments::default();
    add(&mut args, &job.id)?;
    add(&mut args, job.sender_id)?;
    add(&mut args, job.recipient_id)?;
    add(&mut args, &job.token_id)?;
    add(&mut args, job.amount)?;
    add(&mut args, &job.currency)?;
    add(&mut args, &job.app_name)?;
    add(&mut args, &job.app_ep_path)?;
    add(&mut args, &job.idempotency_key)?;
    add(&mut args, &job.request_hash)?;
    add(&mut args, job.now)?;
    add(&mut args, job.expires_at)?;
    Ok(args)
}

/// Appends one argument (what `.bind` does, for a list built once and used by two statements).
pub(super) fn add<'q, T>(
    args: &mut AnyArguments<'q>,
    value: T,
) -> std::result::Result<(), sqlx::Error>
where
    T: 'q + sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    args.add(value).map_err(sqlx::Error::Encode)
}

/// The pending transfer of `job`; `ON CONFLICT DO NOTHING` (no row) when its key was taken
/// meanwhile, so that the transaction goes on for the holds placed with it. Returns whether it
/// was inserted.
pub(super) async fn insert_hold(
    conn: &mut AnyConnection,
    job: &AuthJob,
) -> std::result::Result<bool, sqlx::Error> {
    const SQL: &str = concat!(hold_insert!("VALUES (", "$13"), ") ON CONFLICT DO NOTHING");
    let mut args = hold_args(job)?;
    add(&mut args, &job.attempt_id)?;
    let done = sqlx::query_with(SQL, args).execute(conn).await?;
    Ok(done.rows_affected() > 0)
}

/// Places one hold without a budget inside the caller's transaction (SQLite's path; Postgres
/// batches them); anything but `Created` must be rolled back.
async fn single_authorize(
    conn: &mut AnyConnection,
    job: &AuthJob,
) -> std::result::Result<AuthResult, sqlx::Error> {
    if let Some(refused) = take_hold(conn, job).await? {
        return Ok(refused);
    }
    if !insert_hold(conn, job).await? {
        return Ok(AuthResult::DuplicateKey);
    }
    Ok(AuthResult::Created)
}

/// The refusal of an idempotency key that a request with other parameters used (both backends).
pub(crate) fn key_reused(key: &str) -> LedgerError {
    LedgerError::refused(
        Reason::IdempotencyConflict,
        format!(
            "idempotency key {key:?} was already used by a request with other parameters \
             (amount, token, app or endpoint); send this one with a new key"
        ),
    )
}

/// The refusal's message, in currency units (the REST API's) and in micros (gRPC's).
fn insufficient(amount: i64) -> String {
    format!(
        "insufficient funds: {} requested ({amount} micros)",
        crate::money::format_micros(amount)
    )
}
