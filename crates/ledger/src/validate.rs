//! Input checks shared by every interface; each failure is `INVALID_ARGUMENT`.

use crate::error::{LedgerError, Result};

pub const MAX_EMAIL: usize = 254;
pub const MAX_NAME: usize = 200;
pub const MAX_PATH: usize = 500;
pub const MAX_KEY: usize = 200;
pub const MAX_REASON: usize = 500;
pub const MAX_TOKENS: i64 = 1_000_000_000_000;

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
    fn texts() {
        assert!(text("f", "", 10, true).is_err());
        assert!(text("f", "", 10, false).is_ok());
        assert!(text("f", "01234567890", 10, false).is_err());
        assert!(text("f", "a\u{0}b", 10, false).is_err());
    }
}
