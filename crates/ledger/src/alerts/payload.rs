//! Event bodies: the Standard Webhooks JSON event, or a Slack-compatible `{"text": …}`.
//! The body is built once, stored in the outbox and sent byte for byte on every attempt.

use chrono::{DateTime, SecondsFormat};
use serde_json::{json, Value};

use super::rules::{EventKind, Format};

/// What a rule fired: the event, its data, and a one-line summary for chat formats.
#[derive(Debug, Clone)]
pub(crate) struct Fired {
    pub kind: EventKind,
    pub data: Value,
    pub summary: String,
}

/// A new event id, `msg_<uuid v7>` (time ordered, unique across replicas).
pub(crate) fn event_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}

pub(crate) fn rfc3339(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The body sent for `fired` in `format`.
pub(crate) fn body(format: Format, id: &str, fired: &Fired, now: i64) -> String {
    match format {
        Format::Json => json!({
            "id": id,
            "type": fired.kind.as_str(),
            "timestamp": rfc3339(now),
            "data": fired.data,
        })
        .to_string(),
        Format::Slack => json!({
            "text": format!("syft-router {}: {}", fired.kind.as_str(), fired.summary),
        })
        .to_string(),
    }
}

/// `4.5 USD` style amount for summaries (exact, from micros).
pub(crate) fn amount(micros: i64, currency: &str) -> String {
    format!("{} {currency}", syft_money::format_micros(micros))
}
