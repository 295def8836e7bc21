//! Golden vectors: `tests/vectors/golden.json` holds real frames of every
//! message of protocol v2 and of the hub, and `proto-spec.md` shows the same
//! bytes annotated (both written by `cargo run --example gen_vectors`).
//!
//! These tests tie the three together, and to a real daemon, so that none
//! can drift:
//! - each vector's hex decodes, with the library's decoders, to the vector's
//!   JSON, and the JSON's value encodes back to exactly that hex;
//! - the handshake vector is what the client sends, and a daemon (the real
//!   server, in-process, with the test token) answers it with `Welcome`;
//! - each negative vector sent to that daemon gets the documented answer,
//!   leaves the connection open or closed as documented, and is decided
//!   after exactly `decided_after` bytes (no answer one byte earlier, the
//!   same answer with garbage after it); the client-side ones are refused by
//!   the decoders;
//! - the vectors of frames that carry descriptors are sent to that daemon
//!   with their descriptors (a sealed memfd, after `AcceptFds`), and the
//!   descriptor errors (17, 18, 19 and the hub's 1008) are provoked there
//!   and answered as their vectors show;
//! - every error code, request kind, frame and hub message has a vector,
//!   and the negative vectors of unknown kinds, tags and codes use values
//!   this version does not define;
//! - every vector appears in `proto-spec.md` as a dump whose bytes are
//!   exactly the vector's hex, and every dump names a vector.
//!
//! Failures name the vector and show both byte sequences.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keyhole::encoding;
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubEvent, HubReply, HubRequest, HubService, Outcome};
use keyhole::limits::{MAX_ERROR_MESSAGE_LEN, MAX_FRAME_LEN, MAX_MEMFD_LEN};
use keyhole::memfd;
use keyhole::server::{Server, ServerConfig};
use keyhole::token::SessionToken;
use keyhole::transport::{
    CloseReason, DaemonFrame, ErrorCode, ErrorFrame, PROTOCOL_VERSION, REQUEST_HEADER_LEN,
    REQUEST_KINDS, RequestHeader, RequestKind, TransportCode, Welcome, encode_call_fds,
    encode_request,
};
use serde::Deserialize;

const GOLDEN: &str = include_str!("vectors/golden.json");
const SPEC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto-spec.md");

#[derive(Debug, Deserialize)]
struct Golden {
    test_token_hex: String,
    vectors: Vec<Vector>,
    negative: Vec<Negative>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Direction {
    Handshake,
    ClientToDaemon,
    DaemonToClient,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    name: String,
    direction: Direction,
    hex: String,
    #[serde(default)]
    request: Option<JsonRequest>,
    #[serde(default)]
    frame: Option<JsonFrame>,
    #[serde(default)]
    handshake: Option<HandshakeFields>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandshakeFields {
    magic: String,
    protocol_version: u32,
    token_hex: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    id: u64,
    kind: String,
    #[serde(default)]
    call: Option<HubRequest>,
    /// A `CallFds`'s count of descriptors.
    #[serde(default)]
    fds: Option<u32>,
    /// An `Expect`'s body: the service's name and version.
    #[serde(default)]
    expect: Option<JsonExpect>,
}

/// The body of an `Expect` in golden.json.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct JsonExpect {
    service: String,
    service_version: u32,
}

/// A daemon frame in golden.json's form (see its `conventions`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
enum JsonFrame {
    Welcome(Welcome),
    Reply {
        id: u64,
        reply: HubReply,
    },
    Event {
        stream: u64,
        event: HubEvent,
    },
    Ack {
        id: u64,
    },
    Error {
        id: Option<u64>,
        code: u32,
        message: String,
    },
    Closing(CloseReason),
    Lagged {
        stream: u64,
        missed: u64,
    },
    ReplyFds {
        id: u64,
        fds: u32,
        reply: HubReply,
    },
    EventFds {
        stream: u64,
        fds: u32,
        event: HubEvent,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Negative {
    name: String,
    direction: Direction,
    description: String,
    hex: String,
    error_code: Option<u32>,
    error_id: Option<u64>,
    closes: bool,
    decided_after: usize,
}

fn golden() -> Golden {
    let golden: Golden = serde_json::from_str(GOLDEN).expect("golden.json does not parse");
    let mut names = BTreeSet::new();
    for name in golden
        .vectors
        .iter()
        .map(|v| &v.name)
        .chain(golden.negative.iter().map(|n| &n.name))
    {
        assert!(names.insert(name), "vector name `{name}` is used twice");
    }
    golden
}

fn test_token(golden: &Golden) -> SessionToken {
    SessionToken::from_hex(&golden.test_token_hex).expect("test_token_hex is not a token")
}

fn bytes_of(name: &str, hex: &str) -> Vec<u8> {
    hex::decode(hex).unwrap_or_else(|err| panic!("vector `{name}`: hex does not parse: {err}"))
}

fn spaced(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn diff(left: (&str, &[u8]), right: (&str, &[u8])) -> String {
    let ((left_name, left), (right_name, right)) = (left, right);
    let at = left
        .iter()
        .zip(right)
        .position(|(a, b)| a != b)
        .unwrap_or(left.len().min(right.len()));
    let width = left_name.len().max(right_name.len()) + 1;
    format!(
        "first difference at byte {at} ({left_name}: {} bytes, {right_name}: {} bytes)\n  \
         {:width$} {}\n  {:width$} {}",
        left.len(),
        right.len(),
        format!("{left_name}:"),
        spaced(left),
        format!("{right_name}:"),
        spaced(right),
    )
}

fn report(what: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} vector(s) failed {what}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The payload of one whole frame; the frame must use all of the bytes.
fn payload_of(bytes: &[u8]) -> Result<Bytes, String> {
    if bytes.len() < 4 {
        return Err("shorter than a length prefix".into());
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(format!("length {len} over the ceiling"));
    }
    if bytes.len() != 4 + len {
        return Err(format!("{} bytes for a frame of {}", bytes.len(), 4 + len));
    }
    Ok(Bytes::copy_from_slice(&bytes[4..]))
}

fn kind_of(name: &str) -> RequestKind {
    match name {
        "Call" => RequestKind::Call,
        "Ping" => RequestKind::Ping,
        "Shutdown" => RequestKind::Shutdown,
        "Expect" => RequestKind::Expect,
        "AcceptFds" => RequestKind::AcceptFds,
        "CallFds" => RequestKind::CallFds,
        other => panic!("unknown kind {other:?} in golden.json"),
    }
}

/// A request payload as golden.json writes it, decoded by the library.
fn decode_request(payload: &Bytes) -> Result<JsonRequest, String> {
    let header = RequestHeader::parse(payload).map_err(|e| e.to_string())?;
    let kind = RequestKind::from_tag(header.kind).ok_or("unknown kind")?;
    let body = payload.slice(REQUEST_HEADER_LEN..);
    let mut fds = None;
    let (call, expect) = match kind {
        RequestKind::Call => (
            Some(encoding::decode_shared::<HubRequest>(&body).map_err(|e| e.to_string())?),
            None,
        ),
        RequestKind::CallFds => {
            let count = body.get(..4).ok_or("a CallFds without its count")?;
            fds = Some(u32::from_le_bytes([count[0], count[1], count[2], count[3]]));
            (
                Some(
                    encoding::decode_shared::<HubRequest>(&body.slice(4..))
                        .map_err(|e| e.to_string())?,
                ),
                None,
            )
        }
        RequestKind::Expect => {
            let (service, service_version) =
                encoding::decode::<(String, u32)>(&body).map_err(|e| e.to_string())?;
            (
                None,
                Some(JsonExpect {
                    service,
                    service_version,
                }),
            )
        }
        _ if !body.is_empty() => return Err("a body after a transport request".into()),
        _ => (None, None),
    };
    Ok(JsonRequest {
        id: header.id,
        kind: format!("{kind:?}"),
        call,
        fds,
        expect,
    })
}

/// A daemon frame payload, its service body decoded too.
fn decode_frame(payload: &Bytes) -> Result<JsonFrame, String> {
    Ok(
        match DaemonFrame::decode(payload).map_err(|e| e.to_string())? {
            DaemonFrame::Welcome(w) => JsonFrame::Welcome(w),
            DaemonFrame::Reply { id, body } => JsonFrame::Reply {
                id,
                reply: encoding::decode_shared(&body).map_err(|e| e.to_string())?,
            },
            DaemonFrame::Event { stream, body } => JsonFrame::Event {
                stream,
                event: encoding::decode_shared(&body).map_err(|e| e.to_string())?,
            },
            DaemonFrame::Ack { id } => JsonFrame::Ack { id },
            DaemonFrame::Error(ErrorFrame { id, code, message }) => JsonFrame::Error {
                id,
                code: code.wire(),
                message,
            },
            DaemonFrame::Closing(reason) => JsonFrame::Closing(reason),
            DaemonFrame::Lagged { stream, missed } => JsonFrame::Lagged { stream, missed },
            DaemonFrame::ReplyFds { id, fds, body } => JsonFrame::ReplyFds {
                id,
                fds,
                reply: encoding::decode_shared(&body).map_err(|e| e.to_string())?,
            },
            DaemonFrame::EventFds { stream, fds, body } => JsonFrame::EventFds {
                stream,
                fds,
                event: encoding::decode_shared(&body).map_err(|e| e.to_string())?,
            },
        },
    )
}

fn encode_json_request(r: &JsonRequest) -> Vec<u8> {
    let mut buf = BytesMut::new();
    if let (Some(fds), Some(call)) = (r.fds, &r.call) {
        assert_eq!(r.kind, "CallFds", "only a CallFds has fds");
        encode_call_fds(&mut buf, r.id, fds, call, MAX_FRAME_LEN).expect("encodes");
        return buf.to_vec();
    }
    if let Some(e) = &r.expect {
        encode_request(
            &mut buf,
            r.id,
            kind_of(&r.kind),
            Some(&(e.service.as_str(), e.service_version)),
            MAX_FRAME_LEN,
        )
        .expect("encodes");
        return buf.to_vec();
    }
    encode_request(
        &mut buf,
        r.id,
        kind_of(&r.kind),
        r.call.as_ref(),
        MAX_FRAME_LEN,
    )
    .expect("encodes");
    buf.to_vec()
}

fn encode_json_frame(f: &JsonFrame) -> Vec<u8> {
    let frame = match f {
        JsonFrame::Welcome(w) => DaemonFrame::Welcome(w.clone()),
        JsonFrame::Reply { id, reply } => DaemonFrame::Reply {
            id: *id,
            body: encoding::encode(reply).unwrap(),
        },
        JsonFrame::Event { stream, event } => DaemonFrame::Event {
            stream: *stream,
            body: encoding::encode(event).unwrap(),
        },
        JsonFrame::Ack { id } => DaemonFrame::Ack { id: *id },
        JsonFrame::Error { id, code, message } => DaemonFrame::Error(ErrorFrame {
            id: *id,
            code: ErrorCode::from_wire(*code).expect("a known code"),
            message: message.clone(),
        }),
        JsonFrame::Closing(reason) => DaemonFrame::Closing(*reason),
        JsonFrame::ReplyFds { id, fds, reply } => DaemonFrame::ReplyFds {
            id: *id,
            fds: *fds,
            body: encoding::encode(reply).unwrap(),
        },
        JsonFrame::EventFds { stream, fds, event } => DaemonFrame::EventFds {
            stream: *stream,
            fds: *fds,
            body: encoding::encode(event).unwrap(),
        },
        JsonFrame::Lagged { stream, missed } => DaemonFrame::Lagged {
            stream: *stream,
            missed: *missed,
        },
    };
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).expect("encodes");
    buf.to_vec()
}

#[test]
fn every_vector_decodes_to_its_message_and_encodes_back() {
    let golden = golden();
    let mut failures = Vec::new();
    for v in &golden.vectors {
        let bytes = bytes_of(&v.name, &v.hex);
        if v.direction == Direction::Handshake {
            continue;
        }
        let payload = match payload_of(&bytes) {
            Ok(p) => p,
            Err(err) => {
                failures.push(format!("`{}`: {err}", v.name));
                continue;
            }
        };
        let (decoded, encoded) = match v.direction {
            Direction::ClientToDaemon => {
                let Some(want) = &v.request else {
                    failures.push(format!("`{}`: no request", v.name));
                    continue;
                };
                (
                    decode_request(&payload).map(|got| (got == *want, format!("{got:?}"))),
                    encode_json_request(want),
                )
            }
            _ => {
                let Some(want) = &v.frame else {
                    failures.push(format!("`{}`: no frame", v.name));
                    continue;
                };
                (
                    decode_frame(&payload).map(|got| (got == *want, format!("{got:?}"))),
                    encode_json_frame(want),
                )
            }
        };
        match decoded {
            Err(err) => failures.push(format!("`{}`: does not decode: {err}", v.name)),
            Ok((false, got)) => failures.push(format!("`{}`: decodes to {got}", v.name)),
            Ok((true, _)) => {}
        }
        if encoded != bytes {
            failures.push(format!(
                "`{}`: {}",
                v.name,
                diff(("golden.json", &bytes), ("code", &encoded))
            ));
        }
    }
    report("decoding and encoding", failures);
}

// ---------------------------------------------------------------------------
// A real daemon

/// The real server with the test token on a socket in a temp dir, on a
/// runtime of its own.
struct Daemon {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl Daemon {
    fn start(token: &SessionToken) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("keyhole.sock");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let config = ServerConfig {
            auth_timeout: Duration::from_secs(30),
            ..ServerConfig::default()
        };
        let server = Server::new(HubService::new(), config, Arc::new(token.clone()));
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        runtime.spawn(async move { server.run(listener, std::future::pending()).await });
        Self {
            socket,
            _dir: dir,
            _runtime: runtime,
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// An authenticated connection, `Welcome` read.
    fn authenticated(&self, token: &SessionToken) -> UnixStream {
        let mut s = self.connect();
        s.write_all(&HandshakeFrame::new(token)).unwrap();
        match read_frame(&mut s).map(|p| decode_frame(&p)) {
            Some(Ok(JsonFrame::Welcome(_))) => s,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
}

/// One frame's payload; `None` at the end of the stream.
fn read_frame(s: &mut UnixStream) -> Option<Bytes> {
    let mut prefix = [0u8; 4];
    match s.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return None;
        }
        Err(e) => panic!("read: {e}"),
    }
    let mut payload = vec![0u8; u32::from_le_bytes(prefix) as usize];
    s.read_exact(&mut payload).expect("a whole frame");
    Some(Bytes::from(payload))
}

/// Whether the daemon sends anything within `wait`.
fn quiet_for(s: &mut UnixStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut probe = [0u8; 1];
    let quiet = matches!(
        rustix::net::recv(&*s, &mut probe, rustix::net::RecvFlags::PEEK),
        Err(rustix::io::Errno::AGAIN)
    );
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    quiet
}

fn vector_named<'a>(golden: &'a Golden, name: &str) -> &'a Vector {
    golden
        .vectors
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vector {name}"))
}

/// Sends the `accept_fds` vector and reads its `Ack` (section 19.1: no
/// descriptor may be sent before it).
fn accept_fds(s: &mut UnixStream, golden: &Golden) {
    let v = vector_named(golden, "accept_fds");
    let id = v.request.as_ref().map(|r| r.id);
    s.write_all(&bytes_of(&v.name, &v.hex)).unwrap();
    match read_frame(s).map(|p| decode_frame(&p)) {
        Some(Ok(JsonFrame::Ack { id: got })) if Some(got) == id => {}
        other => panic!("`accept_fds`: answered {other:?}"),
    }
}

/// Writes a frame with `fds` as `SCM_RIGHTS` with its first byte, the rest
/// (if the `sendmsg` took only part of it) with plain writes (section 19.2).
fn send_with_descriptors(s: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) {
    let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    let sent = keyhole::fds::send_with_fds(s, &[IoSlice::new(bytes)], &borrowed).expect("sendmsg");
    assert!(sent > 0, "sendmsg sent nothing");
    let mut rest = s;
    rest.write_all(&bytes[sent..]).unwrap();
}

/// A memfd sealed as the hub wants (section 19.5), holding `bytes`.
fn sealed_memfd(bytes: &[u8]) -> OwnedFd {
    memfd::create_sealed("golden", bytes).expect("a sealed memfd")
}

/// A memfd sealed as the hub wants but one byte over its limit (sparse:
/// it costs no memory).
fn oversized_memfd() -> OwnedFd {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create("golden", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .expect("memfd_create");
    rustix::fs::ftruncate(&fd, MAX_MEMFD_LEN + 1).expect("ftruncate");
    rustix::fs::fcntl_add_seals(&fd, SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW)
        .expect("seals");
    fd
}

/// Whether the connection is still served: a `Ping` is answered `Ack`.
fn still_open(s: &mut UnixStream) -> Result<(), String> {
    let mut ping = BytesMut::new();
    encode_request::<()>(&mut ping, 99, RequestKind::Ping, None, MAX_FRAME_LEN).unwrap();
    s.write_all(&ping).map_err(|e| e.to_string())?;
    match read_frame(s).map(|p| decode_frame(&p)) {
        Some(Ok(JsonFrame::Ack { id: 99 })) => Ok(()),
        other => Err(format!("not open after the error: {other:?}")),
    }
}

#[test]
fn the_handshake_vector_is_what_the_client_sends_and_the_daemon_welcomes() {
    let golden = golden();
    let token = test_token(&golden);
    assert_eq!(
        token.as_bytes(),
        &std::array::from_fn::<u8, 32, _>(|i| i as u8),
        "the test token must be the bytes 0x00..0x1f"
    );
    let v = golden
        .vectors
        .iter()
        .find(|v| v.direction == Direction::Handshake)
        .expect("a handshake vector");
    let fields = v.handshake.as_ref().expect("handshake fields");
    assert_eq!(fields.magic, "KYHL");
    assert_eq!(fields.protocol_version, PROTOCOL_VERSION);
    assert_eq!(fields.token_hex, golden.test_token_hex);
    let expected = bytes_of(&v.name, &v.hex);
    let sent = HandshakeFrame::new(&token);
    assert!(
        sent[..] == expected[..],
        "{}",
        diff(("golden.json", &expected), ("code", &sent))
    );
    // A real daemon welcomes it, delivered one byte at a time too.
    let daemon = Daemon::start(&token);
    let mut s = daemon.connect();
    for byte in &expected {
        s.write_all(std::slice::from_ref(byte)).unwrap();
    }
    match read_frame(&mut s).map(|p| decode_frame(&p)) {
        Some(Ok(JsonFrame::Welcome(w))) => {
            assert_eq!((w.protocol_version, w.service.as_str()), (2, "hub"))
        }
        other => panic!("{other:?}"),
    }
}

/// The reply variant the hub answers `call` with (section 13).
fn reply_kind(call: &HubRequest) -> &'static str {
    match call {
        HubRequest::Status => "Status",
        HubRequest::Subscribe { .. } => "Subscribed",
        HubRequest::Unsubscribe { .. } => "Unsubscribed",
        HubRequest::Publish { .. } => "Published",
        HubRequest::Serve { .. } => "Serving",
        HubRequest::Unserve { .. } => "Unserved",
        HubRequest::Request { .. } => "Requested",
        HubRequest::Respond { .. } | HubRequest::Fail { .. } => "Responded",
        HubRequest::Topics => "Topics",
        HubRequest::PublishMemfd { .. } => "Published",
    }
}

fn kind_of_reply(reply: &HubReply) -> &'static str {
    match reply {
        HubReply::Status(_) => "Status",
        HubReply::Subscribed => "Subscribed",
        HubReply::Unsubscribed => "Unsubscribed",
        HubReply::Published { .. } => "Published",
        HubReply::Serving => "Serving",
        HubReply::Unserved => "Unserved",
        HubReply::Requested => "Requested",
        HubReply::Responded { .. } => "Responded",
        HubReply::Topics(_) => "Topics",
    }
}

#[test]
fn every_request_vector_gets_its_reply_from_a_daemon() {
    let golden = golden();
    let token = test_token(&golden);
    let daemon = Daemon::start(&token);
    let replies: BTreeMap<u64, &JsonFrame> = golden
        .vectors
        .iter()
        .filter_map(|v| v.frame.as_ref())
        .filter_map(|f| match f {
            JsonFrame::Ack { id } | JsonFrame::Reply { id, .. } => Some((*id, f)),
            _ => None,
        })
        .collect();
    let vector = |name: &str| vector_named(&golden, name);
    // Someone serves the name the `request` vector asks for (with the
    // `serve` vector itself), so that it is answered `Requested`.
    let mut responder = daemon.authenticated(&token);
    responder
        .write_all(&bytes_of("serve", &vector("serve").hex))
        .unwrap();
    let _ = read_frame(&mut responder).unwrap();
    for v in golden
        .vectors
        .iter()
        .filter(|v| v.direction == Direction::ClientToDaemon)
    {
        let request = v.request.as_ref().unwrap();
        if request.kind == "Shutdown" {
            continue; // answered Ack, but it would stop the daemon for the others
        }
        let mut s = daemon.authenticated(&token);
        let bytes = bytes_of(&v.name, &v.hex);
        if let Some(fds) = request.fds {
            // A CallFds goes with its descriptors (sealed memfds), after
            // the Ack of an AcceptFds (section 19); without them it would
            // be refused.
            accept_fds(&mut s, &golden);
            let memfds: Vec<OwnedFd> = (0..fds).map(|_| sealed_memfd(b"hello")).collect();
            send_with_descriptors(&s, &bytes, &memfds);
        } else {
            s.write_all(&bytes).unwrap();
        }
        let got = decode_frame(&read_frame(&mut s).unwrap()).unwrap();
        match (&request.call, &got) {
            // (No Ack vector has the id the Expect or AcceptFds vector has.)
            (None, JsonFrame::Ack { id })
                if request.kind == "Expect" || request.kind == "AcceptFds" =>
            {
                assert_eq!(*id, request.id, "`{}`: the Ack", v.name)
            }
            (None, got) => assert_eq!(
                Some(&got),
                replies.get(&request.id),
                "`{}`: the Ack",
                v.name
            ),
            (Some(call), JsonFrame::Reply { id, reply }) => {
                assert_eq!(*id, request.id, "`{}`: the reply's id", v.name);
                assert_eq!(kind_of_reply(reply), reply_kind(call), "`{}`", v.name);
                // Replies that do not depend on the daemon's state are
                // byte for byte the vector with the same id.
                if matches!(
                    reply,
                    HubReply::Subscribed
                        | HubReply::Unsubscribed
                        | HubReply::Serving
                        | HubReply::Unserved
                        | HubReply::Requested
                ) {
                    if let Some(want) = replies.get(id) {
                        assert_eq!(&got, *want, "`{}`", v.name);
                    }
                }
            }
            (_, other) => panic!("`{}`: answered {other:?}", v.name),
        }
    }
}

#[test]
fn negative_vectors_get_their_documented_answer() {
    let golden = golden();
    let token = test_token(&golden);
    let daemon = Daemon::start(&token);
    let mut failures = Vec::new();
    for n in &golden.negative {
        let bytes = bytes_of(&n.name, &n.hex);
        if n.direction == Direction::DaemonToClient {
            if n.error_code.is_some() || n.error_id.is_some() || !n.closes {
                failures.push(format!(
                    "`{}`: a client-side rejection has no code and closes",
                    n.name
                ));
            }
            if n.decided_after != bytes.len() {
                failures.push(format!(
                    "`{}`: a client decides after the whole frame",
                    n.name
                ));
            }
            match payload_of(&bytes).map(|p| decode_frame(&p)) {
                Ok(Err(_)) => {}
                Ok(Ok(frame)) => failures.push(format!(
                    "`{}` ({}): the client's decoders accepted {frame:?}",
                    n.name, n.description
                )),
                Err(err) => failures.push(format!("`{}`: {err}", n.name)),
            }
            continue;
        }
        let open = |d: &Daemon| match n.direction {
            Direction::Handshake => d.connect(),
            _ => d.authenticated(&token),
        };
        // One byte short: no verdict yet.
        let mut early = open(&daemon);
        early.write_all(&bytes[..n.decided_after - 1]).unwrap();
        if !quiet_for(&mut early, Duration::from_millis(150)) {
            failures.push(format!(
                "`{}`: answered after {} bytes, before it could have decided",
                n.name,
                n.decided_after - 1
            ));
        }
        // Decided after exactly `decided_after` bytes, whatever follows them.
        let mut s = open(&daemon);
        let mut wire = bytes[..n.decided_after].to_vec();
        if n.closes {
            wire.extend_from_slice(&[0xee; 64]);
        }
        s.write_all(&wire).unwrap();
        let answer = read_frame(&mut s).map(|p| decode_frame(&p));
        let Some(Ok(JsonFrame::Error { id, code, message })) = answer else {
            failures.push(format!("`{}`: answered {answer:?}", n.name));
            continue;
        };
        if (Some(code), id) != (n.error_code, n.error_id) {
            failures.push(format!(
                "`{}`: answered code {code} id {id:?} ({message}); golden.json says {:?} id {:?}",
                n.name, n.error_code, n.error_id
            ));
        }
        let closes = ErrorCode::from_wire(code)
            .map(|c| matches!(c, ErrorCode::Transport(t) if t.closes_connection()))
            .unwrap_or(false);
        if closes != n.closes {
            failures.push(format!(
                "`{}`: closes is {} but code {code} says {closes}",
                n.name, n.closes
            ));
        }
        if n.closes {
            if let Some(more) = read_frame(&mut s) {
                failures.push(format!(
                    "`{}`: a frame after the closing error: {more:?}",
                    n.name
                ));
            }
        } else if let Err(err) = still_open(&mut s) {
            failures.push(format!("`{}`: {err}", n.name));
        }
    }
    report("their negative check", failures);
}

/// The descriptor errors cannot be provoked by bytes alone (a negative
/// vector): each is provoked here with the `call_fds_publish_memfd` vector,
/// with or without `AcceptFds` before it and descriptors with it, and must
/// be answered with the code and id its error vector shows, and close or
/// not as that code does (section 19.4).
#[test]
fn the_descriptor_error_vectors_are_provoked_as_they_show() {
    let golden = golden();
    let token = test_token(&golden);
    let daemon = Daemon::start(&token);
    let call = vector_named(&golden, "call_fds_publish_memfd");
    let call_bytes = bytes_of(&call.name, &call.hex);
    assert_eq!(call.request.as_ref().and_then(|r| r.fds), Some(1));
    // Its fds field: after the length prefix, the id and the kind.
    let mut nine = call_bytes.clone();
    nine[16..20].copy_from_slice(&9u32.to_le_bytes());
    let cases: [(&str, bool, &[u8], Vec<OwnedFd>); 4] = [
        // A CallFds before AcceptFds: refused with its id, stays open.
        (
            "error_descriptors_not_accepted",
            false,
            &call_bytes,
            vec![sealed_memfd(b"hello")],
        ),
        // After AcceptFds, without the descriptor it announces.
        ("error_descriptor_mismatch", true, &call_bytes, vec![]),
        // After AcceptFds, announcing 9.
        ("error_too_many_descriptors", true, &nine, vec![]),
        // After AcceptFds, a sealed memfd over 1 GiB.
        (
            "error_hub_bad_memfd",
            true,
            &call_bytes,
            vec![oversized_memfd()],
        ),
    ];
    let mut failures = Vec::new();
    for (name, accept, bytes, fds) in cases {
        let Some(JsonFrame::Error {
            id: want_id,
            code: want_code,
            ..
        }) = &vector_named(&golden, name).frame
        else {
            panic!("`{name}` is not an Error vector");
        };
        let mut s = daemon.authenticated(&token);
        if accept {
            accept_fds(&mut s, &golden);
        }
        if fds.is_empty() {
            s.write_all(bytes).unwrap();
        } else {
            send_with_descriptors(&s, bytes, &fds);
        }
        drop(fds);
        let answer = read_frame(&mut s).map(|p| decode_frame(&p));
        let Some(Ok(JsonFrame::Error { id, code, message })) = answer else {
            failures.push(format!("`{name}`: answered {answer:?}"));
            continue;
        };
        if (code, id) != (*want_code, *want_id) {
            failures.push(format!(
                "`{name}`: answered code {code} id {id:?} ({message}); the vector shows code \
                 {want_code} id {want_id:?}"
            ));
            continue;
        }
        let closes = matches!(
            ErrorCode::from_wire(code),
            Ok(ErrorCode::Transport(t)) if t.closes_connection()
        );
        if closes {
            if let Some(more) = read_frame(&mut s) {
                failures.push(format!(
                    "`{name}`: a frame after the closing error: {more:?}"
                ));
            }
        } else if let Err(err) = still_open(&mut s) {
            failures.push(format!("`{name}`: {err}"));
        }
    }
    report("their provocation", failures);
}

#[test]
fn every_error_code_has_a_vector_sent_as_documented() {
    let golden = golden();
    let mut seen = BTreeMap::new();
    let mut failures = Vec::new();
    for v in &golden.vectors {
        let Some(JsonFrame::Error { id, code, message }) = &v.frame else {
            continue;
        };
        if let Some(other) = seen.insert(*code, &v.name) {
            failures.push(format!("`{}` and `{other}` both show code {code}", v.name));
        }
        let closes = match ErrorCode::from_wire(*code) {
            Ok(ErrorCode::Transport(t)) => t.closes_connection(),
            Ok(ErrorCode::Service(_)) => false,
            Err(err) => {
                failures.push(format!("`{}`: {err}", v.name));
                continue;
            }
        };
        if id.is_some() == closes {
            failures.push(format!(
                "`{}`: code {code} is sent with the id {}",
                v.name,
                if closes { "absent" } else { "present" }
            ));
        }
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            failures.push(format!(
                "`{}`: message over {MAX_ERROR_MESSAGE_LEN} bytes",
                v.name
            ));
        }
    }
    for code in TransportCode::ALL {
        if !seen.contains_key(&code.tag()) {
            failures.push(format!("no vector for {code:?} (tag {})", code.tag()));
        }
    }
    for hub in 1000..=1008 {
        if !seen.contains_key(&hub) {
            failures.push(format!("no vector for the hub's code {hub}"));
        }
    }
    report("the error code check", failures);
}

#[test]
fn every_kind_frame_and_hub_message_has_a_vector() {
    let golden = golden();
    let mut kinds = BTreeSet::new();
    let mut calls = BTreeSet::new();
    let mut frames = BTreeSet::new();
    let mut replies = BTreeSet::new();
    let mut reasons = BTreeSet::new();
    let mut events = BTreeSet::new();
    let mut outcomes = BTreeSet::new();
    for v in &golden.vectors {
        if let Some(r) = &v.request {
            kinds.insert(kind_of(&r.kind).tag());
            if let Some(call) = &r.call {
                calls.insert(match call {
                    HubRequest::Status => 0,
                    HubRequest::Subscribe { .. } => 1,
                    HubRequest::Unsubscribe { .. } => 2,
                    HubRequest::Publish { .. } => 3,
                    HubRequest::Serve { .. } => 4,
                    HubRequest::Unserve { .. } => 5,
                    HubRequest::Request { .. } => 6,
                    HubRequest::Respond { .. } => 7,
                    HubRequest::Fail { .. } => 8,
                    HubRequest::Topics => 9,
                    HubRequest::PublishMemfd { .. } => 10,
                });
            }
        }
        if let Some(f) = &v.frame {
            frames.insert(match f {
                JsonFrame::Welcome(_) => 0,
                JsonFrame::Reply { reply, .. } => {
                    replies.insert(match reply {
                        HubReply::Status(_) => 0,
                        HubReply::Subscribed => 1,
                        HubReply::Unsubscribed => 2,
                        HubReply::Published { .. } => 3,
                        HubReply::Serving => 4,
                        HubReply::Unserved => 5,
                        HubReply::Requested => 6,
                        HubReply::Responded { .. } => 7,
                        HubReply::Topics(_) => 8,
                    });
                    1
                }
                JsonFrame::Event { event, .. } => {
                    events.insert(match event {
                        HubEvent::Message { .. } => 0,
                        HubEvent::Request { .. } => 1,
                        HubEvent::MessageMemfd { .. } => 3,
                        HubEvent::Response { outcome, .. } => {
                            outcomes.insert(match outcome {
                                Outcome::Reply { .. } => 0,
                                Outcome::ResponderGone => 1,
                                Outcome::Timeout => 2,
                                Outcome::ReplyTooLarge { .. } => 3,
                                Outcome::Failed { .. } => 4,
                            });
                            2
                        }
                    });
                    2
                }
                JsonFrame::Ack { .. } => 3,
                JsonFrame::Error { .. } => 4,
                JsonFrame::Closing(reason) => {
                    reasons.insert(*reason as u32);
                    5
                }
                JsonFrame::Lagged { .. } => 6,
                JsonFrame::ReplyFds { .. } => 7,
                JsonFrame::EventFds { event, .. } => {
                    if let HubEvent::MessageMemfd { .. } = event {
                        events.insert(3);
                    }
                    8
                }
            });
        }
    }
    assert_eq!(
        kinds,
        (0..REQUEST_KINDS).collect(),
        "request kinds with a vector"
    );
    assert_eq!(calls, (0..11).collect(), "hub requests with a vector");
    assert_eq!(frames, (0..9).collect(), "daemon frames with a vector");
    assert_eq!(replies, (0..9).collect(), "hub replies with a vector");
    assert_eq!(events, (0..4).collect(), "hub events with a vector");
    assert_eq!(outcomes, (0..5).collect(), "request outcomes with a vector");
    assert_eq!(reasons, (0..2).collect(), "close reasons with a vector");

    // The negative vectors of unknown values use values this version does
    // not define (a new kind, tag or code must move them on).
    let u32_at = |name: &str, at: usize| {
        let n = golden
            .negative
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no negative vector {name}"));
        let b = bytes_of(&n.name, &n.hex);
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    };
    let kind = u32_at("unknown_request_kind", 12);
    assert!(
        kind >= REQUEST_KINDS && RequestKind::from_tag(kind).is_none(),
        "`unknown_request_kind` uses kind {kind}, which is defined"
    );
    let hub_tag = u32_at("bad_request_unknown_tag", 16);
    assert!(
        !calls.contains(&hub_tag),
        "`bad_request_unknown_tag` uses hub request tag {hub_tag}, which is defined"
    );
    let frame = u32_at("server_unknown_tag", 4);
    assert!(
        !frames.contains(&frame),
        "`server_unknown_tag` uses frame tag {frame}, which is defined"
    );
    let code = u32_at("server_unknown_error_code", 9);
    assert!(
        code < 1000 && TransportCode::from_tag(code).is_none(),
        "`server_unknown_error_code` uses code {code}, which is not an unknown transport code"
    );
}

#[test]
fn the_welcome_vector_announces_version_2_the_hub_and_the_ceiling() {
    let golden = golden();
    let welcome = golden
        .vectors
        .iter()
        .find_map(|v| match &v.frame {
            Some(JsonFrame::Welcome(w)) => Some(w.clone()),
            _ => None,
        })
        .expect("no Welcome vector");
    assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);
    assert_eq!(
        (welcome.service.as_str(), welcome.service_version),
        ("hub", 2)
    );
    assert_eq!(welcome.max_frame_len as usize, MAX_FRAME_LEN);
}

/// The dumps of `proto-spec.md`: for each fenced block whose info string
/// holds `vector=NAME`, the bytes of its lines. A line is bytes, then
/// optionally two or more spaces and an annotation; the bytes are two-digit
/// hex numbers separated by single spaces.
fn spec_dumps(spec: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut dumps = BTreeMap::new();
    let mut lines = spec.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        let Some(info) = line.trim().strip_prefix("```") else {
            continue;
        };
        let name = info
            .split_whitespace()
            .find_map(|word| word.strip_prefix("vector="));
        let mut bytes = Vec::new();
        let mut closed = false;
        for (number, line) in lines.by_ref() {
            if line.trim().starts_with("```") {
                closed = true;
                break;
            }
            if name.is_none() {
                continue;
            }
            let data = line.trim().split("  ").next().unwrap_or("");
            for word in data.split_whitespace() {
                match (word.len(), u8::from_str_radix(word, 16)) {
                    (2, Ok(byte)) => bytes.push(byte),
                    _ => {
                        return Err(format!(
                            "proto-spec.md line {}: `{word}` in the dump of `{}` is not a \
                             two-digit hex byte",
                            number + 1,
                            name.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        if !closed {
            return Err("proto-spec.md: unclosed code block".into());
        }
        if let Some(name) = name {
            if dumps.insert(name.to_owned(), bytes).is_some() {
                return Err(format!("proto-spec.md dumps `{name}` twice"));
            }
        }
    }
    Ok(dumps)
}

#[test]
fn proto_spec_shows_every_vector_verbatim() {
    let golden = golden();
    let spec = std::fs::read_to_string(SPEC_PATH)
        .unwrap_or_else(|err| panic!("cannot read {SPEC_PATH}: {err}"));
    let mut dumps = spec_dumps(&spec).unwrap_or_else(|err| panic!("{err}"));
    let mut failures = Vec::new();
    let all = golden
        .vectors
        .iter()
        .map(|v| (&v.name, &v.hex))
        .chain(golden.negative.iter().map(|n| (&n.name, &n.hex)));
    for (name, hex) in all {
        let expected = bytes_of(name, hex);
        match dumps.remove(name.as_str()) {
            None => failures.push(format!(
                "`{name}`: no dump in proto-spec.md (a ```text vector={name} block)"
            )),
            Some(shown) if shown != expected => failures.push(format!(
                "`{name}`: proto-spec.md shows other bytes than golden.json: {}",
                diff(("golden.json", &expected), ("proto-spec.md", &shown))
            )),
            Some(_) => {}
        }
    }
    for name in dumps.keys() {
        failures.push(format!(
            "`{name}`: proto-spec.md dumps it but golden.json has no such vector"
        ));
    }
    report("the proto-spec.md check", failures);
}
