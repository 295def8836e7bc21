//! The conformance kit (`keyhole::conformance`, proto-spec.md Part IV)
//! against drivers: the Rust driver (the library's [`HubClient`] following
//! the kit's instructions) must pass every step; raw drivers that break the
//! protocol on purpose (one field in the wrong byte order, a length prefix
//! that counts its own 4 bytes, replies matched by arrival instead of id,
//! request ids that skip 0 when they wrap, a failed write reported instead
//! of the daemon's final frame, busy retries without a pause or given up
//! early) must fail it, with a report that names the step. The unbroken raw
//! driver passes the same steps, so each broken one fails for its break.
#![cfg(feature = "cli")]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use keyhole::Payload;
use keyhole::client::hub::{IncomingRequest, Received, RequestError, Responder};
use keyhole::client::{ClientError, ConnectOptions, HubClient, Subscription};
use keyhole::conformance::{CONTROL_TOPIC, HELLO, Kit, KitOptions, REPORT_TOPIC, Report};
use keyhole::error::FrameError;
use keyhole::hub::Lag;
use keyhole::transport::{CloseReason, DaemonFrame, ErrorCode, Welcome};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Each op waits at most this long (a client that ignores a frame it must
/// reject would otherwise wait for ever; the kit then sees `timeout`).
const OP_TIMEOUT: Duration = Duration::from_secs(8);

// ---- the Rust driver ----

fn n(value: impl ToString) -> Value {
    Value::String(value.to_string())
}

fn payload_json(bytes: &[u8]) -> Value {
    if bytes.len() <= 4096 {
        return Value::String(hex::encode(bytes));
    }
    match bytes.first() {
        Some(first) if bytes.iter().all(|b| b == first) => {
            json!({"fill": format!("{first:02x}"), "len": n(bytes.len())})
        }
        _ => json!({"len": n(bytes.len())}),
    }
}

fn payload_of(value: &Value) -> Vec<u8> {
    match value {
        Value::String(text) => hex::decode(text).unwrap_or_default(),
        Value::Object(fill) => {
            let byte = fill
                .get("fill")
                .and_then(Value::as_str)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .unwrap_or(0);
            vec![byte; int(&fill["len"]) as usize]
        }
        _ => Vec::new(),
    }
}

fn int(value: &Value) -> u64 {
    value.as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn text<'a>(op: &'a Value, field: &str) -> &'a str {
    op[field].as_str().unwrap_or("")
}

fn ok(value: Value) -> Value {
    json!({ "ok": value })
}

fn kind(kind: &str) -> Value {
    json!({"error": {"kind": kind}})
}

fn coded(kind: &str, code: u32) -> Value {
    json!({"error": {"kind": kind, "code": n(code)}})
}

fn welcome_json(welcome: &Welcome) -> Value {
    json!({
        "protocol_version": n(welcome.protocol_version),
        "service": welcome.service,
        "service_version": n(welcome.service_version),
        "software_version": welcome.software_version,
        "instance_id": n(welcome.instance_id),
        "connection_id": n(welcome.connection_id),
        "max_frame_len": n(welcome.max_frame_len),
    })
}

/// What the client reported, in the kit's vocabulary (Part IV).
fn client_error(err: &ClientError) -> Value {
    match err {
        ClientError::AuthRefused { code, .. } => coded("refused", code.wire()),
        ClientError::WrongService {
            found,
            found_version,
            ..
        } => {
            json!({"error": {"kind": "wrong_service", "service": found, "version": n(found_version)}})
        }
        ClientError::Protocol(_) => kind("protocol"),
        ClientError::Closed { reason } => {
            json!({"error": {"kind": "closed", "reason": match reason {
                None => Value::Null,
                Some(CloseReason::Shutdown) => json!("shutdown"),
                Some(CloseReason::SlowConsumer) => json!("slow_consumer"),
            }}})
        }
        ClientError::Daemon { code, .. } => coded("daemon", ErrorCode::Transport(*code).wire()),
        ClientError::Service { code, .. } => coded("service", ErrorCode::Service(*code).wire()),
        ClientError::Frame(FrameError::FrameTooLarge { .. }) => kind("too_large"),
        other => json!({"error": {"kind": "other", "text": other.to_string()}}),
    }
}

fn request_error(err: &RequestError) -> Value {
    let outcome = |outcome: &str| json!({"error": {"kind": "outcome", "outcome": outcome}});
    match err {
        RequestError::NoResponders { .. } => coded("service", 1004),
        RequestError::Busy { .. } => coded("service", 1005),
        RequestError::ResponderGone => outcome("responder_gone"),
        RequestError::Timeout(_) => outcome("timeout"),
        RequestError::ReplyTooLarge { len } => {
            json!({"error": {"kind": "outcome", "outcome": "reply_too_large", "len": n(len)}})
        }
        RequestError::Failed { message } => {
            json!({"error": {"kind": "outcome", "outcome": "failed", "message": message}})
        }
        RequestError::Client(err) => client_error(err),
        other => json!({"error": {"kind": "other", "text": other.to_string()}}),
    }
}

/// One connection of the driver and what it holds: subscriptions by the
/// label the kit gave them, responders by name, requests to answer by
/// label.
struct Conn {
    hub: HubClient,
    subs: HashMap<String, Subscription>,
    responders: HashMap<String, Responder>,
    incoming: HashMap<String, IncomingRequest>,
}

impl Conn {
    fn new(hub: HubClient) -> Self {
        Self {
            hub,
            subs: HashMap::new(),
            responders: HashMap::new(),
            incoming: HashMap::new(),
        }
    }

    async fn op(&mut self, options: &ConnectOptions, op: &Value) -> Value {
        match tokio::time::timeout(OP_TIMEOUT, self.op_untimed(options, op)).await {
            Ok(result) => result,
            Err(_) => kind("timeout"),
        }
    }

    async fn op_untimed(&mut self, options: &ConnectOptions, op: &Value) -> Value {
        match text(op, "op") {
            "subscribe" => {
                let lag = match text(op, "lag") {
                    "drop_oldest" => Lag::DropOldest,
                    _ => Lag::Disconnect,
                };
                match self.hub.subscribe_with(text(op, "pattern"), lag).await {
                    Ok(sub) => {
                        self.subs.insert(text(op, "as").to_owned(), sub);
                        ok(json!("subscribed"))
                    }
                    Err(err) => client_error(&err),
                }
            }
            "unsubscribe" => match self.subs.remove(text(op, "sub")) {
                Some(sub) => match sub.unsubscribe().await {
                    Ok(()) => ok(json!("unsubscribed")),
                    Err(err) => client_error(&err),
                },
                None => kind("no_such_subscription"),
            },
            "next_event" => match self.subs.get_mut(text(op, "sub")) {
                Some(sub) => match sub.receive().await {
                    Some(Ok(Received::Event(event))) => ok(json!({"event": {
                        "topic": event.topic,
                        "sequence": n(event.sequence),
                        "payload": payload_json(&event.payload),
                    }})),
                    Some(Ok(Received::Lagged { missed })) => ok(json!({"lagged": n(missed)})),
                    Some(Ok(_)) => kind("other"),
                    Some(Err(err)) => client_error(&err),
                    None => json!({"error": {"kind": "closed", "reason": null}}),
                },
                None => kind("no_such_subscription"),
            },
            "serve" => match self.hub.serve(text(op, "name")).await {
                Ok(responder) => {
                    self.responders
                        .insert(text(op, "name").to_owned(), responder);
                    ok(json!("serving"))
                }
                Err(err) => client_error(&err),
            },
            // The library's API stops serving when the Responder is
            // dropped: it sends `Unserve` and checks its reply itself.
            "unserve" => match self.responders.remove(text(op, "name")) {
                Some(responder) => {
                    drop(responder);
                    ok(json!("unserved"))
                }
                None => kind("not_served"),
            },
            "next_request" => match self.responders.get_mut(text(op, "name")) {
                Some(responder) => match responder.next_request().await {
                    Some(Ok(request)) => {
                        let result = ok(json!({"request": {
                            "name": request.name(),
                            "uid": n(request.uid()),
                            "pid": n(request.pid()),
                            "payload": payload_json(request.payload()),
                        }}));
                        self.incoming.insert(text(op, "as").to_owned(), request);
                        result
                    }
                    Some(Err(err)) => client_error(&err),
                    None => json!({"error": {"kind": "closed", "reason": null}}),
                },
                None => kind("not_served"),
            },
            "respond" => match self.incoming.remove(text(op, "request")) {
                Some(request) => match request.reply(payload_of(&op["payload"])).await {
                    Ok(delivered) => ok(json!({ "delivered": delivered })),
                    Err(err) => client_error(&err),
                },
                None => kind("no_such_request"),
            },
            "fail" => match self.incoming.remove(text(op, "request")) {
                Some(request) => match request.fail(text(op, "message")).await {
                    Ok(delivered) => ok(json!({ "delivered": delivered })),
                    Err(err) => client_error(&err),
                },
                None => kind("no_such_request"),
            },
            "pipeline" => {
                let ops = op["ops"].as_array().cloned().unwrap_or_default();
                let results = join_all(ops.iter().map(|op| simple(&self.hub, op))).await;
                ok(json!({ "results": results }))
            }
            "connect" => Box::pin(connect(options, op)).await,
            _ => simple(&self.hub, op).await,
        }
    }
}

/// The ops that need no state, as a pipeline runs them.
async fn simple(hub: &HubClient, op: &Value) -> Value {
    match text(op, "op") {
        "ping" => match hub.ping().await {
            Ok(()) => ok(json!("ack")),
            Err(err) => client_error(&err),
        },
        "shutdown" => match hub.shutdown().await {
            Ok(()) => ok(json!("ack")),
            Err(err) => client_error(&err),
        },
        "status" => match hub.status().await {
            Ok(s) => ok(json!({"status": {
                "authenticated": n(s.authenticated), "pending": n(s.pending), "topics": n(s.topics),
                "subscriptions": n(s.subscriptions), "names": n(s.names),
                "requests_in_flight": n(s.requests_in_flight), "uptime_ms": n(s.uptime_ms),
                "version": s.version,
            }})),
            Err(err) => client_error(&err),
        },
        "topics" => match hub.topics().await {
            Ok(list) => {
                let pairs = |entries: &[(String, u64)]| {
                    entries
                        .iter()
                        .map(|(name, count)| json!([name, n(count)]))
                        .collect::<Vec<_>>()
                };
                ok(json!({"topics": {
                    "patterns": pairs(&list.patterns),
                    "names": pairs(&list.names),
                    "truncated": list.truncated,
                }}))
            }
            Err(err) => client_error(&err),
        },
        "publish" => match hub
            .publish(text(op, "topic"), payload_of(&op["payload"]))
            .await
        {
            Ok(receivers) => ok(json!({ "published": n(receivers) })),
            Err(err) => client_error(&err),
        },
        "request" => {
            let timeout = Duration::from_millis(int(&op["timeout_ms"]));
            match hub
                .request_timeout(text(op, "name"), payload_of(&op["payload"]), timeout)
                .await
            {
                Ok(reply) => ok(json!({ "reply": payload_json(&reply) })),
                Err(err) => request_error(&err),
            }
        }
        other => json!({"error": {"kind": "other", "text": format!("unknown op {other}")}}),
    }
}

/// The `connect` op: a new connection through the normal API, its ops,
/// then it is closed.
async fn connect(options: &ConnectOptions, op: &Value) -> Value {
    // The client's own options for what the kit imposes (section 17.3).
    let mut options = options.clone();
    if let Some(id) = op["next_request_id"].as_str().and_then(|s| s.parse().ok()) {
        options = options.next_request_id(id);
    }
    if let Some(sid) = op["next_sid"].as_str().and_then(|s| s.parse().ok()) {
        options = options.next_subscription_id(sid);
    }
    if let Some(ms) = op["connect_timeout_ms"]
        .as_str()
        .and_then(|s| s.parse().ok())
    {
        options = options.timeout(Duration::from_millis(ms));
    }
    let options = &options;
    let hub = match options.connect_hub().await {
        Ok(hub) => hub,
        Err(err) => return client_error(&err),
    };
    let welcome = match hub.welcome().await {
        Ok(welcome) => welcome,
        Err(err) => return client_error(&err),
    };
    let mut conn = Conn::new(hub);
    let mut results = Vec::new();
    for op in op["ops"].as_array().cloned().unwrap_or_default() {
        results.push(conn.op(options, &op).await);
    }
    drop(conn);
    ok(json!({"welcome": welcome_json(&welcome), "results": results}))
}

/// Runs the Rust driver against the kit on `dir`; `Ok(true)` if the kit's
/// end instruction says the run passed.
async fn rust_driver(dir: &Path) -> Result<bool, ClientError> {
    let options = ConnectOptions::new()
        .socket(dir.join("keyhole.sock"))
        .token_file(dir.join("session-token"));
    let hub = options.connect_hub().await?;
    let mut control = hub.subscribe(CONTROL_TOPIC).await?;
    let hello = json!({"step": HELLO, "results": []}).to_string();
    hub.publish(REPORT_TOPIC, hello).await?;
    let mut conn = Conn::new(hub.clone());
    loop {
        let instruction = match control.next_event().await {
            Some(Ok(event)) => serde_json::from_slice::<Value>(&event.payload).unwrap_or_default(),
            Some(Err(err)) => return Err(err),
            None => return Ok(false),
        };
        if instruction["step"] == "end" {
            return Ok(instruction["verdict"] == "pass");
        }
        let mut results = Vec::new();
        for op in instruction["ops"].as_array().cloned().unwrap_or_default() {
            results.push(conn.op(&options, &op).await);
        }
        let report = json!({"step": instruction["step"], "results": results}).to_string();
        hub.publish(REPORT_TOPIC, report).await?;
    }
}

/// Starts the kit on a fresh directory and runs `driver` against it.
async fn run_kit<F, Fut>(options: impl FnOnce(KitOptions) -> KitOptions, driver: F) -> Report
where
    F: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let base = tempfile::tempdir().expect("temp dir");
    let dir = base.path().join("run");
    let kit = Kit::start(options(
        KitOptions::new(&dir).connect_timeout(Duration::from_secs(20)),
    ))
    .expect("the kit starts");
    let driving = tokio::spawn(driver(dir));
    let report = kit.run().await.expect("the kit serves");
    let driver_passed = tokio::time::timeout(Duration::from_secs(10), driving)
        .await
        .expect("the driver ends with the run")
        .expect("the driver does not panic");
    // The driver's verdict is the kit's (its end instruction).
    assert_eq!(driver_passed, report.passed(), "{report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_passes_every_step() {
    let report = run_kit(
        |options| options,
        |dir| async move { rust_driver(&dir).await.unwrap_or(false) },
    )
    .await;
    assert!(report.passed(), "{report}");
    assert!(report.skipped.is_empty(), "{report}");
    assert!(report.passed.len() > 60, "{report}");
}

// ---- raw drivers, correct and broken ----

/// How a raw driver breaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Break {
    None,
    /// The topic length of a `Publish` in big-endian order.
    ByteOrder,
    /// Every request's length prefix counts its own 4 bytes.
    LengthCountsItself,
    /// Replies are taken in arrival order, their ids not checked.
    MatchByArrival,
    /// Request ids skip 0 when they wrap: 2^64-1 is followed by 1.
    WrapSkipsZero,
    /// A write that fails is reported as such: the daemon's final frame,
    /// waiting to be read, is lost.
    LosesFinalFrame,
    /// A busy refusal is retried at once, without a pause.
    RetriesAtOnce,
    /// A busy refusal is retried once, then reported.
    GivesUpEarly,
}

/// A client written byte by byte from the spec, knowing only the ops
/// `ping`, `publish`, `pipeline` (of pings) and `connect` (with
/// `next_request_id` and `connect_timeout_ms`, retrying busy refusals).
struct RawDriver {
    stream: UnixStream,
    buf: BytesMut,
    next_id: u64,
    fault: Break,
    instructions: Vec<Value>,
    welcome: Welcome,
    /// Why the connection ended, once it has: every later op reports it.
    ended: Option<Value>,
}

const CONTROL_SID: u64 = 1;

fn frame(payload: &[u8], fault: Break) -> Vec<u8> {
    let extra = if fault == Break::LengthCountsItself {
        4
    } else {
        0
    };
    let mut frame = ((payload.len() + extra) as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

fn request(id: u64, kind: u32, body: &[u8]) -> Vec<u8> {
    let mut payload = id.to_le_bytes().to_vec();
    payload.extend(kind.to_le_bytes());
    payload.extend(body);
    payload
}

fn string(text: &[u8], big_endian: bool) -> Vec<u8> {
    let len = text.len() as u64;
    let mut out = if big_endian {
        len.to_be_bytes().to_vec()
    } else {
        len.to_le_bytes().to_vec()
    };
    out.extend(text);
    out
}

fn publish_body(topic: &str, payload: &[u8], fault: Break) -> Vec<u8> {
    let mut body = 3u32.to_le_bytes().to_vec();
    body.extend(string(topic.as_bytes(), fault == Break::ByteOrder));
    body.extend(string(payload, false));
    body
}

impl RawDriver {
    async fn connect(dir: &Path, fault: Break) -> std::io::Result<Self> {
        match Self::open(dir, fault).await? {
            Ok(driver) => Ok(driver),
            Err(code) => Err(std::io::Error::other(format!("refused: {code}"))),
        }
    }

    /// One attempt: the driver once welcomed, or the refusal's code.
    async fn open(dir: &Path, fault: Break) -> std::io::Result<Result<Self, u32>> {
        let mut stream = UnixStream::connect(dir.join("keyhole.sock")).await?;
        let token = keyhole::token_file::read_token_file(&dir.join("session-token"))
            .map_err(std::io::Error::other)?;
        stream
            .write_all(keyhole::handshake::HandshakeFrame::new(&token).as_bytes())
            .await?;
        let mut driver = Self {
            stream,
            buf: BytesMut::new(),
            next_id: 1,
            fault,
            instructions: Vec::new(),
            welcome: keyhole_welcome_of_extra(),
            ended: None,
        };
        match driver.read().await? {
            DaemonFrame::Welcome(welcome) => {
                driver.welcome = welcome;
                Ok(Ok(driver))
            }
            DaemonFrame::Error(error) if error.id.is_none() => Ok(Err(error.code.wire())),
            other => Err(std::io::Error::other(format!("no Welcome: {other:?}"))),
        }
    }

    /// The `connect` op's connection: busy refusals retried (pausing 5 ms,
    /// doubling to 100 ms) until the connect timeout, as section 9 asks,
    /// unless the driver is broken there.
    async fn open_retrying(
        dir: &Path,
        fault: Break,
        timeout: Duration,
    ) -> std::io::Result<Result<Self, u32>> {
        let until = std::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let code = match Self::open(dir, fault).await? {
                Ok(driver) => return Ok(Ok(driver)),
                Err(code) => code,
            };
            let give_up = match fault {
                Break::GivesUpEarly => attempts >= 2,
                _ => std::time::Instant::now() + pause >= until,
            };
            if !matches!(code, 6 | 7) || give_up {
                return Ok(Err(code));
            }
            if fault != Break::RetriesAtOnce {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }

    /// The next request's id: ids wrap from 2^64-1 to 0.
    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = match self.fault {
            Break::WrapSkipsZero => id.checked_add(1).unwrap_or(1),
            _ => id.wrapping_add(1),
        };
        id
    }

    /// A request on an extra connection whose write may fail (a frame
    /// larger than the socket buffers, which the kit leaves unread): the
    /// daemon's final frame is still read and reported.
    async fn call_on_extra(&mut self, kind: u32, body: &[u8]) -> std::io::Result<Value> {
        if let Some(ended) = &self.ended {
            return Ok(ended.clone());
        }
        let id = self.take_id();
        let bytes = frame(&request(id, kind, body), self.fault);
        if let Err(err) = self.stream.write_all(&bytes).await {
            let ended = if self.fault == Break::LosesFinalFrame {
                json!({"error": {"kind": "other", "text": format!("write: {err}")}})
            } else {
                self.final_frame().await
            };
            self.ended = Some(ended.clone());
            return Ok(ended);
        }
        let answer = match self.read().await {
            Ok(DaemonFrame::Error(error)) if error.id.is_none() => {
                let ended = coded("daemon", error.code.wire());
                self.ended = Some(ended.clone());
                ended
            }
            Ok(frame) => answer_of(&frame),
            Err(_) => json!({"error": {"kind": "closed", "reason": null}}),
        };
        Ok(answer)
    }

    /// What is left to read once a write failed: the daemon's final
    /// frame, if it sent one.
    async fn final_frame(&mut self) -> Value {
        loop {
            match self.read().await {
                Ok(DaemonFrame::Error(error)) if error.id.is_none() => {
                    return coded("daemon", error.code.wire());
                }
                Ok(DaemonFrame::Closing(reason)) => {
                    return json!({"error": {"kind": "closed", "reason": match reason {
                        CloseReason::Shutdown => "shutdown",
                        CloseReason::SlowConsumer => "slow_consumer",
                    }}});
                }
                Ok(_) => {}
                Err(_) => return json!({"error": {"kind": "closed", "reason": null}}),
            }
        }
    }

    async fn read(&mut self) -> std::io::Result<DaemonFrame> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if self.buf.len() >= 4 + len as usize {
                    let mut frame = self.buf.split_to(4 + len as usize);
                    let payload: Bytes = frame.split_off(4).freeze();
                    return DaemonFrame::decode(&payload).map_err(std::io::Error::other);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request (with the driver's fault when `faulty`) and returns
    /// the frame that answers it; instructions arriving meanwhile are kept.
    async fn call(&mut self, kind: u32, body: &[u8], faulty: bool) -> std::io::Result<DaemonFrame> {
        let id = self.take_id();
        let fault = if faulty { self.fault } else { Break::None };
        let bytes = frame(&request(id, kind, body), fault);
        self.stream.write_all(&bytes).await?;
        loop {
            match self.read().await? {
                DaemonFrame::Event { stream, body } if stream == CONTROL_SID => {
                    self.instructions.push(instruction_of(&body));
                }
                DaemonFrame::Event { .. } => {}
                answer => return Ok(answer),
            }
        }
    }

    async fn next_instruction(&mut self) -> std::io::Result<Value> {
        if !self.instructions.is_empty() {
            return Ok(self.instructions.remove(0));
        }
        loop {
            if let DaemonFrame::Event { stream, body } = self.read().await? {
                if stream == CONTROL_SID {
                    return Ok(instruction_of(&body));
                }
            }
        }
    }

    async fn report(&mut self, report: Value) -> std::io::Result<()> {
        let body = publish_body(REPORT_TOPIC, report.to_string().as_bytes(), Break::None);
        self.call(0, &body, false).await.map(|_| ())
    }

    async fn op(&mut self, dir: &Path, op: &Value) -> std::io::Result<Value> {
        Ok(match text(op, "op") {
            "ping" => answer_of(&self.call(1, &[], true).await?),
            "publish" => {
                let payload = payload_of(&op["payload"]);
                let body = publish_body(text(op, "topic"), &payload, self.fault);
                answer_of(&self.call(0, &body, true).await?)
            }
            "connect" => {
                let timeout = match op["connect_timeout_ms"].as_str() {
                    Some(ms) => Duration::from_millis(ms.parse().unwrap_or(0)),
                    None => Duration::from_secs(10),
                };
                let mut extra = match RawDriver::open_retrying(dir, self.fault, timeout).await? {
                    Ok(extra) => extra,
                    Err(code) => return Ok(coded("refused", code)),
                };
                if let Some(id) = op["next_request_id"].as_str() {
                    extra.next_id = id.parse().unwrap_or(0);
                }
                let mut results = Vec::new();
                for op in op["ops"].as_array().cloned().unwrap_or_default() {
                    results.push(match text(&op, "op") {
                        "ping" => extra.call_on_extra(1, &[]).await?,
                        "publish" => {
                            let body = publish_body(
                                text(&op, "topic"),
                                &payload_of(&op["payload"]),
                                self.fault,
                            );
                            extra.call_on_extra(0, &body).await?
                        }
                        _ => extra.pipeline_of_pings(&op).await?,
                    });
                }
                let welcome = welcome_json(&extra.welcome);
                ok(json!({"welcome": welcome, "results": results}))
            }
            other => json!({"error": {"kind": "other", "text": format!("unknown op {other}")}}),
        })
    }

    /// A pipeline of pings: every ping written, then the answers read; an
    /// answer must carry the id of the oldest ping outstanding, unless the
    /// driver matches by arrival.
    async fn pipeline_of_pings(&mut self, op: &Value) -> std::io::Result<Value> {
        let count = op["ops"].as_array().map_or(0, Vec::len);
        let mut ids = Vec::new();
        for _ in 0..count {
            let id = self.take_id();
            ids.push(id);
            let bytes = frame(&request(id, 1, &[]), self.fault);
            self.stream.write_all(&bytes).await?;
        }
        let mut results = Vec::new();
        let mut broken = false;
        for want in ids {
            let answer = self.read().await;
            let right = matches!(&answer, Ok(DaemonFrame::Ack { id }) if *id == want);
            let taken = matches!(answer, Ok(DaemonFrame::Ack { .. }))
                && (right || self.fault == Break::MatchByArrival);
            broken |= !taken;
            results.push(if broken {
                kind("protocol")
            } else {
                ok(json!("ack"))
            });
        }
        Ok(ok(json!({ "results": results })))
    }
}

/// The `Welcome` of the kit's extra connections (the raw driver does not
/// keep what it read: it reports the one the kit sends).
fn keyhole_welcome_of_extra() -> Welcome {
    Welcome {
        protocol_version: 2,
        service: "hub".into(),
        service_version: 2,
        software_version: "conformance".into(),
        instance_id: 0x6b69_7400_0000_0001,
        connection_id: 2,
        max_frame_len: 1024,
    }
}

fn instruction_of(body: &Bytes) -> Value {
    match keyhole::encoding::decode::<keyhole::hub::HubEvent>(body) {
        Ok(keyhole::hub::HubEvent::Message { payload, .. }) => {
            serde_json::from_slice(Payload::bytes(&payload)).unwrap_or_default()
        }
        _ => Value::Null,
    }
}

fn answer_of(frame: &DaemonFrame) -> Value {
    match frame {
        DaemonFrame::Ack { .. } => ok(json!("ack")),
        DaemonFrame::Reply { body, .. } => {
            match keyhole::encoding::decode::<keyhole::hub::HubReply>(body) {
                Ok(keyhole::hub::HubReply::Published { receivers }) => {
                    ok(json!({ "published": n(receivers) }))
                }
                _ => kind("protocol"),
            }
        }
        DaemonFrame::Error(error) if error.id.is_some() => {
            let code = error.code.wire();
            coded(if code >= 1000 { "service" } else { "daemon" }, code)
        }
        _ => kind("protocol"),
    }
}

async fn raw_driver(dir: &Path, fault: Break) -> std::io::Result<bool> {
    let mut driver = RawDriver::connect(dir, fault).await?;
    let mut subscribe = 1u32.to_le_bytes().to_vec();
    subscribe.extend(CONTROL_SID.to_le_bytes());
    subscribe.extend(string(CONTROL_TOPIC.as_bytes(), false));
    subscribe.extend(0u32.to_le_bytes());
    driver.call(0, &subscribe, false).await?;
    driver.report(json!({"step": HELLO, "results": []})).await?;
    loop {
        let instruction = driver.next_instruction().await?;
        if instruction["step"] == "end" {
            return Ok(instruction["verdict"] == "pass");
        }
        let mut results = Vec::new();
        for op in instruction["ops"].as_array().cloned().unwrap_or_default() {
            results.push(driver.op(dir, &op).await?);
        }
        driver
            .report(json!({"step": instruction["step"], "results": results}))
            .await?;
    }
}

/// The steps the first broken raw drivers are run on.
const RAW_STEPS: [&str; 3] = ["ping", "publish", "reply_wrong_id"];

/// Every step the raw drivers know how to play, in the kit's order.
const RAW_ALL_STEPS: [&str; 7] = [
    "ping",
    "publish",
    "busy_retry_pauses",
    "busy_give_up",
    "reply_wrong_id",
    "request_ids_edges",
    "write_fails_after_final_frame",
];

async fn raw_run(fault: Break) -> Report {
    raw_run_on(fault, &RAW_STEPS).await
}

async fn raw_run_on(fault: Break, steps: &[&str]) -> Report {
    let steps: Vec<String> = steps.iter().map(|s| (*s).to_owned()).collect();
    let report = run_kit(
        |options| options.only(steps).step_timeout(Duration::from_secs(8)),
        move |dir| async move { raw_driver(&dir, fault).await.unwrap_or(false) },
    )
    .await;
    eprintln!("{fault:?}: {report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_driver_passes_the_steps_its_broken_versions_fail() {
    let report = raw_run_on(Break::None, &RAW_ALL_STEPS).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.passed, RAW_ALL_STEPS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_that_skip_0_when_they_wrap_fail_at_the_id_after_2_64_minus_1() {
    let report = raw_run_on(Break::WrapSkipsZero, &["ping", "request_ids_edges"]).await;
    let failure = report.failure.clone().expect("the run fails");
    assert_eq!(failure.step, "request_ids_edges", "{report}");
    assert_eq!(failure.offset, Some(4), "{report}");
    // The second Ping: id 0 expected, 1 sent.
    assert_eq!(
        failure.expected.as_deref(),
        Some("0c 00 00 00 00 00 00 00 00 00 00 00 01 00 00 00"),
        "{report}"
    );
    assert_eq!(
        failure.received.as_deref(),
        Some("0c 00 00 00 01 00 00 00 00 00 00 00 01 00 00 00"),
        "{report}"
    );
    assert_eq!(report.passed, ["ping"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reports_its_failed_write_loses_the_final_frame_and_fails() {
    let report = raw_run_on(
        Break::LosesFinalFrame,
        &["ping", "write_fails_after_final_frame"],
    )
    .await;
    let failure = report.failure.clone().expect("the run fails");
    assert_eq!(failure.step, "write_fails_after_final_frame", "{report}");
    // The write did fail (deterministically): the driver says so where
    // the kit expects the daemon's code.
    assert!(failure.why.contains("\"code\":\"15\""), "{report}");
    assert!(failure.why.contains("write: "), "{report}");
    assert_eq!(report.passed, ["ping"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_retries_without_a_pause_or_given_up_early_fail() {
    let report = raw_run_on(Break::RetriesAtOnce, &["ping", "busy_retry_pauses"]).await;
    let failure = report.failure.clone().expect("the run fails");
    assert_eq!(failure.step, "busy_retry_pauses", "{report}");
    assert!(failure.why.contains("pauses at least 1ms"), "{report}");
    let report = raw_run_on(Break::GivesUpEarly, &["ping", "busy_give_up"]).await;
    let failure = report.failure.clone().expect("the run fails");
    assert_eq!(failure.step, "busy_give_up", "{report}");
    assert!(failure.why.contains("gave up"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_in_the_wrong_byte_order_fails_the_step_with_both_frames_in_hex() {
    let report = raw_run(Break::ByteOrder).await;
    let failure = report.failure.clone().expect("the run fails");
    assert_eq!(failure.step, "publish", "{report}");
    assert_eq!(failure.offset, Some(20), "{report}");
    // The topic length: 10, little-endian, against the same in big-endian.
    let expected = failure.expected.unwrap_or_default();
    let received = failure.received.unwrap_or_default();
    assert!(
        expected.contains("03 00 00 00 0a 00 00 00 00 00 00 00 6e 65 77 73"),
        "{expected}"
    );
    assert!(
        received.contains("03 00 00 00 00 00 00 00 00 00 00 0a 6e 65 77 73"),
        "{received}"
    );
    assert_eq!(report.passed, ["ping"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_prefix_that_counts_itself_fails_the_first_step_at_byte_0() {
    let report = raw_run(Break::LengthCountsItself).await;
    let failure = report.failure.clone().expect("the run fails");
    assert_eq!(failure.step, "ping", "{report}");
    assert_eq!(failure.offset, Some(0), "{report}");
    assert!(failure.why.contains("says 16 bytes, not 12"), "{report}");
    assert!(
        failure
            .expected
            .unwrap_or_default()
            .starts_with("0c 00 00 00 ?? ??"),
        "{report}"
    );
    assert!(
        failure
            .received
            .unwrap_or_default()
            .starts_with("10 00 00 00"),
        "{report}"
    );
    assert!(report.passed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_matched_by_arrival_fail_the_wrong_id_step() {
    let report = raw_run(Break::MatchByArrival).await;
    let failure = report.failure.clone().expect("the run fails");
    assert_eq!(failure.step, "reply_wrong_id", "{report}");
    assert!(failure.why.contains("expected"), "{report}");
    assert!(failure.why.contains("\"ack\""), "{report}");
    assert_eq!(report.passed, ["ping", "publish"]);
}

#[test]
fn the_binary_runs_a_driver_and_exits_with_the_verdict() {
    let base = tempfile::tempdir().expect("temp dir");
    let dir = base.path().join("run");
    let kit = std::process::Command::new(env!("CARGO_BIN_EXE_keyhole-conformance"))
        .arg("--dir")
        .arg(&dir)
        .args(["--only", "ping", "--json", "--connect-timeout", "20"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the kit starts");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let passed = runtime.block_on(async {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !dir.join("session-token").exists() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        raw_driver(&dir, Break::None).await.unwrap_or(false)
    });
    let output = kit.wait_with_output().expect("the kit exits");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert!(passed);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["verdict"], "pass");
    assert_eq!(report["passed"], json!(["ping"]));
    assert!(
        !dir.join("keyhole.sock").exists(),
        "the kit removes its socket"
    );
}
