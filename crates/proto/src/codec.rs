//! The codec of every syft gRPC service and client: prost's, with one check before decoding.
//!
//! prost decodes a message whole before any handler sees it, and a list entry can cost far more
//! decoded than on the wire: an empty `Message` of a `ChatRequest` is 2 bytes on the wire and 72
//! in memory, an empty `Usage` of a `RecordUsageBatchRequest` 2 and about 240 (more while the
//! list's buffer grows). So a message well within the transport's size limit (a router's is its
//! prompt limit plus 1 MiB, 5 MiB by default; a ledger's tonic's 4 MiB) made a server allocate
//! hundreds of MiB before authentication or validation, one call at a time, from anyone who can
//! reach the port. A message with more than [`MAX_FIELDS`] top-level fields (a list's entries
//! are fields each) is refused with `INVALID_ARGUMENT` before it is decoded.
//!
//! Top level only: no message of these services has a list of more than a handful inside a
//! list, and the one list nested in a request (`ChatOptions.stop_sequences`) costs 12 times its
//! wire bytes at most, as an ordinary string field does.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The longest list any request of these services may carry (the router's `messages`; the
/// ledger's lists stop at 1,000 rows or 10,000 groups). Services set their own, lower bounds on
/// what they accept; this one only keeps decoding from costing more than those could.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Top-level fields a message may have: the longest list and room for every other field.
pub const MAX_FIELDS: usize = MAX_LIST_ENTRIES + 1_000;

/// prost's codec whose decoder refuses a message of more than [`MAX_FIELDS`] fields before
/// decoding it (named by `build.rs` as the codec of every generated service and client).
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(ProstDecoder::default())
    }
}

/// prost's decoder behind a count of the message's top-level fields.
#[derive(Debug, Clone)]
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf;
        // tonic hands a decoder one message in one buffer; were it ever split, the count would
        // see only the first part, which can only make it lower, never refuse a valid message.
        if count_fields(buf.chunk(), MAX_FIELDS + 1) > MAX_FIELDS {
            return Err(Status::invalid_argument(format!(
                "the message has more than {MAX_FIELDS} fields or list entries: refused before \
                 decoding"
            )));
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The top-level fields of an encoded message, counted up to `stop`. A malformed message stops
/// the count where it breaks: prost's decoding then says what is wrong with it.
fn count_fields(mut wire: &[u8], stop: usize) -> usize {
    let mut fields = 0;
    while !wire.is_empty() && fields < stop {
        let Some(key) = varint(&mut wire) else {
            break;
        };
        let skip = match key & 0b111 {
            0 => match varint(&mut wire) {
                Some(_) => 0,
                None => break,
            },
            1 => 8,
            2 => match varint(&mut wire) {
                Some(len) => len,
                None => break,
            },
            5 => 4,
            // Groups (proto2) are in none of these schemas: prost refuses or skips them.
            _ => break,
        };
        let Some(rest) = usize::try_from(skip).ok().and_then(|n| wire.get(n..)) else {
            break;
        };
        wire = rest;
        fields += 1;
    }
    fields
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
    use crate::router::{ChatOptions, ChatRequest, Message as ChatMessage};

    #[test]
    fn counts_every_kind_of_field_and_stops_at_its_bound() {
        let request = ChatRequest {
            user_email: "a@b.c".into(),
            messages: vec![ChatMessage::default(); 3],
            options: Some(ChatOptions {
                max_tokens: Some(7),
                temperature: Some(0.5),
                stop_sequences: vec!["x".into(); 9],
                ..Default::default()
            }),
            ..Default::default()
        };
        let wire = request.encode_to_vec();
        // user_email, three messages, options (its own fields are not counted).
        assert_eq!(count_fields(&wire, usize::MAX), 5);
        assert_eq!(count_fields(&wire, 2), 2);
        let batch = RecordUsageBatchRequest {
            usages: vec![Usage::default(); 1_000],
        };
        assert_eq!(count_fields(&batch.encode_to_vec(), usize::MAX), 1_000);
    }

    #[test]
    fn a_malformed_message_stops_the_count_where_it_breaks() {
        // A length past the end, a varint that never ends, a group.
        assert_eq!(count_fields(&[0x0a, 0x00, 0x0a, 0x05, 0x01], usize::MAX), 1);
        assert_eq!(count_fields(&[0x08, 0xff, 0xff], usize::MAX), 0);
        assert_eq!(count_fields(&[0x08, 0x01, 0x0b], usize::MAX), 1);
        // Fixed-width fields: 64-bit (tag 1) then 32-bit (tag 2).
        let fixed = [0x09, 1, 2, 3, 4, 5, 6, 7, 8, 0x15, 1, 2, 3, 4];
        assert_eq!(count_fields(&fixed, usize::MAX), 2);
        assert_eq!(count_fields(&fixed[..12], usize::MAX), 1);
    }
}
