//! The `session` fuzz target: an `arbitrary`-derived sequence of client
//! operations (handshake variants, requests, raw bytes, partial writes,
//! reads, disconnects) driven against the server's real connection logic
//! ([`Server::serve_stream`]) over an in-memory socket pair.
//!
//! Invariants, checked against a model of what was written:
//! - no request is served before authentication: unless the first 44 bytes
//!   written are exactly the valid handshake, the peer receives exactly one
//!   frame, an `Error` without id, and then EOF;
//! - after a valid handshake the first frame is `Welcome` naming the hub;
//!   when only well-formed requests followed, every reply answers them in
//!   order (ids ascending, one reply per request until a close, `Ack` for
//!   the transport's requests, `Reply` or an `Error` with the id for the
//!   hub's), a message event comes only on a stream this connection
//!   subscribed with a pattern that matches its topic (checked against an
//!   independent model of the matching rules), requests only for names it
//!   serves, responses only to requests it sent, and `Closing` is last.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::fuzz_token;
use super::subjects::pattern_matches;
use crate::encoding::Payload;
use crate::handshake::HandshakeFrame;
use crate::hub::{HubEvent, HubRequest, HubService, Lag, check_pattern, valid_topic};
use crate::limits::{HANDSHAKE_FRAME_LEN, MAX_FRAME_LEN, MAX_TOPIC_LEN};
use crate::server::{Server, ServerConfig};
use crate::transport::{
    DaemonFrame, ErrorCode, ErrorFrame, RequestKind, TransportCode, encode_request,
};

/// Most operations and bytes one input may produce (keeps runs fast).
const MAX_OPS: usize = 64;
const MAX_WIRE: usize = 64 * 1024;

/// Topics the operations pick from by index: valid ones and invalid ones.
fn topic(index: u8) -> String {
    match index % 7 {
        0 => "a".into(),
        1 => "b".into(),
        2 => "a.b".into(),
        3 => "news.ünï.x".into(),
        4 => String::new(),
        5 => "a..b".into(),
        _ => "t".repeat(MAX_TOPIC_LEN + 1),
    }
}

/// Patterns the subscriptions pick from by index.
fn pattern(index: u8) -> String {
    match index % 9 {
        0..=3 => topic(index % 4),
        4 => "a.*".into(),
        5 => ">".into(),
        6 => "*.ünï.>".into(),
        7 => "a.>.b".into(),
        _ => "*".into(),
    }
}

/// One well-formed request.
#[derive(Debug, Clone, Arbitrary)]
pub enum FuzzRequest {
    /// Ping.
    Ping,
    /// Status.
    Status,
    /// Subscribe with id `sid` (0 and ids in use are refused) to
    /// `pattern(i)`, dropping the oldest events when behind if the flag is
    /// set.
    Subscribe(u8, u8, bool),
    /// Unsubscribe `sid`.
    Unsubscribe(u8),
    /// Serve `topic(i)`.
    Serve(u8),
    /// Send a request to `topic(i)`.
    Request(u8, Vec<u8>),
    /// Answer request `token`.
    Respond(u64, Vec<u8>),
    /// Publish on `topic(i)`.
    Publish(u8, Vec<u8>),
    /// Shutdown (the peer is the daemon's own uid: allowed).
    Shutdown,
    /// `Expect` naming a service (one of a few names, by index) and a
    /// version: `hub` 2 is answered with `Ack`, anything else closes the
    /// connection with `WrongService`.
    Expect(u8, u32),
    /// A request kind this daemon does not know (`REQUEST_KINDS` and up).
    Unknown(u32),
    /// A `Call` whose body is these bytes (mostly not a hub request).
    BadBody(Vec<u8>),
}

/// One client operation.
#[derive(Debug, Clone, Arbitrary)]
pub enum Operation {
    /// The valid handshake.
    Handshake,
    /// The handshake with one bit of the token flipped.
    BadToken {
        /// Token byte.
        byte: u8,
        /// Bit within it.
        bit: u8,
    },
    /// The handshake with another protocol version.
    BadVersion(u32),
    /// The handshake with one magic byte changed.
    BadMagic(u8),
    /// A first-frame length prefix other than 40.
    BadLength(u32),
    /// A well-formed request.
    Request(FuzzRequest),
    /// Arbitrary bytes.
    Raw(Vec<u8>),
    /// From now on, write in pieces of this many bytes (0: whole).
    Split(u8),
    /// Let the server run and read what has arrived.
    Read,
    /// Close our write side; no operation after this is performed.
    Disconnect,
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn with_runtime<T>(f: impl FnOnce(&tokio::runtime::Runtime) -> T) -> T {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rt = slot.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime")
        });
        f(rt)
    })
}

/// What the model expects the server to answer, per request written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// `Ack` (Ping, Shutdown).
    Ack(u64),
    /// `Reply`.
    Reply(u64),
    /// `Error` with the id.
    Error(u64),
    /// `Reply`, or `Error` with the id (a body that may or may not decode).
    Either(u64),
    /// `Error WrongService` without an id, the last frame.
    WrongService,
}

/// `Reply` for a hub request on a valid topic, else `Error InvalidTopic`.
fn reply_or_error(id: u64, topic: &str) -> Expect {
    if valid_topic(topic) {
        Expect::Reply(id)
    } else {
        Expect::Error(id)
    }
}

/// Decodes the operations from raw fuzzer bytes (never fails: a short input
/// is a short sequence).
pub fn operations(data: &[u8]) -> Vec<Operation> {
    let mut u = Unstructured::new(data);
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        match Operation::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    ops
}

/// The fuzz target: decodes `data` into operations and runs them.
pub fn session(data: &[u8]) {
    run(&operations(data));
}

/// Runs `ops` against a fresh server and checks the invariants.
pub fn run(ops: &[Operation]) {
    let token = fuzz_token();
    let valid = HandshakeFrame::new(&token);
    let mut wire: Vec<u8> = Vec::new();
    let mut sent_ids: Vec<(u64, Expect)> = Vec::new();
    // Every subscription ever made, by sid, with its pattern (events of an
    // unsubscribed one may still be in flight).
    let mut subscribed: Vec<(u64, String)> = Vec::new();
    let mut live: Vec<u64> = Vec::new();
    let mut served: Vec<String> = Vec::new();
    let mut requested: Vec<u64> = Vec::new();
    let mut raw_after_handshake = false;
    let mut next_id = 1u64;
    let mut split = 0usize;

    let output = with_runtime(|rt| {
        rt.block_on(async {
            let server = Server::new(
                HubService::new(),
                ServerConfig::default(),
                Arc::new(fuzz_token()),
            );
            let (mut client, server_end) = UnixStream::pair().expect("socket pair");
            let serving = {
                let server = server.clone();
                tokio::spawn(async move { server.serve_stream(server_end).await })
            };
            let (mut reader, mut writer) = client.split();
            let collect = async {
                let mut out = Vec::new();
                let _ = reader.read_to_end(&mut out).await;
                out
            };
            let drive = async {
                for op in ops {
                    let bytes: Vec<u8> = match op {
                        Operation::Handshake => valid.to_vec(),
                        Operation::BadToken { byte, bit } => {
                            let mut f = valid.to_vec();
                            f[12 + (*byte as usize % 32)] ^= 1 << (bit % 8);
                            f
                        }
                        Operation::BadVersion(v) => {
                            HandshakeFrame::with_version(*v, &token).to_vec()
                        }
                        Operation::BadMagic(i) => {
                            let mut f = valid.to_vec();
                            f[4 + (*i as usize % 4)] ^= 0x20;
                            f
                        }
                        Operation::BadLength(len) => {
                            let mut f = valid.to_vec();
                            f[..4].copy_from_slice(&len.to_le_bytes());
                            f
                        }
                        Operation::Request(req) => {
                            let id = next_id;
                            next_id += 1;
                            let (kind, call, expect) = match req {
                                FuzzRequest::Ping => (RequestKind::Ping, None, Expect::Ack(id)),
                                FuzzRequest::Shutdown => {
                                    (RequestKind::Shutdown, None, Expect::Ack(id))
                                }
                                FuzzRequest::Status => (
                                    RequestKind::Call,
                                    Some(HubRequest::Status),
                                    Expect::Reply(id),
                                ),
                                FuzzRequest::Subscribe(sid, p, drop) => {
                                    let sid = u64::from(*sid % 8);
                                    let pattern = pattern(*p);
                                    let ok = check_pattern(&pattern).is_ok()
                                        && sid != 0
                                        && !live.contains(&sid);
                                    if ok {
                                        subscribed.push((sid, pattern.clone()));
                                        live.push(sid);
                                    }
                                    let lag = if *drop {
                                        Lag::DropOldest
                                    } else {
                                        Lag::Disconnect
                                    };
                                    (
                                        RequestKind::Call,
                                        Some(HubRequest::Subscribe { sid, pattern, lag }),
                                        if ok {
                                            Expect::Reply(id)
                                        } else {
                                            Expect::Error(id)
                                        },
                                    )
                                }
                                FuzzRequest::Unsubscribe(sid) => {
                                    let sid = u64::from(*sid % 8);
                                    live.retain(|s| *s != sid);
                                    (
                                        RequestKind::Call,
                                        Some(HubRequest::Unsubscribe { sid }),
                                        Expect::Reply(id),
                                    )
                                }
                                FuzzRequest::Serve(t) => {
                                    let name = topic(*t);
                                    let expect = reply_or_error(id, &name);
                                    if valid_topic(&name) {
                                        served.push(name.clone());
                                    }
                                    (RequestKind::Call, Some(HubRequest::Serve { name }), expect)
                                }
                                FuzzRequest::Request(t, payload) => {
                                    requested.push(id);
                                    let payload = Payload::from(Bytes::from(payload.clone()));
                                    (
                                        RequestKind::Call,
                                        Some(HubRequest::Request {
                                            name: topic(*t),
                                            timeout_ms: 50,
                                            payload,
                                        }),
                                        Expect::Either(id),
                                    )
                                }
                                FuzzRequest::Respond(token, payload) => {
                                    let payload = Payload::from(Bytes::from(payload.clone()));
                                    (
                                        RequestKind::Call,
                                        Some(HubRequest::Respond {
                                            token: *token % 4,
                                            payload,
                                        }),
                                        Expect::Either(id),
                                    )
                                }
                                FuzzRequest::Publish(t, payload) => {
                                    let topic = topic(*t);
                                    let expect = reply_or_error(id, &topic);
                                    let payload = Payload::from(Bytes::from(payload.clone()));
                                    (
                                        RequestKind::Call,
                                        Some(HubRequest::Publish { topic, payload }),
                                        expect,
                                    )
                                }
                                FuzzRequest::Expect(name, version) => {
                                    let name =
                                        ["hub", "notes", "", "hub2", "HUB"][*name as usize % 5];
                                    let version = match version % 4 {
                                        0 => 2,
                                        1 => 1,
                                        2 => 3,
                                        _ => *version,
                                    };
                                    let expect = if (name, version) == ("hub", 2) {
                                        Expect::Ack(id)
                                    } else {
                                        Expect::WrongService
                                    };
                                    sent_ids.push((id, expect));
                                    let mut buf = BytesMut::new();
                                    let _ = encode_request(
                                        &mut buf,
                                        id,
                                        RequestKind::Expect,
                                        Some(&(name, version)),
                                        MAX_FRAME_LEN,
                                    );
                                    wire_push(&mut wire, &buf, &mut writer, split).await;
                                    continue;
                                }
                                FuzzRequest::Unknown(kind) => {
                                    sent_ids.push((id, Expect::Error(id)));
                                    let kind = crate::transport::REQUEST_KINDS + (kind % 1000);
                                    let mut f = 12u32.to_le_bytes().to_vec();
                                    f.extend_from_slice(&id.to_le_bytes());
                                    f.extend_from_slice(&kind.to_le_bytes());
                                    wire_push(&mut wire, &f, &mut writer, split).await;
                                    continue;
                                }
                                FuzzRequest::BadBody(body) => {
                                    sent_ids.push((id, Expect::Either(id)));
                                    let body = &body[..body.len().min(256)];
                                    let mut f = ((12 + body.len()) as u32).to_le_bytes().to_vec();
                                    f.extend_from_slice(&id.to_le_bytes());
                                    f.extend_from_slice(&0u32.to_le_bytes());
                                    f.extend_from_slice(body);
                                    wire_push(&mut wire, &f, &mut writer, split).await;
                                    continue;
                                }
                            };
                            sent_ids.push((id, expect));
                            let mut buf = BytesMut::new();
                            let _ =
                                encode_request(&mut buf, id, kind, call.as_ref(), MAX_FRAME_LEN);
                            buf.to_vec()
                        }
                        Operation::Raw(bytes) => bytes.clone(),
                        Operation::Split(n) => {
                            split = *n as usize;
                            continue;
                        }
                        Operation::Read => {
                            for _ in 0..4 {
                                tokio::task::yield_now().await;
                            }
                            continue;
                        }
                        Operation::Disconnect => break,
                    };
                    if wire.len() + bytes.len() > MAX_WIRE {
                        break;
                    }
                    // After the first 44 bytes only well-formed requests are
                    // modelled; anything else reaching past them (raw bytes, a
                    // second handshake of any kind) makes the rest unmodelled.
                    if !matches!(op, Operation::Request(_))
                        && wire.len() + bytes.len() > HANDSHAKE_FRAME_LEN
                    {
                        raw_after_handshake = true;
                    }
                    if !wire_push(&mut wire, &bytes, &mut writer, split).await {
                        break;
                    }
                }
                let _ = writer.shutdown().await;
            };
            let (out, ()) = tokio::time::timeout(Duration::from_secs(20), async {
                tokio::join!(collect, drive)
            })
            .await
            .expect("the server neither answered nor closed within 20 s");
            let _ = tokio::time::timeout(Duration::from_secs(20), serving)
                .await
                .expect("connection task ended");
            out
        })
    });

    let frames = split_frames(&output);
    let authenticated =
        wire.len() >= HANDSHAKE_FRAME_LEN && wire[..HANDSHAKE_FRAME_LEN] == valid[..];
    if !authenticated {
        // Unauthenticated: exactly one Error frame, no id, then EOF.
        assert_eq!(
            frames.len(),
            1,
            "an unauthenticated peer got {} frames: {frames:?}",
            frames.len()
        );
        match &frames[0] {
            DaemonFrame::Error(ErrorFrame { id: None, .. }) => {}
            other => panic!("an unauthenticated peer got {other:?}"),
        }
        return;
    }
    match frames.first() {
        Some(DaemonFrame::Welcome(welcome)) => assert_eq!(welcome.service, "hub"),
        other => panic!("first frame after a valid handshake: {other:?}"),
    }
    if let Some(pos) = frames.iter().position(|f| {
        matches!(
            f,
            DaemonFrame::Closing(_) | DaemonFrame::Error(ErrorFrame { id: None, .. })
        )
    }) {
        assert_eq!(
            pos,
            frames.len() - 1,
            "frames after Closing or a closing Error: {frames:?}"
        );
    }
    if raw_after_handshake {
        return;
    }
    // Replies in request order, one per request, each of the expected kind.
    let mut expected = sent_ids.iter();
    for frame in &frames[1..] {
        let got = match frame {
            DaemonFrame::Ack { id } => Expect::Ack(*id),
            DaemonFrame::Reply { id, .. } => Expect::Reply(*id),
            DaemonFrame::Error(ErrorFrame { id: Some(id), .. }) => Expect::Error(*id),
            DaemonFrame::Event { stream, body } => {
                match crate::encoding::decode::<HubEvent>(body)
                    .expect("the daemon sends decodable events")
                {
                    HubEvent::Message { topic, .. } => {
                        assert!(
                            subscribed
                                .iter()
                                .any(|(sid, p)| sid == stream && pattern_matches(p, &topic)),
                            "an event of {topic:?} on stream {stream}, which no pattern subscribed as it matches"
                        );
                    }
                    HubEvent::Request { name, .. } => {
                        assert_eq!(*stream, 0);
                        assert!(
                            served.contains(&name),
                            "a request for {name:?}, never served"
                        );
                    }
                    HubEvent::Response { request, .. } => {
                        assert_eq!(*stream, 0);
                        assert!(
                            requested.contains(&request),
                            "a response to {request}, never sent"
                        );
                    }
                    HubEvent::MessageMemfd { topic, .. } => {
                        panic!("a MessageMemfd of {topic:?} in a plain Event frame")
                    }
                }
                continue;
            }
            DaemonFrame::Lagged { stream, .. } => {
                assert!(
                    subscribed.iter().any(|(sid, _)| sid == stream),
                    "Lagged for stream {stream}, never subscribed"
                );
                continue;
            }
            DaemonFrame::Closing(_) => break,
            DaemonFrame::Error(ErrorFrame {
                id: None,
                code: ErrorCode::Transport(TransportCode::WrongService),
                ..
            }) => Expect::WrongService,
            other => panic!("unexpected frame after Welcome: {other:?}"),
        };
        match expected.next() {
            Some((_, Expect::Either(id))) => assert!(
                got == Expect::Reply(*id) || got == Expect::Error(*id),
                "reply out of order or of the wrong kind: {got:?} for {id}"
            ),
            Some((_, want)) => assert_eq!(&got, want, "reply out of order or of the wrong kind"),
            None => panic!("a reply no request asked for: {got:?}"),
        }
    }
}

async fn wire_push(
    wire: &mut Vec<u8>,
    bytes: &[u8],
    writer: &mut tokio::net::unix::WriteHalf<'_>,
    split: usize,
) -> bool {
    wire.extend_from_slice(bytes);
    let piece = if split == 0 {
        bytes.len().max(1)
    } else {
        split
    };
    for chunk in bytes.chunks(piece) {
        if writer.write_all(chunk).await.is_err() {
            return false;
        }
        if split != 0 {
            tokio::task::yield_now().await;
        }
    }
    true
}

/// Splits the daemon's output into frames; every byte must belong to a
/// whole, decodable frame.
fn split_frames(mut out: &[u8]) -> Vec<DaemonFrame> {
    let mut frames = Vec::new();
    while !out.is_empty() {
        assert!(
            out.len() >= 4,
            "a truncated length prefix in the daemon's output"
        );
        let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) as usize;
        assert!(
            out.len() >= 4 + len,
            "a truncated frame in the daemon's output"
        );
        frames.push(
            DaemonFrame::decode(&Bytes::copy_from_slice(&out[4..4 + len]))
                .expect("the daemon sends decodable frames"),
        );
        out = &out[4 + len..];
    }
    frames
}

/// Seeds for the committed corpus. `arbitrary` has no encoder, so seeds are
/// found by a deterministic search over its input space (a fixed xorshift
/// stream of 96-byte inputs), keeping the first inputs that decode to each
/// interesting shape: valid sessions with several requests, pub/sub,
/// partial writes, and each kind of refused first frame.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    type Shape = (&'static str, usize, fn(&[Operation]) -> bool);
    let requests = |ops: &[Operation]| {
        ops.iter()
            .filter(|o| matches!(o, Operation::Request(_)))
            .count()
    };
    let shapes: [Shape; 10] = [
        ("valid-session", 6, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .filter(|o| matches!(o, Operation::Request(_)))
                    .count()
                    >= 3
                && !ops.iter().any(|o| matches!(o, Operation::Raw(_)))
        }),
        ("pubsub", 3, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops.iter().any(|o| {
                    matches!(o, Operation::Request(FuzzRequest::Subscribe(sid, p, _))
                        if sid % 8 != 0 && check_pattern(&pattern(*p)).is_ok())
                })
                && ops.iter().any(
                    |o| matches!(o, Operation::Request(FuzzRequest::Publish(t, _)) if t % 7 < 4),
                )
        }),
        ("split-writes", 2, |ops| {
            matches!(ops.first(), Some(Operation::Split(n)) if *n > 0)
                && matches!(ops.get(1), Some(Operation::Handshake))
                && ops.len() > 3
        }),
        ("expect", 2, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .any(|o| matches!(o, Operation::Request(FuzzRequest::Expect(..))))
        }),
        ("bad-token", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadToken { .. }))
        }),
        ("bad-version", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadVersion(_)))
        }),
        ("bad-magic", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadMagic(_)))
        }),
        ("bad-length", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadLength(_)))
        }),
        ("request-before-handshake", 1, |ops| {
            matches!(ops.first(), Some(Operation::Request(_)))
                && ops.iter().any(|o| matches!(o, Operation::Handshake))
        }),
        ("disconnect-first", 1, |ops| {
            matches!(ops.first(), Some(Operation::Disconnect))
        }),
    ];
    let _ = requests;
    let mut found: Vec<(String, Vec<u8>)> = Vec::new();
    let mut counts = vec![0usize; shapes.len()];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..2_000_000 {
        if shapes
            .iter()
            .zip(counts.iter())
            .all(|((_, want, _), got)| got >= want)
        {
            break;
        }
        let mut input = vec![0u8; 96];
        for b in input.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = (state >> 24) as u8;
        }
        let ops = operations(&input);
        for (i, (name, want, matches)) in shapes.iter().enumerate() {
            if counts[i] < *want && matches(&ops) {
                counts[i] += 1;
                found.push((format!("{name}-{}", counts[i]), input.clone()));
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use FuzzRequest as R;
    use Operation as O;

    #[test]
    fn scripted_sessions_hold_the_invariants() {
        let sessions: Vec<Vec<Operation>> = vec![
            vec![O::Handshake, O::Request(R::Ping)],
            vec![
                O::Handshake,
                O::Request(R::Subscribe(1, 0, false)),
                O::Request(R::Publish(0, b"hello".to_vec())),
                O::Read,
                O::Request(R::Unsubscribe(1)),
                O::Request(R::Publish(0, b"gone".to_vec())),
                O::Request(R::Status),
            ],
            vec![
                O::Split(1),
                O::Handshake,
                O::Request(R::Ping),
                O::Request(R::Subscribe(2, 2, true)),
            ],
            vec![
                O::Handshake,
                O::Request(R::Subscribe(3, 3, false)),
                O::Request(R::Subscribe(3, 4, false)),
                O::Request(R::Subscribe(0, 4, false)),
                O::Request(R::Publish(4, vec![1])),
            ],
            // Wildcards: `a.*` and `>` match `a.b`; `a.>.b` is refused.
            vec![
                O::Handshake,
                O::Request(R::Subscribe(1, 4, false)),
                O::Request(R::Subscribe(2, 5, true)),
                O::Request(R::Subscribe(3, 7, false)),
                O::Request(R::Publish(2, b"x".to_vec())),
                O::Request(R::Publish(0, b"y".to_vec())),
                O::Read,
            ],
            // Request/reply with itself: serve, request, answer.
            vec![
                O::Handshake,
                O::Request(R::Serve(0)),
                O::Request(R::Request(0, b"q".to_vec())),
                O::Read,
                O::Request(R::Respond(1, b"r".to_vec())),
                O::Request(R::Request(1, b"nobody".to_vec())),
                O::Read,
            ],
            vec![O::Handshake, O::Request(R::Unknown(0)), O::Request(R::Ping)],
            // Expect: the hub (Ack, then served), then another service
            // (WrongService: nothing after it is answered).
            vec![
                O::Handshake,
                O::Request(R::Expect(0, 0)),
                O::Request(R::Status),
                O::Request(R::Expect(1, 0)),
                O::Request(R::Ping),
            ],
            vec![O::Handshake, O::Request(R::Shutdown), O::Request(R::Ping)],
            vec![O::Request(R::Ping), O::Handshake],
            vec![O::BadToken { byte: 5, bit: 3 }, O::Request(R::Ping)],
            vec![O::BadVersion(1)],
            vec![
                O::Handshake,
                O::Request(R::BadBody(vec![9, 0, 0, 0])),
                O::Request(R::Ping),
            ],
            vec![O::BadMagic(1)],
            vec![O::BadLength(41)],
            vec![
                O::Raw(HandshakeFrame::new(&fuzz_token())[..20].to_vec()),
                O::Disconnect,
            ],
            vec![O::Handshake, O::Raw(vec![0xff, 0xff, 0xff, 0xff])],
            vec![O::Disconnect],
        ];
        for ops in sessions {
            run(&ops);
        }
    }

    #[test]
    fn seeds_cover_every_shape() {
        let seeds = seeds();
        for prefix in [
            "valid-session-6",
            "pubsub-3",
            "split-writes-2",
            "expect-1",
            "bad-token-1",
            "bad-version-1",
            "bad-magic-1",
            "bad-length-1",
            "request-before-handshake-1",
            "disconnect-first-1",
        ] {
            assert!(seeds.iter().any(|(n, _)| n == prefix), "no seed {prefix}");
        }
    }
}
