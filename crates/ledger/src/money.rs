//! Exact money: integer micros, decimal text in and out, never floats.

use crate::error::LedgerError;

pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// Parses a decimal amount such as `0.01` or `12` into micros, exactly.
///
/// Rejects signs, exponents, NaN/inf, more than 6 decimals and values that do not fit in i64.
pub fn parse_decimal_micros(text: &str) -> Result<i64, LedgerError> {
    let text = text.trim();
    let bad = || {
        LedgerError::invalid(format!(
            "invalid amount {text:?}: expected a decimal like 0.01"
        ))
    };
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        if text.starts_with('-') {
            return Err(LedgerError::invalid(format!(
                "amount {text} must not be negative"
            )));
        }
        return Err(bad());
    }
    if text.ends_with('.') {
        return Err(bad());
    }
    if frac.len() > 6 {
        return Err(LedgerError::invalid(format!(
            "amount {text} has more than 6 decimals"
        )));
    }
    let too_big = || LedgerError::invalid(format!("amount {text} is too large"));
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_big())?
    };
    let mut frac_micros: i64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_micros += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
    }
    whole
        .checked_mul(MICROS_PER_UNIT)
        .and_then(|m| m.checked_add(frac_micros))
        .ok_or_else(too_big)
}

/// Formats micros as a decimal with no trailing zeros: 10000 -> "0.01".
pub fn format_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let whole = abs / MICROS_PER_UNIT as u64;
    let frac = abs % MICROS_PER_UNIT as u64;
    if frac == 0 {
        return format!("{sign}{whole}");
    }
    let frac = format!("{frac:06}");
    format!("{sign}{whole}.{}", frac.trim_end_matches('0'))
}

/// Checks an amount that must be positive and at most `max`.
pub fn check_positive(field: &str, micros: i64, max: i64) -> Result<i64, LedgerError> {
    if micros <= 0 {
        return Err(LedgerError::invalid(format!(
            "{field} must be positive, got {micros}"
        )));
    }
    if micros > max {
        return Err(LedgerError::invalid(format!(
            "{field} {micros} exceeds the maximum of {max} micros"
        )));
    }
    Ok(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_decimal_micros("0.01").unwrap(), 10_000);
        assert_eq!(parse_decimal_micros("12").unwrap(), 12_000_000);
        assert_eq!(parse_decimal_micros("0.000001").unwrap(), 1);
        assert_eq!(parse_decimal_micros("1.5").unwrap(), 1_500_000);
        assert_eq!(parse_decimal_micros(".5").unwrap(), 500_000);
        // 0.1 + 0.2 style float drift cannot happen.
        assert_eq!(parse_decimal_micros("0.3").unwrap(), 300_000);
        assert_eq!(parse_decimal_micros("0").unwrap(), 0);
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            ".",
            "1.",
            "-1",
            "-0.01",
            "1e3",
            "NaN",
            "inf",
            "0.0000001",
            "1,5",
            " ",
            "+1",
            "99999999999999999999",
            "9223372036854.775808",
        ] {
            assert!(parse_decimal_micros(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_micros(10_000), "0.01");
        assert_eq!(format_micros(12_000_000), "12");
        assert_eq!(format_micros(1), "0.000001");
        assert_eq!(format_micros(-1_500_000), "-1.5");
        for m in [0, 1, 999_999, 1_000_001, 123_456_789] {
            assert_eq!(parse_decimal_micros(&format_micros(m)).unwrap(), m);
        }
    }

    #[test]
    fn positive_bounds() {
        assert!(check_positive("amount", 0, 10).is_err());
        assert!(check_positive("amount", -5, 10).is_err());
        assert!(check_positive("amount", 11, 10).is_err());
        assert_eq!(check_positive("amount", 10, 10).unwrap(), 10);
    }
}
