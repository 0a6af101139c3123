//! Dashboard sessions: sign-in with an account's email and secret (or the admin key) in a POST
//! body, a random session token in an `HttpOnly; SameSite=Strict` cookie (`Secure` under TLS),
//! the token's SHA-256 in `dashboard_sessions` (migration 0010) so every replica accepts it and a
//! database dump signs no one in, a fixed lifetime, and sign-out.
//!
//! State-changing requests need three things: the cookie (which `SameSite=Strict` keeps off
//! cross-site requests), an `Origin` naming this host, and `X-CSRF-Token` equal to the session's
//! CSRF token (derived from the session token, so it is never stored and differs per session).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use super::{json, Dash, DashError, Reply};
use crate::auth::{constant_time_eq, generate_secret, Caller};
use crate::error::{LedgerError, Result};
use crate::rest::Peer;
use crate::store::{now_micros, sha256_hex};

const COOKIE: &str = "syft_session";
/// Sessions end this long after sign-in, whatever happens in between.
pub(crate) const SESSION_TTL_SECONDS: i64 = 12 * 3600;
/// Live dashboard sessions one account keeps; a sign-in past it ends the oldest.
pub(crate) const MAX_SESSIONS: i64 = 20;
const CSRF_HEADER: &str = "x-csrf-token";

/// A signed-in caller.
pub(crate) struct Session {
    pub caller: Caller,
    pub csrf: String,
    token_hash: String,
}

impl Session {
    /// Whether the session still exists (signed out or expired sessions end live streams).
    pub async fn alive(&self, d: &Dash) -> Result<bool> {
        Ok(lookup(d, &self.token_hash).await?.is_some())
    }
}

fn unauthenticated() -> LedgerError {
    LedgerError::Unauthenticated("not signed in, or the session expired".into())
}

fn csrf_of(token: &str) -> String {
    sha256_hex(&format!("csrf:{token}"))
}

/// The session tokens of the request's cookies, each once.
fn cookie_tokens(headers: &HeaderMap) -> Vec<String> {
    let mut tokens: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .collect();
    tokens.sort();
    tokens.dedup();
    tokens
}

/// The session token of the request's cookie; refused when there are several: another site of
/// this domain can set one (`Domain=` the parent, a longer `Path`, which browsers send first), and
/// the first one was taken, so the owner's own calls ran in the other site's session (alert
/// endpoints added to it) even after the owner signed in again.
fn cookie_token(headers: &HeaderMap) -> Result<String> {
    match <[String; 1]>::try_from(cookie_tokens(headers)) {
        Ok([token]) => Ok(token),
        Err(tokens) if tokens.is_empty() => Err(unauthenticated()),
        Err(_) => Err(LedgerError::Unauthenticated(
            "more than one dashboard session cookie came (another site of this domain may have \
             set one): clear this site's cookies and sign in again"
                .into(),
        )),
    }
}

/// Whether the request carries a session cookie at all (valid or not).
pub(crate) fn has_cookie(headers: &HeaderMap) -> bool {
    !cookie_tokens(headers).is_empty()
}

/// The fingerprint a session keeps of the credential it was opened with: of the account's stored
/// secret hash, or of the admin key's hash. A password change or another admin key changes it,
/// which ends every session opened with the old one (migration 0026).
fn credential_of(secret_hash: &str) -> String {
    sha256_hex(&format!("dashboard-session:{secret_hash}"))
}

/// The credential the admin signs in with now.
fn admin_credential(d: &Dash) -> String {
    credential_of(&sha256_hex(d.ledger.config().admin_key.expose()))
}

/// `Some(account_id)` of a live session (`None` inside: the admin), opened with the credential
/// that is current.
async fn lookup(d: &Dash, token_hash: &str) -> Result<Option<(Option<i64>, Option<String>)>> {
    type Row = (Option<i64>, Option<String>, Option<String>, Option<String>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT s.account_id, a.email, s.credential, a.secret_hash FROM dashboard_sessions s \
         LEFT JOIN accounts a ON a.id = s.account_id \
         WHERE s.token_hash = $1 AND s.expires_at > $2",
    )
    .bind(token_hash)
    .bind(now_micros())
    .fetch_optional(d.ledger.store().pool())
    .await?;
    let Some((account_id, email, credential, secret_hash)) = row else {
        return Ok(None);
    };
    let current = match account_id {
        None => admin_credential(d),
        Some(_) => credential_of(secret_hash.as_deref().unwrap_or_default()),
    };
    let held = credential.unwrap_or_default();
    if !constant_time_eq(held.as_bytes(), current.as_bytes()) {
        return Ok(None);
    }
    Ok(Some((account_id, email)))
}

/// The caller of a read request, from its session cookie.
pub(crate) async fn session(d: &Dash, headers: &HeaderMap) -> Result<Session> {
    let token = cookie_token(headers)?;
    let token_hash = sha256_hex(&token);
    let caller = match lookup(d, &token_hash).await?.ok_or_else(unauthenticated)? {
        // An admin session outlives no admin key: removing the key signs the admin out.
        (None, _) if d.ledger.config().admin_key.expose().is_empty() => {
            return Err(unauthenticated())
        }
        (None, _) => Caller::Admin,
        (Some(_), Some(email)) => d
            .ledger
            .store()
            .identity_by_email(&email)
            .await?
            .map(|a| Caller::Account(Arc::new(a)))
            .ok_or_else(unauthenticated)?,
        (Some(_), None) => return Err(unauthenticated()),
    };
    Ok(Session {
        caller,
        csrf: csrf_of(&token),
        token_hash,
    })
}

/// The caller of a state-changing request: a session, this origin, and its CSRF token.
pub(crate) async fn session_for_change(d: &Dash, headers: &HeaderMap) -> Result<Session> {
    check_origin(headers)?;
    let session = session(d, headers).await?;
    let sent = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !constant_time_eq(sent.as_bytes(), session.csrf.as_bytes()) {
        return Err(LedgerError::PermissionDenied(
            "missing or wrong X-CSRF-Token".into(),
        ));
    }
    Ok(session)
}

/// A session as a handler argument: the request is refused (401) before the handler runs when
/// its cookie names no live session.
impl FromRequestParts<Dash> for Session {
    type Rejection = DashError;

    async fn from_request_parts(parts: &mut Parts, d: &Dash) -> Result<Self, DashError> {
        Ok(session(d, &parts.headers).await?)
    }
}

/// The session of a state-changing request as a handler argument ([`session_for_change`]).
pub(crate) struct ForChange(pub Session);

impl FromRequestParts<Dash> for ForChange {
    type Rejection = DashError;

    async fn from_request_parts(parts: &mut Parts, d: &Dash) -> Result<Self, DashError> {
        Ok(Self(session_for_change(d, &parts.headers).await?))
    }
}

/// `Origin` must name the host the request was sent to: a page of another site cannot post here
/// even if a browser sent the cookie along.
pub(crate) fn check_origin(headers: &HeaderMap) -> Result<()> {
    let refused = |why: &str| LedgerError::PermissionDenied(format!("cross-origin request: {why}"));
    if !headers.contains_key(header::ORIGIN) {
        return Err(refused("no Origin header"));
    }
    // The Host header is filled in from HTTP/2's authority by the dashboard's router.
    match crate::web::foreign_origin(headers, None) {
        Some(why) => Err(refused(why)),
        None => Ok(()),
    }
}

/// The session cookie. `Secure` when this port serves TLS, and also when the page was loaded
/// over https (its `Origin`, checked against `Host` before any cookie is set): a proxy in front
/// that ends TLS must not leave a cookie a plain-http request to the same host would carry.
fn cookie(d: &Dash, headers: &HeaderMap, value: &str, max_age: i64) -> Result<HeaderValue> {
    let https_page = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o.starts_with("https://"));
    let secure = if d.secure || https_page {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .map_err(|e| LedgerError::Internal(e.to_string()))
}

#[derive(Deserialize)]
struct Login {
    /// Empty: `secret` is the admin key.
    #[serde(default)]
    email: String,
    secret: String,
}

/// The account of an email and secret (`None`: the admin, signed in with an empty email and the
/// admin key). Wrong credentials are `Unauthenticated`, which the throttle counts. Both go
/// through the API's own check, so they accept the same credentials and count against the
/// client's address as a wrong API credential does.
async fn check_credentials(
    d: &Dash,
    email: &str,
    secret: &str,
    peer: Option<IpAddr>,
) -> Result<Option<i64>> {
    let invalid = || LedgerError::Unauthenticated("invalid credentials".into());
    // The Basic check splits at the first colon: `victim@x:abc` with secret `def` would try
    // victim's secret `abc:def` under another throttle counter. No email holds a colon.
    if email.contains(':') {
        return Err(invalid());
    }
    if email.is_empty() {
        // The admin key as a Bearer credential; an account's password is not the admin's. The
        // Bearer check trims the secret, but the session keeps a fingerprint of it as sent: a
        // key with spaces around it would open a session that is void at once.
        if secret.trim() != secret {
            d.ledger.count_guess(peer)?;
            return Err(invalid());
        }
        return match d
            .ledger
            .authenticate(Some(&format!("Bearer {secret}")), peer)
            .await?
        {
            Caller::Admin => Ok(None),
            // A wrong admin key, as far as the address's count goes.
            Caller::Account(_) => {
                d.ledger.count_guess(peer)?;
                Err(invalid())
            }
        };
    }
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{email}:{secret}"));
    Ok(Some(
        d.ledger
            .authenticate(Some(&format!("Basic {basic}")), peer)
            .await?
            .account()?
            .id,
    ))
}

/// 429 with `Retry-After`: too many wrong secrets for this account in the current window.
fn locked_out(wait: Duration) -> Response {
    let secs = syft_error::retry_after_secs(wait);
    let message = format!("too many failed sign-ins for this account; try again in {secs} s");
    let mut response = DashError(LedgerError::ResourceExhausted(message)).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// `POST /dashboard/login` `{"email", "secret"}`: a new session, its cookie and CSRF token.
pub(super) async fn login(
    State(d): State<Dash>,
    Peer(peer): Peer,
    headers: HeaderMap,
    bytes: Bytes,
) -> Reply {
    check_origin(&headers)?;
    let body: Login = serde_json::from_slice(&bytes)
        .map_err(|e| LedgerError::invalid(format!("invalid JSON body: {e}")))?;
    let email = body.email.trim();
    let started = Instant::now();
    let attempt = match d.signins.check(email, started) {
        Ok(attempt) => attempt,
        Err(wait) => return Ok(locked_out(wait)),
    };
    let account_id = match check_credentials(&d, email, &body.secret, peer).await {
        Err(e @ LedgerError::Unauthenticated(_)) => {
            attempt.failed(started);
            return Err(e.into());
        }
        other => other?,
    };
    attempt.succeeded();
    let token = generate_secret();
    let now = now_micros();
    let pool = d.ledger.store().pool();
    sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= $1")
        .bind(now)
        .execute(pool)
        .await
        .map_err(LedgerError::from)?;
    // The secret was just checked against its stored hash (or is the admin key): the session's
    // credential is the fingerprint of that hash, with no read.
    let credential = credential_of(&sha256_hex(&body.secret));
    sqlx::query(
        "INSERT INTO dashboard_sessions (token_hash, account_id, created_at, expires_at, \
         credential) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(sha256_hex(&token))
    .bind(account_id)
    .bind(now)
    .bind(now + SESSION_TTL_SECONDS * 1_000_000)
    .bind(credential)
    .execute(pool)
    .await
    .map_err(LedgerError::from)?;
    // At most MAX_SESSIONS per account: sign-ins are not throttled when they succeed, and one
    // account made 730 live sessions a second, each a row for 12 hours. The oldest go first.
    // Not the admin's: operators (and their scripts) share its key, and each other's sign-ins
    // would sign them out; whoever holds the admin key can fill the database anyway.
    if let Some(id) = account_id {
        sqlx::query(&format!(
            "DELETE FROM dashboard_sessions WHERE account_id = $1 AND token_hash NOT IN \
             (SELECT token_hash FROM dashboard_sessions WHERE account_id = $1 \
              ORDER BY created_at DESC, token_hash LIMIT {MAX_SESSIONS})"
        ))
        .bind(id)
        .execute(pool)
        .await
        .map_err(LedgerError::from)?;
    }
    tracing::info!(admin = account_id.is_none(), "dashboard sign-in");
    let mut response = json(json!({"csrf": csrf_of(&token)}))?;
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookie(&d, &headers, &token, SESSION_TTL_SECONDS)?,
    );
    Ok(response)
}

/// `POST /dashboard/logout`: the session row goes, so the cookie is dead on every replica.
pub(super) async fn logout(
    State(d): State<Dash>,
    headers: HeaderMap,
    ForChange(session): ForChange,
) -> Reply {
    sqlx::query("DELETE FROM dashboard_sessions WHERE token_hash = $1")
        .bind(&session.token_hash)
        .execute(d.ledger.store().pool())
        .await
        .map_err(LedgerError::from)?;
    let mut response = json(json!({"signed_out": true}))?;
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(&d, &headers, "", 0)?);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_session_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; syft_session=abc ; b=2"),
        );
        assert_eq!(cookie_token(&h).ok().as_deref(), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("syft_session="));
        assert!(cookie_token(&h).is_err());
        assert!(!has_cookie(&h));
        // Two sessions (one set by a sibling site of the domain): neither is taken.
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("syft_session=theirs; syft_session=mine"),
        );
        let refused = cookie_token(&h).expect_err("ambiguous");
        assert!(refused.to_string().contains("more than one"), "{refused}");
        assert!(!refused.to_string().contains("  "), "one line: {refused}");
        assert!(has_cookie(&h));
        // The same one twice is one.
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("syft_session=mine; syft_session=mine"),
        );
        assert_eq!(cookie_token(&h).ok().as_deref(), Some("mine"));
    }

    #[test]
    fn origin_must_be_this_host() {
        let h = |origin: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_static(o));
            }
            h
        };
        assert!(check_origin(&h(Some("http://127.0.0.1:8080"))).is_ok());
        assert!(check_origin(&h(Some("https://127.0.0.1:8080"))).is_ok());
        assert!(check_origin(&h(Some("http://evil.example"))).is_err());
        assert!(check_origin(&h(Some("null"))).is_err());
        assert!(check_origin(&h(None)).is_err());
    }
}
