//! The logic of the fuzz targets, kept in the library so that it is built,
//! linted and tested with the crate (the rustls / quinn-proto arrangement).
//!
//! The files in `fuzz/fuzz_targets/` are shims that hand libFuzzer's bytes to
//! these functions, and `tests/fuzz_corpus.rs` runs the same functions over
//! the committed corpus (`fuzz/corpus/<target>/`) and the crash regressions
//! (`fuzz/regressions/<target>/`) on every `cargo test`, so they never rot.
//! Not part of the public API: hidden from the docs, may change at any time.
//!
//! Every target asserts invariants (a reference model of what the bytes must
//! produce, buffer bounds, canonical encoding), not only "did not panic".
//!
//! | target    | input layout                                   | code under test |
//! | --------- | ---------------------------------------------- | --------------- |
//! | `preauth` | `[plan] ++ wire`                               | [`HandshakeParser`], [`run_preauth`] |
//! | `frame`   | `[limit lo, limit hi, plan] ++ wire`           | [`FrameCodec`], [`decode_request`], [`decode_server_message`], [`encode_message`] |
//! | `session` | `arbitrary` operations ([`session::Operation`]) | the server's connection logic ([`crate::server::Server::serve_stream`]) |
//!
//! `plan` chooses how the wire bytes are cut into reads ([`ChunkPlan`]);
//! `limit` chooses the frame limit ([`frame_limit`]). [`seeds`] builds the
//! committed seed corpus (`cargo run --example gen_fuzz_corpus`).

use std::fmt::Debug;

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::Decoder;

use crate::codec::{
    DecodeState, FrameCodec, decode_message, decode_request, decode_server_message, encode_message,
};
use crate::error::{FrameError, MalformedMessage, RequestError, UnknownRequest};
use crate::handshake::{
    HandshakeParser, MAGIC, Progress, Rejection, SUPPORTED_VERSIONS, encode_handshake, run_preauth,
};
use crate::limits::{
    DEFAULT_MAX_FRAME_LEN, HANDSHAKE_FRAME_LEN, HANDSHAKE_PAYLOAD_LEN, LENGTH_PREFIX_LEN,
    MAX_FRAME_LEN, TOKEN_LEN,
};
use crate::message::{Request, RequestBody, ServerMessage};
use crate::token::SessionToken;

/// The session token every fuzz input is verified against: bytes
/// `0x00..=0x1f`. Fixed, so that the fuzzer (helped by the dictionary) can
/// find the one handshake that authenticates.
pub const FUZZ_TOKEN: [u8; TOKEN_LEN] = {
    let mut bytes = [0u8; TOKEN_LEN];
    let mut i = 0;
    while i < TOKEN_LEN {
        bytes[i] = i as u8;
        i += 1;
    }
    bytes
};

/// [`FUZZ_TOKEN`] as a [`SessionToken`].
pub fn fuzz_token() -> SessionToken {
    SessionToken::from_bytes(FUZZ_TOKEN)
}

// ---------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------

/// How a peer's bytes arrive: the sizes of successive reads, chosen by one
/// input byte so that the fuzzer explores every way of splitting the stream.
///
/// - `0`: everything available at once;
/// - `1..=0x7f`: reads of exactly that many bytes;
/// - `0x80..=0xff`: pseudo-random reads of `1..=(plan & 0x7f) + 1` bytes
///   (xorshift seeded with the byte, so an input always replays the same way).
#[derive(Debug, Clone)]
pub struct ChunkPlan {
    plan: u8,
    state: u32,
}

impl ChunkPlan {
    /// The plan named by `plan`.
    pub fn new(plan: u8) -> Self {
        Self {
            plan,
            state: 0x9e37_79b9 ^ u32::from(plan),
        }
    }

    /// Size of the next read when `available` (> 0) bytes are left; always
    /// in `1..=available`.
    pub fn next_len(&mut self, available: usize) -> usize {
        let len = match self.plan {
            0 => available,
            fixed @ 1..=0x7f => usize::from(fixed),
            random => {
                // xorshift32: never reaches 0 from a non-zero state.
                self.state ^= self.state << 13;
                self.state ^= self.state >> 17;
                self.state ^= self.state << 5;
                let max = u32::from(random & 0x7f) + 1;
                (1 + self.state % max) as usize
            }
        };
        len.clamp(1, available.max(1))
    }
}

// ---------------------------------------------------------------------------
// preauth
// ---------------------------------------------------------------------------

/// A `preauth` input: the chunk plan, then the bytes a peer sends.
pub fn preauth_input(plan: u8, wire: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(1 + wire.len());
    input.push(plan);
    input.extend_from_slice(wire);
    input
}

/// What the pre-auth parser must make of `wire`, written independently of
/// it: the verdict (`None` while the frame is incomplete) and how many bytes
/// it may take from the peer.
fn preauth_model(wire: &[u8], token: &[u8; TOKEN_LEN]) -> (Option<Result<(), Rejection>>, usize) {
    if wire.len() < LENGTH_PREFIX_LEN {
        return (None, wire.len());
    }
    let got = u32::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]);
    if got as usize != HANDSHAKE_PAYLOAD_LEN {
        let rejection = Rejection::WrongLength {
            got,
            expected: HANDSHAKE_PAYLOAD_LEN as u32,
        };
        return (Some(Err(rejection)), LENGTH_PREFIX_LEN);
    }
    if wire.len() < HANDSHAKE_FRAME_LEN {
        return (None, wire.len());
    }
    let version = u32::from_le_bytes([wire[8], wire[9], wire[10], wire[11]]);
    let verdict = if wire[4..8] != MAGIC {
        Err(Rejection::BadMagic)
    } else if !SUPPORTED_VERSIONS.contains(&version) {
        Err(Rejection::UnsupportedVersion {
            got: version,
            supported: SUPPORTED_VERSIONS,
        })
    } else if wire[12..HANDSHAKE_FRAME_LEN] != token[..] {
        Err(Rejection::BadToken)
    } else {
        Ok(())
    };
    (Some(verdict), HANDSHAKE_FRAME_LEN)
}

/// Checks a parser that has given its verdict: nothing left of the secret,
/// nothing more wanted, and no second attempt.
fn assert_spent(parser: &mut HandshakeParser, token: &SessionToken, wire: &[u8]) {
    assert_eq!(
        parser.raw_buffer(),
        &[0u8; HANDSHAKE_FRAME_LEN],
        "buffer not zeroized"
    );
    assert_eq!(
        parser.wanted(),
        0,
        "a parser with a verdict wants more bytes"
    );
    assert!(!parser.is_complete());
    assert!(parser.buffered_len() <= HANDSHAKE_FRAME_LEN);
    // One attempt per connection: not even the right handshake gets in now.
    let handshake = encode_handshake(token);
    assert_eq!(
        parser.feed(&handshake[..]),
        Ok(Progress::NeedMore { consumed: 0 })
    );
    assert_eq!(parser.feed(wire), Ok(Progress::NeedMore { consumed: 0 }));
    assert!(parser.verify(token).is_err(), "a second verify passed");
    assert_eq!(parser.raw_buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
}

/// Fuzz target `preauth`: `data` is `[plan] ++ wire` ([`preauth_input`]).
///
/// Feeds `wire` into a [`HandshakeParser`] in the reads chosen by `plan`,
/// never more than [`HandshakeParser::wanted`] at a time (as the daemon
/// reads), verifies against [`FUZZ_TOKEN`], and asserts:
/// - the verdict and the bytes taken are those of an independent model, so
///   the peer is authenticated iff the first 44 bytes are exactly
///   `encode_handshake(&FUZZ_TOKEN)`, a wrong length prefix is rejected after
///   exactly 4 bytes and a complete frame takes exactly 44 (what follows it
///   stays with the peer for the post-auth codec);
/// - `buffered_len() <= HANDSHAKE_FRAME_LEN` at every step, and before a
///   verdict the buffer holds exactly the bytes taken;
/// - after a verdict the buffer is all zeros, `wanted()` is 0 and no second
///   attempt is accepted; a verify before the frame is complete fails and
///   zeroizes too;
/// - [`run_preauth`] given the same cuts agrees, and so does a parser that
///   is offered more than it wants (it must take no more than it wanted).
pub fn preauth(data: &[u8]) {
    let (plan, wire) = match data.split_first() {
        Some((&plan, wire)) => (plan, wire),
        None => (0, data),
    };
    let token = fuzz_token();
    let (expected, expected_taken) = preauth_model(wire, &FUZZ_TOKEN);
    let authentic = wire.len() >= HANDSHAKE_FRAME_LEN
        && wire[..HANDSHAKE_FRAME_LEN] == encode_handshake(&token)[..];
    assert_eq!(expected == Some(Ok(())), authentic, "model disagrees");

    // 1. As the daemon reads: at most `wanted()` bytes at a time.
    let mut parser = HandshakeParser::new();
    let mut chunks = ChunkPlan::new(plan);
    let mut taken = 0;
    let mut cuts = Vec::new();
    let mut verdict = None;
    while taken < wire.len() {
        let wanted = parser.wanted();
        assert_eq!(wanted, HANDSHAKE_FRAME_LEN - parser.buffered_len());
        assert!(wanted > 0, "no verdict yet, but nothing wanted");
        let len = chunks.next_len(wire.len() - taken).min(wanted);
        cuts.push(taken + len);
        let before = parser.buffered_len();
        let progress = parser.feed(&wire[taken..taken + len]);
        let buffered = parser.buffered_len();
        assert!(buffered <= HANDSHAKE_FRAME_LEN, "over-buffered: {buffered}");
        match progress {
            Ok(Progress::NeedMore { consumed }) => {
                assert_eq!(consumed, len, "took less than offered and wanted");
                assert_eq!(buffered, before + len);
                assert!(!parser.is_complete());
                taken += consumed;
                assert_eq!(&parser.raw_buffer()[..taken], &wire[..taken]);
            }
            Ok(Progress::Complete { consumed }) => {
                assert_eq!(consumed, len, "took less than offered and wanted");
                assert_eq!(buffered, HANDSHAKE_FRAME_LEN);
                assert!(parser.is_complete());
                assert_eq!(parser.wanted(), 0);
                taken += consumed;
                assert_eq!(&parser.raw_buffer()[..], &wire[..HANDSHAKE_FRAME_LEN]);
                verdict = Some(parser.verify(&token));
                break;
            }
            Err(rejection) => {
                assert!(
                    matches!(rejection, Rejection::WrongLength { .. }),
                    "feed gave a verdict other than WrongLength: {rejection:?}"
                );
                assert_eq!(buffered, LENGTH_PREFIX_LEN, "rejected at {buffered} bytes");
                taken += buffered - before;
                verdict = Some(Err(rejection));
                break;
            }
        }
    }
    assert_eq!(verdict, expected, "verdict differs from the model");
    assert_eq!(taken, expected_taken, "bytes taken differ from the model");
    match verdict {
        Some(Ok(())) => {}
        Some(Err(rejection)) => {
            let code = rejection.code();
            assert!(code.closes_connection(), "{code:?} keeps a rejected peer");
        }
        None => {
            assert_eq!(taken, wire.len());
            assert_eq!(parser.buffered_len(), taken);
            assert!(parser.raw_buffer()[taken..].iter().all(|&b| b == 0));
        }
    }
    if verdict.is_none() {
        // A verify before the frame is complete (never done by the daemon,
        // which times out instead) must refuse and forget what it holds.
        assert!(matches!(
            parser.verify(&token),
            Err(Rejection::WrongLength { .. })
        ));
    }
    assert_spent(&mut parser, &token, wire);

    // 2. The library's own driver, given the same cuts, agrees.
    let (helper_verdict, helper_taken, helper_parser) = run_preauth(wire, &cuts, &token);
    assert_eq!(helper_verdict, expected, "run_preauth verdict");
    assert_eq!(helper_taken, expected_taken, "run_preauth consumption");
    if helper_verdict.is_some() {
        assert_eq!(helper_parser.raw_buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
    }

    // 3. Offered more than it wants (a careless caller, or the handshake and
    // a request in one read): it still takes nothing past the frame.
    let mut parser = HandshakeParser::new();
    let mut chunks = ChunkPlan::new(plan);
    let mut offset = 0;
    let mut verdict = None;
    while offset < wire.len() {
        let wanted = parser.wanted();
        let len = chunks.next_len(wire.len() - offset);
        let before = parser.buffered_len();
        match parser.feed(&wire[offset..offset + len]) {
            Ok(Progress::NeedMore { consumed }) => {
                assert!(
                    len < wanted,
                    "the whole frame was offered, yet more is needed"
                );
                assert_eq!(consumed, len, "took less than offered");
                offset += consumed;
            }
            Ok(Progress::Complete { consumed }) => {
                assert_eq!(consumed, wanted, "took past the handshake frame");
                offset += consumed;
                verdict = Some(parser.verify(&token));
                break;
            }
            Err(rejection) => {
                assert_eq!(parser.buffered_len(), LENGTH_PREFIX_LEN);
                offset += parser.buffered_len() - before;
                verdict = Some(Err(rejection));
                break;
            }
        }
        assert!(parser.buffered_len() <= HANDSHAKE_FRAME_LEN);
    }
    assert_eq!(verdict, expected, "over-offered verdict");
    assert_eq!(offset, expected_taken, "over-offered consumption");
    if verdict.is_some() {
        assert_spent(&mut parser, &token, wire);
    }
}

// ---------------------------------------------------------------------------
// frame
// ---------------------------------------------------------------------------

/// Limit selector for [`frame_limit`]: the daemon's default limit.
pub const LIMIT_DEFAULT: u16 = 0xffff;
/// Limit selector for [`frame_limit`]: a limit above the protocol ceiling,
/// which [`FrameCodec::new`] must cap at [`MAX_FRAME_LEN`].
pub const LIMIT_ABOVE_CEILING: u16 = 0xfffe;

/// The frame limit a `frame` input asks for: `0..=4096` as such (smaller than
/// any real configuration, so that limits are hit often), [`LIMIT_DEFAULT`],
/// [`LIMIT_ABOVE_CEILING`], and other values modulo 4097.
pub fn frame_limit(selector: u16) -> usize {
    match selector {
        LIMIT_DEFAULT => DEFAULT_MAX_FRAME_LEN,
        LIMIT_ABOVE_CEILING => usize::MAX,
        small => usize::from(small) % 4097,
    }
}

/// A `frame` input: limit selector, chunk plan, then the bytes a peer sends
/// after the handshake.
pub fn frame_input(limit: u16, plan: u8, wire: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(3 + wire.len());
    input.extend_from_slice(&limit.to_le_bytes());
    input.push(plan);
    input.extend_from_slice(wire);
    input
}

/// How `wire` must split into frames under `limit`, worked out independently
/// of [`FrameCodec`].
#[derive(Debug, Default)]
struct FrameModel {
    /// Payload ranges of the whole frames, in order.
    frames: Vec<(usize, usize)>,
    /// Offset and announced length of the first prefix over the limit.
    too_large: Option<(usize, u32)>,
    /// Where the unfinished tail starts (after the last whole frame).
    tail: usize,
}

impl FrameModel {
    fn of(wire: &[u8], limit: usize) -> Self {
        let mut model = FrameModel::default();
        let mut at = 0;
        while wire.len() - at >= LENGTH_PREFIX_LEN {
            let len = u32::from_le_bytes([wire[at], wire[at + 1], wire[at + 2], wire[at + 3]]);
            if len as usize > limit {
                model.too_large = Some((at, len));
                break;
            }
            let end = at + LENGTH_PREFIX_LEN + len as usize;
            if end > wire.len() {
                break;
            }
            model.frames.push((at + LENGTH_PREFIX_LEN, end));
            at = end;
        }
        model.tail = at;
        model
    }

    /// Frames whose last byte is among the first `received`.
    fn complete_within(&self, received: usize) -> usize {
        self.frames
            .iter()
            .take_while(|&&(_, end)| end <= received)
            .count()
    }
}

/// Upper bound on the read buffer's capacity after `received` bytes under
/// `limit`, whoever grew it: what was received plus one frame at the limit,
/// times 2 for the amortized doubling of `BytesMut`/`Vec` growth, which the
/// reader's own `extend_from_slice` triggers as well (bytes' policy, not the
/// codec's: 9 bytes received in reads of 8 under a limit of 0 already give
/// a capacity of 16). The codec's own growth is held to the strict bound,
/// [`decoder_growth_bound`].
pub fn capacity_bound(received: usize, limit: usize) -> usize {
    2 * (received + limit + LENGTH_PREFIX_LEN)
}

/// Most a single `decode` call may take the buffer's capacity to, if it grows
/// it at all: what was received plus one frame at the limit (and its prefix).
/// A decoder that reserved for an announced length before checking it, or
/// for more than one frame, breaks it at once.
pub fn decoder_growth_bound(received: usize, limit: usize) -> usize {
    received + limit + LENGTH_PREFIX_LEN
}

/// Fuzz target `frame`: `data` is `[limit lo, limit hi, plan] ++ wire`
/// ([`frame_input`]).
///
/// Feeds `wire` into a [`FrameCodec`] with the limit [`frame_limit`] chose,
/// in the reads `plan` chose, draining every frame after each read, and
/// asserts:
/// - the frames, the `FrameTooLarge` and the final state are those of an
///   independent model, and each arrives as soon as its last byte does;
/// - no frame is over the limit; `FrameTooLarge` only for an announced length
///   over the limit, and it leaves the buffer (bytes and capacity) untouched;
/// - `decode` only grows the buffer when it has just accepted a header within
///   the limit, then makes room for that frame and never goes past
///   [`decoder_growth_bound`] (received + one frame); with the reader's own
///   growth the buffer stays within [`capacity_bound`];
/// - every payload goes through [`check_payload`] (decoders' contracts,
///   canonical encoding).
pub fn frame(data: &[u8]) {
    let (selector, plan, wire) = match data {
        [lo, hi, plan, wire @ ..] => (u16::from_le_bytes([*lo, *hi]), *plan, wire),
        _ => (LIMIT_DEFAULT, 0, &data[..0]),
    };
    let requested = frame_limit(selector);
    let mut codec = FrameCodec::new(requested);
    let limit = codec.max_frame_len();
    assert_eq!(limit, requested.min(MAX_FRAME_LEN), "limit not capped");
    let model = FrameModel::of(wire, limit);

    let mut buf = BytesMut::new();
    let mut chunks = ChunkPlan::new(plan);
    let mut received = 0;
    let mut yielded = 0;
    let mut rejected = false;
    'read: while received < wire.len() {
        let len = chunks.next_len(wire.len() - received);
        buf.extend_from_slice(&wire[received..received + len]);
        received += len;
        assert!(buf.capacity() <= capacity_bound(received, limit));
        loop {
            let cap_before = buf.capacity();
            let len_before = buf.len();
            let state_before = codec.state();
            let result = codec.decode(&mut buf);
            let cap_after = buf.capacity();
            assert!(
                cap_after <= cap_before.max(decoder_growth_bound(received, limit)),
                "decode grew the buffer from {cap_before} to {cap_after} after {received} bytes"
            );
            assert!(cap_after <= capacity_bound(received, limit));
            match result {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= limit, "frame over the limit");
                    let Some(&(start, end)) = model.frames.get(yielded) else {
                        panic!("a frame the model does not have: {payload:?}");
                    };
                    assert!(end <= received);
                    assert_eq!(&payload[..], &wire[start..end], "frame {yielded} differs");
                    assert_eq!(codec.state(), DecodeState::Head);
                    assert!(cap_after <= cap_before, "grew while taking a frame");
                    yielded += 1;
                    check_payload(&payload);
                }
                Ok(None) => {
                    match (state_before, codec.state()) {
                        (DecodeState::Head, DecodeState::Data(announced)) => {
                            // A header was accepted: room for its frame only.
                            assert!(announced <= limit);
                            assert_eq!(len_before, buf.len() + LENGTH_PREFIX_LEN);
                            assert!(cap_after >= announced, "no room made for the frame");
                        }
                        (before, after) => {
                            assert_eq!(before, after, "state moved without a frame");
                            assert_eq!(len_before, buf.len());
                            assert!(cap_after <= cap_before, "grew without a new header");
                        }
                    }
                    break;
                }
                Err(FrameError::FrameTooLarge { len, max }) => {
                    let Some((at, announced)) = model.too_large else {
                        panic!("FrameTooLarge({len}) the model does not have");
                    };
                    assert_eq!(len, u64::from(announced));
                    assert!(len > limit as u64, "rejected a frame within the limit");
                    assert_eq!(max, limit);
                    assert_eq!(yielded, model.frames.len(), "rejected before a frame");
                    assert_eq!(state_before, DecodeState::Head);
                    assert_eq!(cap_after, cap_before, "capacity changed on rejection");
                    assert_eq!(&buf[..], &wire[at..received], "buffer changed on rejection");
                    rejected = true;
                    // The daemon answers FrameTooLarge and closes: no more reads.
                    break 'read;
                }
                Err(other) => panic!("decode failed with something else: {other:?}"),
            }
        }
        // Prompt: every frame whose last byte is in has been handed out.
        assert_eq!(
            yielded,
            model.complete_within(received),
            "a frame was held back"
        );
        if let Some((at, _)) = model.too_large {
            assert!(
                received < at + LENGTH_PREFIX_LEN,
                "an oversize prefix went unnoticed"
            );
        }
        assert!(buf.capacity() <= capacity_bound(received, limit));
    }

    assert_eq!(rejected, model.too_large.is_some());
    assert_eq!(yielded, model.frames.len());
    if !rejected {
        let tail = &wire[model.tail..];
        match codec.state() {
            DecodeState::Head => {
                assert!(tail.len() < LENGTH_PREFIX_LEN);
                assert_eq!(&buf[..], tail);
            }
            DecodeState::Data(announced) => {
                assert!(tail.len() >= LENGTH_PREFIX_LEN);
                let prefix = [tail[0], tail[1], tail[2], tail[3]];
                assert_eq!(announced, u32::from_le_bytes(prefix) as usize);
                assert_eq!(&buf[..], &tail[LENGTH_PREFIX_LEN..]);
            }
        }
    }
}

/// Checks one frame payload against both decoders, whatever it holds:
/// - [`decode_request`] classifies it as documented (too short, unknown tag
///   with the id kept, malformed, or a request) and agrees with
///   [`decode_message`] for the known tags;
/// - a `TrailingBytes` error means the bytes before the excess are a message;
/// - anything that decodes re-encodes, with [`encode_message`], to exactly
///   the payload (one encoding per message: no aliasing that could let two
///   peers' bytes mean the same thing differently to two parsers), under a
///   limit of exactly its size, and is refused one byte under it.
pub fn check_payload(payload: &[u8]) {
    match decode_request(payload) {
        Ok(request) => {
            assert!(payload.len() >= 12);
            assert_eq!(request.id.to_le_bytes()[..], payload[..8]);
            assert_eq!(request_tag(&request.body).to_le_bytes()[..], payload[8..12]);
            assert_canonical(&request, payload);
        }
        Err(RequestError::Unknown(UnknownRequest { id, tag })) => {
            assert!(payload.len() >= 12);
            assert_eq!(id.to_le_bytes()[..], payload[..8]);
            assert_eq!(tag.to_le_bytes()[..], payload[8..12]);
            assert!(
                tag >= RequestBody::TAG_COUNT,
                "known tag {tag} reported unknown"
            );
        }
        Err(RequestError::Malformed(MalformedMessage::TooShort { len })) => {
            assert_eq!(len, payload.len());
            assert!(len < 12);
        }
        Err(RequestError::Malformed(malformed)) => {
            assert!(payload.len() >= 12);
            let tag = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
            assert!(tag < RequestBody::TAG_COUNT);
            assert_eq!(decode_message::<Request>(payload), Err(malformed.clone()));
            assert_trailing_prefix_decodes::<Request>(payload, &malformed);
        }
    }
    match decode_server_message(payload) {
        Ok(message) => assert_canonical(&message, payload),
        Err(malformed) => assert_trailing_prefix_decodes::<ServerMessage>(payload, &malformed),
    }
}

/// The wire tag of a request body (its position in [`RequestBody`]).
fn request_tag(body: &RequestBody) -> u32 {
    match body {
        RequestBody::Ping => 0,
        RequestBody::Status => 1,
        RequestBody::Subscribe { .. } => 2,
        RequestBody::Unsubscribe { .. } => 3,
        RequestBody::Publish { .. } => 4,
        RequestBody::Shutdown => 5,
    }
}

fn assert_trailing_prefix_decodes<T>(payload: &[u8], malformed: &MalformedMessage)
where
    T: Serialize + DeserializeOwned + Debug,
{
    if let MalformedMessage::TrailingBytes { used, extra } = *malformed {
        assert!(extra > 0);
        assert_eq!(used + extra, payload.len());
        match decode_message::<T>(&payload[..used]) {
            Ok(message) => assert_canonical(&message, &payload[..used]),
            Err(err) => panic!("TrailingBytes, yet the first {used} bytes fail: {err}"),
        }
    }
}

/// `message`, decoded from `payload`, encodes back to exactly `payload`.
fn assert_canonical<T: Serialize + Debug>(message: &T, payload: &[u8]) {
    let mut frame = BytesMut::new();
    if let Err(err) = encode_message(message, &mut frame, payload.len()) {
        panic!(
            "{message:?} decoded from {} bytes does not re-encode: {err}",
            payload.len()
        );
    }
    assert_eq!(
        &frame[LENGTH_PREFIX_LEN..],
        payload,
        "non-canonical encoding accepted: {message:?}"
    );
    assert_eq!(
        frame[..LENGTH_PREFIX_LEN],
        (payload.len() as u32).to_le_bytes()
    );
    if let Some(under) = payload.len().checked_sub(1) {
        let mut dst = BytesMut::from(&b"kept"[..]);
        match encode_message(message, &mut dst, under) {
            Err(FrameError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (payload.len() as u64, under));
            }
            other => panic!("encoding {message:?} under its size: {other:?}"),
        }
        assert_eq!(&dst[..], b"kept", "a refused encode left bytes behind");
    }
}

// ---------------------------------------------------------------------------
// session
// ---------------------------------------------------------------------------

pub mod session;

pub use session::session;

// ---------------------------------------------------------------------------
// seeds
// ---------------------------------------------------------------------------

/// The committed seed corpus, by target: `(file name, input)` pairs.
/// `examples/gen_fuzz_corpus.rs` writes them to `fuzz/corpus/<target>/`, and
/// `tests/fuzz_corpus.rs` checks that every one is committed unchanged.
pub mod seeds {
    use bytes::{Bytes, BytesMut};

    use super::{FUZZ_TOKEN, LIMIT_ABOVE_CEILING, LIMIT_DEFAULT, frame_input, preauth_input};
    use crate::codec::encode_message;
    use crate::handshake::{encode_handshake, encode_handshake_with};
    use crate::limits::{HANDSHAKE_PAYLOAD_LEN, MAX_FRAME_LEN, MAX_TOPIC_LEN};
    use crate::message::{CloseReason, ErrorCode, Request, RequestBody, ServerMessage, Status};
    use crate::token::SessionToken;

    /// A named seed.
    pub type Seed = (String, Vec<u8>);

    fn frame_of<T: serde::Serialize>(message: &T) -> Vec<u8> {
        let mut frame = BytesMut::new();
        match encode_message(message, &mut frame, MAX_FRAME_LEN) {
            Ok(()) => frame.to_vec(),
            Err(err) => panic!("seed does not encode: {err}"),
        }
    }

    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    /// One request of every kind, in tag order.
    pub fn requests() -> Vec<(&'static str, Request)> {
        let body = [
            ("ping", RequestBody::Ping),
            ("status", RequestBody::Status),
            (
                "subscribe",
                RequestBody::Subscribe {
                    topic: "news".into(),
                },
            ),
            (
                "unsubscribe",
                RequestBody::Unsubscribe {
                    topic: "news".into(),
                },
            ),
            (
                "publish",
                RequestBody::Publish {
                    topic: "news".into(),
                    payload: Bytes::from_static(b"hello"),
                },
            ),
            ("shutdown", RequestBody::Shutdown),
        ];
        body.into_iter()
            .enumerate()
            .map(|(i, (name, body))| {
                (
                    name,
                    Request {
                        id: i as u64 + 1,
                        body,
                    },
                )
            })
            .collect()
    }

    /// One server message of every kind, in tag order (Error once with and
    /// once without a request id, Closing with each reason).
    pub fn server_messages() -> Vec<(&'static str, ServerMessage)> {
        vec![
            (
                "welcome",
                ServerMessage::Welcome {
                    protocol_version: 1,
                    daemon_version: "0.1.0".into(),
                    connection_id: 7,
                    max_frame_len: MAX_FRAME_LEN as u32,
                },
            ),
            ("pong", ServerMessage::Pong { id: 1 }),
            (
                "status-report",
                ServerMessage::StatusReport {
                    id: 2,
                    status: Status {
                        authenticated: 1,
                        pending: 0,
                        topics: 2,
                        subscribers: 3,
                        uptime_ms: 1234,
                        version: "0.1.0".into(),
                    },
                },
            ),
            ("ack", ServerMessage::Ack { id: 3 }),
            (
                "event",
                ServerMessage::Event {
                    topic: "news".into(),
                    sequence: 1,
                    payload: Bytes::from_static(b"hello"),
                },
            ),
            (
                "error-with-id",
                ServerMessage::Error {
                    id: Some(4),
                    code: ErrorCode::InvalidTopic,
                    message: "topic is empty".into(),
                },
            ),
            (
                "error-without-id",
                ServerMessage::Error {
                    id: None,
                    code: ErrorCode::BadToken,
                    message: "token does not match".into(),
                },
            ),
            (
                "closing-shutdown",
                ServerMessage::Closing {
                    reason: CloseReason::Shutdown,
                },
            ),
            (
                "closing-slow-consumer",
                ServerMessage::Closing {
                    reason: CloseReason::SlowConsumer,
                },
            ),
        ]
    }

    /// Seeds of `preauth`.
    pub fn preauth() -> Vec<Seed> {
        let token = SessionToken::from_bytes(FUZZ_TOKEN);
        let good = encode_handshake(&token).to_vec();
        let mut seeds: Vec<Seed> = Vec::new();
        let mut add = |name: &str, plan: u8, wire: &[u8]| {
            seeds.push((name.to_string(), preauth_input(plan, wire)));
        };

        add("valid-handshake", 0, &good);
        add("valid-handshake-bytewise", 1, &good);
        add("valid-handshake-3-byte-reads", 3, &good);
        add("valid-handshake-random-reads", 0x8f, &good);
        let mut with_request = good.clone();
        with_request.extend(frame_of(&Request {
            id: 1,
            body: RequestBody::Ping,
        }));
        add("valid-handshake-then-ping", 0, &with_request);
        add(
            "valid-handshake-then-ping-random-reads",
            0xa0,
            &with_request,
        );
        let mut with_two = good.clone();
        with_two.extend(&good);
        add("valid-handshake-twice", 0, &with_two);

        for (name, got) in [
            ("wrong-length-39", 39u32),
            ("wrong-length-41", 41),
            ("wrong-length-0", 0),
            ("wrong-length-1", 1),
            ("wrong-length-44", 44),
            ("wrong-length-ffffffff", u32::MAX),
        ] {
            let mut wire = got.to_le_bytes().to_vec();
            wire.extend_from_slice(&good[4..]);
            add(name, 0, &wire);
        }
        let mut ping_first = frame_of(&Request {
            id: 1,
            body: RequestBody::Ping,
        });
        ping_first.extend(&good);
        add("request-before-handshake", 0, &ping_first);

        for (name, magic) in [("bad-magic", *b"KYHM"), ("bad-magic-reversed", *b"LHYK")] {
            let mut wire = good.clone();
            wire[4..8].copy_from_slice(&magic);
            add(name, 0, &wire);
        }
        let mut zeros = (HANDSHAKE_PAYLOAD_LEN as u32).to_le_bytes().to_vec();
        zeros.extend([0u8; HANDSHAKE_PAYLOAD_LEN]);
        add("all-zero-payload", 0, &zeros);

        for version in [0u32, 2, u32::MAX] {
            let wire = encode_handshake_with(version, &token).to_vec();
            add(&format!("version-{version}"), 0, &wire);
        }

        let mut first = good.clone();
        first[12] ^= 1;
        add("bad-token-first-byte", 0, &first);
        let mut last = good.clone();
        last[43] ^= 0x80;
        add("bad-token-last-byte", 1, &last);
        let zero_token = encode_handshake(&SessionToken::from_bytes([0; 32])).to_vec();
        add("bad-token-zeros", 0, &zero_token);

        add("empty", 0, &[]);
        add("truncated-prefix-3", 0, &good[..3]);
        add("truncated-prefix-only", 0, &good[..4]);
        add("truncated-after-magic", 2, &good[..8]);
        add("truncated-43", 0, &good[..43]);
        seeds
    }

    /// Seeds of `frame`.
    pub fn frame() -> Vec<Seed> {
        let mut seeds: Vec<Seed> = Vec::new();
        let mut add = |name: String, limit: u16, plan: u8, wire: &[u8]| {
            seeds.push((name, frame_input(limit, plan, wire)));
        };

        let mut all_requests = Vec::new();
        for (name, request) in requests() {
            let wire = frame_of(&request);
            all_requests.extend(&wire);
            add(format!("request-{name}"), LIMIT_DEFAULT, 0, &wire);
        }
        add("requests-pipelined".into(), LIMIT_DEFAULT, 0, &all_requests);
        add("requests-pipelined-bytewise".into(), 1024, 1, &all_requests);
        add(
            "requests-pipelined-random".into(),
            4096,
            0x9f,
            &all_requests,
        );

        let mut all_messages = Vec::new();
        for (name, message) in server_messages() {
            let wire = frame_of(&message);
            all_messages.extend(&wire);
            add(format!("server-{name}"), LIMIT_DEFAULT, 0, &wire);
        }
        add("server-pipelined-random".into(), 4096, 0x87, &all_messages);
        let mut every_code = Vec::new();
        for code in ErrorCode::ALL {
            every_code.extend(frame_of(&ServerMessage::Error {
                id: Some(u64::from(code.tag())),
                code,
                message: String::new(),
            }));
        }
        add("server-error-every-code".into(), 4096, 0, &every_code);

        // Requests the daemon answers without closing, or closes on.
        let mut unknown = 9u64.to_le_bytes().to_vec();
        unknown.extend(6u32.to_le_bytes());
        add(
            "request-unknown-tag-6".into(),
            LIMIT_DEFAULT,
            0,
            &raw_frame(&unknown),
        );
        let mut unknown = 9u64.to_le_bytes().to_vec();
        unknown.extend(0xffff_ffffu32.to_le_bytes());
        add(
            "request-unknown-tag-max".into(),
            1024,
            0,
            &raw_frame(&unknown),
        );
        let ping = frame_of(&Request {
            id: 1,
            body: RequestBody::Ping,
        });
        let mut trailing = ping[4..].to_vec();
        trailing.push(0);
        add(
            "request-trailing-byte".into(),
            1024,
            0,
            &raw_frame(&trailing),
        );
        add("request-short".into(), 1024, 0, &raw_frame(&ping[4..11]));
        add("empty-frame".into(), 1024, 0, &raw_frame(&[]));
        let long_topic = "t".repeat(MAX_TOPIC_LEN + 1);
        let wire = frame_of(&Request {
            id: 2,
            body: RequestBody::Subscribe { topic: long_topic },
        });
        add("request-long-topic".into(), 1024, 0, &wire);
        let mut bad_utf8 = frame_of(&Request {
            id: 3,
            body: RequestBody::Subscribe { topic: "ab".into() },
        });
        let n = bad_utf8.len();
        bad_utf8[n - 1] = 0xff;
        add("request-topic-bad-utf8".into(), 1024, 0, &bad_utf8);
        let mut huge_string = frame_of(&Request {
            id: 4,
            body: RequestBody::Subscribe { topic: "a".into() },
        });
        huge_string[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        add("request-topic-length-max".into(), 1024, 0, &huge_string);
        let mut bad_option = frame_of(&ServerMessage::Error {
            id: Some(1),
            code: ErrorCode::Malformed,
            message: String::new(),
        });
        bad_option[8] = 2;
        add("server-error-option-tag-2".into(), 1024, 0, &bad_option);

        // Truncations: nothing may come out, and nothing be reserved past one frame.
        let publish = frame_of(&requests()[4].1);
        add("truncated-prefix".into(), 1024, 0, &publish[..3]);
        add("truncated-after-prefix".into(), 1024, 0, &publish[..4]);
        add(
            "truncated-payload".into(),
            1024,
            0,
            &publish[..publish.len() - 1],
        );
        let mut then_cut = ping.clone();
        then_cut.extend(&publish[..10]);
        add("frame-then-truncated".into(), 1024, 2, &then_cut);

        // Limits.
        add(
            "oversize-1025-limit-1024".into(),
            1024,
            0,
            &1025u32.to_le_bytes(),
        );
        add("oversize-1-limit-0".into(), 0, 0, &raw_frame(&[0]));
        add("empty-frame-limit-0".into(), 0, 0, &raw_frame(&[]));
        add("at-limit-1024".into(), 1024, 0, &raw_frame(&[7u8; 1024]));
        add(
            "at-limit-4096-random".into(),
            4096,
            0xff,
            &raw_frame(&[7u8; 4096]),
        );
        add(
            "oversize-ffffffff-default".into(),
            LIMIT_DEFAULT,
            0,
            &[0xff; 4],
        );
        let over = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
        add(
            "oversize-ceiling-plus-1".into(),
            LIMIT_ABOVE_CEILING,
            0,
            &over,
        );
        let at = (MAX_FRAME_LEN as u32).to_le_bytes();
        add("announce-ceiling-then-stop".into(), LIMIT_DEFAULT, 0, &at);
        let mut then_over = ping.clone();
        then_over.extend(4097u32.to_le_bytes());
        then_over.extend(&ping);
        add("frame-then-oversize".into(), 4096, 0, &then_over);
        seeds
    }

    /// Seeds of `session`: see [`super::session::seeds`].
    pub fn session() -> Vec<Seed> {
        super::session::seeds()
    }
}
