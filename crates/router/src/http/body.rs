//! A front's request body: read within the limit, refused (and recorded as a refusal, but for a
//! body its client stopped sending) when it cannot be read or is not a JSON object.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};

use super::{body_limit, request_id_of, Refused};
use crate::config::ServiceKind;
use crate::error::RouterError;
use crate::service::RouterService;
use crate::validate::assign_request_id;

/// Reads a front's request: its JSON body, then `convert` to the service's request. A request
/// refused on the way is recorded like every refusal (a usage row, `service/refusal.rs`), under
/// the user and request id `said` finds in the body if it could be read that far (the request id
/// falling back to the `Idempotency-Key`, as the fronts read it).
pub(crate) async fn read_request<B: serde::de::DeserializeOwned, R>(
    svc: &RouterService,
    kind: ServiceKind,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    said: impl FnOnce(&B) -> Said,
    convert: impl FnOnce(B) -> Result<R, RouterError>,
) -> Result<R, Refused> {
    // A body its client stopped sending (it went away mid-upload) said nothing: no row
    // (docs/router.md). It left a row under its `Idempotency-Key` that nothing had sent. A body
    // over the limit or malformed (a live client, answered 400) is a refusal, and recorded.
    let unread = matches!(&body, Err(r) if client_left(r));
    let (said, result) = match read_json::<B>(svc, body) {
        Err(e) => (Said::default(), Err(e)),
        Ok(b) => (said(&b), convert(b)),
    };
    let error = match result {
        Ok(request) => return Ok(request),
        Err(error) => error,
    };
    let (id, request_id) = match request_id_of(headers, said.request_id) {
        Ok(mut id) => {
            let named = assign_request_id(&mut id);
            (id, named)
        }
        // A key that is not text: recorded under a fresh `refused-` id, and named nowhere.
        Err(_) => (String::new(), None),
    };
    if !unread {
        let user = said.user.unwrap_or_default();
        svc.record_unread(kind, &user, &id, &error).await;
    }
    Err(Refused { error, request_id })
}

/// Whether a body could not be read because its client stopped sending it (the connection
/// closed before the body's end), as opposed to a body that was too large or malformed.
fn client_left(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = source {
        // hyper's body error wraps the cause: an end of input before the body's end.
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            );
        }
        source = e.source();
    }
    false
}

/// What a front's body says of its request before it is converted (for a refusal's row).
#[derive(Default)]
pub(crate) struct Said {
    pub user: Option<String>,
    pub request_id: Option<String>,
}

impl Said {
    pub(crate) fn by(user: &str, request_id: &Option<String>) -> Self {
        Said {
            user: Some(user.to_string()),
            request_id: request_id.clone(),
        }
    }
}

/// Reads a JSON body, refusing oversized or malformed ones as bad input.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    svc: &RouterService,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, RouterError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            RouterError::InvalidArgument(format!(
                "request body is larger than the router's limit of {} bytes",
                body_limit(svc)
            ))
        } else {
            RouterError::InvalidArgument(format!("cannot read request body: {rejection}"))
        }
    })?;
    // Every request is an object. serde reads a struct from an array too, by position, and its
    // refusal of one then names our type ("expected struct SyftSearchRequest with 5 elements").
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(RouterError::InvalidArgument(
            "invalid JSON body: the request must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| RouterError::InvalidArgument(format!("invalid JSON body: {e}")))
}
