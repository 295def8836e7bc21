//! The bytes of the conformance kit: what a client must send at a step
//! ([`Pattern`]: exact bytes, with the client's own choices left free),
//! the daemon frames the kit writes on its misbehaving connections, and
//! the hex shown in the report.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;

use bytes::BytesMut;

use crate::encoding;
use crate::handshake::HandshakeFrame;
use crate::hub::{HubEvent, HubReply, HubRequest};
use crate::limits::LENGTH_PREFIX_LEN;
use crate::token::SessionToken;
use crate::transport::{
    CloseReason, ErrorCode, RequestKind, TransportCode, Welcome, encode_ack, encode_closing,
    encode_error, encode_lagged, encode_welcome,
};

/// Values the client chose (a subscription's id, a request's id), by the
/// label the script gave them, learnt from the frames that carried them.
pub(crate) type Captures = HashMap<String, u64>;

/// One frame a client must send, byte for byte, except where the protocol
/// leaves the value to the client.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    /// What the frame is, for the report ("Publish", "Ping"...).
    pub(crate) what: String,
    /// The whole frame, length prefix included; free bytes are 0 here.
    pub(crate) bytes: Vec<u8>,
    /// Byte ranges the client chooses (request ids, subscription ids).
    pub(crate) free: Vec<Range<usize>>,
    /// A byte range compared but never shown (the token).
    pub(crate) secret: Option<Range<usize>>,
    /// `u64` fields recorded when the frame matches: (label, offset).
    pub(crate) captures: Vec<(String, usize)>,
}

/// Where a received frame differs from its pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// Offset of the first byte that differs (or where one side ends).
    pub(crate) offset: usize,
    /// The pattern, as hex (free bytes `??`, secret bytes `**`).
    pub(crate) expected: String,
    /// What arrived, as hex (secret bytes `**`).
    pub(crate) received: String,
}

impl Pattern {
    fn new(what: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            what: what.into(),
            bytes,
            free: Vec::new(),
            secret: None,
            captures: Vec::new(),
        }
    }

    /// The id (frame bytes 4..12) is the client's; recorded as `label`.
    fn free_id(mut self, label: Option<&str>) -> Self {
        self.free.push(4..12);
        if let Some(label) = label {
            self.captures.push((label.to_owned(), 4));
        }
        self
    }

    /// The id is imposed (the driver was told the client's next request
    /// id): `id`, compared like any other field; still recorded.
    pub(crate) fn with_id(mut self, id: u64) -> Self {
        self.fix(4, id);
        self
    }

    /// A `Subscribe` whose sid is imposed (the driver was told the
    /// client's next subscription id).
    pub(crate) fn with_sid(mut self, sid: u64) -> Self {
        self.fix(SUBSCRIBE_SID_AT, sid);
        self
    }

    /// Records the frame's id as `label` (a pattern built without one).
    pub(crate) fn with_id_label(mut self, label: &str) -> Self {
        self.captures.push((label.to_owned(), 4));
        self
    }

    fn fix(&mut self, at: usize, value: u64) {
        if let Some(field) = self.bytes.get_mut(at..at + 8) {
            field.copy_from_slice(&value.to_le_bytes());
        }
        self.free.retain(|range| range.start != at);
    }

    /// The first `len` bytes of the frame only (a frame the kit leaves
    /// mostly unread).
    pub(crate) fn start(&self, len: usize) -> Self {
        let mut start = self.clone();
        start.bytes.truncate(len);
        start.what = format!("the first {len} bytes of {}", self.what);
        start
    }

    fn is_free(&self, at: usize) -> bool {
        self.free.iter().any(|r| r.contains(&at))
    }

    /// The payload length this pattern announces.
    pub(crate) fn payload_len(&self) -> usize {
        self.bytes.len() - LENGTH_PREFIX_LEN
    }

    /// Compares a whole received frame (or as much of it as arrived).
    pub(crate) fn compare(&self, got: &[u8]) -> Result<(), Mismatch> {
        let differs =
            (0..self.bytes.len().max(got.len())).find(|&i| match (self.bytes.get(i), got.get(i)) {
                (Some(want), Some(have)) => !self.is_free(i) && want != have,
                _ => true,
            });
        match differs {
            None => Ok(()),
            Some(offset) => Err(Mismatch {
                offset,
                expected: self.show(&self.bytes, true, offset),
                received: self.show(got, false, offset),
            }),
        }
    }

    /// Records the captured values of a frame that matched.
    pub(crate) fn capture(&self, got: &[u8], into: &mut Captures) {
        for (label, at) in &self.captures {
            if let Some(value) = read_u64(got, *at) {
                into.insert(label.clone(), value);
            }
        }
    }

    /// Hex of `bytes`; a long frame shows its start and the bytes around
    /// `offset`.
    fn show(&self, bytes: &[u8], pattern: bool, offset: usize) -> String {
        let byte = |i: usize| -> String {
            if self.secret.as_ref().is_some_and(|r| r.contains(&i)) {
                "**".into()
            } else if pattern && self.is_free(i) {
                "??".into()
            } else {
                format!("{:02x}", bytes[i])
            }
        };
        let range = |r: Range<usize>| r.map(byte).collect::<Vec<_>>().join(" ");
        if bytes.len() <= SHOWN_WHOLE {
            return range(0..bytes.len());
        }
        let head = SHOWN_HEAD.min(bytes.len());
        let from = offset.saturating_sub(SHOWN_AROUND).max(head);
        let to = (offset + SHOWN_AROUND).min(bytes.len());
        let mut text = range(0..head);
        if from < to {
            let _ = write!(text, " .. [{from}] {}", range(from..to));
        }
        if to < bytes.len() {
            let _ = write!(text, " .. ({} bytes in all)", bytes.len());
        }
        text
    }
}

/// Where a `Subscribe`'s sid is in its frame: prefix 4, id 8, kind 4,
/// request tag 4.
const SUBSCRIBE_SID_AT: usize = 20;

/// Frames up to this many bytes are shown whole in the report.
const SHOWN_WHOLE: usize = 256;
/// Of a longer frame: its first bytes...
const SHOWN_HEAD: usize = 48;
/// ...and this many bytes either side of the first difference.
const SHOWN_AROUND: usize = 24;

pub(crate) fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at + 8)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

/// Lowercase hex without spaces (the instructions' and reports' form).
pub(crate) fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Hex with a space between bytes (the report's form), secret-free input
/// only.
pub(crate) fn spaced_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Spaced hex of a frame that holds no secret, cut after
/// [`SHOWN_WHOLE`] bytes.
pub(crate) fn shown(bytes: &[u8]) -> String {
    if bytes.len() <= SHOWN_WHOLE {
        return spaced_hex(bytes);
    }
    format!(
        "{} .. ({} bytes in all)",
        spaced_hex(&bytes[..SHOWN_HEAD]),
        bytes.len()
    )
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The handshake frame carrying `token` (the token bytes never shown).
pub(crate) fn handshake(token: &SessionToken) -> Pattern {
    let frame = HandshakeFrame::new(token);
    let mut pattern = Pattern::new("the handshake", frame.as_bytes().to_vec());
    pattern.secret = Some(12..44);
    pattern
}

/// A transport request without a body (`Ping`, `Shutdown`).
pub(crate) fn bare(kind: RequestKind, id_label: Option<&str>) -> Pattern {
    let mut payload = vec![0u8; 8];
    payload.extend_from_slice(&kind.tag().to_le_bytes());
    Pattern::new(format!("{kind:?}"), framed(&payload)).free_id(id_label)
}

/// `Expect` naming `service` and `version`.
pub(crate) fn expect(service: &str, version: u32) -> Pattern {
    let mut payload = vec![0u8; 8];
    payload.extend_from_slice(&RequestKind::Expect.tag().to_le_bytes());
    payload.extend_from_slice(&(service.len() as u64).to_le_bytes());
    payload.extend_from_slice(service.as_bytes());
    payload.extend_from_slice(&version.to_le_bytes());
    Pattern::new("Expect", framed(&payload)).free_id(None)
}

/// A `Call` of the hub; `id_label` records its id. A `Subscribe`'s sid is
/// the client's too: left free and recorded as `sid_label`, unless the
/// script already knows it (`Unsubscribe` carries a known one).
pub(crate) fn call(
    request: &HubRequest,
    id_label: Option<&str>,
    sid_label: Option<&str>,
) -> Pattern {
    let mut payload = vec![0u8; 8];
    payload.extend_from_slice(&RequestKind::Call.tag().to_le_bytes());
    // The hub's requests always encode (they hold no map or unsized value).
    let body = encoding::encode(request)
        .map(|b| b.to_vec())
        .unwrap_or_default();
    payload.extend_from_slice(&body);
    let what = match request {
        HubRequest::Status => "Status",
        HubRequest::Subscribe { .. } => "Subscribe",
        HubRequest::Unsubscribe { .. } => "Unsubscribe",
        HubRequest::Publish { .. } => "Publish",
        HubRequest::Serve { .. } => "Serve",
        HubRequest::Unserve { .. } => "Unserve",
        HubRequest::Request { .. } => "Request",
        HubRequest::Respond { .. } => "Respond",
        HubRequest::Fail { .. } => "Fail",
        HubRequest::Topics => "Topics",
    };
    let mut pattern = Pattern::new(format!("a Call of {what}"), framed(&payload)).free_id(id_label);
    if let (HubRequest::Subscribe { .. }, Some(label)) = (request, sid_label) {
        pattern.free.push(SUBSCRIBE_SID_AT..SUBSCRIBE_SID_AT + 8);
        pattern.captures.push((label.to_owned(), SUBSCRIBE_SID_AT));
    }
    pattern
}

/// A daemon frame whose payload is `payload`.
pub(crate) fn daemon_frame(payload: &[u8]) -> Vec<u8> {
    framed(payload)
}

/// A `Welcome` frame.
pub(crate) fn welcome(welcome: &Welcome) -> Vec<u8> {
    let mut dst = BytesMut::new();
    // A Welcome of test values always fits the protocol's ceiling.
    let _ = encode_welcome(&mut dst, welcome);
    dst.to_vec()
}

/// The `Welcome` the kit's misbehaving connections send unless a step
/// says otherwise: the hub, version 2, a frame limit of `max_frame_len`.
pub(crate) fn hub_welcome(max_frame_len: u32) -> Welcome {
    Welcome {
        protocol_version: 2,
        service: "hub".into(),
        service_version: 2,
        software_version: "conformance".into(),
        instance_id: 0x6b69_7400_0000_0001,
        connection_id: 2,
        max_frame_len,
    }
}

/// A `Reply` frame of the hub.
pub(crate) fn reply(id: u64, reply: &HubReply) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&id.to_le_bytes());
    payload.extend_from_slice(
        &encoding::encode(reply)
            .map(|b| b.to_vec())
            .unwrap_or_default(),
    );
    framed(&payload)
}

/// An `Event` frame of the hub.
pub(crate) fn event(stream: u64, event: &HubEvent) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&2u32.to_le_bytes());
    payload.extend_from_slice(&stream.to_le_bytes());
    payload.extend_from_slice(
        &encoding::encode(event)
            .map(|b| b.to_vec())
            .unwrap_or_default(),
    );
    framed(&payload)
}

/// An `Ack` frame.
pub(crate) fn ack(id: u64) -> Vec<u8> {
    let mut dst = BytesMut::new();
    encode_ack(&mut dst, id);
    dst.to_vec()
}

/// An `Error` frame with a transport or service code (`code` is the wire
/// value).
pub(crate) fn error(id: Option<u64>, code: u32, message: &str) -> Vec<u8> {
    let mut dst = BytesMut::new();
    match ErrorCode::from_wire(code) {
        Ok(code) => encode_error(&mut dst, id, code, message),
        // A code this version does not define (the kit sends 17 on
        // purpose): written by hand.
        Err(_) => {
            let mut payload = Vec::new();
            payload.extend_from_slice(&4u32.to_le_bytes());
            match id {
                Some(id) => {
                    payload.push(1);
                    payload.extend_from_slice(&id.to_le_bytes());
                }
                None => payload.push(0),
            }
            payload.extend_from_slice(&code.to_le_bytes());
            payload.extend_from_slice(&(message.len() as u64).to_le_bytes());
            payload.extend_from_slice(message.as_bytes());
            return framed(&payload);
        }
    }
    dst.to_vec()
}

/// The wire value of a transport code.
pub(crate) fn code(code: TransportCode) -> u32 {
    code.tag()
}

/// A `Lagged` frame.
pub(crate) fn lagged(stream: u64, missed: u64) -> Vec<u8> {
    let mut dst = BytesMut::new();
    encode_lagged(&mut dst, stream, missed);
    dst.to_vec()
}

/// A `Closing` frame.
pub(crate) fn closing(reason: CloseReason) -> Vec<u8> {
    let mut dst = BytesMut::new();
    encode_closing(&mut dst, reason);
    dst.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Payload;

    #[test]
    fn a_frame_that_matches_its_pattern_records_the_clients_choices() {
        let pattern = call(
            &HubRequest::Subscribe {
                sid: 0,
                pattern: "news.*".into(),
                lag: crate::hub::Lag::Disconnect,
            },
            Some("id"),
            Some("sid"),
        );
        // The vector `subscribe` of section 15.3: id 4, sid 1.
        let got = hex::decode(
            "2a000000040000000000000000000000010000000100000000000000060000000000000\
             06e6577732e2a00000000",
        )
        .unwrap_or_default();
        assert_eq!(pattern.compare(&got), Ok(()));
        let mut captures = Captures::new();
        pattern.capture(&got, &mut captures);
        assert_eq!(captures.get("id"), Some(&4));
        assert_eq!(captures.get("sid"), Some(&1));
    }

    #[test]
    fn a_mismatch_names_the_first_differing_byte_and_shows_both_sides() {
        let pattern = call(
            &HubRequest::Publish {
                topic: "a".into(),
                payload: Payload::from(&b""[..]),
            },
            None,
            None,
        );
        let mut got = pattern.bytes.clone();
        got[0] += 4; // a length prefix that counts its own 4 bytes
        let mismatch = pattern.compare(&got).err();
        let mismatch = mismatch.as_ref();
        assert_eq!(mismatch.map(|m| m.offset), Some(0));
        assert_eq!(
            mismatch.map(|m| m.expected.as_str()),
            Some(
                "21 00 00 00 ?? ?? ?? ?? ?? ?? ?? ?? 00 00 00 00 03 00 00 00 01 00 00 00 00 00 00 00 61 00 00 00 00 00 00 00 00"
            )
        );
        assert!(mismatch.is_some_and(|m| m.received.starts_with("25 00 00 00 00")));
    }

    #[test]
    fn the_token_is_compared_but_never_shown() {
        let token = SessionToken::from_bytes([7; 32]);
        let pattern = handshake(&token);
        let mut got = pattern.bytes.clone();
        got[43] = 8;
        let mismatch = pattern.compare(&got).err();
        assert_eq!(mismatch.as_ref().map(|m| m.offset), Some(43));
        assert!(mismatch.is_some_and(|m| !m.expected.contains("07") && !m.received.contains("08")));
    }

    #[test]
    fn a_short_frame_differs_where_it_ends() {
        let pattern = bare(RequestKind::Ping, None);
        let got = &pattern.bytes[..10];
        assert_eq!(pattern.compare(got).map_err(|m| m.offset), Err(10));
    }
}
