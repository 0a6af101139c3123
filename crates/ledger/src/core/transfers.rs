//! The transfer rules of the core: holds, captures, voids, listings, and the REST API's direct
//! transfers and party resolutions.

use crate::auth::Caller;
use crate::backend::{CaptureInput, Party, VoidInput};
use crate::domain::{Actor, TransferStatus};
use crate::error::{LedgerError, Result};
use crate::metrics;
use crate::money::check_positive;
use crate::store::{
    AuthorizeInput, CaptureAmount, DirectInput, HoldBudgets, Keyset, Parties, Placed,
    TransferFilter, TransferRow, UsageInput,
};
use crate::validate::{self, MAX_KEY, MAX_NAME, MAX_PATH, MAX_REASON};
use syft_proto::MAX_TRANSACTION_TOKEN_BYTES;

use super::{
    keyset_page, non_empty, same_currency, validate_usage, AnswerInput, HoldRequest, Ledger, Page,
    PartyAction, TransferQuery,
};

/// A hold's budgets, each positive and at most the largest amount.
fn budgets(b: HoldBudgets) -> Result<HoldBudgets> {
    let check = |field: &str, v: Option<i64>| -> Result<Option<i64>> {
        v.map(|m| check_positive(field, m, i64::MAX)).transpose()
    };
    Ok(HoldBudgets {
        per_day: check("budget_per_day_micros", b.per_day)?,
        per_month: check("budget_per_month_micros", b.per_month)?,
    })
}

impl Ledger {
    /// A pending hold's time left, by the clock its backend stamps and judges holds with.
    pub fn expires_in(&self, t: &TransferRow) -> Option<i64> {
        (t.status == TransferStatus::Pending)
            .then(|| t.expires_at.saturating_sub(self.backend.now()))
    }

    /// Places a hold on the sender's funds for the caller (the recipient), with a delegation
    /// token. Counted in the metrics once, not on replays.
    pub async fn authorize(&self, caller: &Caller, req: &HoldRequest) -> Result<TransferRow> {
        self.authorize_keyed(caller, req).await.map(|p| p.row)
    }

    /// [`Ledger::authorize`], saying whether the hold was placed by an earlier call with the key.
    pub async fn authorize_keyed(&self, caller: &Caller, req: &HoldRequest) -> Result<Placed> {
        let recipient = caller.account()?;
        let sender_email = validate::email("sender_email", &req.sender_email)?;
        let max_ttl = self.config.max_hold_ttl.as_secs() as i64;
        let ttl_micros = match req.hold_ttl_seconds {
            None => self.config.hold_ttl.as_micros() as i64,
            Some(s) if (1..=max_ttl).contains(&s) => s.saturating_mul(1_000_000),
            Some(s) => return Err(ttl_out_of_range("hold_ttl_seconds", s, max_ttl)),
        };
        let hold = AuthorizeInput {
            recipient_id: recipient.id,
            recipient_email: &recipient.email,
            sender_email: &sender_email,
            amount: check_positive("amount_micros", req.amount, self.config.max_amount_micros)?,
            token: validate::text("token", &req.token, MAX_TRANSACTION_TOKEN_BYTES, true)?,
            app_name: validate::text("app_name", &req.app_name, MAX_NAME, false)?,
            app_ep_path: validate::text("app_ep_path", &req.app_ep_path, MAX_PATH, false)?,
            idempotency_key: validate::hold_key(&req.idempotency_key)?,
            attempt_id: validate::text("attempt_id", &req.attempt_id, MAX_KEY, false)?,
            ttl_micros,
            budgets: budgets(req.budgets)?,
        };
        let placed = self.backend.authorize(&hold).await?;
        let transfer = &placed.row;
        self.open_holds.placed(transfer, self.store.now());
        tracing::debug!(transfer = %transfer.id, sender = %transfer.sender_email, amount = hold.amount, existing = placed.existing, "authorized");
        // Counted once: a replay found its key's hold placed.
        if !placed.existing {
            metrics::hold_placed();
        }
        Ok(placed)
    }

    pub async fn capture(
        &self,
        caller: &Caller,
        transfer_id: &str,
        amount: CaptureAmount,
        usage: Option<UsageInput>,
        answer: Option<AnswerInput>,
    ) -> Result<TransferRow> {
        let recipient = caller.account()?;
        let transfer_id = validate::text("transfer_id", transfer_id, MAX_KEY, true)?;
        let amount = match amount {
            CaptureAmount::Full => CaptureAmount::Full,
            CaptureAmount::Micros(0) => {
                return Err(LedgerError::invalid(
                    "capture amount 0: use Void to release a hold",
                ))
            }
            CaptureAmount::Micros(m) => CaptureAmount::Micros(check_positive(
                "amount_micros",
                m,
                self.config.max_amount_micros,
            )?),
        };
        let usage = usage.map(validate_usage).transpose()?;
        let answer = answer.map(|a| self.answer_write(a)).transpose()?;
        let capture = CaptureInput {
            recipient_id: recipient.id,
            transfer_id,
            amount,
            usage: usage.as_ref(),
            answer,
        };
        let transfer = self.backend.capture(capture).await;
        let transfer = self.forget_if_settled(transfer_id, transfer)?;
        self.open_holds.resolved(&transfer.id);
        Ok(transfer)
    }

    /// Keeps the caller's pending hold alive for `ttl_seconds` more (bounded by the maximum
    /// hold TTL, counted from the hold's creation).
    pub async fn extend_hold(
        &self,
        caller: &Caller,
        transfer_id: &str,
        ttl_seconds: i64,
    ) -> Result<TransferRow> {
        let recipient = caller.account()?;
        let transfer_id = validate::text("transfer_id", transfer_id, MAX_KEY, true)?;
        let max_ttl = self.config.max_hold_ttl.as_secs() as i64;
        if !(1..=max_ttl).contains(&ttl_seconds) {
            return Err(ttl_out_of_range("ttl_seconds", ttl_seconds, max_ttl));
        }
        let extended = self
            .backend
            .extend_hold(
                recipient.id,
                transfer_id,
                ttl_seconds * 1_000_000,
                max_ttl * 1_000_000,
            )
            .await?;
        self.open_holds.placed(&extended, self.store.now());
        Ok(extended)
    }

    pub async fn void(
        &self,
        caller: &Caller,
        transfer_id: &str,
        reason: &str,
        usage: Option<UsageInput>,
    ) -> Result<TransferRow> {
        let recipient = caller.account()?;
        let transfer_id = validate::text("transfer_id", transfer_id, MAX_KEY, true)?;
        let reason = validate::text("reason", reason, MAX_REASON, false)?;
        let reason = if reason.is_empty() {
            "voided by recipient"
        } else {
            reason
        };
        let usage = usage.map(validate_usage).transpose()?;
        let transfer = self
            .backend
            .void(VoidInput {
                recipient_id: recipient.id,
                transfer_id,
                reason,
                by: Party::Recipient,
                usage: usage.as_ref(),
            })
            .await;
        let transfer = self.forget_if_settled(transfer_id, transfer)?;
        self.open_holds.resolved(&transfer.id);
        Ok(transfer)
    }

    /// A resolution refused because the hold is no longer pending (resolved by a call whose
    /// caller was cut after its commit, or expired) also takes it out of the holds a stopping
    /// ledger waits for: it stayed there until its expiry, and a SIGTERM kept the ledger serving
    /// half its grace for nothing.
    fn forget_if_settled(
        &self,
        transfer_id: &str,
        outcome: Result<TransferRow>,
    ) -> Result<TransferRow> {
        if let Err(e) = &outcome {
            if matches!(
                e.reason(),
                Some(syft_error::Reason::TransferNotPending | syft_error::Reason::HoldExpired)
            ) {
                self.open_holds.resolved(transfer_id);
            }
        }
        outcome
    }

    /// A transfer the caller is a party to (to anyone else it does not exist).
    pub async fn transfer(&self, caller: &Caller, id: &str) -> Result<TransferRow> {
        let id = validate::text("transfer_id", id, MAX_KEY, true)?;
        self.backend
            .transfer(id)
            .await?
            .filter(|t| caller.may_see(&t.sender_email) || caller.may_see(&t.recipient_email))
            .ok_or_else(|| LedgerError::NotFound(format!("transfer {id} not found")))
    }

    pub async fn list_transfers(
        &self,
        caller: &Caller,
        q: &TransferQuery,
    ) -> Result<Page<Vec<TransferRow>>> {
        let page = q.page.keyset()?;
        let filter = TransferFilter {
            parties: self
                .listed_parties(caller, &q.account_email, q.role, "transfers")
                .await?,
            status: q.status,
            range: q.range,
            app_name: non_empty(validate::text("app_name", &q.app_name, MAX_NAME, false)?),
            token_id: non_empty(validate::text("token_id", &q.token_id, MAX_KEY, false)?),
            page,
        };
        let (rows, has_more) = self.backend.list(&filter).await?;
        Ok(keyset_page(rows, has_more, |t| t.id.clone()))
    }

    /// The caller's transaction history, newest first (REST `GET /transactions`).
    pub async fn history(
        &self,
        caller: &Caller,
        status: Option<TransferStatus>,
        limit: i64,
    ) -> Result<Vec<TransferRow>> {
        let account = caller.account()?;
        let filter = TransferFilter {
            parties: Parties {
                account_id: Some(account.id),
                ..Default::default()
            },
            status,
            page: Keyset {
                before_id: None,
                limit,
            },
            ..Default::default()
        };
        Ok(self.backend.list(&filter).await?.0)
    }

    /// A transfer the caller creates itself, without a token (REST `POST /transaction/create`
    /// with no token): the caller is the sender.
    pub async fn send(
        &self,
        caller: &Caller,
        recipient_email: &str,
        amount: i64,
        app_name: &str,
        app_ep_path: &str,
        idempotency_key: &str,
    ) -> Result<TransferRow> {
        let sender = caller.account()?;
        let recipient = self.backend.account(recipient_email).await?;
        same_currency(sender, &recipient)?;
        let transfer = self
            .backend
            .authorize_direct(&DirectInput {
                sender_id: sender.id,
                recipient_id: recipient.id,
                amount: check_positive("amount", amount, self.config.max_amount_micros)?,
                app_name: validate::text("appName", app_name, MAX_NAME, false)?,
                app_ep_path: validate::text("appEpPath", app_ep_path, MAX_PATH, false)?,
                ttl_micros: self.config.hold_ttl.as_micros() as i64,
                idempotency_key: validate::text("Idempotency-Key", idempotency_key, MAX_KEY, true)?,
            })
            .await?;
        Ok(transfer)
    }

    /// A party resolves a transaction (REST `confirm` / `cancel`): the party that created it
    /// confirms it (the recipient a delegated hold, the sender a direct transfer); the recipient
    /// may always cancel (it gives up the money), the sender only a direct transfer it created.
    pub async fn resolve_as_party(
        &self,
        caller: &Caller,
        id: &str,
        action: PartyAction,
    ) -> Result<TransferRow> {
        let email = caller.account()?.email.clone();
        let id = validate::text("transactionId", id, MAX_KEY, true)?;
        let transfer = self
            .backend
            .transfer(id)
            .await?
            .filter(|t| t.sender_email == email || t.recipient_email == email)
            .ok_or_else(|| LedgerError::NotFound(format!("transaction {id} not found")))?;
        let created_by_sender = transfer.created_by == Actor::Sender;
        let resolved = match action {
            PartyAction::Confirm => {
                let creator = if created_by_sender {
                    &transfer.sender_email
                } else {
                    &transfer.recipient_email
                };
                if &email != creator {
                    return Err(LedgerError::PermissionDenied(format!(
                        "only the party that created transaction {} may confirm it",
                        transfer.id
                    )));
                }
                // Confirming a completed transaction answers it again, whatever it captured:
                // one a router captured in part was refused 409 as "already captured".
                if transfer.status == TransferStatus::Completed {
                    return Ok(transfer);
                }
                if created_by_sender {
                    self.backend
                        .capture_by_sender(transfer.recipient_id, &transfer.id)
                        .await?
                } else {
                    let capture = CaptureInput {
                        recipient_id: transfer.recipient_id,
                        transfer_id: &transfer.id,
                        amount: CaptureAmount::Full,
                        usage: None,
                        answer: None,
                    };
                    self.backend.capture(capture).await?
                }
            }
            PartyAction::Cancel => {
                let by = if email == transfer.sender_email {
                    Party::Sender
                } else {
                    Party::Recipient
                };
                if by == Party::Sender && !created_by_sender {
                    return Err(LedgerError::PermissionDenied(format!(
                        "transaction {} was created by its recipient; only the recipient may cancel it",
                        transfer.id
                    )));
                }
                let reason = match by {
                    Party::Sender => "cancelled by sender",
                    Party::Recipient => "cancelled by recipient",
                };
                let void = VoidInput {
                    recipient_id: transfer.recipient_id,
                    transfer_id: &transfer.id,
                    reason,
                    by,
                    usage: None,
                };
                self.backend.void(void).await?
            }
        };
        self.open_holds.resolved(&resolved.id);
        Ok(resolved)
    }
}

/// A hold's life the ledger does not grant, saying the longest it does.
fn ttl_out_of_range(field: &str, asked: i64, max_seconds: i64) -> LedgerError {
    LedgerError::TtlOutOfRange {
        message: format!("{field} {asked} must be between 1 and {max_seconds}"),
        max_seconds,
    }
}
