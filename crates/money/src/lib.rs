//! Exact money shared by the ledger and the router: integer micros, decimal text in and out,
//! per-token cost arithmetic. Never floats.
//!
//! Amounts are integer micros (1 unit of currency = 1,000,000 micros). Decimal text such as
//! `0.01`, `15`, `2.5e-3` is parsed digit by digit.

use thiserror::Error;

mod micros;

pub use micros::Micros;

/// Micros in one unit of currency.
pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// A currency code as ledgers and routers hold it: three ASCII letters, upper-cased (`usd` →
/// `USD`). `None` for anything else: an account in `EURO` could never be sold against, since a
/// router prices in a 3-letter code and refuses a ledger whose currency differs.
pub fn currency_code(text: &str) -> Option<String> {
    (text.len() == 3 && text.bytes().all(|b| b.is_ascii_alphabetic()))
        .then(|| text.to_ascii_uppercase())
}

/// Why a decimal amount was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount {0:?} is not a decimal number")]
    NotANumber(String),
    #[error("amount {0:?} is negative")]
    Negative(String),
    #[error("amount {0:?} has more than 6 decimal places")]
    TooPrecise(String),
    /// The text is in currency units, so is the maximum (then in micros).
    #[error(
        "amount {text:?} is above the maximum of {} ({max_micros} micros)",
        format_micros(*.max_micros)
    )]
    TooLarge { text: String, max_micros: i64 },
}

/// At most this many characters of a refused amount are said back: the whole text made a 1.5 MB
/// amount a 1.5 MB error.
const SHOWN_CHARS: usize = 40;

/// `text` as an error says it: cut after [`SHOWN_CHARS`] characters, with its length.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        None => text.to_string(),
        Some((at, _)) => format!("{}… ({} bytes)", &text[..at], text.len()),
    }
}

/// Parses a non-negative decimal (`"0.01"`, `"15"`, `"1.5e-3"`) into micros, exactly.
///
/// Rejects negative values, more than 6 decimal places, NaN/infinity (anything that is not a
/// plain decimal number) and values above `max_micros`.
pub fn parse_decimal_micros(text: &str, max_micros: i64) -> Result<i64, AmountError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(AmountError::Empty);
    }
    let nan = || AmountError::NotANumber(shown(text));
    let (negative, body) = match t.as_bytes()[0] {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => {
            let exp: i32 = body[i + 1..].parse().map_err(|_| nan())?;
            (&body[..i], exp)
        }
        None => (body, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(nan());
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(nan());
    }
    // digits = int_part ++ frac_part, value = digits * 10^(exponent - frac_len).
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let scale = i64::from(exponent) - frac_part.len() as i64 + 6; // power of ten applied to get micros
    if digits.is_empty() {
        return Ok(0); // zero in any spelling, including "-0"
    }
    if negative {
        return Err(AmountError::Negative(shown(text)));
    }
    let too_large = || AmountError::TooLarge {
        text: shown(text),
        max_micros,
    };
    // Trailing zeros may absorb a negative scale ("0.0100000").
    let trimmed = digits.trim_end_matches('0');
    let trailing = (digits.len() - trimmed.len()) as i64;
    let (significant, scale) = if scale < 0 {
        if trailing + scale < 0 {
            return Err(AmountError::TooPrecise(shown(text)));
        }
        (&digits[..(digits.len() as i64 + scale) as usize], 0)
    } else {
        (digits, scale)
    };
    if significant.len() as i64 + scale > 19 {
        return Err(too_large());
    }
    let mut value: i128 = 0;
    for b in significant.bytes() {
        value = value * 10 + i128::from(b - b'0');
    }
    value *= 10i128.pow(scale as u32);
    if value > i128::from(max_micros) {
        return Err(too_large());
    }
    i64::try_from(value).map_err(|_| too_large())
}

/// Parses a plain non-negative decimal (`"0.01"`, `"12"`, `".5"`) into micros, exactly.
///
/// Stricter than [`parse_decimal_micros`]: no sign (not even `+` or `-0`), no exponent, no
/// trailing `.`, and at most 6 digits after the point (even trailing zeros).
pub fn parse_plain_decimal_micros(text: &str, max_micros: i64) -> Result<i64, AmountError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(AmountError::Empty);
    }
    if t.starts_with('-') {
        return Err(AmountError::Negative(shown(text)));
    }
    let (int_part, frac_part) = t.split_once('.').unwrap_or((t, ""));
    if (int_part.is_empty() && frac_part.is_empty())
        || t.ends_with('.')
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(AmountError::NotANumber(shown(text)));
    }
    if frac_part.len() > 6 {
        return Err(AmountError::TooPrecise(shown(text)));
    }
    parse_decimal_micros(text, max_micros)
}

/// Formats micros as a plain decimal (`10000` -> `"0.01"`).
pub fn format_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let units = abs / MICROS_PER_UNIT as u64;
    let frac = abs % MICROS_PER_UNIT as u64;
    if frac == 0 {
        return format!("{sign}{units}");
    }
    let frac = format!("{frac:06}");
    format!("{sign}{units}.{}", frac.trim_end_matches('0'))
}

/// `ceil(tokens × micros_per_million / 1e6)` in integer arithmetic, saturating at `i64::MAX`.
pub fn token_cost_micros(tokens: u64, micros_per_million: i64) -> i64 {
    if tokens == 0 || micros_per_million <= 0 {
        return 0;
    }
    let product = i128::from(tokens) * i128::from(micros_per_million);
    let cost = (product + 999_999) / 1_000_000;
    i64::try_from(cost).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router's default price ceiling: 1,000,000 units of currency.
    const DEFAULT_MAX_AMOUNT_MICROS: i64 = 1_000_000 * MICROS_PER_UNIT;

    #[test]
    fn a_currency_code_is_three_letters_upper_cased() {
        assert_eq!(currency_code("usd").as_deref(), Some("USD"));
        assert_eq!(currency_code("EUR").as_deref(), Some("EUR"));
        for bad in ["", "US", "EURO", "US1", " US", "ÜSD", "U$D"] {
            assert_eq!(currency_code(bad), None, "{bad:?}");
        }
    }

    fn p(s: &str) -> Result<i64, AmountError> {
        parse_decimal_micros(s, DEFAULT_MAX_AMOUNT_MICROS)
    }

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(p("0.01"), Ok(10_000));
        assert_eq!(p("1"), Ok(1_000_000));
        assert_eq!(p("15.000000"), Ok(15_000_000));
        assert_eq!(p("0.000001"), Ok(1));
        assert_eq!(p(".5"), Ok(500_000));
        assert_eq!(p("2."), Ok(2_000_000));
        assert_eq!(p("1e-2"), Ok(10_000));
        assert_eq!(p("1.5E3"), Ok(1_500_000_000));
        assert_eq!(p("0.0100000000"), Ok(10_000));
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("-0.0"), Ok(0));
        assert_eq!(p("0.1"), Ok(100_000)); // 0.1 is not representable as f64; exact here
        assert_eq!(p("1000000"), Ok(DEFAULT_MAX_AMOUNT_MICROS));
    }

    #[test]
    fn rejects_bad_amounts() {
        assert!(matches!(p("0.0000001"), Err(AmountError::TooPrecise(_))));
        assert!(matches!(p("1e-7"), Err(AmountError::TooPrecise(_))));
        assert!(matches!(p("-0.01"), Err(AmountError::Negative(_))));
        assert!(matches!(p("NaN"), Err(AmountError::NotANumber(_))));
        assert!(matches!(p("inf"), Err(AmountError::NotANumber(_))));
        assert!(matches!(p("1,5"), Err(AmountError::NotANumber(_))));
        assert!(matches!(p("."), Err(AmountError::NotANumber(_))));
        assert!(matches!(p("1e"), Err(AmountError::NotANumber(_))));
        assert!(matches!(p(""), Err(AmountError::Empty)));
        assert!(matches!(
            p("1000000.000001"),
            Err(AmountError::TooLarge { .. })
        ));
        assert!(matches!(p("1e300"), Err(AmountError::TooLarge { .. })));
        // A long refused amount is said back cut, not whole.
        let long = "1".repeat(100_000) + "x";
        let said = p(&long).expect_err("not a number").to_string();
        assert!(said.len() < 100, "{said}");
        assert!(said.contains("(100001 bytes)"), "{said}");
        // In the units the amount was written in (the micros too, for the gRPC's users).
        assert_eq!(
            p("1e300").map_err(|e| e.to_string()),
            Err("amount \"1e300\" is above the maximum of 1000000 (1000000000000 micros)".into())
        );
        assert!(matches!(
            p("99999999999999999999999"),
            Err(AmountError::TooLarge { .. })
        ));
    }

    #[test]
    fn formats_micros() {
        assert_eq!(format_micros(10_000), "0.01");
        assert_eq!(format_micros(1_500_000), "1.5");
        assert_eq!(format_micros(0), "0");
        assert_eq!(format_micros(-1), "-0.000001");
        assert_eq!(format_micros(12_000_000), "12");
        assert_eq!(format_micros(1), "0.000001");
        assert_eq!(format_micros(-1_500_000), "-1.5");
    }

    #[test]
    fn token_cost_rounds_up() {
        assert_eq!(token_cost_micros(1, 3_000_000), 3);
        assert_eq!(token_cost_micros(1, 1), 1); // 1e-6 micros rounds up to 1
        assert_eq!(token_cost_micros(1_000_000, 1), 1);
        assert_eq!(token_cost_micros(1_000_001, 1), 2);
        assert_eq!(token_cost_micros(0, 15_000_000), 0);
        assert_eq!(token_cost_micros(333, 15_000_000), 4_995);
        assert_eq!(token_cost_micros(u64::MAX, i64::MAX), i64::MAX);
    }

    // The ledger's plain-decimal grammar (formerly syft_ledger::money's own parser).

    fn plain(s: &str) -> Result<i64, AmountError> {
        parse_plain_decimal_micros(s, i64::MAX)
    }

    #[test]
    fn plain_parses_exactly() {
        assert_eq!(plain("0.01").unwrap(), 10_000);
        assert_eq!(plain("12").unwrap(), 12_000_000);
        assert_eq!(plain("0.000001").unwrap(), 1);
        assert_eq!(plain("1.5").unwrap(), 1_500_000);
        assert_eq!(plain(".5").unwrap(), 500_000);
        // 0.1 + 0.2 style float drift cannot happen.
        assert_eq!(plain("0.3").unwrap(), 300_000);
        assert_eq!(plain("0").unwrap(), 0);
    }

    #[test]
    fn plain_rejects_bad_text() {
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
            assert!(plain(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn plain_formats_round_trip() {
        for m in [0, 1, 999_999, 1_000_001, 123_456_789] {
            assert_eq!(plain(&format_micros(m)).unwrap(), m);
        }
    }
}
