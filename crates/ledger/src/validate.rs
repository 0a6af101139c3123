//! Input checks shared by every interface; each failure is `INVALID_ARGUMENT`.

use crate::error::{LedgerError, Result};

pub const MAX_EMAIL: usize = 254;
pub const MAX_NAME: usize = syft_error::MAX_USAGE_NAME;
pub const MAX_PATH: usize = 500;
pub const MAX_KEY: usize = 200;
pub const MAX_REASON: usize = 500;
pub const MAX_TOKENS: i64 = syft_error::MAX_USAGE_COUNT;

/// A caller's idempotency key: required, at most [`MAX_KEY`] bytes.
pub fn idempotency_key(value: &str) -> Result<&str> {
    text("idempotency_key", value, MAX_KEY, true)
}

/// The prefix under which the accounting API's direct transfers keep their senders' keys.
pub const DIRECT_KEY_PREFIX: &str = "direct:";

/// A hold's idempotency key ([`idempotency_key`]), outside the direct transfers' namespace: a
/// recipient that named a hold `direct:<sender id>:<key>` took that sender's next direct payment
/// key, and the payment was refused `IDEMPOTENCY_CONFLICT`.
pub fn hold_key(value: &str) -> Result<&str> {
    let key = idempotency_key(value)?;
    if key.starts_with(DIRECT_KEY_PREFIX) {
        return Err(LedgerError::invalid(format!(
            "idempotency_key: keys starting with {DIRECT_KEY_PREFIX:?} are the accounting API's"
        )));
    }
    Ok(key)
}

/// Lower-cases and checks an email: one `@`, non-empty local part and domain, no spaces.
pub fn email(field: &str, value: &str) -> Result<String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(LedgerError::invalid(format!("{field} is required")));
    }
    let ok = value.len() <= MAX_EMAIL
        && value.split('@').count() == 2
        && value.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains("..")
        })
        && value.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if !ok {
        return Err(LedgerError::invalid(format!(
            "{field} {value:?} is not a valid email"
        )));
    }
    Ok(value.to_ascii_lowercase())
}

/// A chosen secret: 8 to 256 printable ASCII characters. HTTP Basic, which the accounting SDK
/// signs in with, carries other characters in Latin-1 (`requests`) or not at all: an SDK user
/// whose password had an "ä" could never sign in again, each try counting as a wrong guess.
pub fn secret(field: &str, secret: &str) -> Result<()> {
    let printable = |c: char| c.is_ascii_graphic() || c == ' ';
    if secret.len() < 8 || secret.len() > 256 || !secret.chars().all(printable) {
        return Err(LedgerError::invalid(format!(
            "{field} must be 8 to 256 printable ASCII characters (HTTP Basic, which the \
             accounting SDK signs in with, carries no others reliably)"
        )));
    }
    // A `Bearer` credential is read trimmed (a header's value has no edges), so a secret with a
    // space at either end worked over Basic only, and each try elsewhere counted as a wrong one.
    if secret.trim() != secret {
        return Err(LedgerError::invalid(format!(
            "{field} must not start or end with a space (a Bearer credential cannot carry one)"
        )));
    }
    Ok(())
}

/// Domains that `email-validator` (behind pydantic's `EmailStr`, which `syft-accounting-sdk`
/// uses for every email it reads) refuses as special-use or reserved, with their subdomains.
const SPECIAL_USE_DOMAINS: [&str; 6] = ["arpa", "invalid", "local", "localhost", "onion", "test"];
/// `atext` of RFC 5322: what an unquoted local part may contain besides dots.
const ATEXT_SYMBOLS: &str = "!#$%&'*+-/=?^_`{|}~";

/// An optional email filter: empty means none, anything else must be a valid email.
pub fn optional_email(field: &str, value: &str) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    email(field, value).map(Some)
}

/// [`email`], plus the rules of the Python `email-validator` package (syntax and special-use
/// domains, no DNS), so an account created here can be read by `syft-accounting-sdk`: its
/// `EmailStr` fields make `get_user`, `get_all_users` and the transaction history fail on an
/// email it considers invalid, such as `owner@router.local`. Used when an account is created;
/// lookups keep [`email`] so accounts made before this rule stay reachable.
pub fn new_account_email(field: &str, value: &str) -> Result<String> {
    let email = email(field, value)?;
    match sdk_email_problem(&email) {
        None => Ok(email),
        Some(why) => Err(LedgerError::invalid(format!(
            "{field} {email:?} cannot be used for an account: {why}. Clients such as \
             syft-accounting-sdk would not read it back as it is; use a routable ASCII domain, \
             e.g. example.com"
        ))),
    }
}

/// Why `email-validator` would refuse `email` (already checked by [`email`]), if it would.
fn sdk_email_problem(email: &str) -> Option<String> {
    let (local, domain) = email.split_once('@')?;
    let dot_atom_ok = |s: &str, allowed: &dyn Fn(char) -> bool| {
        !s.starts_with('.') && !s.ends_with('.') && !s.contains("..") && s.chars().all(allowed)
    };
    // Emails are compared with ASCII letters folded (lookups keep that, so accounts made before
    // this rule stay reachable): a capital outside ASCII stayed, so `Ünal@` was another account
    // than `ünal@`, and money sent to `ÜNAL@` went to whoever registered `Ünal@` first.
    // Any letter with a lower-case form of its own: capitals, and title-case letters (`ǅ`).
    if local
        .chars()
        .any(|c| c.to_lowercase().ne(std::iter::once(c)))
    {
        return Some(
            "the part before the @ holds a capital letter outside ASCII; write it in lower case"
                .into(),
        );
    }
    // No 64-byte limit on the local part: email-validator applies it only in strict mode.
    let local_char = |c: char| c == '.' || c.is_alphanumeric() || ATEXT_SYMBOLS.contains(c);
    if !dot_atom_ok(local, &local_char) {
        return Some(
            "the part before the @ may hold letters, digits, dots (not first, last or doubled) \
             and !#$%&'*+-/=?^_`{|}~ only"
                .into(),
        );
    }
    // The SDK reads a local part back in NFC and refuses one starting with a combining mark: a
    // local part in another form would read as another account's, one starting so not at all.
    if !unicode_normalization::is_nfc(local)
        || local
            .chars()
            .next()
            .is_some_and(unicode_normalization::char::is_combining_mark)
    {
        return Some(
            "the part before the @ must be in Unicode normal form C and not start with a \
             combining mark"
                .into(),
        );
    }
    // ASCII only: the SDK maps a domain through IDNA (UTS-46), so `ｅxample.com` (a fullwidth
    // "ｅ") read back as `example.com`, and an open registration could take an email shown as
    // another account's.
    let domain_char = |c: char| c == '.' || c == '-' || c.is_ascii_alphanumeric();
    if !dot_atom_ok(domain, &domain_char) {
        return Some("the domain may hold ASCII letters, digits, dashes and dots only".into());
    }
    for label in domain.split('.') {
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!(
                "the domain label {label:?} starts or ends with a dash"
            ));
        }
        if label.len() > 63 {
            return Some(format!(
                "the domain label {label:?} is longer than 63 bytes"
            ));
        }
        // No dashes in third and fourth place, so no `xn--` label: the SDK reads one back in
        // Unicode (`bob@xn--bcher-kva.example` as `bob@bücher.example`, which may be another,
        // older account's email), and refuses those its IDNA 2008 rules reject (an emoji's,
        // `xn--zz`), which broke `get_all_users`.
        if label.get(2..4) == Some("--") {
            return Some(if label.starts_with("xn") {
                format!(
                    "the domain label {label:?} is an internationalized one (xn--), which \
                     clients such as the SDK read back in another form"
                )
            } else {
                format!("the domain label {label:?} has two dashes in third and fourth place")
            });
        }
    }
    if !domain.contains('.') {
        return Some(format!("the domain {domain:?} has no dot"));
    }
    if !domain.ends_with(|c: char| c.is_alphabetic()) {
        return Some(format!(
            "the domain {domain:?} does not end in a top-level domain (letters)"
        ));
    }
    let special = SPECIAL_USE_DOMAINS
        .iter()
        .find(|d| domain == **d || domain.ends_with(&format!(".{d}")))?;
    Some(format!(
        "its domain {domain:?} is under .{special}, a special-use name that has no public email"
    ))
}

/// A free-text field with a length limit; `required` rejects empty.
pub fn text<'a>(field: &str, value: &'a str, max: usize, required: bool) -> Result<&'a str> {
    if required && value.trim().is_empty() {
        return Err(LedgerError::invalid(format!("{field} is required")));
    }
    if value.len() > max {
        return Err(LedgerError::invalid(format!(
            "{field} is too long ({} bytes, at most {max})",
            value.len()
        )));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(LedgerError::invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(value)
}

pub fn count(field: &str, value: i64) -> Result<i64> {
    if !(0..=MAX_TOKENS).contains(&value) {
        return Err(LedgerError::invalid(format!(
            "{field} {value} is out of range"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            email("e", " Alice@Example.com ").unwrap(),
            "alice@example.com"
        );
        for bad in [
            "",
            "alice",
            "a@",
            "@b.c",
            "a@b@c",
            "a b@c.d",
            "a@.c",
            "a@b..c",
            &"x".repeat(300),
        ] {
            assert!(email("e", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn new_account_emails_follow_the_sdk_validator() {
        for good in [
            "owner@example.com",
            "alice+tag@mail.example.org",
            "o'neil@router.example",
            "x@a-b.co",
            "\u{e9}lise@example.com",
        ] {
            assert_eq!(new_account_email("e", good).unwrap(), good, "{good}");
        }
        for (bad, why) in [
            ("owner@router.local", "special-use"),
            ("a@b.localhost", "special-use"),
            ("a@localhost", "no dot"),
            ("a@foo.test", "special-use"),
            ("a@x.invalid", "special-use"),
            ("a@1.in-addr.arpa", "special-use"),
            ("a@abc.onion", "special-use"),
            ("a@example.123", "top-level"),
            (".a@example.com", "before the @"),
            ("a.@example.com", "before the @"),
            ("a..b@example.com", "before the @"),
            ("a\"b@example.com", "before the @"),
            ("a@-x.example.com", "dash"),
            ("a@x_y.example.com", "domain may hold"),
            ("a@ab--cd.example.com", "two dashes"),
            // Read back by the SDK as `bob@example.com` (a fullwidth "ｅ").
            ("bob@\u{ff45}xample.com", "ASCII letters"),
            ("a@b\u{fc}cher.example", "ASCII letters"),
            // Not Punycode of a valid label: the SDK refuses the account, and with it
            // `get_all_users` and its correspondents' histories.
            ("y@xn--zz.com", "internationalized"),
            ("z@example.xn--zz", "internationalized"),
            // Valid IDNA, read back by the SDK as `a_b.c-d@bücher.example` (maybe another's),
            // or refused by its IDNA 2008 rules (an emoji).
            ("a_b.c-d@xn--bcher-kva.example", "internationalized"),
            ("x@xn--ls8h.com", "internationalized"),
            ("\u{345}w@example.com", "combining mark"),
            // "é" as e and a combining acute (Hangul jamo below: letters that NFC composes):
            // the SDK reads each as the composed character, another account's email.
            ("e\u{301}@example.com", "before the @"),
            ("\u{1100}\u{1161}@example.com", "normal form C"),
        ] {
            let err = new_account_email("email", bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(err.contains("syft-accounting-sdk"), "{bad}: {err}");
        }
        // The 64-byte local-part limit is not applied (the SDK does not apply it).
        let long_local = format!("{}@example.com", "x".repeat(65));
        assert!(new_account_email("e", &long_local).is_ok());
        let long_label = format!("a@{}.com", "x".repeat(64));
        assert!(new_account_email("e", &long_label).is_err());
        // Lookups stay lenient: accounts created before the rule remain reachable.
        assert!(email("e", "owner@router.local").is_ok());
    }

    #[test]
    fn texts() {
        assert!(text("f", "", 10, true).is_err());
        assert!(text("f", "", 10, false).is_ok());
        assert!(text("f", "01234567890", 10, false).is_err());
        assert!(text("f", "a\u{0}b", 10, false).is_err());
    }
}
