//! What a token holder can make a real keyholed hold in memory (issue
//! "Hardening", memory bounds): small events that used to pin large read
//! buffers, partial frames on many connections against the daemon-wide
//! budget, and the per-connection subscription cap.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use common::{DaemonProcess, Msg, RawConn, publish, subscribe};
use keyhole::hub::{HubError, HubReply, HubRequest};
use keyhole::limits::{MAX_FRAME_LEN, MAX_SUBSCRIPTIONS, MAX_TOPIC_LEN};
use keyhole::transport::{ErrorCode, TransportCode};

const MIB: u64 = 1024 * 1024;

/// Reads replies until `n` have come; returns them in order.
fn replies(conn: &mut RawConn, n: usize) -> Vec<Msg> {
    (0..n).map(|_| conn.read_msg()).collect()
}

#[test]
fn small_events_do_not_pin_the_large_frames_they_arrived_behind() {
    // The outbound limit is the default, 16 MiB.
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut slow = daemon.raw();
    slow.authenticate(&token);
    slow.request(subscribe("slow"));
    assert!(matches!(
        slow.read_msg(),
        Msg::Reply(1, HubReply::Subscribed)
    ));

    let before = daemon.sample();
    // 48 x [a 16 MiB publish nobody receives][a 16 KiB one for `slow`,
    // which never reads]. Each small event used to keep the whole read
    // buffer it arrived in alive.
    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    let big = vec![0xAB; MAX_FRAME_LEN - 64];
    for i in 0..48u32 {
        let mut small = vec![0u8; 16 * 1024];
        small[..4].copy_from_slice(&i.to_le_bytes());
        // In one write, so that the small one arrives in the same read
        // buffer as the tail of the large one.
        let id = u64::from(i) * 2 + 1;
        let mut pair = common::request_bytes(id, publish("nobody", big.clone()));
        pair.extend(common::request_bytes(id + 1, publish("slow", small)));
        publisher.send(&pair);
    }
    for msg in replies(&mut publisher, 96) {
        assert!(
            matches!(msg, Msg::Reply(_, HubReply::Published { .. })),
            "{msg:?}"
        );
    }
    let after = daemon.sample();
    let grown = after.rss_kib.saturating_sub(before.rss_kib) / 1024;
    eprintln!(
        "daemon RSS {} -> {} MiB (peak {} MiB) with 48 small events pinned behind 16 MiB frames",
        before.rss_kib / 1024,
        after.rss_kib / 1024,
        after.hwm_kib / 1024
    );
    // The outbound limit plus 32 MiB.
    assert!(
        grown <= 16 + 32,
        "the daemon's RSS grew by {grown} MiB for 768 KiB of queued events"
    );

    // Nothing was lost: the subscriber gets all 48 when it reads.
    for i in 0..48u32 {
        match slow.read_msg() {
            Msg::Event(
                _,
                keyhole::hub::HubEvent::Message {
                    topic,
                    sequence,
                    payload,
                },
            ) => {
                assert_eq!((topic.as_str(), sequence), ("slow", u64::from(i) + 1));
                assert_eq!(payload.len(), 16 * 1024);
                assert_eq!(payload[..4], i.to_le_bytes());
            }
            other => panic!("event {i}: {other:?}"),
        }
    }
}

#[test]
fn past_the_memory_budget_the_connection_holding_the_most_is_cut() {
    const CONNS: usize = 32;
    const BUDGET: u64 = 64 * MIB;
    // At the connection cap, every connection announces a whole 16 MiB
    // frame and sends all of it but the last byte.
    let daemon = DaemonProcess::start(&[
        "--memory-budget",
        &BUDGET.to_string(),
        "--max-connections",
        &CONNS.to_string(),
    ]);
    let token = daemon.token();
    let before = daemon.sample();
    let conns: Vec<RawConn> = (0..CONNS)
        .map(|_| {
            let mut conn = daemon.raw();
            conn.authenticate(&token);
            conn
        })
        .collect();
    let writers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            std::thread::spawn(move || {
                let len = MAX_FRAME_LEN as u32;
                let mut sent = 0usize;
                let chunk = vec![0u8; 64 * 1024];
                let mut result = conn.stream.write_all(&len.to_le_bytes());
                while result.is_ok() && sent + chunk.len() < len as usize {
                    result = conn.stream.write_all(&chunk);
                    sent += chunk.len();
                }
                if result.is_ok() {
                    let last = len as usize - 1 - sent;
                    result = conn.stream.write_all(&chunk[..last]);
                }
                (conn, result.is_ok())
            })
        })
        .collect();
    let conns: Vec<(RawConn, bool)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let after = daemon.sample();

    // Each connection either still holds its partial frame, or was sent
    // exactly `Error OverBudget` and closed.
    let mut cut = 0;
    let mut holding = 0;
    for (mut conn, _) in conns {
        conn.stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut first = [0u8; 1];
        match conn.stream.read(&mut first) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                holding += 1;
            }
            Ok(1) => {
                let mut rest = first.to_vec();
                conn.stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                rest.extend(conn.read_to_end());
                let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                assert_eq!(rest.len(), 4 + len, "bytes after the error frame");
                match Msg::decode(&rest[4..]) {
                    Msg::Error {
                        id: None,
                        code: ErrorCode::Transport(TransportCode::OverBudget),
                        message,
                    } => assert!(message.contains("67108864"), "{message}"),
                    other => panic!("a cut connection got {other:?}"),
                }
                cut += 1;
            }
            other => panic!("reading a connection: {other:?}"),
        }
    }
    let peak = after.hwm_kib.saturating_sub(before.rss_kib) / 1024;
    eprintln!(
        "{cut} of {CONNS} connections cut, {holding} hold a partial frame; daemon RSS {} -> {} MiB, peak {} MiB",
        before.rss_kib / 1024,
        after.rss_kib / 1024,
        after.hwm_kib / 1024
    );
    let frame_mib = MAX_FRAME_LEN as u64 / MIB;
    assert!(
        holding as u64 * frame_mib <= BUDGET / MIB,
        "{holding} connections still hold 16 MiB each: over the budget"
    );
    assert!(cut >= CONNS - (BUDGET / MIB / frame_mib) as usize);
    // The budget plus a fixed overhead (one frame arriving before the
    // enforcer runs, allocator slack).
    assert!(
        peak <= BUDGET / MIB + 32,
        "the daemon's RSS rose by {peak} MiB at its peak, over the 64 MiB budget plus 32"
    );
    // The daemon serves on: those cut gave their share back.
    let mut probe = daemon.raw();
    probe.authenticate(&token);
    probe.request(common::Req::Ping);
    assert!(matches!(probe.read_msg(), Msg::Ack(1)));
}

#[test]
fn an_ordinary_client_is_not_cut_at_the_smallest_budget() {
    // The budget asked for is raised to the smallest one allowed; a request
    // that arrives in two pieces (its read buffer is allocated meanwhile)
    // used to be cut: the read buffer alone was over a two-frame budget.
    let daemon = DaemonProcess::start(&["--max-frame-len", "1024", "--memory-budget", "1"]);
    let token = daemon.token();
    let mut conn = daemon.raw();
    conn.authenticate(&token);
    let ping = common::request_bytes(5, common::Req::Ping);
    conn.send(&ping[..6]);
    std::thread::sleep(Duration::from_millis(100));
    conn.send(&ping[6..]);
    assert!(matches!(conn.read_msg(), Msg::Ack(5)));
    // Ten connections with a frame of the largest size on its way each.
    let mut others: Vec<RawConn> = (0..10)
        .map(|_| {
            let mut c = daemon.raw();
            c.authenticate(&token);
            c.send(&1024u32.to_le_bytes());
            c.send(&[0u8; 512]);
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    for c in &mut others {
        c.send(&[0u8; 512]);
    }
    conn.request(common::Req::Ping);
    assert!(matches!(conn.read_msg(), Msg::Ack(1)));
}

/// A topic of exactly `MAX_TOPIC_LEN` bytes, distinct per `i`.
fn long_topic(i: usize) -> String {
    let tag = format!("t{i}.");
    format!("{tag}{}", "x".repeat(MAX_TOPIC_LEN - tag.len()))
}

#[test]
fn a_connection_holds_at_most_max_subscriptions_and_leaves_none_behind() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut conn = daemon.raw();
    conn.authenticate(&token);
    // Pipelined: every request is written before a reply is read.
    let mut batch = Vec::new();
    let first_sid = 1_000_000;
    for i in 0..MAX_SUBSCRIPTIONS {
        batch.extend(common::request_bytes(
            i as u64 + 1,
            common::subscribe_as(first_sid + i as u64, &long_topic(i)),
        ));
    }
    conn.send(&batch);
    for (i, msg) in replies(&mut conn, MAX_SUBSCRIPTIONS)
        .into_iter()
        .enumerate()
    {
        assert!(
            matches!(msg, Msg::Reply(id, HubReply::Subscribed) if id == i as u64 + 1),
            "subscription {i}: {msg:?}"
        );
    }
    let mut next = MAX_SUBSCRIPTIONS as u64 + 1;
    let mut call = |conn: &mut RawConn, req: common::Req| {
        conn.send(&common::request_bytes(next, req));
        next += 1;
        conn.read_msg()
    };
    // One more is refused, and the connection stays open.
    let extra = long_topic(MAX_SUBSCRIPTIONS);
    match call(&mut conn, subscribe(&extra)) {
        Msg::Error {
            id: Some(_),
            code: ErrorCode::Service(HubError::TOO_MANY_SUBSCRIPTIONS),
            message,
        } => assert!(message.contains("4096"), "{message}"),
        other => panic!("subscription {}: {other:?}", MAX_SUBSCRIPTIONS + 1),
    }
    assert!(matches!(call(&mut conn, common::Req::Ping), Msg::Ack(_)));
    // A subscription id in use is refused, the connection stays open.
    match call(&mut conn, common::subscribe_as(first_sid, &long_topic(7))) {
        Msg::Error {
            code: ErrorCode::Service(HubError::SID_IN_USE),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    // Unsubscribing frees a place.
    let unsub = call(
        &mut conn,
        common::Req::Hub(HubRequest::Unsubscribe { sid: first_sid }),
    );
    assert!(
        matches!(unsub, Msg::Reply(_, HubReply::Unsubscribed)),
        "{unsub:?}"
    );
    let sub = call(&mut conn, subscribe(&extra));
    assert!(
        matches!(sub, Msg::Reply(_, HubReply::Subscribed)),
        "{sub:?}"
    );
    // Events still reach the right subscription.
    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    publisher.request(publish(&extra, &b"hi"[..]));
    assert!(matches!(
        publisher.read_msg(),
        Msg::Reply(1, HubReply::Published { .. })
    ));
    match conn.read_msg() {
        Msg::Event(_, keyhole::hub::HubEvent::Message { topic, .. }) => assert_eq!(topic, extra),
        other => panic!("{other:?}"),
    }

    let status = |publisher: &mut RawConn, id| {
        publisher.request(common::Req::Hub(HubRequest::Status));
        match publisher.read_msg() {
            Msg::Reply(got, HubReply::Status(status)) if got == id => status,
            other => panic!("{other:?}"),
        }
    };
    let held = status(&mut publisher, 2);
    assert_eq!(held.subscriptions, MAX_SUBSCRIPTIONS as u64);
    assert_eq!(held.topics, MAX_SUBSCRIPTIONS as u64);
    // Disconnecting gives every subscription up.
    drop(conn);
    let mut id = 3;
    common::wait_for(Duration::from_secs(10), "the subscriptions to go", || {
        let s = status(&mut publisher, id);
        id += 1;
        s.subscriptions == 0 && s.topics == 0
    });
}
