//! Who is calling: the admin (admin key) or an account (Bearer secret or Basic email:secret).

use std::sync::Arc;

use base64::Engine;

use crate::error::{LedgerError, Result};
use crate::store::{sha256_hex, Identity, Store};

#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    /// Who the account is; read its balance fresh when needed.
    Account(Arc<Identity>),
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }

    pub fn account(&self) -> Result<&Identity> {
        match self {
            Caller::Account(a) => Ok(a),
            Caller::Admin => Err(LedgerError::PermissionDenied(
                "this call needs an account's credentials, not the admin key".into(),
            )),
        }
    }

    /// The admin, or the account with this email.
    pub fn may_see(&self, email: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Account(a) => a.email == email,
        }
    }
}

/// Generates an account secret: 32 random bytes, URL-safe.
pub fn generate_secret() -> String {
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    format!(
        "syft_sk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

/// Compares in time independent of where the inputs differ, and of their lengths: both are
/// hashed first, so comparing a guess with the admin key does not tell the key's length.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Whether an `authorization` header carries `Bearer <token>`.
pub(crate) fn bears(header: Option<&str>, token: &str) -> bool {
    header
        .and_then(|h| scheme(h, "Bearer"))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// The credentials after `name` and a space, the scheme matched without regard to case, as
/// RFC 9110 has it (`bearer x` was refused, and counted against the address as a wrong one).
fn scheme<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    let (given, rest) = header.split_once(' ')?;
    given.eq_ignore_ascii_case(name).then_some(rest)
}

/// Whether a header names credentials at all: a `Bearer` with nothing after it guesses no secret
/// (a router started without `--ledger-secret` sent one on every probe, and the failures it
/// counted locked every client of its machine out), so it is refused as missing is, uncounted.
pub(crate) fn names_credentials(header: Option<&str>) -> bool {
    header.is_some_and(|h| {
        let h = h.trim();
        !(h.eq_ignore_ascii_case("Bearer")
            || scheme(h, "Bearer").is_some_and(|s| s.trim().is_empty()))
    })
}

/// Resolves an `authorization` header value to a caller.
pub async fn authenticate(store: &Store, admin_key: &str, header: Option<&str>) -> Result<Caller> {
    let header = header.ok_or_else(|| {
        LedgerError::Unauthenticated(
            "missing authorization (Bearer secret or Basic email:secret)".into(),
        )
    })?;
    let bad = || LedgerError::Unauthenticated("invalid credentials".into());
    if let Some(secret) = scheme(header, "Bearer").map(str::trim) {
        if !admin_key.is_empty() && constant_time_eq(secret.as_bytes(), admin_key.as_bytes()) {
            return Ok(Caller::Admin);
        }
        if secret.is_empty() || secret.len() > 512 {
            return Err(bad());
        }
        return store
            .identity_by_secret_hash(&sha256_hex(secret))
            .await?
            .map(Caller::Account)
            .ok_or_else(bad);
    }
    if let Some(encoded) = scheme(header, "Basic").map(str::trim) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| bad())?;
        let colon = decoded.iter().position(|&b| b == b':').ok_or_else(bad)?;
        let (email, secret) = (&decoded[..colon], &decoded[colon + 1..]);
        let email = std::str::from_utf8(email).map_err(|_| bad())?;
        let email = email.trim().to_ascii_lowercase();
        // No account's email holds a control character (`validate::email`): a wrong credential,
        // refused before the database (Postgres cannot take a NUL, and answered INTERNAL,
        // uncounted by the failed-authentication limit).
        if email.is_empty() || email.len() > 512 || email.chars().any(char::is_control) {
            return Err(bad());
        }
        let Some((identity, stored)) = store.identity_and_secret_hash(&email).await? else {
            return Err(bad());
        };
        // The secret as UTF-8, and as Latin-1, which is how `requests` (the accounting SDK's
        // HTTP client) sends Basic credentials: a password with an "ä" chosen before passwords
        // were kept to ASCII still signs in through the SDK, even one whose Latin-1 bytes happen
        // to be valid UTF-8 ("ß°"). Chosen passwords are ASCII now, read alike both ways.
        // An ASCII secret (every one chosen since, every generated one) reads alike both ways:
        // hashed once, as before.
        let matches = |text: &str| constant_time_eq(stored.as_bytes(), sha256_hex(text).as_bytes());
        let utf8_matches = std::str::from_utf8(secret).is_ok_and(matches);
        let latin1 = || secret.iter().map(|&b| char::from(b)).collect::<String>();
        if !(utf8_matches || (!secret.is_ascii() && matches(&latin1()))) {
            return Err(bad());
        }
        return Ok(Caller::Account(Arc::new(identity)));
    }
    Err(LedgerError::Unauthenticated(
        "unsupported authorization scheme: use Bearer or Basic".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, names_credentials, scheme};

    /// `bearer x` and `BASIC x` are `Bearer x` and `Basic x`; a scheme is a whole word.
    #[test]
    fn schemes_match_without_regard_to_case() {
        assert_eq!(scheme("Bearer abc", "Bearer"), Some("abc"));
        assert_eq!(scheme("bearer abc", "Bearer"), Some("abc"));
        assert_eq!(scheme("BASIC Zm9v", "Basic"), Some("Zm9v"));
        assert_eq!(scheme("Bearerabc", "Bearer"), None);
        assert_eq!(scheme("Bear abc", "Bearer"), None);
        assert_eq!(scheme("Basic abc", "Bearer"), None);
        for empty in [
            None,
            Some("Bearer"),
            Some("Bearer "),
            Some("bearer   "),
            Some(" Bearer"),
        ] {
            assert!(!names_credentials(empty), "{empty:?}");
        }
        for sent in ["Bearer x", "Basic Og==", "Token x", "Bearerx"] {
            assert!(names_credentials(Some(sent)), "{sent}");
        }
    }

    #[test]
    fn equal_only_when_equal_whatever_the_lengths() {
        assert!(constant_time_eq(b"admin-key", b"admin-key"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"admin-key", b"admin-kex"));
        assert!(!constant_time_eq(b"admin-key", b"admin-key-longer"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
