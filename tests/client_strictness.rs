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
/// `first` (the answer to the handshake), then for each request read writes
/// what `answer` gives for it. Returns the client's error for `call`.
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
            if s.write_all(&answer(id)).await.is_err() {
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
    let err = options.connect_hub().await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(
        took < Duration::from_millis(1500),
        "a 1 s connect timeout took {took:?}"
    );
}
