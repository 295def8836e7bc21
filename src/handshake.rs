//! The pre-auth parser: the only code that unauthenticated bytes reach.
//!
//! It is sans-IO, in the manner of quinn-proto and rustls: bytes in, a verdict
//! out; no socket, no clock, no tokio. The caller reads from the peer at most
//! [`HandshakeParser::wanted`] bytes at a time, so nothing past the handshake
//! frame is ever consumed from the socket (a request sent in the same write
//! stays there for the post-auth codec), and the buffer never exceeds the
//! 44-byte handshake frame.
//!
//! Protocol, in order:
//! 1. The first 4 bytes are the length prefix (`u32` little-endian). Anything
//!    but 40 is rejected at once ([`Rejection::WrongLength`]); no payload
//!    byte is read.
//! 2. The 40 payload bytes: magic `KYHL`, protocol version (`u32` LE), the 32
//!    raw token bytes.
//! 3. [`HandshakeParser::verify`] checks magic, then version, then the token
//!    in constant time, and zeroizes every byte it holds, whatever the outcome.
//!
//! One attempt per connection: a parser that has given a verdict accepts no
//! more bytes.

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::limits::{HANDSHAKE_FRAME_LEN, HANDSHAKE_PAYLOAD_LEN, LENGTH_PREFIX_LEN, TOKEN_LEN};
use crate::message::{ErrorCode, PROTOCOL_VERSION};
use crate::token::SessionToken;

/// The four magic bytes that open the handshake payload.
pub const MAGIC: [u8; 4] = *b"KYHL";

/// Protocol versions this build accepts in a handshake.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

const MAGIC_AT: usize = LENGTH_PREFIX_LEN;
const VERSION_AT: usize = MAGIC_AT + 4;
const TOKEN_AT: usize = VERSION_AT + 4;

/// Why a handshake was refused. Carries no peer bytes beyond fixed-size
/// numbers, so it is safe to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The first frame's length prefix is not the handshake's.
    #[error("first frame announces {got} bytes; a handshake is exactly {expected}")]
    WrongLength {
        /// The length the peer announced.
        got: u32,
        /// [`HANDSHAKE_PAYLOAD_LEN`].
        expected: u32,
    },
    /// The payload does not start with [`MAGIC`].
    #[error("handshake magic is wrong")]
    BadMagic,
    /// The protocol version is not one this build speaks.
    #[error("protocol version {got} is not supported (supported: {supported:?})")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u32,
        /// [`SUPPORTED_VERSIONS`].
        supported: &'static [u32],
    },
    /// The token is not the session token.
    #[error("token does not match the session token")]
    BadToken,
}

impl Rejection {
    /// The error code sent to the peer for this rejection.
    pub fn code(self) -> ErrorCode {
        match self {
            Rejection::WrongLength { .. } => ErrorCode::HandshakeExpected,
            Rejection::BadMagic => ErrorCode::BadMagic,
            Rejection::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Rejection::BadToken => ErrorCode::BadToken,
        }
    }
}

/// What the parser did with the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed; `consumed` bytes of the input were taken.
    NeedMore {
        /// Bytes taken from the input.
        consumed: usize,
    },
    /// The whole handshake frame is buffered; call [`HandshakeParser::verify`].
    /// Input bytes after `consumed` belong to the post-auth stream.
    Complete {
        /// Bytes taken from the input.
        consumed: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Complete,
    Done,
}

/// Sans-IO handshake state machine. Holds at most one handshake frame;
/// zeroizes it after verification and on drop.
pub struct HandshakeParser {
    buf: [u8; HANDSHAKE_FRAME_LEN],
    filled: usize,
    state: State,
}

impl Default for HandshakeParser {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HandshakeParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeParser")
            .field("filled", &self.filled)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl HandshakeParser {
    /// A parser waiting for the first byte.
    pub fn new() -> Self {
        Self {
            buf: [0; HANDSHAKE_FRAME_LEN],
            filled: 0,
            state: State::Reading,
        }
    }

    /// The most bytes the caller should read from the peer now: what is left
    /// of the handshake frame (0 once it is complete or a verdict was given).
    pub fn wanted(&self) -> usize {
        match self.state {
            State::Reading => HANDSHAKE_FRAME_LEN - self.filled,
            State::Complete | State::Done => 0,
        }
    }

    /// Bytes buffered so far (never more than [`HANDSHAKE_FRAME_LEN`]).
    pub fn buffered_len(&self) -> usize {
        self.filled
    }

    /// The internal buffer, for tests and fuzzers that check it is zeroed
    /// after verification.
    #[doc(hidden)]
    pub fn raw_buffer(&self) -> &[u8; HANDSHAKE_FRAME_LEN] {
        &self.buf
    }

    /// Takes bytes from `input`, at most up to the end of the handshake
    /// frame. Rejects a wrong length prefix as soon as its 4 bytes are in.
    pub fn feed(&mut self, input: &[u8]) -> Result<Progress, Rejection> {
        if self.state != State::Reading {
            return Ok(if self.state == State::Complete {
                Progress::Complete { consumed: 0 }
            } else {
                Progress::NeedMore { consumed: 0 }
            });
        }
        let mut consumed = 0;
        // Length prefix first: never take a payload byte before it is checked.
        if self.filled < LENGTH_PREFIX_LEN {
            let take = input.len().min(LENGTH_PREFIX_LEN - self.filled);
            self.buf[self.filled..self.filled + take].copy_from_slice(&input[..take]);
            self.filled += take;
            consumed += take;
            if self.filled < LENGTH_PREFIX_LEN {
                return Ok(Progress::NeedMore { consumed });
            }
            let got = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            if got as usize != HANDSHAKE_PAYLOAD_LEN {
                self.finish();
                return Err(Rejection::WrongLength {
                    got,
                    expected: HANDSHAKE_PAYLOAD_LEN as u32,
                });
            }
        }
        let rest = &input[consumed..];
        let take = rest.len().min(HANDSHAKE_FRAME_LEN - self.filled);
        self.buf[self.filled..self.filled + take].copy_from_slice(&rest[..take]);
        self.filled += take;
        consumed += take;
        if self.filled == HANDSHAKE_FRAME_LEN {
            self.state = State::Complete;
            Ok(Progress::Complete { consumed })
        } else {
            Ok(Progress::NeedMore { consumed })
        }
    }

    /// Whether the whole frame is buffered and waiting for [`Self::verify`].
    pub fn is_complete(&self) -> bool {
        self.state == State::Complete
    }

    /// Checks magic, version and token (constant time), then zeroizes the
    /// buffer, whatever the outcome. Only a complete handshake can pass;
    /// calling it on an incomplete one is a `WrongLength` with what arrived.
    pub fn verify(&mut self, token: &SessionToken) -> Result<(), Rejection> {
        let verdict = if self.state != State::Complete {
            Err(Rejection::WrongLength {
                got: self.filled.saturating_sub(LENGTH_PREFIX_LEN) as u32,
                expected: HANDSHAKE_PAYLOAD_LEN as u32,
            })
        } else {
            let version = u32::from_le_bytes([
                self.buf[VERSION_AT],
                self.buf[VERSION_AT + 1],
                self.buf[VERSION_AT + 2],
                self.buf[VERSION_AT + 3],
            ]);
            // Token compared in every case, so timing says nothing about it.
            let token_ok: bool = token.as_bytes()[..]
                .ct_eq(&self.buf[TOKEN_AT..TOKEN_AT + TOKEN_LEN])
                .into();
            if self.buf[MAGIC_AT..MAGIC_AT + 4] != MAGIC {
                Err(Rejection::BadMagic)
            } else if !SUPPORTED_VERSIONS.contains(&version) {
                Err(Rejection::UnsupportedVersion {
                    got: version,
                    supported: SUPPORTED_VERSIONS,
                })
            } else if !token_ok {
                Err(Rejection::BadToken)
            } else {
                Ok(())
            }
        };
        self.finish();
        verdict
    }

    fn finish(&mut self) {
        self.buf.zeroize();
        self.state = State::Done;
    }
}

impl Drop for HandshakeParser {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

/// The client's handshake frame for `token` (prefix included). The returned
/// buffer zeroizes itself on drop; send it and let it go.
pub fn encode_handshake(token: &SessionToken) -> Zeroizing<[u8; HANDSHAKE_FRAME_LEN]> {
    encode_handshake_with(PROTOCOL_VERSION, token)
}

/// Like [`encode_handshake`] with an explicit version (tests of version refusal).
pub fn encode_handshake_with(
    version: u32,
    token: &SessionToken,
) -> Zeroizing<[u8; HANDSHAKE_FRAME_LEN]> {
    let mut frame = Zeroizing::new([0u8; HANDSHAKE_FRAME_LEN]);
    frame[..LENGTH_PREFIX_LEN].copy_from_slice(&(HANDSHAKE_PAYLOAD_LEN as u32).to_le_bytes());
    frame[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(&MAGIC);
    frame[VERSION_AT..VERSION_AT + 4].copy_from_slice(&version.to_le_bytes());
    frame[TOKEN_AT..].copy_from_slice(token.as_bytes());
    frame
}

/// Runs `input` through a fresh parser as one peer would deliver it, split at
/// `splits`, and verifies against `token`. Returns the verdict and the bytes
/// left after the handshake frame. Used by tests and the fuzzers.
pub fn run_preauth(
    input: &[u8],
    splits: &[usize],
    token: &SessionToken,
) -> (Option<Result<(), Rejection>>, usize, HandshakeParser) {
    let mut parser = HandshakeParser::new();
    let mut offset = 0;
    let mut cuts: Vec<usize> = splits
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < input.len())
        .collect();
    cuts.sort_unstable();
    cuts.push(input.len());
    for cut in cuts {
        if cut <= offset {
            continue;
        }
        // As the daemon does: offer at most `wanted()` bytes of the chunk.
        while offset < cut {
            let want = parser.wanted();
            if want == 0 {
                break;
            }
            let end = cut.min(offset + want);
            let before = parser.buffered_len();
            match parser.feed(&input[offset..end]) {
                Ok(Progress::NeedMore { consumed }) => offset += consumed,
                Ok(Progress::Complete { consumed }) => {
                    offset += consumed;
                    let verdict = parser.verify(token);
                    return (Some(verdict), offset, parser);
                }
                Err(rejection) => {
                    offset += parser.buffered_len() - before;
                    return (Some(Err(rejection)), offset, parser);
                }
            }
        }
    }
    (None, offset, parser)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SessionToken {
        let mut b = [0u8; TOKEN_LEN];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8 * 7 + 1;
        }
        SessionToken::from_bytes(b)
    }

    fn verdict(input: &[u8]) -> Option<Result<(), Rejection>> {
        run_preauth(input, &[], &token()).0
    }

    #[test]
    fn exact_token_authenticates() {
        assert_eq!(verdict(&encode_handshake(&token())[..]), Some(Ok(())));
    }

    #[test]
    fn one_bit_flipped_at_each_token_position_is_bad_token() {
        for pos in 0..TOKEN_LEN {
            for bit in [0x01u8, 0x80] {
                let mut frame = *encode_handshake(&token());
                frame[TOKEN_AT + pos] ^= bit;
                assert_eq!(
                    verdict(&frame),
                    Some(Err(Rejection::BadToken)),
                    "position {pos} bit {bit:#x}"
                );
            }
        }
    }

    #[test]
    fn wrong_length_prefixes_are_rejected_before_any_payload_byte() {
        for got in [39u32, 41, 0, 1, u32::MAX, 12] {
            let mut frame = got.to_le_bytes().to_vec();
            frame.extend_from_slice(&encode_handshake(&token())[4..]);
            let (v, consumed, parser) = run_preauth(&frame, &[], &token());
            assert_eq!(
                v,
                Some(Err(Rejection::WrongLength { got, expected: 40 })),
                "length {got}"
            );
            assert_eq!(consumed, 4, "payload bytes were taken for length {got}");
            assert_eq!(parser.wanted(), 0);
            assert_eq!(parser.raw_buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
        }
    }

    #[test]
    fn wrong_magic() {
        let mut frame = *encode_handshake(&token());
        frame[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(b"KYHM");
        assert_eq!(verdict(&frame), Some(Err(Rejection::BadMagic)));
    }

    #[test]
    fn every_unsupported_version_is_refused_with_what_was_sent() {
        for version in [0u32, 2, 3, 0x0100_0000, u32::MAX] {
            let frame = encode_handshake_with(version, &token());
            assert_eq!(
                verdict(&frame[..]),
                Some(Err(Rejection::UnsupportedVersion {
                    got: version,
                    supported: &[1]
                })),
            );
        }
    }

    #[test]
    fn handshake_split_into_single_bytes() {
        let frame = encode_handshake(&token());
        let splits: Vec<usize> = (1..frame.len()).collect();
        let (v, consumed, _) = run_preauth(&frame[..], &splits, &token());
        assert_eq!(v, Some(Ok(())));
        assert_eq!(consumed, HANDSHAKE_FRAME_LEN);
    }

    #[test]
    fn handshake_and_first_request_in_one_write_leave_the_request_untouched() {
        let mut wire = encode_handshake(&token()).to_vec();
        let request = [12u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        wire.extend_from_slice(&request);
        let mut parser = HandshakeParser::new();
        let progress = parser.feed(&wire).unwrap();
        assert_eq!(
            progress,
            Progress::Complete {
                consumed: HANDSHAKE_FRAME_LEN
            }
        );
        assert_eq!(&wire[HANDSHAKE_FRAME_LEN..], &request);
        assert_eq!(parser.verify(&token()), Ok(()));
    }

    #[test]
    fn buffer_is_all_zeros_after_verification_whatever_the_outcome() {
        let good = encode_handshake(&token());
        let mut bad = *good;
        bad[TOKEN_AT] ^= 1;
        for frame in [*good, bad] {
            let mut parser = HandshakeParser::new();
            parser.feed(&frame).unwrap();
            assert_ne!(parser.raw_buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
            let _ = parser.verify(&token());
            assert_eq!(parser.raw_buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
        }
    }

    #[test]
    fn one_attempt_per_connection() {
        let frame = encode_handshake(&token());
        let mut bad = *frame;
        bad[TOKEN_AT] ^= 1;
        let mut parser = HandshakeParser::new();
        parser.feed(&bad).unwrap();
        assert_eq!(parser.verify(&token()), Err(Rejection::BadToken));
        assert_eq!(parser.wanted(), 0);
        assert_eq!(
            parser.feed(&frame[..]),
            Ok(Progress::NeedMore { consumed: 0 })
        );
        assert!(parser.verify(&token()).is_err());
    }

    #[test]
    fn never_buffers_past_the_frame() {
        let mut parser = HandshakeParser::new();
        let big = vec![0u8; 1000];
        let mut frame = encode_handshake(&token()).to_vec();
        frame.extend_from_slice(&big);
        let p = parser.feed(&frame).unwrap();
        assert_eq!(
            p,
            Progress::Complete {
                consumed: HANDSHAKE_FRAME_LEN
            }
        );
        assert_eq!(parser.buffered_len(), HANDSHAKE_FRAME_LEN);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic_nor_overbuffer(
                input in proptest::collection::vec(any::<u8>(), 0..200),
                splits in proptest::collection::vec(0usize..200, 0..20),
            ) {
                let (v, consumed, parser) = run_preauth(&input, &splits, &token());
                prop_assert!(parser.buffered_len() <= HANDSHAKE_FRAME_LEN);
                prop_assert!(consumed <= HANDSHAKE_FRAME_LEN);
                if v.is_some() {
                    prop_assert_eq!(parser.raw_buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
                }
                let exact = input.len() >= HANDSHAKE_FRAME_LEN
                    && input[..HANDSHAKE_FRAME_LEN] == encode_handshake(&token())[..];
                prop_assert_eq!(v == Some(Ok(())), exact);
            }
        }
    }
}
