//! Subscription churn, and what it does to another client's ping: 20,000
//! subscriptions to 255-byte topics over five connections (a keyhole
//! connection holds at most `MAX_SUBSCRIPTIONS`), pipelined one topic per
//! request, then unsubscribed one by one, then subscribed again and dropped
//! with their connections. A separate client pings throughout, from its own
//! thread with blocking I/O, one ping every 0.5 ms.
//!
//! Against the release keyholed and, as the baseline in the same run, Redis
//! (SUBSCRIBE/UNSUBSCRIBE on a Unix socket; skipped if `redis-server` is not
//! on PATH). Each server's idle ping latency is measured first; the table
//! gives, per phase, the daemon's CPU, the pinger's p50/p99/max and p99
//! against idle.
//!
//! `cargo bench --bench churn` (three rounds; `-- --quick`: one). Target
//! (issue "Hardening", item 9): keyhole's pinger p99 stays under 5 ms during
//! churn. Nothing here asserts speed; every reply is verified.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use keyhole::client::{ConnectOptions, HubClient};
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubReply, HubRequest, Lag};
use keyhole::limits::{MAX_FRAME_LEN, MAX_SUBSCRIPTIONS, MAX_TOPIC_LEN};
use keyhole::token::SessionToken;
use keyhole::transport::{DaemonFrame, RequestKind, encode_request};
use support::{Proc, clock_ticks, cpu_secs, on_path, start_redis};

const CONNECTIONS: usize = 5;
const PER_CONNECTION: usize = 4000;
const PING_EVERY: Duration = Duration::from_micros(500);
const TARGET_P99: Duration = Duration::from_millis(5);

type Error = Box<dyn std::error::Error + Send + Sync>;

fn topic(conn: usize, i: usize) -> String {
    let tag = format!("c{conn}.t{i}.");
    format!("{tag}{}", "x".repeat(MAX_TOPIC_LEN - tag.len()))
}

/// A server under churn, spoken to in its own protocol.
trait Churned: Sync {
    fn name(&self) -> &'static str;
    fn pid(&self) -> u32;
    /// A blocking connection ready to ping.
    fn pinger(&self) -> Result<StdStream, Error>;
    /// One ping and its answer.
    fn ping(&self, conn: &mut StdStream) -> Result<(), Error>;
    /// A connection ready to subscribe.
    async fn open(&self) -> Result<UnixStream, Error>;
    /// The requests subscribing (or unsubscribing) connection `c` to all its
    /// topics, and how to count their answers.
    fn requests(&self, c: usize, subscribe: bool) -> BytesMut;
    /// Takes one complete answer off `buf`: `Ok(false)` if none is whole yet.
    fn answer(&self, buf: &mut BytesMut, subscribe: bool) -> Result<bool, Error>;
    /// Subscriptions the server holds now.
    async fn subscriptions(&self) -> Result<u64, Error>;
}

/// Writes `requests` and reads `n` answers, concurrently.
async fn pipeline<S: Churned>(
    server: &S,
    stream: &mut UnixStream,
    requests: BytesMut,
    n: usize,
    subscribe: bool,
) -> Result<(), Error> {
    let (mut read, mut write) = stream.split();
    let writing = async move {
        write.write_all(&requests).await?;
        Ok::<_, Error>(())
    };
    let reading = async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut got = 0;
        while got < n {
            while got < n && server.answer(&mut buf, subscribe)? {
                got += 1;
            }
            if got < n && read.read_buf(&mut buf).await? == 0 {
                return Err(format!("{}: EOF after {got} of {n} answers", server.name()).into());
            }
        }
        Ok::<_, Error>(())
    };
    tokio::try_join!(writing, reading)?;
    Ok(())
}

async fn churn_all<S: Churned>(
    server: &S,
    conns: &mut [UnixStream],
    subscribe: bool,
) -> Result<(), Error> {
    let runs = conns.iter_mut().enumerate().map(|(c, stream)| {
        let requests = server.requests(c, subscribe);
        pipeline(server, stream, requests, PER_CONNECTION, subscribe)
    });
    futures_util::future::try_join_all(runs).await?;
    Ok(())
}

struct Row {
    phase: &'static str,
    took: Duration,
    cpu: f64,
    pings: Vec<Duration>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `work` while a pinger pings; the row for it.
async fn phase<S: Churned, F: std::future::Future<Output = Result<(), Error>>>(
    server: &S,
    name: &'static str,
    ticks: f64,
    work: F,
) -> Result<Row, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = server.pinger()?;
    // The pinger's thread borrows nothing: a second handle pings.
    let pings = std::thread::scope(|scope| -> Result<(Vec<Duration>, Duration, f64), Error> {
        let pinger = scope.spawn({
            let stop = Arc::clone(&stop);
            move || -> Result<Vec<Duration>, Error> {
                let mut out = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    let t = Instant::now();
                    server.ping(&mut conn)?;
                    out.push(t.elapsed());
                    std::thread::sleep(PING_EVERY);
                }
                Ok(out)
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        let cpu = cpu_secs(server.pid(), ticks);
        let started = Instant::now();
        let handle = tokio::runtime::Handle::current();
        let result = tokio::task::block_in_place(|| handle.block_on(work));
        let took = started.elapsed();
        let cpu = cpu_secs(server.pid(), ticks) - cpu;
        stop.store(true, Ordering::Release);
        let pings = pinger.join().map_err(|_| "the pinger panicked")??;
        result?;
        Ok((pings, took, cpu))
    })?;
    let (mut pings, took, cpu) = pings;
    pings.sort();
    Ok(Row {
        phase: name,
        took,
        cpu,
        pings,
    })
}

async fn round<S: Churned>(server: &S, ticks: f64) -> Result<Vec<Row>, Error> {
    let total = (CONNECTIONS * PER_CONNECTION) as u64;
    let mut rows = vec![
        phase(server, "idle (baseline)", ticks, async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(())
        })
        .await?,
    ];
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(server.open().await?);
    }
    for (name, subscribe, held) in [("subscribe", true, total), ("unsubscribe", false, 0)] {
        let work = churn_all(server, &mut conns, subscribe);
        rows.push(phase(server, name, ticks, work).await?);
        let now = server.subscriptions().await?;
        if now != held {
            return Err(format!(
                "{}: {now} subscriptions after {name}, not {held}",
                server.name()
            )
            .into());
        }
    }
    churn_all(server, &mut conns, true).await?;
    rows.push(
        phase(server, "disconnect", ticks, async {
            drop(conns);
            while server.subscriptions().await? > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        })
        .await?,
    );
    Ok(rows)
}

// ---------------------------------------------------------------------------
// keyhole

struct Keyhole {
    proc: Proc,
    socket: PathBuf,
    token: Arc<SessionToken>,
    status: HubClient,
    _dir: tempfile::TempDir,
}

impl Keyhole {
    async fn start() -> Result<Self, Error> {
        let started = support::start_keyholed(&[]);
        let status = ConnectOptions::new()
            .socket(&started.socket)
            .token(Arc::clone(&started.token))
            .connect_hub()
            .await?;
        Ok(Self {
            proc: started.proc,
            socket: started.socket,
            token: started.token,
            status,
            _dir: started.dir,
        })
    }

    /// Takes one frame off `buf`.
    fn frame(buf: &mut BytesMut) -> Result<Option<DaemonFrame>, Error> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let payload = buf.split_to(len).freeze();
        Ok(Some(DaemonFrame::decode(&payload)?))
    }
}

impl Churned for Keyhole {
    fn name(&self) -> &'static str {
        "keyhole"
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn pinger(&self) -> Result<StdStream, Error> {
        let mut conn = StdStream::connect(&self.socket)?;
        conn.write_all(&HandshakeFrame::new(&self.token))?;
        let mut buf = BytesMut::new();
        loop {
            if let Some(frame) = Self::frame(&mut buf)? {
                return match frame {
                    DaemonFrame::Welcome(_) => Ok(conn),
                    other => Err(format!("expected Welcome, got {other:?}").into()),
                };
            }
            let mut chunk = [0u8; 512];
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                return Err("EOF before Welcome".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn ping(&self, conn: &mut StdStream) -> Result<(), Error> {
        let mut out = BytesMut::new();
        encode_request::<()>(&mut out, 1, RequestKind::Ping, None, MAX_FRAME_LEN)?;
        conn.write_all(&out)?;
        let mut frame = [0u8; 16];
        conn.read_exact(&mut frame[..4])?;
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        if len > 12 {
            return Err(format!("a ping answered by a frame of {len} bytes").into());
        }
        conn.read_exact(&mut frame[4..4 + len])?;
        let mut buf = BytesMut::from(&frame[..4 + len]);
        match Self::frame(&mut buf)? {
            Some(DaemonFrame::Ack { id: 1 }) => Ok(()),
            other => Err(format!("a ping answered by {other:?}").into()),
        }
    }

    async fn open(&self) -> Result<UnixStream, Error> {
        let mut conn = UnixStream::connect(&self.socket).await?;
        conn.write_all(&HandshakeFrame::new(&self.token)).await?;
        let mut buf = BytesMut::new();
        loop {
            if let Some(frame) = Self::frame(&mut buf)? {
                return match frame {
                    DaemonFrame::Welcome(_) => Ok(conn),
                    other => Err(format!("expected Welcome, got {other:?}").into()),
                };
            }
            if conn.read_buf(&mut buf).await? == 0 {
                return Err("EOF before Welcome".into());
            }
        }
    }

    fn requests(&self, c: usize, subscribe: bool) -> BytesMut {
        let mut out = BytesMut::new();
        for i in 0..PER_CONNECTION {
            // One subscription per topic: its id is its index.
            let sid = i as u64 + 1;
            let request = if subscribe {
                HubRequest::Subscribe {
                    sid,
                    pattern: topic(c, i),
                    lag: Lag::Disconnect,
                }
            } else {
                HubRequest::Unsubscribe { sid }
            };
            encode_request(
                &mut out,
                i as u64 + 1,
                RequestKind::Call,
                Some(&request),
                MAX_FRAME_LEN,
            )
            .expect("a request of a few hundred bytes encodes");
        }
        out
    }

    fn answer(&self, buf: &mut BytesMut, subscribe: bool) -> Result<bool, Error> {
        let Some(frame) = Self::frame(buf)? else {
            return Ok(false);
        };
        let DaemonFrame::Reply { body, .. } = frame else {
            return Err(format!("expected a Reply, got {frame:?}").into());
        };
        let reply: HubReply = keyhole::encoding::decode(&body)?;
        match (reply, subscribe) {
            (HubReply::Subscribed, true) | (HubReply::Unsubscribed, false) => Ok(true),
            (other, _) => Err(format!("unexpected reply {other:?}").into()),
        }
    }

    async fn subscriptions(&self) -> Result<u64, Error> {
        Ok(self.status.status().await?.subscriptions)
    }
}

// ---------------------------------------------------------------------------
// Redis

struct Redis {
    server: support::RedisServer,
}

impl Redis {
    fn bulk(out: &mut BytesMut, s: &[u8]) {
        out.extend_from_slice(format!("${}\r\n", s.len()).as_bytes());
        out.extend_from_slice(s);
        out.extend_from_slice(b"\r\n");
    }

    /// A RESP line starting at `at`: its content and where the next starts.
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }

    /// A bulk string at `at`: its content and where the next item starts.
    fn bulk_at(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, Error> {
        let Some((head, next)) = Self::line(buf, at) else {
            return Ok(None);
        };
        let len: usize =
            std::str::from_utf8(head.strip_prefix(b"$").ok_or("expected a bulk string")?)?
                .parse()?;
        if buf.len() < next + len + 2 {
            return Ok(None);
        }
        Ok(Some((&buf[next..next + len], next + len + 2)))
    }
}

impl Churned for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn pid(&self) -> u32 {
        self.server.proc.pid()
    }

    fn pinger(&self) -> Result<StdStream, Error> {
        Ok(StdStream::connect(&self.server.socket)?)
    }

    fn ping(&self, conn: &mut StdStream) -> Result<(), Error> {
        conn.write_all(b"PING\r\n")?;
        let mut pong = [0u8; 7];
        conn.read_exact(&mut pong)?;
        if &pong != b"+PONG\r\n" {
            return Err(format!("PING answered by {:?}", String::from_utf8_lossy(&pong)).into());
        }
        Ok(())
    }

    async fn open(&self) -> Result<UnixStream, Error> {
        Ok(UnixStream::connect(&self.server.socket).await?)
    }

    fn requests(&self, c: usize, subscribe: bool) -> BytesMut {
        let mut out = BytesMut::new();
        let verb: &[u8] = if subscribe {
            b"SUBSCRIBE"
        } else {
            b"UNSUBSCRIBE"
        };
        for i in 0..PER_CONNECTION {
            out.extend_from_slice(b"*2\r\n");
            Self::bulk(&mut out, verb);
            Self::bulk(&mut out, topic(c, i).as_bytes());
        }
        out
    }

    /// `*3 $subscribe $channel :count`.
    fn answer(&self, buf: &mut BytesMut, subscribe: bool) -> Result<bool, Error> {
        let Some((head, at)) = Self::line(buf, 0) else {
            return Ok(false);
        };
        if head != b"*3" {
            return Err(format!(
                "expected a 3-element reply, got {:?}",
                String::from_utf8_lossy(head)
            )
            .into());
        }
        let Some((kind, at)) = Self::bulk_at(buf, at)? else {
            return Ok(false);
        };
        let want: &[u8] = if subscribe {
            b"subscribe"
        } else {
            b"unsubscribe"
        };
        if kind != want {
            return Err(format!(
                "expected {:?}, got {:?}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(kind)
            )
            .into());
        }
        let Some((_, at)) = Self::bulk_at(buf, at)? else {
            return Ok(false);
        };
        let Some((count, at)) = Self::line(buf, at) else {
            return Ok(false);
        };
        if !count.starts_with(b":") {
            return Err("expected the subscription count".into());
        }
        buf.advance(at);
        Ok(true)
    }

    async fn subscriptions(&self) -> Result<u64, Error> {
        let mut conn = UnixStream::connect(&self.server.socket).await?;
        conn.write_all(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
            .await?;
        let mut buf = BytesMut::new();
        loop {
            if let Some((head, at)) = Self::line(&buf, 0) {
                let len: usize =
                    std::str::from_utf8(head.strip_prefix(b"$").ok_or("INFO: no bulk")?)?
                        .parse()?;
                if buf.len() >= at + len {
                    let info = String::from_utf8_lossy(&buf[at..at + len]).into_owned();
                    let n = info
                        .lines()
                        .find_map(|l| l.strip_prefix("pubsub_channels:"))
                        .ok_or("INFO stats has no pubsub_channels")?;
                    return Ok(n.trim().parse()?);
                }
            }
            if conn.read_buf(&mut buf).await? == 0 {
                return Err("EOF in INFO".into());
            }
        }
    }
}

// ---------------------------------------------------------------------------

fn print_rows(server: &str, rows: &[Row]) -> Duration {
    let idle = pct(&rows[0].pings, 0.99).max(Duration::from_micros(1));
    let mut worst = Duration::ZERO;
    for row in rows {
        let p99 = pct(&row.pings, 0.99);
        if !std::ptr::eq(row, &rows[0]) {
            worst = worst.max(p99);
        }
        println!(
            "{:<8} {:<16} {:>6.0}ms {:>9.3} {:>6} {:>7.0}us {:>7.0}us {:>7.0}us {:>8.1}x",
            server,
            row.phase,
            row.took.as_secs_f64() * 1e3,
            row.cpu,
            row.pings.len(),
            pct(&row.pings, 0.5).as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            row.pings.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
            p99.as_secs_f64() / idle.as_secs_f64()
        );
    }
    worst
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let quick = std::env::args().any(|a| a == "--quick");
    const { assert!(PER_CONNECTION <= MAX_SUBSCRIPTIONS) };
    let ticks = clock_ticks();
    let keyhole = Keyhole::start().await?;
    let redis = on_path("redis-server").then(|| Redis {
        server: start_redis(),
    });
    if redis.is_none() {
        println!("redis-server is not on PATH: the redis rows are skipped");
    }

    println!(
        "subscription churn: {CONNECTIONS} connections x {PER_CONNECTION} topics of {MAX_TOPIC_LEN} B, pipelined; a separate client pings every {} us",
        PING_EVERY.as_micros()
    );
    println!(
        "{:<8} {:<16} {:>8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "server", "phase", "took", "server s", "pings", "p50", "p99", "max", "p99/idle"
    );
    let mut worst = Duration::ZERO;
    for _ in 0..if quick { 1 } else { 3 } {
        worst = worst.max(print_rows("keyhole", &round(&keyhole, ticks).await?));
        if let Some(redis) = &redis {
            print_rows("redis", &round(redis, ticks).await?);
        }
    }
    println!(
        "target: keyhole's ping p99 under {} ms during churn: {} (worst p99 over rounds {:.2} ms)",
        TARGET_P99.as_millis(),
        if worst < TARGET_P99 { "met" } else { "MISSED" },
        worst.as_secs_f64() * 1e3
    );
    Ok(())
}
