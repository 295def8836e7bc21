//! A subscriber that does not poll its subscription holds at most its event
//! budget, and the daemon then cuts it as a slow consumer, which the
//! subscription reports (issue "Hardening", item 8). The client runs in this
//! process, so this binary holds this one test: its RSS is the client's.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{DaemonProcess, ProcSample};
use keyhole::client::{ClientError, DEFAULT_EVENT_BUDGET};
use keyhole::transport::CloseReason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpolled_subscription_holds_at_most_the_event_budget_and_is_cut() {
    const EVENTS: u64 = 256;
    let daemon = DaemonProcess::start(&[]);
    let subscriber = daemon.client().await;
    let publisher = daemon.client().await;
    let mut subscription = subscriber.subscribe("firehose").await.unwrap();
    let payload = Bytes::from(vec![0x5A; 1024 * 1024]);
    let me = std::process::id() as i32;
    let before = ProcSample::read(me).unwrap();

    // 256 x 1 MiB while the application takes nothing.
    for _ in 0..EVENTS {
        publisher
            .publish("firehose", payload.clone())
            .await
            .unwrap();
    }
    // The daemon cuts the subscriber: only the publisher is left.
    let deadline = Instant::now() + Duration::from_secs(20);
    while publisher.status().await.unwrap().authenticated != 1 {
        assert!(
            Instant::now() < deadline,
            "the daemon still serves the subscriber that reads nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = ProcSample::read(me).unwrap();
    let grown = after.rss_kib.saturating_sub(before.rss_kib) / 1024;
    eprintln!(
        "client RSS {} -> {} MiB over {EVENTS} x 1 MiB unpolled events (budget {} MiB)",
        before.rss_kib / 1024,
        after.rss_kib / 1024,
        DEFAULT_EVENT_BUDGET >> 20
    );
    // The budget, what the socket buffers and one frame being read.
    assert!(
        grown <= (DEFAULT_EVENT_BUDGET >> 20) as u64 + 16,
        "the client grew by {grown} MiB"
    );

    // What it kept is delivered in order, then the end is reported.
    let mut received = 0u64;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), subscription.next_event()).await {
            Ok(Some(Ok(event))) => {
                received += 1;
                assert_eq!(event.sequence, received, "events out of order or missing");
                assert_eq!(event.payload, payload);
            }
            Ok(Some(Err(err))) => break err,
            Ok(None) => panic!("the subscription ended without saying why"),
            Err(_) => panic!("the subscription neither delivers nor ends"),
        }
    };
    eprintln!("{received} events delivered, then: {end}");
    assert!((1..EVENTS).contains(&received));
    // The reason is explicit: the daemon's `Closing`, or, when that could
    // not get through the unread socket, that this client fell behind.
    assert!(
        matches!(
            end,
            ClientError::Closed {
                reason: Some(CloseReason::SlowConsumer)
            } | ClientError::FellBehind {
                budget: DEFAULT_EVENT_BUDGET
            }
        ),
        "{end:?}"
    );
    assert!(subscription.next_event().await.is_none());
}
