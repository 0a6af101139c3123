//! The Syft accounting REST API's answers: users and transactions with amounts as exact decimal
//! text, serialized as they are (never through a `serde_json::Value`, which reads numbers back as
//! floats).

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{ok, Reply};
use crate::domain::TransferStatus;
use crate::money::format_micros;
use crate::store::{AccountRow, TransferRow};

#[derive(Serialize)]
pub(super) struct UserReply {
    pub(super) user: UserJson,
}

#[derive(Serialize)]
pub(super) struct RegisteredReply {
    pub(super) user: UserJson,
    pub(super) password: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UsersReply {
    pub(super) users: Vec<UserJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) next_page_token: Option<String>,
}

#[derive(Serialize)]
pub(super) struct TransactionReply {
    pub(super) transaction: TransactionJson,
}

#[derive(Serialize)]
pub(super) struct TransactionsReply {
    pub(super) transactions: Vec<TransactionJson>,
}

/// Currency units as an exact JSON number (`12.5`, not `12.500000000000002`).
pub(super) fn units(micros: i64) -> Box<RawValue> {
    RawValue::from_string(format_micros(micros))
        .unwrap_or_else(|_| RawValue::from_string("0".into()).expect("literal zero is valid JSON"))
}

pub(super) fn iso(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UserJson {
    pub(super) id: String,
    pub(super) email: String,
    /// What the account can spend now: its balance minus pending holds.
    pub(super) balance: Box<RawValue>,
    pub(super) organization: String,
    pub(super) currency: String,
    pub(super) held: Box<RawValue>,
}

pub(super) fn user_json(a: &AccountRow) -> UserJson {
    UserJson {
        id: a.id.to_string(),
        email: a.email.clone(),
        balance: units(a.available().get().max(0)),
        organization: a.organization.clone(),
        currency: a.currency.clone(),
        held: units(a.held.get()),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TransactionJson {
    pub(super) id: String,
    pub(super) sender_email: String,
    pub(super) recipient_email: String,
    pub(super) created_by: String,
    pub(super) resolved_by: Option<String>,
    /// The held amount, or once completed the amount that moved.
    pub(super) amount: Box<RawValue>,
    /// Given back by refunds so far (`amount` stays what was charged); 0 for none.
    pub(super) refunded_amount: Box<RawValue>,
    pub(super) status: String,
    pub(super) created_at: String,
    pub(super) resolved_at: Option<String>,
    pub(super) app_name: Option<String>,
    pub(super) app_ep_path: Option<String>,
    pub(super) currency: String,
    pub(super) expires_at: String,
}

pub(super) fn transaction_json(t: &TransferRow) -> TransactionJson {
    let amount = if t.status == TransferStatus::Completed {
        t.captured.get()
    } else {
        t.amount.get()
    };
    TransactionJson {
        id: t.id.clone(),
        sender_email: t.sender_email.clone(),
        recipient_email: t.recipient_email.clone(),
        created_by: t.created_by.to_string(),
        resolved_by: t.resolved_by.map(|a| a.to_string()),
        amount: units(amount),
        refunded_amount: units(t.refunded.get()),
        status: t.status.to_string(),
        created_at: iso(t.created_at),
        resolved_at: t.resolved_at.map(iso),
        app_name: (!t.app_name.is_empty()).then(|| t.app_name.clone()),
        app_ep_path: (!t.app_ep_path.is_empty()).then(|| t.app_ep_path.clone()),
        currency: t.currency.clone(),
        expires_at: iso(t.expires_at),
    }
}

pub(super) fn user_reply(status: StatusCode, a: &AccountRow) -> Reply {
    ok(status, UserReply { user: user_json(a) })
}

pub(super) fn transaction_reply(status: StatusCode, t: &TransferRow) -> Reply {
    ok(
        status,
        TransactionReply {
            transaction: transaction_json(t),
        },
    )
}
