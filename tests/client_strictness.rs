//! The client against a scripted fake daemon: every daemon behaviour that
//! section 7 of proto-spec.md calls a protocol error must end the
//! connection with `ClientError::Protocol` (or be refused at the
//! handshake), never be taken as an answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use keyhole::client::{ClientError, ConnectOptions};
use keyhole::encoding;
use keyhole::hub::{HubReply, HubRequest};
use keyhole::token::SessionToken;
use keyhole::transport::{
    DaemonFrame, ErrorCode, ErrorFrame, TransportCode, Welcome, encode_ack, encode_reply,
    encode_welcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

fn welcome() -> Welcome {
    Welcome {
        protocol_version: 2,
        service: "hub".into(),
        service_version: 2,
        software_version: "fake".into(),
        instance_id: 1,
        connection_id: 1,
        max_frame_len: 1 << 20,
    }
}

/// A fake daemon that accepts one connection, reads the handshake, writes
/// `first` (the answer to the handshake), then answers the client's
/// `Expect` with `Ack` and each request after it with what `answer` gives
/// for it. Returns the client's error for `call`.
async fn against(
    first: Vec<u8>,
    answer: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> Result<HubReply, ClientError> {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut handshake = [0u8; 44];
        s.read_exact(&mut handshake).await.unwrap();
        s.write_all(&first).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut prefix = [0u8; 4];
            if s.read_exact(&mut prefix).await.is_err() {
                return;
            }
            let len = u32::from_le_bytes(prefix) as usize;
            if s.read_exact(&mut buf[..len]).await.is_err() {
                return;
            }
            let id = u64::from_le_bytes(buf[..8].try_into().unwrap());
            let kind = u32::from_le_bytes(buf[8..12].try_into().unwrap());
            let reply = if kind == 3 {
                let mut ack = BytesMut::new();
                encode_ack(&mut ack, id);
                ack.to_vec()
            } else {
                answer(id)
            };
            if s.write_all(&reply).await.is_err() {
                return;
            }
        }
    });
    let options = ConnectOptions::new()
        .socket(&socket)
        .token(Arc::new(SessionToken::generate().unwrap()))
        .timeout(Duration::from_secs(5));
    let client = options.connect_hub().await?;
    client.call(HubRequest::Status).await
}

fn welcome_frame(w: &Welcome) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_welcome(&mut buf, w).unwrap();
    buf.to_vec()
}

fn frame(f: DaemonFrame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    f.encode(&mut buf).unwrap();
    buf.to_vec()
}

fn published(id: u64) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_reply(&mut buf, id, &HubReply::Published { receivers: 0 }, 1 << 20).unwrap();
    buf.to_vec()
}

/// A scripted answer to a request id.
type Answer = Box<dyn Fn(u64) -> Vec<u8> + Send>;

fn assert_protocol(result: Result<HubReply, ClientError>, what: &str) {
    match result {
        Err(ClientError::Protocol(why)) => eprintln!("{what}: {why}"),
        other => panic!("{what}: expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_well_behaved_fake_is_answered() {
    let reply = against(welcome_frame(&welcome()), published).await.unwrap();
    assert_eq!(reply, HubReply::Published { receivers: 0 });
}

#[tokio::test]
async fn a_welcome_of_another_version_or_frame_limit_is_refused() {
    for (what, w) in [
        (
            "protocol version 3",
            Welcome {
                protocol_version: 3,
                ..welcome()
            },
        ),
        (
            "frame limit 1023",
            Welcome {
                max_frame_len: 1023,
                ..welcome()
            },
        ),
        (
            "frame limit 16 MiB + 1",
            Welcome {
                max_frame_len: (16 << 20) + 1,
                ..welcome()
            },
        ),
    ] {
        assert_protocol(against(welcome_frame(&w), published).await, what);
    }
}

#[tokio::test]
async fn replies_that_do_not_answer_the_oldest_request_end_the_connection() {
    let cases: Vec<(&str, Answer)> = vec![
        ("wrong id", Box::new(|id| published(id + 1))),
        (
            "an Ack to a Call",
            Box::new(|id| {
                let mut buf = BytesMut::new();
                encode_ack(&mut buf, id);
                buf.to_vec()
            }),
        ),
        (
            "a reply and one more",
            Box::new(|id| [published(id), published(id + 1)].concat()),
        ),
        ("a second Welcome", Box::new(|_| welcome_frame(&welcome()))),
        (
            "an Error with an id and a closing code",
            Box::new(|id| {
                frame(DaemonFrame::Error(ErrorFrame {
                    id: Some(id),
                    code: TransportCode::BadToken.into(),
                    message: "x".into(),
                }))
            }),
        ),
        (
            "a service Error without an id",
            Box::new(|_| {
                frame(DaemonFrame::Error(ErrorFrame {
                    id: None,
                    code: ErrorCode::Service(0),
                    message: "x".into(),
                }))
            }),
        ),
        (
            "a Reply that is not a hub reply",
            Box::new(|id| {
                frame(DaemonFrame::Reply {
                    id,
                    body: encoding::encode(&9u32).unwrap(),
                })
            }),
        ),
        (
            "a frame over the announced limit",
            Box::new(|_| ((1u32 << 20) + 1).to_le_bytes().to_vec()),
        ),
    ];
    for (what, answer) in cases {
        let result = against(welcome_frame(&welcome()), answer).await;
        match (what, result) {
            // The extra reply arrives after the first was taken: the call
            // succeeds; the connection then ends (checked by the mux).
            ("a reply and one more", Ok(HubReply::Published { .. })) => {}
            (what, result) => assert_protocol(result, what),
        }
    }
}

#[tokio::test]
async fn a_refused_handshake_is_reported_as_such() {
    let refusal = frame(DaemonFrame::Error(ErrorFrame {
        id: None,
        code: TransportCode::BadToken.into(),
        message: "no".into(),
    }));
    match against(refusal, published).await {
        Err(ClientError::AuthRefused {
            code: ErrorCode::Transport(TransportCode::BadToken),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_connect_timeout_bounds_every_attempt_together() {
    // A daemon that says "busy" for 0.9 s, then accepts and says nothing.
    // With a 1 s timeout the client gives up after about 1 s; each attempt
    // used to get a fresh timeout, so it took about 1.9 s.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("busy.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        let mut silent = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut handshake = [0u8; 44];
            let _ = s.read_exact(&mut handshake).await;
            if started.elapsed() < Duration::from_millis(900) {
                let mut busy = BytesMut::new();
                keyhole::transport::encode_error(
                    &mut busy,
                    None,
                    TransportCode::TooManyUnauthenticated.into(),
                    "busy",
                );
                let _ = s.write_all(&busy).await;
            } else {
                silent.push(s);
            }
        }
    });
    let options = ConnectOptions::new()
        .socket(&socket)
        .token(Arc::new(SessionToken::generate().unwrap()))
        .timeout(Duration::from_secs(1));
    // Connected at once; the handshake's verdict comes with the first reply.
    let client = options.connect_hub().await.unwrap();
    let err = client.status().await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(
        took < Duration::from_millis(1500),
        "a 1 s connect timeout took {took:?}"
    );
}

/// `Welcome`, the `Ack` of the `Expect` and the reply to the first call,
/// as a daemon writes them after a pipelined handshake.
fn welcome_ack_published(expect_id: u64, call_id: u64) -> Vec<u8> {
    let mut out = welcome_frame(&welcome());
    let mut ack = BytesMut::new();
    encode_ack(&mut ack, expect_id);
    out.extend_from_slice(&ack);
    out.extend_from_slice(&published(call_id));
    out
}

/// Reads one request frame: (id, kind, payload).
async fn read_request(s: &mut tokio::net::UnixStream) -> (u64, u32, Vec<u8>) {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).await.unwrap();
    let mut payload = vec![0u8; u32::from_le_bytes(prefix) as usize];
    s.read_exact(&mut payload).await.unwrap();
    let id = u64::from_le_bytes(payload[..8].try_into().unwrap());
    let kind = u32::from_le_bytes(payload[8..12].try_into().unwrap());
    (id, kind, payload)
}

#[tokio::test]
async fn the_first_request_goes_out_with_the_handshake_and_the_expect() {
    // A daemon that answers nothing until it holds the handshake, the
    // `Expect` and the first request: a client that waited for `Welcome`
    // before its first request would never get a reply.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let token = Arc::new(SessionToken::generate().unwrap());
    let expected_handshake = keyhole::handshake::HandshakeFrame::new(&token).to_vec();
    let fake = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut handshake = [0u8; 44];
        s.read_exact(&mut handshake).await.unwrap();
        assert_eq!(handshake.to_vec(), expected_handshake);
        let (expect_id, expect_kind, expect) = read_request(&mut s).await;
        assert_eq!(expect_kind, 3, "Expect first");
        let (service, version): (String, u32) = encoding::decode(&expect[12..]).unwrap();
        assert_eq!((service.as_str(), version), ("hub", 2));
        let (call_id, call_kind, call) = read_request(&mut s).await;
        assert_eq!(call_kind, 0);
        assert_eq!(
            encoding::decode::<HubRequest>(&call[12..]).unwrap(),
            HubRequest::Status
        );
        let out = welcome_ack_published(expect_id, call_id);
        s.write_all(&out).await.unwrap();
        // Keep the connection until the client is done.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let client = ConnectOptions::new()
        .socket(&socket)
        .token(token)
        .timeout(Duration::from_secs(5))
        .connect_hub()
        .await
        .unwrap();
    assert_eq!(
        client.call(HubRequest::Status).await.unwrap(),
        HubReply::Published { receivers: 0 }
    );
    assert_eq!(client.welcome().await.unwrap().service, "hub");
    drop(client);
    fake.await.unwrap();
}

#[tokio::test]
async fn a_busy_refusal_is_retried_and_the_pipelined_request_sent_again_once() {
    // The first connection is refused as busy after its handshake and
    // pipelined request arrived (they were discarded unread); the second is
    // served. The caller sees only the reply.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let fake = tokio::spawn(async move {
        let mut served = Vec::new();
        for attempt in 0..2 {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut handshake = [0u8; 44];
            s.read_exact(&mut handshake).await.unwrap();
            let (expect_id, _, _) = read_request(&mut s).await;
            let (call_id, call_kind, _) = read_request(&mut s).await;
            assert_eq!(call_kind, 0);
            if attempt == 0 {
                let mut busy = BytesMut::new();
                keyhole::transport::encode_error(
                    &mut busy,
                    None,
                    TransportCode::TooManyConnections.into(),
                    "busy",
                );
                s.write_all(&busy).await.unwrap();
                continue;
            }
            let out = welcome_ack_published(expect_id, call_id);
            s.write_all(&out).await.unwrap();
            served.push(call_id);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
        served
    });
    let client = ConnectOptions::new()
        .socket(&socket)
        .token(Arc::new(SessionToken::generate().unwrap()))
        .timeout(Duration::from_secs(5))
        .connect_hub()
        .await
        .unwrap();
    assert_eq!(
        client.call(HubRequest::Status).await.unwrap(),
        HubReply::Published { receivers: 0 }
    );
    drop(client);
    assert_eq!(fake.await.unwrap(), vec![1], "served once, with its own id");
}

#[tokio::test]
async fn a_first_error_with_a_code_no_pending_connection_gets_is_a_protocol_error() {
    // Section 4: the first frame is Welcome, or an Error of code 0 to 7 or
    // 13 without id. FrameTooLarge (8) or a service code first is not a
    // refusal the client may report as the daemon's: it is a protocol error.
    for code in [
        ErrorCode::Transport(TransportCode::FrameTooLarge),
        ErrorCode::Transport(TransportCode::WrongService),
        ErrorCode::Service(1),
    ] {
        let first = frame(DaemonFrame::Error(ErrorFrame {
            id: None,
            code,
            message: "no".into(),
        }));
        assert_protocol(against(first, published).await, &format!("{code:?} first"));
    }
}
