//! Exact money: integer micros, decimal text in and out, never floats. Parsing and formatting
//! live in [`syft_money`], shared with the router; this module keeps the ledger's error type.

use crate::error::LedgerError;

pub use syft_money::{format_micros, AmountError, MICROS_PER_UNIT};

impl From<AmountError> for LedgerError {
    fn from(e: AmountError) -> Self {
        LedgerError::invalid(e.to_string())
    }
}

/// Parses a decimal amount such as `0.01` or `12` into micros, exactly.
///
/// Rejects signs, exponents, NaN/inf, more than 6 decimals and values that do not fit in i64.
pub fn parse_decimal_micros(text: &str) -> Result<i64, LedgerError> {
    Ok(syft_money::parse_plain_decimal_micros(text, i64::MAX)?)
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
    fn wrapper_maps_to_invalid_argument() {
        assert_eq!(parse_decimal_micros("0.01").unwrap(), 10_000);
        assert_eq!(parse_decimal_micros(" 12 ").unwrap(), 12_000_000);
        for bad in ["1e3", "+1", "1.", "-0", "0.0000001", "9223372036854.775808"] {
            assert!(
                matches!(
                    parse_decimal_micros(bad),
                    Err(LedgerError::InvalidArgument(_))
                ),
                "{bad:?} accepted"
            );
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
