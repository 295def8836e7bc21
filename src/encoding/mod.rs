//! Messages as bytes: every message (the transport's and any service's) is
//! a serde value in bincode's fixed-int little-endian layout, specified byte
//! by byte in section 5 of proto-spec.md.
//!
//! - [`encode`] / [`encode_into`]: bincode 2's encoder, into a buffer.
//! - [`decode`]: [`de`]'s decoder, which checks every length against the
//!   bytes present before allocating, for any `Deserialize` type; bytes
//!   left over after the message are an error.
//! - [`decode_shared`]: the same for a payload held as [`Bytes`]; a large
//!   [`Payload`] field inside the message becomes a slice of it, not a copy.
//! - [`Encoded`]: an encoding that may keep one large [`Payload`] as a
//!   shared slice instead of copying it, so that one publish of a megabyte
//!   is written to every subscriber from the same bytes.

pub mod de;
mod payload;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DecodeError, EncodeError};

pub use payload::{Payload, SHARE_MIN};

/// The bincode configuration of the wire: little-endian, fixed-width
/// integers (u32 enum tags, u64 lengths). Only encoding uses it; decoding is
/// [`de`]'s.
const WIRE_CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
> = bincode::config::standard()
    .with_little_endian()
    .with_fixed_int_encoding();

/// Decodes exactly one `T` from `payload`; bytes left over are an error.
/// Never allocates for a length the payload does not back.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let mut de = de::Deserializer::new(payload);
    let value = T::deserialize(&mut de)?;
    match de.remaining() {
        0 => Ok(value),
        extra => Err(DecodeError::TrailingBytes {
            used: payload.len() - extra,
            extra,
        }),
    }
}

/// [`decode`] for a payload held as [`Bytes`]: a [`Payload`] field of at
/// least [`SHARE_MIN`] bytes is a slice of `payload` rather than a copy.
pub fn decode_shared<T: DeserializeOwned>(payload: &Bytes) -> Result<T, DecodeError> {
    payload::with_source(payload, || decode(payload))
}

/// Appends the encoding of `value` to `dst`.
pub fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    bincode::serde::encode_into_writer(value, Appender(dst), WIRE_CONFIG)
        .map_err(|err| EncodeError(err.to_string()))
}

/// The encoding of `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, EncodeError> {
    let mut buf = BytesMut::new();
    encode_into(value, &mut buf)?;
    Ok(buf.freeze())
}

struct Appender<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for Appender<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// An encoding in up to three parts on the wire: `head`, then `shared` (the
/// bytes of one large [`Payload`], not copied), then `tail`. Concatenated,
/// they are exactly [`encode`] of the same value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Bytes up to and including the shared payload's length.
    pub head: BytesMut,
    /// The shared payload (empty if none was shared).
    pub shared: Bytes,
    /// Bytes after the shared payload.
    pub tail: BytesMut,
}

impl Encoded {
    /// Total length on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.shared.len() + self.tail.len()
    }

    /// Whether nothing was encoded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `value` to `out`, sharing the first [`Payload`] of at least
/// [`SHARE_MIN`] bytes instead of copying it (the rest is copied as usual).
/// `out.head` may already hold bytes (a frame header, say).
pub fn encode_sharing<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Encoded,
) -> Result<(), EncodeError> {
    payload::SHARING.with(|cell| *cell.borrow_mut() = Sharing::Armed);
    let result = bincode::serde::encode_into_writer(value, SharingWriter { out }, WIRE_CONFIG);
    payload::SHARING.with(|cell| *cell.borrow_mut() = Sharing::Off);
    result.map_err(|err| EncodeError(err.to_string()))
}

/// Where [`encode_sharing`] is: what a large [`Payload`] does when it is
/// serialized (see `payload.rs`).
#[derive(Debug, Default)]
pub(crate) enum Sharing {
    /// Not inside [`encode_sharing`]: payloads are copied.
    #[default]
    Off,
    /// Inside it, nothing shared yet.
    Armed,
    /// This payload is being serialized; its bytes go to `Encoded::shared`.
    Offered(Bytes),
    /// One payload was shared; later ones are copied.
    Used,
}

struct SharingWriter<'a> {
    out: &'a mut Encoded,
}

impl bincode::enc::write::Writer for SharingWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        // bincode writes a byte array's contents in one `write` of the very
        // slice it was given: recognise the offered payload by address.
        let taken = payload::SHARING.with(|cell| {
            let mut state = cell.borrow_mut();
            match &*state {
                Sharing::Offered(shared)
                    if shared.as_ptr() == bytes.as_ptr() && shared.len() == bytes.len() =>
                {
                    let shared = shared.clone();
                    *state = Sharing::Used;
                    Some(shared)
                }
                _ => None,
            }
        });
        match taken {
            Some(shared) => self.out.shared = shared,
            None if self.out.shared.is_empty() => self.out.head.put_slice(bytes),
            None => self.out.tail.put_slice(bytes),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Unit,
        Newtype(u16),
        Tuple(i8, char),
        Struct { a: Option<u64>, b: bool },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Everything {
        s: String,
        v: Vec<u8>,
        shapes: Vec<Shape>,
        map: BTreeMap<String, u64>,
        f: f64,
        i: i128,
        c: char,
        p: Payload,
    }

    fn sample() -> Everything {
        Everything {
            s: "ünïcødé ✓".into(),
            v: vec![1, 2, 3],
            shapes: vec![
                Shape::Unit,
                Shape::Newtype(7),
                Shape::Tuple(-3, '€'),
                Shape::Struct {
                    a: Some(u64::MAX),
                    b: true,
                },
                Shape::Struct { a: None, b: false },
            ],
            map: [("x".to_string(), 1), ("y".to_string(), 2)].into(),
            f: -1.5,
            i: i128::MIN,
            c: '𝄞',
            p: Payload::from(vec![9u8; 5]),
        }
    }

    #[test]
    fn decodes_exactly_what_bincode_encodes() {
        let value = sample();
        let bytes = encode(&value).unwrap();
        let reference = bincode::serde::encode_to_vec(&value, WIRE_CONFIG).unwrap();
        assert_eq!(&bytes[..], &reference[..]);
        assert_eq!(decode::<Everything>(&bytes).unwrap(), value);
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<Everything>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&5u32).unwrap().to_vec();
        bytes.push(0);
        assert_eq!(
            decode::<u32>(&bytes),
            Err(DecodeError::TrailingBytes { used: 4, extra: 1 })
        );
    }

    #[test]
    fn lengths_past_the_end_are_refused_before_anything_is_made() {
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        assert_eq!(
            decode::<String>(&bytes),
            Err(DecodeError::LengthPastEnd {
                len: 1 << 40,
                left: 3
            })
        );
        assert!(matches!(
            decode::<Vec<u64>>(&bytes),
            Err(DecodeError::LengthPastEnd { .. })
        ));
        assert!(matches!(
            decode::<BTreeMap<u8, u8>>(&bytes),
            Err(DecodeError::LengthPastEnd { .. })
        ));
    }

    #[test]
    fn nesting_is_bounded() {
        #[derive(Debug, Serialize, Deserialize)]
        enum Tree {
            Leaf,
            Node(Box<Tree>),
        }
        let mut bytes = vec![];
        for _ in 0..10_000 {
            bytes.extend_from_slice(&1u32.to_le_bytes());
        }
        bytes.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            decode::<Tree>(&bytes).err(),
            Some(DecodeError::TooDeep { max: de::MAX_DEPTH })
        );
    }

    #[test]
    fn invalid_bool_option_char_and_utf8_are_refused() {
        assert_eq!(
            decode::<bool>(&[2]),
            Err(DecodeError::InvalidBool { got: 2 })
        );
        assert_eq!(
            decode::<Option<u8>>(&[2, 0]),
            Err(DecodeError::InvalidOption { got: 2 })
        );
        assert_eq!(decode::<char>(&[0xff]), Err(DecodeError::InvalidChar));
        assert_eq!(
            decode::<char>(&[0xed, 0xa0, 0x80]),
            Err(DecodeError::InvalidChar)
        );
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(
            decode::<String>(&bytes),
            Err(DecodeError::InvalidUtf8 { valid_up_to: 0 })
        );
    }

    #[test]
    fn an_unknown_variant_is_an_error() {
        let err = decode::<Shape>(&9u32.to_le_bytes()).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid(_)), "{err:?}");
    }

    #[test]
    fn a_large_payload_is_shared_when_encoding_and_decoding() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Msg {
            topic: String,
            payload: Payload,
            after: u32,
        }
        let big = Bytes::from(vec![0xab; SHARE_MIN]);
        let msg = Msg {
            topic: "t".into(),
            payload: Payload::from(big.clone()),
            after: 7,
        };
        let mut out = Encoded::default();
        encode_sharing(&msg, &mut out).unwrap();
        assert_eq!(out.shared.as_ptr(), big.as_ptr(), "the payload was copied");
        let mut whole = out.head.to_vec();
        whole.extend_from_slice(&out.shared);
        whole.extend_from_slice(&out.tail);
        assert_eq!(whole, encode(&msg).unwrap().to_vec());

        let frame = Bytes::from(whole);
        let back: Msg = decode_shared(&frame).unwrap();
        assert_eq!(back, msg);
        let at = back.payload.as_ref().as_ptr() as usize - frame.as_ptr() as usize;
        assert_eq!(
            at,
            8 + 1 + 8,
            "the decoded payload is not a slice of the frame"
        );
        // Small payloads and plain decodes copy.
        let copied: Msg = decode(&frame).unwrap();
        assert_ne!(
            copied.payload.as_ref().as_ptr(),
            back.payload.as_ref().as_ptr()
        );
    }
}
