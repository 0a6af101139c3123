//! Signing secrets: generated, sealed at rest under the ledger's alerts key, and used to sign
//! per the Standard Webhooks spec.
//!
//! Sealing is ChaCha20-Poly1305 (ring) with a random nonce and the endpoint id as associated data,
//! so a database dump alone does not reveal a secret, and a sealed secret copied to another
//! endpoint's row does not open. The key is SHA-256 of `--alerts-key`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use sha2::{Digest, Sha256};

use crate::error::{LedgerError, Result};

const SECRET_PREFIX: &str = "whsec_";
const SECRET_BYTES: usize = 32;

/// The key signing secrets are sealed with.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    pub fn from_passphrase(passphrase: &str) -> Result<Self> {
        if passphrase.len() < 16 {
            return Err(LedgerError::invalid(
                "the alerts key must be at least 16 characters",
            ));
        }
        let digest = Sha256::digest(passphrase.as_bytes());
        let key = UnboundKey::new(&CHACHA20_POLY1305, &digest)
            .map_err(|_| LedgerError::Internal("cannot build the alerts key".into()))?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// `base64(nonce ‖ ciphertext ‖ tag)`, bound to `endpoint_id`.
    pub fn seal(&self, endpoint_id: &str, secret: &str) -> Result<String> {
        use rand::RngCore;
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut data = secret.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(endpoint_id.as_bytes()),
                &mut data,
            )
            .map_err(|_| LedgerError::Internal("cannot seal a signing secret".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(STANDARD.encode(out))
    }

    pub fn open(&self, endpoint_id: &str, sealed: &str) -> Result<String> {
        let raw = STANDARD
            .decode(sealed)
            .ok()
            .filter(|r| r.len() > NONCE_LEN)
            .ok_or_else(|| LedgerError::Internal("sealed secret is malformed".into()))?;
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| LedgerError::Internal("sealed secret is malformed".into()))?;
        let mut data = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(endpoint_id.as_bytes()), &mut data)
            .map_err(|_| {
                LedgerError::Internal(
                    "cannot open a signing secret: was --alerts-key changed?".into(),
                )
            })?;
        String::from_utf8(plain.to_vec())
            .map_err(|_| LedgerError::Internal("sealed secret is not text".into()))
    }
}

/// A new signing secret in the Standard Webhooks form `whsec_<base64 of 32 random bytes>`.
pub fn generate_secret() -> String {
    use rand::RngCore;
    let mut raw = [0u8; SECRET_BYTES];
    rand::thread_rng().fill_bytes(&mut raw);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(raw))
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>` for one secret.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String> {
    let key = STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .map_err(|_| LedgerError::Internal("signing secret is not base64".into()))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|_| LedgerError::Internal("cannot key HMAC".into()))?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The `webhook-signature` header: one `v1,…` per live secret, space separated (during a
/// rotation's overlap the previous secret signs too, so receivers can switch at their pace).
pub fn signature_header(
    secrets: &[String],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String> {
    let parts = secrets
        .iter()
        .map(|s| sign(s, msg_id, timestamp, body))
        .collect::<Result<Vec<_>>>()?;
    Ok(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secret_opens_only_for_its_endpoint_and_key() {
        let key = SealKey::from_passphrase("a-key-of-sixteen-chars").unwrap();
        let secret = generate_secret();
        let sealed = key.seal("ep_1", &secret).unwrap();
        assert!(!sealed.contains(&secret));
        assert_eq!(key.open("ep_1", &sealed).unwrap(), secret);
        assert!(key.open("ep_2", &sealed).is_err());
        let other = SealKey::from_passphrase("another-key-of-16-chars").unwrap();
        assert!(other.open("ep_1", &sealed).is_err());
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks spec (and its reference libraries' tests).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
