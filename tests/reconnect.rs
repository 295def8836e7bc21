//! A reconnecting hub client against a real keyholed: it subscribes again
//! after the daemon restarts or cuts it, and says so in the subscription's
//! stream (a restart as a new instance), never hiding the gap.

mod common;

use std::time::{Duration, Instant};

use common::DaemonProcess;
use keyhole::client::ReconnectingSubscription;
use keyhole::client::hub::{Event, Received};

async fn next(sub: &mut ReconnectingSubscription) -> Received {
    tokio::time::timeout(Duration::from_secs(20), sub.receive())
        .await
        .expect("an item within 20 s")
        .expect("the subscription goes on")
        .expect("no error item")
}

fn event(item: Received) -> Event {
    match item {
        Received::Event(event) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_is_seen_as_a_new_instance_and_the_subscription_goes_on() {
    let mut daemon = DaemonProcess::start(&[]);
    let hub = daemon.options().connect_hub_reconnecting().await.unwrap();
    let first = hub
        .client()
        .await
        .unwrap()
        .welcome()
        .await
        .unwrap()
        .instance_id;
    let mut sub = hub.subscribe("news.>").await.unwrap();
    for i in 0..3u8 {
        assert_eq!(hub.publish("news.local", vec![i]).await.unwrap(), 1);
    }
    for i in 0..3u64 {
        let e = event(next(&mut sub).await);
        assert_eq!((e.topic.as_str(), e.sequence), ("news.local", i + 1));
    }

    daemon.restart_after_kill();
    // The restart is an item of its own, before anything published after it.
    assert_eq!(
        next(&mut sub).await,
        Received::Reconnected { restarted: true }
    );
    let client = hub.client().await.unwrap();
    assert_ne!(
        client.welcome().await.unwrap().instance_id,
        first,
        "a new instance id"
    );
    // A client of the new daemon publishes: the numbering started again.
    let other = daemon.client().await;
    assert_eq!(other.publish("news.local", "after").await.unwrap(), 1);
    let e = event(next(&mut sub).await);
    assert_eq!((e.sequence, &e.payload[..]), (1, &b"after"[..]));
    // Calls go to the new connection too.
    assert_eq!(hub.status().await.unwrap().subscriptions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_as_a_slow_consumer_reconnects_to_the_same_instance_and_says_so() {
    let daemon =
        DaemonProcess::start(&["--outbound-queue-bytes", "65536", "--max-frame-len", "4096"]);
    let hub = daemon
        .options()
        .event_budget(64 * 1024)
        .connect_hub_reconnecting()
        .await
        .unwrap();
    let instance = hub
        .client()
        .await
        .unwrap()
        .welcome()
        .await
        .unwrap()
        .instance_id;
    let mut sub = hub.subscribe("feed").await.unwrap();
    // The application reads nothing while 2 MiB is published, 16 times its
    // event budget and the daemon's queue together: the daemon cuts it.
    let publisher = daemon.client().await;
    const PUBLISHED: u64 = 2048;
    for _ in 0..PUBLISHED {
        publisher.publish("feed", vec![0u8; 1024]).await.unwrap();
    }
    // Reading now: the events that got through, then the news, then events
    // published after the reconnect.
    let mut before = 0u64;
    let mut last = 0u64;
    loop {
        match next(&mut sub).await {
            Received::Event(e) => {
                assert_eq!(e.sequence, last + 1, "events before the cut are in order");
                last = e.sequence;
                before += 1;
            }
            Received::Reconnected { restarted } => {
                assert!(!restarted, "the same daemon: not a restart");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        before < PUBLISHED,
        "the cut lost events, which is why it is reported"
    );
    assert_eq!(
        hub.client()
            .await
            .unwrap()
            .welcome()
            .await
            .unwrap()
            .instance_id,
        instance
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while publisher.status().await.unwrap().subscriptions != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publisher.publish("feed", "fresh").await.unwrap();
    loop {
        let e = event(next(&mut sub).await);
        if &e.payload[..] == b"fresh" {
            break;
        }
    }
}
