//! The messages exchanged after the handshake: what a client asks
//! ([`Request`]) and everything the daemon sends ([`ServerMessage`]).
//!
//! They are plain serde types encoded with bincode in the fixed-int,
//! little-endian configuration (see [`crate::codec`]); `proto-spec.md` gives
//! their byte layout independently of the bincode crate. **The order of
//! variants is the wire format**: a variant's position is its `u32` tag, so
//! new variants go at the end and none is ever removed or reordered.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Protocol version carried in the handshake and in `Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A client's request: a client-chosen id and what it asks. The daemon echoes
/// the id in the reply; replies to pipelined requests come in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the reply; the daemon does not
    /// interpret it (duplicates are allowed).
    pub id: u64,
    /// What is asked.
    pub body: RequestBody,
}

/// What a client may ask. Tags: Ping 0, Status 1, Subscribe 2,
/// Unsubscribe 3, Publish 4, Shutdown 5.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Answered with `Pong`.
    Ping,
    /// Answered with `StatusReport`.
    Status,
    /// Start receiving `Event`s for `topic`; answered with `Ack`.
    Subscribe {
        /// UTF-8, 1 to [`crate::limits::MAX_TOPIC_LEN`] bytes.
        #[serde(deserialize_with = "wire::string")]
        topic: String,
    },
    /// Stop receiving `Event`s for `topic`; answered with `Ack`.
    Unsubscribe {
        /// UTF-8, 1 to [`crate::limits::MAX_TOPIC_LEN`] bytes.
        #[serde(deserialize_with = "wire::string")]
        topic: String,
    },
    /// Queue `payload` for every current subscriber of `topic`; answered with
    /// `Ack` once it is queued for all of them.
    Publish {
        /// UTF-8, 1 to [`crate::limits::MAX_TOPIC_LEN`] bytes.
        #[serde(deserialize_with = "wire::string")]
        topic: String,
        /// Opaque bytes.
        #[serde(deserialize_with = "wire::bytes")]
        payload: Bytes,
    },
    /// Ask the daemon to shut down gracefully (peer must run as the daemon's
    /// own uid); answered with `Ack`, then `Closing{Shutdown}`.
    Shutdown,
}

impl RequestBody {
    /// Number of request tags this version knows; a tag at or above it is
    /// answered with `Error UnknownRequest` and the connection stays open.
    pub const TAG_COUNT: u32 = 6;
}

/// Everything the daemon sends after the handshake. Tags: Welcome 0, Pong 1,
/// StatusReport 2, Ack 3, Event 4, Error 5, Closing 6.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// The first frame after a valid handshake; nothing else precedes it.
    Welcome {
        /// The protocol version the daemon speaks on this connection.
        protocol_version: u32,
        /// The daemon's software version (`CARGO_PKG_VERSION`).
        #[serde(deserialize_with = "wire::string")]
        daemon_version: String,
        /// Id of this connection in the daemon's logs.
        connection_id: u64,
        /// Largest frame payload the daemon accepts or sends.
        max_frame_len: u32,
    },
    /// Reply to `Ping`.
    Pong {
        /// The request's id.
        id: u64,
    },
    /// Reply to `Status`.
    StatusReport {
        /// The request's id.
        id: u64,
        /// The figures.
        status: Status,
    },
    /// Reply to `Subscribe`, `Unsubscribe`, `Publish` and `Shutdown`.
    Ack {
        /// The request's id.
        id: u64,
    },
    /// A message published on a topic this connection subscribes to.
    Event {
        /// The topic.
        #[serde(deserialize_with = "wire::string")]
        topic: String,
        /// Per-topic, +1 for each event published on the topic; contiguous
        /// for a subscriber for as long as it stays subscribed.
        sequence: u64,
        /// The publisher's bytes, unchanged.
        #[serde(deserialize_with = "wire::bytes")]
        payload: Bytes,
    },
    /// A request failed, or (no id) the connection is refused or closed.
    Error {
        /// The request this answers; `None` for connection-level errors.
        id: Option<u64>,
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable text written by the daemon.
        #[serde(deserialize_with = "wire::string")]
        message: String,
    },
    /// The daemon is closing this connection; no frame follows.
    Closing {
        /// Why.
        reason: CloseReason,
    },
}

/// Figures of `StatusReport`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Connections that completed the handshake and are open.
    pub authenticated: u64,
    /// Connections that have not completed the handshake yet.
    pub pending: u64,
    /// Topics with at least one subscriber.
    pub topics: u64,
    /// Subscriptions over all topics.
    pub subscribers: u64,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// The daemon's software version.
    #[serde(deserialize_with = "wire::string")]
    pub version: String,
}

/// Error codes, by tag. Which side sends each and when is in proto-spec.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
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
    /// 9: a frame is not a decodable request (closes).
    Malformed,
    /// 10: request tag unknown to this daemon (carries the id; stays open).
    UnknownRequest,
    /// 11: empty or over-long topic (carries the id; stays open).
    InvalidTopic,
    /// 12: request not permitted to this peer (carries the id; stays open).
    NotPermitted,
    /// 13: the daemon is shutting down; sent to pending connections (closes).
    ShuttingDown,
}

impl ErrorCode {
    /// Every code, in tag order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::HandshakeExpected,
        ErrorCode::BadMagic,
        ErrorCode::UnsupportedVersion,
        ErrorCode::BadToken,
        ErrorCode::AuthTimeout,
        ErrorCode::PeerNotAllowed,
        ErrorCode::TooManyUnauthenticated,
        ErrorCode::TooManyConnections,
        ErrorCode::FrameTooLarge,
        ErrorCode::Malformed,
        ErrorCode::UnknownRequest,
        ErrorCode::InvalidTopic,
        ErrorCode::NotPermitted,
        ErrorCode::ShuttingDown,
    ];

    /// The wire tag.
    pub fn tag(self) -> u32 {
        self as u32
    }

    /// Whether the daemon closes the connection after sending this code.
    pub fn closes_connection(self) -> bool {
        !matches!(
            self,
            ErrorCode::UnknownRequest | ErrorCode::InvalidTopic | ErrorCode::NotPermitted
        )
    }
}

/// Why the daemon sends `Closing`. Tags: Shutdown 0, SlowConsumer 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloseReason {
    /// The daemon is shutting down (signal or `Shutdown` request).
    Shutdown,
    /// This subscriber did not read its events fast enough; its queue hit
    /// the bound and it is disconnected rather than silently skipped.
    SlowConsumer,
}

/// Whether a topic name is acceptable: 1 to `MAX_TOPIC_LEN` bytes.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= crate::limits::MAX_TOPIC_LEN
}

/// Deserializers for the variable-length fields. They ask for borrowed data
/// (`deserialize_str` / `deserialize_bytes`), so with bincode's borrowing
/// decoder a length prefix is checked against the bytes actually present
/// **before** anything is allocated, and only what is present is copied. (The
/// owned path would allocate the announced length first: a 20-byte frame
/// could make the daemon allocate 16 MiB.)
mod wire {
    use std::fmt;

    use bytes::Bytes;
    use serde::Deserializer;
    use serde::de::{Error, Visitor};

    struct StrVisitor;

    impl Visitor<'_> for StrVisitor {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a UTF-8 string")
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte array")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        // Self-describing formats (JSON test vectors) give a list of numbers.
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(Bytes::from(out))
        }
    }

    pub(super) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_str(StrVisitor)
    }

    pub(super) fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        d.deserialize_bytes(BytesVisitor)
    }
}
