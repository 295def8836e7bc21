//! Publishing large payloads by sealed memfd against publishing them
//! inline, in one run against one release keyholed (issue 15's goals):
//!
//! - throughput: a publisher publishes `N` payloads of each size back to
//!   back (each publish awaited), to 1 and to 16 subscribers; the figure is
//!   payload bytes published per second until every subscriber has every
//!   event. The memfd publisher creates, fills and seals a new memfd per
//!   publish (that is its real cost); its subscribers accept descriptors
//!   and get the memfd. "memfd, read" subscribers also `pread` every byte,
//!   for a fair comparison with subscribers that need the bytes.
//! - latency: one publish at a time, from the publish call, with the
//!   payload ready in the publisher's buffer (a `Vec`, or a memfd already
//!   filled and sealed), until the last subscriber has the event ("memfd,
//!   read": and has read every byte); the median of the runs.
//!
//! Inline payloads cannot pass the 16 MiB frame limit, so the 64 MiB size
//! has no inline row; its ratio is against the largest inline payload
//! measured (16 MiB less a KiB).
//!
//!   cargo bench --bench memfd            # full
//!   cargo bench --bench memfd -- --quick # CI: a few publishes, verified
//!
//! Every event is verified: topic, sequence order, length, and (inline and
//! "memfd, read") the bytes' first and last words.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyhole::client::{ConnectOptions, HubClient};
use keyhole::memfd;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Inline,
    Memfd,
    MemfdRead,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Memfd => "memfd",
            Mode::MemfdRead => "memfd, read",
        }
    }
}

fn payload(len: usize, seq: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    // Distinct ends per publish, so a stale or mixed-up payload is seen.
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    let n = bytes.len();
    bytes[n - 8..].copy_from_slice(&(!seq).to_le_bytes());
    bytes
}

async fn client(daemon: &support::Keyholed) -> HubClient {
    ConnectOptions::new()
        .socket(&daemon.socket)
        .token(Arc::clone(&daemon.token))
        .event_budget(256 * MIB)
        .timeout(Duration::from_secs(60))
        .connect_hub()
        .await
        .expect("connect")
}

/// Subscribers of `topic`; each counts the events it verified.
async fn subscribers(
    daemon: &support::Keyholed,
    topic: &str,
    n: usize,
    mode: Mode,
    len: usize,
) -> (
    Vec<HubClient>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let got = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let c = client(daemon).await;
        if mode != Mode::Inline {
            c.accept_fds().await.expect("AcceptFds");
        }
        let mut sub = c.subscribe(topic).await.expect("subscribe");
        let got = Arc::clone(&got);
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            while let Some(item) = sub.next_event().await {
                let event = item.expect("an event");
                assert!(event.sequence > last, "events out of order");
                last = event.sequence;
                match (mode, &event.memfd) {
                    (Mode::Inline, None) => check(&event.payload, len),
                    (Mode::Memfd, Some(m)) => assert_eq!(m.len(), len as u64),
                    (Mode::MemfdRead, Some(m)) => check(&m.read().expect("pread"), len),
                    (mode, memfd) => panic!("{mode:?} subscriber got memfd {memfd:?}"),
                }
                got.fetch_add(1, Ordering::Release);
            }
        }));
        clients.push(c);
    }
    (clients, got, tasks)
}

fn check(bytes: &[u8], len: usize) {
    assert_eq!(bytes.len(), len, "payload length");
    let mut head = [0u8; 8];
    head.copy_from_slice(&bytes[..8]);
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&bytes[len - 8..]);
    assert_eq!(
        u64::from_le_bytes(tail),
        !u64::from_le_bytes(head),
        "payload ends"
    );
}

async fn publish(publisher: &HubClient, mode: Mode, topic: &str, bytes: Vec<u8>, subs: usize) {
    let reached = match mode {
        Mode::Inline => publisher.publish(topic, bytes).await,
        Mode::Memfd | Mode::MemfdRead => {
            let fd = memfd::create_sealed("bench", &bytes).expect("memfd");
            drop(bytes);
            publisher.publish_memfd(topic, fd).await
        }
    }
    .expect("publish");
    assert_eq!(reached, subs as u64, "receivers");
}

async fn wait_count(got: &AtomicU64, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.load(Ordering::Acquire) < want {
        assert!(Instant::now() < deadline, "events never all arrived");
        tokio::task::yield_now().await;
    }
}

/// Payload bytes published per second until every subscriber had all.
async fn throughput(
    daemon: &support::Keyholed,
    mode: Mode,
    len: usize,
    subs: usize,
    n: u64,
) -> f64 {
    let topic = format!("tp.{}.{len}.{subs}", mode.name().replace([',', ' '], ""));
    let (_clients, got, tasks) = subscribers(daemon, &topic, subs, mode, len).await;
    let publisher = client(daemon).await;
    // Payloads are made before the clock starts (the memfd's copy of them
    // is timed: it is the memfd publisher's cost).
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| payload(len, i)).collect();
    let start = Instant::now();
    for bytes in payloads {
        publish(&publisher, mode, &topic, bytes, subs).await;
    }
    wait_count(&got, n * subs as u64).await;
    let secs = start.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    (n as f64 * len as f64) / secs
}

/// Median delivery latency over `runs` single publishes.
async fn latency(
    daemon: &support::Keyholed,
    mode: Mode,
    len: usize,
    subs: usize,
    runs: u64,
) -> Duration {
    let topic = format!("lt.{}.{len}.{subs}", mode.name().replace([',', ' '], ""));
    let (_clients, got, tasks) = subscribers(daemon, &topic, subs, mode, len).await;
    let publisher = client(daemon).await;
    let mut times = Vec::new();
    for i in 0..runs {
        let bytes = payload(len, i);
        // The payload is ready in the publisher's own buffer before the
        // clock starts: a Vec, or a filled and sealed memfd.
        let fd = match mode {
            Mode::Inline => None,
            Mode::Memfd | Mode::MemfdRead => {
                Some(memfd::create_sealed("bench", &bytes).expect("memfd"))
            }
        };
        let start = Instant::now();
        let reached = match fd {
            None => publisher.publish(&topic, bytes).await,
            Some(fd) => publisher.publish_memfd(&topic, fd).await,
        }
        .expect("publish");
        assert_eq!(reached, subs as u64, "receivers");
        wait_count(&got, (i + 1) * subs as u64).await;
        times.push(start.elapsed());
    }
    for t in tasks {
        t.abort();
    }
    times.sort();
    times[times.len() / 2]
}

fn gib(bytes_per_sec: f64) -> String {
    format!("{:.2} GiB/s", bytes_per_sec / (1u64 << 30) as f64)
}

fn size_name(len: usize) -> String {
    if len >= MIB && len % MIB == 0 {
        format!("{} MiB", len / MIB)
    } else if len >= MIB {
        format!("{:.2} MiB", len as f64 / MIB as f64)
    } else {
        format!("{} KiB", len / KIB)
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let inline_max = 16 * MIB - KIB;
    let sizes = [64 * KIB, MIB, inline_max, 64 * MIB];
    // Room for a few 16 MiB events per subscriber queue and for 16 of them
    // (the defaults would cut a subscriber holding one such event when the
    // next arrives: the queue bound is one frame).
    let daemon = support::start_keyholed(&[
        "--outbound-queue-bytes",
        "268435456",
        "--memory-budget",
        "4294967296",
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("## memfd vs inline publish (one keyholed, this run)\n");
        println!("{}", if quick { "quick mode: figures are not meaningful\n" } else { "" });
        println!("| payload | subscribers | inline | memfd | memfd, read | memfd / inline | memfd, read / inline |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let mut inline_at_max = [0.0f64; 2];
        for len in sizes {
            for (k, subs) in [1usize, 16].into_iter().enumerate() {
                let n = if quick {
                    2
                } else {
                    ((256 * MIB) / len).clamp(4, 400) as u64
                };
                let inline = if len <= inline_max {
                    let t = throughput(&daemon, Mode::Inline, len, subs, n).await;
                    if len == inline_max {
                        inline_at_max[k] = t;
                    }
                    Some(t)
                } else {
                    None
                };
                let memfd = throughput(&daemon, Mode::Memfd, len, subs, n).await;
                let read = throughput(&daemon, Mode::MemfdRead, len, subs, n).await;
                let base = inline.unwrap_or(inline_at_max[k]);
                println!(
                    "| {} | {subs} | {} | {} | {} | {:.1}x{} | {:.1}x |",
                    size_name(len),
                    inline.map_or("n/a (over the frame limit)".into(), gib),
                    gib(memfd),
                    gib(read),
                    memfd / base,
                    if inline.is_none() { " (vs 16 MiB inline)" } else { "" },
                    read / base,
                );
            }
        }
        println!("\n### Delivery latency, median (publish call, payload ready, until the last subscriber has it)\n");
        println!("| payload | subscribers | inline | memfd | memfd, read |");
        println!("|---|---:|---:|---:|---:|");
        for len in sizes {
            for subs in [1usize, 16] {
                let runs = if quick { 2 } else { 15 };
                let inline = if len <= inline_max {
                    Some(latency(&daemon, Mode::Inline, len, subs, runs).await)
                } else {
                    None
                };
                let memfd = latency(&daemon, Mode::Memfd, len, subs, runs).await;
                let read = latency(&daemon, Mode::MemfdRead, len, subs, runs).await;
                println!(
                    "| {} | {subs} | {} | {:.3} ms | {:.3} ms |",
                    size_name(len),
                    inline.map_or("n/a".into(), |d| format!("{:.3} ms", d.as_secs_f64() * 1e3)),
                    memfd.as_secs_f64() * 1e3,
                    read.as_secs_f64() * 1e3,
                );
            }
        }
    });
    println!("\nmemfd bench: every event verified");
}
