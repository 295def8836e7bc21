//! Frames after the handshake: a `u32` little-endian length prefix, then that
//! many payload bytes (section 3 of proto-spec.md).
//!
//! [`FrameCodec`] is a tokio-util codec built like `LengthDelimitedCodec`: the
//! header is parsed once and the length kept across partial reads, and the
//! length is compared with the limit **before** anything is reserved, so a
//! peer cannot make it allocate by announcing a large frame. The encoder
//! enforces the same limit. [`peek_frame`] is the same check for a reader
//! that keeps its own buffer and consumes a frame only once it is whole (the
//! daemon's sessions). What a payload holds is [`crate::transport`]'s and
//! [`crate::encoding`]'s business.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::FrameError;
use crate::limits::{DEFAULT_MAX_FRAME_LEN, LENGTH_PREFIX_LEN, MAX_FRAME_LEN};

/// What the start of a buffer holds, as [`peek_frame`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peeked {
    /// Fewer than the prefix's 4 bytes.
    NoPrefix,
    /// A frame of `len` payload bytes (within the limit), not all of them
    /// buffered yet.
    Partial(usize),
    /// A whole frame: its payload is `buf[4..4 + len]`.
    Whole(usize),
}

/// The frame at the start of `buf`, nothing consumed: the length prefix is
/// compared with `max_frame_len` before the caller can make room for it.
#[inline]
pub fn peek_frame(buf: &[u8], max_frame_len: usize) -> Result<Peeked, FrameError> {
    let Some(&[a, b, c, d]) = buf.get(..LENGTH_PREFIX_LEN) else {
        return Ok(Peeked::NoPrefix);
    };
    let len = u32::from_le_bytes([a, b, c, d]) as usize;
    if len > max_frame_len {
        return Err(FrameError::FrameTooLarge {
            len: len as u64,
            max: max_frame_len,
        });
    }
    if buf.len() - LENGTH_PREFIX_LEN < len {
        return Ok(Peeked::Partial(len));
    }
    Ok(Peeked::Whole(len))
}

/// Where the decoder is within the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeState {
    /// Waiting for the 4-byte length prefix.
    Head,
    /// The prefix announced this many payload bytes (already checked against
    /// the limit); waiting for them.
    Data(usize),
}

/// Length-prefixed frames with a size limit; items are raw payloads.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: usize,
    state: DecodeState,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl FrameCodec {
    /// A codec accepting payloads up to `max_frame_len` bytes, capped at the
    /// protocol ceiling [`MAX_FRAME_LEN`].
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len: max_frame_len.min(MAX_FRAME_LEN),
            state: DecodeState::Head,
        }
    }

    /// Changes the limit for the frames after the current one (a client
    /// learns it from `Welcome`, after reading with the protocol ceiling).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len.min(MAX_FRAME_LEN);
    }

    /// The limit in force.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Whether the decoder is between frames (no prefix consumed for a frame
    /// still incomplete).
    pub fn at_frame_start(&self) -> bool {
        self.state == DecodeState::Head
    }

    fn decode_head(&mut self, src: &mut BytesMut) -> Result<Option<usize>, FrameError> {
        let len = match peek_frame(src, self.max_frame_len)? {
            Peeked::NoPrefix => return Ok(None),
            Peeked::Partial(len) | Peeked::Whole(len) => len,
        };
        src.advance(LENGTH_PREFIX_LEN);
        // Only now, with the length known to be within the limit, make room.
        src.reserve(len.saturating_sub(src.len()));
        Ok(Some(len))
    }

    /// The decoder without the copy: when a whole frame is buffered, returns
    /// its payload length `len`; the payload is then `src[..len]` (the prefix
    /// is already consumed) and the caller must `src.advance(len)` (or
    /// `split_to(len)`) before the next call. The length is checked against
    /// the limit before any room is made, exactly as in [`Decoder::decode`],
    /// which is built on this.
    pub fn next_payload_len(&mut self, src: &mut BytesMut) -> Result<Option<usize>, FrameError> {
        let len = match self.state {
            DecodeState::Head => match self.decode_head(src)? {
                Some(len) => {
                    self.state = DecodeState::Data(len);
                    len
                }
                None => return Ok(None),
            },
            DecodeState::Data(len) => len,
        };
        if src.len() < len {
            return Ok(None);
        }
        self.state = DecodeState::Head;
        Ok(Some(len))
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        Ok(self.next_payload_len(src)?.map(|len| src.split_to(len)))
    }
}

/// Raw payloads: the prefix is added and the limit enforced.
impl Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        if payload.len() > self.max_frame_len {
            return Err(FrameError::FrameTooLarge {
                len: payload.len() as u64,
                max: self.max_frame_len,
            });
        }
        dst.reserve(LENGTH_PREFIX_LEN + payload.len());
        dst.put_u32_le(payload.len() as u32);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32_le(payload.len() as u32);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn decodes_a_frame_split_at_every_byte() {
        let whole = frame(b"hello");
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.put_u8(*byte);
            let out = codec.decode(&mut buf).unwrap();
            if i + 1 < whole.len() {
                assert!(out.is_none(), "frame returned early at byte {i}");
            } else {
                assert_eq!(&out.unwrap()[..], b"hello");
            }
        }
        assert!(codec.at_frame_start());
    }

    #[test]
    fn read_max_frame_len_rejects_before_reserving() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::with_capacity(4);
        buf.put_u32_le(1025);
        let cap_before = buf.capacity();
        match codec.decode(&mut buf) {
            Err(FrameError::FrameTooLarge {
                len: 1025,
                max: 1024,
            }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(
            buf.capacity(),
            cap_before,
            "decoder reserved room for a rejected frame"
        );
    }

    #[test]
    fn read_four_gib_prefix_is_rejected() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::FrameTooLarge {
                len: 0xffff_ffff,
                ..
            })
        ));
    }

    #[test]
    fn frame_exactly_at_the_limit_is_accepted() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = frame(&[7u8; 1024]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 1024);
    }

    #[test]
    fn encode_overflow_leaves_the_buffer_untouched() {
        let mut dst = BytesMut::from(&b"already here"[..]);
        let mut codec = FrameCodec::new(1024);
        assert!(matches!(
            codec.encode(Bytes::from(vec![0u8; 1025]), &mut dst),
            Err(FrameError::FrameTooLarge {
                len: 1025,
                max: 1024
            })
        ));
        assert_eq!(&dst[..], b"already here");
    }

    #[test]
    fn a_partial_frame_is_not_at_the_frame_start() {
        let mut codec = FrameCodec::default();
        let mut buf = frame(b"hello");
        buf.truncate(6);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(!codec.at_frame_start());
    }
}
