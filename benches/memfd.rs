//! Publishing large payloads by sealed memfd against publishing them
//! inline, in one run against one release keyholed (issue 15's goals):
//!
//! - throughput: a publisher publishes `N` payloads of each size back to
//!   back (each publish awaited), to 1 and to 16 subscribers; the figure is
//!   payload bytes published per second until every subscriber has every
//!   event. Each payload is ready in the publisher's own buffer before the
//!   clock starts, a `Vec` or a filled and sealed memfd (an application
//!   that publishes by memfd produces its data there); what creating,
//!   filling and sealing a memfd costs is measured on its own. Memfd
//!   subscribers accept descriptors and get the memfd; "memfd, read"
//!   subscribers also `pread` every byte, as one that needs the bytes must.
//!   Subscribers free what they received on a thread of their own, as a
//!   steady stream must (the last close of a 64 MiB memfd frees its pages:
//!   milliseconds of a core).
//! - latency: one publish at a time, from the publish call, with the
//!   payload ready in the publisher's buffer (a `Vec`, or a memfd already
//!   filled and sealed), until the last subscriber has the event ("memfd,
//!   read": and has read every byte); the median of the runs. Here memfds
//!   received are kept until the run ends, so that freeing one run's pages
//!   does not overlap the next run's delivery.
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

use std::os::fd::OwnedFd;
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
    fn label(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Memfd => "memfd",
            Mode::MemfdRead => "memfdread",
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

/// Events verified by the subscribers of a run, with a wake-up per event.
#[derive(Default)]
struct Counter {
    n: AtomicU64,
    changed: tokio::sync::Notify,
}

struct Subscribers {
    _clients: Vec<HubClient>,
    got: Arc<Counter>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// `n` subscribers of `topic`, each verifying and counting its events.
async fn subscribers(
    daemon: &support::Keyholed,
    topic: &str,
    n: usize,
    mode: Mode,
    len: usize,
    keep: bool,
) -> Subscribers {
    let got = Arc::new(Counter::default());
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
            // With `keep`, memfd events are kept until the run ends: the
            // last close of a memfd frees its pages (milliseconds for 64 MiB,
            // on a core the next publish needs), which is not delivery.
            let mut kept = Vec::new();
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
                got.n.fetch_add(1, Ordering::Release);
                got.changed.notify_waiters();
                if keep && event.memfd.is_some() {
                    kept.push(event);
                } else {
                    // (Freeing a large payload is not delivery either.)
                    std::thread::spawn(move || drop(event));
                }
            }
        }));
        clients.push(c);
    }
    Subscribers {
        _clients: clients,
        got,
        tasks,
    }
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

/// A payload ready in the publisher's own buffer.
enum Ready {
    Bytes(Vec<u8>),
    Memfd(OwnedFd),
}

fn ready(mode: Mode, len: usize, seq: u64) -> Ready {
    let bytes = payload(len, seq);
    match mode {
        Mode::Inline => Ready::Bytes(bytes),
        Mode::Memfd | Mode::MemfdRead => {
            Ready::Memfd(memfd::create_sealed("bench", &bytes).expect("memfd"))
        }
    }
}

async fn publish(publisher: &HubClient, topic: &str, payload: Ready, subs: usize) {
    let reached = match payload {
        Ready::Bytes(bytes) => publisher.publish(topic, bytes).await,
        Ready::Memfd(fd) => publisher.publish_memfd(topic, fd).await,
    }
    .expect("publish");
    assert_eq!(reached, subs as u64, "receivers");
}

async fn wait_count(got: &Counter, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let changed = got.changed.notified();
        if got.n.load(Ordering::Acquire) >= want {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            tokio::time::timeout(left, changed).await.is_ok(),
            "events never all arrived"
        );
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
    let topic = format!("tp.{}.{len}.{subs}", mode.label());
    let subscribers = subscribers(daemon, &topic, subs, mode, len, false).await;
    let publisher = client(daemon).await;
    let payloads: Vec<Ready> = (0..n).map(|i| ready(mode, len, i)).collect();
    let start = Instant::now();
    for payload in payloads {
        publish(&publisher, &topic, payload, subs).await;
    }
    wait_count(&subscribers.got, n * subs as u64).await;
    (n as f64 * len as f64) / start.elapsed().as_secs_f64()
}

/// Median delivery latency over `runs` single publishes.
async fn latency(
    daemon: &support::Keyholed,
    mode: Mode,
    len: usize,
    subs: usize,
    runs: u64,
) -> Duration {
    let topic = format!("lt.{}.{len}.{subs}", mode.label());
    let subscribers = subscribers(daemon, &topic, subs, mode, len, true).await;
    let publisher = client(daemon).await;
    let mut times = Vec::new();
    for i in 0..runs {
        let payload = ready(mode, len, i);
        let start = Instant::now();
        publish(&publisher, &topic, payload, subs).await;
        wait_count(&subscribers.got, (i + 1) * subs as u64).await;
        times.push(start.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

fn gib(bytes_per_sec: f64) -> String {
    format!("{:.2} GiB/s", bytes_per_sec / (1u64 << 30) as f64)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn size_name(len: usize) -> String {
    if len % MIB == 0 {
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
        if quick {
            println!("quick mode: the figures are not meaningful\n");
        }
        println!("Throughput (payload bytes published per second, payload ready):\n");
        println!(
            "| payload | subscribers | inline | memfd | memfd, read | memfd / inline | memfd, read / inline |"
        );
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
                    if inline.is_none() {
                        " (vs 16 MiB inline)"
                    } else {
                        ""
                    },
                    read / base,
                );
            }
        }
        // What making a memfd costs a publisher whose data is not produced
        // in it: create, copy in, seal.
        let bytes = payload(64 * MIB, 0);
        let made = if quick { 1 } else { 8 };
        let start = Instant::now();
        for _ in 0..made {
            drop(memfd::create_sealed("bench", &bytes).expect("memfd"));
        }
        println!(
            "\nCreating, filling and sealing a 64 MiB memfd (not in the figures): {}",
            gib(made as f64 * bytes.len() as f64 / start.elapsed().as_secs_f64())
        );
        println!(
            "\nDelivery latency, median (the publish call, payload ready, until the last subscriber has it):\n"
        );
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
                    "| {} | {subs} | {} | {} | {} |",
                    size_name(len),
                    inline.map_or("n/a".into(), ms),
                    ms(memfd),
                    ms(read),
                );
            }
        }
    });
    println!("\nmemfd bench: every event verified");
}
