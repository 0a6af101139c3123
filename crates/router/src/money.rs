//! Exact decimal amounts and per-token cost arithmetic; the implementation lives in
//! [`syft_money`], shared with the ledger.

pub use syft_money::{
    format_micros, parse_decimal_micros, token_cost_micros, AmountError, MICROS_PER_UNIT,
};

/// Default upper bound for any configured price: 1,000,000 units of currency.
pub const DEFAULT_MAX_AMOUNT_MICROS: i64 = 1_000_000 * MICROS_PER_UNIT;
