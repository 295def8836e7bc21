//! End-to-end tests against a real `keyholed` on a temp dir, over real Unix
//! sockets: requests, pipelining, pub/sub, every pre-auth refusal, the
//! pending-slot flood, slow consumers, shutdown, restart, forwarding.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::Bytes;
use common::{DaemonProcess, Msg, RawConn, Req, publish, request_bytes, subscribe, wait_for};
use futures_util::StreamExt;
use keyhole::client::{ClientError, ConnectOptions};
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubError, HubReply, HubRequest};
use keyhole::token::SessionToken;
use keyhole::transport::{CloseReason, ErrorCode, TransportCode};
use rustix::process::Signal;

#[tokio::test]
async fn every_request_gets_its_reply() {
    let daemon = DaemonProcess::start(&[]);
    let client = daemon.client().await;
    assert_eq!(client.welcome().await.unwrap().protocol_version, 2);
    assert_eq!(client.welcome().await.unwrap().service, "hub");
    client.ping().await.unwrap();
    let mut sub = client.subscribe("news").await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(
        (status.authenticated, status.topics, status.subscriptions),
        (1, 1, 1)
    );
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    client.publish("news", &b"hello"[..]).await.unwrap();
    let event = sub.next_event().await.unwrap().unwrap();
    assert_eq!(
        (event.topic.as_str(), &event.payload[..]),
        ("news", &b"hello"[..])
    );
    sub.unsubscribe().await.unwrap();
    assert_eq!(client.status().await.unwrap().subscriptions, 0);
    // Topic validation keeps the connection open.
    let err = client.publish("", &b"x"[..]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Service(HubError::INVALID_TOPIC))
    );
    let err = client.subscribe(&"t".repeat(256)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Service(HubError::INVALID_TOPIC))
    );
    client.ping().await.unwrap();
}

#[test]
fn pipelined_requests_come_back_in_order_with_their_ids() {
    let daemon = DaemonProcess::start(&[]);
    let mut raw = daemon.raw();
    raw.authenticate(&daemon.token());
    let mut batch = Vec::new();
    let ids: Vec<u64> = (0..500u64).map(|i| i * 7 + 1000).collect();
    for (i, id) in ids.iter().enumerate() {
        let req = match i % 3 {
            0 => Req::Ping,
            1 => publish("p", vec![i as u8; i]),
            _ => Req::Hub(HubRequest::Status),
        };
        batch.extend_from_slice(&request_bytes(*id, req));
    }
    raw.send(&batch);
    for (i, id) in ids.iter().enumerate() {
        match (i % 3, raw.read_msg()) {
            (0, Msg::Ack(got)) | (1, Msg::Reply(got, HubReply::Published { .. })) => {
                assert_eq!(got, *id)
            }
            (2, Msg::Reply(got, HubReply::Status(_))) => assert_eq!(got, *id),
            (kind, other) => panic!("request {i} (kind {kind}) got {other:?}"),
        }
    }
}

#[test]
fn handshake_and_first_request_in_one_write_are_both_served() {
    let daemon = DaemonProcess::start(&[]);
    let mut raw = daemon.raw();
    let mut wire = HandshakeFrame::new(&daemon.token()).to_vec();
    wire.extend_from_slice(&request_bytes(42, Req::Ping));
    wire.extend_from_slice(&request_bytes(43, Req::Hub(HubRequest::Status)));
    raw.send(&wire);
    assert!(matches!(raw.read_msg(), Msg::Welcome(_)));
    assert_eq!(raw.read_msg(), Msg::Ack(42));
    assert!(matches!(
        raw.read_msg(),
        Msg::Reply(43, HubReply::Status(_))
    ));
}

#[test]
fn requests_written_with_the_handshake_past_its_read_ahead_are_all_served_in_order() {
    // The handshake's read takes up to 1 KiB after it; frames that straddle
    // that edge, and the bytes past it, must come through whole.
    let daemon = DaemonProcess::start(&[]);
    for payload in [1usize, 7, 100, 1000, 1019, 1020, 1021, 3000] {
        let mut raw = daemon.raw();
        let mut wire = HandshakeFrame::new(&daemon.token()).to_vec();
        for id in 0..6u64 {
            wire.extend_from_slice(&request_bytes(id, publish("edge", vec![id as u8; payload])));
            wire.extend_from_slice(&request_bytes(100 + id, Req::Ping));
        }
        raw.send(&wire);
        assert!(
            matches!(raw.read_msg(), Msg::Welcome(_)),
            "payload {payload}"
        );
        for id in 0..6u64 {
            match raw.read_msg() {
                Msg::Reply(got, HubReply::Published { .. }) => assert_eq!(got, id),
                other => panic!("payload {payload}, publish {id}: got {other:?}"),
            }
            assert_eq!(raw.read_msg(), Msg::Ack(100 + id), "payload {payload}");
        }
    }
}

#[test]
fn replies_to_requests_written_with_the_handshake_wait_for_a_reader_that_is_late() {
    // A new session writes straight to the socket until it first waits; a
    // client that pipelines far more than the socket holds behind its
    // handshake and reads only later must still get every reply, in order.
    let daemon = DaemonProcess::start(&[]);
    let mut raw = daemon.raw();
    let mut wire = HandshakeFrame::new(&daemon.token()).to_vec();
    const N: u64 = 60_000;
    for id in 0..N {
        wire.extend_from_slice(&request_bytes(id, Req::Ping));
    }
    let mut writer = raw.stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || writer.write_all(&wire).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(matches!(raw.read_msg(), Msg::Welcome(_)));
    for id in 0..N {
        assert_eq!(raw.read_msg(), Msg::Ack(id));
    }
    writing.join().unwrap();

    // The session writes straight to the socket and watches for room only
    // while replies wait: a second burst read late, after the first was
    // drained, fills the socket again and must come through the same way.
    let mut wire = Vec::new();
    for id in N..2 * N {
        wire.extend_from_slice(&request_bytes(id, Req::Ping));
    }
    let mut writer = raw.stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || writer.write_all(&wire).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    for id in N..2 * N {
        assert_eq!(raw.read_msg(), Msg::Ack(id));
    }
    writing.join().unwrap();
}

#[test]
fn a_request_written_with_a_refused_handshake_is_never_run() {
    // Read with the handshake, but never looked at: the daemon refuses,
    // closes, and is not shut down by the request that came along.
    let daemon = DaemonProcess::start(&[]);
    let mut raw = daemon.raw();
    let mut wire = HandshakeFrame::new(&SessionToken::generate().unwrap()).to_vec();
    wire.extend_from_slice(&request_bytes(1, Req::Shutdown));
    raw.send(&wire);
    raw.expect_error_then_close(TransportCode::BadToken);
    let mut good = daemon.raw();
    good.authenticate(&daemon.token());
    good.request(Req::Ping);
    assert!(matches!(good.read_msg(), Msg::Ack(_)));
}

/// The daemon's threads named as tokio names its workers.
fn worker_threads(daemon: &DaemonProcess) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "tokio-rt-worker")
        .count()
}

#[tokio::test]
async fn several_subscribers_get_every_event_in_order() {
    // The default: every connection on the one thread that started.
    let daemon = DaemonProcess::start(&[]);
    assert_eq!(worker_threads(&daemon), 0);
    every_subscriber_gets_every_event_in_order(&daemon).await;
}

#[tokio::test]
async fn a_pool_of_worker_threads_delivers_as_one_thread_does() {
    let daemon = DaemonProcess::start(&["--threads", "3"]);
    assert_eq!(worker_threads(&daemon), 3);
    every_subscriber_gets_every_event_in_order(&daemon).await;
}

async fn every_subscriber_gets_every_event_in_order(daemon: &DaemonProcess) {
    let publisher = daemon.client().await;
    let mut subs = Vec::new();
    for _ in 0..4 {
        let c = daemon.client().await;
        subs.push(c.subscribe("orders").await.unwrap());
    }
    let other = daemon.client().await.subscribe("other").await.unwrap();
    const N: u64 = 2000;
    let publishes: Vec<_> = (0..N)
        .map(|i| publisher.publish("orders", i.to_le_bytes().to_vec()))
        .collect();
    for result in futures_util::future::join_all(publishes).await {
        result.unwrap();
    }
    for sub in &mut subs {
        let mut first = None;
        for i in 0..N {
            let ev = sub.next_event().await.unwrap().unwrap();
            let seq0 = *first.get_or_insert(ev.sequence);
            assert_eq!(ev.sequence, seq0 + i, "sequence gap");
            assert_eq!(
                &ev.payload[..],
                &i.to_le_bytes()[..],
                "payload out of order"
            );
        }
    }
    drop(other);
}

#[test]
fn an_unauthenticated_socket_receives_nothing_but_its_error() {
    let daemon = DaemonProcess::start(&["--auth-timeout", "1.5"]);
    let mut silent = daemon.raw();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let publisher = daemon.client().await;
        let subscriber = daemon.client().await;
        let mut sub = subscriber.subscribe("news").await.unwrap();
        for i in 0..50u8 {
            publisher.publish("news", vec![i]).await.unwrap();
        }
        for _ in 0..50 {
            sub.next().await.unwrap().unwrap();
        }
    });
    let started = Instant::now();
    let message = silent.expect_error_then_close(TransportCode::AuthTimeout);
    assert!(message.contains("1.5"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_silent_connection_times_out_at_its_own_deadline_after_earlier_ones_left() {
    // The deadline task sleeps until the earliest deadline it was told of;
    // a later arrival does not wake it. Here the first connection's
    // deadline passes with nothing to do, and the second's must still be
    // kept, neither early nor late.
    let daemon = DaemonProcess::start(&["--auth-timeout", "1"]);
    let token = daemon.token();
    let mut first = daemon.raw();
    first.authenticate(&token);
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    let connected = Instant::now();
    let mut silent = daemon.raw();
    silent.expect_error_then_close(TransportCode::AuthTimeout);
    let after = connected.elapsed();
    assert!(
        after >= Duration::from_millis(950) && after < Duration::from_millis(1600),
        "timed out after {after:?}, not at its deadline of 1 s"
    );
}

#[test]
fn every_bad_first_frame_gets_its_documented_error_and_close() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let cases: Vec<(&str, Vec<u8>, TransportCode)> = vec![
        (
            "request before handshake",
            request_bytes(1, Req::Ping),
            TransportCode::HandshakeExpected,
        ),
        (
            "length one long",
            {
                let mut f = HandshakeFrame::new(&token).to_vec();
                f[0] = 41;
                f.push(0);
                f
            },
            TransportCode::HandshakeExpected,
        ),
        (
            "4 GiB prefix",
            vec![0xff, 0xff, 0xff, 0xff],
            TransportCode::HandshakeExpected,
        ),
        (
            "bad magic",
            {
                let mut f = HandshakeFrame::new(&token).to_vec();
                f[4] = b'X';
                f
            },
            TransportCode::BadMagic,
        ),
        (
            "version 1 (a client of the first protocol)",
            HandshakeFrame::with_version(1, &token).to_vec(),
            TransportCode::UnsupportedVersion,
        ),
        (
            "version 0",
            HandshakeFrame::with_version(0, &token).to_vec(),
            TransportCode::UnsupportedVersion,
        ),
        (
            "wrong token",
            HandshakeFrame::new(&SessionToken::generate().unwrap()).to_vec(),
            TransportCode::BadToken,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut raw = daemon.raw();
        raw.send(&bytes);
        let message = raw.expect_error_then_close(code);
        assert!(!message.is_empty(), "{name}: empty message");
    }
    // One attempt per connection: a good handshake after a bad one is not read.
    let mut raw = daemon.raw();
    let mut wire = HandshakeFrame::new(&SessionToken::generate().unwrap()).to_vec();
    wire.extend_from_slice(&HandshakeFrame::new(&token));
    raw.send(&wire);
    raw.expect_error_then_close(TransportCode::BadToken);
}

#[test]
fn bad_input_after_auth() {
    let daemon = DaemonProcess::start(&["--max-frame-len", "4096"]);
    let token = daemon.token();
    // Unknown request kind: an error carrying the id, connection stays open.
    let mut raw = daemon.raw();
    raw.authenticate(&token);
    let mut frame = 12u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&77u64.to_le_bytes());
    frame.extend_from_slice(&99u32.to_le_bytes());
    raw.send(&frame);
    match raw.read_msg() {
        Msg::Error {
            id: Some(77),
            code: ErrorCode::Transport(TransportCode::UnknownRequest),
            ..
        } => {}
        other => panic!("got {other:?}"),
    }
    // A call whose body is not a hub request (invalid UTF-8, an unknown
    // hub tag, a byte too many): BadRequest with the id, still open.
    let mut bad = request_bytes(5, subscribe("ab"));
    // The pattern's last byte: before the 4-byte lag policy.
    let n = bad.len();
    bad[n - 5] = 0xff;
    let mut unknown_tag = 16u32.to_le_bytes().to_vec();
    unknown_tag.extend_from_slice(&6u64.to_le_bytes());
    unknown_tag.extend_from_slice(&0u32.to_le_bytes());
    unknown_tag.extend_from_slice(&10u32.to_le_bytes());
    let mut trailing = request_bytes(7, Req::Hub(HubRequest::Status));
    trailing[0] += 1;
    trailing.push(0);
    for (id, wire) in [(5, bad), (6, unknown_tag), (7, trailing)] {
        raw.send(&wire);
        match raw.read_msg() {
            Msg::Error {
                id: Some(got),
                code: ErrorCode::Transport(TransportCode::BadRequest),
                message,
            } => {
                assert_eq!(got, id);
                assert!(message.contains("service hub v2"), "{message}");
            }
            other => panic!("request {id} got {other:?}"),
        }
    }
    raw.request(Req::Ping);
    assert!(matches!(raw.read_msg(), Msg::Ack(_)));

    // Oversize frame: FrameTooLarge, close, payload never read.
    let mut raw = daemon.raw();
    raw.authenticate(&token);
    raw.send(&4097u32.to_le_bytes());
    raw.expect_error_then_close(TransportCode::FrameTooLarge);

    // Too short for a request header: Malformed, close.
    let mut raw = daemon.raw();
    raw.authenticate(&token);
    raw.send(&[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    raw.expect_error_then_close(TransportCode::Malformed);
}

/// Regression: an authenticated peer that closed (or half-closed) its end
/// in the middle of a frame was never released: the daemon waited for the
/// rest of the frame forever, holding the descriptor, the task and a count
/// in `Status.authenticated`. Found by the torture harness.
#[test]
fn a_peer_that_closes_in_the_middle_of_a_frame_after_auth_is_released() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let frame = request_bytes(1, publish("t", Bytes::from_static(&[7; 12])));
    // Inside the length prefix, right after it, inside the payload.
    for cut in [2, 4, frame.len() / 2, frame.len() - 1] {
        let mut closed = daemon.raw();
        closed.authenticate(&token);
        closed.send(&frame[..cut]);
        drop(closed);

        let mut half = daemon.raw();
        half.authenticate(&token);
        half.send(&frame[..cut]);
        half.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(half.read_to_end(), b"", "cut at {cut}: nothing is owed");
    }
    // Complete frames before the partial one are still answered, all of
    // them, past a whole batch of replies, before the close.
    let mut pipelined = daemon.raw();
    pipelined.authenticate(&token);
    let mut wire = Vec::new();
    for id in 0..10_000u64 {
        wire.extend_from_slice(&request_bytes(id, Req::Ping));
    }
    wire.extend_from_slice(&frame[..frame.len() / 2]);
    let mut writer = pipelined.stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || {
        writer.write_all(&wire).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    for id in 0..10_000u64 {
        assert_eq!(pipelined.read_msg(), Msg::Ack(id));
    }
    assert!(pipelined.read_frame().is_none());
    writing.join().unwrap();

    let mut probe = daemon.raw();
    probe.authenticate(&token);
    wait_for(
        Duration::from_secs(10),
        "every such connection released",
        || {
            probe.request(Req::Hub(HubRequest::Status));
            match probe.read_msg() {
                Msg::Reply(_, HubReply::Status(status)) => status.authenticated == 1,
                other => panic!("{other:?}"),
            }
        },
    );
    assert_eq!(
        daemon
            .log_text()
            .matches("peer closed in the middle of a frame")
            .count(),
        9
    );
}

#[tokio::test]
async fn a_flood_of_pending_connections_does_not_keep_a_real_client_out() {
    let daemon = DaemonProcess::start(&["--max-pending", "8", "--auth-timeout", "30"]);
    // 16 silent connections from this process: 8 take the slots, 8 wait.
    let mut flood: Vec<RawConn> = (0..16).map(|_| daemon.raw()).collect();
    // A real client from another process (the CLI) gets in: the next slot
    // goes to its process, ahead of the flood's waiting connections.
    let started = Instant::now();
    let out = daemon
        .cli()
        .args(["ping", "--count", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // And from this process too, behind its own flood.
    let client = daemon.client().await;
    client.ping().await.unwrap();
    // Flood connections that held a slot past the grace while others waited
    // were told why; the others were sent nothing at all.
    let (mut evicted, mut silent) = (0, 0);
    for conn in &mut flood {
        conn.stream.set_nonblocking(true).unwrap();
        let mut probe = [0u8; 1];
        let has_data = std::io::Read::read(&mut conn.stream, &mut probe).is_ok();
        conn.stream.set_nonblocking(false).unwrap();
        if has_data {
            let mut rest = probe.to_vec();
            rest.extend(conn.read_to_end());
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            assert_eq!(rest.len(), 4 + len);
            match Msg::decode(&rest[4..]) {
                Msg::Error {
                    id: None,
                    code: ErrorCode::Transport(TransportCode::TooManyUnauthenticated),
                    ..
                } => evicted += 1,
                other => panic!("flood connection got {other:?}"),
            }
        } else {
            silent += 1;
        }
    }
    assert_eq!(evicted + silent, 16);
    assert!(
        evicted >= 8,
        "only {evicted} flood connections gave their slot up"
    );
}

#[tokio::test]
async fn a_subscriber_that_never_reads_is_cut_and_the_others_get_everything() {
    let daemon =
        DaemonProcess::start(&["--max-frame-len", "4096", "--outbound-queue-bytes", "65536"]);
    let token = daemon.token();
    let mut stalled = daemon.raw();
    stalled.authenticate(&token);
    stalled.request(subscribe("firehose"));
    assert!(matches!(
        stalled.read_msg(),
        Msg::Reply(_, HubReply::Subscribed)
    ));

    let reader = daemon.client().await;
    let mut sub = reader.subscribe("firehose").await.unwrap();
    let publisher = daemon.client().await;
    const N: u64 = 4000;
    // The reader keeps up: the publisher never gets more than WINDOW events
    // (32 KiB, half the queue) ahead of what it has read. (Without the
    // window, "keeps up" would be a matter of scheduling: on a loaded
    // machine a daemon worker preempted for a few milliseconds holds the
    // reader's session while the other worker serves hundreds of
    // publishes, and the reader is cut too.)
    const WINDOW: u64 = 32;
    let payload = vec![0x5a; 1000];
    let (read_tx, mut read_rx) = tokio::sync::watch::channel(0u64);
    let reading = tokio::spawn(async move {
        let mut first = None;
        for i in 0..N {
            let ev = sub.next_event().await.expect("event").expect("no error");
            let s0 = *first.get_or_insert(ev.sequence);
            assert_eq!(ev.sequence, s0 + i);
            assert_eq!(ev.payload.len(), 1000);
            read_tx.send_replace(i + 1);
        }
        N
    });
    let started = Instant::now();
    for i in 0..N {
        if read_rx.wait_for(|&read| i < read + WINDOW).await.is_err() {
            break; // the reader failed: its join below says how
        }
        publisher
            .publish("firehose", payload.clone())
            .await
            .unwrap();
    }
    let publish_time = started.elapsed();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), reading)
            .await
            .unwrap()
            .unwrap(),
        N
    );
    assert!(publish_time < Duration::from_secs(30));

    // The stalled subscriber is cut while it still reads nothing: the
    // daemon drops it within the close-flush bound, without waiting for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while publisher.status().await.unwrap().authenticated != 2 {
        assert!(
            Instant::now() < deadline,
            "the stalled subscriber is still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What reached its socket buffer: events in order, and Closing{SlowConsumer}
    // if there was room for it; nothing else.
    let rest = tokio::task::spawn_blocking(move || stalled.read_to_end())
        .await
        .unwrap();
    let mut at = 0;
    while at + 4 <= rest.len() {
        let len = u32::from_le_bytes(rest[at..at + 4].try_into().unwrap()) as usize;
        if at + 4 + len > rest.len() {
            break; // the frame the daemon was writing when it gave up
        }
        match Msg::decode(&rest[at + 4..at + 4 + len]) {
            Msg::Event(..) => {}
            Msg::Closing(CloseReason::SlowConsumer) => assert_eq!(at + 4 + len, rest.len()),
            other => panic!("stalled subscriber got {other:?}"),
        }
        at += 4 + len;
    }
    assert!(daemon.log_text().contains("closing: SlowConsumer"));
}

#[test]
fn sigterm_sends_closing_to_everyone_and_removes_socket_and_token() {
    let mut daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut conns: Vec<RawConn> = (0..5).map(|_| daemon.raw()).collect();
    for c in &mut conns {
        c.authenticate(&token);
        c.request(subscribe("t"));
        assert!(matches!(c.read_msg(), Msg::Reply(_, HubReply::Subscribed)));
    }
    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    for _ in 0..100 {
        publisher.request(publish("t", Bytes::from_static(b"x")));
    }
    let mut acked = 0;
    for _ in 0..100 {
        if let Msg::Reply(_, HubReply::Published { .. }) = publisher.read_msg() {
            acked += 1;
        }
    }
    assert_eq!(acked, 100);
    let mut pending = daemon.raw();
    daemon.signal(Signal::TERM);
    for c in &mut conns {
        let mut events = 0;
        loop {
            match c.read_msg() {
                Msg::Event(..) => events += 1,
                Msg::Closing(CloseReason::Shutdown) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(events, 100, "every Ack'ed publish delivered before Closing");
        assert!(c.read_frame().is_none());
    }
    pending.expect_error_then_close(TransportCode::ShuttingDown);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(!daemon.paths.socket.exists());
    assert!(!daemon.paths.token.exists());
}

/// Regression: once the daemon had sent `Closing{Shutdown}`, a request
/// made on that client failed with `Closed { reason: None }`: the writer
/// task answered it with a reason of its own instead of the daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_closing_report_the_daemons_reason() {
    let mut daemon = DaemonProcess::start(&[]);
    let idle = daemon.client().await;
    daemon.client().await.shutdown().await.unwrap();
    tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(10)));
    // Let the client's reader take in the Closing frame and the EOF.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..2 {
        match idle.ping().await {
            Err(ClientError::Closed {
                reason: Some(CloseReason::Shutdown),
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn sigkill_then_restart_recovers_with_a_new_token() {
    let mut daemon = DaemonProcess::start(&[]);
    let old = daemon.token();
    let client = daemon.client().await;
    client.ping().await.unwrap();
    daemon.restart_after_kill();
    let new = daemon.token();
    assert_ne!(old, new, "token not rotated");
    // The old connection is gone with a clear error.
    assert!(matches!(
        client.ping().await,
        Err(ClientError::Closed { .. })
    ));
    // The old token is refused (reported by the first request, which went
    // out with the handshake); the reconnect path reads the new one.
    let err = ConnectOptions::new()
        .socket(&daemon.paths.socket)
        .token(Arc::clone(&old))
        .connect_hub()
        .await
        .unwrap()
        .ping()
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Transport(TransportCode::BadToken))
    );
    let again = daemon
        .options()
        .connect_hub_retrying(Duration::from_secs(5))
        .await
        .unwrap();
    again.ping().await.unwrap();
}

#[test]
fn a_second_daemon_is_refused_and_touches_nothing() {
    let daemon = DaemonProcess::start(&[]);
    let token_before = std::fs::read(&daemon.paths.token).unwrap();
    let out = std::process::Command::new(common::keyholed_bin())
        .arg("--dir")
        .arg(&daemon.paths.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("already running (pid {})", daemon.pid())),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&daemon.paths.token).unwrap(), token_before);
    let mut raw = daemon.raw();
    raw.authenticate(&daemon.token());
}

#[test]
fn an_insecure_runtime_dir_is_refused() {
    for (mode, what) in [(0o777, "mode"), (0o750, "mode"), (0o500, "not writable")] {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = std::process::Command::new(common::keyholed_bin())
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "mode {mode:o}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&dir.display().to_string()) && stderr.contains(what),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "mode {mode:o}: something was created"
        );
    }
}

/// A relay socket in front of the daemon, as `ssh -L` would provide.
fn relay(listen: &std::path::Path, target: std::path::PathBuf) {
    let listener = std::os::unix::net::UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { return };
            let Ok(upstream) = std::os::unix::net::UnixStream::connect(&target) else {
                return;
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (mut c1, mut u1) = (client, upstream);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

#[test]
fn a_forwarded_socket_works_with_keyhole_token_and_fails_clearly_without() {
    let daemon = DaemonProcess::start(&[]);
    let elsewhere = tempfile::tempdir().unwrap();
    let fwd = elsewhere.path().join("fwd.sock");
    relay(&fwd, daemon.paths.socket.clone());
    let hex = daemon.token().to_hex();
    let cli = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(common::keyhole_bin());
        cmd.env_clear()
            .env("KEYHOLE_DIR", elsewhere.path().join("nothing-here"))
            .env("KEYHOLE_SOCKET", &fwd);
        if let Some(t) = token {
            cmd.env("KEYHOLE_TOKEN", t);
        }
        cmd.arg("ping").output().unwrap()
    };
    let ok = cli(Some(&hex));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("pong"));

    let missing = cli(None);
    assert_eq!(missing.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("KEYHOLE_TOKEN=$(ssh host keyhole token)"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing-here/session-token"), "{stderr}");

    let wrong = cli(Some(&SessionToken::generate().unwrap().to_hex()));
    assert_eq!(wrong.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("BadToken"));

    let garbage = cli(Some("not-hex"));
    assert_eq!(garbage.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("KEYHOLE_TOKEN is not a token"));
}

#[test]
fn cli_end_to_end_with_exit_codes() {
    let daemon = DaemonProcess::start(&[]);
    let run = |args: &[&str]| daemon.cli().args(args).output().unwrap();

    let out = run(&["ping", "--count", "2"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 pings"));

    let out = run(&["token"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        &*daemon.token().to_hex()
    );

    // sub in the background, pub from another process.
    let sub = daemon
        .cli()
        .args(["sub", "news", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "subscriber", || {
        String::from_utf8_lossy(&run(&["status"]).stdout).contains("subscriptions  1")
    });
    assert!(run(&["pub", "news", "hello"]).status.success());
    let mut pub_stdin = daemon
        .cli()
        .args(["pub", "news", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    pub_stdin
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    assert!(pub_stdin.wait().unwrap().success());
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("news ") && lines[0].ends_with(" hello"),
        "{text}"
    );
    assert!(lines[1].ends_with(" from stdin"), "{text}");

    // A token file with group/other bits: refused, exit 4, path named.
    std::fs::set_permissions(&daemon.paths.token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["ping"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("0644"));
    std::fs::set_permissions(&daemon.paths.token, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Usage error.
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));

    // stop: graceful, exit 0; afterwards "not running", exit 3.
    assert!(run(&["stop"]).status.success());
    wait_for(Duration::from_secs(10), "socket removal", || {
        !daemon.paths.socket.exists()
    });
    let out = run(&["ping"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("daemon not running"));
}

#[tokio::test]
async fn the_token_is_never_sent_to_a_socket_served_by_another_uid() {
    let daemon = DaemonProcess::start(&[]);
    let own = keyhole::token_file::current_uid();
    let impostor_uid = own.wrapping_add(4242);
    // Expecting another uid than the one serving: the client must refuse
    // before the handshake, so the daemon sees the connection end unauthenticated.
    let err = daemon
        .options()
        .daemon_uid(impostor_uid)
        .connect_hub()
        .await
        .unwrap_err();
    match err {
        ClientError::PeerUidMismatch { expected, got, .. } => {
            assert_eq!((expected, got), (impostor_uid, own))
        }
        other => panic!("expected PeerUidMismatch, got {other:?}"),
    }
    wait_for(
        Duration::from_secs(5),
        "the refused connection to be logged",
        || {
            daemon
                .log_text()
                .contains("connection ended before a complete handshake")
                || daemon.log_text().contains("refused: HandshakeExpected")
        },
    );
    assert!(!daemon.log_text().contains("connection authenticated"));
    let out = daemon
        .cli()
        .env("KEYHOLE_DAEMON_UID", impostor_uid.to_string())
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to send the token"));
}

#[tokio::test]
async fn a_client_that_disconnects_mid_frame_is_closed_not_kept() {
    // Regression (found by the `session` fuzzer): a partial frame followed by
    // EOF used to leave the connection task waiting forever.
    let daemon = DaemonProcess::start(&[]);
    let observer = daemon.client().await;
    for _ in 0..5 {
        let mut raw = daemon.raw();
        raw.authenticate(&daemon.token());
        let frame = request_bytes(1, publish("t", vec![1; 100]));
        raw.send(&frame[..frame.len() / 2]);
        raw.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(
            raw.read_frame().is_none(),
            "the daemon should close, not answer"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while observer.status().await.unwrap().authenticated != 1 {
        assert!(
            Instant::now() < deadline,
            "half-sent connections are still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn sigterm_as_soon_as_the_socket_exists_is_a_clean_shutdown() {
    // Regression (found by the Python client's tests): the signal handlers
    // were installed after the socket and token were created, so an early
    // SIGTERM killed the daemon and left both behind.
    for _ in 0..10 {
        let base = tempfile::tempdir().unwrap();
        let paths = keyhole::paths::RuntimePaths::in_dir(base.path().join("run"));
        let log = base.path().join("log");
        let mut child = common::spawn_daemon(&paths, &log, &[]);
        wait_for(Duration::from_secs(20), "the token file", || {
            paths.token.exists()
        });
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            Signal::TERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{status}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(!paths.socket.exists() && !paths.token.exists());
    }
}

/// Every error prints its cause once ("No such file or directory ...
/// Caused by: No such file or directory" was printed before).
#[test]
fn cli_errors_print_each_cause_once() {
    let base = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &std::path::Path)], args: &[&str]| {
        let mut cmd = std::process::Command::new(common::keyhole_bin());
        cmd.env_clear();
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = base.path().join("nothing");
    let (code, stderr) = run(&[("KEYHOLE_DIR", &missing)], &["ping"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("daemon not running"), "{stderr}");
    // A directory where the token file should be.
    let daemon = DaemonProcess::start(&[]);
    let token_dir = base.path().join("token-is-a-dir");
    std::fs::create_dir(&token_dir).unwrap();
    let (code, stderr) = run(
        &[
            ("KEYHOLE_DIR", &daemon.paths.dir),
            ("KEYHOLE_TOKEN_FILE", &token_dir),
        ],
        &["ping"],
    );
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for line in stderr.lines() {
        let parts: Vec<&str> = line.split(": ").collect();
        let mut seen = std::collections::BTreeSet::new();
        for p in &parts {
            assert!(seen.insert(*p), "`{p}` twice in {line}");
        }
    }
}

/// Requests that arrive a byte at a time are answered when their last byte
/// does, events published meanwhile still reach the connection, and a
/// client that writes thousands of requests before reading any gets every
/// reply: after a read that empties the socket the session waits for the
/// next input, an event or room to write, so each must wake it.
#[test]
fn requests_in_pieces_and_a_flood_read_late_are_all_answered() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut sub = daemon.raw();
    sub.authenticate(&token);
    sub.request(common::subscribe_as(1, "pieces"));
    assert!(matches!(
        sub.read_msg(),
        Msg::Reply(_, HubReply::Subscribed)
    ));
    let mut publisher = daemon.raw();
    publisher.authenticate(&token);

    // A publish and a ping, one byte every millisecond; halfway through,
    // an event for this connection.
    let mut bytes = request_bytes(100, publish("elsewhere", &b"payload"[..]));
    bytes.extend(request_bytes(101, Req::Ping));
    let half = bytes.len() / 2;
    for byte in &bytes[..half] {
        sub.send(&[*byte]);
        std::thread::sleep(Duration::from_millis(1));
    }
    publisher.request(publish("pieces", &b"event"[..]));
    assert!(matches!(
        publisher.read_msg(),
        Msg::Reply(_, HubReply::Published { receivers: 1 })
    ));
    match sub.read_msg() {
        Msg::Event(1, keyhole::hub::HubEvent::Message { topic, payload, .. }) => {
            assert_eq!(topic, "pieces");
            assert_eq!(payload.as_ref(), b"event");
        }
        other => panic!("expected the event while a request is half sent, got {other:?}"),
    }
    for byte in &bytes[half..] {
        sub.send(&[*byte]);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(
        sub.read_msg(),
        Msg::Reply(100, HubReply::Published { receivers: 0 })
    ));
    assert_eq!(sub.read_msg(), Msg::Ack(101));

    // 20,000 pings in one go, nothing read until all are written: the
    // daemon's writes block, it stops reading, and must take up both again.
    const FLOOD: u64 = 20_000;
    let mut flood = Vec::new();
    for id in 0..FLOOD {
        flood.extend(request_bytes(1_000 + id, Req::Ping));
    }
    let mut writer = sub.stream.try_clone().expect("clone the socket");
    let written = std::thread::spawn(move || writer.write_all(&flood));
    std::thread::sleep(Duration::from_millis(200));
    for id in 0..FLOOD {
        assert_eq!(sub.read_msg(), Msg::Ack(1_000 + id));
    }
    written.join().expect("writer").expect("write the flood");

    // Requests whose replies fill several write batches, all in one read:
    // the socket is empty after that read, so the frames left behind each
    // full batch must be answered without waiting for more input.
    let mut lister = daemon.raw();
    lister.authenticate(&token);
    for i in 0..40 {
        lister.request(common::subscribe_as(
            10 + i,
            &format!("long{i:03}{}", "x".repeat(200)),
        ));
        assert!(matches!(
            lister.read_msg(),
            Msg::Reply(_, HubReply::Subscribed)
        ));
    }
    let mut lists = Vec::new();
    for id in 0..64 {
        lists.extend(request_bytes(5_000 + id, Req::Hub(HubRequest::Topics)));
    }
    lister.send(&lists);
    let mut replied = 0;
    for id in 0..64 {
        match lister.read_msg() {
            Msg::Reply(got, HubReply::Topics(list)) => {
                assert_eq!(got, 5_000 + id);
                assert!(
                    list.patterns.len() >= 40,
                    "{} patterns",
                    list.patterns.len()
                );
                replied += 1;
            }
            other => panic!("expected the topic list {id}, got {other:?}"),
        }
    }
    assert_eq!(replied, 64);
}

#[test]
fn a_pipelined_mix_of_calls_pings_and_bad_frames_is_answered_in_order() {
    // One write, so that the daemon decodes ahead while the hub batches
    // publishes: a run to a topic nobody hears, broken by a ping; a run to
    // a topic with a subscriber, broken by a call the hub cannot decode;
    // a call the hub does not batch; an unknown request kind; a last publish.
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut sub = daemon.raw();
    sub.authenticate(&token);
    sub.request(common::subscribe_as(1, "heard"));
    assert!(matches!(
        sub.read_msg(),
        Msg::Reply(_, HubReply::Subscribed)
    ));
    let mut raw = daemon.raw();
    raw.authenticate(&token);
    let mut unknown_tag = 16u32.to_le_bytes().to_vec();
    unknown_tag.extend_from_slice(&13u64.to_le_bytes());
    unknown_tag.extend_from_slice(&0u32.to_le_bytes());
    unknown_tag.extend_from_slice(&10u32.to_le_bytes());
    let mut unknown_kind = 12u32.to_le_bytes().to_vec();
    unknown_kind.extend_from_slice(&15u64.to_le_bytes());
    unknown_kind.extend_from_slice(&99u32.to_le_bytes());
    let mut wire = Vec::new();
    for id in 1..=3 {
        wire.extend(request_bytes(id, publish("quiet", vec![id as u8])));
    }
    wire.extend(request_bytes(4, Req::Ping));
    for id in 5..=7 {
        wire.extend(request_bytes(id, publish("quiet", vec![id as u8])));
    }
    for id in 10..=12 {
        wire.extend(request_bytes(id, publish("heard", vec![id as u8])));
    }
    wire.extend(unknown_tag);
    wire.extend(request_bytes(14, Req::Hub(HubRequest::Status)));
    wire.extend(unknown_kind);
    wire.extend(request_bytes(16, publish("heard", vec![16])));
    raw.send(&wire);

    for id in [1, 2, 3] {
        assert!(matches!(
            raw.read_msg(),
            Msg::Reply(got, HubReply::Published { receivers: 0 }) if got == id
        ));
    }
    assert_eq!(raw.read_msg(), Msg::Ack(4));
    for id in [5, 6, 7] {
        assert!(matches!(
            raw.read_msg(),
            Msg::Reply(got, HubReply::Published { receivers: 0 }) if got == id
        ));
    }
    for id in [10, 11, 12] {
        assert!(matches!(
            raw.read_msg(),
            Msg::Reply(got, HubReply::Published { receivers: 1 }) if got == id
        ));
    }
    match raw.read_msg() {
        Msg::Error {
            id: Some(13),
            code: ErrorCode::Transport(TransportCode::BadRequest),
            ..
        } => {}
        other => panic!("request 13 got {other:?}"),
    }
    assert!(matches!(
        raw.read_msg(),
        Msg::Reply(14, HubReply::Status(_))
    ));
    match raw.read_msg() {
        Msg::Error {
            id: Some(15),
            code: ErrorCode::Transport(TransportCode::UnknownRequest),
            ..
        } => {}
        other => panic!("request 15 got {other:?}"),
    }
    assert!(matches!(
        raw.read_msg(),
        Msg::Reply(16, HubReply::Published { receivers: 1 })
    ));
    for id in [10u8, 11, 12, 16] {
        match sub.read_msg() {
            Msg::Event(1, keyhole::hub::HubEvent::Message { topic, payload, .. }) => {
                assert_eq!(topic, "heard");
                assert_eq!(payload.as_ref(), &[id][..]);
            }
            other => panic!("expected the event of publish {id}, got {other:?}"),
        }
    }
    raw.request(Req::Ping);
    assert!(matches!(raw.read_msg(), Msg::Ack(_)));
}
