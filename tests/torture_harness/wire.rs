//! Raw async connections for the harness (bytes in, frames and verdicts out)
//! and the self-checking payload every valid publish carries. Also used by
//! `tests/faults.rs`, which needs only part of it.
#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyhole::encoding;
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::HubReply;
use keyhole::token::SessionToken;
use keyhole::transport::{DaemonFrame, ErrorCode, ErrorFrame, PROTOCOL_VERSION, Welcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

// Not every user of this file needs all of them (`tests/faults.rs`).
#[allow(unused_imports)]
pub use crate::common::{Msg, Req, publish, subscribe};

/// One raw connection, with the times the verdicts are measured from.
pub struct Conn {
    pub stream: UnixStream,
    /// When `connect` was called: before the daemon can have accepted the
    /// connection (the floor of the timing checks of a refusal).
    pub connect_started: Instant,
    /// When `connect` returned (a task of a busy attacker may see it late:
    /// what a close is bounded from).
    pub connected_at: Instant,
    /// When the last byte was handed to the kernel (`connected_at` if none).
    pub last_write: Instant,
    /// Bytes read but not yet consumed as frames.
    buf: Vec<u8>,
}

/// How reading to the end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The daemon closed the connection (EOF, or a reset after its data).
    Closed,
    /// Nothing more arrived before the deadline: the connection is open.
    Open,
}

/// Everything the daemon sent until it closed (or the deadline).
#[derive(Debug)]
pub struct Tail {
    pub bytes: Vec<u8>,
    pub end: End,
    /// When the EOF (or the deadline) was seen.
    pub at: Instant,
}

impl Conn {
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let started = Instant::now();
        let stream = UnixStream::connect(path).await?;
        Ok(Self::from_stream(stream, started, Instant::now()))
    }

    /// A connection made elsewhere (by another process, say): `connect`
    /// called at `started`, returned at `connected_at`.
    pub fn from_stream(stream: UnixStream, started: Instant, connected_at: Instant) -> Self {
        Self {
            stream,
            connect_started: started,
            connected_at,
            last_write: connected_at,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.last_write = Instant::now();
        Ok(())
    }

    /// Shuts down the sending side (the daemon reads EOF); counts as the
    /// last byte.
    pub async fn half_close(&mut self) {
        let _ = self.stream.shutdown().await;
        self.last_write = Instant::now();
    }

    /// Sends the handshake and expects `Welcome` within `limit`.
    pub async fn authenticate(
        &mut self,
        token: &SessionToken,
        limit: Duration,
    ) -> Result<(), String> {
        self.authenticate_welcome(token, limit).await.map(|_| ())
    }

    /// [`Self::authenticate`], returning the `Welcome`.
    pub async fn authenticate_welcome(
        &mut self,
        token: &SessionToken,
        limit: Duration,
    ) -> Result<Welcome, String> {
        self.send(&HandshakeFrame::new(token))
            .await
            .map_err(|e| format!("handshake write: {e}"))?;
        match self.read_msg(Instant::now() + limit).await? {
            Msg::Welcome(welcome) if welcome.protocol_version == PROTOCOL_VERSION => Ok(welcome),
            Msg::Welcome(welcome) => Err(format!(
                "Welcome with protocol version {}, expected {PROTOCOL_VERSION}",
                welcome.protocol_version
            )),
            other => Err(format!("expected Welcome, got {}", describe(&other))),
        }
    }

    /// Reads one frame's payload. Errors say what happened instead.
    pub async fn read_frame(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if len > keyhole::limits::MAX_FRAME_LEN {
                    return Err(format!("daemon sent a length prefix of {len}"));
                }
                if self.buf.len() >= 4 + len {
                    let payload = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    return Ok(payload);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline.into(), self.stream.read(&mut chunk));
            match read.await {
                Err(_) => return Err("timed out waiting for a frame".into()),
                Ok(Ok(0)) => {
                    return Err(format!(
                        "connection closed ({} bytes of a partial frame)",
                        self.buf.len()
                    ));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(format!("read failed: {e}")),
            }
        }
    }

    pub async fn read_msg(&mut self, deadline: Instant) -> Result<Msg, String> {
        let frame = self.read_frame(deadline).await?;
        decode(&frame)
    }

    /// Reads until the daemon closes or `deadline`; with `quiet`, also
    /// stops (as `Open`) once nothing has arrived for that long.
    pub async fn read_to_end(&mut self, deadline: Instant, quiet: Option<Duration>) -> Tail {
        let mut bytes = std::mem::take(&mut self.buf);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let until = match quiet {
                Some(q) => deadline.min(Instant::now() + q),
                None => deadline,
            };
            match tokio::time::timeout_at(until.into(), self.stream.read(&mut chunk)).await {
                Err(_) => {
                    return Tail {
                        bytes,
                        end: End::Open,
                        at: Instant::now(),
                    };
                }
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return Tail {
                        bytes,
                        end: End::Closed,
                        at: Instant::now(),
                    };
                }
                Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// A request frame.
pub fn request(id: u64, req: Req) -> Vec<u8> {
    crate::common::request_bytes(id, req)
}

/// Decodes a daemon frame's payload, the hub's bodies included; unlike
/// [`Msg::decode`], an undecodable frame is an error, not a panic (an
/// attacker process reports it as a violation).
pub fn decode(payload: &[u8]) -> Result<Msg, String> {
    let payload = Bytes::copy_from_slice(payload);
    let frame = DaemonFrame::decode(&payload).map_err(|e| format!("undecodable frame: {e}"))?;
    Ok(match frame {
        DaemonFrame::Welcome(w) => Msg::Welcome(w),
        DaemonFrame::Ack { id } => Msg::Ack(id),
        DaemonFrame::Reply { id, body } => Msg::Reply(
            id,
            encoding::decode(&body).map_err(|e| format!("Reply {id}: not a hub reply: {e}"))?,
        ),
        DaemonFrame::Event { stream, body } => Msg::Event(
            stream,
            encoding::decode(&body).map_err(|e| format!("Event: not a hub event: {e}"))?,
        ),
        DaemonFrame::Lagged { stream, missed } => Msg::Lagged { stream, missed },
        DaemonFrame::Error(ErrorFrame { id, code, message }) => Msg::Error { id, code, message },
        DaemonFrame::Closing(reason) => Msg::Closing(reason),
        // No attacker sends AcceptFds: a frame with descriptors is a breach.
        DaemonFrame::ReplyFds { .. } | DaemonFrame::EventFds { .. } => {
            return Err("a frame with descriptors to a connection that never accepted them".into());
        }
    })
}

/// Splits bytes into frames; the second item is a partial frame left over.
pub fn split_frames(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 4 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if bytes.len() - at - 4 < len {
            break;
        }
        frames.push(&bytes[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    (frames, bytes.len() - at)
}

/// The name of an error code: `BadToken` for a transport code, `Service N`
/// for a service's own.
pub fn code_name(code: ErrorCode) -> String {
    match code {
        ErrorCode::Transport(code) => format!("{code:?}"),
        ErrorCode::Service(code) => format!("Service {code}"),
    }
}

/// A short name for a daemon message (for verdicts and errors).
pub fn describe(msg: &Msg) -> String {
    match msg {
        Msg::Welcome(_) => "Welcome".into(),
        Msg::Ack(_) => "Ack".into(),
        Msg::Reply(_, reply) => match reply {
            HubReply::Status(_) => "Reply Status".into(),
            HubReply::Subscribed => "Reply Subscribed".into(),
            HubReply::Unsubscribed => "Reply Unsubscribed".into(),
            HubReply::Published { .. } => "Reply Published".into(),
            other => format!("Reply {other:?}"),
        },
        Msg::Event(..) => "Event".into(),
        Msg::Lagged { .. } => "Lagged".into(),
        Msg::Error { id: None, code, .. } => format!("Error {}", code_name(*code)),
        Msg::Error {
            id: Some(_), code, ..
        } => format!("Error {} (with id)", code_name(*code)),
        Msg::Closing(reason) => format!("Closing {reason:?}"),
    }
}

/// The verdict on what a pre-auth connection received: exactly one `Error`
/// without an id, then EOF, is `Ok("Error Code")`; anything else is `Err`.
pub fn preauth_verdict(tail: &Tail) -> Result<String, String> {
    let (frames, partial) = split_frames(&tail.bytes);
    if tail.end == End::Open {
        return Err(format!(
            "NOT CLOSED by the deadline ({} frames received)",
            frames.len()
        ));
    }
    if partial != 0 {
        return Err(format!("{partial} bytes of a partial frame before EOF"));
    }
    match frames.as_slice() {
        [] => Err("EOF without an Error frame".into()),
        [one] => match decode(one) {
            Ok(Msg::Error { id: None, code, .. }) => Ok(format!("Error {}", code_name(code))),
            Ok(other) => Err(format!("pre-auth peer was sent {}", describe(&other))),
            Err(e) => Err(e),
        },
        more => Err(format!(
            "pre-auth peer was sent {} frames, not one Error",
            more.len()
        )),
    }
}

// ---------------------------------------------------------------------------
// Self-checking payloads.

const MAGIC: u32 = u32::from_le_bytes(*b"TRTR");
const HEADER: usize = 4 + 4 + 8 + 8 + 4;

/// What a payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub counter: u64,
    /// Microseconds since the process epoch when it was published.
    pub sent_us: u64,
}

/// splitmix64: the body bytes and lengths are a function of (publisher,
/// counter), so a receiver can regenerate and compare them.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a, the payloads' checksum.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn body_len(seed: u64) -> usize {
    // Mostly 0..2 KiB; one in 64 is 32 KiB, so frames span many reads.
    if seed % 64 == 0 {
        32 * 1024
    } else {
        (seed >> 8) as usize % 2048
    }
}

fn fill_body(seed: u64, out: &mut Vec<u8>, len: usize) {
    let mut state = seed;
    while out.len() < HEADER + len {
        state = mix(state);
        let take = (HEADER + len - out.len()).min(8);
        out.extend_from_slice(&state.to_le_bytes()[..take]);
    }
}

fn seed_of(publisher: u32, counter: u64) -> u64 {
    mix((u64::from(publisher) << 40) ^ counter)
}

/// header (magic, publisher, counter, sent_us, body length), body, then an
/// FNV-1a checksum of everything before it.
pub fn make_payload(stamp: Stamp) -> Vec<u8> {
    let seed = seed_of(stamp.publisher, stamp.counter);
    let len = body_len(seed);
    let mut out = Vec::with_capacity(HEADER + len + 8);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&stamp.publisher.to_le_bytes());
    out.extend_from_slice(&stamp.counter.to_le_bytes());
    out.extend_from_slice(&stamp.sent_us.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    fill_body(seed, &mut out, len);
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Checks the checksum, the length and the regenerated body.
pub fn check_payload(bytes: &[u8]) -> Result<Stamp, String> {
    if bytes.len() < HEADER + 8 {
        return Err(format!("payload of {} bytes is too short", bytes.len()));
    }
    let (data, sum) = bytes.split_at(bytes.len() - 8);
    if fnv1a(data) != u64::from_le_bytes(sum.try_into().unwrap()) {
        return Err("payload checksum mismatch".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    if u32_at(0) != MAGIC {
        return Err("payload magic mismatch".into());
    }
    let stamp = Stamp {
        publisher: u32_at(4),
        counter: u64_at(8),
        sent_us: u64_at(16),
    };
    let len = u32_at(24) as usize;
    let seed = seed_of(stamp.publisher, stamp.counter);
    if len != body_len(seed) || data.len() != HEADER + len {
        return Err(format!(
            "payload body of {} bytes, expected {}",
            data.len() - HEADER,
            body_len(seed)
        ));
    }
    let mut expected = data[..HEADER].to_vec();
    fill_body(seed, &mut expected, len);
    if expected != data {
        return Err("payload body differs from what was published".into());
    }
    Ok(stamp)
}

/// Microseconds since this process's first call.
pub fn now_us() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The checker catches a flipped bit (run once at the start of every run,
/// so a harness that could not see corruption does not pass).
pub fn self_check() {
    for counter in 0..200 {
        let stamp = Stamp {
            publisher: 3,
            counter,
            sent_us: 7,
        };
        let mut p = make_payload(stamp);
        assert_eq!(check_payload(&p), Ok(stamp));
        let at = p.len() / 2;
        p[at] ^= 1;
        assert!(check_payload(&p).is_err());
    }
}
