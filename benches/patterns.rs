//! Fan-out with many patterns subscribed: does a publish cost what its
//! topic's tokens lead to, or grow with the patterns?
//!
//! Two release keyholeds, the same in every way but one: on **A**, 10
//! distinct patterns are subscribed; on **B**, 10,000 (by a few noise
//! connections, none matching the benchmark's topic, in three shapes: a
//! literal first token with `>`, `*` then a literal, and the benchmark's own
//! first token then a literal, so that every level of the trie is
//! crowded). On each, the engine of `keyhole bench` publishes 64-byte
//! events to 16 subscribers of the topic `bench.fanout`, every delivery
//! verified. The rounds alternate A and B; the ratio B/A of deliveries per
//! second is taken per round and its median reported.
//!
//! `cargo bench --bench patterns` (`-- --quick`: one short round). Target
//! (issue "bus", item 2): B/A >= 0.8.

mod support;

use std::sync::Arc;
use std::time::Duration;

use keyhole::client::{ConnectOptions, HubClient};
use keyhole::hub::{HubRequest, Lag};
use keyhole::limits::MAX_SUBSCRIPTIONS;
use keyhole::loadgen::{self as bench, Daemon, Keyhole, Stop};

const SUBSCRIBERS: usize = 16;
const PAYLOAD: usize = 64;
const WINDOW: usize = 64;
const TARGET: f64 = 0.8;

/// The `i`th noise pattern: never matches `bench.fanout`.
fn noise(i: usize) -> String {
    match i % 3 {
        0 => format!("n{i}.>"),
        1 => format!("*.m{i}"),
        _ => format!("bench.k{i}"),
    }
}

/// Subscribes `n` distinct noise patterns over as many connections as it
/// takes; the connections are returned to keep them open.
async fn add_noise(options: &ConnectOptions, n: usize) -> Vec<HubClient> {
    let mut clients = Vec::new();
    let mut done = 0;
    while done < n {
        let client = options.connect_hub().await.expect("noise client");
        let here = (n - done).min(MAX_SUBSCRIPTIONS);
        let calls = (0..here).map(|k| {
            client.call(HubRequest::Subscribe {
                sid: k as u64 + 1,
                pattern: noise(done + k),
                lag: Lag::Disconnect,
            })
        });
        futures_util::future::try_join_all(calls)
            .await
            .expect("noise subscriptions");
        done += here;
        clients.push(client);
    }
    clients
}

struct Side {
    name: &'static str,
    daemon: Daemon,
    _server: support::Keyholed,
    _noise: Vec<HubClient>,
}

async fn side(name: &'static str, patterns: usize) -> Side {
    let server = support::start_keyholed(&[]);
    let options = ConnectOptions::new()
        .socket(&server.socket)
        .token(Arc::clone(&server.token));
    // The benchmark's own subscribers make one pattern; the rest is noise.
    let noise = add_noise(&options, patterns - 1).await;
    let status = options.connect_hub().await.unwrap().status().await.unwrap();
    assert_eq!(
        status.topics as usize,
        patterns - 1,
        "{name}: noise patterns"
    );
    Side {
        name,
        daemon: Daemon {
            socket: server.socket.clone(),
            token: Arc::clone(&server.token),
            timeout: Duration::from_secs(10),
        },
        _server: server,
        _noise: noise,
    }
}

async fn fanout(side: &Side, secs: f64) -> f64 {
    let wire = Arc::new(Keyhole::publish(
        side.daemon.clone(),
        "bench.fanout",
        PAYLOAD,
        SUBSCRIBERS as u64,
    ));
    let m = bench::fanout(
        wire,
        PAYLOAD,
        SUBSCRIBERS,
        0,
        WINDOW,
        Stop::Time(Duration::from_secs_f64(secs)),
        Duration::from_secs(10),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{}: {e}", side.name));
    m.rate()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, secs) = if quick { (1, 0.5) } else { (5, 2.0) };
    let a = side("10 patterns", 10).await;
    let b = side("10,000 patterns", 10_000).await;
    println!(
        "fan-out 1 -> {SUBSCRIBERS}, {PAYLOAD} B, {WINDOW} publishes in flight; {rounds} rounds of {secs} s per side"
    );
    println!(
        "{:>6} {:>20} {:>20} {:>8}",
        "round", "A: 10 patterns", "B: 10,000 patterns", "B/A"
    );
    let mut ratios = Vec::new();
    for round in 0..rounds {
        // Alternate which side goes first.
        let (ra, rb) = if round % 2 == 0 {
            let ra = fanout(&a, secs).await;
            (ra, fanout(&b, secs).await)
        } else {
            let rb = fanout(&b, secs).await;
            (fanout(&a, secs).await, rb)
        };
        println!(
            "{:>6} {:>14.0} del/s {:>14.0} del/s {:>8.2}",
            round + 1,
            ra,
            rb,
            rb / ra
        );
        ratios.push(rb / ra);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "median B/A {median:.2} (min {:.2}, max {:.2}); target >= {TARGET}: {}",
        ratios[0],
        ratios[ratios.len() - 1],
        if median >= TARGET { "met" } else { "MISSED" }
    );
}
