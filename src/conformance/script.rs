//! The steps of a conformance run, as data: what the driver is told to do
//! (`ops`, the instruction's JSON of proto-spec.md Part IV), what its client
//! must send for it (byte for byte), how the kit answers, and what the
//! driver must report its client saw.
//!
//! Steps on the *main* connection are answered by the kit's hub service
//! (the framework's real session: handshake, `Ping`, framing errors and
//! `Internal` are the framework's own). Steps on *extra* connections are
//! played by a [`Script`] of raw bytes: the kit misbehaves there on
//! purpose, to drive the client-side checks.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::wire::{self, Captures, Pattern};
use crate::encoding::Payload;
use crate::hub::{Failure, HubEvent, HubReply, HubRequest, HubStatus, Lag, Outcome, TopicList};
use crate::limits::MAX_FRAME_LEN;
use crate::transport::{CloseReason, RequestKind, TransportCode, Welcome};

/// The topic of the kit's instructions (the driver subscribes to it).
pub const CONTROL_TOPIC: &str = "conformance.control";
/// The topic the driver publishes its reports on.
pub const REPORT_TOPIC: &str = "conformance.report";
/// The name of the first step: connect, subscribe, report.
pub const HELLO: &str = "hello";
/// Payloads longer than this are written `{"fill", "len"}` in instructions
/// and reports, not as hex.
pub const HEX_MAX: usize = 4096;
/// The frame limit the kit announces on its extra connections.
pub const EXTRA_FRAME_LEN: u32 = 1024;

/// A frame the client must send, built when it is due (it may carry a
/// value the client chose at an earlier step).
pub(crate) type FrameSpec = Arc<dyn Fn(&Captures) -> Pattern + Send + Sync>;
/// Bytes the kit writes, built when they are due.
pub(crate) type Bytes = Arc<dyn Fn(&Captures) -> Vec<u8> + Send + Sync>;

/// What the driver must report for one op.
#[derive(Debug, Clone)]
pub(crate) enum Expected {
    /// Exactly this result.
    Is(Value),
    /// Any of these (the spec allows each).
    AnyOf(Vec<Value>),
}

impl Expected {
    pub(crate) fn accepts(&self, got: &Value) -> bool {
        match self {
            Expected::Is(want) => want == got,
            Expected::AnyOf(wants) => wants.contains(got),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Expected::Is(want) => want.to_string(),
            Expected::AnyOf(wants) => wants
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(" or "),
        }
    }
}

/// How the kit's hub service answers one `Call` of the main connection.
#[derive(Clone)]
pub(crate) enum Answer {
    /// This reply, after pushing these events.
    Reply(HubReply, Vec<Push>),
    /// A hub error, by its wire code (1000 + n).
    Error(u32),
    /// `Requested`, then (shortly after) a `Response` with this outcome.
    Requested(Outcome),
    /// A `Topics` reply too large for the frame limit: the framework
    /// answers `Error Internal` with the request's id.
    Oversized,
}

/// An event the kit pushes on the main connection.
#[derive(Clone)]
pub(crate) struct Push {
    /// The subscription (by the label of its `Subscribe`), or stream 0.
    pub(crate) stream: Option<&'static str>,
    pub(crate) event: HubEvent,
}

/// One act of an extra connection.
#[derive(Clone)]
pub(crate) enum Act {
    /// Read the 44 bytes of the handshake and check them.
    Handshake,
    /// Read one frame and check it (an `Expect` of the hub that comes
    /// before the first checked frame is answered and skipped: a client
    /// may pipeline one).
    Read(FrameSpec),
    /// Read only the first this many bytes of the next frame and check
    /// them (the rest stays unread: the client's write of a frame larger
    /// than the socket buffers cannot complete).
    ReadStart(FrameSpec, usize),
    /// Note the time: the next connection's arrival is measured from it
    /// (the pause of a busy retry). Put just before the refusal is
    /// written, so that a client cannot have read it earlier.
    Stamp,
    /// Write these bytes in one write.
    Write(Bytes),
    /// Write these bytes one byte per write, a millisecond apart.
    WriteSplit(Bytes),
    /// Wait until the client has sent something, without reading it.
    WaitUnread,
    /// End the connection with end of stream (after what was written).
    Eof,
    /// End the connection while what the client sent is unread, so that
    /// its next read fails with `ECONNRESET` (Linux).
    Reset,
}

/// The acts of one extra connection.
#[derive(Clone)]
pub(crate) struct Script {
    pub(crate) acts: Vec<Act>,
    /// A conforming client may not open this connection at all.
    pub(crate) optional: bool,
    /// Played again for every further connection of the step (a client
    /// retrying until its connect timeout); opened at least once unless
    /// `optional`.
    pub(crate) repeat: bool,
}

/// One step of the run.
#[derive(Clone)]
pub(crate) struct Step {
    pub(crate) name: &'static str,
    /// What it checks, in a few words (for `--list` and the spec).
    pub(crate) about: &'static str,
    pub(crate) ops: Vec<Value>,
    pub(crate) results: Vec<Expected>,
    /// Frames the main connection must carry during the step, in order.
    pub(crate) frames: Vec<FrameSpec>,
    /// Answers to the step's `Call`s on the main connection, in order.
    pub(crate) answers: Vec<Answer>,
    /// Events pushed on the main connection right after the instruction.
    pub(crate) events: Vec<Push>,
    /// The step's extra connections, in the order they are opened.
    pub(crate) extra: Vec<Script>,
    /// The connect timeout the step imposes on a client that keeps
    /// retrying busy refusals: its attempts must go on until about then.
    pub(crate) give_up: Option<Duration>,
}

impl Step {
    fn new(name: &'static str, about: &'static str) -> Self {
        Self {
            name,
            about,
            ops: Vec::new(),
            results: Vec::new(),
            frames: Vec::new(),
            answers: Vec::new(),
            events: Vec::new(),
            extra: Vec::new(),
            give_up: None,
        }
    }

    fn op(mut self, op: Value, result: Value) -> Self {
        self.ops.push(op);
        self.results.push(Expected::Is(result));
        self
    }

    fn op_any(mut self, op: Value, results: Vec<Value>) -> Self {
        self.ops.push(op);
        self.results.push(Expected::AnyOf(results));
        self
    }

    fn frame(mut self, pattern: Pattern) -> Self {
        self.frames
            .push(Arc::new(move |_: &Captures| pattern.clone()));
        self
    }

    fn frame_with(mut self, spec: impl Fn(&Captures) -> Pattern + Send + Sync + 'static) -> Self {
        self.frames.push(Arc::new(spec));
        self
    }

    fn answer(mut self, answer: Answer) -> Self {
        self.answers.push(answer);
        self
    }

    fn reply(self, reply: HubReply) -> Self {
        self.answer(Answer::Reply(reply, Vec::new()))
    }

    fn push(mut self, stream: Option<&'static str>, event: HubEvent) -> Self {
        self.events.push(Push { stream, event });
        self
    }

    fn extra(mut self, acts: Vec<Act>) -> Self {
        self.extra.push(Script {
            acts,
            optional: false,
            repeat: false,
        });
        self
    }

    fn extra_optional(mut self, acts: Vec<Act>) -> Self {
        self.extra.push(Script {
            acts,
            optional: true,
            repeat: false,
        });
        self
    }

    /// `acts` for this connection and every later one of the step.
    fn extra_repeated(mut self, acts: Vec<Act>) -> Self {
        self.extra.push(Script {
            acts,
            optional: false,
            repeat: true,
        });
        self
    }
}

// ---- JSON of instructions and results (proto-spec.md Part IV) ----

/// A `u64` (or any integer) as the JSON string of its decimal digits.
pub(crate) fn n(value: u64) -> Value {
    Value::String(value.to_string())
}

/// A payload: hex when short, else `{"fill", "len"}` (every byte equal),
/// else `{"len"}`.
pub(crate) fn payload_json(bytes: &[u8]) -> Value {
    if bytes.len() <= HEX_MAX {
        return Value::String(wire::hex(bytes));
    }
    match bytes.first() {
        Some(first) if bytes.iter().all(|b| b == first) => {
            json!({"fill": format!("{first:02x}"), "len": n(bytes.len() as u64)})
        }
        _ => json!({"len": n(bytes.len() as u64)}),
    }
}

fn ok(value: Value) -> Value {
    json!({ "ok": value })
}

fn error(kind: &str) -> Value {
    json!({"error": {"kind": kind}})
}

fn error_code(kind: &str, code: u32) -> Value {
    json!({"error": {"kind": kind, "code": n(code.into())}})
}

fn closed(reason: Option<&str>) -> Value {
    json!({"error": {"kind": "closed", "reason": reason}})
}

fn protocol() -> Value {
    error("protocol")
}

fn lag_name(lag: Lag) -> &'static str {
    match lag {
        Lag::Disconnect => "disconnect",
        Lag::DropOldest => "drop_oldest",
    }
}

pub(crate) fn welcome_json(welcome: &Welcome) -> Value {
    json!({
        "protocol_version": n(welcome.protocol_version.into()),
        "service": welcome.service,
        "service_version": n(welcome.service_version.into()),
        "software_version": welcome.software_version,
        "instance_id": n(welcome.instance_id),
        "connection_id": n(welcome.connection_id),
        "max_frame_len": n(welcome.max_frame_len.into()),
    })
}

fn op(name: &str) -> Value {
    json!({ "op": name })
}

fn op_publish(topic: &str, payload: &[u8]) -> Value {
    json!({"op": "publish", "topic": topic, "payload": payload_json(payload)})
}

fn op_subscribe(pattern: &str, lag: Lag, label: &str) -> Value {
    json!({"op": "subscribe", "pattern": pattern, "lag": lag_name(lag), "as": label})
}

fn op_next_event(label: &str) -> Value {
    json!({"op": "next_event", "sub": label})
}

fn op_request(name: &str, timeout_ms: u32, payload: &[u8]) -> Value {
    json!({"op": "request", "name": name, "timeout_ms": n(timeout_ms.into()), "payload": payload_json(payload)})
}

fn op_pipeline(ops: Vec<Value>) -> Value {
    json!({"op": "pipeline", "ops": ops})
}

fn op_connect(ops: Vec<Value>) -> Value {
    json!({"op": "connect", "ops": ops})
}

/// A `connect` op whose client is configured by `fields` first
/// (`next_request_id`, `next_sid`, `connect_timeout_ms`).
fn op_connect_with(fields: Value, ops: Vec<Value>) -> Value {
    let mut op = op_connect(ops);
    if let (Some(op), Value::Object(fields)) = (op.as_object_mut(), fields) {
        op.extend(fields);
    }
    op
}

fn event_json(topic: &str, sequence: u64, payload: &[u8]) -> Value {
    ok(
        json!({"event": {"topic": topic, "sequence": n(sequence), "payload": payload_json(payload)}}),
    )
}

/// What a `connect` op reports when the connection was made: the
/// `Welcome` and the results of its ops.
fn connected(welcome: &Welcome, results: Vec<Value>) -> Value {
    ok(json!({"welcome": welcome_json(welcome), "results": results}))
}

// ---- frames ----

fn publish(topic: &str, payload: &[u8]) -> HubRequest {
    HubRequest::Publish {
        topic: topic.into(),
        payload: Payload::from(payload.to_vec()),
    }
}

fn message(topic: &str, sequence: u64, payload: &[u8]) -> HubEvent {
    HubEvent::Message {
        topic: topic.into(),
        sequence,
        payload: Payload::from(payload.to_vec()),
    }
}

fn subscribe_frame(pattern: &str, lag: Lag, sid_label: &str) -> Pattern {
    wire::call(
        &HubRequest::Subscribe {
            sid: 0,
            pattern: pattern.into(),
            lag,
        },
        None,
        Some(sid_label),
    )
}

fn sid(captures: &Captures, label: &str) -> u64 {
    captures.get(label).copied().unwrap_or(0)
}

fn id_of(captures: &Captures, label: &str) -> u64 {
    captures.get(label).copied().unwrap_or(0)
}

/// `n` bytes of `byte`.
fn fill(byte: u8, n: usize) -> Vec<u8> {
    vec![byte; n]
}

// ---- acts of extra connections ----

fn write(bytes: impl Fn(&Captures) -> Vec<u8> + Send + Sync + 'static) -> Act {
    Act::Write(Arc::new(bytes))
}

fn write_fixed(bytes: Vec<u8>) -> Act {
    Act::Write(Arc::new(move |_: &Captures| bytes.clone()))
}

fn read(pattern: Pattern) -> Act {
    Act::Read(Arc::new(move |_: &Captures| pattern.clone()))
}

fn read_ping(label: &str) -> Act {
    read(wire::bare(RequestKind::Ping, Some(label)))
}

fn ack_of(label: &'static str) -> Act {
    write(move |c| wire::ack(id_of(c, label)))
}

/// Handshake checked, then a `Welcome` of the hub announcing
/// [`EXTRA_FRAME_LEN`].
fn welcomed() -> Vec<Act> {
    vec![
        Act::Handshake,
        write_fixed(wire::welcome(&wire::hub_welcome(EXTRA_FRAME_LEN))),
    ]
}

fn with(mut acts: Vec<Act>, more: Vec<Act>) -> Vec<Act> {
    acts.extend(more);
    acts
}

/// The `connect` result of a connection welcomed by [`welcomed`].
fn connected_hub(results: Vec<Value>) -> Value {
    connected(&wire::hub_welcome(EXTRA_FRAME_LEN), results)
}

// ---- the steps ----

/// Multi-byte UTF-8 ending exactly on the 255-byte limit of a subject:
/// 2-, 3- and 4-byte characters.
fn topic_2byte() -> String {
    format!("a{}", "é".repeat(127))
}
fn topic_3byte() -> String {
    "€".repeat(85)
}
fn pattern_4byte() -> String {
    format!("ab.{}", "𝄞".repeat(63))
}

/// Every step after [`HELLO`], in order, for a main connection whose
/// frame limit is `max` bytes.
pub(crate) fn steps(max: usize) -> Vec<Step> {
    let mut steps = main_steps(max);
    steps.extend(extra_steps());
    steps
}

fn main_steps(max: usize) -> Vec<Step> {
    let status = HubStatus {
        authenticated: 0,
        pending: u64::MAX,
        topics: 1,
        subscriptions: 4096,
        names: 255,
        requests_in_flight: 256,
        uptime_ms: 61000,
        version: "0.1.0-ü€𝄞".into(),
    };
    let status_json = json!({"status": {
        "authenticated": n(0), "pending": n(u64::MAX), "topics": n(1), "subscriptions": n(4096),
        "names": n(255), "requests_in_flight": n(256), "uptime_ms": n(61000), "version": "0.1.0-ü€𝄞",
    }});
    let topics = TopicList {
        patterns: vec![("a.*".into(), 1), ("é.>".into(), u64::MAX)],
        names: vec![("svc.𝄞".into(), 0)],
        truncated: true,
    };
    let topics_json = json!({"topics": {
        "patterns": [["a.*", n(1)], ["é.>", n(u64::MAX)]],
        "names": [["svc.𝄞", n(0)]],
        "truncated": true,
    }});
    let empty_topics = TopicList {
        patterns: Vec::new(),
        names: Vec::new(),
        truncated: false,
    };
    // Topic "news.max" (8 bytes): an `Event` payload of 40 + t + p bytes.
    let max_event = fill(0x5a, max - 40 - 8);
    // Topic "big" (3 bytes): a `Publish` payload of 32 + t + p bytes.
    let max_publish = fill(0xa5, max - 32 - 3);
    let b_topic = format!("sensors.x{}", "€".repeat(82));
    let request = |name: &str, timeout_ms: u32, payload: &[u8], label: &str| {
        wire::call(
            &HubRequest::Request {
                name: name.into(),
                timeout_ms,
                payload: Payload::from(payload.to_vec()),
            },
            Some(label),
            None,
        )
    };
    let service_codes = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1099];
    let outcome_error = |outcome: &str| json!({"error": {"kind": "outcome", "outcome": outcome}});

    vec![
        Step::new("ping", "Ping, answered by the framework with Ack")
            .op(op("ping"), ok(json!("ack")))
            .frame(wire::bare(RequestKind::Ping, None)),
        Step::new("status", "Status; a Status reply with 0, 2^64-1 and a multi-byte version")
            .op(op("status"), ok(status_json))
            .frame(wire::call(&HubRequest::Status, None, None))
            .reply(HubReply::Status(status)),
        Step::new("topics", "Topics; a Topics reply with multi-byte entries, 2^64-1 and truncated")
            .op(op("topics"), ok(topics_json))
            .frame(wire::call(&HubRequest::Topics, None, None))
            .reply(HubReply::Topics(topics)),
        Step::new("topics_empty", "Topics; an empty Topics reply")
            .op(op("topics"), ok(json!({"topics": {"patterns": [], "names": [], "truncated": false}})))
            .frame(wire::call(&HubRequest::Topics, None, None))
            .reply(HubReply::Topics(empty_topics)),
        Step::new("subscribe", "Subscribe with lag Disconnect (the sid is the client's)")
            .op(op_subscribe("news.*", Lag::Disconnect, "a"), ok(json!("subscribed")))
            .frame(subscribe_frame("news.*", Lag::Disconnect, "sub:a"))
            .reply(HubReply::Subscribed),
        Step::new("subscribe_drop_oldest", "Subscribe with lag DropOldest")
            .op(op_subscribe("sensors.>", Lag::DropOldest, "b"), ok(json!("subscribed")))
            .frame(subscribe_frame("sensors.>", Lag::DropOldest, "sub:b"))
            .reply(HubReply::Subscribed),
        Step::new("subscribe_longest_pattern", "Subscribe to a 255-byte pattern ending in a 4-byte character")
            .op(op_subscribe(&pattern_4byte(), Lag::Disconnect, "c"), ok(json!("subscribed")))
            .frame(subscribe_frame(&pattern_4byte(), Lag::Disconnect, "sub:c"))
            .reply(HubReply::Subscribed),
        Step::new("event", "a Message event on a subscription")
            .op(op_next_event("a"), event_json("news.local", 1, b"hello"))
            .push(Some("sub:a"), message("news.local", 1, b"hello")),
        Step::new("event_edges", "Message events: a 255-byte topic of 3-byte characters, sequence 2^64-2 and 2^64-1, empty payload")
            .op(op_next_event("b"), event_json(&b_topic, u64::MAX - 1, b""))
            .op(op_next_event("b"), event_json(&b_topic, u64::MAX, &[0, 0xff]))
            .push(Some("sub:b"), message(&b_topic, u64::MAX - 1, b""))
            .push(Some("sub:b"), message(&b_topic, u64::MAX, &[0, 0xff])),
        Step::new("event_frame_limit", "a Message event whose frame is exactly the frame limit")
            .op(op_next_event("a"), event_json("news.max", 1, &max_event))
            .push(Some("sub:a"), message("news.max", 1, &max_event)),
        Step::new("publish", "Publish (the vector of section 15.3)")
            .op(op_publish("news.local", b"hello"), ok(json!({"published": n(2)})))
            .frame(wire::call(&publish("news.local", b"hello"), None, None))
            .reply(HubReply::Published { receivers: 2 }),
        Step::new("publish_empty_payload", "Publish of 0 bytes on a one-byte topic; Published 0")
            .op(op_publish("a", b""), ok(json!({"published": n(0)})))
            .frame(wire::call(&publish("a", b""), None, None))
            .reply(HubReply::Published { receivers: 0 }),
        Step::new("publish_utf8_boundaries", "Publish on 255-byte topics of 2- and 3-byte characters; Published 2^64-1")
            .op(op_publish(&topic_2byte(), "é".as_bytes()), ok(json!({"published": n(u64::MAX)})))
            .op(op_publish(&topic_3byte(), &[0xef, 0xbb, 0xbf]), ok(json!({"published": n(1)})))
            .frame(wire::call(&publish(&topic_2byte(), "é".as_bytes()), None, None))
            .frame(wire::call(&publish(&topic_3byte(), &[0xef, 0xbb, 0xbf]), None, None))
            .reply(HubReply::Published { receivers: u64::MAX })
            .reply(HubReply::Published { receivers: 1 }),
        Step::new("publish_frame_limit", "a Publish whose frame is exactly the frame limit, answered TooLarge (1007) as the hub does")
            .op(op_publish("big", &max_publish), error_code("service", 1007))
            .frame(wire::call(&publish("big", &max_publish), None, None))
            .answer(Answer::Error(1007)),
        Step::new("unsubscribe", "Unsubscribe carries the sid of its Subscribe")
            .op(json!({"op": "unsubscribe", "sub": "c"}), ok(json!("unsubscribed")))
            .frame_with(|c| wire::call(&HubRequest::Unsubscribe { sid: sid(c, "sub:c") }, None, None))
            .reply(HubReply::Unsubscribed),
        Step::new("serve", "Serve")
            .op(json!({"op": "serve", "name": "svc.clock"}), ok(json!("serving")))
            .frame(wire::call(&HubRequest::Serve { name: "svc.clock".into() }, None, None))
            .reply(HubReply::Serving),
        Step::new("incoming_requests", "Request events with tokens 0 and 2^64-1, uid 2^32-1, pid 0, empty payload")
            .op(json!({"op": "next_request", "name": "svc.clock", "as": "r1"}),
                ok(json!({"request": {"name": "svc.clock", "uid": n(1000), "pid": n(4242), "payload": wire::hex(b"now?")}})))
            .op(json!({"op": "next_request", "name": "svc.clock", "as": "r2"}),
                ok(json!({"request": {"name": "svc.clock", "uid": n(u32::MAX.into()), "pid": n(0), "payload": ""}})))
            .push(None, HubEvent::Request { token: 0, name: "svc.clock".into(), uid: 1000, pid: 4242, payload: Payload::from(&b"now?"[..]) })
            .push(None, HubEvent::Request { token: u64::MAX, name: "svc.clock".into(), uid: u32::MAX, pid: 0, payload: Payload::from(&b""[..]) }),
        Step::new("respond", "Respond to the first request: its token (0) echoed; Responded delivered")
            .op(json!({"op": "respond", "request": "r1", "payload": wire::hex(b"12:00")}), ok(json!({"delivered": true})))
            .frame(wire::call(&HubRequest::Respond { token: 0, payload: Payload::from(&b"12:00"[..]) }, None, None))
            .reply(HubReply::Responded { delivered: true }),
        Step::new("fail", "Fail the second request: its token (2^64-1) echoed, with a message; Responded not delivered")
            .op(json!({"op": "fail", "request": "r2", "message": "no clock"}), ok(json!({"delivered": false})))
            .frame(wire::call(&HubRequest::Fail { token: u64::MAX, failure: Failure::Failed { message: "no clock".into() } }, None, None))
            .reply(HubReply::Responded { delivered: false }),
        Step::new("unserve", "Unserve")
            .op(json!({"op": "unserve", "name": "svc.clock"}), ok(json!("unserved")))
            .frame(wire::call(&HubRequest::Unserve { name: "svc.clock".into() }, None, None))
            .reply(HubReply::Unserved),
        Step::new("request", "Request; Requested, then a Response event carrying the Call's id")
            .op(op_request("svc.clock", 2000, b"now?"), ok(json!({"reply": wire::hex(b"12:00")})))
            .frame(request("svc.clock", 2000, b"now?", "req:1"))
            .answer(Answer::Requested(Outcome::Reply { payload: Payload::from(&b"12:00"[..]) })),
        Step::new("request_outcomes", "four pipelined Requests ending ResponderGone, Timeout, ReplyTooLarge and Failed")
            .op(op_pipeline(vec![
                op_request("svc.a", 1000, b""),
                op_request("svc.b", 1, &[0]),
                op_request("svc.c", 4_294_967_295, b"x"),
                op_request("svc.d", 1000, "ü".as_bytes()),
            ]), ok(json!({"results": [
                outcome_error("responder_gone"),
                outcome_error("timeout"),
                json!({"error": {"kind": "outcome", "outcome": "reply_too_large", "len": n(20_000_000)}}),
                json!({"error": {"kind": "outcome", "outcome": "failed", "message": "no clock"}}),
            ]})))
            .frame(request("svc.a", 1000, b"", "req:a"))
            .frame(request("svc.b", 1, &[0], "req:b"))
            .frame(request("svc.c", 4_294_967_295, b"x", "req:c"))
            .frame(request("svc.d", 1000, "ü".as_bytes(), "req:d"))
            .answer(Answer::Requested(Outcome::ResponderGone))
            .answer(Answer::Requested(Outcome::Timeout))
            .answer(Answer::Requested(Outcome::ReplyTooLarge { len: 20_000_000 }))
            .answer(Answer::Requested(Outcome::Failed { message: "no clock".into() })),
        Step::new("request_no_responders", "a Request answered NoResponders (1004)")
            .op(op_request("svc.none", 1000, b"?"), error_code("service", 1004))
            .frame(request("svc.none", 1000, b"?", "req:none"))
            .answer(Answer::Error(1004)),
        Step::new("service_errors", "every hub error code and an unknown one (1099), each failing its request only")
            .op(op_pipeline((0..9).map(|i| op_publish(&format!("e.{i}"), b"")).collect()),
                ok(json!({"results": service_codes.map(|code| error_code("service", code))})))
            .frame(wire::call(&publish("e.0", b""), None, None))
            .frame(wire::call(&publish("e.1", b""), None, None))
            .frame(wire::call(&publish("e.2", b""), None, None))
            .frame(wire::call(&publish("e.3", b""), None, None))
            .frame(wire::call(&publish("e.4", b""), None, None))
            .frame(wire::call(&publish("e.5", b""), None, None))
            .frame(wire::call(&publish("e.6", b""), None, None))
            .frame(wire::call(&publish("e.7", b""), None, None))
            .frame(wire::call(&publish("e.8", b""), None, None))
            .answer(Answer::Error(1000))
            .answer(Answer::Error(1001))
            .answer(Answer::Error(1002))
            .answer(Answer::Error(1003))
            .answer(Answer::Error(1004))
            .answer(Answer::Error(1005))
            .answer(Answer::Error(1006))
            .answer(Answer::Error(1007))
            .answer(Answer::Error(1099)),
        Step::new("internal_error", "a reply over the frame limit: the framework answers Error Internal (14) with the id")
            .op(op("topics"), error_code("daemon", 14))
            .frame(wire::call(&HubRequest::Topics, None, None))
            .answer(Answer::Oversized),
        Step::new("pipeline", "seven pipelined requests of four kinds, replies in order, events pushed while they are answered")
            .op(op_pipeline(vec![
                op("ping"),
                op("status"),
                op_publish("news.p", b"1"),
                op("ping"),
                op_publish("news.p", b"2"),
                op("topics"),
                op("ping"),
            ]), ok(json!({"results": [
                ok(json!("ack")),
                ok(json!({"status": {
                    "authenticated": n(1), "pending": n(2), "topics": n(3), "subscriptions": n(4),
                    "names": n(5), "requests_in_flight": n(6), "uptime_ms": n(7), "version": "",
                }})),
                ok(json!({"published": n(1)})),
                ok(json!("ack")),
                ok(json!({"published": n(1)})),
                ok(json!({"topics": {"patterns": [["news.*", n(1)]], "names": [], "truncated": false}})),
                ok(json!("ack")),
            ]})))
            .op(op_next_event("a"), event_json("news.p", 1, b"1"))
            .op(op_next_event("a"), event_json("news.p", 2, b"2"))
            .frame(wire::bare(RequestKind::Ping, None))
            .frame(wire::call(&HubRequest::Status, None, None))
            .frame(wire::call(&publish("news.p", b"1"), None, None))
            .frame(wire::bare(RequestKind::Ping, None))
            .frame(wire::call(&publish("news.p", b"2"), None, None))
            .frame(wire::call(&HubRequest::Topics, None, None))
            .frame(wire::bare(RequestKind::Ping, None))
            .reply(HubReply::Status(HubStatus {
                authenticated: 1, pending: 2, topics: 3, subscriptions: 4, names: 5,
                requests_in_flight: 6, uptime_ms: 7, version: String::new(),
            }))
            .answer(Answer::Reply(HubReply::Published { receivers: 1 },
                vec![Push { stream: Some("sub:a"), event: message("news.p", 1, b"1") }]))
            .answer(Answer::Reply(HubReply::Published { receivers: 1 },
                vec![Push { stream: Some("sub:a"), event: message("news.p", 2, b"2") }]))
            .reply(HubReply::Topics(TopicList {
                patterns: vec![("news.*".into(), 1)], names: Vec::new(), truncated: false,
            })),
        Step::new("unsubscribe_all", "Unsubscribe both remaining subscriptions")
            .op(json!({"op": "unsubscribe", "sub": "a"}), ok(json!("unsubscribed")))
            .op(json!({"op": "unsubscribe", "sub": "b"}), ok(json!("unsubscribed")))
            .frame_with(|c| wire::call(&HubRequest::Unsubscribe { sid: sid(c, "sub:a") }, None, None))
            .frame_with(|c| wire::call(&HubRequest::Unsubscribe { sid: sid(c, "sub:b") }, None, None))
            .reply(HubReply::Unsubscribed)
            .reply(HubReply::Unsubscribed),
    ]
}

/// A step on one extra connection: the kit welcomes the client, reads one
/// `Ping` and answers it with `bad` (bytes that break the protocol); the
/// client must report a protocol error for the ping.
fn bad_answer_to_ping(name: &'static str, about: &'static str, bad: Bytes) -> Step {
    Step::new(name, about)
        .op(
            op_connect(vec![op("ping")]),
            connected_hub(vec![protocol()]),
        )
        .extra(with(welcomed(), vec![read_ping("x:ping"), Act::Write(bad)]))
}

/// A step on one extra connection: the client subscribes and pings; the
/// kit answers `Subscribed`, then writes `bad` and the ping's `Ack`. A
/// client that ignores `bad` reports the ack; a conforming one reports a
/// protocol error.
fn bad_before_ack(name: &'static str, about: &'static str, lag: Lag, bad: Bytes) -> Step {
    Step::new(name, about)
        .op(
            op_connect(vec![op_subscribe("x.>", lag, "x"), op("ping")]),
            connected_hub(vec![ok(json!("subscribed")), protocol()]),
        )
        .extra(with(
            welcomed(),
            vec![
                Act::Read(Arc::new(move |_: &Captures| {
                    let mut pattern = subscribe_frame("x.>", lag, "x:sid");
                    pattern.captures.push(("x:sub".into(), 4));
                    pattern
                })),
                write(|c| wire::reply(id_of(c, "x:sub"), &HubReply::Subscribed)),
                read_ping("x:ping"),
                Act::Write(Arc::new(move |c: &Captures| {
                    let mut bytes = bad(c);
                    bytes.extend(wire::ack(id_of(c, "x:ping")));
                    bytes
                })),
            ],
        ))
}

/// The connect timeout imposed by the step `busy_give_up`.
const BUSY_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The payload of the step `write_fails_after_final_frame`: far more than
/// socket buffers hold (Linux: about 200 KiB), so the client's write
/// cannot complete while the kit does not read.
const UNREAD_PUBLISH_LEN: usize = 4 * 1024 * 1024;

/// The bytes of that `Publish` the kit reads before it answers: the
/// length prefix, the header, and the start of its body.
const UNREAD_PUBLISH_READ: usize = 64;

/// An extra connection refused as busy: the handshake read, the time
/// noted, the refusal written, the end of stream.
fn busy_refusal(code: TransportCode) -> Vec<Act> {
    vec![
        Act::Handshake,
        Act::Stamp,
        write_fixed(wire::error(
            None,
            wire::code(code),
            "busy (the conformance kit)",
        )),
        Act::Eof,
    ]
}

fn extra_steps() -> Vec<Step> {
    let mut steps = Vec::new();
    // Refused handshakes: every code a pending connection can get, except
    // the two "busy" ones, which a client retries (below).
    for (name, code) in [
        (
            "refused_handshake_expected",
            TransportCode::HandshakeExpected,
        ),
        ("refused_bad_magic", TransportCode::BadMagic),
        (
            "refused_unsupported_version",
            TransportCode::UnsupportedVersion,
        ),
        ("refused_bad_token", TransportCode::BadToken),
        ("refused_auth_timeout", TransportCode::AuthTimeout),
        ("refused_peer_not_allowed", TransportCode::PeerNotAllowed),
        ("refused_shutting_down", TransportCode::ShuttingDown),
    ] {
        steps.push(
            Step::new(
                name,
                "a handshake refused with an Error (no id) instead of Welcome",
            )
            .op(op_connect(vec![]), error_code("refused", wire::code(code)))
            .extra(vec![
                Act::Handshake,
                write_fixed(wire::error(
                    None,
                    wire::code(code),
                    "refused by the conformance kit",
                )),
                Act::Eof,
            ]),
        );
    }
    for (name, code) in [
        (
            "busy_too_many_connections",
            TransportCode::TooManyConnections,
        ),
        (
            "busy_too_many_unauthenticated",
            TransportCode::TooManyUnauthenticated,
        ),
    ] {
        // SHOULD retry: a client that does reports the second connection's
        // ping; one that does not reports the refusal.
        steps.push(
            Step::new(
                name,
                "a busy refusal: retried on a new connection with the same bytes, 1 ms to 1 s after it (or reported)",
            )
            .op_any(
                op_connect(vec![op("ping")]),
                vec![
                    connected_hub(vec![ok(json!("ack"))]),
                    error_code("refused", wire::code(code)),
                ],
            )
            .extra(busy_refusal(code))
            .extra_optional(with(
                welcomed(),
                vec![read_ping("x:ping"), ack_of("x:ping")],
            )),
        );
    }
    let busy = TransportCode::TooManyUnauthenticated;
    steps.push(
        Step::new(
            "busy_retry_pauses",
            "three busy refusals in a row, then a Welcome: each retry 1 ms to 1 s after the refusal before it (or the refusal reported)",
        )
        .op_any(
            op_connect(vec![op("ping")]),
            vec![
                connected_hub(vec![ok(json!("ack"))]),
                error_code("refused", wire::code(busy)),
            ],
        )
        .extra(busy_refusal(busy))
        .extra_optional(busy_refusal(busy))
        .extra_optional(busy_refusal(busy))
        .extra_optional(with(
            welcomed(),
            vec![read_ping("x:ping"), ack_of("x:ping")],
        )),
    );
    let busy = TransportCode::TooManyConnections;
    let mut give_up = Step::new(
        "busy_give_up",
        "under a connect timeout of 3 s, every attempt refused busy: retried until about the timeout, then the last refusal reported",
    )
    .op(
        op_connect_with(
            json!({"connect_timeout_ms": n(BUSY_CONNECT_TIMEOUT.as_millis() as u64)}),
            vec![op("ping")],
        ),
        error_code("refused", wire::code(busy)),
    )
    .extra_repeated(busy_refusal(busy));
    give_up.give_up = Some(BUSY_CONNECT_TIMEOUT);
    steps.push(give_up);
    for (name, about, first) in [
        (
            "first_frame_error_of_another_code",
            "a first frame Error (no id) with a code a pending connection never gets (8)",
            wire::error(None, 8, "frame too large"),
        ),
        (
            "first_frame_error_with_id",
            "a first frame Error BadToken carrying an id",
            wire::error(Some(0), 3, "bad token"),
        ),
        ("first_frame_ack", "an Ack as the first frame", wire::ack(0)),
    ] {
        steps.push(
            Step::new(name, about)
                .op(op_connect(vec![]), protocol())
                .extra(vec![Act::Handshake, write_fixed(first), Act::Eof]),
        );
    }
    steps.push(
        Step::new(
            "end_before_welcome",
            "the end of the connection after the handshake, with no frame at all",
        )
        .op(op_connect(vec![]), closed(None))
        .extra(vec![Act::Handshake, Act::Eof]),
    );
    let welcome_with = |edit: &dyn Fn(&mut Welcome)| {
        let mut welcome = wire::hub_welcome(EXTRA_FRAME_LEN);
        edit(&mut welcome);
        welcome
    };
    for (name, about, welcome) in [
        (
            "welcome_newer_protocol",
            "a Welcome of protocol version 3",
            welcome_with(&|w| w.protocol_version = 3),
        ),
        (
            "welcome_frame_limit_too_small",
            "a Welcome announcing a frame limit of 1023",
            welcome_with(&|w| w.max_frame_len = 1023),
        ),
        (
            "welcome_frame_limit_too_large",
            "a Welcome announcing a frame limit of 16777217",
            welcome_with(&|w| w.max_frame_len = 16_777_217),
        ),
    ] {
        steps.push(
            Step::new(name, about)
                .op(op_connect(vec![op("ping")]), protocol())
                .extra(vec![Act::Handshake, write_fixed(wire::welcome(&welcome))]),
        );
    }
    for (name, about, service, version) in [
        (
            "welcome_other_service",
            "a Welcome of the service notes, version 1",
            "notes",
            1,
        ),
        (
            "welcome_other_service_version",
            "a Welcome of the hub, version 3",
            "hub",
            3,
        ),
    ] {
        let welcome = welcome_with(&|w| {
            w.service = service.into();
            w.service_version = version;
        });
        steps.push(
            Step::new(name, about)
                .op(
                    op_connect(vec![op("ping")]),
                    json!({"error": {"kind": "wrong_service", "service": service, "version": n(version.into())}}),
                )
                .extra(vec![Act::Handshake, write_fixed(wire::welcome(&welcome))]),
        );
    }
    let edges = Welcome {
        protocol_version: 2,
        service: "hub".into(),
        service_version: 2,
        software_version: String::new(),
        instance_id: u64::MAX,
        connection_id: 0,
        max_frame_len: 16_777_216,
    };
    steps.push(
        Step::new("welcome_edges", "a Welcome with instance id 2^64-1, connection id 0, an empty software version, the largest frame limit")
            .op(op_connect(vec![op("ping")]), connected(&edges, vec![ok(json!("ack"))]))
            .extra(vec![
                Act::Handshake,
                write_fixed(wire::welcome(&edges)),
                read_ping("x:ping"),
                ack_of("x:ping"),
            ]),
    );
    // The client's side of the announced limit: 1024 bytes.
    let at_limit = fill(0x11, EXTRA_FRAME_LEN as usize - 32 - 1);
    let over_limit = fill(0x22, EXTRA_FRAME_LEN as usize - 32);
    steps.push(
        Step::new("client_frame_limit", "under a frame limit of 1024: a Publish of exactly 1024 bytes is sent, one of 1025 is refused by the client and not sent")
            .op(
                op_connect(vec![op_publish("t", &at_limit), op_publish("t", &over_limit), op("ping")]),
                connected_hub(vec![ok(json!({"published": n(1)})), error("too_large"), ok(json!("ack"))]),
            )
            .extra(with(welcomed(), vec![
                read(wire::call(&publish("t", &at_limit), Some("x:pub"), None)),
                write(|c| wire::reply(id_of(c, "x:pub"), &HubReply::Published { receivers: 1 })),
                read_ping("x:ping"),
                ack_of("x:ping"),
            ])),
    );
    steps.push(bad_answer_to_ping(
        "daemon_frame_over_limit",
        "a daemon frame whose length prefix (1025) is over the announced limit of 1024",
        Arc::new(|_: &Captures| {
            let mut bytes = 1025u32.to_le_bytes().to_vec();
            bytes.extend(fill(0, 16));
            bytes
        }),
    ));
    steps.push(
        Step::new(
            "reply_wrong_id",
            "two pipelined Pings answered in the wrong order: ids must match the oldest request",
        )
        .op(
            op_connect(vec![op_pipeline(vec![op("ping"), op("ping")])]),
            connected_hub(vec![ok(json!({"results": [protocol(), protocol()]}))]),
        )
        .extra(with(
            welcomed(),
            vec![
                read_ping("x:p1"),
                read_ping("x:p2"),
                write(|c| {
                    let mut bytes = wire::ack(id_of(c, "x:p2"));
                    bytes.extend(wire::ack(id_of(c, "x:p1")));
                    bytes
                }),
            ],
        )),
    );
    steps.extend(id_steps());
    steps.push(
        Step::new("reply_unsolicited", "an Ack when no request is outstanding")
            .op(
                op_connect(vec![op("ping"), op("ping")]),
                connected_hub(vec![ok(json!("ack")), protocol()]),
            )
            .extra(with(
                welcomed(),
                vec![
                    read_ping("x:ping"),
                    write(|c| {
                        let id = id_of(c, "x:ping");
                        let mut bytes = wire::ack(id);
                        bytes.extend(wire::ack(id.wrapping_add(1000)));
                        bytes
                    }),
                ],
            )),
    );
    steps.push(bad_answer_to_ping(
        "second_welcome",
        "a second Welcome",
        Arc::new(|_: &Captures| wire::welcome(&wire::hub_welcome(EXTRA_FRAME_LEN))),
    ));
    steps.push(bad_answer_to_ping(
        "reply_to_ping",
        "a Reply answering a Ping",
        Arc::new(|c: &Captures| wire::reply(id_of(c, "x:ping"), &HubReply::Subscribed)),
    ));
    steps.push(
        Step::new("ack_to_call", "an Ack answering a Call")
            .op(
                op_connect(vec![op("status")]),
                connected_hub(vec![protocol()]),
            )
            .extra(with(
                welcomed(),
                vec![
                    read(wire::call(&HubRequest::Status, Some("x:call"), None)),
                    write(|c| wire::ack(id_of(c, "x:call"))),
                ],
            )),
    );
    steps.push(
        Step::new("reply_of_wrong_kind", "a Publish answered with Subscribed")
            .op(
                op_connect(vec![op_publish("t", b"")]),
                connected_hub(vec![protocol()]),
            )
            .extra(with(
                welcomed(),
                vec![
                    read(wire::call(&publish("t", b""), Some("x:call"), None)),
                    write(|c| wire::reply(id_of(c, "x:call"), &HubReply::Subscribed)),
                ],
            )),
    );
    steps.push(
        Step::new(
            "reply_trailing_byte",
            "a Published reply with a byte after it",
        )
        .op(
            op_connect(vec![op_publish("t", b"")]),
            connected_hub(vec![protocol()]),
        )
        .extra(with(
            welcomed(),
            vec![
                read(wire::call(&publish("t", b""), Some("x:call"), None)),
                write(|c| {
                    let mut payload = 1u32.to_le_bytes().to_vec();
                    payload.extend(id_of(c, "x:call").to_le_bytes());
                    payload.extend(3u32.to_le_bytes());
                    payload.extend(2u64.to_le_bytes());
                    payload.push(0);
                    wire::daemon_frame(&payload)
                }),
            ],
        )),
    );
    steps.push(bad_answer_to_ping(
        "error_with_id_that_closes",
        "an Error FrameTooLarge (a code that closes) carrying an id",
        Arc::new(|c: &Captures| wire::error(Some(id_of(c, "x:ping")), 8, "frame too large")),
    ));
    steps.push(bad_answer_to_ping(
        "error_without_id_that_keeps_open",
        "an Error UnknownRequest (a code that keeps the connection) without an id",
        Arc::new(|_: &Captures| wire::error(None, 10, "unknown request")),
    ));
    steps.push(bad_answer_to_ping(
        "error_unknown_transport_code",
        "an Error with transport code 17",
        Arc::new(|c: &Captures| wire::error(Some(id_of(c, "x:ping")), 17, "")),
    ));
    steps.push(bad_answer_to_ping(
        "unknown_frame_tag",
        "a daemon frame with tag 7",
        Arc::new(|_: &Captures| wire::daemon_frame(&7u32.to_le_bytes())),
    ));
    steps.push(bad_answer_to_ping(
        "bad_option_byte",
        "an Error whose id presence byte is 2",
        Arc::new(|c: &Captures| {
            let mut payload = 4u32.to_le_bytes().to_vec();
            payload.push(2);
            payload.extend(id_of(c, "x:ping").to_le_bytes());
            payload.extend(10u32.to_le_bytes());
            payload.extend(0u64.to_le_bytes());
            wire::daemon_frame(&payload)
        }),
    ));
    steps.push(bad_answer_to_ping(
        "unknown_close_reason",
        "a Closing with reason 2",
        Arc::new(|_: &Captures| {
            let mut payload = 5u32.to_le_bytes().to_vec();
            payload.extend(2u32.to_le_bytes());
            wire::daemon_frame(&payload)
        }),
    ));
    steps.push(bad_before_ack(
        "lagged_stream_zero",
        "a Lagged of stream 0",
        Lag::DropOldest,
        Arc::new(|_: &Captures| wire::lagged(0, 5)),
    ));
    steps.push(bad_before_ack(
        "lagged_missed_zero",
        "a Lagged of a drop-oldest subscription with missed 0",
        Lag::DropOldest,
        Arc::new(|c: &Captures| wire::lagged(sid(c, "x:sid"), 0)),
    ));
    steps.push(bad_before_ack(
        "event_undecodable",
        "an Event of a subscription whose hub event tag (3) does not exist",
        Lag::Disconnect,
        Arc::new(|c: &Captures| {
            let mut payload = 2u32.to_le_bytes().to_vec();
            payload.extend(sid(c, "x:sid").to_le_bytes());
            payload.extend(3u32.to_le_bytes());
            wire::daemon_frame(&payload)
        }),
    ));
    steps.push(
        Step::new(
            "events_split_across_reads",
            "two events and a Lagged written one byte per write",
        )
        .op(
            op_connect(vec![
                op_subscribe("split.>", Lag::DropOldest, "s"),
                op_next_event("s"),
                op_next_event("s"),
                op_next_event("s"),
            ]),
            connected_hub(vec![
                ok(json!("subscribed")),
                event_json("split.a", 1, b"first"),
                ok(json!({"lagged": n(3)})),
                event_json("split.b", 5, b""),
            ]),
        )
        .extra(with(
            welcomed(),
            vec![
                Act::Read(Arc::new(|_: &Captures| {
                    let mut pattern = subscribe_frame("split.>", Lag::DropOldest, "x:sid");
                    pattern.captures.push(("x:sub".into(), 4));
                    pattern
                })),
                write(|c| wire::reply(id_of(c, "x:sub"), &HubReply::Subscribed)),
                Act::WriteSplit(Arc::new(|c: &Captures| {
                    let s = sid(c, "x:sid");
                    let mut bytes = wire::event(s, &message("split.a", 1, b"first"));
                    bytes.extend(wire::lagged(s, 3));
                    bytes.extend(wire::event(s, &message("split.b", 5, b"")));
                    bytes
                })),
            ],
        )),
    );
    steps.push(
        Step::new(
            "events_between_replies",
            "three pipelined Pings whose Acks have events between them, in one write",
        )
        .op(
            op_connect(vec![
                op_subscribe("ev.>", Lag::Disconnect, "e"),
                op_pipeline(vec![op("ping"), op("ping"), op("ping")]),
                op_next_event("e"),
                op_next_event("e"),
                op_next_event("e"),
            ]),
            connected_hub(vec![
                ok(json!("subscribed")),
                ok(json!({"results": [ok(json!("ack")), ok(json!("ack")), ok(json!("ack"))]})),
                event_json("ev.1", 1, b"1"),
                event_json("ev.2", 1, b"2"),
                event_json("ev.3", 1, b"3"),
            ]),
        )
        .extra(with(
            welcomed(),
            vec![
                Act::Read(Arc::new(|_: &Captures| {
                    let mut pattern = subscribe_frame("ev.>", Lag::Disconnect, "x:sid");
                    pattern.captures.push(("x:sub".into(), 4));
                    pattern
                })),
                write(|c| wire::reply(id_of(c, "x:sub"), &HubReply::Subscribed)),
                read_ping("x:p1"),
                read_ping("x:p2"),
                read_ping("x:p3"),
                write(|c| {
                    let s = sid(c, "x:sid");
                    let mut bytes = Vec::new();
                    for (i, label) in ["x:p1", "x:p2", "x:p3"].iter().enumerate() {
                        let text = format!("{}", i + 1);
                        bytes.extend(wire::event(
                            s,
                            &message(&format!("ev.{text}"), 1, text.as_bytes()),
                        ));
                        bytes.extend(wire::ack(id_of(c, label)));
                    }
                    bytes
                }),
            ],
        )),
    );
    for (name, reason, text) in [
        ("closing_shutdown", CloseReason::Shutdown, "shutdown"),
        (
            "closing_slow_consumer",
            CloseReason::SlowConsumer,
            "slow_consumer",
        ),
    ] {
        steps.push(
            Step::new(name, "a Closing in place of the answer, then end of stream")
                .op(
                    op_connect(vec![op("ping")]),
                    connected_hub(vec![closed(Some(text))]),
                )
                .extra(with(
                    welcomed(),
                    vec![
                        read_ping("x:ping"),
                        write_fixed(wire::closing(reason)),
                        Act::Eof,
                    ],
                )),
        );
    }
    for (name, code) in [
        ("closed_frame_too_large", TransportCode::FrameTooLarge),
        ("closed_malformed", TransportCode::Malformed),
        ("closed_over_budget", TransportCode::OverBudget),
        ("closed_wrong_service", TransportCode::WrongService),
    ] {
        steps.push(
            Step::new(
                name,
                "an Error without id that closes the connection, in place of the answer",
            )
            .op(
                op_connect(vec![op("ping")]),
                connected_hub(vec![error_code("daemon", wire::code(code))]),
            )
            .extra(with(
                welcomed(),
                vec![
                    read_ping("x:ping"),
                    write_fixed(wire::error(
                        None,
                        wire::code(code),
                        "closed by the conformance kit",
                    )),
                    Act::Eof,
                ],
            )),
        );
    }
    steps.push(
        Step::new("end_of_stream", "the end of the connection (end of stream) with a request outstanding and no final frame")
            .op(op_connect(vec![op("ping")]), connected_hub(vec![closed(None)]))
            .extra(with(welcomed(), vec![read_ping("x:ping"), Act::Eof])),
    );
    steps.push(
        Step::new(
            "end_by_reset",
            "the end of the connection as ECONNRESET: closed while the client's bytes are unread",
        )
        .op(
            op_connect(vec![op("ping")]),
            connected_hub(vec![closed(None)]),
        )
        .extra(with(welcomed(), vec![Act::WaitUnread, Act::Reset])),
    );
    let unread = fill(0x33, UNREAD_PUBLISH_LEN);
    let big_limit = wire::hub_welcome(MAX_FRAME_LEN as u32);
    let over_budget = wire::code(TransportCode::OverBudget);
    steps.push(
        Step::new(
            "write_fails_after_final_frame",
            "a Publish of 4 MiB left unread: the kit writes Error OverBudget and closes, so the client's write fails (EPIPE or ECONNRESET); the client reports the Error",
        )
        .op(
            op_connect(vec![op_publish("big", &unread), op("ping")]),
            connected(
                &big_limit,
                vec![
                    error_code("daemon", over_budget),
                    error_code("daemon", over_budget),
                ],
            ),
        )
        .extra(vec![
            Act::Handshake,
            write_fixed(wire::welcome(&big_limit)),
            Act::ReadStart(
                Arc::new(move |_: &Captures| {
                    wire::call(&publish("big", &unread), Some("x:big"), None)
                }),
                UNREAD_PUBLISH_READ,
            ),
            write_fixed(wire::error(
                None,
                over_budget,
                "over budget (the conformance kit)",
            )),
            Act::Reset,
        ]),
    );
    steps.push(
        Step::new("shutdown", "Shutdown, answered Ack then Closing{Shutdown}")
            .op(
                op_connect(vec![op("shutdown")]),
                connected_hub(vec![ok(json!("ack"))]),
            )
            .extra(with(
                welcomed(),
                vec![
                    read(wire::bare(RequestKind::Shutdown, Some("x:sd"))),
                    write(|c| {
                        let mut bytes = wire::ack(id_of(c, "x:sd"));
                        bytes.extend(wire::closing(CloseReason::Shutdown));
                        bytes
                    }),
                    Act::Eof,
                ],
            )),
    );
    steps.push(
        Step::new("transport_errors_with_id", "Errors with ids: NotPermitted, UnknownRequest, BadRequest, Internal; each fails its request only")
            .op(
                op_connect(vec![op("shutdown"), op_pipeline(vec![op("ping"), op("ping"), op("ping"), op("ping")])]),
                connected_hub(vec![
                    error_code("daemon", 12),
                    ok(json!({"results": [
                        error_code("daemon", 10),
                        error_code("daemon", 11),
                        error_code("daemon", 14),
                        ok(json!("ack")),
                    ]})),
                ]),
            )
            .extra(with(welcomed(), vec![
                read(wire::bare(RequestKind::Shutdown, Some("x:sd"))),
                write(|c| wire::error(Some(id_of(c, "x:sd")), 12, "not permitted")),
                read_ping("x:p1"),
                read_ping("x:p2"),
                read_ping("x:p3"),
                read_ping("x:p4"),
                write(|c| {
                    let mut bytes = wire::error(Some(id_of(c, "x:p1")), 10, "");
                    bytes.extend(wire::error(Some(id_of(c, "x:p2")), 11, ""));
                    bytes.extend(wire::error(Some(id_of(c, "x:p3")), 14, ""));
                    bytes.extend(wire::ack(id_of(c, "x:p4")));
                    bytes
                }),
            ])),
    );
    steps
}

/// The steps of the client's ids at their edges, imposed by the
/// `connect` op's `next_request_id` and `next_sid`: request ids 2^64-1,
/// then 0 and 1 (ids wrap), subscription ids 2^64-1, then 1 (0 is never a
/// sid).
fn id_steps() -> Vec<Step> {
    let max = u64::MAX;
    let ping = |id: u64| read(wire::bare(RequestKind::Ping, None).with_id(id));
    let request = |name: &str, payload: &[u8]| HubRequest::Request {
        name: name.into(),
        timeout_ms: 1000,
        payload: Payload::from(payload.to_vec()),
    };
    let response = |id: u64, payload: &[u8]| {
        wire::event(
            0,
            &HubEvent::Response {
                request: id,
                outcome: Outcome::Reply {
                    payload: Payload::from(payload.to_vec()),
                },
            },
        )
    };
    let subscribe = |lag: Lag, sid: u64, label: &str| {
        read(
            subscribe_frame("ids.>", lag, "x:sid")
                .with_sid(sid)
                .with_id_label(label),
        )
    };
    let unsubscribe = |sid: u64, label: &str| {
        read(wire::call(
            &HubRequest::Unsubscribe { sid },
            Some(label),
            None,
        ))
    };
    let next_ids = json!({"next_request_id": n(max)});
    vec![
        Step::new(
            "request_ids_edges",
            "under next_request_id 2^64-1: three pipelined Pings with ids 2^64-1, 0 and 1, answered by id",
        )
        .op(
            op_connect_with(next_ids.clone(), vec![op_pipeline(vec![op("ping"), op("ping"), op("ping")])]),
            connected_hub(vec![ok(json!({"results": [ok(json!("ack")), ok(json!("ack")), ok(json!("ack"))]}))]),
        )
        .extra(with(
            welcomed(),
            vec![ping(max), ping(0), ping(1), write(move |_| {
                let mut bytes = wire::ack(max);
                bytes.extend(wire::ack(0));
                bytes.extend(wire::ack(1));
                bytes
            })],
        )),
        Step::new(
            "request_ids_in_responses",
            "under next_request_id 2^64-1: two pipelined Requests (ids 2^64-1 and 0) whose Responses come in the other order, each routed by its Call's id",
        )
        .op(
            op_connect_with(next_ids, vec![op_pipeline(vec![
                op_request("svc.max", 1000, b"m"),
                op_request("svc.zero", 1000, b"z"),
            ])]),
            connected_hub(vec![ok(json!({"results": [
                ok(json!({"reply": wire::hex(b"max")})),
                ok(json!({"reply": wire::hex(b"zero")})),
            ]}))]),
        )
        .extra(with(
            welcomed(),
            vec![
                read(wire::call(&request("svc.max", b"m"), None, None).with_id(max)),
                read(wire::call(&request("svc.zero", b"z"), None, None).with_id(0)),
                write(move |_| {
                    let mut bytes = wire::reply(max, &HubReply::Requested);
                    bytes.extend(wire::reply(0, &HubReply::Requested));
                    bytes.extend(response(0, b"zero"));
                    bytes.extend(response(max, b"max"));
                    bytes
                }),
            ],
        )),
        Step::new(
            "subscription_ids_edges",
            "under next_sid 2^64-1: Subscribes with sids 2^64-1 then 1 (never 0), events and a Lagged routed by sid, Unsubscribes carrying them",
        )
        .op(
            op_connect_with(json!({"next_sid": n(max)}), vec![
                op_subscribe("ids.>", Lag::DropOldest, "m"),
                op_subscribe("ids.>", Lag::Disconnect, "w"),
                op_next_event("w"),
                op_next_event("m"),
                op_next_event("m"),
                json!({"op": "unsubscribe", "sub": "m"}),
                json!({"op": "unsubscribe", "sub": "w"}),
            ]),
            connected_hub(vec![
                ok(json!("subscribed")),
                ok(json!("subscribed")),
                event_json("ids.w", 1, b"w"),
                ok(json!({"lagged": n(2)})),
                event_json("ids.m", 3, b"m"),
                ok(json!("unsubscribed")),
                ok(json!("unsubscribed")),
            ]),
        )
        .extra(with(
            welcomed(),
            vec![
                subscribe(Lag::DropOldest, max, "x:s1"),
                write(|c| wire::reply(id_of(c, "x:s1"), &HubReply::Subscribed)),
                subscribe(Lag::Disconnect, 1, "x:s2"),
                write(move |c| {
                    let mut bytes = wire::reply(id_of(c, "x:s2"), &HubReply::Subscribed);
                    bytes.extend(wire::event(1, &message("ids.w", 1, b"w")));
                    bytes.extend(wire::lagged(max, 2));
                    bytes.extend(wire::event(max, &message("ids.m", 3, b"m")));
                    bytes
                }),
                unsubscribe(max, "x:u1"),
                write(|c| wire::reply(id_of(c, "x:u1"), &HubReply::Unsubscribed)),
                unsubscribe(1, "x:u2"),
                write(|c| wire::reply(id_of(c, "x:u2"), &HubReply::Unsubscribed)),
            ],
        )),
    ]
}

/// The steps of the main connection's start: the handshake (with an
/// optional `Expect`), then the control subscription.
pub(crate) fn hello_frames() -> Vec<FrameSpec> {
    vec![Arc::new(|_: &Captures| {
        subscribe_frame(CONTROL_TOPIC, Lag::Disconnect, "sub:control")
    })]
}
