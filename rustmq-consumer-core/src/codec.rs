//! The RustMQ wire codec.
//!
//! A frame is what one QUIC stream carries in one direction: a type byte (the request kind, see
//! [`RequestKind`]) followed by the bincode 1.3 body of the message (fixed-width little-endian
//! integers, `u64` lengths, exactly `bincode::serialize`). An error response is `0xFF` followed
//! by the UTF-8 text `Error: <message>`; a response of zero bytes means the broker did not know
//! the request type.
//!
//! Limits: a request frame is at most [`MAX_REQUEST_FRAME`] bytes (the broker reads it with one
//! read into an 8 KiB buffer), a response frame at most [`MAX_RESPONSE_FRAME`] bytes. Decoding
//! never panics; a length prefix longer than what follows is refused, and the room it can make
//! decoding reserve is bounded (by bincode's own cautious cap, and for a Fetch answer's lists
//! by what the frame could hold).
//!
//! Zero copy: a Fetch answer's keys, values and header values are [`Bytes`] slices of the
//! frame ([`decode_response_bytes`]), so decoding allocates per answer (its record list), not
//! per record. A record kept alive keeps its whole frame alive; copy it out
//! (`Bytes::copy_from_slice`) to keep it apart from the answer for long.

use std::fmt;
use std::marker::PhantomData;

use bincode::Options;
use bytes::Bytes;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::TransportError;
use crate::protocol::{
    FetchResponse, Header, Record, Request, RequestKind, Response, MAX_REQUEST_FRAME,
};

/// Largest response frame accepted from the broker, type byte included (16 MiB).
pub const MAX_RESPONSE_FRAME: usize = 16 * 1024 * 1024;

/// The type byte of an error response.
pub const ERROR_TYPE_BYTE: u8 = 0xFF;

/// The prefix the broker puts before the text of an error response.
const ERROR_PREFIX: &str = "Error: ";

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The frame has no bytes at all.
    #[error("empty frame")]
    Empty,
    /// The type byte names no request.
    #[error("unknown request type {0:#04x}")]
    UnknownType(u8),
    /// The body is truncated or is not a valid encoding of its message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The request frame exceeds the broker's frame limit.
    #[error("request of {size} bytes exceeds the {limit}-byte frame limit")]
    RequestTooLarge {
        /// Size of the frame, type byte included.
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The serializer refused the message.
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl From<CodecError> for TransportError {
    fn from(error: CodecError) -> Self {
        match error {
            CodecError::RequestTooLarge { size, .. } => TransportError::RequestTooLarge(size),
            other => TransportError::Malformed(other.to_string()),
        }
    }
}

/// Runs `$e` with `$body` bound to the message inside a [`Request`].
macro_rules! with_request_body {
    ($request:expr, $body:ident => $e:expr) => {
        match $request {
            Request::Produce($body) => $e,
            Request::Fetch($body) => $e,
            Request::Metadata($body) => $e,
            Request::FindCoordinator($body) => $e,
            Request::JoinGroup($body) => $e,
            Request::ConsumerHeartbeat($body) => $e,
            Request::CommitOffset($body) => $e,
            Request::FetchOffset($body) => $e,
            Request::LeaveGroup($body) => $e,
        }
    };
}

/// Runs `$e` with `$body` bound to the message inside a [`Response`].
macro_rules! with_response_body {
    ($response:expr, $body:ident => $e:expr) => {
        match $response {
            Response::Produce($body) => $e,
            Response::Fetch($body) => $e,
            Response::Metadata($body) => $e,
            Response::FindCoordinator($body) => $e,
            Response::JoinGroup($body) => $e,
            Response::ConsumerHeartbeat($body) => $e,
            Response::CommitOffset($body) => $e,
            Response::FetchOffset($body) => $e,
            Response::LeaveGroup($body) => $e,
        }
    };
}

/// Size of the frame for `body`: the type byte plus the bincode body.
fn frame_size<T: Serialize>(body: &T) -> Result<usize, CodecError> {
    let body_len = bincode::serialized_size(body).map_err(|e| CodecError::Encode(e.to_string()))?;
    usize::try_from(body_len)
        .ok()
        .and_then(|len| len.checked_add(1))
        .ok_or_else(|| CodecError::Encode("frame size overflows usize".to_owned()))
}

/// Writes the type byte and the bincode body into a buffer of exactly `size` bytes.
fn write_frame<T: Serialize>(type_byte: u8, body: &T, size: usize) -> Result<Bytes, CodecError> {
    let mut frame = Vec::with_capacity(size);
    frame.push(type_byte);
    bincode::serialize_into(&mut frame, body).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(Bytes::from(frame))
}

/// Decodes a bincode body with the broker's options, never reading (or allocating for) more
/// than `body.len()` bytes. Trailing bytes are ignored, as the broker ignores them.
fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, bincode::Error> {
    decode_borrowed(body)
}

/// The broker's bincode options, never reading (or allocating for) more than `len` bytes.
fn options(len: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(len as u64)
}

/// [`decode_body`] for a message that borrows its byte strings from `body`.
fn decode_borrowed<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, bincode::Error> {
    options(body.len()).deserialize(body)
}

/// Decodes a Fetch answer's body, a part of `frame`, into records whose byte strings are
/// slices of `frame`: straight into the answer's record list, with no borrowed copy of it
/// first.
fn decode_fetch(frame: &Bytes, body: &[u8]) -> Result<FetchResponse, bincode::Error> {
    options(body.len()).deserialize_seed(InFrame::<FetchResponse>::new(frame), body)
}

/// The smallest encoding of an element of the lists decoded in a frame: a header's two
/// lengths (a record takes at least 25 bytes). Caps the room a list's count may reserve.
const MIN_ELEMENT_LEN: usize = 16;

/// A seed that deserializes a `T` whose byte strings are borrowed from the decoded body and
/// kept as slices of `frame`, which holds the body.
struct InFrame<'f, T> {
    frame: &'f Bytes,
    target: PhantomData<fn() -> T>,
}

impl<'f, T> InFrame<'f, T> {
    fn new(frame: &'f Bytes) -> Self {
        Self {
            frame,
            target: PhantomData,
        }
    }

    /// A slice of the frame; `bytes` lies inside it (bincode borrows from the body).
    fn slice(&self, bytes: &[u8]) -> Bytes {
        self.frame.slice_ref(bytes)
    }
}

/// The next element of `seq` or, at its end, an `invalid_length` error naming `expected`.
fn next<'de, A, S>(seq: &mut A, seed: S, index: usize, expected: &str) -> Result<S::Value, A::Error>
where
    A: SeqAccess<'de>,
    S: DeserializeSeed<'de>,
{
    seq.next_element_seed(seed)?
        .ok_or_else(|| de::Error::invalid_length(index, &expected))
}

/// Deserializes a plain `T` at the seeded position.
fn plain<'de, T: Deserialize<'de>>() -> PhantomData<T> {
    PhantomData
}

impl<'de> DeserializeSeed<'de> for InFrame<'_, FetchResponse> {
    type Value = FetchResponse;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<FetchResponse, D::Error> {
        const FIELDS: &[&str] = &["records", "high_watermark", "error_code", "error_message"];
        d.deserialize_struct("FetchResponse", FIELDS, self)
    }
}

impl<'de> Visitor<'de> for InFrame<'_, FetchResponse> {
    type Value = FetchResponse;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a fetch response")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FetchResponse, A::Error> {
        const WHAT: &str = "a fetch response of 4 fields";
        Ok(FetchResponse {
            records: next(&mut seq, InFrame::<Vec<Record>>::new(self.frame), 0, WHAT)?,
            high_watermark: next(&mut seq, plain(), 1, WHAT)?,
            error_code: next(&mut seq, plain(), 2, WHAT)?,
            error_message: next(&mut seq, plain(), 3, WHAT)?,
        })
    }
}

impl<'de, 'f, T> DeserializeSeed<'de> for InFrame<'f, Vec<T>>
where
    InFrame<'f, T>: DeserializeSeed<'de, Value = T>,
{
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, 'f, T> Visitor<'de> for InFrame<'f, Vec<T>>
where
    InFrame<'f, T>: DeserializeSeed<'de, Value = T>,
{
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // The count is the broker's word: room for no more than the frame can hold.
        let most = self.frame.len() / MIN_ELEMENT_LEN;
        let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(most));
        while let Some(item) = seq.next_element_seed(InFrame::<T>::new(self.frame))? {
            list.push(item);
        }
        Ok(list)
    }
}

impl<'de> DeserializeSeed<'de> for InFrame<'_, Record> {
    type Value = Record;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Record, D::Error> {
        const FIELDS: &[&str] = &["key", "value", "headers", "timestamp"];
        d.deserialize_struct("Record", FIELDS, self)
    }
}

impl<'de> Visitor<'de> for InFrame<'_, Record> {
    type Value = Record;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a record")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Record, A::Error> {
        const WHAT: &str = "a record of 4 fields";
        let key: Option<&[u8]> = next(&mut seq, plain(), 0, WHAT)?;
        let value: &[u8] = next(&mut seq, plain(), 1, WHAT)?;
        Ok(Record {
            key: key.map(|key| self.slice(key)),
            value: self.slice(value),
            headers: next(&mut seq, InFrame::<Vec<Header>>::new(self.frame), 2, WHAT)?,
            timestamp: next(&mut seq, plain(), 3, WHAT)?,
        })
    }
}

impl<'de> DeserializeSeed<'de> for InFrame<'_, Header> {
    type Value = Header;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Header, D::Error> {
        d.deserialize_struct("Header", &["key", "value"], self)
    }
}

impl<'de> Visitor<'de> for InFrame<'_, Header> {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a header")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Header, A::Error> {
        const WHAT: &str = "a header of 2 fields";
        let key = next(&mut seq, plain(), 0, WHAT)?;
        let value: &[u8] = next(&mut seq, plain(), 1, WHAT)?;
        Ok(Header {
            key,
            value: self.slice(value),
        })
    }
}

/// Encodes a request frame: its type byte, then its bincode body.
///
/// Refuses a frame over [`MAX_REQUEST_FRAME`] with [`CodecError::RequestTooLarge`], before
/// allocating it.
pub fn encode_request(request: &Request) -> Result<Bytes, CodecError> {
    let type_byte = request.kind() as u8;
    with_request_body!(request, body => {
        let size = frame_size(body)?;
        if size > MAX_REQUEST_FRAME {
            return Err(CodecError::RequestTooLarge {
                size,
                limit: MAX_REQUEST_FRAME,
            });
        }
        write_frame(type_byte, body, size)
    })
}

/// The exact size of `request`'s frame, type byte included, as [`encode_request`] would write
/// it (whether or not it fits in [`MAX_REQUEST_FRAME`]).
///
/// Returns `usize::MAX` (which never fits) if the size cannot be computed; for the protocol's
/// types bincode always computes it.
pub fn request_frame_len(request: &Request) -> usize {
    with_request_body!(request, body => frame_size(body).unwrap_or(usize::MAX))
}

/// Decodes the response frame to a request of kind `kind`.
///
/// An empty frame is [`TransportError::EmptyResponse`], an error frame is
/// [`TransportError::Broker`] with the broker's text (without its `Error: ` prefix), a frame
/// over [`MAX_RESPONSE_FRAME`] is [`TransportError::ResponseTooLarge`], and a wrong type byte or
/// an undecodable body is [`TransportError::Malformed`].
///
/// A Fetch answer's records are copied out of `frame` once, together; with the frame as
/// [`Bytes`], [`decode_response_bytes`] copies nothing.
pub fn decode_response(kind: RequestKind, frame: &[u8]) -> Result<Response, TransportError> {
    if kind == RequestKind::Fetch && frame.len() <= MAX_RESPONSE_FRAME {
        return decode_response_bytes(kind, Bytes::copy_from_slice(frame));
    }
    decode_frame(kind, frame, None)
}

/// [`decode_response`] of a frame held as [`Bytes`]: a Fetch answer's keys, values and header
/// values are slices of `frame` (no copy, no allocation per record). They keep `frame` alive
/// as long as any of them lives.
pub fn decode_response_bytes(kind: RequestKind, frame: Bytes) -> Result<Response, TransportError> {
    decode_frame(kind, &frame, Some(&frame))
}

/// Decodes `frame`; `shared` is the same frame as [`Bytes`], for the zero-copy Fetch decoding.
fn decode_frame(
    kind: RequestKind,
    frame: &[u8],
    shared: Option<&Bytes>,
) -> Result<Response, TransportError> {
    if frame.len() > MAX_RESPONSE_FRAME {
        return Err(TransportError::ResponseTooLarge(frame.len()));
    }
    let Some((&type_byte, body)) = frame.split_first() else {
        return Err(TransportError::EmptyResponse);
    };
    if type_byte == ERROR_TYPE_BYTE {
        let text = String::from_utf8_lossy(body);
        let text = text.strip_prefix(ERROR_PREFIX).unwrap_or(&text);
        return Err(TransportError::Broker(text.to_owned()));
    }
    if type_byte != kind as u8 {
        return Err(TransportError::Malformed(format!(
            "type byte {type_byte:#04x} in a response to {kind:?} ({:#04x})",
            kind as u8
        )));
    }
    let decoded = match (kind, shared) {
        (RequestKind::Fetch, Some(shared)) => decode_fetch(shared, body).map(Response::Fetch),
        _ => decode_response_body(kind, body),
    };
    decoded.map_err(|e| TransportError::Malformed(e.to_string()))
}

fn decode_response_body(kind: RequestKind, body: &[u8]) -> Result<Response, bincode::Error> {
    Ok(match kind {
        RequestKind::Produce => Response::Produce(decode_body(body)?),
        RequestKind::Fetch => Response::Fetch(decode_body(body)?),
        RequestKind::Metadata => Response::Metadata(decode_body(body)?),
        RequestKind::FindCoordinator => Response::FindCoordinator(decode_body(body)?),
        RequestKind::JoinGroup => Response::JoinGroup(decode_body(body)?),
        RequestKind::ConsumerHeartbeat => Response::ConsumerHeartbeat(decode_body(body)?),
        RequestKind::CommitOffset => Response::CommitOffset(decode_body(body)?),
        RequestKind::FetchOffset => Response::FetchOffset(decode_body(body)?),
        RequestKind::LeaveGroup => Response::LeaveGroup(decode_body(body)?),
    })
}

/// Decodes a request frame (the broker's side).
///
/// A frame over [`MAX_REQUEST_FRAME`] is refused with [`CodecError::RequestTooLarge`]; trailing
/// bytes after a valid body are ignored, as the broker ignores them.
pub fn decode_request(frame: &[u8]) -> Result<Request, CodecError> {
    let Some((&type_byte, body)) = frame.split_first() else {
        return Err(CodecError::Empty);
    };
    if frame.len() > MAX_REQUEST_FRAME {
        return Err(CodecError::RequestTooLarge {
            size: frame.len(),
            limit: MAX_REQUEST_FRAME,
        });
    }
    let kind = RequestKind::from_byte(type_byte).ok_or(CodecError::UnknownType(type_byte))?;
    decode_request_body(kind, body).map_err(|e| CodecError::Malformed(e.to_string()))
}

fn decode_request_body(kind: RequestKind, body: &[u8]) -> Result<Request, bincode::Error> {
    Ok(match kind {
        RequestKind::Produce => Request::Produce(decode_body(body)?),
        RequestKind::Fetch => Request::Fetch(decode_body(body)?),
        RequestKind::Metadata => Request::Metadata(decode_body(body)?),
        RequestKind::FindCoordinator => Request::FindCoordinator(decode_body(body)?),
        RequestKind::JoinGroup => Request::JoinGroup(decode_body(body)?),
        RequestKind::ConsumerHeartbeat => Request::ConsumerHeartbeat(decode_body(body)?),
        RequestKind::CommitOffset => Request::CommitOffset(decode_body(body)?),
        RequestKind::FetchOffset => Request::FetchOffset(decode_body(body)?),
        RequestKind::LeaveGroup => Request::LeaveGroup(decode_body(body)?),
    })
}

/// Encodes a success response frame (the broker's side): the request's type byte, then the
/// bincode body.
///
/// No size cap is applied here; a broker keeps its responses under [`MAX_RESPONSE_FRAME`]. If
/// the serializer refused the message, the result is the error frame the broker would send.
pub fn encode_response(response: &Response) -> Bytes {
    let type_byte = response.kind() as u8;
    let encoded = with_response_body!(response, body => {
        frame_size(body).and_then(|size| write_frame(type_byte, body, size))
    });
    encoded.unwrap_or_else(|e| encode_error_frame(&format!("Serialization error: {e}")))
}

/// Encodes an error response frame (the broker's side): `0xFF`, then `Error: <message>`.
pub fn encode_error_frame(message: &str) -> Bytes {
    let mut frame = Vec::with_capacity(1 + ERROR_PREFIX.len() + message.len());
    frame.push(ERROR_TYPE_BYTE);
    frame.extend_from_slice(ERROR_PREFIX.as_bytes());
    frame.extend_from_slice(message.as_bytes());
    Bytes::from(frame)
}
