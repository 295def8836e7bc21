//! The logic of the fuzz targets, kept in the library so that it is built,
//! linted and tested with the crate (the rustls / quinn-proto arrangement),
//! behind the `fuzzing` feature so that no user's build compiles it.
//!
//! The files in `fuzz/fuzz_targets/` are shims that hand libFuzzer's bytes to
//! these functions, and `tests/fuzz_corpus.rs` runs the same functions over
//! the committed corpus (`fuzz/corpus/<target>/`) and the crash regressions
//! (`fuzz/regressions/<target>/`) on every `cargo test`, so they never rot.
//!
//! Every target asserts invariants (a reference model of what the bytes must
//! produce, buffer bounds, canonical encoding), not only "did not panic".
//!
//! | target    | input layout                                   | code under test |
//! | --------- | ---------------------------------------------- | --------------- |
//! | `preauth` | `[plan] ++ wire`                               | `HandshakeParser` through `preauth::pump_first` and `preauth::pump`, the daemon's drivers |
//! | `frame`   | `[limit lo, limit hi, plan] ++ wire`           | [`FrameCodec`], [`RequestHeader`], [`DaemonFrame`], the hub's messages and [`crate::encoding::decode`] on a type with every serde shape |
//! | `session` | `arbitrary` operations ([`session::Operation`]) | the server's connection logic with the hub service, over a socket pair |
//!
//! `plan` chooses how the wire bytes are cut into reads ([`ChunkPlan`]);
//! `limit` chooses the frame limit ([`frame_limit`]). [`seeds`] builds the
//! committed seed corpus (`cargo run --example gen_fuzz_corpus`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::Decoder;

use crate::codec::FrameCodec;
use crate::encoding::{self, Payload};
use crate::error::{DecodeError, FrameError};
use crate::handshake::{HandshakeFrame, MAGIC, SUPPORTED_VERSIONS};
use crate::hub::{HubEvent, HubReply, HubRequest};
use crate::limits::{
    DEFAULT_MAX_FRAME_LEN, HANDSHAKE_FRAME_LEN, HANDSHAKE_PAYLOAD_LEN, LENGTH_PREFIX_LEN,
    MAX_FRAME_LEN, TOKEN_LEN,
};
pub use crate::server::preauth::{HandshakeParser, Progress, Rejection, Verdict, pump, pump_first};
use crate::token::SessionToken;
use crate::transport::{
    DaemonFrame, REQUEST_HEADER_LEN, RequestHeader, RequestKind, encode_request, frame_into,
};

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

/// What the daemon must make of `wire`, written independently of the
/// parser: the verdict (`None` while the frame is incomplete) and how many
/// bytes of the peer's it may look at.
fn preauth_model(wire: &[u8], token: &[u8; TOKEN_LEN]) -> (Option<Verdict>, usize) {
    if wire.len() < LENGTH_PREFIX_LEN {
        return (None, wire.len());
    }
    let got = u32::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]);
    if got as usize != HANDSHAKE_PAYLOAD_LEN {
        let rejection = Rejection::WrongLength {
            got,
            expected: HANDSHAKE_PAYLOAD_LEN as u32,
        };
        return (Some(Verdict::Rejected(rejection)), LENGTH_PREFIX_LEN);
    }
    if wire.len() < HANDSHAKE_FRAME_LEN {
        return (None, wire.len());
    }
    let version = u32::from_le_bytes([wire[8], wire[9], wire[10], wire[11]]);
    let verdict = if wire[4..8] != MAGIC {
        Verdict::Rejected(Rejection::BadMagic)
    } else if !SUPPORTED_VERSIONS.contains(&version) {
        Verdict::Rejected(Rejection::UnsupportedVersion {
            got: version,
            supported: SUPPORTED_VERSIONS,
        })
    } else if wire[12..HANDSHAKE_FRAME_LEN] != token[..] {
        Verdict::Rejected(Rejection::BadToken)
    } else {
        Verdict::Authenticated
    };
    (Some(verdict), HANDSHAKE_FRAME_LEN)
}

/// Checks a parser that has given its verdict: nothing left of the secret,
/// nothing more wanted, and no second attempt.
fn assert_spent(parser: &mut HandshakeParser, token: &SessionToken) {
    assert_eq!(
        parser.buffer(),
        &[0u8; HANDSHAKE_FRAME_LEN],
        "buffer not zeroized"
    );
    assert!(parser.is_done());
    assert!(
        parser.spare().is_empty(),
        "a parser with a verdict wants more bytes"
    );
    // One attempt per connection: not even the right handshake gets in now.
    let handshake = HandshakeFrame::new(token);
    assert_eq!(parser.feed(&handshake).0, 0);
    assert!(parser.verify(token).is_err(), "a second verify passed");
    assert_eq!(parser.buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
}

/// Fuzz target `preauth`: `data` is `[plan] ++ wire` ([`preauth_input`]).
///
/// Runs `wire` through the daemon's driver ([`pump`], reading straight into
/// the parser, never more than it wants) in the reads chosen by `plan`, with
/// would-block between reads as a socket gives, and asserts:
/// - the verdict and the bytes the parser keeps are those of an independent
///   model: the peer is authenticated iff its first 44 bytes are exactly the
///   handshake for [`FUZZ_TOKEN`]; a wrong length prefix is rejected with
///   nothing after its 4 bytes kept; nothing past the 44th byte is ever read;
/// - the buffer never holds more than 44 bytes, and before a verdict exactly
///   the bytes read;
/// - after a verdict the buffer is all zeros, nothing more is wanted and no
///   second attempt is accepted; an end of stream before a verdict is
///   `Ended`; a verify before the frame is complete fails and zeroizes too;
/// - the daemon's first read ([`pump_first`], the first read of the plan
///   taking the handshake and what follows into a read-ahead buffer) gives
///   the model's verdict, reports the bytes after the handshake exactly and
///   only when authenticated, and leaves an incomplete handshake to
///   [`pump`];
/// - [`HandshakeParser::feed`] offered more than it wants (the handshake and
///   a request in one read) agrees and takes nothing past the frame.
pub fn preauth(data: &[u8]) {
    let (plan, wire) = match data.split_first() {
        Some((&plan, wire)) => (plan, wire),
        None => (0, data),
    };
    let token = fuzz_token();
    let (expected, expected_taken) = preauth_model(wire, &FUZZ_TOKEN);
    let authentic = wire.len() >= HANDSHAKE_FRAME_LEN
        && wire[..HANDSHAKE_FRAME_LEN] == HandshakeFrame::new(&token)[..];
    assert_eq!(
        expected == Some(Verdict::Authenticated),
        authentic,
        "model disagrees"
    );

    // 1. The daemon's driver, one read per pump, would-block in between.
    let mut parser = HandshakeParser::new();
    let mut chunks = ChunkPlan::new(plan);
    pump_to_verdict(
        &mut parser,
        &token,
        wire,
        0,
        &mut chunks,
        expected,
        expected_taken,
    );

    // 2. The daemon's first read (`pump_first`: the handshake and what
    // follows it in one read, into a small read-ahead buffer so that its
    // edge is reached), then the driver for the rest.
    let mut parser = HandshakeParser::new();
    let mut chunks = ChunkPlan::new(plan);
    let mut ahead = [0u8; 64];
    let first = if wire.is_empty() {
        0
    } else {
        chunks.next_len(wire.len())
    };
    let (verdict, ahead_len) = pump_first(&mut parser, &token, &mut ahead, |iov| {
        let mut n = 0;
        for buf in iov.iter_mut() {
            let take = buf.len().min(first - n);
            buf[..take].copy_from_slice(&wire[n..n + take]);
            n += take;
        }
        Ok(n)
    });
    assert!(
        parser.buffered_len() <= HANDSHAKE_FRAME_LEN,
        "over-buffered"
    );
    match verdict {
        Some(Verdict::Authenticated) => {
            assert_eq!(
                verdict, expected,
                "first-read verdict differs from the model"
            );
            let past = first.min(HANDSHAKE_FRAME_LEN + ahead.len()) - HANDSHAKE_FRAME_LEN;
            assert_eq!(ahead_len, past, "read-ahead length");
            assert_eq!(
                &ahead[..ahead_len],
                &wire[HANDSHAKE_FRAME_LEN..HANDSHAKE_FRAME_LEN + ahead_len],
                "read-ahead bytes"
            );
            assert_spent(&mut parser, &token);
        }
        Some(got) => {
            assert_eq!(ahead_len, 0, "read-ahead reported without authentication");
            if got == Verdict::Ended {
                // (The model's `None`: the stream ended before a verdict.)
                assert_eq!(expected, None, "ended where the model has a verdict");
                assert!(wire.is_empty(), "ended with bytes to read");
            } else {
                assert_eq!(
                    Some(got),
                    expected,
                    "first-read verdict differs from the model"
                );
            }
            assert_spent(&mut parser, &token);
        }
        None => {
            assert_eq!(ahead_len, 0, "read-ahead reported without a verdict");
            assert!(
                first < HANDSHAKE_FRAME_LEN,
                "a whole handshake and no verdict"
            );
            assert_eq!(parser.buffered_len(), first);
            pump_to_verdict(
                &mut parser,
                &token,
                wire,
                first,
                &mut chunks,
                expected,
                expected_taken,
            );
        }
    }

    // 3. Offered more than it wants: takes nothing past the frame.
    preauth_over_offered(plan, wire, &token, expected, expected_taken);
}

/// Drives [`pump`] over `wire` from byte `read` on, in the reads `chunks`
/// chooses, to a verdict, and checks it and the bytes read against the
/// model (`expected`, `expected_taken`).
fn pump_to_verdict(
    parser: &mut HandshakeParser,
    token: &SessionToken,
    wire: &[u8],
    mut read: usize,
    chunks: &mut ChunkPlan,
    expected: Option<Verdict>,
    expected_taken: usize,
) {
    let mut verdict = None;
    while verdict.is_none() {
        let mut budget = if read < wire.len() {
            chunks.next_len(wire.len() - read)
        } else {
            0
        };
        let before = read;
        let eof = read == wire.len();
        verdict = pump(parser, token, |buf| {
            if eof {
                return Ok(0);
            }
            if budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(budget).min(wire.len() - read);
            buf[..n].copy_from_slice(&wire[read..read + n]);
            read += n;
            budget -= n;
            Ok(n)
        });
        assert!(
            parser.buffered_len() <= HANDSHAKE_FRAME_LEN,
            "over-buffered"
        );
        assert!(read <= HANDSHAKE_FRAME_LEN, "read past the handshake frame");
        if verdict.is_none() {
            assert_eq!(parser.buffered_len(), read);
            assert_eq!(&parser.buffer()[..read], &wire[..read]);
            assert!(read > before, "no progress and no verdict");
        }
    }
    match (expected, verdict) {
        (None, Some(Verdict::Ended)) => assert_eq!(read, wire.len()),
        (Some(want), Some(got)) => {
            assert_eq!(got, want, "verdict differs from the model");
            assert!(
                read >= expected_taken,
                "verdict before the model's bytes arrived"
            );
            if let Verdict::Rejected(rejection) = got {
                assert!(rejection.code().closes_connection());
            }
        }
        (want, got) => panic!("model says {want:?}, driver says {got:?}"),
    }
    assert_spent(parser, token);
}

/// [`HandshakeParser::feed`] offered more than it wants: agrees with the
/// model and takes nothing past the frame.
fn preauth_over_offered(
    plan: u8,
    wire: &[u8],
    token: &SessionToken,
    expected: Option<Verdict>,
    expected_taken: usize,
) {
    let mut parser = HandshakeParser::new();
    let mut chunks = ChunkPlan::new(plan);
    let mut offset = 0;
    let mut verdict = None;
    while offset < wire.len() {
        let len = chunks.next_len(wire.len() - offset);
        let (taken, progress) = parser.feed(&wire[offset..offset + len]);
        offset += taken;
        assert!(parser.buffered_len() <= HANDSHAKE_FRAME_LEN);
        match progress {
            Ok(Progress::NeedMore) => assert_eq!(taken, len, "took less than offered"),
            Ok(Progress::Complete) => {
                verdict = Some(match parser.verify(token) {
                    Ok(()) => Verdict::Authenticated,
                    Err(rejection) => Verdict::Rejected(rejection),
                });
                break;
            }
            Err(rejection) => {
                verdict = Some(Verdict::Rejected(rejection));
                break;
            }
        }
    }
    assert_eq!(verdict, expected, "over-offered verdict");
    assert_eq!(offset, expected_taken, "over-offered consumption");
    if verdict.is_none() {
        assert!(matches!(
            parser.verify(token),
            Err(Rejection::WrongLength { .. })
        ));
    }
    assert_spent(&mut parser, token);
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
/// times 2 for the amortized doubling of `BytesMut` growth, which the
/// reader's own `extend_from_slice` triggers as well. The codec's own growth
/// is held to the strict bound, [`decoder_growth_bound`].
pub fn capacity_bound(received: usize, limit: usize) -> usize {
    2 * (received + limit + LENGTH_PREFIX_LEN)
}

/// Most a single `decode` call may take the buffer's capacity to, if it grows
/// it at all: what was received plus one frame at the limit (and its prefix).
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
///   the limit, and never past [`decoder_growth_bound`];
/// - every payload goes through [`check_payload`].
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
            let at_start_before = codec.at_frame_start();
            let result = codec.decode(&mut buf);
            let cap_after = buf.capacity();
            assert!(
                cap_after <= cap_before.max(decoder_growth_bound(received, limit)),
                "decode grew the buffer from {cap_before} to {cap_after} after {received} bytes"
            );
            match result {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= limit, "frame over the limit");
                    let Some(&(start, end)) = model.frames.get(yielded) else {
                        panic!("a frame the model does not have: {payload:?}");
                    };
                    assert!(end <= received);
                    assert_eq!(&payload[..], &wire[start..end], "frame {yielded} differs");
                    assert!(codec.at_frame_start());
                    assert!(cap_after <= cap_before, "grew while taking a frame");
                    yielded += 1;
                    check_payload(&payload.freeze());
                }
                Ok(None) => {
                    if at_start_before && !codec.at_frame_start() {
                        // A header was accepted: room for its frame only.
                        assert_eq!(len_before, buf.len() + LENGTH_PREFIX_LEN);
                    } else {
                        assert_eq!(len_before, buf.len(), "bytes taken without a frame");
                        assert!(cap_after <= cap_before, "grew without a new header");
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
                    assert!(at_start_before);
                    assert_eq!(cap_after, cap_before, "capacity changed on rejection");
                    assert_eq!(&buf[..], &wire[at..received], "buffer changed on rejection");
                    rejected = true;
                    break 'read;
                }
                Err(other) => panic!("decode failed with something else: {other:?}"),
            }
        }
        assert_eq!(
            yielded,
            model.complete_within(received),
            "a frame was held back"
        );
        assert!(buf.capacity() <= capacity_bound(received, limit));
    }
    assert_eq!(rejected, model.too_large.is_some());
    assert_eq!(yielded, model.frames.len());
    if !rejected {
        let tail = &wire[model.tail..];
        if codec.at_frame_start() {
            assert!(tail.len() < LENGTH_PREFIX_LEN);
            assert_eq!(&buf[..], tail);
        } else {
            assert!(tail.len() >= LENGTH_PREFIX_LEN);
            assert_eq!(&buf[..], &tail[LENGTH_PREFIX_LEN..]);
        }
    }
}

/// Every serde shape the decoder handles, for [`check_payload`]: strings,
/// byte arrays, sequences, options, enums of every variant kind, chars,
/// booleans, integers and floats (no map: a map's decoding merges duplicate
/// keys, so it has no canonical form to check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Shapes {
    /// Nothing.
    Unit,
    /// A string and a byte array.
    Text(String, Payload),
    /// Sequences.
    List(Vec<Shapes>),
    /// A record.
    Record {
        /// An option.
        a: Option<u64>,
        /// A boolean.
        b: bool,
        /// A char.
        c: char,
        /// A float (compared by bits).
        f: u64,
        /// Bytes as a sequence of `u8`.
        v: Vec<u8>,
    },
}

/// Checks one frame payload against every decoder, whatever it holds:
/// - as a request: the header is the first 12 bytes; a `Call`'s body that
///   decodes as a hub request re-encodes (with the header) to exactly the
///   payload, under a limit of exactly its size, and is refused one byte
///   under it; a `TrailingBytes` error means the bytes before the excess
///   are a request;
/// - as a daemon frame: anything that decodes re-encodes to exactly the
///   payload, and the bodies of `Reply` and `Event` likewise as the hub's;
/// - as [`Shapes`] and as a map: the decoder never panics, allocates only
///   what the payload backs, and what decodes as [`Shapes`] is canonical.
///
/// One encoding per message: no aliasing that could let two peers' bytes
/// mean the same thing differently to two parsers.
pub fn check_payload(payload: &Bytes) {
    match RequestHeader::parse(payload) {
        Ok(header) => {
            assert!(payload.len() >= REQUEST_HEADER_LEN);
            if header.kind == RequestKind::Call.tag() {
                let body = payload.slice(REQUEST_HEADER_LEN..);
                match encoding::decode_shared::<HubRequest>(&body) {
                    Ok(request) => {
                        let mut again = BytesMut::new();
                        encode_request(
                            &mut again,
                            header.id,
                            RequestKind::Call,
                            Some(&request),
                            payload.len(),
                        )
                        .unwrap_or_else(|e| panic!("{request:?} does not re-encode: {e}"));
                        assert_eq!(
                            &again[LENGTH_PREFIX_LEN..],
                            &payload[..],
                            "non-canonical {request:?}"
                        );
                        if let Some(under) = payload.len().checked_sub(1) {
                            let mut dst = BytesMut::from(&b"kept"[..]);
                            assert!(matches!(
                                encode_request(
                                    &mut dst,
                                    header.id,
                                    RequestKind::Call,
                                    Some(&request),
                                    under
                                ),
                                Err(FrameError::FrameTooLarge { .. })
                            ));
                            assert_eq!(&dst[..], b"kept", "a refused encode left bytes behind");
                        }
                    }
                    Err(err) => assert_trailing_prefix_decodes::<HubRequest>(&body, &err),
                }
            }
        }
        Err(DecodeError::TooShort { len, min, .. }) => {
            assert_eq!(len, payload.len());
            assert!(len < min);
        }
        Err(other) => panic!("a request header fails with {other:?}"),
    }
    if let Ok(frame) = DaemonFrame::decode(payload) {
        let mut again = BytesMut::new();
        frame
            .encode(&mut again)
            .unwrap_or_else(|e| panic!("{frame:?} does not re-encode: {e}"));
        assert_eq!(
            &again[LENGTH_PREFIX_LEN..],
            &payload[..],
            "non-canonical {frame:?}"
        );
        match &frame {
            DaemonFrame::Reply { body, .. } => assert_canonical::<HubReply>(body),
            DaemonFrame::Event { body, .. } => assert_canonical::<HubEvent>(body),
            _ => {}
        }
    }
    assert_canonical::<Shapes>(payload);
    let _ = encoding::decode::<BTreeMap<String, Vec<u8>>>(payload);
}

fn assert_trailing_prefix_decodes<T>(payload: &Bytes, err: &DecodeError)
where
    T: Serialize + DeserializeOwned + Debug,
{
    if let DecodeError::TrailingBytes { used, extra } = *err {
        assert!(extra > 0);
        assert_eq!(used + extra, payload.len());
        if let Err(err) = encoding::decode::<T>(&payload[..used]) {
            panic!("TrailingBytes, yet the first {used} bytes fail: {err}");
        }
        assert_canonical::<T>(&payload.slice(..used));
    }
}

/// If `payload` decodes as `T`, it encodes back to exactly `payload`.
fn assert_canonical<T: Serialize + DeserializeOwned + Debug>(payload: &Bytes) {
    if let Ok(message) = encoding::decode_shared::<T>(payload) {
        let again = encoding::encode(&message)
            .unwrap_or_else(|e| panic!("{message:?} does not re-encode: {e}"));
        assert_eq!(
            &again[..],
            &payload[..],
            "non-canonical encoding accepted: {message:?}"
        );
    }
}

/// Builds a whole frame from a payload-appending closure (seeds, tests).
fn frame_of(
    payload: impl FnOnce(&mut BytesMut) -> Result<(), crate::error::EncodeError>,
) -> Vec<u8> {
    let mut frame = BytesMut::new();
    match frame_into(&mut frame, MAX_FRAME_LEN, payload) {
        Ok(()) => frame.to_vec(),
        Err(err) => panic!("seed does not encode: {err}"),
    }
}

// ---------------------------------------------------------------------------
// session
// ---------------------------------------------------------------------------

pub mod session;

pub use session::session;

// ---------------------------------------------------------------------------
// subjects
// ---------------------------------------------------------------------------

pub mod subjects;

pub use subjects::subjects;

// ---------------------------------------------------------------------------
// seeds
// ---------------------------------------------------------------------------

/// The committed seed corpus, by target: `(file name, input)` pairs.
/// `examples/gen_fuzz_corpus.rs` writes them to `fuzz/corpus/<target>/`, and
/// `tests/fuzz_corpus.rs` checks that every one is committed unchanged.
pub mod seeds {
    use bytes::{BufMut, BytesMut};

    use super::{
        FUZZ_TOKEN, LIMIT_ABOVE_CEILING, LIMIT_DEFAULT, Shapes, frame_input, frame_of,
        preauth_input,
    };
    use crate::encoding::{self, Payload};
    use crate::handshake::HandshakeFrame;
    use crate::hub::{Failure, HubEvent, HubReply, HubRequest, HubStatus, Lag, Outcome, TopicList};
    use crate::limits::{HANDSHAKE_PAYLOAD_LEN, MAX_FRAME_LEN, MAX_TOPIC_LEN};
    use crate::token::SessionToken;
    use crate::transport::{
        CloseReason, DaemonFrame, ErrorCode, ErrorFrame, REQUEST_KINDS, RequestKind, TransportCode,
        Welcome, encode_call_fds, encode_request,
    };

    /// A named seed.
    pub type Seed = (String, Vec<u8>);

    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    fn request(id: u64, kind: RequestKind, body: Option<&HubRequest>) -> Vec<u8> {
        let mut frame = BytesMut::new();
        match encode_request(&mut frame, id, kind, body, MAX_FRAME_LEN) {
            Ok(()) => frame.to_vec(),
            Err(err) => panic!("seed does not encode: {err}"),
        }
    }

    fn daemon(frame: &DaemonFrame) -> Vec<u8> {
        let mut out = BytesMut::new();
        match frame.encode(&mut out) {
            Ok(()) => out.to_vec(),
            Err(err) => panic!("seed does not encode: {err}"),
        }
    }

    /// One request of every kind: the transport's, then the hub's in tag order.
    pub fn requests() -> Vec<(&'static str, Vec<u8>)> {
        let calls = [
            ("status", HubRequest::Status),
            (
                "subscribe",
                HubRequest::Subscribe {
                    sid: 1,
                    pattern: "news.*".into(),
                    lag: Lag::DropOldest,
                },
            ),
            ("unsubscribe", HubRequest::Unsubscribe { sid: 1 }),
            (
                "publish",
                HubRequest::Publish {
                    topic: "news".into(),
                    payload: Payload::from("hello"),
                },
            ),
            (
                "serve",
                HubRequest::Serve {
                    name: "svc.time".into(),
                },
            ),
            (
                "unserve",
                HubRequest::Unserve {
                    name: "svc.time".into(),
                },
            ),
            (
                "request",
                HubRequest::Request {
                    name: "svc.time".into(),
                    timeout_ms: 500,
                    payload: Payload::from("now?"),
                },
            ),
            (
                "respond",
                HubRequest::Respond {
                    token: 1,
                    payload: Payload::from("noon"),
                },
            ),
            (
                "fail",
                HubRequest::Fail {
                    token: 1,
                    failure: Failure::Failed {
                        message: "no clock".into(),
                    },
                },
            ),
            ("topics", HubRequest::Topics),
        ];
        let mut out = vec![
            ("ping", request(1, RequestKind::Ping, None)),
            ("shutdown", request(2, RequestKind::Shutdown, None)),
        ];
        for (i, (name, call)) in calls.iter().enumerate() {
            out.push((*name, request(i as u64 + 3, RequestKind::Call, Some(call))));
        }
        out.push(("accept-fds", request(13, RequestKind::AcceptFds, None)));
        let mut call_fds = BytesMut::new();
        let memfd = HubRequest::PublishMemfd {
            topic: "news".into(),
        };
        match encode_call_fds(&mut call_fds, 14, 1, &memfd, MAX_FRAME_LEN) {
            Ok(()) => out.push(("call-fds-publish-memfd", call_fds.to_vec())),
            Err(err) => panic!("seed does not encode: {err}"),
        }
        out
    }

    /// One daemon frame of every kind (Error once with and once without a
    /// request id, once with a service code, Closing with each reason).
    pub fn daemon_frames() -> Vec<(&'static str, Vec<u8>)> {
        let reply = |id, r: &HubReply| DaemonFrame::Reply {
            id,
            body: encoding::encode(r).unwrap_or_default(),
        };
        let frames = [
            (
                "welcome",
                DaemonFrame::Welcome(Welcome {
                    protocol_version: 2,
                    service: "hub".into(),
                    service_version: 2,
                    software_version: "0.1.0".into(),
                    instance_id: 0x1122_3344_5566_7788,
                    connection_id: 7,
                    max_frame_len: MAX_FRAME_LEN as u32,
                }),
            ),
            ("ack", DaemonFrame::Ack { id: 1 }),
            (
                "reply-status",
                reply(
                    3,
                    &HubReply::Status(HubStatus {
                        authenticated: 1,
                        pending: 0,
                        topics: 2,
                        subscriptions: 3,
                        names: 1,
                        requests_in_flight: 4,
                        uptime_ms: 1234,
                        version: "0.1.0".into(),
                    }),
                ),
            ),
            ("reply-subscribed", reply(4, &HubReply::Subscribed)),
            (
                "reply-published",
                reply(6, &HubReply::Published { receivers: 2 }),
            ),
            ("reply-requested", reply(7, &HubReply::Requested)),
            (
                "reply-responded",
                reply(8, &HubReply::Responded { delivered: true }),
            ),
            (
                "reply-topics",
                reply(
                    9,
                    &HubReply::Topics(TopicList {
                        patterns: vec![("news.*".into(), 2)],
                        names: vec![("svc.time".into(), 1)],
                        truncated: false,
                    }),
                ),
            ),
            (
                "event",
                DaemonFrame::Event {
                    stream: 1,
                    body: encoding::encode(&HubEvent::Message {
                        topic: "news".into(),
                        sequence: 1,
                        payload: Payload::from("hello"),
                    })
                    .unwrap_or_default(),
                },
            ),
            (
                "event-request",
                DaemonFrame::Event {
                    stream: 0,
                    body: encoding::encode(&HubEvent::Request {
                        token: 3,
                        name: "svc.time".into(),
                        uid: 1000,
                        pid: 4242,
                        payload: Payload::from("now?"),
                    })
                    .unwrap_or_default(),
                },
            ),
            (
                "event-response",
                DaemonFrame::Event {
                    stream: 0,
                    body: encoding::encode(&HubEvent::Response {
                        request: 7,
                        outcome: Outcome::Reply {
                            payload: Payload::from("noon"),
                        },
                    })
                    .unwrap_or_default(),
                },
            ),
            (
                "reply-fds",
                DaemonFrame::ReplyFds {
                    id: 14,
                    fds: 1,
                    body: encoding::encode(&HubReply::Published { receivers: 1 })
                        .unwrap_or_default(),
                },
            ),
            (
                "event-fds-message-memfd",
                DaemonFrame::EventFds {
                    stream: 1,
                    fds: 1,
                    body: encoding::encode(&HubEvent::MessageMemfd {
                        topic: "news".into(),
                        sequence: 2,
                        len: 1 << 20,
                    })
                    .unwrap_or_default(),
                },
            ),
            (
                "lagged",
                DaemonFrame::Lagged {
                    stream: 1,
                    missed: 12,
                },
            ),
            (
                "error-with-id",
                DaemonFrame::Error(ErrorFrame {
                    id: Some(4),
                    code: TransportCode::BadRequest.into(),
                    message: "not a request of service hub v1".into(),
                }),
            ),
            (
                "error-service",
                DaemonFrame::Error(ErrorFrame {
                    id: Some(5),
                    code: ErrorCode::Service(0),
                    message: "topic must be 1 to 255 bytes".into(),
                }),
            ),
            (
                "error-without-id",
                DaemonFrame::Error(ErrorFrame {
                    id: None,
                    code: TransportCode::BadToken.into(),
                    message: "token does not match".into(),
                }),
            ),
            (
                "closing-shutdown",
                DaemonFrame::Closing(CloseReason::Shutdown),
            ),
            (
                "closing-slow-consumer",
                DaemonFrame::Closing(CloseReason::SlowConsumer),
            ),
        ];
        frames.iter().map(|(n, f)| (*n, daemon(f))).collect()
    }

    /// Seeds of `preauth`.
    pub fn preauth() -> Vec<Seed> {
        let token = SessionToken::from_bytes(FUZZ_TOKEN);
        let good = HandshakeFrame::new(&token).to_vec();
        let mut seeds: Vec<Seed> = Vec::new();
        let mut add = |name: &str, plan: u8, wire: &[u8]| {
            seeds.push((name.to_string(), preauth_input(plan, wire)));
        };
        add("valid-handshake", 0, &good);
        add("valid-handshake-bytewise", 1, &good);
        add("valid-handshake-3-byte-reads", 3, &good);
        add("valid-handshake-random-reads", 0x8f, &good);
        let mut with_request = good.clone();
        with_request.extend(request(1, RequestKind::Ping, None));
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
        let mut ping_first = request(1, RequestKind::Ping, None);
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
        for version in [0u32, 1, 3, u32::MAX] {
            let wire = HandshakeFrame::with_version(version, &token).to_vec();
            add(&format!("version-{version}"), 0, &wire);
        }
        let mut first = good.clone();
        first[12] ^= 1;
        add("bad-token-first-byte", 0, &first);
        let mut last = good.clone();
        last[43] ^= 0x80;
        add("bad-token-last-byte", 1, &last);
        let zero_token = HandshakeFrame::new(&SessionToken::from_bytes([0; 32])).to_vec();
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
        for (name, wire) in requests() {
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
        let mut all_frames = Vec::new();
        for (name, wire) in daemon_frames() {
            all_frames.extend(&wire);
            add(format!("daemon-{name}"), LIMIT_DEFAULT, 0, &wire);
        }
        add("daemon-pipelined-random".into(), 4096, 0x87, &all_frames);
        let mut every_code = Vec::new();
        for code in TransportCode::ALL {
            every_code.extend(daemon(&DaemonFrame::Error(ErrorFrame {
                id: Some(u64::from(code.tag())),
                code: code.into(),
                message: String::new(),
            })));
        }
        add("daemon-error-every-code".into(), 4096, 0, &every_code);
        let shapes = Shapes::List(vec![
            Shapes::Unit,
            Shapes::Text("ünï".into(), Payload::from("x")),
            Shapes::Record {
                a: Some(7),
                b: true,
                c: '€',
                f: 1.5f64.to_bits(),
                v: vec![1, 2],
            },
        ]);
        let wire = frame_of(|dst| encoding::encode_into(&shapes, dst));
        add("shapes".into(), 4096, 0, &wire);

        let mut unknown = 9u64.to_le_bytes().to_vec();
        unknown.extend(REQUEST_KINDS.to_le_bytes());
        add(
            format!("request-unknown-kind-{REQUEST_KINDS}"),
            LIMIT_DEFAULT,
            0,
            &raw_frame(&unknown),
        );
        let mut unknown_call = 9u64.to_le_bytes().to_vec();
        unknown_call.extend(0u32.to_le_bytes());
        // One past the hub's last request tag (10, PublishMemfd).
        unknown_call.extend(11u32.to_le_bytes());
        add(
            "request-unknown-hub-tag".into(),
            1024,
            0,
            &raw_frame(&unknown_call),
        );
        let ping = request(1, RequestKind::Ping, None);
        let mut trailing = ping[4..].to_vec();
        trailing.push(0);
        add(
            "request-ping-with-body".into(),
            1024,
            0,
            &raw_frame(&trailing),
        );
        add("request-short".into(), 1024, 0, &raw_frame(&ping[4..11]));
        add("empty-frame".into(), 1024, 0, &raw_frame(&[]));
        let long = HubRequest::Subscribe {
            sid: 1,
            pattern: "t".repeat(MAX_TOPIC_LEN + 1),
            lag: Lag::Disconnect,
        };
        add(
            "request-long-topic".into(),
            1024,
            0,
            &request(2, RequestKind::Call, Some(&long)),
        );
        let publish = |topic: &str| HubRequest::Publish {
            topic: topic.into(),
            payload: Payload::new(),
        };
        let mut bad_utf8 = request(3, RequestKind::Call, Some(&publish("ab")));
        // The topic's last byte: before the payload's 8-byte length.
        let n = bad_utf8.len();
        bad_utf8[n - 9] = 0xff;
        add("request-topic-bad-utf8".into(), 1024, 0, &bad_utf8);
        let mut huge = request(4, RequestKind::Call, Some(&publish("a")));
        // The topic's length: after the prefix, the header and the tag.
        huge[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        add("request-topic-length-max".into(), 1024, 0, &huge);
        let mut bad_option = daemon(&DaemonFrame::Error(ErrorFrame {
            id: Some(1),
            code: TransportCode::Malformed.into(),
            message: String::new(),
        }));
        bad_option[8] = 2;
        add("daemon-error-option-tag-2".into(), 1024, 0, &bad_option);
        let mut huge_seq = BytesMut::new();
        huge_seq.put_u32_le(0);
        huge_seq.put_u32_le(2);
        huge_seq.put_u64_le(1 << 40);
        add(
            "shapes-list-length-huge".into(),
            1024,
            0,
            &raw_frame(&huge_seq[4..]),
        );

        let publish = request(
            6,
            RequestKind::Call,
            Some(&HubRequest::Publish {
                topic: "news".into(),
                payload: Payload::from("hello"),
            }),
        );
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

    /// Seeds of `subjects`: each operation is a byte (its kind in `% 3`, its
    /// key in the high bits) then a subject (a token count, then tokens by
    /// index into `a`, `b`, `ab`, `*`, `>`, empty).
    pub fn subjects() -> Vec<Seed> {
        const SUB: u8 = 0;
        const UNSUB: u8 = 1;
        const PUB: u8 = 2;
        // (op, tokens): the token count byte is len - 1.
        let script = |ops: &[(u8, &[u8])]| -> Vec<u8> {
            let mut out = Vec::new();
            for (op, tokens) in ops {
                out.push(*op);
                out.push(tokens.len() as u8 - 1);
                out.extend_from_slice(tokens);
            }
            out
        };
        vec![
            (
                "wildcards-then-publish".into(),
                script(&[
                    (SUB, &[0, 3]),
                    (SUB | 0x10, &[4]),
                    (SUB | 0x40, &[3, 1]),
                    (SUB | 0x50, &[0, 4]),
                    (PUB, &[0, 1]),
                    (PUB, &[0, 1, 2]),
                    (PUB, &[2]),
                ]),
            ),
            (
                "subscribe-unsubscribe-prune".into(),
                script(&[
                    (SUB, &[0, 3, 1]),
                    (SUB | 0x10, &[0, 3, 1]),
                    (UNSUB, &[0, 3, 1]),
                    (PUB, &[0, 2, 1]),
                    (UNSUB | 0x10, &[0, 3, 1]),
                    (PUB, &[0, 2, 1]),
                ]),
            ),
            (
                "invalid-subjects".into(),
                script(&[
                    (SUB, &[5]),
                    (SUB, &[4, 0]),
                    (PUB, &[3]),
                    (PUB, &[0, 5, 1]),
                    (UNSUB, &[4, 4]),
                ]),
            ),
        ]
    }
}
