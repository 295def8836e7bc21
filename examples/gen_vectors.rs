//! Writes the golden vectors of the wire protocol: `tests/vectors/golden.json`,
//! and the annotated dump of each vector inside its ```` ```text vector=NAME ````
//! block of `proto-spec.md` (the prose around the blocks is left alone).
//!
//! Run from anywhere: `cargo run --example gen_vectors`. Every vector is
//! built field by field here (so that each field gets its annotation) and
//! checked against the library's own encoder before anything is written;
//! `tests/golden_vectors.rs` then checks the files against the decoders and
//! against a real daemon. A vector without a block in the spec is printed,
//! to be placed by hand.

use std::fmt::Write as _;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use keyhole::encoding::{self, Payload};
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{Failure, HubEvent, HubReply, HubRequest, HubStatus, Lag, Outcome, TopicList};
use keyhole::token::SessionToken;
use keyhole::transport::{
    CloseReason, DaemonFrame, ErrorCode, ErrorFrame, REQUEST_KINDS, RequestKind, TransportCode,
    Welcome, encode_call_fds, encode_request, tag as frame_tag,
};
use serde_json::{Value, json};

/// One field of a dump: its bytes and what they are.
#[derive(Clone)]
struct Field(Vec<u8>, String);

fn u32f(v: u32, what: &str) -> Field {
    Field(v.to_le_bytes().to_vec(), format!("{what} (u32): {v}"))
}

fn u64f(v: u64, what: &str) -> Field {
    Field(v.to_le_bytes().to_vec(), format!("{what} (u64): {v}"))
}

fn tag(v: u32, what: &str) -> Field {
    Field(v.to_le_bytes().to_vec(), what.to_string())
}

/// The `fds` count of a frame that carries descriptors.
fn fds_field(fds: u32) -> Field {
    tag(
        fds,
        &format!("fds (u32): {fds} (they go as SCM_RIGHTS with the frame's first byte)"),
    )
}

fn raw(bytes: &[u8], what: &str) -> Field {
    Field(bytes.to_vec(), what.to_string())
}

/// A `String` field: its length, then its UTF-8.
fn text(s: &str, what: &str) -> Vec<Field> {
    let mut out = vec![Field(
        (s.len() as u64).to_le_bytes().to_vec(),
        format!("{what} length: {}", s.len()),
    )];
    if !s.is_empty() {
        out.push(Field(s.as_bytes().to_vec(), format!("{what}: {s:?}")));
    }
    out
}

/// A byte-array field shown as ASCII.
fn ascii(b: &[u8], what: &str) -> Vec<Field> {
    let mut out = vec![Field(
        (b.len() as u64).to_le_bytes().to_vec(),
        format!("{what} length: {}", b.len()),
    )];
    if !b.is_empty() {
        out.push(Field(
            b.to_vec(),
            format!("{what} (ASCII {:?})", String::from_utf8_lossy(b)),
        ));
    }
    out
}

struct Vector {
    name: &'static str,
    direction: &'static str,
    fields: Vec<Field>,
    /// `request`, `frame` or `handshake` key and its JSON.
    json: (&'static str, Value),
    /// The library's own encoding of the same thing (`None`: no encoder
    /// makes these bytes, as for the negative vectors).
    library: Option<Vec<u8>>,
}

struct Negative {
    vector: Vector,
    description: &'static str,
    error_code: Option<u32>,
    error_id: Option<u64>,
    closes: bool,
    decided_after: usize,
}

/// Prepends the length prefix to payload fields.
fn framed(mut fields: Vec<Field>) -> Vec<Field> {
    let len: usize = fields.iter().map(|f| f.0.len()).sum();
    fields.insert(0, u32f(len as u32, "length prefix"));
    fields
}

fn bytes_of(fields: &[Field]) -> Vec<u8> {
    fields.iter().flat_map(|f| f.0.clone()).collect()
}

fn dump(fields: &[Field]) -> String {
    let mut out = String::new();
    for Field(bytes, what) in fields {
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            let hex = hex.join(" ");
            if i == 0 {
                let _ = writeln!(out, "{hex:<23}  {what}");
            } else {
                let _ = writeln!(out, "{hex}");
            }
        }
    }
    out
}

fn request(id: u64, kind: RequestKind, call: Option<&HubRequest>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_request(&mut buf, id, kind, call, usize::MAX).expect("request encodes");
    buf.to_vec()
}

fn daemon(frame: &DaemonFrame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).expect("frame encodes");
    buf.to_vec()
}

fn header(id: u64, kind: u32, kind_name: &str) -> Vec<Field> {
    vec![
        u64f(id, "id"),
        tag(kind, &format!("kind (u32): {kind} = {kind_name}")),
    ]
}

fn lag_field(lag: Lag) -> Field {
    match lag {
        Lag::Disconnect => tag(0, "lag (u32): 0 = Disconnect"),
        Lag::DropOldest => tag(1, "lag (u32): 1 = DropOldest"),
    }
}

fn failure_fields(failure: &Failure) -> Vec<Field> {
    match failure {
        Failure::ReplyTooLarge { len } => vec![
            tag(0, "failure tag (u32): 0 = ReplyTooLarge"),
            u64f(*len, "len"),
        ],
        Failure::Failed { message } => [
            vec![tag(1, "failure tag (u32): 1 = Failed")],
            text(message, "message"),
        ]
        .concat(),
    }
}

/// A hub request: its tag, then its fields.
fn call_fields(call: &HubRequest) -> Vec<Field> {
    let (t, body): (u32, Vec<Field>) = match call {
        HubRequest::Status => (0, vec![]),
        HubRequest::Subscribe { sid, pattern, lag } => (
            1,
            [
                vec![u64f(*sid, "sid")],
                text(pattern, "pattern"),
                vec![lag_field(*lag)],
            ]
            .concat(),
        ),
        HubRequest::Unsubscribe { sid } => (2, vec![u64f(*sid, "sid")]),
        HubRequest::PublishMemfd { topic } => (10, text(topic, "topic")),
        HubRequest::Publish { topic, payload } => {
            let mut b = text(topic, "topic");
            b.extend(ascii(payload, "payload"));
            (3, b)
        }
        HubRequest::Serve { name } => (4, text(name, "name")),
        HubRequest::Unserve { name } => (5, text(name, "name")),
        HubRequest::Request {
            name,
            timeout_ms,
            payload,
        } => {
            let mut b = text(name, "name");
            b.push(u32f(*timeout_ms, "timeout_ms"));
            b.extend(ascii(payload, "payload"));
            (6, b)
        }
        HubRequest::Respond { token, payload } => {
            let mut b = vec![u64f(*token, "token")];
            b.extend(ascii(payload, "payload"));
            (7, b)
        }
        HubRequest::Fail { token, failure } => {
            let mut b = vec![u64f(*token, "token")];
            b.extend(failure_fields(failure));
            (8, b)
        }
        HubRequest::Topics => (9, vec![]),
    };
    let names = [
        "Status",
        "Subscribe",
        "Unsubscribe",
        "Publish",
        "Serve",
        "Unserve",
        "Request",
        "Respond",
        "Fail",
        "Topics",
        "PublishMemfd",
    ];
    let mut fields = vec![tag(
        t,
        &format!("hub request tag (u32): {t} = {}", names[t as usize]),
    )];
    fields.extend(body);
    fields
}

fn call_vector(name: &'static str, id: u64, call: HubRequest) -> Vector {
    let mut fields = header(id, 0, "Call");
    fields.extend(call_fields(&call));
    Vector {
        name,
        direction: "client_to_daemon",
        library: Some(request(id, RequestKind::Call, Some(&call))),
        json: (
            "request",
            json!({"id": id, "kind": "Call", "call": serde_json::to_value(&call).unwrap()}),
        ),
        fields: framed(fields),
    }
}

/// A `CallFds` announcing `fds` descriptors (the vector is its bytes; the
/// descriptors go as `SCM_RIGHTS` with its first byte, section 19).
fn call_fds_vector(name: &'static str, id: u64, fds: u32, call: HubRequest) -> Vector {
    let mut fields = header(id, RequestKind::CallFds.tag(), "CallFds");
    fields.push(fds_field(fds));
    fields.extend(call_fields(&call));
    let mut library = BytesMut::new();
    encode_call_fds(&mut library, id, fds, &call, usize::MAX).expect("request encodes");
    Vector {
        name,
        direction: "client_to_daemon",
        library: Some(library.to_vec()),
        json: (
            "request",
            json!({"id": id, "kind": "CallFds", "fds": fds, "call": serde_json::to_value(&call).unwrap()}),
        ),
        fields: framed(fields),
    }
}

fn transport_request(name: &'static str, id: u64, kind: RequestKind) -> Vector {
    let kind_name = format!("{kind:?}");
    Vector {
        name,
        direction: "client_to_daemon",
        library: Some(request(id, kind, None)),
        json: ("request", json!({"id": id, "kind": kind_name})),
        fields: framed(header(id, kind.tag(), &kind_name)),
    }
}

fn counted(list: &[(String, u64)], what: &str) -> Vec<Field> {
    let mut out = vec![u64f(
        list.len() as u64,
        &format!("{what}: number of entries"),
    )];
    for (text_, n) in list {
        out.extend(text(text_, &format!("{what} entry")));
        out.push(u64f(*n, "its count"));
    }
    out
}

/// A hub reply: its tag, then its fields.
fn reply_fields(reply: &HubReply) -> Vec<Field> {
    let (t, body): (u32, Vec<Field>) = match reply {
        HubReply::Status(s) => (
            0,
            [
                vec![
                    u64f(s.authenticated, "status.authenticated"),
                    u64f(s.pending, "status.pending"),
                    u64f(s.topics, "status.topics"),
                    u64f(s.subscriptions, "status.subscriptions"),
                    u64f(s.names, "status.names"),
                    u64f(s.requests_in_flight, "status.requests_in_flight"),
                    u64f(s.uptime_ms, "status.uptime_ms"),
                ],
                text(&s.version, "status.version"),
            ]
            .concat(),
        ),
        HubReply::Subscribed => (1, vec![]),
        HubReply::Unsubscribed => (2, vec![]),
        HubReply::Published { receivers } => (3, vec![u64f(*receivers, "receivers")]),
        HubReply::Serving => (4, vec![]),
        HubReply::Unserved => (5, vec![]),
        HubReply::Requested => (6, vec![]),
        HubReply::Responded { delivered } => (
            7,
            vec![raw(
                &[u8::from(*delivered)],
                &format!("delivered (bool): {}", u8::from(*delivered)),
            )],
        ),
        HubReply::Topics(list) => (
            8,
            [
                counted(&list.patterns, "patterns"),
                counted(&list.names, "names"),
                vec![raw(
                    &[u8::from(list.truncated)],
                    &format!("truncated (bool): {}", u8::from(list.truncated)),
                )],
            ]
            .concat(),
        ),
    };
    let names = [
        "Status",
        "Subscribed",
        "Unsubscribed",
        "Published",
        "Serving",
        "Unserved",
        "Requested",
        "Responded",
        "Topics",
    ];
    let mut fields = vec![tag(
        t,
        &format!("hub reply tag (u32): {t} = {}", names[t as usize]),
    )];
    fields.extend(body);
    fields
}

fn reply_vector(name: &'static str, id: u64, reply: HubReply) -> Vector {
    let mut fields = vec![tag(1, "frame tag (u32): 1 = Reply"), u64f(id, "id")];
    fields.extend(reply_fields(&reply));
    let body = encoding::encode(&reply).unwrap();
    Vector {
        name,
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::Reply { id, body })),
        json: (
            "frame",
            json!({"Reply": {"id": id, "reply": serde_json::to_value(&reply).unwrap()}}),
        ),
        fields: framed(fields),
    }
}

/// A `ReplyFds` announcing `fds` descriptors (sent with its first byte).
fn reply_fds_vector(name: &'static str, id: u64, fds: u32, reply: HubReply) -> Vector {
    let mut fields = vec![
        tag(7, "frame tag (u32): 7 = ReplyFds"),
        u64f(id, "id"),
        fds_field(fds),
    ];
    fields.extend(reply_fields(&reply));
    let body = encoding::encode(&reply).unwrap();
    Vector {
        name,
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::ReplyFds { id, fds, body })),
        json: (
            "frame",
            json!({"ReplyFds": {"id": id, "fds": fds, "reply": serde_json::to_value(&reply).unwrap()}}),
        ),
        fields: framed(fields),
    }
}

/// A hub event: its tag, then its fields.
fn event_fields(event: &HubEvent) -> Vec<Field> {
    let (t, body): (u32, Vec<Field>) = match event {
        HubEvent::Message {
            topic,
            sequence,
            payload,
        } => (
            0,
            [
                text(topic, "topic"),
                vec![u64f(*sequence, "sequence")],
                ascii(payload, "payload"),
            ]
            .concat(),
        ),
        HubEvent::MessageMemfd {
            topic,
            sequence,
            len,
        } => (
            3,
            [
                text(topic, "topic"),
                vec![u64f(*sequence, "sequence"), u64f(*len, "len")],
            ]
            .concat(),
        ),
        HubEvent::Request {
            token,
            name,
            uid,
            pid,
            payload,
        } => (
            1,
            [
                vec![u64f(*token, "token")],
                text(name, "name"),
                vec![u32f(*uid, "uid"), u32f(*pid, "pid")],
                ascii(payload, "payload"),
            ]
            .concat(),
        ),
        HubEvent::Response { request, outcome } => {
            let mut b = vec![u64f(*request, "request")];
            b.extend(match outcome {
                Outcome::Reply { payload } => [
                    vec![tag(0, "outcome tag (u32): 0 = Reply")],
                    ascii(payload, "payload"),
                ]
                .concat(),
                Outcome::ResponderGone => vec![tag(1, "outcome tag (u32): 1 = ResponderGone")],
                Outcome::Timeout => vec![tag(2, "outcome tag (u32): 2 = Timeout")],
                Outcome::ReplyTooLarge { len } => vec![
                    tag(3, "outcome tag (u32): 3 = ReplyTooLarge"),
                    u64f(*len, "len"),
                ],
                Outcome::Failed { message } => [
                    vec![tag(4, "outcome tag (u32): 4 = Failed")],
                    text(message, "message"),
                ]
                .concat(),
            });
            (2, b)
        }
    };
    let names = ["Message", "Request", "Response", "MessageMemfd"];
    let mut fields = vec![tag(
        t,
        &format!("hub event tag (u32): {t} = {}", names[t as usize]),
    )];
    fields.extend(body);
    fields
}

fn event_vector(name: &'static str, stream: u64, event: HubEvent) -> Vector {
    let mut fields = vec![tag(2, "frame tag (u32): 2 = Event"), u64f(stream, "stream")];
    fields.extend(event_fields(&event));
    Vector {
        name,
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::Event {
            stream,
            body: encoding::encode(&event).unwrap(),
        })),
        json: (
            "frame",
            json!({"Event": {"stream": stream, "event": serde_json::to_value(&event).unwrap()}}),
        ),
        fields: framed(fields),
    }
}

/// An `EventFds` announcing `fds` descriptors (sent with its first byte).
fn event_fds_vector(name: &'static str, stream: u64, fds: u32, event: HubEvent) -> Vector {
    let mut fields = vec![
        tag(8, "frame tag (u32): 8 = EventFds"),
        u64f(stream, "stream"),
        fds_field(fds),
    ];
    fields.extend(event_fields(&event));
    Vector {
        name,
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::EventFds {
            stream,
            fds,
            body: encoding::encode(&event).unwrap(),
        })),
        json: (
            "frame",
            json!({"EventFds": {"stream": stream, "fds": fds, "event": serde_json::to_value(&event).unwrap()}}),
        ),
        fields: framed(fields),
    }
}

fn error_vector(
    name: &'static str,
    id: Option<u64>,
    code: ErrorCode,
    code_name: &str,
    message: &str,
) -> Vector {
    let mut fields = vec![tag(4, "frame tag (u32): 4 = Error")];
    match id {
        Some(id) => {
            fields.push(raw(&[1], "id presence: 1 = present"));
            fields.push(u64f(id, "id"));
        }
        None => fields.push(raw(&[0], "id presence: 0 = absent")),
    }
    fields.push(tag(
        code.wire(),
        &format!("code (u32): {} = {code_name}", code.wire()),
    ));
    fields.extend(text(message, "message"));
    let frame = ErrorFrame {
        id,
        code,
        message: message.into(),
    };
    Vector {
        name,
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::Error(frame))),
        json: (
            "frame",
            json!({"Error": {"id": id, "code": code.wire(), "message": message}}),
        ),
        fields: framed(fields),
    }
}

fn vectors(token: &SessionToken) -> Vec<Vector> {
    let hs = HandshakeFrame::new(token);
    let mut out = vec![Vector {
        name: "handshake",
        direction: "handshake",
        fields: vec![
            u32f(40, "length prefix"),
            raw(b"KYHL", "magic: ASCII \"KYHL\""),
            u32f(2, "protocol version"),
            raw(token.as_bytes(), "token: 32 raw bytes (00 01 .. 1f)"),
        ],
        json: (
            "handshake",
            json!({"magic": "KYHL", "protocol_version": 2, "token_hex": &*token.to_hex()}),
        ),
        library: Some(hs.to_vec()),
    }];
    out.push(transport_request("ping", 1, RequestKind::Ping));
    out.push(transport_request("shutdown", 2, RequestKind::Shutdown));
    out.push(Vector {
        name: "expect",
        direction: "client_to_daemon",
        library: Some({
            let mut buf = BytesMut::new();
            encode_request(
                &mut buf,
                0,
                RequestKind::Expect,
                Some(&("hub", 2u32)),
                usize::MAX,
            )
            .expect("request encodes");
            buf.to_vec()
        }),
        json: (
            "request",
            json!({"id": 0, "kind": "Expect", "expect": {"service": "hub", "service_version": 2}}),
        ),
        fields: framed(
            [
                header(0, RequestKind::Expect.tag(), "Expect"),
                text("hub", "service"),
                vec![u32f(2, "service_version")],
            ]
            .concat(),
        ),
    });
    out.push(call_vector("status", 3, HubRequest::Status));
    out.push(call_vector(
        "subscribe",
        4,
        HubRequest::Subscribe {
            sid: 1,
            pattern: "news.*".into(),
            lag: Lag::Disconnect,
        },
    ));
    out.push(call_vector(
        "subscribe_drop_oldest",
        7,
        HubRequest::Subscribe {
            sid: 2,
            pattern: "sensors.>".into(),
            lag: Lag::DropOldest,
        },
    ));
    out.push(call_vector(
        "unsubscribe",
        5,
        HubRequest::Unsubscribe { sid: 1 },
    ));
    out.push(call_vector(
        "publish",
        6,
        HubRequest::Publish {
            topic: "news.local".into(),
            payload: Payload::from("hello"),
        },
    ));
    out.push(call_vector(
        "serve",
        8,
        HubRequest::Serve {
            name: "svc.clock".into(),
        },
    ));
    out.push(call_vector(
        "unserve",
        9,
        HubRequest::Unserve {
            name: "svc.clock".into(),
        },
    ));
    out.push(call_vector(
        "request",
        10,
        HubRequest::Request {
            name: "svc.clock".into(),
            timeout_ms: 2000,
            payload: Payload::from("now?"),
        },
    ));
    out.push(call_vector(
        "respond",
        11,
        HubRequest::Respond {
            token: 5,
            payload: Payload::from("12:00"),
        },
    ));
    out.push(call_vector(
        "fail",
        12,
        HubRequest::Fail {
            token: 5,
            failure: Failure::Failed {
                message: "no clock".into(),
            },
        },
    ));
    out.push(call_vector(
        "fail_reply_too_large",
        13,
        HubRequest::Fail {
            token: 6,
            failure: Failure::ReplyTooLarge { len: 20_000_000 },
        },
    ));
    out.push(call_vector("topics", 14, HubRequest::Topics));
    out.push(transport_request("accept_fds", 15, RequestKind::AcceptFds));
    out.push(call_fds_vector(
        "call_fds_publish_memfd",
        16,
        1,
        HubRequest::PublishMemfd {
            topic: "news.local".into(),
        },
    ));

    let welcome = Welcome {
        protocol_version: 2,
        service: "hub".into(),
        service_version: 2,
        software_version: "0.1.0".into(),
        instance_id: 0x0123_4567_89ab_cdef,
        connection_id: 7,
        max_frame_len: 16 * 1024 * 1024,
    };
    out.push(Vector {
        name: "welcome",
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::Welcome(welcome.clone()))),
        json: (
            "frame",
            json!({"Welcome": serde_json::to_value(&welcome).unwrap()}),
        ),
        fields: framed(
            [
                vec![
                    tag(0, "frame tag (u32): 0 = Welcome"),
                    u32f(2, "protocol_version"),
                ],
                text("hub", "service"),
                vec![u32f(2, "service_version")],
                text("0.1.0", "software_version"),
                vec![
                    Field(
                        welcome.instance_id.to_le_bytes().to_vec(),
                        "instance_id (u64): 0x0123456789abcdef".into(),
                    ),
                    u64f(7, "connection_id"),
                    u32f(16 * 1024 * 1024, "max_frame_len"),
                ],
            ]
            .concat(),
        ),
    });
    out.push(Vector {
        name: "ack",
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::Ack { id: 1 })),
        json: ("frame", json!({"Ack": {"id": 1}})),
        fields: framed(vec![tag(3, "frame tag (u32): 3 = Ack"), u64f(1, "id")]),
    });
    out.push(reply_vector(
        "reply_status",
        3,
        HubReply::Status(HubStatus {
            authenticated: 2,
            pending: 0,
            topics: 1,
            subscriptions: 1,
            names: 1,
            requests_in_flight: 0,
            uptime_ms: 61_000,
            version: "0.1.0".into(),
        }),
    ));
    out.push(reply_vector("reply_subscribed", 4, HubReply::Subscribed));
    out.push(reply_vector(
        "reply_unsubscribed",
        5,
        HubReply::Unsubscribed,
    ));
    out.push(reply_vector(
        "reply_published",
        6,
        HubReply::Published { receivers: 2 },
    ));
    out.push(reply_vector("reply_serving", 8, HubReply::Serving));
    out.push(reply_vector("reply_unserved", 9, HubReply::Unserved));
    out.push(reply_vector("reply_requested", 10, HubReply::Requested));
    out.push(reply_vector(
        "reply_responded",
        11,
        HubReply::Responded { delivered: true },
    ));
    out.push(reply_vector(
        "reply_topics",
        14,
        HubReply::Topics(TopicList {
            patterns: vec![("news.*".into(), 2)],
            names: vec![("svc.clock".into(), 1)],
            truncated: false,
        }),
    ));
    out.push(event_vector(
        "event",
        1,
        HubEvent::Message {
            topic: "news.local".into(),
            sequence: 1,
            payload: Payload::from("hello"),
        },
    ));
    out.push(event_fds_vector(
        "event_fds_message_memfd",
        1,
        1,
        HubEvent::MessageMemfd {
            topic: "news.local".into(),
            sequence: 2,
            len: 1_048_576,
        },
    ));
    out.push(event_vector(
        "event_request",
        0,
        HubEvent::Request {
            token: 5,
            name: "svc.clock".into(),
            uid: 1000,
            pid: 4242,
            payload: Payload::from("now?"),
        },
    ));
    out.push(event_vector(
        "event_response",
        0,
        HubEvent::Response {
            request: 10,
            outcome: Outcome::Reply {
                payload: Payload::from("12:00"),
            },
        },
    ));
    for (name, outcome) in [
        ("event_response_responder_gone", Outcome::ResponderGone),
        ("event_response_timeout", Outcome::Timeout),
        (
            "event_response_reply_too_large",
            Outcome::ReplyTooLarge { len: 20_000_000 },
        ),
        (
            "event_response_failed",
            Outcome::Failed {
                message: "no clock".into(),
            },
        ),
    ] {
        out.push(event_vector(
            name,
            0,
            HubEvent::Response {
                request: 10,
                outcome,
            },
        ));
    }
    out.push(reply_fds_vector(
        "reply_fds",
        16,
        1,
        HubReply::Published { receivers: 2 },
    ));
    out.push(Vector {
        name: "lagged",
        direction: "daemon_to_client",
        library: Some(daemon(&DaemonFrame::Lagged {
            stream: 2,
            missed: 17,
        })),
        json: ("frame", json!({"Lagged": {"stream": 2, "missed": 17}})),
        fields: framed(vec![
            tag(6, "frame tag (u32): 6 = Lagged"),
            u64f(2, "stream"),
            u64f(17, "missed"),
        ]),
    });
    for (name, reason, n) in [
        ("closing_shutdown", CloseReason::Shutdown, 0),
        ("closing_slow_consumer", CloseReason::SlowConsumer, 1),
    ] {
        out.push(Vector {
            name,
            direction: "daemon_to_client",
            library: Some(daemon(&DaemonFrame::Closing(reason))),
            json: (
                "frame",
                json!({"Closing": serde_json::to_value(reason).unwrap()}),
            ),
            fields: framed(vec![
                tag(5, "frame tag (u32): 5 = Closing"),
                tag(n, &format!("reason (u32): {n} = {reason:?}")),
            ]),
        });
    }
    // One error per code: the transport's, then the hub's.
    let errors: [(&'static str, Option<u64>, TransportCode, &str); 20] = [
        (
            "error_handshake_expected",
            None,
            TransportCode::HandshakeExpected,
            "the first frame must be the 40-byte handshake; its length prefix says 12",
        ),
        (
            "error_bad_magic",
            None,
            TransportCode::BadMagic,
            "handshake magic is not KYHL",
        ),
        (
            "error_unsupported_version",
            None,
            TransportCode::UnsupportedVersion,
            "protocol version 1 is not supported; this daemon speaks [2]",
        ),
        (
            "error_bad_token",
            None,
            TransportCode::BadToken,
            "the token does not match this daemon's session token",
        ),
        (
            "error_auth_timeout",
            None,
            TransportCode::AuthTimeout,
            "no complete handshake within 5.0 s",
        ),
        (
            "error_peer_not_allowed",
            None,
            TransportCode::PeerNotAllowed,
            "uid 1001 may not use this daemon",
        ),
        (
            "error_too_many_unauthenticated",
            None,
            TransportCode::TooManyUnauthenticated,
            "too many unauthenticated connections; this one held a pending slot past its grace while others waited",
        ),
        (
            "error_too_many_connections",
            None,
            TransportCode::TooManyConnections,
            "connection limit of 4096 reached",
        ),
        (
            "error_frame_too_large",
            None,
            TransportCode::FrameTooLarge,
            "frame of 16777217 bytes is over the limit of 16777216 bytes",
        ),
        (
            "error_malformed",
            None,
            TransportCode::Malformed,
            "request frame of 8 bytes is shorter than its 12-byte header",
        ),
        (
            "error_unknown_request",
            Some(9),
            TransportCode::UnknownRequest,
            "request kind 6 is unknown to this daemon",
        ),
        (
            "error_bad_request",
            Some(10),
            TransportCode::BadRequest,
            "not a request of service hub v2: invalid value: integer `11`, expected variant index 0 <= i < 11",
        ),
        (
            "error_not_permitted",
            Some(11),
            TransportCode::NotPermitted,
            "only uid 1000 may shut the daemon down",
        ),
        (
            "error_shutting_down",
            None,
            TransportCode::ShuttingDown,
            "the daemon is shutting down",
        ),
        (
            "error_internal",
            Some(12),
            TransportCode::Internal,
            "the reply could not be sent: frame of 16777300 bytes is over the limit of 16777216 bytes",
        ),
        (
            "error_over_budget",
            None,
            TransportCode::OverBudget,
            "the daemon's memory budget of 268435456 bytes is used up and this connection held the most (16777216 bytes)",
        ),
        (
            "error_wrong_service",
            None,
            TransportCode::WrongService,
            "this daemon serves hub version 2, not notes version 1",
        ),
        (
            "error_descriptors_not_accepted",
            Some(16),
            TransportCode::DescriptorsNotAccepted,
            "this connection has not sent AcceptFds: its descriptors were closed unread",
        ),
        (
            "error_descriptor_mismatch",
            None,
            TransportCode::DescriptorMismatch,
            "the frame at byte 16 announces 1 file descriptors, 0 arrived with it",
        ),
        (
            "error_too_many_descriptors",
            None,
            TransportCode::TooManyDescriptors,
            "a CallFds carries 1 to 8 descriptors; this one announces 9",
        ),
    ];
    for (name, id, code, message) in errors {
        out.push(error_vector(
            name,
            id,
            code.into(),
            &format!("{code:?}"),
            message,
        ));
    }
    out.push(error_vector(
        "error_hub_invalid_topic",
        Some(13),
        ErrorCode::Service(0),
        "service code 0: hub InvalidTopic",
        "invalid topic \"a..b\": has an empty token (a leading, trailing or doubled '.')",
    ));
    out.push(error_vector(
        "error_hub_shutting_down",
        Some(14),
        ErrorCode::Service(1),
        "service code 1: hub ShuttingDown",
        "the daemon is shutting down; nothing was published or sent",
    ));
    out.push(error_vector(
        "error_hub_too_many_subscriptions",
        Some(15),
        ErrorCode::Service(2),
        "service code 2: hub TooManySubscriptions",
        "this connection already has 4096 subscriptions, the most allowed",
    ));
    for (name, id, n, what, message) in [
        (
            "error_hub_sid_in_use",
            16,
            3,
            "SidInUse",
            "subscription id 1 is already in use on this connection",
        ),
        (
            "error_hub_no_responders",
            17,
            4,
            "NoResponders",
            "no responders: nobody serves \"svc.clock\"",
        ),
        (
            "error_hub_busy",
            18,
            5,
            "Busy",
            "every responder of \"svc.clock\" has 256 requests in flight already",
        ),
        (
            "error_hub_too_many_names",
            19,
            6,
            "TooManyNames",
            "this connection already serves 256 names, the most allowed",
        ),
        (
            "error_hub_too_large",
            20,
            7,
            "TooLarge",
            "the event this would send is 16777224 bytes, over the frame limit of 16777216 bytes; nothing was sent",
        ),
        (
            "error_hub_bad_memfd",
            16,
            8,
            "BadMemfd",
            "the memfd holds 1073741825 bytes, over the limit of 1073741824; nothing was published",
        ),
    ] {
        out.push(error_vector(
            name,
            Some(id),
            ErrorCode::Service(n),
            &format!("service code {n}: hub {what}"),
            message,
        ));
    }
    out
}

fn negatives(token: &SessionToken) -> Vec<Negative> {
    let good = HandshakeFrame::new(token).to_vec();
    let token_fields = |t: &[u8], what: &str| raw(t, what);
    let handshake = |name, description, fields: Vec<Field>, code: TransportCode, after| Negative {
        vector: Vector {
            name,
            direction: "handshake",
            fields,
            json: ("handshake", Value::Null),
            library: None,
        },
        description,
        error_code: Some(code.tag()),
        error_id: None,
        closes: true,
        decided_after: after,
    };
    let post = |name, description, fields: Vec<Field>, code: Option<ErrorCode>, id, after| {
        let closes = match code {
            Some(ErrorCode::Transport(c)) => c.closes_connection(),
            _ => false,
        };
        Negative {
            vector: Vector {
                name,
                direction: "client_to_daemon",
                fields,
                json: ("request", Value::Null),
                library: None,
            },
            description,
            error_code: code.map(ErrorCode::wire),
            error_id: id,
            closes,
            decided_after: after,
        }
    };
    let client = |name, description, fields: Vec<Field>| {
        let len = bytes_of(&fields).len();
        Negative {
            vector: Vector {
                name,
                direction: "daemon_to_client",
                fields,
                json: ("frame", Value::Null),
                library: None,
            },
            description,
            error_code: None,
            error_id: None,
            closes: true,
            decided_after: len,
        }
    };
    let mut bad_token = token.as_bytes().to_vec();
    bad_token[31] = 0x1e;
    vec![
        handshake(
            "handshake_wrong_length",
            "first length prefix 41",
            vec![raw(
                &41u32.to_le_bytes(),
                "length prefix (u32): 41 (not 40: rejected here)",
            )],
            TransportCode::HandshakeExpected,
            4,
        ),
        handshake(
            "handshake_bad_magic",
            "magic KYHM",
            vec![
                u32f(40, "length prefix"),
                raw(b"KYHM", "magic: ASCII \"KYHM\" (wrong)"),
                u32f(2, "protocol version"),
                token_fields(&good[12..], "token"),
            ],
            TransportCode::BadMagic,
            44,
        ),
        handshake(
            "handshake_version_1",
            "protocol version 1 (a client of the first protocol)",
            vec![
                u32f(40, "length prefix"),
                raw(b"KYHL", "magic: ASCII \"KYHL\""),
                raw(
                    &1u32.to_le_bytes(),
                    "protocol version (u32): 1 (unsupported)",
                ),
                token_fields(&good[12..], "token"),
            ],
            TransportCode::UnsupportedVersion,
            44,
        ),
        handshake(
            "handshake_bad_token",
            "last token byte wrong",
            vec![
                u32f(40, "length prefix"),
                raw(b"KYHL", "magic: ASCII \"KYHL\""),
                u32f(2, "protocol version"),
                token_fields(&bad_token, "token: last byte 1e, not 1f"),
            ],
            TransportCode::BadToken,
            44,
        ),
        handshake(
            "request_before_handshake",
            "a Ping as the first frame",
            vec![
                raw(
                    &12u32.to_le_bytes(),
                    "length prefix (u32): 12 (not 40: rejected here)",
                ),
                raw(&1u64.to_le_bytes(), "id (u64): 1 (not looked at)"),
                raw(&1u32.to_le_bytes(), "kind (u32): 1 = Ping (not looked at)"),
            ],
            TransportCode::HandshakeExpected,
            4,
        ),
        post(
            "frame_too_large",
            "after Welcome, length prefix 16777217",
            vec![raw(
                &(16_777_217u32).to_le_bytes(),
                "length prefix (u32): 16777217 = 0x01000001 (over 16777216)",
            )],
            Some(TransportCode::FrameTooLarge.into()),
            None,
            4,
        ),
        post(
            "malformed_too_short",
            "after Welcome, an 8-byte payload",
            framed(vec![raw(
                &10u64.to_le_bytes(),
                "id (u64): 10; the kind is missing",
            )]),
            Some(TransportCode::Malformed.into()),
            None,
            12,
        ),
        post(
            "unknown_request_kind",
            "after Welcome, kind 6 (the first kind this version does not define)",
            framed(vec![
                u64f(9, "id"),
                tag(
                    REQUEST_KINDS,
                    &format!("kind (u32): {REQUEST_KINDS} (unknown)"),
                ),
            ]),
            Some(TransportCode::UnknownRequest.into()),
            Some(9),
            16,
        ),
        post(
            "ping_with_body",
            "after Welcome, a Ping with one byte after its header",
            framed(vec![
                u64f(15, "id"),
                tag(1, "kind (u32): 1 = Ping"),
                raw(&[0], "a byte that a Ping does not have"),
            ]),
            Some(TransportCode::BadRequest.into()),
            Some(15),
            17,
        ),
        post(
            "bad_request_unknown_tag",
            "after Welcome, a Call whose hub request tag is 11",
            framed(vec![
                u64f(10, "id"),
                tag(0, "kind (u32): 0 = Call"),
                tag(11, "hub request tag (u32): 11 (unknown)"),
            ]),
            Some(TransportCode::BadRequest.into()),
            Some(10),
            20,
        ),
        post(
            "bad_request_truncated",
            "after Welcome, a Publish whose topic is shorter than its length",
            framed(vec![
                u64f(11, "id"),
                tag(0, "kind (u32): 0 = Call"),
                tag(3, "hub request tag (u32): 3 = Publish"),
                raw(&5u64.to_le_bytes(), "topic length: 5"),
                raw(b"news", "topic: only 4 bytes (\"news\")"),
            ]),
            Some(TransportCode::BadRequest.into()),
            Some(11),
            32,
        ),
        post(
            "bad_request_bad_utf8",
            "after Welcome, a Publish whose topic is not UTF-8",
            framed(vec![
                u64f(12, "id"),
                tag(0, "kind (u32): 0 = Call"),
                tag(3, "hub request tag (u32): 3 = Publish"),
                raw(&2u64.to_le_bytes(), "topic length: 2"),
                raw(&[0xc3, 0x28], "topic: c3 28 is not UTF-8"),
            ]),
            Some(TransportCode::BadRequest.into()),
            Some(12),
            30,
        ),
        post(
            "bad_request_trailing_byte",
            "after Welcome, a Status with one byte after it",
            framed(vec![
                u64f(13, "id"),
                tag(0, "kind (u32): 0 = Call"),
                tag(0, "hub request tag (u32): 0 = Status"),
                raw(&[0], "extra byte after the request"),
            ]),
            Some(TransportCode::BadRequest.into()),
            Some(13),
            21,
        ),
        post(
            "invalid_topic_empty",
            "after Welcome, Publish on \"\"",
            framed(vec![
                u64f(7, "id"),
                tag(0, "kind (u32): 0 = Call"),
                tag(3, "hub request tag (u32): 3 = Publish"),
                raw(&0u64.to_le_bytes(), "topic length: 0 (empty topic)"),
                raw(&0u64.to_le_bytes(), "payload length: 0"),
            ]),
            Some(ErrorCode::Service(0)),
            Some(7),
            36,
        ),
        client(
            "server_unknown_tag",
            "daemon frame with tag 9",
            framed(vec![tag(
                frame_tag::EVENT_FDS + 1,
                &format!("frame tag (u32): {} (unknown)", frame_tag::EVENT_FDS + 1),
            )]),
        ),
        client(
            "server_bad_option_tag",
            "Error with presence byte 2",
            framed(vec![
                tag(4, "frame tag (u32): 4 = Error"),
                raw(&[2], "id presence: 2 (invalid)"),
                raw(&9u64.to_le_bytes(), "(not looked at)"),
                raw(&10u32.to_le_bytes(), "(not looked at)"),
                raw(&0u64.to_le_bytes(), "(not looked at)"),
            ]),
        ),
        client(
            "server_unknown_error_code",
            "Error with transport code 20",
            framed(vec![
                tag(4, "frame tag (u32): 4 = Error"),
                raw(&[0], "id presence: 0 = absent"),
                raw(
                    &(TransportCode::ALL.len() as u32).to_le_bytes(),
                    &format!(
                        "code (u32): {} (no such transport code)",
                        TransportCode::ALL.len()
                    ),
                ),
                raw(&0u64.to_le_bytes(), "message length: 0"),
            ]),
        ),
        client(
            "server_unknown_close_reason",
            "Closing with reason 2",
            framed(vec![
                tag(5, "frame tag (u32): 5 = Closing"),
                raw(&2u32.to_le_bytes(), "reason (u32): 2 (unknown)"),
            ]),
        ),
        client(
            "server_reply_trailing_byte",
            "a Reply whose hub reply has a byte after it",
            framed(vec![
                tag(1, "frame tag (u32): 1 = Reply"),
                u64f(6, "id"),
                tag(3, "hub reply tag (u32): 3 = Published"),
                u64f(2, "receivers"),
                raw(&[0], "extra byte after the reply"),
            ]),
        ),
    ]
}

fn main() {
    let token = SessionToken::from_bytes(std::array::from_fn(|i| i as u8));
    let vectors = vectors(&token);
    let negatives = negatives(&token);
    for v in &vectors {
        let bytes = bytes_of(&v.fields);
        if let Some(library) = &v.library {
            assert_eq!(
                &bytes, library,
                "{}: the dump differs from the library's encoding",
                v.name
            );
        }
    }
    let hex = |fields: &[Field]| hex::encode(bytes_of(fields));
    let json_vectors: Vec<Value> = vectors
        .iter()
        .map(|v| {
            let mut o = json!({"name": v.name, "direction": v.direction, "hex": hex(&v.fields)});
            o[v.json.0] = v.json.1.clone();
            o
        })
        .collect();
    let json_negative: Vec<Value> = negatives
        .iter()
        .map(|n| {
            json!({
                "name": n.vector.name,
                "direction": n.vector.direction,
                "description": n.description,
                "hex": hex(&n.vector.fields),
                "error_code": n.error_code,
                "error_id": n.error_id,
                "closes": n.closes,
                "decided_after": n.decided_after,
            })
        })
        .collect();
    let golden = json!({
        "about": "Golden vectors of the keyhole wire protocol, version 2, with the hub service; proto-spec.md shows the same bytes annotated. Written by `cargo run --example gen_vectors`.",
        "conventions": {
            "hex": "the whole frame as lowercase hex without spaces, length prefix included",
            "direction": "handshake: the client's first frame; client_to_daemon: a request frame; daemon_to_client: a daemon frame",
            "serde": "hub messages are in serde_json's externally tagged form: a variant without fields is a string (\"Status\", \"Published\"), a variant with fields is an object with one key, the variant's name, whose value is its fields ({\"Subscribe\": {\"sid\": 1, \"pattern\": \"news.*\", \"lag\": \"Disconnect\"}}), or the one value of a variant that wraps one ({\"Status\": {...figures...}}); payloads (bytes) are arrays of numbers 0-255; a tuple (a TopicList entry) is an array [text, count]",
            "request": "{\"id\": u64, \"kind\": \"Call\" | \"Ping\" | \"Shutdown\" | \"Expect\" | \"AcceptFds\" | \"CallFds\", \"call\": the hub request (serde form), present only for a Call or a CallFds, \"fds\": the u32 count of descriptors, present only for a CallFds, \"expect\": {\"service\", \"service_version\"}, present only for an Expect}",
            "frame": "the daemon frame: {\"Welcome\": {its fields by name}}, {\"Reply\": {\"id\", \"reply\": the hub reply (serde form)}}, {\"Event\": {\"stream\", \"event\": the hub event (serde form)}}, {\"Ack\": {\"id\"}}, {\"Error\": {\"id\" (null: absent), \"code\" (the u32 on the wire), \"message\"}}, {\"Closing\": \"Shutdown\" | \"SlowConsumer\"}, {\"Lagged\": {\"stream\", \"missed\"}}, {\"ReplyFds\": {\"id\", \"fds\", \"reply\"}}, {\"EventFds\": {\"stream\", \"fds\", \"event\"}}; a frame or request with fds is its bytes only: its descriptors travel as SCM_RIGHTS with its first byte (proto-spec.md section 19)",
            "handshake": "the fields of the handshake vector; the negative handshakes carry the test token, so a daemon with another token answers them with the same codes only because it checks magic and version before the token",
            "negative": "error_code: the u32 code of the Error the daemon answers with (null: the bytes come from the daemon and a client must treat them as a protocol error and close); error_id: the id carried by that Error (null: absent); closes: whether the daemon closes the connection after it; decided_after: how many bytes the receiver needs before it gives its verdict; bytes after them are not looked at"
        },
        "test_token_hex": &*token.to_hex(),
        "vectors": json_vectors,
        "negative": json_negative,
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("tests/vectors/golden.json");
    let text = serde_json::to_string_pretty(&golden).unwrap() + "\n";
    std::fs::write(&path, text).expect("write golden.json");
    println!("wrote {}", path.display());

    // The dumps in proto-spec.md.
    let spec_path = root.join("proto-spec.md");
    let spec = std::fs::read_to_string(&spec_path).expect("read proto-spec.md");
    let mut out = String::new();
    let mut lines = spec.lines();
    let mut placed = Vec::new();
    let all: Vec<(&str, &[Field])> = vectors
        .iter()
        .map(|v| (v.name, &v.fields[..]))
        .chain(
            negatives
                .iter()
                .map(|n| (n.vector.name, &n.vector.fields[..])),
        )
        .collect();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let Some(name) = line.trim().strip_prefix("```text vector=").map(str::trim) else {
            continue;
        };
        for inner in lines.by_ref() {
            if inner.trim().starts_with("```") {
                break;
            }
        }
        match all.iter().find(|(n, _)| *n == name) {
            Some((_, fields)) => {
                out.push_str(&dump(fields));
                placed.push(name.to_string());
            }
            None => panic!("proto-spec.md has a block for `{name}`, which is no vector"),
        }
        out.push_str("```\n");
    }
    std::fs::write(&spec_path, out).expect("write proto-spec.md");
    for (name, fields) in &all {
        if !placed.iter().any(|p| p == name) {
            println!(
                "no block in proto-spec.md for `{name}`:\n```text vector={name}\n{}```",
                dump(fields)
            );
        }
    }
    let _ = Bytes::new();
}
