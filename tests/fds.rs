//! File descriptors on the wire (proto-spec.md section 19), against a real
//! keyholed: a publish by sealed memfd reaches subscribers that accept
//! descriptors as the memfd and the others as its bytes; descriptors a
//! connection did not opt in to, sent before the handshake, unannounced,
//! missing or too many are closed (a pipe's far end sees EOF) and answered
//! with their specific error; the daemon's descriptor count comes back;
//! `keyhole pub --file --memfd` and `keyhole sub` carry a file's bytes.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{DaemonProcess, Msg, RawConn, wait_for};
use keyhole::client::ClientError;
use keyhole::fds::send_with_fds;
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubError, HubRequest};
use keyhole::limits::{MAX_FDS_PER_FRAME, MAX_FRAME_LEN};
use keyhole::memfd;
use keyhole::transport::{ErrorCode, RequestKind, TransportCode, encode_call_fds, encode_request};

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe().expect("pipe")
}

/// Whether the pipe's read end sees EOF within a few seconds, i.e. no
/// process holds its write end any more.
fn sees_eof(read: OwnedFd) -> bool {
    let mut file = std::fs::File::from(read);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let _ = tx.send(matches!(file.read(&mut buf), Ok(0)));
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
}

fn send_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let sent = if fds.len() <= MAX_FDS_PER_FRAME {
        send_with_fds(stream, &[std::io::IoSlice::new(bytes)], fds).expect("sendmsg")
    } else {
        // More than the library sends: an attacker's own sendmsg.
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let mut space =
            vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        rustix::net::sendmsg(
            stream,
            &[std::io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .expect("sendmsg")
    };
    assert_eq!(sent, bytes.len(), "a short sendmsg of a small frame");
}

fn request(id: u64, kind: RequestKind) -> Vec<u8> {
    let mut dst = BytesMut::new();
    encode_request::<()>(&mut dst, id, kind, None, MAX_FRAME_LEN).unwrap();
    dst.to_vec()
}

fn call_fds(id: u64, count: u32, topic: &str) -> Vec<u8> {
    let mut dst = BytesMut::new();
    let req = HubRequest::PublishMemfd {
        topic: topic.into(),
    };
    encode_call_fds(&mut dst, id, count, &req, MAX_FRAME_LEN).unwrap();
    dst.to_vec()
}

/// An authenticated raw connection that sent `AcceptFds` (and got its Ack).
fn accepting(daemon: &DaemonProcess) -> RawConn {
    let mut raw = daemon.raw();
    raw.authenticate(&daemon.token());
    raw.send(&request(1, RequestKind::AcceptFds));
    assert_eq!(raw.read_msg(), Msg::Ack(1));
    raw
}

fn fds_back_to(daemon: &DaemonProcess, baseline: usize) {
    wait_for(
        Duration::from_secs(5),
        "the daemon's descriptors back to baseline",
        || daemon.sample().fds <= baseline,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memfd_publish_reaches_fd_subscribers_as_the_memfd_and_the_others_as_its_bytes() {
    let daemon = DaemonProcess::start(&[]);
    let baseline = daemon.sample().fds;
    let with_fds = daemon.client().await;
    with_fds.accept_fds().await.unwrap();
    let mut by_fd = with_fds.subscribe("big.>").await.unwrap();
    let inline = daemon.client().await;
    let mut by_bytes = inline.subscribe("big.>").await.unwrap();

    let bytes = payload(200_000);
    let publisher = daemon.client().await;
    let fd = memfd::create_sealed("test", &bytes).unwrap();
    assert_eq!(publisher.publish_memfd("big.one", fd).await.unwrap(), 2);

    let got = by_fd.next_event().await.unwrap().unwrap();
    let memfd = got
        .memfd
        .as_ref()
        .expect("the memfd, to the connection that accepts it");
    assert!(got.payload.is_empty());
    assert_eq!(memfd.len(), bytes.len() as u64);
    assert_eq!(&memfd.read().unwrap()[..], &bytes[..]);
    let fd = memfd.fd().unwrap();
    assert!(
        rustix::io::fcntl_getfd(fd)
            .unwrap()
            .contains(rustix::io::FdFlags::CLOEXEC),
        "a received descriptor is close-on-exec"
    );
    // Nobody can change the bytes: the seals are on.
    assert!(rustix::io::write(fd, b"x").is_err());
    assert!(rustix::fs::ftruncate(fd, 0).is_err());

    let other = by_bytes.next_event().await.unwrap().unwrap();
    assert!(other.memfd.is_none());
    assert_eq!(&other.payload[..], &bytes[..]);
    assert_eq!(
        (other.topic.as_str(), other.sequence),
        ("big.one", got.sequence)
    );

    // An inline publish to the same subscribers after it: the numbering
    // is shared, and the fd subscriber gets bytes as usual.
    assert_eq!(
        publisher.publish("big.one", &b"small"[..]).await.unwrap(),
        2
    );
    let next = by_fd.next_event().await.unwrap().unwrap();
    assert_eq!(
        (next.sequence, &next.payload[..]),
        (got.sequence + 1, &b"small"[..])
    );
    assert!(next.memfd.is_none());

    drop((by_fd, by_bytes, got, other, next));
    drop((with_fds, inline, publisher));
    fds_back_to(&daemon, baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsealed_memfd_or_a_plain_file_is_refused_and_nothing_is_published() {
    let daemon = DaemonProcess::start(&[]);
    let subscriber = daemon.client().await;
    let mut events = subscriber.subscribe("t").await.unwrap();
    let publisher = daemon.client().await;

    let unsealed = rustix::fs::memfd_create(
        "unsealed",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    rustix::io::write(&unsealed, b"can still change").unwrap();
    let file: OwnedFd = tempfile::tempfile().unwrap().into();
    for (what, fd) in [("unsealed memfd", unsealed), ("plain file", file)] {
        match publisher.publish_memfd("t", fd).await {
            Err(ClientError::Service { code, message, .. }) => {
                assert_eq!(code, HubError::BAD_MEMFD, "{what}: {message}");
                assert!(
                    message.contains("nothing was published"),
                    "{what}: {message}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // The first event the subscriber sees is the next real publish: number 1.
    publisher.publish("t", &b"after"[..]).await.unwrap();
    let first = events.next_event().await.unwrap().unwrap();
    assert_eq!((first.sequence, &first.payload[..]), (1, &b"after"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memfd_too_large_for_an_inline_subscriber_is_refused_with_the_limit() {
    let daemon = DaemonProcess::start(&["--max-frame-len", "65536"]);
    let inline = daemon.client().await;
    let _events = inline.subscribe("t").await.unwrap();
    let publisher = daemon.client().await;
    let fd = memfd::create_sealed("big", &payload(100_000)).unwrap();
    match publisher.publish_memfd("t", fd).await {
        Err(ClientError::Service { code, message, .. }) => {
            assert_eq!(code, HubError::TOO_LARGE, "{message}");
            assert!(message.contains("65536"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn descriptors_sent_with_the_handshake_are_closed_unread() {
    let daemon = DaemonProcess::start(&[]);
    let baseline = daemon.sample().fds;
    let (read, write) = pipe();
    let mut raw = daemon.raw();
    let handshake = HandshakeFrame::new(&daemon.token());
    send_fds(&raw.stream, &handshake, &[write.as_fd()]);
    drop(write);
    assert!(matches!(raw.read_msg(), Msg::Welcome(_)));
    assert!(
        sees_eof(read),
        "the daemon kept a descriptor sent before Welcome"
    );
    // The connection is served as usual.
    raw.send(&request(7, RequestKind::Ping));
    assert_eq!(raw.read_msg(), Msg::Ack(7));
    drop(raw);
    fds_back_to(&daemon, baseline);
}

#[test]
fn a_call_with_descriptors_before_accept_fds_is_refused_and_the_connection_stays() {
    let daemon = DaemonProcess::start(&[]);
    let (read, write) = pipe();
    let mut raw = daemon.raw();
    raw.authenticate(&daemon.token());
    send_fds(&raw.stream, &call_fds(3, 1, "t"), &[write.as_fd()]);
    drop(write);
    match raw.read_msg() {
        Msg::Error { id, code, message } => {
            assert_eq!(
                (id, code),
                (
                    Some(3),
                    ErrorCode::Transport(TransportCode::DescriptorsNotAccepted)
                ),
                "{message}"
            );
            assert!(message.contains("AcceptFds"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(sees_eof(read));
    raw.send(&request(4, RequestKind::Ping));
    assert_eq!(raw.read_msg(), Msg::Ack(4));
}

#[test]
fn bytes_queued_behind_stray_descriptors_are_read_without_waiting_for_more() {
    // A stream read stops after a message that carried descriptors (here
    // dropped by the kernel: no AcceptFds), with what was sent after it
    // still queued. The read is short, yet the socket is not drained: the
    // daemon must read on, not wait for a readiness that nothing will
    // bring (the first message is part of a frame, so no reply, and no
    // write event, follows it).
    let daemon = DaemonProcess::start(&[]);
    let (_read, write) = pipe();
    let mut raw = daemon.raw();
    raw.authenticate(&daemon.token());
    // Idle first (its next read is the one after a wake-up); stopped while
    // the three messages are sent, so that all are queued when it reads.
    std::thread::sleep(Duration::from_millis(100));
    daemon.signal(rustix::process::Signal::STOP);
    std::thread::sleep(Duration::from_millis(50));
    let ping = request(4, RequestKind::Ping);
    send_fds(&raw.stream, &ping[..5], &[write.as_fd()]);
    raw.send(&ping[5..]);
    raw.send(&request(5, RequestKind::Ping));
    daemon.signal(rustix::process::Signal::CONT);
    let started = Instant::now();
    assert_eq!(raw.read_msg(), Msg::Ack(4));
    assert_eq!(raw.read_msg(), Msg::Ack(5));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
}

#[test]
fn descriptors_with_a_frame_that_announces_none_close_with_descriptor_mismatch() {
    let daemon = DaemonProcess::start(&[]);
    let baseline = daemon.sample().fds;
    let mut raw = accepting(&daemon);
    let (read, write) = pipe();
    send_fds(
        &raw.stream,
        &request(2, RequestKind::Ping),
        &[write.as_fd()],
    );
    drop(write);
    // Then a frame after it (the stray descriptors behind a frame start),
    // which the daemon, closing as soon as the Ping is answered, may never
    // read: the write may fail.
    let _ = std::io::Write::write_all(&mut raw.stream, &request(3, RequestKind::Ping));
    let message = raw_error_then_close(&mut raw, 2, TransportCode::DescriptorMismatch);
    assert!(message.contains("no frame announcing"), "{message}");
    assert!(sees_eof(read), "a stray descriptor was kept");
    fds_back_to(&daemon, baseline);
}

/// Acks up to `acked` may come first; then exactly one `Error code` without
/// an id, then EOF.
fn raw_error_then_close(raw: &mut RawConn, acked: u64, code: TransportCode) -> String {
    loop {
        match raw.read_msg() {
            Msg::Ack(id) if id <= acked => continue,
            Msg::Error {
                id: None,
                code: got,
                message,
            } => {
                assert_eq!(got, ErrorCode::Transport(code), "{message}");
                assert!(
                    raw.read_frame().is_none(),
                    "a frame after the closing error"
                );
                return message;
            }
            other => panic!("expected Error {code:?}, got {other:?}"),
        }
    }
}

#[test]
fn a_frame_whose_descriptors_did_not_come_closes_with_descriptor_mismatch() {
    let daemon = DaemonProcess::start(&[]);
    let mut raw = accepting(&daemon);
    raw.send(&call_fds(2, 1, "t"));
    let message = raw_error_then_close(&mut raw, 0, TransportCode::DescriptorMismatch);
    assert!(message.contains("announces 1"), "{message}");
}

#[test]
fn more_descriptors_than_a_frame_may_carry_close_with_too_many_descriptors() {
    let daemon = DaemonProcess::start(&[]);
    let baseline = daemon.sample().fds;
    for count in [MAX_FDS_PER_FRAME + 1, 253] {
        let mut raw = accepting(&daemon);
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..count).map(|_| pipe()).collect();
        let writes: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        send_fds(&raw.stream, &call_fds(2, count as u32, "t"), &writes);
        drop(writes);
        let (reads, _): (Vec<OwnedFd>, Vec<OwnedFd>) = pipes.into_iter().unzip();
        let message = raw_error_then_close(&mut raw, 0, TransportCode::TooManyDescriptors);
        assert!(
            message.contains(&MAX_FDS_PER_FRAME.to_string()),
            "{message}"
        );
        for read in reads {
            assert!(sees_eof(read), "{count} descriptors: one was kept");
        }
    }
    fds_back_to(&daemon, baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_publishes_a_file_as_a_memfd_and_sub_writes_its_bytes() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;

    let daemon = DaemonProcess::start(&[]);
    let bytes = payload(300_000);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&bytes).unwrap();

    // `keyhole sub` accepts descriptors: it gets the memfd and writes its
    // bytes; a library subscriber that does not gets them inline.
    let mut sub = daemon
        .cli()
        .args(["sub", "files.>", "-c", "1", "--format", "raw"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(sub.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "keyhole: subscribed to files.>");
    let inline = daemon.client().await;
    let mut events = inline.subscribe("files.>").await.unwrap();

    let out = daemon
        .cli()
        .args(["pub", "files.one", "--file"])
        .arg(file.path())
        .args(["--memfd", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["reached"], 2, "{json}");
    assert_eq!(json["bytes"], bytes.len(), "{json}");

    let got = sub.wait_with_output().unwrap();
    assert!(got.status.success());
    assert_eq!(got.stdout.len(), bytes.len());
    assert!(got.stdout == bytes, "sub wrote other bytes than the file's");
    let event = events.next_event().await.unwrap().unwrap();
    assert!(event.memfd.is_none());
    assert_eq!(&event.payload[..], &bytes[..]);

    // A missing file is named, and nothing is published.
    let out = daemon
        .cli()
        .args(["pub", "files.one", "--file", "/nonexistent/x", "--memfd"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/x"), "{err}");
}

/// A frame announcing none with descriptors, and nothing after it: the
/// daemon answers the frame, then `DescriptorMismatch` at once (it used to
/// answer the frame and hold the descriptors silently until another frame
/// came, or the peer closed).
#[test]
fn descriptors_with_the_last_frame_sent_close_with_descriptor_mismatch_at_once() {
    let daemon = DaemonProcess::start(&[]);
    let baseline = daemon.sample().fds;
    let mut raw = accepting(&daemon);
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let (read, write) = pipe();
    send_fds(
        &raw.stream,
        &request(2, RequestKind::Ping),
        &[write.as_fd()],
    );
    drop(write);
    let message = raw_error_then_close(&mut raw, 2, TransportCode::DescriptorMismatch);
    assert!(message.contains("no frame announcing"), "{message}");
    assert!(sees_eof(read), "a stray descriptor was kept");
    fds_back_to(&daemon, baseline);
}

/// Descriptors sprayed over a frame that is still arriving, one `sendmsg`
/// a byte, each with 8 descriptors: no frame can claim them, so the daemon
/// closes at the first (it used to hold them all until the frame was
/// whole, 8 more descriptors a byte, up to the frame limit).
#[test]
fn descriptors_sprayed_over_a_frame_still_arriving_close_at_once() {
    let daemon = DaemonProcess::start(&[]);
    let baseline = daemon.sample().fds;
    let mut raw = accepting(&daemon);
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let (read, write) = pipe();
    let mut frame = BytesMut::new();
    let publish = HubRequest::Publish {
        topic: "t".into(),
        payload: keyhole::Payload::from(vec![7u8; 200]),
    };
    encode_request(
        &mut frame,
        2,
        RequestKind::Call,
        Some(&publish),
        MAX_FRAME_LEN,
    )
    .unwrap();
    raw.send(&frame[..4]);
    let eight = [write.as_fd(); MAX_FDS_PER_FRAME];
    for byte in &frame[4..36] {
        // (Refused once the daemon has closed: that is the point.)
        let _ = send_with_fds(
            &raw.stream,
            &[std::io::IoSlice::new(std::slice::from_ref(byte))],
            &eight,
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(write);
    let message = raw_error_then_close(&mut raw, 0, TransportCode::DescriptorMismatch);
    assert!(message.contains("no frame announcing"), "{message}");
    assert!(sees_eof(read), "a sprayed descriptor was kept");
    fds_back_to(&daemon, baseline);
}

/// Too many descriptors in one read belong, like any, to a frame by their
/// place in the stream: a frame that started before them is answered as
/// usual, and so is one that announces none, before `TooManyDescriptors`.
/// (The daemon used to refuse whatever frame it handled next once a read
/// had been cut, frames before the descriptors included: here the first
/// Ping, half of which had arrived before them, got no answer.)
#[test]
fn too_many_descriptors_do_not_refuse_the_frames_before_them() {
    let daemon = DaemonProcess::start(&[]);
    let baseline = daemon.sample().fds;
    let mut raw = accepting(&daemon);
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let first = request(2, RequestKind::Ping);
    raw.send(&first[..8]);
    std::thread::sleep(Duration::from_millis(200));
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..MAX_FDS_PER_FRAME + 1).map(|_| pipe()).collect();
    let writes: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
    let mut rest = first[8..].to_vec();
    rest.extend(request(3, RequestKind::Ping));
    send_fds(&raw.stream, &rest, &writes);
    drop(writes);
    let (reads, _): (Vec<OwnedFd>, Vec<OwnedFd>) = pipes.into_iter().unzip();
    assert_eq!(raw.read_msg(), Msg::Ack(2), "the frame before them");
    assert_eq!(raw.read_msg(), Msg::Ack(3), "the frame they came with");
    raw_error_then_close(&mut raw, 0, TransportCode::TooManyDescriptors);
    for read in reads {
        assert!(sees_eof(read), "a descriptor of the cut read was kept");
    }
    fds_back_to(&daemon, baseline);
}
