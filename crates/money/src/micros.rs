//! [`Micros`]: an amount of money as a whole number of micros, with exact arithmetic only.

use std::fmt;

use crate::format_micros;

/// An amount in micros (1 unit of currency = 1,000,000 micros). Arithmetic is checked: an
/// operation that would overflow says so instead of wrapping, and there is no conversion to or
/// from floats. Shown as a decimal (`10000` → `0.01`); serialized as the plain integer.
///
/// Signed, because the ledger's journal debits are negative amounts.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Micros(i64);

impl Micros {
    pub const ZERO: Micros = Micros(0);
    pub const MAX: Micros = Micros(i64::MAX);

    pub const fn new(micros: i64) -> Self {
        Self(micros)
    }

    /// The amount as an integer number of micros (for protobuf fields and SQL parameters).
    pub const fn get(self) -> i64 {
        self.0
    }

    pub const fn checked_add(self, other: Micros) -> Option<Micros> {
        match self.0.checked_add(other.0) {
            Some(v) => Some(Micros(v)),
            None => None,
        }
    }

    pub const fn checked_sub(self, other: Micros) -> Option<Micros> {
        match self.0.checked_sub(other.0) {
            Some(v) => Some(Micros(v)),
            None => None,
        }
    }

    /// `self - other`, clamped to the `i64` range.
    pub const fn saturating_sub(self, other: Micros) -> Micros {
        Micros(self.0.saturating_sub(other.0))
    }

    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl From<i64> for Micros {
    fn from(micros: i64) -> Self {
        Self(micros)
    }
}

impl From<Micros> for i64 {
    fn from(m: Micros) -> Self {
        m.0
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_micros(self.0))
    }
}

/// Stored as the `BIGINT` it is, in any database sqlx drives.
#[cfg(feature = "sqlx")]
mod sql {
    use sqlx::encode::IsNull;
    use sqlx::error::BoxDynError;
    use sqlx::{Database, Decode, Encode, Type};

    use super::Micros;

    impl<DB: Database> Type<DB> for Micros
    where
        i64: Type<DB>,
    {
        fn type_info() -> DB::TypeInfo {
            <i64 as Type<DB>>::type_info()
        }

        fn compatible(ty: &DB::TypeInfo) -> bool {
            <i64 as Type<DB>>::compatible(ty)
        }
    }

    impl<'q, DB: Database> Encode<'q, DB> for Micros
    where
        i64: Encode<'q, DB>,
    {
        fn encode_by_ref(
            &self,
            buf: &mut <DB as Database>::ArgumentBuffer<'q>,
        ) -> Result<IsNull, BoxDynError> {
            <i64 as Encode<'q, DB>>::encode_by_ref(&self.0, buf)
        }
    }

    impl<'r, DB: Database> Decode<'r, DB> for Micros
    where
        i64: Decode<'r, DB>,
    {
        fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
            Ok(Micros(<i64 as Decode<'r, DB>>::decode(value)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Micros;

    #[test]
    fn checked_arithmetic_is_exact() {
        let a = Micros::new(10_000);
        assert_eq!(a.checked_add(Micros::new(1)), Some(Micros::new(10_001)));
        assert_eq!(
            a.checked_sub(Micros::new(20_000)),
            Some(Micros::new(-10_000))
        );
        assert_eq!(Micros::MAX.checked_add(Micros::new(1)), None);
        assert_eq!(Micros::new(i64::MIN).checked_sub(Micros::new(1)), None);
        assert_eq!(
            Micros::new(i64::MIN).saturating_sub(Micros::new(1)),
            Micros::new(i64::MIN)
        );
        assert!(a.is_positive() && !Micros::ZERO.is_positive());
    }

    #[test]
    fn shown_as_decimal_serialized_as_integer() {
        assert_eq!(Micros::new(10_000).to_string(), "0.01");
        assert_eq!(Micros::new(-1_500_000).to_string(), "-1.5");
        let json = serde_json::to_string(&Micros::new(1_500_000)).unwrap();
        assert_eq!(json, "1500000");
        let back: Micros = serde_json::from_str(&json).unwrap();
        assert_eq!(back.get(), 1_500_000);
    }
}
