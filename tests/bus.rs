//! The hub as a bus, against a real keyholed: request/reply between clients
//! and each of its outcomes, who a responder sees, that a reply reaches
//! nobody but its requester, groups and their bound, wildcard
//! subscriptions, the receiver count of a publish, and the drop-oldest lag
//! policy with its exact `Lagged` count.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DaemonProcess, Msg, Req, publish, subscribe_as};
use keyhole::client::ClientError;
use keyhole::client::hub::RequestError;
use keyhole::error::FrameError;
use keyhole::hub::{HubError, HubEvent, HubReply, HubRequest, Lag};
use keyhole::limits::MAX_REQUESTS_IN_FLIGHT;
use keyhole::transport::ErrorCode;

async fn in_flight(client: &keyhole::client::HubClient, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.status().await.unwrap().requests_in_flight != n {
        assert!(
            Instant::now() < deadline,
            "requests in flight never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_and_the_responder_sees_who_asked() {
    let daemon = DaemonProcess::start(&[]);
    let responder = daemon.client().await;
    let mut requests = responder.serve("svc.echo").await.unwrap();
    let serving = tokio::spawn(async move {
        let request = requests.next_request().await.unwrap().unwrap();
        let who = (request.uid(), request.pid(), request.name().to_owned());
        let mut reply = b"echo: ".to_vec();
        reply.extend_from_slice(request.payload());
        assert!(
            request.reply(reply).await.unwrap(),
            "the reply was delivered"
        );
        who
    });
    // The requester is another process: the CLI.
    let mut cli = daemon.cli();
    let child = cli
        .args(["req", "svc.echo", "hello"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"echo: hello");
    let (uid, seen_pid, name) = serving.await.unwrap();
    assert_eq!(uid, rustix::process::getuid().as_raw());
    assert_eq!(seen_pid, pid, "the responder sees the requester's pid");
    assert_eq!(name, "svc.echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_nobody_serves_is_answered_at_once() {
    let daemon = DaemonProcess::start(&[]);
    let client = daemon.client().await;
    let started = Instant::now();
    let err = client
        .request_timeout("svc.nobody", "x", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RequestError::NoResponders { ref name } if name == "svc.nobody"),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no responders took {:?}, as if it waited for the timeout",
        started.elapsed()
    );
    // And once its only responder stops serving.
    let responder = daemon.client().await;
    let requests = responder.serve("svc.once").await.unwrap();
    drop(requests);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client
            .request_timeout("svc.once", "x", Duration::from_secs(30))
            .await
        {
            Err(RequestError::NoResponders { .. }) => break,
            other => {
                assert!(Instant::now() < deadline, "still served: {other:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // The CLI says so with exit 7.
    let out = daemon
        .cli()
        .args(["req", "svc.nobody", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no responders"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_killed_mid_request_ends_it_with_responder_gone() {
    let daemon = DaemonProcess::start(&[]);
    // The responder is a process of its own, whose command never finishes.
    let mut responder = daemon
        .cli()
        .args(["reply", "svc.slow", "--", "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = daemon.client().await;
    wait_for_name(&client, "svc.slow").await;
    let asking = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .request_timeout("svc.slow", "x", Duration::from_secs(30))
                .await
        })
    };
    in_flight(&client, 1).await;
    let started = Instant::now();
    responder.kill().unwrap();
    let _ = responder.wait();
    let outcome = asking.await.unwrap();
    assert!(
        matches!(outcome, Err(RequestError::ResponderGone)),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(client.status().await.unwrap().requests_in_flight, 0);
}

async fn wait_for_name(client: &keyhole::client::HubClient, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = client.topics().await.unwrap();
        if list.names.iter().any(|(n, _)| n == name) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_answers_times_out_and_a_late_answer_goes_nowhere() {
    let daemon = DaemonProcess::start(&[]);
    let responder = daemon.client().await;
    let mut requests = responder.serve("svc.mute").await.unwrap();
    let client = daemon.client().await;
    let started = Instant::now();
    let outcome = client
        .request_timeout("svc.mute", "x", Duration::from_millis(300))
        .await;
    assert!(
        matches!(outcome, Err(RequestError::Timeout(_))),
        "{outcome:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The responder answers after the timeout: not delivered, and the
    // requester receives nothing more.
    let request = requests.next_request().await.unwrap().unwrap();
    assert!(!request.reply("too late").await.unwrap());
    assert_eq!(client.status().await.unwrap().requests_in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_frame_limit_is_reported_to_both_sides() {
    let daemon = DaemonProcess::start(&["--max-frame-len", "1024"]);
    let responder = daemon.client().await;
    let mut requests = responder.serve("svc.big").await.unwrap();
    let client = daemon.client().await;
    // The library sees that the reply cannot fit: the requester is told,
    // and the responder's reply fails.
    let asking = {
        let client = client.clone();
        tokio::spawn(async move { client.request("svc.big", "x").await })
    };
    let request = requests.next_request().await.unwrap().unwrap();
    let err = request.reply(vec![7u8; 2000]).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Frame(FrameError::FrameTooLarge { .. })),
        "{err:?}"
    );
    let outcome = asking.await.unwrap();
    assert!(
        matches!(outcome, Err(RequestError::ReplyTooLarge { len: 2000 })),
        "{outcome:?}"
    );

    // The daemon sees it too: a `Respond` that fits whose `Response` (4
    // bytes larger) does not.
    let token = daemon.token();
    let mut raw = daemon.raw();
    raw.authenticate(&token);
    raw.request(Req::Hub(HubRequest::Serve {
        name: "svc.edge".into(),
    }));
    assert!(matches!(raw.read_msg(), Msg::Reply(1, HubReply::Serving)));
    let asking = {
        let client = client.clone();
        tokio::spawn(async move { client.request("svc.edge", "x").await })
    };
    let token = match raw.read_msg() {
        Msg::Event(0, HubEvent::Request { token, .. }) => token,
        other => panic!("{other:?}"),
    };
    let payload = vec![1u8; 1024 - 32];
    raw.request(Req::Hub(HubRequest::Respond {
        token,
        payload: keyhole::Payload::from(payload),
    }));
    match raw.read_msg() {
        Msg::Error {
            id: Some(2),
            code: ErrorCode::Service(HubError::TOO_LARGE),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    let outcome = asking.await.unwrap();
    assert!(
        matches!(outcome, Err(RequestError::ReplyTooLarge { len: 992 })),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_reaches_its_requester_and_nobody_else() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let responder = daemon.client().await;
    let mut requests = responder.serve("svc.secret").await.unwrap();
    // A third client that listens to everything and answers every token it
    // can guess before the responder does.
    let mut third = daemon.raw();
    third.authenticate(&token);
    third.request(subscribe_as(1, ">"));
    assert!(matches!(
        third.read_msg(),
        Msg::Reply(1, HubReply::Subscribed)
    ));
    let requester = daemon.client().await;
    let asking = {
        let requester = requester.clone();
        tokio::spawn(async move { requester.request("svc.secret", "question").await })
    };
    let request = requests.next_request().await.unwrap().unwrap();
    for guess in 0..64u64 {
        third.request(Req::Hub(HubRequest::Respond {
            token: guess,
            payload: keyhole::Payload::from("forged"),
        }));
        match third.read_msg() {
            Msg::Reply(_, HubReply::Responded { delivered: false }) => {}
            other => panic!("a forged answer to token {guess}: {other:?}"),
        }
    }
    assert!(request.reply("answer").await.unwrap());
    assert_eq!(&asking.await.unwrap().unwrap()[..], b"answer");
    // The third client received nothing of it: no request, no response, no
    // event (a ping's Ack is the next frame).
    third.request(Req::Ping);
    assert!(matches!(third.read_msg(), Msg::Ack(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_spread_over_a_group_and_bounded_per_responder() {
    let daemon = DaemonProcess::start(&[]);
    let mut counts = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let responder = daemon.client().await;
        let mut requests = responder.serve("svc.pool").await.unwrap();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        counts.push(std::sync::Arc::clone(&served));
        tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next_request().await {
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = request.reply("ok").await;
            }
        });
        clients.push(responder);
    }
    let client = daemon.client().await;
    for _ in 0..300 {
        client.request("svc.pool", "x").await.unwrap();
    }
    let got: Vec<u64> = counts
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert_eq!(got, [100, 100, 100], "round robin over the group");

    // A responder that answers nothing holds at most MAX_REQUESTS_IN_FLIGHT;
    // the next request is refused at once.
    let stuck = daemon.client().await;
    let mut held = stuck.serve("svc.stuck").await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..MAX_REQUESTS_IN_FLIGHT {
        let client = client.clone();
        waiting.push(tokio::spawn(async move {
            client
                .request_timeout("svc.stuck", "x", Duration::from_secs(60))
                .await
        }));
    }
    in_flight(&client, MAX_REQUESTS_IN_FLIGHT as u64).await;
    let err = client.request("svc.stuck", "one more").await.unwrap_err();
    assert!(matches!(err, RequestError::Busy { .. }), "{err:?}");
    // Dropping the requests unanswered fails them: nobody waits a minute.
    let mut taken = Vec::new();
    for _ in 0..MAX_REQUESTS_IN_FLIGHT {
        taken.push(held.next_request().await.unwrap().unwrap());
    }
    drop(taken);
    for w in waiting {
        let outcome = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("a dropped request is failed at once")
            .unwrap();
        assert!(
            matches!(outcome, Err(RequestError::Failed { .. })),
            "{outcome:?}"
        );
    }
}

/// Whether `pattern` matches `topic`, written from the rules (section 14),
/// independently of the daemon's trie.
fn model(pattern: &str, topic: &str) -> bool {
    fn go(p: &[&str], t: &[&str]) -> bool {
        match (p.first(), t.first()) {
            (Some(&">"), Some(_)) => p.len() == 1,
            (Some(&"*"), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && go(&p[1..], &t[1..]),
            (None, None) => true,
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    go(&p, &t)
}

#[test]
fn wildcard_subscriptions_match_as_the_rules_say_and_events_name_their_subscription() {
    let table: &[(&str, &str, bool)] = &[
        ("a", "a", true),
        ("a", "b", false),
        ("a", "a.b", false),
        ("a.b", "a.b", true),
        ("*", "a", true),
        ("*", "a.b", false),
        ("a.*", "a.b", true),
        ("a.*", "a", false),
        ("a.*", "a.b.c", false),
        ("*.b", "a.b", true),
        ("*.*", "a.b", true),
        ("*.*.c", "a.b.c", true),
        (">", "a", true),
        (">", "a.b.c", true),
        ("a.>", "a", false),
        ("a.>", "a.b", true),
        ("a.>", "a.b.c", true),
        ("a.*.>", "a.b", false),
        ("a.*.>", "a.b.c.d", true),
        ("*.>", "x.y", true),
        ("sensors.*.temp", "sensors.kitchen.temp", true),
        ("sensors.*.temp", "sensors.kitchen.humidity", false),
        ("sensors.>", "sensors", false),
        ("ünï.*", "ünï.✓", true),
    ];
    for &(p, t, want) in table {
        assert_eq!(
            model(p, t),
            want,
            "the model disagrees with the table: {p} vs {t}"
        );
    }
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut sub = daemon.raw();
    sub.authenticate(&token);
    let patterns: Vec<&str> = {
        let mut p: Vec<&str> = table.iter().map(|(p, _, _)| *p).collect();
        p.sort();
        p.dedup();
        p
    };
    for (i, p) in patterns.iter().enumerate() {
        sub.request(subscribe_as(i as u64 + 1, p));
        assert!(
            matches!(sub.read_msg(), Msg::Reply(_, HubReply::Subscribed)),
            "{p}"
        );
    }
    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    let topics: Vec<&str> = {
        let mut t: Vec<&str> = table.iter().map(|(_, t, _)| *t).collect();
        t.sort();
        t.dedup();
        t
    };
    for topic in &topics {
        let want: Vec<u64> = patterns
            .iter()
            .enumerate()
            .filter(|(_, p)| model(p, topic))
            .map(|(i, _)| i as u64 + 1)
            .collect();
        publisher.request(publish(topic, &b"x"[..]));
        match publisher.read_msg() {
            Msg::Reply(_, HubReply::Published { receivers }) => {
                assert_eq!(receivers, want.len() as u64, "receivers of {topic}")
            }
            other => panic!("{other:?}"),
        }
        // One event per matching subscription, on its stream, and a ping's
        // Ack after them shows there is no other.
        sub.request(Req::Ping);
        let mut got = Vec::new();
        loop {
            match sub.read_msg() {
                Msg::Event(stream, HubEvent::Message { topic: t, .. }) => {
                    assert_eq!(t, *topic);
                    got.push(stream);
                }
                Msg::Ack(_) => break,
                other => panic!("{other:?}"),
            }
        }
        got.sort();
        assert_eq!(got, want, "subscriptions matching {topic}");
    }
}

/// Publishes `n` payloads to `topic` in one write and returns the sum of
/// their receiver counts.
fn publish_all(
    publisher: &mut common::RawConn,
    topic: &str,
    n: u64,
    payload: impl Fn(u64) -> Vec<u8>,
) -> u64 {
    let mut all = Vec::new();
    for i in 0..n {
        all.extend(common::request_bytes(i + 1, publish(topic, payload(i))));
    }
    publisher.send(&all);
    let mut receivers_total = 0;
    for _ in 0..n {
        match publisher.read_msg() {
            Msg::Reply(_, HubReply::Published { receivers }) => receivers_total += receivers,
            other => panic!("{other:?}"),
        }
    }
    receivers_total
}

#[test]
fn a_subscriber_that_drops_the_oldest_is_told_exactly_how_many_it_missed() {
    // A small queue: 64 KiB of events.
    let daemon =
        DaemonProcess::start(&["--outbound-queue-bytes", "65536", "--max-frame-len", "4096"]);
    let token = daemon.token();
    let mut sub = daemon.raw();
    sub.authenticate(&token);
    sub.request(Req::Hub(HubRequest::Subscribe {
        sid: 9,
        pattern: "feed".into(),
        lag: Lag::DropOldest,
    }));
    assert!(matches!(
        sub.read_msg(),
        Msg::Reply(_, HubReply::Subscribed)
    ));
    // The subscriber stalls (reads nothing) while 2000 events of 1 KiB are
    // published: far more than its queue and socket buffers hold.
    const N: u64 = 2000;
    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    let queued_for_it = publish_all(&mut publisher, "feed", N, |i| vec![i as u8; 1024]);
    assert!(queued_for_it > 0, "nothing was queued for the subscriber");
    // It resumes: events, one notice, events; nothing disconnected.
    sub.request(Req::Ping);
    let mut last = 0u64;
    let mut received = 0u64;
    let mut missed_total = 0u64;
    let mut pending_gap: Option<u64> = None;
    loop {
        match sub.read_msg() {
            Msg::Event(
                9,
                HubEvent::Message {
                    sequence, payload, ..
                },
            ) => {
                let want = last + 1 + pending_gap.take().unwrap_or(0);
                assert_eq!(sequence, want, "events after a notice follow on exactly");
                assert_eq!(payload[0], (sequence - 1) as u8);
                last = sequence;
                received += 1;
            }
            Msg::Lagged { stream: 9, missed } => {
                assert!(missed > 0);
                assert!(pending_gap.is_none(), "two notices in a row");
                pending_gap = Some(missed);
                missed_total += missed;
            }
            Msg::Ack(_) => {
                if last + pending_gap.unwrap_or(0) == N {
                    break;
                }
                // The Ack can overtake queued events: read on.
                sub.request(Req::Ping);
            }
            other => panic!("{other:?}"),
        }
    }
    eprintln!("received {received}, missed {missed_total} of {N}");
    assert!(missed_total > 0, "the queue never overflowed");
    assert_eq!(
        received + missed_total,
        N,
        "every event is received or counted as missed"
    );
}

/// Waits until the daemon reports `n` subscriptions and `names` served names.
fn wait_until_listed(daemon: &DaemonProcess, subscriptions: u64, names: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = daemon.cli().arg("status").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let figure = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if figure("subscriptions") == Some(subscriptions) && figure("names") == Some(names) {
            return;
        }
        assert!(Instant::now() < deadline, "status never showed it: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_cli_serves_requests_with_a_command_and_subscribes_with_patterns() {
    let daemon = DaemonProcess::start(&[]);
    // `keyhole reply` runs the command per request: stdin in, stdout out.
    let mut upper = daemon
        .cli()
        .args(["reply", "svc.upper", "--", "tr", "a-z", "A-Z"])
        .spawn()
        .unwrap();
    let mut who = daemon
        .cli()
        .args([
            "reply",
            "svc.who",
            "--",
            "sh",
            "-c",
            "echo \"$KEYHOLE_REQUEST_UID $KEYHOLE_REQUEST_NAME\"",
        ])
        .spawn()
        .unwrap();
    let mut failing = daemon
        .cli()
        .args([
            "reply",
            "svc.fail",
            "--",
            "sh",
            "-c",
            "echo 'no disk' >&2; exit 3",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sub = daemon
        .cli()
        .args(["sub", "sensors.*.temp", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_listed(&daemon, 1, 3);

    let req =
        |name: &str, message: &str| daemon.cli().args(["req", name, message]).output().unwrap();
    let out = req("svc.upper", "hello");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"HELLO");
    let out = req("svc.who", "x");
    let uid = rustix::process::getuid().as_raw();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{uid} svc.who\n")
    );
    let out = req("svc.fail", "x");
    assert_eq!(out.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no disk") && stderr.contains("exit status: 3"),
        "{stderr}"
    );

    // `keyhole status --topics` lists patterns and names with their counts.
    let out = daemon.cli().args(["status", "--topics"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "1  sensors.*.temp",
        "1  svc.upper",
        "1  svc.who",
        "1  svc.fail",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start() == line),
            "no line {line:?} in:\n{text}"
        );
    }

    // `keyhole pub` says how many subscriptions it reached; `sub` prints the
    // concrete topic.
    let publish = |topic: &str, message: &str| {
        let out = daemon.cli().args(["pub", topic, message]).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        publish("sensors.kitchen.temp", "21.5"),
        "published to 1 subscription\n"
    );
    assert_eq!(
        publish("sensors.kitchen.humidity", "40"),
        "published to 0 subscriptions\n"
    );
    assert_eq!(
        publish("sensors.hall.temp", "19"),
        "published to 1 subscription\n"
    );
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sensors.kitchen.temp 1 21.5\nsensors.hall.temp 1 19\n"
    );
    for child in [&mut upper, &mut who, &mut failing] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn no_event_of_a_subscription_follows_its_unsubscribed_reply_so_its_id_can_be_reused() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut sub = daemon.raw();
    sub.authenticate(&token);
    sub.request(subscribe_as(5, "old"));
    assert!(matches!(
        sub.read_msg(),
        Msg::Reply(_, HubReply::Subscribed)
    ));
    // 2 MiB of events for a subscriber that is not reading: more than the
    // socket buffers hold, so most of them wait in its queue.
    const N: u64 = 2000;
    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    assert_eq!(
        publish_all(&mut publisher, "old", N, |_| vec![1u8; 1024]),
        N
    );
    // The same id, at once, for another topic.
    let unsubscribe = sub.request(Req::Hub(HubRequest::Unsubscribe { sid: 5 }));
    let resubscribe = sub.request(subscribe_as(5, "new"));
    let mut old_before = 0u64;
    loop {
        match sub.read_msg() {
            Msg::Event(5, HubEvent::Message { topic, .. }) if topic == "old" => old_before += 1,
            Msg::Reply(id, HubReply::Unsubscribed) if id == unsubscribe => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        old_before < N,
        "every event was written before the Unsubscribe was read: the test shows nothing"
    );
    match sub.read_msg() {
        Msg::Reply(id, HubReply::Subscribed) if id == resubscribe => {}
        other => panic!("after Unsubscribed, an event of the ended subscription: {other:?}"),
    }
    publisher.request(publish("new", vec![2u8; 8]));
    assert!(matches!(
        publisher.read_msg(),
        Msg::Reply(_, HubReply::Published { receivers: 1 })
    ));
    match sub.read_msg() {
        Msg::Event(
            5,
            HubEvent::Message {
                topic, sequence, ..
            },
        ) => {
            assert_eq!((topic.as_str(), sequence), ("new", 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unserve_refuses_a_name_that_is_not_a_subject() {
    let daemon = DaemonProcess::start(&[]);
    let mut conn = daemon.raw();
    conn.authenticate(&daemon.token());
    for name in ["", "a..b", "a.*", &"x".repeat(300)] {
        let id = conn.request(Req::Hub(HubRequest::Unserve { name: name.into() }));
        match conn.read_msg() {
            Msg::Error {
                id: Some(got),
                code: ErrorCode::Service(HubError::INVALID_TOPIC),
                ..
            } if got == id => {}
            other => panic!("Unserve {name:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_topic_list_is_the_start_of_each_sorted_list() {
    let daemon = DaemonProcess::start(&["--max-frame-len", "4096"]);
    let client = daemon.client().await;
    let mut held = Vec::new();
    // Subscribed in an order unlike their sorted one.
    for i in (0..300).rev() {
        held.push(client.subscribe(&format!("p{i:03}")).await.unwrap());
    }
    let mut responders = Vec::new();
    for i in 0..5 {
        responders.push(client.serve(&format!("n{i}")).await.unwrap());
    }
    let list = client.topics().await.unwrap();
    assert!(list.truncated);
    assert!(!list.patterns.is_empty() && list.patterns.len() < 300);
    let want: Vec<(String, u64)> = (0..list.patterns.len())
        .map(|i| (format!("p{i:03}"), 1))
        .collect();
    assert_eq!(list.patterns, want, "the first patterns in sorted order");
    assert!(list.names.is_empty(), "names get what patterns leave: none");
    drop(held);
    drop(responders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaving_a_group_keeps_the_turn_where_it_was() {
    let daemon = DaemonProcess::start(&[]);
    let mut members = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let client = daemon.client().await;
        let mut requests = client.serve("svc.turns").await.unwrap();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next_request().await {
                let _ = request.reply(format!("m{i}")).await;
            }
        }));
        members.push(client);
    }
    let requester = daemon.client().await;
    let ask = || async {
        let reply = requester.request("svc.turns", "who").await.unwrap();
        String::from_utf8(reply.to_vec()).unwrap()
    };
    assert_eq!(ask().await, "m0");
    assert_eq!(ask().await, "m1");
    // m0, before the turn, leaves: the turn is m2's still.
    tasks[0].abort();
    let _ = (&mut tasks[0]).await;
    members[0].status().await.unwrap(); // its Unserve is handled
    assert_eq!(ask().await, "m2", "after m1 comes m2, not m1 again");
    assert_eq!(ask().await, "m1");
    // m2, whose turn it is, leaves: the turn passes to the member after it
    // (wrapping round: m1).
    tasks[2].abort();
    let _ = (&mut tasks[2]).await;
    members[2].status().await.unwrap();
    assert_eq!(ask().await, "m1");
}
