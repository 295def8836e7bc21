//! Golden vectors: `tests/vectors/golden.json` holds real frames of every
//! message of the protocol, and `proto-spec.md` shows the same bytes annotated.
//!
//! These tests tie the three together so that none can drift:
//! - each vector's hex decodes, with the real codec, to the vector's message,
//!   and the message encodes back to exactly that hex;
//! - the handshake vector is what `encode_handshake` produces and what
//!   `HandshakeParser` accepts;
//! - each negative vector gets the rejection the file documents;
//! - every `ErrorCode`, request and daemon message variant has a vector;
//! - every vector appears in `proto-spec.md` as a dump (a fenced block whose
//!   info string holds `vector=NAME`), whose bytes, read with annotations and
//!   whitespace stripped, are exactly the vector's hex; and every such dump in
//!   the spec names a vector.
//!
//! Failures name the vector and show both byte sequences.

use std::collections::{BTreeMap, BTreeSet};

use bytes::BytesMut;
use keyhole::codec::{decode_request, decode_server_message};
use keyhole::error::{FrameError, RequestError};
use keyhole::handshake::{
    HandshakeParser, MAGIC, Progress, encode_handshake, encode_handshake_with, run_preauth,
};
use keyhole::limits::{
    HANDSHAKE_FRAME_LEN, LENGTH_PREFIX_LEN, MAX_ERROR_MESSAGE_LEN, MAX_FRAME_LEN,
};
use keyhole::message::{PROTOCOL_VERSION, valid_topic};
use keyhole::{
    CloseReason, ErrorCode, FrameCodec, Request, RequestBody, ServerMessage, SessionToken,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

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
    /// `Request` or `ServerMessage` in serde_json's externally tagged form.
    #[serde(default)]
    message: Option<serde_json::Value>,
    /// Fields of the handshake vector.
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Negative {
    name: String,
    direction: Direction,
    description: String,
    hex: String,
    /// The code the daemon answers with; `None`: the client must reject the bytes.
    error_code: Option<ErrorCode>,
    /// The id carried by that `Error`.
    error_id: Option<u64>,
    closes: bool,
    bytes_read: usize,
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

/// Bytes as the spec shows them: lowercase, space-separated.
fn spaced(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A readable account of how two byte sequences differ, each side labelled
/// with where it comes from.
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

/// Panics with every failure, each naming its vector, if there is any.
fn report(what: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} vector(s) failed {what}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Splits one whole frame off `bytes` with the real codec; the frame must
/// use all of the bytes.
fn one_frame(bytes: &[u8]) -> Result<BytesMut, String> {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(bytes);
    match codec.decode(&mut buf) {
        Ok(Some(payload)) if buf.is_empty() => Ok(payload),
        Ok(Some(_)) => Err(format!("{} bytes left after the frame", buf.len())),
        Ok(None) => Err("incomplete frame".into()),
        Err(err) => Err(format!("frame codec: {err}")),
    }
}

fn from_json<T: DeserializeOwned>(name: &str, value: &serde_json::Value) -> T {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|err| panic!("vector `{name}`: message JSON does not parse: {err}"))
}

fn message_of(v: &Vector) -> &serde_json::Value {
    v.message
        .as_ref()
        .unwrap_or_else(|| panic!("vector `{}` has no message", v.name))
}

/// Decodes a vector's payload with the real decoder and returns the message as
/// JSON, or why it did not decode.
fn decode_to_json(direction: Direction, payload: &[u8]) -> Result<serde_json::Value, String> {
    match direction {
        Direction::ClientToDaemon => decode_request(payload)
            .map_err(|err| err.to_string())
            .map(|m| serde_json::to_value(m).unwrap()),
        Direction::DaemonToClient => decode_server_message(payload)
            .map_err(|err| err.to_string())
            .map(|m| serde_json::to_value(m).unwrap()),
        Direction::Handshake => unreachable!("the handshake is not a message"),
    }
}

#[test]
fn every_vector_decodes_to_its_message() {
    let golden = golden();
    let mut failures = Vec::new();
    for v in golden
        .vectors
        .iter()
        .filter(|v| v.direction != Direction::Handshake)
    {
        let bytes = bytes_of(&v.name, &v.hex);
        let payload = match one_frame(&bytes) {
            Ok(p) => p,
            Err(err) => {
                failures.push(format!("`{}`: {err}", v.name));
                continue;
            }
        };
        let expected = message_of(v);
        // The typed values are compared too, so the JSON must name a real message.
        let typed_equal = match v.direction {
            Direction::ClientToDaemon => decode_request(&payload)
                .ok()
                .map(|m| m == from_json::<Request>(&v.name, expected)),
            _ => decode_server_message(&payload)
                .ok()
                .map(|m| m == from_json::<ServerMessage>(&v.name, expected)),
        };
        match decode_to_json(v.direction, &payload) {
            Err(err) => failures.push(format!("`{}`: does not decode: {err}", v.name)),
            Ok(decoded) if &decoded != expected || typed_equal != Some(true) => {
                failures.push(format!(
                    "`{}`: decodes to {decoded}\n  golden.json says {expected}",
                    v.name
                ));
            }
            Ok(_) => {}
        }
    }
    report("decoding", failures);
}

#[test]
fn every_message_encodes_to_its_bytes() {
    let golden = golden();
    let mut failures = Vec::new();
    for v in golden
        .vectors
        .iter()
        .filter(|v| v.direction != Direction::Handshake)
    {
        let expected = bytes_of(&v.name, &v.hex);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let result = match v.direction {
            Direction::ClientToDaemon => {
                codec.encode(&from_json::<Request>(&v.name, message_of(v)), &mut buf)
            }
            _ => codec.encode(
                &from_json::<ServerMessage>(&v.name, message_of(v)),
                &mut buf,
            ),
        };
        if let Err(err) = result {
            failures.push(format!("`{}`: does not encode: {err}", v.name));
        } else if buf[..] != expected[..] {
            failures.push(format!(
                "`{}`: {}",
                v.name,
                diff(("golden.json", &expected), ("code", &buf))
            ));
        }
    }
    report("encoding", failures);
}

#[test]
fn handshake_vector_is_what_the_client_sends_and_the_parser_accepts() {
    let golden = golden();
    let token = test_token(&golden);
    assert_eq!(
        token.as_bytes(),
        &std::array::from_fn::<u8, 32, _>(|i| i as u8),
        "the test token must be the bytes 0x00..0x1f"
    );
    let handshakes: Vec<&Vector> = golden
        .vectors
        .iter()
        .filter(|v| v.direction == Direction::Handshake)
        .collect();
    assert_eq!(handshakes.len(), 1, "expected exactly one handshake vector");
    let v = handshakes[0];
    let fields = v
        .handshake
        .as_ref()
        .unwrap_or_else(|| panic!("vector `{}` has no handshake fields", v.name));
    assert_eq!(
        fields.magic.as_bytes(),
        &MAGIC,
        "vector `{}`: magic",
        v.name
    );
    assert_eq!(
        fields.protocol_version, PROTOCOL_VERSION,
        "vector `{}`: version",
        v.name
    );
    assert_eq!(
        fields.token_hex, golden.test_token_hex,
        "vector `{}`: token",
        v.name
    );

    let expected = bytes_of(&v.name, &v.hex);
    let encoded = encode_handshake(&token);
    assert!(
        encoded[..] == expected[..],
        "vector `{}`: encode_handshake differs: {}",
        v.name,
        diff(("golden.json", &expected), ("code", &encoded[..]))
    );
    assert_eq!(
        encode_handshake_with(fields.protocol_version, &token)[..],
        expected[..],
        "vector `{}`: encode_handshake_with its protocol_version differs",
        v.name
    );
    assert_eq!(expected.len(), HANDSHAKE_FRAME_LEN);

    let mut parser = HandshakeParser::new();
    assert_eq!(
        parser.feed(&expected),
        Ok(Progress::Complete {
            consumed: HANDSHAKE_FRAME_LEN
        }),
        "vector `{}`: parser",
        v.name
    );
    assert_eq!(parser.verify(&token), Ok(()), "vector `{}`: verify", v.name);

    // Delivered one byte at a time, it is accepted just the same.
    let splits: Vec<usize> = (1..expected.len()).collect();
    let (verdict, consumed, _) = run_preauth(&expected, &splits, &token);
    assert_eq!(verdict, Some(Ok(())), "vector `{}`: byte by byte", v.name);
    assert_eq!(consumed, HANDSHAKE_FRAME_LEN);
}

/// What the daemon does with a negative vector: the code it answers with, the
/// id in that answer, and the bytes it read first.
fn daemon_verdict(
    direction: Direction,
    bytes: &[u8],
    token: &SessionToken,
) -> Result<(ErrorCode, Option<u64>, usize), String> {
    match direction {
        Direction::Handshake => {
            // As the daemon reads it, and delivered one byte at a time.
            let (verdict, consumed, _) = run_preauth(bytes, &[], token);
            let splits: Vec<usize> = (1..bytes.len()).collect();
            let (split_verdict, split_consumed, _) = run_preauth(bytes, &splits, token);
            if (split_verdict, split_consumed) != (verdict, consumed) {
                return Err(format!(
                    "verdict depends on how the bytes arrive: {verdict:?} after {consumed} \
                     bytes at once, {split_verdict:?} after {split_consumed} byte by byte"
                ));
            }
            match verdict {
                Some(Err(rejection)) => Ok((rejection.code(), None, consumed)),
                other => Err(format!("handshake parser gave {other:?}")),
            }
        }
        Direction::ClientToDaemon => {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::from(bytes);
            let payload = match codec.decode(&mut buf) {
                Err(FrameError::FrameTooLarge { .. }) => {
                    return Ok((ErrorCode::FrameTooLarge, None, LENGTH_PREFIX_LEN));
                }
                Err(err) => return Err(format!("frame codec: {err}")),
                Ok(None) => return Err("incomplete frame".into()),
                Ok(Some(payload)) => payload,
            };
            let read = bytes.len() - buf.len();
            match decode_request(&payload) {
                Err(RequestError::Malformed(_)) => Ok((ErrorCode::Malformed, None, read)),
                Err(RequestError::Unknown(unknown)) => {
                    Ok((ErrorCode::UnknownRequest, Some(unknown.id), read))
                }
                Err(other) => Err(format!("unexpected request error {other:?}")),
                Ok(request) => match &request.body {
                    RequestBody::Subscribe { topic }
                    | RequestBody::Unsubscribe { topic }
                    | RequestBody::Publish { topic, .. }
                        if !valid_topic(topic) =>
                    {
                        Ok((ErrorCode::InvalidTopic, Some(request.id), read))
                    }
                    _ => Err(format!("accepted as {request:?}")),
                },
            }
        }
        Direction::DaemonToClient => unreachable!("the daemon does not receive these"),
    }
}

#[test]
fn negative_vectors_get_their_documented_rejection() {
    let golden = golden();
    let token = test_token(&golden);
    let mut failures = Vec::new();
    for n in &golden.negative {
        let bytes = bytes_of(&n.name, &n.hex);
        if n.direction == Direction::DaemonToClient {
            // The client must refuse these bytes; there is no answer.
            if n.error_code.is_some() || n.error_id.is_some() || !n.closes {
                failures.push(format!(
                    "`{}`: a client-side rejection has no error code or id and closes",
                    n.name
                ));
            }
            if n.bytes_read != bytes.len() {
                failures.push(format!(
                    "`{}`: bytes_read {} but the frame is {} bytes",
                    n.name,
                    n.bytes_read,
                    bytes.len()
                ));
            }
            match one_frame(&bytes).map(|payload| decode_server_message(&payload)) {
                Ok(Err(_)) => {}
                Ok(Ok(msg)) => failures.push(format!(
                    "`{}` ({}): the client decoder accepted {msg:?}",
                    n.name, n.description
                )),
                Err(err) => failures.push(format!("`{}`: {err}", n.name)),
            }
            continue;
        }
        let documented = (n.error_code, n.error_id, n.bytes_read);
        match daemon_verdict(n.direction, &bytes, &token) {
            Err(err) => failures.push(format!("`{}` ({}): {err}", n.name, n.description)),
            Ok((code, id, read)) => {
                if (Some(code), id, read) != documented {
                    failures.push(format!(
                        "`{}`: daemon answers {code:?} with id {id:?} after reading {read} \
                         bytes; golden.json says {:?} with id {:?} after {}",
                        n.name, n.error_code, n.error_id, n.bytes_read
                    ));
                }
                if n.closes != code.closes_connection() {
                    failures.push(format!(
                        "`{}`: closes is {} but {code:?} {} the connection",
                        n.name,
                        n.closes,
                        if code.closes_connection() {
                            "closes"
                        } else {
                            "keeps"
                        }
                    ));
                }
            }
        }
    }
    report("their negative check", failures);
}

/// `(name, decoded message)` of every daemon-to-client vector.
fn server_messages(golden: &Golden) -> Vec<(&str, ServerMessage)> {
    golden
        .vectors
        .iter()
        .filter(|v| v.direction == Direction::DaemonToClient)
        .map(|v| (v.name.as_str(), from_json(&v.name, message_of(v))))
        .collect()
}

#[test]
fn every_error_code_has_a_vector_sent_as_documented() {
    let golden = golden();
    let mut seen = BTreeMap::new();
    let mut failures = Vec::new();
    for (name, msg) in server_messages(&golden) {
        let ServerMessage::Error { id, code, message } = msg else {
            continue;
        };
        if let Some(other) = seen.insert(code.tag(), name) {
            failures.push(format!("`{name}` and `{other}` both show {code:?}"));
        }
        // Connection-level errors (those that close) never carry an id;
        // request-level errors always do.
        if id.is_some() == code.closes_connection() {
            failures.push(format!(
                "`{name}`: {code:?} is sent with the id {}",
                if code.closes_connection() {
                    "absent"
                } else {
                    "present"
                }
            ));
        }
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            failures.push(format!(
                "`{name}`: message over {MAX_ERROR_MESSAGE_LEN} bytes"
            ));
        }
    }
    for code in ErrorCode::ALL {
        if !seen.contains_key(&code.tag()) {
            failures.push(format!("no vector for {code:?} (tag {})", code.tag()));
        }
    }
    report("the error code check", failures);
}

#[test]
fn every_variant_has_a_vector() {
    let golden = golden();
    let mut requests = BTreeSet::new();
    for v in golden
        .vectors
        .iter()
        .filter(|v| v.direction == Direction::ClientToDaemon)
    {
        let request: Request = from_json(&v.name, message_of(v));
        requests.insert(match request.body {
            RequestBody::Ping => 0,
            RequestBody::Status => 1,
            RequestBody::Subscribe { .. } => 2,
            RequestBody::Unsubscribe { .. } => 3,
            RequestBody::Publish { .. } => 4,
            RequestBody::Shutdown => 5,
        });
    }
    assert_eq!(
        requests,
        (0..RequestBody::TAG_COUNT).collect(),
        "request body tags with a vector"
    );

    let mut messages = BTreeSet::new();
    let mut reasons = BTreeSet::new();
    for (_, msg) in server_messages(&golden) {
        messages.insert(match msg {
            ServerMessage::Welcome { .. } => 0,
            ServerMessage::Pong { .. } => 1,
            ServerMessage::StatusReport { .. } => 2,
            ServerMessage::Ack { .. } => 3,
            ServerMessage::Event { .. } => 4,
            ServerMessage::Error { .. } => 5,
            ServerMessage::Closing { reason } => {
                reasons.insert(match reason {
                    CloseReason::Shutdown => 0,
                    CloseReason::SlowConsumer => 1,
                });
                6
            }
        });
    }
    assert_eq!(
        messages,
        (0..7).collect(),
        "ServerMessage tags with a vector"
    );
    assert_eq!(reasons, (0..2).collect(), "CloseReason tags with a vector");
}

#[test]
fn welcome_vector_announces_the_protocol_ceiling() {
    let golden = golden();
    let welcome = server_messages(&golden)
        .into_iter()
        .find_map(|(_, msg)| match msg {
            ServerMessage::Welcome {
                protocol_version,
                max_frame_len,
                ..
            } => Some((protocol_version, max_frame_len)),
            _ => None,
        })
        .expect("no Welcome vector");
    assert_eq!(welcome, (PROTOCOL_VERSION, MAX_FRAME_LEN as u32));
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
