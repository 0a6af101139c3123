//! The codecs of the syft gRPC services and clients: prost's, with one check before decoding.
//!
//! prost decodes a message whole before any handler sees it, and a list entry can cost far more
//! decoded than on the wire: an empty `Message` of a `ChatRequest` is 2 bytes on the wire and 72
//! in memory, an empty `Usage` of a `RecordUsageBatchRequest` 2 and about 240 (more while the
//! list's buffer grows). So a message well within the transport's size limit (a router's is its
//! prompt limit plus 1 MiB, 5 MiB by default; a ledger's tonic's 4 MiB) made a server allocate
//! hundreds of MiB before authentication or validation, from anyone who can reach the port. A
//! message with more top-level fields than its service's bound (a list's entries are fields
//! each) is refused with `INVALID_ARGUMENT` before it is decoded: [`LedgerCodec`] for the
//! ledger's and alerts' services and their clients, [`RouterCodec`] for the router's.
//!
//! Top level only, with one exception: the one list of strings or messages nested in a request,
//! `ChatOptions.stop_sequences`, is counted too (an empty string costs 12 to 24 times its wire
//! bytes). Packed lists of numbers (`GetUsageStatsRequest.group_by`, `AlertRule.steps`) are one
//! field each and cost a few times their wire bytes at most. Groups, a proto2 encoding that no
//! client of these services sends and that prost skips unseen under an unknown field number, are
//! refused where they are counted: they would hide what follows them from the count (deeper
//! down, prost skips them without keeping anything).

use std::any::TypeId;
use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The longest list a router request may carry (`messages`; `limits.max_messages` may not be set
/// higher).
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Top-level fields a router message may have: the longest list and room for every other field.
pub const ROUTER_MAX_FIELDS: usize = MAX_LIST_ENTRIES + 1_000;

/// Top-level fields a ledger message may have: its requests' lists stop at 1,000 usage rows, its
/// responses' at 10,000 usage-stats groups (pages at 500).
pub const LEDGER_MAX_FIELDS: usize = 11_000;

/// Entries of the one nested list counted (`ChatOptions.stop_sequences`; 4 are accepted).
pub const MAX_NESTED_ENTRIES: usize = 1_000;

/// prost's codec whose decoder refuses a message of more than `MAX` top-level fields before
/// decoding it.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U, const MAX: usize>(PhantomData<(T, U)>);

/// The codec of the router's service and clients (named by `build.rs`).
pub type RouterCodec<T, U> = BoundedCodec<T, U, ROUTER_MAX_FIELDS>;

/// The codec of the ledger's and alerts' services and clients (named by `build.rs`).
pub type LedgerCodec<T, U> = BoundedCodec<T, U, LEDGER_MAX_FIELDS>;

impl<T, U, const MAX: usize> Default for BoundedCodec<T, U, MAX> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U, const MAX: usize> Codec for BoundedCodec<T, U, MAX>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U, MAX>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(ProstDecoder::default())
    }
}

/// prost's decoder behind a count of the message's fields.
#[derive(Debug, Clone)]
pub struct BoundedDecoder<U, const MAX: usize>(ProstDecoder<U>);

impl<U: prost::Message + Default + 'static, const MAX: usize> Decoder for BoundedDecoder<U, MAX> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf;
        // tonic hands a decoder one message in one contiguous buffer (its `chunk` is the whole
        // message); were it ever split, the count would see the first part only.
        if !within_bounds(buf.chunk(), MAX, nested_list::<U>()) {
            return Err(Status::invalid_argument(format!(
                "the message has more than {MAX} fields or list entries (or a group, which these \
                 services do not use): refused before decoding"
            )));
        }
        self.0.decode(buf).map_err(undecodable::<U>)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// A message of type `U` that prost could not decode (a string field that is not UTF-8, a length
/// past the end): tonic says `INTERNAL`, a fault of the server's. A request that does not decode
/// is the caller's fault, `INVALID_ARGUMENT` (not retried, not counted as the service failing);
/// an answer a client cannot decode stays `INTERNAL`. One codec serves both sides, and every
/// request type of these services, none of their answers, is named `…Request`.
fn undecodable<U>(status: Status) -> Status {
    let request = std::any::type_name::<U>().ends_with("Request");
    if request && status.code() == tonic::Code::Internal {
        Status::invalid_argument(format!("the request does not decode: {}", status.message()))
    } else {
        status
    }
}

/// The list nested in a message of type `U` that is counted as well: (the field that holds it,
/// the list's field inside).
fn nested_list<U: 'static>() -> Option<(u64, u64)> {
    (TypeId::of::<U>() == TypeId::of::<crate::router::ChatRequest>()).then_some((4, 4))
}

/// Whether an encoded message has at most `max_fields` top-level fields, at most
/// [`MAX_NESTED_ENTRIES`] entries in its `nested` list, and no group. A malformed message passes
/// as far as it is readable: prost's decoding then says what is wrong with it.
fn within_bounds(mut wire: &[u8], max_fields: usize, nested: Option<(u64, u64)>) -> bool {
    let mut fields = 0;
    let mut entries = 0;
    while let Some((tag, field)) = next_field(&mut wire) {
        fields += 1;
        match (field, nested) {
            (Field::Group, _) => return false,
            (Field::Bytes(mut inner), Some((outer, list))) if outer == tag => {
                while let Some((inner_tag, inner_field)) = next_field(&mut inner) {
                    match inner_field {
                        Field::Group => return false,
                        _ if inner_tag == list => entries += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if fields > max_fields || entries > MAX_NESTED_ENTRIES {
            return false;
        }
    }
    true
}

/// What a field holds, as far as the count is concerned.
enum Field<'a> {
    Scalar,
    Bytes(&'a [u8]),
    Group,
}

/// The next field off the front of `wire`: its tag and what it holds; `None` at the end, or
/// where the encoding breaks.
fn next_field<'a>(wire: &mut &'a [u8]) -> Option<(u64, Field<'a>)> {
    let key = varint(wire)?;
    let field = match key & 0b111 {
        0 => varint(wire).map(|_| Field::Scalar)?,
        1 => take(wire, 8).map(|_| Field::Scalar)?,
        2 => {
            let len = varint(wire)?;
            Field::Bytes(take(wire, len)?)
        }
        5 => take(wire, 4).map(|_| Field::Scalar)?,
        3 | 4 => Field::Group,
        // Wire types 6 and 7 do not exist: prost refuses them.
        _ => return None,
    };
    Some((key >> 3, field))
}

/// The first `len` bytes off the front of `wire`, if it has them.
fn take<'a>(wire: &mut &'a [u8], len: u64) -> Option<&'a [u8]> {
    let len = usize::try_from(len).ok().filter(|n| *n <= wire.len())?;
    let (taken, rest) = wire.split_at(len);
    *wire = rest;
    Some(taken)
}

/// A base-128 varint off the front of `wire` (at most 10 bytes); `None` if it does not end.
fn varint(wire: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in wire.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *wire = &wire[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    use crate::ledger::{RecordUsageBatchRequest, Usage};
    use crate::router::{ChatOptions, ChatRequest, Message as ChatMessage, SearchRequest};

    const CHAT: Option<(u64, u64)> = Some((4, 4));

    fn chat(messages: usize, stops: usize) -> Vec<u8> {
        ChatRequest {
            user_email: "a@b.c".into(),
            messages: vec![ChatMessage::default(); messages],
            options: Some(ChatOptions {
                max_tokens: Some(7),
                temperature: Some(0.5),
                stop_sequences: vec!["x".into(); stops],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_top_level_fields_and_the_nested_list() {
        // user_email, three messages, options: 5 fields.
        assert!(within_bounds(&chat(3, 9), 5, CHAT));
        assert!(!within_bounds(&chat(3, 9), 4, CHAT));
        assert!(within_bounds(&chat(3, MAX_NESTED_ENTRIES), 5, CHAT));
        assert!(!within_bounds(&chat(3, MAX_NESTED_ENTRIES + 1), 5, CHAT));
        // Only the chat request's list is counted inside a field.
        assert!(within_bounds(&chat(3, MAX_NESTED_ENTRIES + 1), 5, None));
        assert_eq!(nested_list::<ChatRequest>(), CHAT);
        assert_eq!(nested_list::<SearchRequest>(), None);
        let batch = |n| {
            RecordUsageBatchRequest {
                usages: vec![Usage::default(); n],
            }
            .encode_to_vec()
        };
        assert!(within_bounds(&batch(1_000), 1_000, None));
        assert!(!within_bounds(&batch(1_001), 1_000, None));
    }

    /// A group would make prost skip what the count cannot see: it is refused wherever it is.
    #[test]
    fn a_group_is_refused_wherever_it_stands() {
        let mut flood = vec![0x7b, 0x7c];
        flood.extend([0x0a, 0x00].repeat(LEDGER_MAX_FIELDS + 1));
        assert!(!within_bounds(&flood, LEDGER_MAX_FIELDS, None));
        assert!(!within_bounds(&[0x08, 0x01, 0x7b, 0x7c], 10, None));
        // Inside the chat options, before their stop sequences.
        let mut options = vec![0x7b, 0x7c];
        options.extend([0x22, 0x00].repeat(10));
        let mut wire = vec![0x22, options.len() as u8];
        wire.extend(options);
        assert!(!within_bounds(&wire, 10, CHAT));
        assert!(within_bounds(&wire, 10, None), "not looked into elsewhere");
    }

    /// A request that is not valid protobuf (here a name that is not UTF-8) is the caller's
    /// fault; an answer that is not is the server's.
    #[test]
    fn an_undecodable_request_is_invalid_and_an_undecodable_answer_internal() {
        let mut wire = ChatRequest {
            user_email: "a@b.c".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let at = wire.len() - 1;
        wire[at] = 0xff;
        let err = ChatRequest::decode(&wire[..]).expect_err("not UTF-8");
        // What tonic makes of a decode error.
        let status = Status::internal(err.to_string());
        let refused = undecodable::<ChatRequest>(status.clone());
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("does not decode"), "{refused:?}");
        assert_eq!(
            undecodable::<crate::router::ChatResponse>(status.clone()).code(),
            tonic::Code::Internal
        );
        assert_eq!(
            undecodable::<crate::ledger::Transfer>(status).code(),
            tonic::Code::Internal
        );
        // Another code is kept as it is.
        let other = Status::resource_exhausted("too big");
        assert_eq!(
            undecodable::<ChatRequest>(other).code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn a_malformed_message_passes_as_far_as_it_reads() {
        // A length past the end, a varint that never ends, a wire type that does not exist.
        assert!(within_bounds(&[0x0a, 0x00, 0x0a, 0x05, 0x01], 1, None));
        assert!(!within_bounds(
            &[0x0a, 0x00, 0x0a, 0x00, 0x0a, 0x05],
            1,
            None
        ));
        assert!(within_bounds(&[0x08, 0xff, 0xff], 0, None));
        assert!(within_bounds(&[0x08, 0x01, 0x0e, 0x08, 0x01], 1, None));
        // Fixed-width fields: 64-bit (tag 1) then 32-bit (tag 2).
        let fixed = [0x09, 1, 2, 3, 4, 5, 6, 7, 8, 0x15, 1, 2, 3, 4];
        assert!(within_bounds(&fixed, 2, None));
        assert!(!within_bounds(&fixed, 1, None));
        assert!(within_bounds(&fixed[..12], 1, None));
    }
}
