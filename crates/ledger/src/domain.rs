//! The ledger's domain vocabulary: transfer statuses and actors as enums, each mapped to and from
//! its stored text in exactly one place (the `text_enum!` table below). The database columns hold
//! that text; the protobuf enums are reached through `From`.

use syft_proto::ledger as pb;

pub use syft_money::Micros;

/// Text stored in the database that names no variant of the expected enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {text:?}")]
pub struct UnknownText {
    pub kind: &'static str,
    pub text: String,
}

/// Declares a fieldless enum stored as text: `as_str`, `FromStr`, `Display`, and the sqlx
/// `Type`/`Encode`/`Decode` impls (as the text, for every database sqlx drives), so rows bind and
/// decode it directly.
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// The text stored in the database (and used on the REST API).
            #[allow(dead_code)]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::domain::UnknownText;

            fn from_str(text: &str) -> ::std::result::Result<Self, Self::Err> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::domain::UnknownText {
                        kind: stringify!($name),
                        text: text.to_string(),
                    }),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<DB: ::sqlx::Database> ::sqlx::Type<DB> for $name
        where
            str: ::sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as ::sqlx::Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as ::sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: ::sqlx::Database> ::sqlx::Encode<'q, DB> for $name
        where
            &'q str: ::sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as ::sqlx::Database>::ArgumentBuffer<'q>,
            ) -> ::std::result::Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                <&'q str as ::sqlx::Encode<'q, DB>>::encode(self.as_str(), buf)
            }
        }

        impl<'r, DB: ::sqlx::Database> ::sqlx::Decode<'r, DB> for $name
        where
            String: ::sqlx::Decode<'r, DB>,
        {
            fn decode(
                value: <DB as ::sqlx::Database>::ValueRef<'r>,
            ) -> ::std::result::Result<Self, ::sqlx::error::BoxDynError> {
                Ok(<String as ::sqlx::Decode<'r, DB>>::decode(value)?.parse()?)
            }
        }
    };
}
pub(crate) use text_enum;

text_enum! {
    /// Where a two-phase transfer stands (`transfers.status`, `hosted_transfers.status`).
    pub enum TransferStatus {
        /// Authorized: the amount is held.
        Pending = "PENDING",
        /// Captured: `captured` moved from sender to recipient.
        Completed = "COMPLETED",
        /// Voided or expired: nothing moved.
        Cancelled = "CANCELLED",
    }
}

text_enum! {
    /// Who created or resolved a transfer (`created_by`, `resolved_by`).
    pub enum Actor {
        /// The ledger itself (expiry, recovery).
        System = "SYSTEM",
        Sender = "SENDER",
        Recipient = "RECIPIENT",
    }
}

text_enum! {
    /// Who made a refund (`refunds.refunded_by`).
    pub enum Refunder {
        /// The transfer's recipient, giving back money it received.
        Recipient = "RECIPIENT",
        Admin = "ADMIN",
    }
}

impl From<TransferStatus> for pb::TransferStatus {
    fn from(s: TransferStatus) -> Self {
        match s {
            TransferStatus::Pending => pb::TransferStatus::Pending,
            TransferStatus::Completed => pb::TransferStatus::Completed,
            TransferStatus::Cancelled => pb::TransferStatus::Cancelled,
        }
    }
}

impl From<Actor> for pb::Actor {
    fn from(a: Actor) -> Self {
        match a {
            Actor::System => pb::Actor::System,
            Actor::Sender => pb::Actor::Sender,
            Actor::Recipient => pb::Actor::Recipient,
        }
    }
}

impl TryFrom<pb::TransferStatus> for TransferStatus {
    /// `UNSPECIFIED` names no status.
    type Error = UnknownText;

    fn try_from(s: pb::TransferStatus) -> Result<Self, Self::Error> {
        match s {
            pb::TransferStatus::Pending => Ok(TransferStatus::Pending),
            pb::TransferStatus::Completed => Ok(TransferStatus::Completed),
            pb::TransferStatus::Cancelled => Ok(TransferStatus::Cancelled),
            pb::TransferStatus::Unspecified => Err(UnknownText {
                kind: "TransferStatus",
                text: "UNSPECIFIED".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        for s in [
            TransferStatus::Pending,
            TransferStatus::Completed,
            TransferStatus::Cancelled,
        ] {
            assert_eq!(s.as_str().parse::<TransferStatus>(), Ok(s));
        }
        for a in [Actor::System, Actor::Sender, Actor::Recipient] {
            assert_eq!(a.to_string().parse::<Actor>(), Ok(a));
        }
        assert!("pending".parse::<TransferStatus>().is_err());
        assert_eq!(
            pb::TransferStatus::from(TransferStatus::Completed),
            pb::TransferStatus::Completed
        );
        assert_eq!(pb::Actor::from(Actor::Sender), pb::Actor::Sender);
    }
}
