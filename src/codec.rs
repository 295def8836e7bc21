//! Frames after the handshake: a `u32` little-endian length prefix, then that
//! many payload bytes holding one bincode-encoded message.
//!
//! [`FrameCodec`] is a tokio-util codec built like `LengthDelimitedCodec`: the
//! header is parsed once and the length kept across partial reads
//! ([`DecodeState`]), and the length is compared with the limit **before**
//! anything is reserved, so a peer cannot make it allocate by announcing a
//! large frame. The encoder enforces the same limit.
//!
//! The message functions ([`encode_message`], [`decode_server_message`],
//! [`decode_request`]) use bincode 2 with the fixed-int little-endian
//! configuration, a decode limit equal to the protocol frame ceiling, and
//! reject bytes left over after a message.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use crate::error::{FrameError, MalformedMessage, RequestError, UnknownRequest};
use crate::limits::{DEFAULT_MAX_FRAME_LEN, LENGTH_PREFIX_LEN, MAX_FRAME_LEN};
use crate::message::{Request, RequestBody, ServerMessage};

/// The bincode configuration of the wire: little-endian, fixed-width integers
/// (u32 enum tags, u64 lengths; byte-identical to bincode 1's `serialize`),
/// and a decode limit of one maximal frame.
pub type WireConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::Limit<MAX_FRAME_LEN>,
>;

/// The one configuration value of [`WireConfig`].
pub const WIRE_CONFIG: WireConfig = bincode::config::standard()
    .with_little_endian()
    .with_fixed_int_encoding()
    .with_limit::<MAX_FRAME_LEN>();

/// Where the decoder is within the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeState {
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

    /// The limit in force.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Where the decoder is (for tests and the fuzzers' invariants).
    pub fn state(&self) -> DecodeState {
        self.state
    }

    fn decode_head(&mut self, src: &mut BytesMut) -> Result<Option<usize>, FrameError> {
        if src.len() < LENGTH_PREFIX_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_len {
            return Err(FrameError::FrameTooLarge {
                len: len as u64,
                max: self.max_frame_len,
            });
        }
        src.advance(LENGTH_PREFIX_LEN);
        // Only now, with the length known to be within the limit, make room.
        src.reserve(len.saturating_sub(src.len()));
        Ok(Some(len))
    }
}

impl FrameCodec {
    /// The decoder without the copy: when a whole frame is buffered, returns
    /// its payload length `len`; the payload is then `src[..len]` (the prefix
    /// is already consumed) and the caller must `src.advance(len)` before the
    /// next call. The length is checked against the limit before any room is
    /// made, exactly as in [`Decoder::decode`], which is built on this.
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

impl Encoder<&Request> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, msg: &Request, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_message(msg, dst, self.max_frame_len)
    }
}

impl Encoder<&ServerMessage> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, msg: &ServerMessage, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_message(msg, dst, self.max_frame_len)
    }
}

/// Appends one whole frame (prefix + bincode payload) for `msg` to `dst`.
/// If the payload would exceed `max_frame_len`, `dst` is left as it was and
/// `FrameTooLarge` is returned.
pub fn encode_message<T: Serialize>(
    msg: &T,
    dst: &mut BytesMut,
    max_frame_len: usize,
) -> Result<(), FrameError> {
    let start = dst.len();
    dst.put_u32_le(0);
    let mut writer = dst.writer();
    if let Err(err) = bincode::serde::encode_into_std_write(msg, &mut writer, WIRE_CONFIG) {
        let dst = writer.into_inner();
        dst.truncate(start);
        return Err(FrameError::Encode(err.to_string()));
    }
    let dst = writer.into_inner();
    let len = dst.len() - start - LENGTH_PREFIX_LEN;
    if len > max_frame_len.min(MAX_FRAME_LEN) {
        dst.truncate(start);
        return Err(FrameError::FrameTooLarge {
            len: len as u64,
            max: max_frame_len.min(MAX_FRAME_LEN),
        });
    }
    dst[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// One whole frame for `msg` as shared bytes: how the hub encodes an event
/// once and hands the same bytes to every subscriber.
pub fn encode_frame<T: Serialize>(msg: &T, max_frame_len: usize) -> Result<Bytes, FrameError> {
    let mut buf = BytesMut::new();
    encode_message(msg, &mut buf, max_frame_len)?;
    Ok(buf.freeze())
}

/// The head of an `Event` frame (length prefix through the payload length)
/// for a payload of `payload_len` bytes that follows it on the wire as is.
/// Head then payload are byte for byte [`encode_frame`] of the same event:
/// the hub sends a large payload this way, without copying it. The layout
/// comes from the encoder (an empty payload); only the two lengths are
/// patched. `FrameTooLarge` if the whole frame would pass `max_frame_len`.
pub fn encode_event_head(
    topic: &str,
    sequence: u64,
    payload_len: usize,
    max_frame_len: usize,
) -> Result<Bytes, FrameError> {
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX_LEN + 28 + topic.len());
    encode_message(
        &ServerMessage::Event {
            topic: topic.to_owned(),
            sequence,
            payload: Bytes::new(),
        },
        &mut buf,
        MAX_FRAME_LEN,
    )?;
    let max = max_frame_len.min(MAX_FRAME_LEN);
    let len = (buf.len() - LENGTH_PREFIX_LEN).saturating_add(payload_len);
    if len > max {
        return Err(FrameError::FrameTooLarge {
            len: len as u64,
            max,
        });
    }
    // The empty payload's length is the last field of the encoding.
    let at = buf.len() - 8;
    buf[at..].copy_from_slice(&(payload_len as u64).to_le_bytes());
    buf[..LENGTH_PREFIX_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf.freeze())
}

/// Consecutive `Event` frames on `topic`, sequence numbers from
/// `first_sequence` up, one per payload, in one buffer: byte for byte the
/// concatenation of [`encode_frame`] of each event. The hub queues a run of
/// publishes this way, as one buffer per subscriber instead of one per
/// event. `FrameTooLarge` (and nothing encoded) if an event would pass
/// `max_frame_len`.
pub fn encode_events(
    topic: &str,
    first_sequence: u64,
    payloads: &[Bytes],
    max_frame_len: usize,
) -> Result<Bytes, FrameError> {
    // The encoder's head for this topic; sequence and payload length are
    // its last two fields (checked by `event_head_and_payload_are_the_encoded_event`).
    let head = encode_event_head(topic, 0, 0, MAX_FRAME_LEN)?;
    let h = head.len();
    let max = max_frame_len.min(MAX_FRAME_LEN);
    let mut total = 0usize;
    for p in payloads {
        let len = (h - LENGTH_PREFIX_LEN).saturating_add(p.len());
        if len > max {
            return Err(FrameError::FrameTooLarge {
                len: len as u64,
                max,
            });
        }
        total = total.saturating_add(LENGTH_PREFIX_LEN + len);
    }
    let mut buf = BytesMut::with_capacity(total);
    for (i, p) in payloads.iter().enumerate() {
        let at = buf.len();
        buf.extend_from_slice(&head);
        let len = (h - LENGTH_PREFIX_LEN + p.len()) as u32;
        buf[at..at + LENGTH_PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
        let sequence = first_sequence.wrapping_add(i as u64);
        buf[at + h - 16..at + h - 8].copy_from_slice(&sequence.to_le_bytes());
        buf[at + h - 8..at + h].copy_from_slice(&(p.len() as u64).to_le_bytes());
        buf.extend_from_slice(p);
    }
    Ok(buf.freeze())
}

/// Decodes exactly one message from a frame payload; leftover bytes are an error.
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<T, MalformedMessage> {
    // The borrowing decoder checks every length against the bytes present
    // before allocating (see `message::wire`).
    let (msg, used) = bincode::serde::borrow_decode_from_slice::<T, _>(payload, WIRE_CONFIG)
        .map_err(|err| MalformedMessage::Decode(err.to_string()))?;
    if used != payload.len() {
        return Err(MalformedMessage::TrailingBytes {
            used,
            extra: payload.len() - used,
        });
    }
    Ok(msg)
}

/// Decodes a daemon message (client side).
pub fn decode_server_message(payload: &[u8]) -> Result<ServerMessage, MalformedMessage> {
    decode_message(payload)
}

/// Decodes a request (daemon side). A well-formed id followed by a tag this
/// version does not know is [`RequestError::Unknown`] carrying the id, so the
/// daemon can answer it and keep the connection; anything else that does not
/// decode is [`RequestError::Malformed`].
pub fn decode_request(payload: &[u8]) -> Result<Request, RequestError> {
    if payload.len() < 12 {
        return Err(MalformedMessage::TooShort { len: payload.len() }.into());
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&payload[..8]);
    let mut tag = [0u8; 4];
    tag.copy_from_slice(&payload[8..12]);
    let (id, tag) = (u64::from_le_bytes(id), u32::from_le_bytes(tag));
    if tag >= RequestBody::TAG_COUNT {
        return Err(UnknownRequest { id, tag }.into());
    }
    Ok(decode_message(payload)?)
}

/// The `Publish` tag (section 6 of proto-spec.md).
const PUBLISH_TAG: u32 = 4;

/// [`decode_request`] for a payload held as [`Bytes`]: the payload of a
/// well-formed `Publish` is a slice of `frame`, not a copy. Anything else,
/// every malformed input included, goes through [`decode_request`], so the
/// result is always the same as `decode_request(&frame)`.
pub fn decode_request_shared(frame: &Bytes) -> Result<Request, RequestError> {
    match publish_in_place(frame) {
        Some(request) => Ok(request),
        None => decode_request(frame),
    }
}

/// A `Publish` laid out exactly as section 6 says (id, tag 4, topic length,
/// UTF-8 topic, payload length, payload, nothing after), or `None`.
fn publish_in_place(frame: &Bytes) -> Option<Request> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            frame.get(at..at.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let id = u64_at(0)?;
    if u32::from_le_bytes(frame.get(8..12)?.try_into().ok()?) != PUBLISH_TAG {
        return None;
    }
    let topic_end = 20usize.checked_add(usize::try_from(u64_at(12)?).ok()?)?;
    let topic = std::str::from_utf8(frame.get(20..topic_end)?).ok()?;
    let payload_len = usize::try_from(u64_at(topic_end)?).ok()?;
    let start = topic_end + 8;
    if frame.len().checked_sub(start)? != payload_len {
        return None;
    }
    Some(Request {
        id,
        body: RequestBody::Publish {
            topic: topic.to_owned(),
            payload: frame.slice(start..),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{CloseReason, ErrorCode, Status};
    use proptest::prelude::*;

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
        assert_eq!(codec.state(), DecodeState::Head);
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
        let msg = Request {
            id: 1,
            body: RequestBody::Publish {
                topic: "t".into(),
                payload: Bytes::from(vec![0u8; 2048]),
            },
        };
        let mut dst = BytesMut::from(&b"already here"[..]);
        let mut codec = FrameCodec::new(1024);
        assert!(matches!(
            codec.encode(&msg, &mut dst),
            Err(FrameError::FrameTooLarge { max: 1024, .. })
        ));
        assert_eq!(&dst[..], b"already here");
        assert!(matches!(
            codec.encode(Bytes::from(vec![0u8; 1025]), &mut dst),
            Err(FrameError::FrameTooLarge {
                len: 1025,
                max: 1024
            })
        ));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut dst = BytesMut::new();
        encode_message(
            &Request {
                id: 9,
                body: RequestBody::Ping,
            },
            &mut dst,
            1024,
        )
        .unwrap();
        let mut payload = dst.split_off(4).to_vec();
        payload.push(0);
        assert_eq!(
            decode_request(&payload),
            Err(RequestError::Malformed(MalformedMessage::TrailingBytes {
                used: 12,
                extra: 1
            }))
        );
    }

    #[test]
    fn unknown_request_tag_keeps_the_id() {
        let mut payload = 77u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&99u32.to_le_bytes());
        assert_eq!(
            decode_request(&payload),
            Err(RequestError::Unknown(UnknownRequest { id: 77, tag: 99 }))
        );
    }

    #[test]
    fn a_short_request_is_malformed() {
        assert_eq!(
            decode_request(&[1, 2, 3]),
            Err(RequestError::Malformed(MalformedMessage::TooShort {
                len: 3
            }))
        );
    }

    fn arb_topic() -> impl Strategy<Value = String> {
        "[a-z0-9./é]{1,40}"
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let body = prop_oneof![
            Just(RequestBody::Ping),
            Just(RequestBody::Status),
            Just(RequestBody::Shutdown),
            arb_topic().prop_map(|topic| RequestBody::Subscribe { topic }),
            arb_topic().prop_map(|topic| RequestBody::Unsubscribe { topic }),
            (arb_topic(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
                |(topic, payload)| RequestBody::Publish {
                    topic,
                    payload: payload.into()
                }
            ),
        ];
        (any::<u64>(), body).prop_map(|(id, body)| Request { id, body })
    }

    fn arb_server_message() -> impl Strategy<Value = ServerMessage> {
        prop_oneof![
            (any::<u32>(), "[ -~]{0,20}", any::<u64>(), any::<u32>()).prop_map(
                |(protocol_version, daemon_version, connection_id, max_frame_len)| {
                    ServerMessage::Welcome {
                        protocol_version,
                        daemon_version,
                        connection_id,
                        max_frame_len,
                    }
                }
            ),
            any::<u64>().prop_map(|id| ServerMessage::Pong { id }),
            any::<u64>().prop_map(|id| ServerMessage::Ack { id }),
            (any::<u64>(), any::<[u64; 5]>(), "[ -~]{0,20}").prop_map(|(id, n, version)| {
                ServerMessage::StatusReport {
                    id,
                    status: Status {
                        authenticated: n[0],
                        pending: n[1],
                        topics: n[2],
                        subscribers: n[3],
                        uptime_ms: n[4],
                        version,
                    },
                }
            }),
            (
                arb_topic(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(topic, sequence, payload)| ServerMessage::Event {
                    topic,
                    sequence,
                    payload: payload.into()
                }),
            (any::<Option<u64>>(), 0..ErrorCode::ALL.len(), "[ -~]{0,40}").prop_map(
                |(id, code, message)| ServerMessage::Error {
                    id,
                    code: ErrorCode::ALL[code],
                    message
                }
            ),
            prop_oneof![Just(CloseReason::Shutdown), Just(CloseReason::SlowConsumer)]
                .prop_map(|reason| ServerMessage::Closing { reason }),
        ]
    }

    #[test]
    fn event_head_and_payload_are_the_encoded_event() {
        for len in [0usize, 1, 5, 70_000] {
            let payload = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>());
            let whole = encode_frame(
                &ServerMessage::Event {
                    topic: "news".into(),
                    sequence: 9,
                    payload: payload.clone(),
                },
                MAX_FRAME_LEN,
            )
            .unwrap();
            let head = encode_event_head("news", 9, len, MAX_FRAME_LEN).unwrap();
            assert_eq!(
                [&head[..], &payload[..]].concat(),
                &whole[..],
                "payload of {len}"
            );
        }
        assert!(matches!(
            encode_event_head("news", 1, 2000, 1024),
            Err(FrameError::FrameTooLarge { max: 1024, .. })
        ));
    }

    #[test]
    fn a_run_of_events_is_the_encoded_events_one_after_another() {
        let payloads: Vec<Bytes> = [&b""[..], b"a", b"hello", &[9u8; 300][..]]
            .iter()
            .map(|p| Bytes::copy_from_slice(p))
            .collect();
        for topic in ["t", "news", &"x".repeat(255)] {
            let run = encode_events(topic, 41, &payloads, MAX_FRAME_LEN).unwrap();
            let mut want = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                let one = encode_frame(
                    &ServerMessage::Event {
                        topic: topic.into(),
                        sequence: 41 + i as u64,
                        payload: p.clone(),
                    },
                    MAX_FRAME_LEN,
                )
                .unwrap();
                want.extend_from_slice(&one);
            }
            assert_eq!(&run[..], &want[..], "topic of {} bytes", topic.len());
        }
        assert!(
            encode_events("t", 1, &[], MAX_FRAME_LEN)
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            encode_events("t", 1, &[Bytes::new(), Bytes::from(vec![0u8; 1100])], 1024),
            Err(FrameError::FrameTooLarge { max: 1024, .. })
        ));
    }

    #[test]
    fn publish_tag_is_the_encoders() {
        let mut buf = BytesMut::new();
        encode_message(
            &Request {
                id: 1,
                body: RequestBody::Publish {
                    topic: "t".into(),
                    payload: Bytes::new(),
                },
            },
            &mut buf,
            MAX_FRAME_LEN,
        )
        .unwrap();
        assert_eq!(buf[12..16], PUBLISH_TAG.to_le_bytes());
    }

    proptest! {
        #[test]
        fn shared_decode_agrees_with_decode_request(
            req in arb_request(),
            cut in 0usize..400,
            flip in proptest::option::of((0usize..400, any::<u8>())),
        ) {
            let mut buf = BytesMut::new();
            encode_message(&req, &mut buf, MAX_FRAME_LEN).unwrap();
            let mut payload = buf.split_off(LENGTH_PREFIX_LEN).to_vec();
            if let Some((at, x)) = flip {
                if at < payload.len() {
                    payload[at] ^= x;
                }
            }
            if cut < payload.len() && cut % 3 == 0 {
                payload.truncate(cut);
            } else if cut % 7 == 0 {
                payload.push(0);
            }
            let frame = Bytes::from(payload);
            prop_assert_eq!(decode_request_shared(&frame), decode_request(&frame));
        }

        #[test]
        fn every_request_round_trips(req in arb_request()) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            codec.encode(&req, &mut buf).unwrap();
            let payload = codec.decode(&mut buf).unwrap().unwrap();
            prop_assert!(buf.is_empty());
            prop_assert_eq!(decode_request(&payload).unwrap(), req);
        }

        #[test]
        fn every_server_message_round_trips(msg in arb_server_message()) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            codec.encode(&msg, &mut buf).unwrap();
            let payload = codec.decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(decode_server_message(&payload).unwrap(), msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic_nor_overbuffer(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32),
            limit in 0usize..512,
        ) {
            let mut codec = FrameCodec::new(limit);
            let mut buf = BytesMut::new();
            'outer: for chunk in chunks {
                buf.extend_from_slice(&chunk);
                loop {
                    let cap_before = buf.capacity();
                    let result = codec.decode(&mut buf);
                    // The decoder never makes room beyond one frame within the limit.
                    prop_assert!(buf.capacity() <= cap_before.max(buf.len() + limit + LENGTH_PREFIX_LEN));
                    match result {
                        Ok(Some(frame)) => {
                            prop_assert!(frame.len() <= limit);
                            let _ = decode_request(&frame);
                            let _ = decode_server_message(&frame);
                        }
                        Ok(None) => break,
                        Err(FrameError::FrameTooLarge { len, .. }) => {
                            prop_assert!(len as usize > limit);
                            prop_assert_eq!(buf.capacity(), cap_before);
                            break 'outer;
                        }
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
            }
        }
    }
}
