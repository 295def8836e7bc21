//! Protocol version 2's transport: the frames every keyhole service speaks,
//! whatever its own messages are (sections 6 to 8 of proto-spec.md).
//!
//! A client frame is a fixed 12-byte header (request id, request kind)
//! followed, for a `Call`, by the service's request message. A daemon frame
//! is a `u32` tag and its fields; `Reply` and `Event` end with the service's
//! reply or event message. A service's message is the rest of the frame: it
//! has no length of its own, the frame's length bounds it.
//!
//! `Ping` and `Shutdown` are transport requests that any keyhole daemon
//! answers (with `Ack`), so `keyhole ping` is a health check of any of them.
//! Error codes below [`SERVICE_CODE_BASE`] are the transport's
//! ([`TransportCode`]); from it up they are the service's own.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::encoding::{self, Encoded};
use crate::error::{DecodeError, EncodeError, FrameError};
use crate::fds::Descriptors;
use crate::limits::{LENGTH_PREFIX_LEN, MAX_ERROR_MESSAGE_LEN, MAX_FRAME_LEN};

/// Protocol version carried in the handshake and in `Welcome`.
pub const PROTOCOL_VERSION: u32 = 2;

/// Error codes from this value up belong to the service: the wire code of a
/// service's own code `n` is `SERVICE_CODE_BASE + n`.
pub const SERVICE_CODE_BASE: u32 = 1000;

/// Request kinds this version defines: tags 0 to `REQUEST_KINDS - 1`; a
/// frame of any other kind is answered `Error UnknownRequest`.
pub const REQUEST_KINDS: u32 = 6;

/// Bytes of a client frame's header: id (`u64`) and kind (`u32`).
pub const REQUEST_HEADER_LEN: usize = 12;

/// What a client frame asks. Tags: Call 0, Ping 1, Shutdown 2, Expect 3,
/// AcceptFds 4, CallFds 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// A request of the service; its message follows the header.
    Call,
    /// Answered with `Ack` by every keyhole daemon.
    Ping,
    /// Asks the daemon to shut down gracefully; answered with `Ack`, or
    /// `NotPermitted` unless the peer runs as the daemon's own uid.
    Shutdown,
    /// The service (name and version) the client's next requests are
    /// written for: answered with `Ack` when the daemon serves it, else
    /// with `Error WrongService`, and the connection closes before any
    /// request after it is read. What makes a `Call` pipelined behind the
    /// handshake safe: it never reaches another service.
    Expect,
    /// Opts this connection in to file descriptors (section 19 of
    /// proto-spec.md): answered with `Ack`; from then on the daemon reads
    /// the connection's ancillary data and may send it frames carrying
    /// descriptors. No body.
    AcceptFds,
    /// A request of the service that carries descriptors: after the header,
    /// a `u32` count of them, then the service's request message. The
    /// descriptors travel as `SCM_RIGHTS` with the frame's first byte.
    CallFds,
}

impl RequestKind {
    /// The wire tag.
    pub fn tag(self) -> u32 {
        match self {
            RequestKind::Call => 0,
            RequestKind::Ping => 1,
            RequestKind::Shutdown => 2,
            RequestKind::Expect => 3,
            RequestKind::AcceptFds => 4,
            RequestKind::CallFds => 5,
        }
    }

    /// The kind of a tag, if this version defines it.
    pub fn from_tag(tag: u32) -> Option<Self> {
        match tag {
            0 => Some(RequestKind::Call),
            1 => Some(RequestKind::Ping),
            2 => Some(RequestKind::Shutdown),
            3 => Some(RequestKind::Expect),
            4 => Some(RequestKind::AcceptFds),
            5 => Some(RequestKind::CallFds),
            _ => None,
        }
    }
}

/// A client frame's header, as the daemon reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Chosen by the client, echoed in the reply.
    pub id: u64,
    /// The kind tag as sent (possibly unknown to this version).
    pub kind: u32,
}

impl RequestHeader {
    /// The header of a request payload; the body is `payload[REQUEST_HEADER_LEN..]`.
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let Some(header) = payload.get(..REQUEST_HEADER_LEN) else {
            return Err(DecodeError::TooShort {
                what: "request frame",
                len: payload.len(),
                min: REQUEST_HEADER_LEN,
            });
        };
        let mut id = [0u8; 8];
        id.copy_from_slice(&header[..8]);
        let mut kind = [0u8; 4];
        kind.copy_from_slice(&header[8..]);
        Ok(Self {
            id: u64::from_le_bytes(id),
            kind: u32::from_le_bytes(kind),
        })
    }
}

/// Transport error codes (tags below [`SERVICE_CODE_BASE`]). Which side
/// sends each and when is in section 8 of proto-spec.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TransportCode {
    /// 0: the first frame's length prefix is not the handshake's 40 (closes).
    HandshakeExpected,
    /// 1: handshake magic is not `KYHL` (closes).
    BadMagic,
    /// 2: handshake protocol version not supported (closes).
    UnsupportedVersion,
    /// 3: handshake token is not the session token (closes).
    BadToken,
    /// 4: no complete handshake within the deadline (closes).
    AuthTimeout,
    /// 5: the peer's uid may not use this daemon (closes).
    PeerNotAllowed,
    /// 6: evicted to make room for a new unauthenticated connection (closes).
    TooManyUnauthenticated,
    /// 7: the daemon's connection cap is reached (closes).
    TooManyConnections,
    /// 8: a frame's length prefix is over the limit (closes).
    FrameTooLarge,
    /// 9: a frame is too short to hold a request header (closes).
    Malformed,
    /// 10: request kind unknown to this daemon (carries the id; stays open).
    UnknownRequest,
    /// 11: the request's body is not a request of this service (carries the
    /// id; stays open).
    BadRequest,
    /// 12: request not permitted to this peer (carries the id; stays open).
    NotPermitted,
    /// 13: the daemon is shutting down; sent to pending connections (closes).
    ShuttingDown,
    /// 14: the service failed while handling the request (carries the id;
    /// stays open).
    Internal,
    /// 15: the daemon's memory budget is exhausted and this connection held
    /// the most of it (closes).
    OverBudget,
    /// 16: an `Expect` names a service (or version) other than the one the
    /// daemon serves (closes; no request after it is read).
    WrongService,
    /// 17: a `CallFds` on a connection that has not sent `AcceptFds` (its
    /// descriptors were closed unread; carries the id; stays open).
    DescriptorsNotAccepted,
    /// 18: descriptors arrived with no frame announcing them, or a frame
    /// announced descriptors that did not arrive with it (closes).
    DescriptorMismatch,
    /// 19: more descriptors than a frame or a connection may carry, or
    /// ancillary data the daemon could not take whole (closes).
    TooManyDescriptors,
}

impl TransportCode {
    /// Every code, in tag order.
    pub const ALL: [TransportCode; 20] = [
        TransportCode::HandshakeExpected,
        TransportCode::BadMagic,
        TransportCode::UnsupportedVersion,
        TransportCode::BadToken,
        TransportCode::AuthTimeout,
        TransportCode::PeerNotAllowed,
        TransportCode::TooManyUnauthenticated,
        TransportCode::TooManyConnections,
        TransportCode::FrameTooLarge,
        TransportCode::Malformed,
        TransportCode::UnknownRequest,
        TransportCode::BadRequest,
        TransportCode::NotPermitted,
        TransportCode::ShuttingDown,
        TransportCode::Internal,
        TransportCode::OverBudget,
        TransportCode::WrongService,
        TransportCode::DescriptorsNotAccepted,
        TransportCode::DescriptorMismatch,
        TransportCode::TooManyDescriptors,
    ];

    /// The wire tag.
    pub fn tag(self) -> u32 {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0) as u32
    }

    /// The code of a tag, if this version defines it.
    pub fn from_tag(tag: u32) -> Option<Self> {
        Self::ALL.get(tag as usize).copied()
    }

    /// Whether the daemon closes the connection after sending this code.
    pub fn closes_connection(self) -> bool {
        !matches!(
            self,
            TransportCode::UnknownRequest
                | TransportCode::BadRequest
                | TransportCode::NotPermitted
                | TransportCode::Internal
                | TransportCode::DescriptorsNotAccepted
        )
    }
}

/// An error code as carried by an `Error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A transport code (below [`SERVICE_CODE_BASE`]).
    Transport(TransportCode),
    /// A service's own code (the wire code minus [`SERVICE_CODE_BASE`]).
    Service(u32),
}

impl ErrorCode {
    /// The `u32` on the wire.
    pub fn wire(self) -> u32 {
        match self {
            ErrorCode::Transport(code) => code.tag(),
            ErrorCode::Service(code) => SERVICE_CODE_BASE.saturating_add(code),
        }
    }

    /// The code of a wire value.
    pub fn from_wire(value: u32) -> Result<Self, DecodeError> {
        if value >= SERVICE_CODE_BASE {
            return Ok(ErrorCode::Service(value - SERVICE_CODE_BASE));
        }
        TransportCode::from_tag(value)
            .map(ErrorCode::Transport)
            .ok_or(DecodeError::UnknownTag {
                what: "transport error code",
                tag: value,
            })
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.wire())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = u32::deserialize(d)?;
        ErrorCode::from_wire(value).map_err(serde::de::Error::custom)
    }
}

impl From<TransportCode> for ErrorCode {
    fn from(code: TransportCode) -> Self {
        ErrorCode::Transport(code)
    }
}

/// Why the daemon sends `Closing`. Tags: Shutdown 0, SlowConsumer 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloseReason {
    /// The daemon is shutting down (signal or `Shutdown` request).
    Shutdown,
    /// This connection did not read its events fast enough; its queue hit
    /// the bound and it is disconnected rather than silently skipped.
    SlowConsumer,
}

/// The first frame after a valid handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version spoken on this connection.
    pub protocol_version: u32,
    /// The name of the service the daemon serves (`hub` for keyholed).
    pub service: String,
    /// The version of that service's messages.
    pub service_version: u32,
    /// The daemon's software version (informational).
    pub software_version: String,
    /// Drawn at every daemon start: a client that sees a new one after a
    /// reconnect knows the daemon restarted.
    pub instance_id: u64,
    /// Id of this connection in the daemon's logs.
    pub connection_id: u64,
    /// Largest frame payload the daemon accepts or sends on this connection.
    pub max_frame_len: u32,
}

/// An `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The request this answers; `None` for errors about the connection.
    pub id: Option<u64>,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable text written by the daemon (at most 512 bytes).
    pub message: String,
}

/// A daemon frame as a client receives it. `Reply` and `Event` bodies are
/// the service's messages, still encoded (slices of the received frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonFrame {
    /// Tag 0.
    Welcome(Welcome),
    /// Tag 1: the reply to the `Call` with this id.
    Reply {
        /// The request's id.
        id: u64,
        /// The service's reply message.
        body: Bytes,
    },
    /// Tag 2: an event pushed by the service.
    Event {
        /// The stream the event belongs to (the service's numbering of a
        /// connection's event streams, for the hub a subscription); 0: none.
        stream: u64,
        /// The service's event message.
        body: Bytes,
    },
    /// Tag 3: the reply to a `Ping` or `Shutdown`.
    Ack {
        /// The request's id.
        id: u64,
    },
    /// Tag 4.
    Error(ErrorFrame),
    /// Tag 5: the daemon closes the connection; nothing follows.
    Closing(CloseReason),
    /// Tag 6: events of `stream` were dropped from this connection's queue
    /// (the stream's lag policy is to drop the oldest): `missed` of them,
    /// just before the next event of the stream.
    Lagged {
        /// The stream.
        stream: u64,
        /// Events dropped since the stream's last event or notice.
        missed: u64,
    },
    /// Tag 7: the reply to the `Call` (or `CallFds`) with this id, carrying
    /// `fds` descriptors (section 19). Sent only after `AcceptFds`.
    ReplyFds {
        /// The request's id.
        id: u64,
        /// Descriptors that came with the frame's first byte.
        fds: u32,
        /// The service's reply message.
        body: Bytes,
    },
    /// Tag 8: an event carrying `fds` descriptors (section 19). Sent only
    /// after `AcceptFds`.
    EventFds {
        /// As for `Event`.
        stream: u64,
        /// Descriptors that came with the frame's first byte.
        fds: u32,
        /// The service's event message.
        body: Bytes,
    },
}

/// Daemon frame tags.
pub mod tag {
    /// `Welcome`.
    pub const WELCOME: u32 = 0;
    /// `Reply`.
    pub const REPLY: u32 = 1;
    /// `Event`.
    pub const EVENT: u32 = 2;
    /// `Ack`.
    pub const ACK: u32 = 3;
    /// `Error`.
    pub const ERROR: u32 = 4;
    /// `Closing`.
    pub const CLOSING: u32 = 5;
    /// `Lagged`.
    pub const LAGGED: u32 = 6;
    /// `ReplyFds`.
    pub const REPLY_FDS: u32 = 7;
    /// `EventFds`.
    pub const EVENT_FDS: u32 = 8;
}

/// Where an `Event` frame's stream id sits, from the start of the frame
/// (after its length prefix and tag).
pub(crate) const EVENT_STREAM_AT: usize = LENGTH_PREFIX_LEN + 4;

/// Bytes of an `Event` frame before the service's event message: prefix,
/// tag, stream.
pub const EVENT_HEADER_LEN: usize = EVENT_STREAM_AT + 8;

impl DaemonFrame {
    /// Decodes a daemon frame's payload (client side). Strict: unknown tags,
    /// codes and reasons, and bytes left over, are errors.
    pub fn decode(payload: &Bytes) -> Result<Self, DecodeError> {
        let Some(head) = payload.get(..4) else {
            return Err(DecodeError::TooShort {
                what: "daemon frame",
                len: payload.len(),
                min: 4,
            });
        };
        let tag = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let rest = &payload[4..];
        let u64_then_body = || -> Result<(u64, Bytes), DecodeError> {
            let Some(id) = rest.get(..8) else {
                return Err(DecodeError::UnexpectedEnd {
                    needed: 8,
                    left: rest.len(),
                });
            };
            let mut raw = [0u8; 8];
            raw.copy_from_slice(id);
            Ok((u64::from_le_bytes(raw), payload.slice(12..)))
        };
        let with_count = || -> Result<(u64, u32, Bytes), DecodeError> {
            let Some(head) = rest.get(..12) else {
                return Err(DecodeError::UnexpectedEnd {
                    needed: 12,
                    left: rest.len(),
                });
            };
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&head[..8]);
            let mut count = [0u8; 4];
            count.copy_from_slice(&head[8..]);
            Ok((
                u64::from_le_bytes(raw),
                u32::from_le_bytes(count),
                payload.slice(16..),
            ))
        };
        Ok(match tag {
            tag::WELCOME => DaemonFrame::Welcome(encoding::decode(rest)?),
            tag::REPLY => {
                let (id, body) = u64_then_body()?;
                DaemonFrame::Reply { id, body }
            }
            tag::EVENT => {
                let (stream, body) = u64_then_body()?;
                DaemonFrame::Event { stream, body }
            }
            tag::ACK => DaemonFrame::Ack {
                id: encoding::decode(rest)?,
            },
            tag::ERROR => DaemonFrame::Error(encoding::decode(rest)?),
            tag::CLOSING => DaemonFrame::Closing(encoding::decode(rest)?),
            tag::LAGGED => {
                let (stream, missed) = encoding::decode::<(u64, u64)>(rest)?;
                DaemonFrame::Lagged { stream, missed }
            }
            tag::REPLY_FDS => {
                let (id, fds, body) = with_count()?;
                DaemonFrame::ReplyFds { id, fds, body }
            }
            tag::EVENT_FDS => {
                let (stream, fds, body) = with_count()?;
                DaemonFrame::EventFds { stream, fds, body }
            }
            other => {
                return Err(DecodeError::UnknownTag {
                    what: "daemon frame",
                    tag: other,
                });
            }
        })
    }
}

impl DaemonFrame {
    /// Appends this frame, prefix included: byte for byte what the daemon
    /// sends ([`Self::decode`] of it gives it back).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            DaemonFrame::Welcome(welcome) => encode_welcome(dst, welcome),
            DaemonFrame::Reply { id, body } => frame_into(dst, MAX_FRAME_LEN, |dst| {
                dst.put_u32_le(tag::REPLY);
                dst.put_u64_le(*id);
                dst.put_slice(body);
                Ok(())
            }),
            DaemonFrame::Event { stream, body } => frame_into(dst, MAX_FRAME_LEN, |dst| {
                dst.put_u32_le(tag::EVENT);
                dst.put_u64_le(*stream);
                dst.put_slice(body);
                Ok(())
            }),
            DaemonFrame::Ack { id } => {
                encode_ack(dst, *id);
                Ok(())
            }
            DaemonFrame::Error(error) => frame_into(dst, MAX_FRAME_LEN, |dst| {
                dst.put_u32_le(tag::ERROR);
                encoding::encode_into(error, dst)
            }),
            DaemonFrame::Closing(reason) => {
                encode_closing(dst, *reason);
                Ok(())
            }
            DaemonFrame::Lagged { stream, missed } => {
                encode_lagged(dst, *stream, *missed);
                Ok(())
            }
            DaemonFrame::ReplyFds { id, fds, body } => frame_into(dst, MAX_FRAME_LEN, |dst| {
                dst.put_u32_le(tag::REPLY_FDS);
                dst.put_u64_le(*id);
                dst.put_u32_le(*fds);
                dst.put_slice(body);
                Ok(())
            }),
            DaemonFrame::EventFds { stream, fds, body } => frame_into(dst, MAX_FRAME_LEN, |dst| {
                dst.put_u32_le(tag::EVENT_FDS);
                dst.put_u64_le(*stream);
                dst.put_u32_le(*fds);
                dst.put_slice(body);
                Ok(())
            }),
        }
    }
}

/// Appends one whole frame to `dst`: a placeholder prefix, what `payload`
/// appends, then the real prefix. If `payload` fails or the payload passes
/// `max_frame_len`, `dst` is left as it was.
pub fn frame_into(
    dst: &mut BytesMut,
    max_frame_len: usize,
    payload: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), FrameError> {
    let start = dst.len();
    dst.put_u32_le(0);
    if let Err(err) = payload(dst) {
        dst.truncate(start);
        return Err(FrameError::Encode(err));
    }
    let len = dst.len() - start - LENGTH_PREFIX_LEN;
    let max = max_frame_len.min(MAX_FRAME_LEN);
    if len > max {
        dst.truncate(start);
        return Err(FrameError::FrameTooLarge {
            len: len as u64,
            max,
        });
    }
    dst[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Appends a client frame: header, then (for a `Call`) the service's request.
pub fn encode_request<R: Serialize + ?Sized>(
    dst: &mut BytesMut,
    id: u64,
    kind: RequestKind,
    body: Option<&R>,
    max_frame_len: usize,
) -> Result<(), FrameError> {
    frame_into(dst, max_frame_len, |dst| {
        dst.put_u64_le(id);
        dst.put_u32_le(kind.tag());
        match body {
            Some(body) => encoding::encode_into(body, dst),
            None => Ok(()),
        }
    })
}

/// Appends a `Welcome` frame.
pub fn encode_welcome(dst: &mut BytesMut, welcome: &Welcome) -> Result<(), FrameError> {
    frame_into(dst, MAX_FRAME_LEN, |dst| {
        dst.put_u32_le(tag::WELCOME);
        encoding::encode_into(welcome, dst)
    })
}

/// A server's `Welcome` frame, encoded once: its connections' frames differ
/// only in the connection id, written into a copy (encoding it afresh cost
/// ~800 instructions a connection, two `String`s among them).
#[derive(Debug, Clone)]
pub(crate) struct WelcomeFrame {
    /// The whole frame with connection id 0, or why it cannot be encoded.
    frame: Result<Bytes, String>,
}

/// Where the connection id is in a `Welcome` frame, from its end: the id
/// (`u64`) and `max_frame_len` (`u32`) are its last fields (section 7).
const WELCOME_ID_FROM_END: usize = 8 + 4;

impl WelcomeFrame {
    pub(crate) fn new(welcome: &Welcome) -> Self {
        let template = Welcome {
            connection_id: 0,
            ..welcome.clone()
        };
        let mut frame = BytesMut::new();
        let frame = match encode_welcome(&mut frame, &template) {
            Ok(()) => Ok(frame.freeze()),
            Err(err) => Err(err.to_string()),
        };
        Self { frame }
    }

    /// Appends the frame for connection `connection_id`.
    pub(crate) fn encode(&self, dst: &mut BytesMut, connection_id: u64) -> Result<(), &str> {
        let frame = self.frame.as_ref().map_err(String::as_str)?;
        let at = dst.len() + frame.len() - WELCOME_ID_FROM_END;
        dst.extend_from_slice(frame);
        dst[at..at + 8].copy_from_slice(&connection_id.to_le_bytes());
        Ok(())
    }
}

/// Appends a `Reply` frame carrying the service's `reply`.
pub fn encode_reply<R: Serialize + ?Sized>(
    dst: &mut BytesMut,
    id: u64,
    reply: &R,
    max_frame_len: usize,
) -> Result<(), FrameError> {
    frame_into(dst, max_frame_len, |dst| {
        dst.put_u32_le(tag::REPLY);
        dst.put_u64_le(id);
        encoding::encode_into(reply, dst)
    })
}

/// Appends a `ReplyFds` frame carrying the service's `reply`, announcing
/// `fds` descriptors (which the caller sends with the frame's first byte).
pub fn encode_reply_fds<R: Serialize + ?Sized>(
    dst: &mut BytesMut,
    id: u64,
    fds: u32,
    reply: &R,
    max_frame_len: usize,
) -> Result<(), FrameError> {
    frame_into(dst, max_frame_len, |dst| {
        dst.put_u32_le(tag::REPLY_FDS);
        dst.put_u64_le(id);
        dst.put_u32_le(fds);
        encoding::encode_into(reply, dst)
    })
}

/// Appends a client `CallFds` frame: header, the count of descriptors (sent
/// with the frame's first byte by the caller), the service's request.
pub fn encode_call_fds<R: Serialize + ?Sized>(
    dst: &mut BytesMut,
    id: u64,
    fds: u32,
    body: &R,
    max_frame_len: usize,
) -> Result<(), FrameError> {
    frame_into(dst, max_frame_len, |dst| {
        dst.put_u64_le(id);
        dst.put_u32_le(RequestKind::CallFds.tag());
        dst.put_u32_le(fds);
        encoding::encode_into(body, dst)
    })
}

/// Appends an `Ack` frame.
pub fn encode_ack(dst: &mut BytesMut, id: u64) {
    // One copy of the whole frame (each `put_*` checks the room again).
    let mut frame = [0u8; 16];
    frame[..4].copy_from_slice(&12u32.to_le_bytes());
    frame[4..8].copy_from_slice(&tag::ACK.to_le_bytes());
    frame[8..].copy_from_slice(&id.to_le_bytes());
    dst.extend_from_slice(&frame);
}

/// Appends an `Error` frame; a message over [`MAX_ERROR_MESSAGE_LEN`] bytes
/// is cut at a character boundary.
pub fn encode_error(dst: &mut BytesMut, id: Option<u64>, code: ErrorCode, message: &str) {
    let mut cut = message.len().min(MAX_ERROR_MESSAGE_LEN);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message[..cut];
    let len = 4 + 1 + if id.is_some() { 8 } else { 0 } + 4 + 8 + message.len();
    dst.reserve(LENGTH_PREFIX_LEN + len);
    dst.put_u32_le(len as u32);
    dst.put_u32_le(tag::ERROR);
    match id {
        Some(id) => {
            dst.put_u8(1);
            dst.put_u64_le(id);
        }
        None => dst.put_u8(0),
    }
    dst.put_u32_le(code.wire());
    dst.put_u64_le(message.len() as u64);
    dst.put_slice(message.as_bytes());
}

/// Appends a `Lagged` frame.
pub fn encode_lagged(dst: &mut BytesMut, stream: u64, missed: u64) {
    dst.reserve(24);
    dst.put_u32_le(20);
    dst.put_u32_le(tag::LAGGED);
    dst.put_u64_le(stream);
    dst.put_u64_le(missed);
}

/// Appends a `Closing` frame.
pub fn encode_closing(dst: &mut BytesMut, reason: CloseReason) {
    dst.reserve(12);
    dst.put_u32_le(8);
    dst.put_u32_le(tag::CLOSING);
    dst.put_u32_le(match reason {
        CloseReason::Shutdown => 0,
        CloseReason::SlowConsumer => 1,
    });
}

/// One encoded `Event` frame (or several, back to back), as queued for a
/// connection: `head`, then `shared` (a large payload, not copied), then
/// `tail`. Cheap to clone: encode an event once and queue the same bytes for
/// every connection it goes to. Each frame's stream id is left 0 here and
/// written as the frame is queued for a connection, with the stream it goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent {
    pub(crate) head: Bytes,
    pub(crate) shared: Bytes,
    pub(crate) tail: Bytes,
    /// Where in `head` each frame's stream id goes.
    pub(crate) streams: StreamOffsets,
    /// The descriptors of an `EventFds` frame.
    pub(crate) fds: Option<Descriptors>,
}

impl Default for EncodedEvent {
    fn default() -> Self {
        Self {
            head: Bytes::new(),
            shared: Bytes::new(),
            tail: Bytes::new(),
            streams: StreamOffsets::One(EVENT_STREAM_AT as u32),
            fds: None,
        }
    }
}

/// The offsets in an [`EncodedEvent`]'s head of its frames' stream ids: one
/// frame (the common case, no allocation), or a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamOffsets {
    One(u32),
    Many(std::sync::Arc<[u32]>),
}

impl StreamOffsets {
    pub(crate) fn as_slice(&self) -> &[u32] {
        match self {
            StreamOffsets::One(at) => std::slice::from_ref(at),
            StreamOffsets::Many(all) => all,
        }
    }
}

impl EncodedEvent {
    /// Encodes `event` as one `Event` frame; a [`crate::Payload`] of at least
    /// [`crate::encoding::SHARE_MIN`] bytes in it is shared, not copied.
    /// `FrameTooLarge` if the frame would pass `max_frame_len`.
    pub fn new<E: Serialize + ?Sized>(event: &E, max_frame_len: usize) -> Result<Self, FrameError> {
        // Room for a small event at once: grown from empty, the buffer was
        // reallocated three or four times per event.
        let mut out = Encoded {
            head: BytesMut::with_capacity(256),
            ..Encoded::default()
        };
        out.head.put_u32_le(0);
        out.head.put_u32_le(tag::EVENT);
        out.head.put_u64_le(0);
        encoding::encode_sharing(event, &mut out).map_err(FrameError::Encode)?;
        let len = out.len() - LENGTH_PREFIX_LEN;
        let max = max_frame_len.min(MAX_FRAME_LEN);
        if len > max {
            return Err(FrameError::FrameTooLarge {
                len: len as u64,
                max,
            });
        }
        out.head[..LENGTH_PREFIX_LEN].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(Self {
            head: out.head.freeze(),
            shared: out.shared,
            tail: out.tail.freeze(),
            streams: StreamOffsets::One(EVENT_STREAM_AT as u32),
            fds: None,
        })
    }

    /// Encodes `event` as one `EventFds` frame carrying `fds` (at least one,
    /// at most [`crate::limits::MAX_FDS_PER_FRAME`]); for connections that
    /// accept descriptors ([`crate::server::Connection::accepts_fds`]).
    pub fn with_fds<E: Serialize + ?Sized>(
        event: &E,
        fds: Descriptors,
        max_frame_len: usize,
    ) -> Result<Self, FrameError> {
        let count = fds.len();
        if count == 0 || count > crate::limits::MAX_FDS_PER_FRAME {
            return Err(FrameError::Encode(EncodeError(format!(
                "an EventFds frame carries 1 to {} descriptors, not {count}",
                crate::limits::MAX_FDS_PER_FRAME
            ))));
        }
        let mut head = BytesMut::with_capacity(64);
        frame_into(&mut head, max_frame_len, |dst| {
            dst.put_u32_le(tag::EVENT_FDS);
            dst.put_u64_le(0);
            dst.put_u32_le(count as u32);
            encoding::encode_into(event, dst)
        })?;
        Ok(Self {
            head: head.freeze(),
            shared: Bytes::new(),
            tail: Bytes::new(),
            streams: StreamOffsets::One(EVENT_STREAM_AT as u32),
            fds: Some(fds),
        })
    }

    /// The descriptors it carries (an `EventFds` frame).
    pub fn fds(&self) -> Option<&Descriptors> {
        self.fds.as_ref()
    }

    /// Frames in it.
    pub fn frames(&self) -> usize {
        self.streams.as_slice().len()
    }

    /// The offsets in the head where each frame's stream id is written.
    pub(crate) fn stream_at(&self) -> &[u32] {
        self.streams.as_slice()
    }

    /// This event with every frame's stream id set to `stream` (a copy of
    /// the head; the shared part stays shared).
    pub(crate) fn for_stream(&self, stream: u64) -> Self {
        if stream == 0 {
            return self.clone();
        }
        let mut head = BytesMut::from(&self.head[..]);
        stamp(&mut head, 0, self.stream_at(), stream);
        Self {
            head: head.freeze(),
            ..self.clone()
        }
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.shared.len() + self.tail.len()
    }

    /// Whether nothing is left (of a partly written frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the first `n` bytes (after a partial write).
    pub(crate) fn advance(&mut self, n: usize) {
        let mut n = n;
        for part in [&mut self.head, &mut self.shared, &mut self.tail] {
            let from = n.min(part.len());
            part.advance(from);
            n -= from;
        }
    }

    /// The bytes when nothing is shared (one contiguous buffer).
    pub(crate) fn is_contiguous(&self) -> bool {
        self.shared.is_empty() && self.tail.is_empty()
    }

    /// All bytes, copied into one buffer (tests, and small frames).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.shared);
        out.extend_from_slice(&self.tail);
        out
    }
}

/// Several small `Event` frames gathered into one buffer, to be queued as
/// one [`EncodedEvent`]: how a run of publishes reaches each subscriber as
/// one buffer rather than one queue entry per event.
#[derive(Debug, Default)]
pub struct EventBatch {
    buf: BytesMut,
    streams: Vec<u32>,
}

/// Writes `stream` at each of `offsets` (relative to `base`) in `buf`.
pub(crate) fn stamp(buf: &mut [u8], base: usize, offsets: &[u32], stream: u64) {
    for &at in offsets {
        let at = base + at as usize;
        if let Some(slot) = buf.get_mut(at..at + 8) {
            slot.copy_from_slice(&stream.to_le_bytes());
        }
    }
}

impl EventBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `bytes` of frames.
    pub fn with_capacity(bytes: usize) -> Self {
        Self::with_capacity_for(bytes, 0)
    }

    /// An empty batch with room for `frames` frames of `bytes` in all.
    pub fn with_capacity_for(bytes: usize, frames: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(bytes),
            streams: Vec::with_capacity(frames),
        }
    }

    /// Appends one `Event` frame whose body (the service's event message)
    /// `body` writes into the buffer it is given: for a service that encodes
    /// many similar events itself (the hub patches a sequence number and a
    /// length into one encoded head per run). The frame's prefix and tag are
    /// the batch's; the body must be a valid encoding of the service's event,
    /// or its clients will refuse it. `FrameTooLarge` (and nothing appended)
    /// if the frame would pass `max_frame_len`.
    pub fn push_with(
        &mut self,
        max_frame_len: usize,
        body: impl FnOnce(&mut BytesMut),
    ) -> Result<(), FrameError> {
        let start = self.buf.len();
        frame_into(&mut self.buf, max_frame_len, |dst| {
            dst.put_u32_le(tag::EVENT);
            dst.put_u64_le(0);
            body(dst);
            Ok(())
        })?;
        self.streams.push((start + EVENT_STREAM_AT) as u32);
        Ok(())
    }

    /// Appends `event` as one `Event` frame (copied, never shared).
    pub fn push<E: Serialize + ?Sized>(
        &mut self,
        event: &E,
        max_frame_len: usize,
    ) -> Result<(), FrameError> {
        let start = self.buf.len();
        frame_into(&mut self.buf, max_frame_len, |dst| {
            dst.put_u32_le(tag::EVENT);
            dst.put_u64_le(0);
            encoding::encode_into(event, dst)
        })?;
        self.streams.push((start + EVENT_STREAM_AT) as u32);
        Ok(())
    }

    /// Frames gathered.
    pub fn frames(&self) -> usize {
        self.streams.len()
    }

    /// Lets `body` rewrite each frame's body in place (it is given the
    /// frame's index, from 0, and the body after the frame's header): for a
    /// service that encodes its events before it knows all of them, such as
    /// the hub, which numbers a run of publishes only under its lock. A
    /// body keeps its length; what is written must still be a valid
    /// encoding of the service's event.
    pub fn each_body_mut(&mut self, mut body: impl FnMut(usize, &mut [u8])) {
        let ends = self
            .streams
            .iter()
            .skip(1)
            .map(|&at| at as usize - EVENT_STREAM_AT)
            .chain(std::iter::once(self.buf.len()));
        for (i, (&at, end)) in self.streams.iter().zip(ends).enumerate() {
            let start = at as usize + 8;
            if let Some(frame) = self.buf.get_mut(start..end) {
                body(i, frame);
            }
        }
    }

    /// Whether no frame was gathered.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The frames, back to back. A buffer more than half empty (made room
    /// for more frames than came) is first copied into one of its length:
    /// a queued event is accounted by its length and may be held for as
    /// long as its slowest connection takes.
    pub fn finish(self) -> EncodedEvent {
        let head = if self.buf.capacity() > 2 * self.buf.len() {
            Bytes::copy_from_slice(&self.buf)
        } else {
            self.buf.freeze()
        };
        EncodedEvent {
            head,
            shared: Bytes::new(),
            tail: Bytes::new(),
            streams: match self.streams[..] {
                [one] => StreamOffsets::One(one),
                _ => StreamOffsets::Many(self.streams.into()),
            },
            fds: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Payload;

    #[test]
    fn every_transport_code_round_trips_and_service_codes_start_at_1000() {
        for (i, code) in TransportCode::ALL.iter().enumerate() {
            assert_eq!(code.tag(), i as u32);
            assert_eq!(
                ErrorCode::from_wire(i as u32),
                Ok(ErrorCode::Transport(*code))
            );
        }
        assert!(ErrorCode::from_wire(TransportCode::ALL.len() as u32).is_err());
        assert!(ErrorCode::from_wire(999).is_err());
        assert_eq!(ErrorCode::from_wire(1000), Ok(ErrorCode::Service(0)));
        assert_eq!(ErrorCode::Service(7).wire(), 1007);
    }

    #[test]
    fn a_welcome_frame_encoded_once_is_each_connections_welcome() {
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            service: "a service".into(),
            service_version: 3,
            software_version: "9.8.7".into(),
            instance_id: 0x0102_0304_0506_0708,
            connection_id: 0,
            max_frame_len: 1 << 20,
        };
        let once = WelcomeFrame::new(&welcome);
        for id in [1, 0x1122_3344_5566_7788, u64::MAX] {
            let mut patched = BytesMut::from(&b"before"[..]);
            once.encode(&mut patched, id).unwrap();
            let mut fresh = BytesMut::from(&b"before"[..]);
            let each = Welcome {
                connection_id: id,
                ..welcome.clone()
            };
            encode_welcome(&mut fresh, &each).unwrap();
            assert_eq!(patched, fresh, "connection {id}");
        }
    }

    #[test]
    fn hand_written_frames_are_their_serde_encodings() {
        let mut a = BytesMut::new();
        encode_error(&mut a, Some(9), TransportCode::BadRequest.into(), "no");
        let mut b = BytesMut::new();
        frame_into(&mut b, MAX_FRAME_LEN, |dst| {
            dst.put_u32_le(tag::ERROR);
            encoding::encode_into(
                &ErrorFrame {
                    id: Some(9),
                    code: TransportCode::BadRequest.into(),
                    message: "no".into(),
                },
                dst,
            )
        })
        .unwrap();
        assert_eq!(a, b);
        let frame = a.split_off(4).freeze();
        assert!(matches!(
            DaemonFrame::decode(&frame),
            Ok(DaemonFrame::Error(ErrorFrame { id: Some(9), .. }))
        ));
        let mut c = BytesMut::new();
        encode_closing(&mut c, CloseReason::SlowConsumer);
        assert_eq!(
            DaemonFrame::decode(&c.split_off(4).freeze()),
            Ok(DaemonFrame::Closing(CloseReason::SlowConsumer))
        );
        let mut d = BytesMut::new();
        encode_ack(&mut d, 77);
        assert_eq!(
            DaemonFrame::decode(&d.split_off(4).freeze()),
            Ok(DaemonFrame::Ack { id: 77 })
        );
    }

    #[test]
    fn an_error_message_is_cut_at_a_character_boundary() {
        let mut buf = BytesMut::new();
        let long = "é".repeat(MAX_ERROR_MESSAGE_LEN);
        encode_error(&mut buf, None, TransportCode::Malformed.into(), &long);
        match DaemonFrame::decode(&buf.split_off(4).freeze()) {
            Ok(DaemonFrame::Error(e)) => {
                assert!(e.message.len() <= MAX_ERROR_MESSAGE_LEN);
                assert_eq!(e.message.len() % 2, 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_batch_body_rewritten_in_place_equals_the_event_encoded_with_it() {
        #[derive(Serialize)]
        struct Ev {
            n: u64,
            payload: Payload,
        }
        let mut batch = EventBatch::with_capacity(4096);
        let sizes = [0usize, 3, 100];
        for len in sizes {
            let ev = Ev {
                n: 0,
                payload: vec![7u8; len].into(),
            };
            batch.push(&ev, MAX_FRAME_LEN).unwrap();
        }
        batch.each_body_mut(|i, body| body[..8].copy_from_slice(&(40 + i as u64).to_le_bytes()));
        let mut want = EventBatch::new();
        for (i, len) in sizes.into_iter().enumerate() {
            let ev = Ev {
                n: 40 + i as u64,
                payload: vec![7u8; len].into(),
            };
            want.push(&ev, MAX_FRAME_LEN).unwrap();
        }
        let got = batch.finish();
        assert_eq!(got.to_vec(), want.finish().to_vec());
        // Each body kept its length.
        assert_eq!(got.len(), 3 * EVENT_HEADER_LEN + 3 * 16 + 103);
    }

    #[test]
    fn an_event_with_a_large_payload_shares_it_and_equals_the_plain_encoding() {
        #[derive(Serialize)]
        struct Ev {
            topic: String,
            payload: Payload,
        }
        let big = Bytes::from(vec![1u8; 70_000]);
        let ev = Ev {
            topic: "t".into(),
            payload: big.clone().into(),
        };
        let enc = EncodedEvent::new(&ev, MAX_FRAME_LEN).unwrap();
        assert_eq!(enc.shared.as_ptr(), big.as_ptr());
        let mut batch = EventBatch::new();
        batch.push(&ev, MAX_FRAME_LEN).unwrap();
        assert_eq!(enc.to_vec(), batch.finish().to_vec());
        assert!(matches!(
            EncodedEvent::new(&ev, 1024),
            Err(FrameError::FrameTooLarge { max: 1024, .. })
        ));
    }
}
